"""The package's shape: one capability table resolved once, structure checked where it changes, the fused
chain under gradient checkpointing, one installer, no import cycle."""
import ast
import copy
import pathlib
import warnings

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import pm_kernels
from pm_kernels import dispatch, token_ops

PACKAGE = pathlib.Path(pm_kernels.__file__).parent


def tiny_vit(depth=3):
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2, num_classes=5)


def compressed(depth=3):
    model = tiny_vit(depth)
    pm_kernels.compress(model, torch.rand(depth, 16) + 0.1, keep_rate=0.5, prune_rate=0.2)
    return model


# ------------------------------------------------------------------------------------------- imports

def _imports(path: pathlib.Path):
    """Package modules imported anywhere in ``path`` (function-level imports included)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("pm_kernels"))
    return module, found


def test_no_import_cycle_in_the_package():
    modules = dict(_imports(p) for p in PACKAGE.rglob("*.py"))
    graph = {m: {t for t in targets if t in modules and t != m} for m, targets in modules.items()}
    # A package __init__ importing its own submodules is not a cycle of the code: drop edges into __init__s.
    packages = {m for m in modules if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}
    graph = {m: {t for t in ts if t not in packages} for m, ts in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)
    assert "pm_kernels.kernels.attention_triton" in graph  # the walk saw the kernel files


# Attribute names only the host libraries' models have: read anywhere else, they tie that code to the library.
# A name two libraries share (open_clip's towers and timm both have ``attn``, ``attn_pool``, ``grid_size``) may be
# read in either's host. (``self.<name>`` of a class of our own is not a host's name: e.g. the Segmenter decoder's
# own ``blocks``.)
HOST_NAMES = {
    "timm": {"patch_embed", "num_prefix_tokens", "blocks", "forward_head", "forward_features", "global_pool",
             "fc_norm", "attn_pool", "norm_pre", "patch_drop", "_pos_embed", "reset_classifier",
             "dynamic_img_size", "grid_size", "head_dist", "no_embed_class", "attn",
             # SAM (VisionTransformerSAM); the names transformers' SAM shares are in both sets
             "neck", "rel_pos_h", "rel_pos_w", "use_rel_pos", "rope_global", "rope_window", "pos_drop"},
    "transformers": {"vision_model", "vision_config", "text_model", "_attn_implementation", "hidden_size",
                     "num_hidden_layers", "num_attention_heads", "post_layernorm", "pre_layrnorm",
                     "patch_embeddings", "last_hidden_state", "pooler_output", "layernorm_before",
                     "layernorm_after", "self_attn", "get_image_features", "num_register_tokens",
                     "output_attentions", "output_hidden_states", "set_attn_implementation", "to_tuple",
                     # SAM (SamVisionEncoder), with the names it shares with timm's
                     "vision_encoder", "layer_norm1", "layer_norm2", "get_rel_pos", "attn", "patch_embed",
                     "neck", "rel_pos_h", "rel_pos_w", "use_rel_pos"},
    "open_clip": {"visual", "resblocks", "conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post",
                  "in_proj_weight", "in_proj_bias", "encode_image", "trunk", "attn", "attn_pool", "grid_size",
                  "ln_1", "ln_2", "ls_1", "ls_2", "_embeds", "_pool", "pool_type", "output_tokens", "patch_dropout"},
}
# Every module is on the host layer (the pipeline joined with its task rewrite, issue 23); none is exempt.
NOT_YET_ON_HOSTS = ()


def _host_name_reads(source: str, rel: str):
    """(line, library, name) of every host attribute name read in ``source`` (the module at ``rel``, e.g.
    "pm_kernels/calibrate.py") outside the hosts of the libraries that have that name."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute) or isinstance(node.value, ast.Name) and node.value.id == "self":
            continue
        owners = [library for library, names in HOST_NAMES.items() if node.attr in names]
        if not any(rel.startswith(f"pm_kernels/hosts/{library}") for library in owners):
            for library in owners:
                yield node.lineno, library, node.attr


def test_host_names_are_read_only_in_their_host():
    modules = {p.relative_to(PACKAGE.parent).as_posix(): p for p in sorted(PACKAGE.rglob("*.py"))}
    found = [f"{rel}:{line}: {library}'s .{name}" for rel, p in modules.items() if not rel.startswith(NOT_YET_ON_HOSTS)
             for line, library, name in _host_name_reads(p.read_text(), rel)]
    assert not found, "host names read outside their host module:\n" + "\n".join(found)


