"""The whole PM model, forward and backward, through each backend equals the torch backend.

On the CPU: Triton under the interpreter and the extension's C++ kernels, on a tiny ViT (head dim 32).
On a GPU: PM-DeiT-S at keep 0.6, bf16-free fp32 comparison.
"""
import copy

import pytest
import torch
import timm
from timm.models.vision_transformer import VisionTransformer

import pm_kernels
from pm_kernels.dispatch import usable

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def compressed_model():
    torch.manual_seed(0)
    if ON_GPU:
        model = timm.create_model("deit_small_patch16_224")
    else:
        model = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=5)
    n_layers, n_patches = len(model.blocks), model.patch_embed.num_patches
    pm_kernels.compress(model, torch.rand(n_layers, n_patches) + 0.1, keep_rate=0.6, prune_rate=0.1)
    return model.to(DEVICE).eval()


def forward_backward(model, images):
    model.zero_grad()
    out = model(images)
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_model_forward_backward_matches_torch_backend(backend):
    if not usable(backend, DEVICE):
        pytest.skip(pm_kernels.backends()[backend])
    model = compressed_model()
    images = torch.randn(2, 3, *model.patch_embed.img_size, device=DEVICE)
    pm_kernels.set_backend(model, "torch")
    expected_out, expected_grads = forward_backward(model, images)
    other = copy.deepcopy(model)
    pm_kernels.set_backend(other, backend)
    out, grads = forward_backward(other, images)
    tol = dict(rtol=5e-3, atol=5e-4) if ON_GPU else dict(rtol=1e-4, atol=1e-5)  # tf32 on the GPU
    torch.testing.assert_close(out, expected_out, **tol)
    assert grads.keys() == expected_grads.keys() and any(".M" in k for k in grads)
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], **tol, msg=name)


def test_auto_backend_runs_torch_on_cpu_tensors():
    model = compressed_model().cpu()
    images = torch.randn(1, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        auto = model(images)
        pm_kernels.set_backend(model, "torch")
        assert torch.equal(model(images), auto)


def test_backends_reports_every_backend():
    status = pm_kernels.backends()
    assert set(status) == {"cuda", "triton", "torch"}
    assert status["torch"].startswith("available")
    assert all(s.startswith(("available: ", "unavailable: ")) for s in status.values())
