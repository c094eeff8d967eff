"""Quick start: patch a DeiT, calibrate it on random data, compress it, print tokens per layer and timings.

    python python/quickstart.py --model deit_small_patch16_224 --keep-rate 0.6 --batch 8

Random weights and random data: this shows the mechanics and the speed, not accuracy
(the digits pipeline, `pm-kernels demo`, shows accuracy on real data).
"""
import argparse
import copy
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import pm_kernels


def gmacs_per_image(model, images) -> float:
    """Multiply-accumulates per image, in billions: the unit the paper calls GFLOPs (DeiT-S: 4.6)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images[:1])
    return counter.get_total_flops() / 2e9


def images_per_second(model, images, repeats=5) -> float:
    with torch.inference_mode():
        model(images)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            if images.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return images.shape[0] / sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep-rate", type=float, default=0.6)
    parser.add_argument("--prune-rate", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    dense = timm.create_model(args.model).eval().to(args.device)
    size = dense.patch_embed.img_size
    images = torch.randn(args.batch, 3, *size, device=args.device)
    batches = [(torch.randn(args.batch, 3, *size, device=args.device),
                torch.randint(0, dense.num_classes, (args.batch,), device=args.device))
               for _ in range(args.calib_batches)]

    pm = pm_kernels.patch_timm(copy.deepcopy(dense))
    scores = pm_kernels.calibrate(pm, batches)
    pm_kernels.compress(pm, scores, keep_rate=args.keep_rate, prune_rate=args.prune_rate)

    n = pm.num_prefix_tokens + pm.patch_embed.num_patches
    print(f"{args.model}: N = {n} tokens, keep_rate = {args.keep_rate}, prune_rate = {args.prune_rate}")
    print("layer  kept K  pruned  merged")
    for layer, blk in enumerate(pm.blocks):
        k, pruned = blk.num_kept(n), blk.num_pruned
        print(f"{layer:5d}  {k:6d}  {pruned:6d}  {n - k - pruned:6d}")
    mean_k = sum(b.num_kept(n) for b in pm.blocks) / len(pm.blocks)
    print(f"mean K = {mean_k:.1f} ({mean_k / n:.3f} of N)")

    device_name = torch.cuda.get_device_name() if images.is_cuda else "CPU"
    print(f"\nfp32 inference, batch {args.batch}, {device_name} (torch {torch.__version__}):")
    for name, model in (("dense (timm, SDPA)", dense), ("PM", pm)):
        print(f"  {name:20s} {gmacs_per_image(model, images):6.2f} GMACs/image  "
              f"{images_per_second(model, images):8.1f} images/s")


if __name__ == "__main__":
    main()