def test_the_host_name_check_finds_a_planted_read():
    planted = "def grid(model):\n    return model.patch_embed.grid_size, model.visual, self.blocks\n"
    found = sorted((library, name) for _, library, name in _host_name_reads(planted, "pm_kernels/calibrate.py"))
    assert found == [("open_clip", "grid_size"), ("open_clip", "visual"), ("timm", "grid_size"), ("timm", "patch_embed"),
                     ("transformers", "patch_embed")]
    assert [name for _, _, name in _host_name_reads(planted, "pm_kernels/hosts/timm/model.py")] == ["visual"]
    # a name two libraries share is theirs to read: grid_size in the open_clip host, not open_clip's visual in timm's
    assert [(library, name) for _, library, name in _host_name_reads(planted, "pm_kernels/hosts/open_clip.py")] == [
        ("timm", "patch_embed"), ("transformers", "patch_embed")]  # SAM's encoder has a patch_embed in both


OPTIONAL_HOSTS = {"transformers": "pm_kernels/hosts/transformers", "open_clip": "pm_kernels/hosts/open_clip"}


def test_optional_host_libraries_are_imported_by_their_hosts_only():
    """Without transformers / open_clip installed the package imports and runs timm models: only their hosts,
    imported on first use of such a model, import them."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for library, host in OPTIONAL_HOSTS.items():
                if any(n.split(".")[0] == library for n in names) and not rel.startswith(host):
                    found.append(f"{rel}:{node.lineno}: imports {library}")
    assert not found, "\n".join(found)


def test_backends_function_and_old_module_path():
    assert callable(pm_kernels.backends) and set(pm_kernels.backends()) == set(dispatch.BACKENDS)
    from pm_kernels.backends import select  # the pre-0.2 module path still imports
    assert select is dispatch.select


# ---------------------------------------------------------------------------------------- dispatch

def test_every_op_declares_every_backend_it_orders():
    for op, order in dispatch.AUTO_ORDER.items():
        assert set(order) <= set(dispatch.CAPABILITIES[op]), op
        assert "torch" in dispatch.CAPABILITIES[op]  # the reference is always there to fall back on


def test_resolution_is_cached_per_key(monkeypatch):
    calls = []
    real = dispatch._resolve
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    monkeypatch.setattr(dispatch, "_resolve", lambda *a: calls.append(a) or real(*a))
    x, M = torch.randn(2, 5, 4), torch.randn(3, 5)
    for _ in range(3):
        token_ops.merge(x, M)
    token_ops.merge(x.double(), M)
    assert len(calls) == 2  # one per (op, backend, device, dtype), not one per call


@pytest.mark.parametrize("call, exc, match", [
    (lambda: pm_kernels.attention(*[torch.randn(1, 1, 4, 32)] * 3, dropout_p=0.1, backend="triton"),
     ValueError, r"q: the triton backend of attention does not implement dropout"),
    (lambda: pm_kernels.attention(*[torch.randn(1, 1, 4, 32)] * 3, backend="cuda"),
     ValueError, r"backend: attention has no 'cuda' implementation"),
    (lambda: pm_kernels.attention(*[torch.randn(1, 1, 4, 32)] * 3, score=torch.zeros(4), dropout_p=0.1),
     ValueError, r"score: the calibration score needs attention dropout off"),
    (lambda: token_ops.merge(torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(3, 5), backend="triton"),
     ValueError, r"x: the triton backend of merge supports dtypes float32, float16, bfloat16, got float64"),
])
def test_forced_backend_that_cannot_run_the_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_model_wide_backend_keeps_attention_on_auto_for_the_extension():
    model = compressed()
    pm_kernels.set_backend(model, "cuda")
    assert {b.backend for b in model.blocks} == {"cuda"} and {b.attn.backend for b in model.blocks} == {"auto"}
    with pytest.raises(TypeError, match="model: expected a PM model"):
        pm_kernels.set_backend(tiny_vit(), "torch")


# --------------------------------------------------------------------- structure checked where it changes

@pytest.mark.parametrize("change, match", [
    (lambda M, R, m: (M[:, :-1], R, m), r"M: expected shape \(K, 17\)"),
    (lambda M, R, m: (M, R[:, :-1], m), r"R: expected shape \(17, \d+\)"),
    (lambda M, R, m: (M, R, m.float()), r"keep_mask: expected dtype bool"),
    (lambda M, R, m: (torch.eye(17).repeat(2, 1)[:18], torch.eye(17).repeat(1, 2)[:, :18], m),
     r"M: expected shape \(K, 17\) with 1 <= K <= 17"),
    (lambda M, R, m: (M.masked_fill(M != 0, float("nan")), R, m), r"M: expected finite values"),
])
def test_set_structure_checks_the_structure(change, match):
    blk = compressed().blocks[1]
    with pytest.raises((ValueError, TypeError), match=match):  # TypeError for a wrong dtype
        blk.set_structure(*change(blk.M.detach(), blk.R.detach(), blk.keep_mask))


def test_inconsistent_checkpoint_fails_at_load_not_at_forward():
    model = compressed()
    state = model.state_dict()
    state["blocks.1.R"] = state["blocks.1.R"][:, :-1]  # K of R no longer K of M
    fresh = pm_kernels.patch_timm(tiny_vit())
    with pytest.raises(ValueError, match=r"blocks\.1\.R: expected shape"):
        fresh.load_state_dict(state)
    state = model.state_dict()
    del state["blocks.2.keep_mask"]
    with pytest.raises(ValueError, match=r"blocks\.2\.M, R and keep_mask come together.*keep_mask"):
        fresh.load_state_dict(state)


def test_forward_checks_x_only(monkeypatch):
    model = compressed().eval()
    images = torch.randn(2, 3, 16, 16)
    import pm_kernels.block as block
    import pm_kernels.layers as layers

    def fail(*args, **kwargs):
        raise AssertionError("structure re-checked in a forward")
    monkeypatch.setattr(block, "check_structure", fail)
    monkeypatch.setattr(layers, "check_structure", fail)
    with torch.no_grad():
        model(images)
        model.blocks[0](torch.randn(2, 17, 32))
        pm_kernels.optimize(model)(images)
    with pytest.raises(ValueError, match=r"x: expected 17 tokens"):
        model.blocks(torch.randn(2, 16, 32))


# ------------------------------------------------------------------ one installer, gradient checkpointing

def test_patch_timm_keeps_an_installed_structure_and_deprecates_its_structure_arguments():
    model = compressed()
    kept = [b.M.shape for b in model.blocks]
    pm_kernels.patch_timm(model)
    assert [b.M.shape for b in model.blocks] == kept
    other = tiny_vit()
    with pytest.warns(DeprecationWarning, match="pm_kernels.compress"):
        pm_kernels.patch_timm(other, scores=torch.rand(3, 16) + 0.1)
    assert any(b.M.shape[0] < 17 for b in other.blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm_kernels.patch_timm(tiny_vit())  # the identity: no warning


def test_gradient_checkpointing_keeps_the_fused_boundaries(monkeypatch):
    model = compressed()
    images = torch.randn(2, 3, 16, 16)
    plain = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing and model.blocks.grad_checkpointing
    fused = []
    real = token_ops.run_reconstruct_merge
    monkeypatch.setattr(token_ops, "run_reconstruct_merge", lambda *a: fused.append(1) or real(*a))
    out = model(images)
    out.square().sum().backward()
    # forward, and the recomputation in backward: every boundary between blocks still runs fused
    assert len(fused) == 2 * (len(model.blocks) - 1)
    ref = plain(images)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_cpu_only_extension_is_not_used_for_cuda_tensors(monkeypatch):
    # An extension built without its CUDA kernels runs CPU tensors only: auto skips it for CUDA tensors, a forced
    # "cuda" says why (resolution only: no CUDA tensor is needed to decide).
    if not dispatch._status("cuda")[0]:
        pytest.skip(pm_kernels.backends()["cuda"])
    monkeypatch.setitem(dispatch._STATUS, "cuda-kernels", (False, ""))
    assert dispatch._resolve("merge", "auto", "cuda", torch.float32, None, frozenset(), "x") != "cuda"
    with pytest.raises(RuntimeError, match="without its CUDA kernels"):
        dispatch._resolve("merge", "cuda", "cuda", torch.float32, None, frozenset(), "x")
    assert dispatch._resolve("merge", "cuda", "cpu", torch.float32, None, frozenset(), "x") == "cuda"
