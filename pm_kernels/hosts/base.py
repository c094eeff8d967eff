"""``Host``: what pm_kernels needs to know about one library's Vision Transformers, behind one interface.

A host (timm, transformers, open_clip) is the only place that knows its library's names: where the layers are,
how many prefix tokens come first (CLS, distillation token, registers, none), the patch grid, the first layer's
input, how attention is formed and how the head reads the tokens. Everything else (``calibrate``, ``compress``,
``budget``, ``optimize``, ``export``, ``set_backend``, the ``Segmenter``) asks the model's host.

The Prune-and-Merge math does not depend on the host: every supported layer is pre-norm, so a PM layer is the
host's own layer class with ``PMBlockMixin`` (M, R, keep_mask) whose ``body`` is the layer's own computation on
the K merged tokens (``pm_kernels.layers``).

A *task model* (``pm_kernels.Segmenter``) is not a host model: it names its backbone in ``pm_backbone``, and
the operations act on that backbone (``resolve``).
"""
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["Host", "resolve_task", "structure_grid", "check_grid_matches"]


class Host:
    """The interface of one host library. Subclasses implement every method that raises NotImplementedError."""

    name: str = ""
    # top-level package of the model classes this host handles (``type(model).__module__`` starts with it)
    package: str = ""

    # ---- recognising and patching

    def supports(self, model: nn.Module) -> bool:
        """``model`` is one of the model classes this host can patch (patched or not)."""
        raise NotImplementedError

    def explain_unsupported(self, model: nn.Module) -> str:
        """Why ``model`` (of this host's library) cannot be patched: one line naming its class."""
        return f"{type(model).__name__} is not a model class pm_kernels supports for {self.name}"

    def patch(self, model: nn.Module) -> nn.Module:
        """Make ``model`` a Prune-and-Merge model in place, with the identity structure, and return it."""
        raise NotImplementedError

    def is_patched(self, model: nn.Module) -> bool:
        raise NotImplementedError

    # ---- the layers

    def layers(self, model: nn.Module) -> List[nn.Module]:
        """The PM layers of a patched model, in order (each a ``PMBlockMixin``)."""
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> nn.Module:
        """The module of ``layer`` that holds ``score_accumulator`` and ``backend`` (SPEC §3 score, dispatch)."""
        raise NotImplementedError

    def num_heads(self, layer: nn.Module) -> int:
        raise NotImplementedError

    def attention_width(self, layer: nn.Module) -> int:
        """heads × head dim: the width of q, k and v (the attention products' MACs)."""
        raise NotImplementedError

    def layer_body(self, layer: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """z → the pre-norm body of an unpatched layer of this host on tokens z (``fused_block``); None when
        ``layer`` is not a layer this host supports."""
        return None

    def layer_macs_per_token(self, layer: nn.Module) -> int:
        """Multiply-adds of the layer's linear maps per token (qkv, projection, MLP of any width or gating)."""
        return sum(m.in_features * m.out_features for m in layer.modules() if isinstance(m, nn.Linear))

    def layer_macs(self, model: nn.Module, layer: nn.Module, kept: int, grid: Tuple[int, int]) -> int:
        """Multiply-adds of ``layer`` on one image of the patch ``grid`` when its body runs on ``kept`` tokens
        (``kept`` = N, all tokens: the dense layer): its linear maps on the kept tokens, the attention products
        2·K²·width, the merge and reconstruct products 2·K·N·C of a compressed layer."""
        n = self.num_prefix(model) + grid[0] * grid[1]
        merge = 2 * kept * n * self.embed_dim(model) if kept < n else 0
        return kept * self.layer_macs_per_token(layer) + 2 * kept * kept * self.attention_width(layer) + merge

    def kept_tokens(self, model: nn.Module, structure: Sequence[Any], grid: Tuple[int, int]) -> List[int]:
        """Tokens each layer's body runs on under the searched ``structure`` (one ``LayerStructure`` per layer)."""
        return [st.keep for st in structure]

    # ---- tokens and grid

    def num_prefix(self, model: nn.Module) -> int:
        """P: tokens before the patches (never pruned or merged)."""
        raise NotImplementedError

    def patch_size(self, model: nn.Module) -> Tuple[int, int]:
        raise NotImplementedError

    def grid(self, model: nn.Module) -> Tuple[int, int]:
        """The patch grid of the model's own image size."""
        raise NotImplementedError

    def in_chans(self, model: nn.Module) -> int:
        raise NotImplementedError

    def embed_dim(self, model: nn.Module) -> int:
        raise NotImplementedError

    def any_size(self, model: nn.Module) -> bool:
        """The model runs image sizes other than its own (so a structure may be built for another grid)."""
        return False

    def hook_tokens(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Register ``fn(tokens) -> tokens`` on the input of the first layer (tokens (B, N, C)); returns a handle
        with ``remove()``. Calibration differentiates with respect to what ``fn`` returns."""
        raise NotImplementedError

    # ---- running

    def forward_images(self, model: nn.Module, images: torch.Tensor) -> Any:
        """What ``calibrate`` calls on a batch of images (the model's own output type)."""
        return model(images)

    def loss_input(self, outputs: Any) -> torch.Tensor:
        """What the default calibration loss reads from ``forward_images``'s output (e.g. ``.logits``)."""
        return outputs

    def dense_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function images → the N final tokens (after the final norm), for a dense-prediction head; ``model``
        is a PM model or its ``optimize`` form."""
        raise NotImplementedError

    def remove_head(self, model: nn.Module) -> None:
        """Drop the classifier (a task model puts its own head on the tokens)."""
        raise NotImplementedError

    # ---- compressing, deploying, counting

    def check_compressible(self, model: nn.Module) -> None:
        """Raise ValueError when ``model`` cannot run a compressed structure (e.g. patch dropout)."""

    def optimize(self, model: nn.Module, folded: nn.Module) -> nn.Module:
        """The deployable model: ``model``'s call and output type, its layers run as ``folded`` (a
        ``pm_kernels.optimize.FoldedLayers``). Must set ``pm_source`` (the PM model) on what it returns."""
        raise NotImplementedError

    def fold_layers(self, model: nn.Module, backend: str, dtype: Optional[torch.dtype]) -> Optional[nn.Module]:
        """The folded layers of ``optimize`` when this host's layers need their own form (windowed layers); None:
        the generic ``pm_kernels.optimize.FoldedLayers``."""
        return None

    def head_reads_prefix_only(self, model: nn.Module) -> bool:
        """The model's output depends on the prefix tokens of the last layer only (so the folded exit may
        reconstruct just those rows)."""
        return False

    def embed_macs(self, model: nn.Module, num_patches: int) -> int:
        """Multiply-adds of the patch embedding for ``num_patches`` patches."""
        raise NotImplementedError

    def head_macs(self, model: nn.Module) -> int:
        """Multiply-adds of the head on the tokens it reads (0 without a head)."""
        return 0

    def export_outputs(self, outputs: Any) -> Any:
        """The tensor(s) an exported file returns, from the model's output."""
        return outputs

    def reference_tensor(self, model: nn.Module) -> torch.Tensor:
        """A parameter giving the model's device and dtype."""
        return next(model.parameters())


def resolve_task(model: nn.Module) -> Tuple[nn.Module, Optional[nn.Module]]:
    """(backbone, task model or None): a task model (e.g. ``Segmenter``) names its backbone in ``pm_backbone``."""
    backbone = getattr(model, "pm_backbone", None)
    if isinstance(backbone, nn.Module):
        return backbone, model
    return model, None


def structure_grid(layers, num_prefix: int, own_grid: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """The patch grid the structure installed in ``layers`` is for (None: the identity runs any grid).

    Set by the installer on every compressed layer (``pm_grid``); for a structure loaded from a checkpoint, the
    model's own grid if its token count matches, else the square grid of that count.
    """
    compressed = [layer for layer in layers if layer.num_tokens is not None]
    if not compressed:
        return None
    patches = compressed[0].num_tokens - num_prefix
    grid = compressed[0].pm_grid
    if grid is None or grid[0] * grid[1] != patches:
        h, w = own_grid
        side = int(round(patches ** 0.5))
        if h * w == patches:
            grid = (h, w)
        elif side * side == patches:
            grid = (side, side)
        else:
            raise ValueError(f"model: the structure is for {patches} patches, which is not this model's "
                             f"{h}x{w} grid nor a square one; compress with img_size=(H, W)")
        for layer in compressed:
            layer.pm_grid = grid
    return grid


def check_grid_matches(want: Optional[Tuple[int, int]], got: Tuple[int, int], patch: Tuple[int, int]) -> None:
    """A compressed structure runs only on the patch grid it was built for: one error speaking in image sizes."""
    if want is None or tuple(got) == tuple(want):
        return
    p = patch
    raise ValueError(f"x: this compressed model is built for {want[0] * p[0]}x{want[1] * p[1]} images (a "
                     f"{want[0]}x{want[1]} patch grid), got {got[0] * p[0]}x{got[1] * p[1]} ({got[0]}x"
                     f"{got[1]} patches); compress it for that size (img_size=...) or use the identity structure")
