"""Model forwards on the CPU (``make bench``): the dense model against its PM form as deployed (``pm_kernels.optimize``
of the compressed model), same inputs, threads and mode (eager, fp32, no-grad), at CPU sizes.

- ``digits_vit`` at batch 32: the demo's ViT (4 blocks, 64 patches + CLS), keep 0.6;
- ``deit_tiny`` at batch 8: timm DeiT-T at 224, keep 0.6 (structure from random scores: speed and MACs depend on
  the structure, not on the weights).

One group per model, so that ``--benchmark-compare`` puts dense and PM side by side (and against earlier runs);
each case's ``extra_info`` has its traced MACs and the MAC ratio, the ceiling of the speed-up. One torch thread:
runs compare across machines and loads (more threads on a shared, busy CPU spin against the other processes and
turn a tiny model's figures into noise).
"""
import copy

import pytest
import torch

ROUNDS = 10
CASES = {"digits_vit": (32, 0.6), "deit_tiny_patch16_224": (8, 0.6)}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _models(name: str, keep: float):
    import timm

    import pm_kernels
    from pm_kernels.pipeline.families import DIGITS_VIT_KWARGS
    torch.manual_seed(0)
    dense = (pm_kernels.PMVisionTransformer(**DIGITS_VIT_KWARGS) if name == "digits_vit"
             else pm_kernels.patch_timm(timm.create_model(name, pretrained=False))).eval()
    scores = torch.rand(len(dense.blocks), dense.patch_embed.num_patches, generator=torch.Generator().manual_seed(1))
    pm = pm_kernels.compress(copy.deepcopy(dense), scores + 1e-3, keep_rate=keep)
    return {"dense": dense, "pm_optimized": pm_kernels.optimize(pm.eval())}


@pytest.mark.parametrize("form", ["dense", "pm_optimized"])
@pytest.mark.parametrize("name", list(CASES))
def test_bench_model_forward_cpu(benchmark, one_thread, name, form):
    from pm_kernels.measure import traced_macs
    batch, keep = CASES[name]
    models = _models(name, keep)
    model = models[form]
    shape = (model.patch_embed if form == "dense" else model.model.patch_embed).img_size
    channels = 1 if name == "digits_vit" else 3
    x = torch.randn(batch, channels, *shape, generator=torch.Generator().manual_seed(2))
    macs = {f: traced_macs(m, x[:1]) for f, m in models.items()}

    def run():
        with torch.no_grad():
            model(x)
    benchmark.group = f"{name} forward, CPU fp32, batch {batch}, keep {keep}"
    benchmark.extra_info.update({"model": name, "form": form, "batch": batch, "keep_rate": keep,
                                 "threads": torch.get_num_threads(), "gmacs_per_image": macs[form] / 1e9,
                                 "mac_ratio": macs["dense"] / macs[form]})
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2, iterations=1)
