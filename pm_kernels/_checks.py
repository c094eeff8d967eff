"""Input checks shared by the public functions: clear errors naming the argument, before any kernel runs."""
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, ndim: Optional[int] = None, dtypes: Optional[Iterable[torch.dtype]] = None,
                 shape: Optional[Sequence[Optional[int]]] = None, what: str = "") -> torch.Tensor:
    """Raise TypeError/ValueError unless ``t`` is a tensor of the given rank, dtype and shape.

    ``shape`` entries of None match any size; ``what`` describes the expected shape in words.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    dtypes = tuple(dtypes) if dtypes is not None else None
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    expected = what or (f"shape {tuple('*' if s is None else s for s in shape)}" if shape is not None else "")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor{' ' + expected if expected else ''}, "
                         f"got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            raise ValueError(f"{name}: expected {expected}, got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listed}")


def check_keep_mask(keep_mask, n_tokens: int, name: str = "keep_mask") -> torch.Tensor:
    check_tensor(name, keep_mask, ndim=1, dtypes=(torch.bool,), shape=(n_tokens,),
                 what=f"a bool tensor of shape ({n_tokens},) (one entry per token; True = kept)")
    return keep_mask


def check_rate(name: str, value, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:
        rng = "(0, 1]" if low_open else "[0, 1)"
        raise ValueError(f"{name}: expected a value in {rng}, got {value}")
    return value
