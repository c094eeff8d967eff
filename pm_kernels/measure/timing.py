"""Timing, one way for every figure: the models compared are timed in interleaved rounds, by the wall clock and
by the CPU time of this process, and reported as the median over rounds with the spread (min, max).

- **Interleaved.** Each round times every case once, in the opposite order every other round, so that a change
  of load on a shared machine (another job starting, a frequency step) hits every case alike instead of the one
  that happened to run then. Speed-ups are only ever taken between cases of one call (same mode, same batch,
  same threads, same machine state).
- **Wall and CPU time.** A round runs a case for at least ``min_time`` seconds (or exactly ``calls`` calls).
  Items per CPU-second of the process is the figure other processes' load disturbs least: with one thread
  it is what the wall clock reads on an idle core (CPU only; on a GPU the wall clock is the figure).
- **The environment** of a measurement (``environment`` at the start, ``finish_environment`` at the end): device,
  CPU, versions, threads, load average before and after, date, command; ``under_load`` says when other work
  shared the cores.
"""
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

__all__ = ["Rates", "forward", "time_interleaved", "environment", "finish_environment", "cpu_name", "versions",
           "free_cores", "UNDER_LOAD"]

# 1-minute load average above which the cores were not ours alone (at the end, beyond the threads we ran)
UNDER_LOAD = 0.5


@dataclass
class Rates:
    """Items per second of one case, one value per round: ``wall`` by the wall clock, ``cpu`` per CPU-second of
    this process."""
    wall: List[float]
    cpu: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def spread(self) -> Tuple[float, float]:
        return min(self.wall), max(self.wall)

    def to_dict(self) -> Dict[str, object]:
        """The JSON fields every results file uses for a timed row."""
        return {"images_per_s": self.median, "images_per_s_min": self.spread[0], "images_per_s_max": self.spread[1],
                "images_per_s_runs": list(self.wall), "images_per_cpu_s": self.cpu_median,
                "images_per_cpu_s_runs": list(self.cpu)}

    def __str__(self) -> str:
        lo, hi = self.spread
        return f"{self.median:.4g} ({lo:.4g}-{hi:.4g})"


def forward(model: Callable, inputs: torch.Tensor) -> Callable[[], object]:
    """A case for ``time_interleaved``: one no-grad call ``model(inputs)``."""
    def run():
        with torch.no_grad():
            return model(inputs)
    return run


def _sync_for(device) -> Callable[[], None]:
    if device is not None and torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(cases: Mapping[str, Callable[[], object]], items: Union[int, Mapping[str, int]] = 1, *,
                     rounds: int = 5, min_time: float = 0.2, calls: Optional[int] = None, warmup: int = 1,
                     device=None, log: Optional[Callable[[str], None]] = None) -> Dict[str, Rates]:
    """``{name: Rates}``: every case timed once per round for ``rounds`` rounds, the order reversed on odd rounds.

    ``cases``: name → a function doing one call (``forward(model, x)``); ``items``: what one call processes
    (the batch size), per case or for all. A round of a case lasts at least ``min_time`` seconds, or exactly
    ``calls`` calls when given. ``warmup`` calls of each case come first (compilation, caches, allocator).
    ``device``: a CUDA device is synchronised after every call. ``log``: called with a line per round.
    """
    if not cases:
        raise ValueError("cases: expected at least one case to time")
    for name, value in (("rounds", rounds), ("warmup", warmup)) + ((("calls", calls),) if calls is not None else ()):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "warmup" else 1):
            raise ValueError(f"{name}: expected an int >= {0 if name == 'warmup' else 1}, got {value!r}")
    if calls is None and not (isinstance(min_time, (int, float)) and min_time >= 0):
        raise ValueError(f"min_time: expected seconds >= 0, got {min_time!r}")
    per_call = {name: int(items[name] if isinstance(items, Mapping) else items) for name in cases}
    sync = _sync_for(device)
    for run in cases.values():
        for _ in range(warmup):
            run()
    sync()
    wall: Dict[str, List[float]] = {name: [] for name in cases}
    cpu: Dict[str, List[float]] = {name: [] for name in cases}
    names = list(cases)
    for rnd in range(rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            run, n = cases[name], 0
            w0, c0 = time.perf_counter(), time.process_time()
            while True:
                run()
                n += 1
                if calls is None:
                    sync()
                    if time.perf_counter() - w0 >= min_time:
                        break
                elif n == calls:
                    sync()
                    break
            w, c = time.perf_counter() - w0, time.process_time() - c0
            wall[name].append(n * per_call[name] / max(w, 1e-9))
            cpu[name].append(n * per_call[name] / max(c, 1e-9))
        if log is not None:
            log(f"round {rnd + 1}/{rounds}: " + ", ".join(f"{k} {wall[k][-1]:.4g}" for k in names) + " items/s")
    return {name: Rates(wall[name], cpu[name]) for name in cases}


# ------------------------------------------------------------------------------------------------ environment

def free_cores() -> int:
    """CPU threads worth using: the cores this process may use, less the current load, at least 1.

    On a shared, busy CPU, extra OpenMP threads spin against other processes and slow matmuls down several
    times over; one thread per free core avoids that.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> Dict[str, Optional[str]]:
    """Versions of what a figure depends on (read from the installed metadata: nothing is imported)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "timm", "triton", "numpy", "onnxruntime", "pm_kernels"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["cuda"] = torch.version.cuda
    return out


def _load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device=None, command: Optional[str] = None, **extra) -> Dict[str, object]:
    """What a measurement ran on, taken at its start: device, CPU, versions, backends, torch threads, load
    average, date (UTC) and the command (default: this process's arguments). ``extra`` is added as is."""
    from ..dispatch import backends

    dev = torch.device(device or "cpu")
    return {"device": dev.type,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
            "cpu_name": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "versions": versions(), "backends": backends(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command if command is not None else " ".join([os.path.basename(sys.executable)] + sys.argv),
            "load_average_start": _load_average(), **extra}


def finish_environment(env: Dict[str, object]) -> Dict[str, object]:
    """``env`` with the load average at the end and ``under_load``: the 1-minute load average was above
    ``UNDER_LOAD`` at the start, or above the torch threads + ``UNDER_LOAD`` at the end (the run adds its own)."""
    end = _load_average()
    start = env.get("load_average_start")
    env["load_average_end"] = end
    if start and end:
        env["under_load"] = bool(start[0] > UNDER_LOAD or end[0] > int(env.get("threads") or 1) + UNDER_LOAD)
        env["under_load_rule"] = (f"1-minute load average > {UNDER_LOAD} at the start, or > threads + {UNDER_LOAD} "
                                  "at the end: other work shared the cores, wall-clock figures are noisy")
    return env
