"""What the machine can hold: a size that cannot fit is refused with one line before anything is allocated (a
data set upsampled to ``--img-size``, a training batch at that size), instead of a crash or the kernel's OOM
killer minutes later.

The figures are lower bounds of what a run needs, so a run that fits is never refused: the bytes of the tensors
themselves, not the allocator's overhead, the framework's or the other processes'.
"""
import os
from typing import Optional

import torch

from .io import PipelineError

__all__ = ["available_bytes", "check_fits", "training_bytes"]


def available_bytes(device: Optional[torch.device] = None) -> Optional[int]:
    """Free memory of ``device`` (CUDA: the device's; else the machine's available RAM), or None if unknown."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check_fits(what: str, need: float, device: Optional[torch.device] = None) -> None:
    """``need`` bytes must fit in what ``device`` has free; else one line naming ``what`` needs them."""
    free = available_bytes(device)
    if free is not None and need > free:
        where = "this GPU" if torch.device(device or "cpu").type == "cuda" else "this machine"
        raise PipelineError(f"{what} needs at least {_gb(need)}, {where} has {_gb(free)} available")


def training_bytes(batch: int, tokens: int, width: int, depth: int) -> int:
    """A lower bound of the activations a training step keeps for the backward pass: per layer and token, the
    inputs of its four linear maps (qkv, projection, the MLP's two), each at least ``width`` float32 values."""
    return 4 * batch * tokens * depth * 4 * width
