"""Files of the pipeline: atomic writes (temp file + ``os.replace``) and reads that fail with one clear line.

Every error meant for the command line is a ``PipelineError``: ``pm_kernels.cli`` prints ``error: <message>``
on stderr and exits with status 2, without a traceback. Nothing is written half-way: a write goes to a temp
file in the target's folder and is renamed over the target only once complete (the temp file is removed on
any error, SIGINT or SIGTERM; one left by SIGKILL is removed by the next write of the same target).
"""
import json
import os
import re
import stat
import tempfile
from typing import Any, Dict, Optional

import torch

__all__ = ["PipelineError", "PipelineWarning", "atomic_write", "save_checkpoint", "load_checkpoint", "save_scores",
           "load_scores", "save_json", "checkpoint_state_dict", "load_weights"]

FORMAT = "pm_kernels.pipeline/1"


class PipelineError(Exception):
    """A user-facing error: bad input, missing or corrupt file. Printed as one line by the CLI."""


class PipelineWarning(UserWarning):
    """Something the user should know that does not stop the run (printed as one ``warning:`` line by the CLI)."""


def _umask() -> int:
    try:  # Linux: read it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def _remove_stale_temps(path: str) -> None:
    """Remove temp files of ``path`` left by a writer that was killed (SIGKILL, power loss).

    A temp file is named ``.<name>.<pid>.<random>.tmp``; it is stale when no process ``pid`` runs on this
    machine. Temp files of a live writer (this one included) stay.
    """
    folder, prefix = os.path.dirname(path), _temp_prefix(path)
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.[^.]+\.tmp$")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = pattern.match(name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass  # gone already, or not ours to remove: the write goes on


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a name we cannot judge): leave its file
    return True


def _os_error(path: str, err: OSError) -> PipelineError:
    return PipelineError(f"output {path}: cannot write ({err.strerror or err})")


def atomic_write(path: str, write_fn) -> str:
    """Call ``write_fn(tmp_path)`` then rename the temp file onto ``path``; the temp file goes on failure.

    The new file keeps the mode of the file it replaces, else gets the mode a plain ``open`` would give
    (0666 less the umask). Temp files of the same target left by a killed writer are removed first.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise PipelineError(f"output {path}: cannot create folder ({err.strerror or err})") from None
    if os.path.isdir(path):
        raise PipelineError(f"output {path}: is a folder, expected a file name")
    _remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as err:
        raise _os_error(path, err) from None
    try:
        write_fn(tmp)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _os_error(path, err) from None
        raise
    return path


def save_json(obj: Any, path: str) -> str:
    def _write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
    return atomic_write(path, _write)


def save_checkpoint(model: torch.nn.Module, path: str, meta: Dict[str, Any]) -> str:
    """``{"state_dict": ..., "pm_meta": meta}``: loads with ``timm.create_model(..., checkpoint_path=path)``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"state_dict": state, "pm_meta": dict(meta, format=FORMAT)}
    return atomic_write(path, lambda tmp: _torch_save(payload, tmp, path))


def _torch_save(payload, tmp: str, path: str) -> None:
    try:
        torch.save(payload, tmp)
    except RuntimeError as err:  # torch's zip writer reports a full disk or an I/O error as RuntimeError
        raise PipelineError(f"output {path}: cannot write ({str(err).strip().splitlines()[-1][:160]})") from None


def _read(path: str, what: str):
    if not path:
        raise PipelineError(f"{what}: no file given")
    if not os.path.exists(path):
        raise PipelineError(f"{what} {path}: no such file")
    if os.path.isdir(path):
        raise PipelineError(f"{what} {path}: is a folder, expected a file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, not a torch file, pickled code
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"{what} {path}: cannot be read, corrupt or not a PyTorch file ({reason[:160]})") \
            from None


def checkpoint_state_dict(obj, path: str) -> Dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint (ours, timm's train script's, DeiT's ``model`` key, or raw)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj)
            or not all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise PipelineError(f"checkpoint {path}: no state dict of tensors in it")
    for key, t in obj.items():
        # A tensor with more elements than its storage holds (stride 0, overlapping) is how a small file would
        # claim large weights; torch.save never writes a parameter that way.
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise PipelineError(f"checkpoint {path}: tensor {str(key)[:80]!r} of shape {tuple(t.shape)} has more "
                                f"elements than its storage holds ({t.untyped_storage().nbytes()} bytes)")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_checkpoint(path: str) -> Dict[str, Any]:
    """``{"state_dict": ..., "meta": {...}}``; meta is empty for a checkpoint not written by this pipeline."""
    obj = _read(path, "checkpoint")
    meta = obj.get("pm_meta", {}) if isinstance(obj, dict) else {}
    return {"state_dict": checkpoint_state_dict(obj, path), "meta": meta if isinstance(meta, dict) else {}}


def save_scores(scores: torch.Tensor, path: str, meta: Optional[Dict[str, Any]] = None) -> str:
    payload = {"scores": scores.detach().cpu().float(), "pm_meta": dict(meta or {}, format=FORMAT)}
    return atomic_write(path, lambda tmp: _torch_save(payload, tmp, path))


def load_scores(path: str) -> Dict[str, Any]:
    """``{"scores": (L, N-1) float tensor, "meta": {...}}`` from a scores file (or a bare tensor file)."""
    obj = _read(path, "scores")
    meta = {}
    if isinstance(obj, dict):
        meta = obj.get("pm_meta", {}) if isinstance(obj.get("pm_meta"), dict) else {}
        obj = obj.get("scores")
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2 or not obj.is_floating_point():
        raise PipelineError(f"scores {path}: expected a float tensor of shape (L, N-1) from `pm-kernels calibrate`")
    if not bool(torch.isfinite(obj).all()):
        raise PipelineError(f"scores {path}: contains non-finite values")
    return {"scores": obj.float(), "meta": meta}


def load_weights(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], checkpoint: str, arch: str) -> None:
    """``load_state_dict(strict=True)``, a mismatch as one line."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, ValueError, TypeError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise PipelineError(f"checkpoint {checkpoint}: does not fit model {arch!r} ({detail[:200]})") from None
