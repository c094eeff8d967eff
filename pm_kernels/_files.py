"""File helpers the library's writers (``deploy.export``) and the pipeline's (``pipeline.io``) share: the umask,
whether a writer's process still runs, and the removal of the temp files or folders of writers that were killed.
"""
import os
import re
import shutil
import stat
import tempfile
from typing import Callable, Pattern

__all__ = ["umask", "process_alive", "remove_stale", "stale_pattern", "new_file_mode", "write_into"]


def umask() -> int:
    try:  # Linux: read it without changing it (changing it would race other threads creating files)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(target: str) -> int:
    """The mode a file written to ``target`` gets: the replaced regular file's, else 0666 less the umask."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return 0o666 & ~umask()
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else 0o666 & ~umask()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a number we cannot judge): leave its files
    return True


def remove_stale(folder: str, pattern: Pattern[str]) -> None:
    """Remove the entries of ``folder`` that ``pattern`` matches whose group 1 (a pid) is no running process:
    what a writer killed by SIGKILL or a power loss left. Entries of a live writer (this one included) stay."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = pattern.match(name)
        if match is None or process_alive(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError:
            pass  # gone already, or not ours to remove: the write goes on


def stale_pattern(prefix: str, suffix: str = "") -> Pattern[str]:
    """``<prefix><pid>.<random><suffix>``: the names this library gives its temp files and folders."""
    return re.compile(re.escape(prefix) + r"(\d+)\.[^.]+" + re.escape(suffix) + r"\Z")


_TEMP_PREFIX = ".pm_export."


def write_into(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_file)`` in a temp folder beside ``path``, then move its file(s) into place (nothing half-way,
    and nothing at all when ``write`` raises: the caller can check the file there before it replaces anything);
    a replaced file keeps its mode. The folder is named ``.pm_export.<pid>.<random>``: one left by a writer that
    was killed (SIGKILL) is removed by the next write into that folder.

    The ONNX exporter names an external-data side file after the file it writes: writing under the final
    basename keeps that reference valid after the move.
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    remove_stale(folder, stale_pattern(_TEMP_PREFIX))
    tmp = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}.", dir=folder)
    try:
        write(os.path.join(tmp, os.path.basename(path)))
        for name in os.listdir(tmp):
            target = os.path.join(folder, name)
            if os.path.isdir(os.path.join(tmp, name)):
                continue  # a nested write's own temp folder, already emptied
            os.chmod(os.path.join(tmp, name), new_file_mode(target))
            os.replace(os.path.join(tmp, name), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
