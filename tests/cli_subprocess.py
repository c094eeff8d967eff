"""Running the real ``pm-kernels`` entry point (the console script, else ``python -m pm_kernels``) in a subprocess,
on this tree (PYTHONPATH), one torch thread. Every call has a timeout: a hang fails the test instead of CI."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]


def cli_command() -> List[str]:
    script = Path(sys.executable).with_name("pm-kernels")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pm_kernels"]


def cli_env(**extra: str) -> Dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def run_cli(args: List[str], timeout: float = 180, umask: Optional[int] = None) -> subprocess.CompletedProcess:
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(cli_command() + args, env=cli_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT), preexec_fn=preexec)


def error_lines(stderr: str) -> List[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


class Streamed:
    """A process whose stderr (and stdout) is read as it comes, to wait for a line like a progress bar."""

    def __init__(self, argv: List[str], umask: Optional[int] = None):
        preexec = (lambda: os.umask(umask)) if umask is not None else None
        self.proc = subprocess.Popen(argv, env=cli_env(), cwd=str(ROOT), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec)
        self._chunks: List[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return
            with self._lock:
                self._chunks.append(chunk.decode("utf-8", "replace"))

    @property
    def output(self) -> str:
        with self._lock:
            return "".join(self._chunks)

    def wait_for(self, text: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.output:
                return True
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the pump read the rest
                return text in self.output
            time.sleep(0.2)
        return False


def children(pid: int) -> List[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def environ(pid: int) -> Dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = f.read().decode("utf-8", "replace").split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_all(pids: List[int]) -> None:
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
