"""Claiming an output before the work that fills it.

``claim_output`` checks the path first (absent or a regular file: not a folder, a symbolic link, a device or
a FIFO; its folder writable; neither it nor a companion file, such as the results JSON, landing on an input or
on each other) and holds a lock file while the command runs, so that a second run writing the same output at the
same time is refused instead of racing it (last writer wins). The lock is ``flock``-based: the system releases
it when the process dies, even by SIGKILL, and the file itself is removed on a normal exit.
``claim_command_output`` is what ``pm_kernels.cli`` takes for each command, right after parsing its flags.
"""
import contextlib
import os
from typing import Iterable, Iterator, Optional

from .io import PipelineError, check_output_file

__all__ = ["claim_output", "claim_command_output", "companion_json", "DIR_LOCK_NAME"]

DIR_LOCK_NAME = ".pm-kernels.lock"


def companion_json(out: str) -> str:
    """The results JSON written next to an output file: its name with the extension replaced by ``.json``."""
    return os.path.splitext(out)[0] + ".json"


def _same_file(a: str, b: str) -> bool:
    try:  # both exist: the same inode (hard links, bind mounts, symbolic links, case-insensitive names)
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _check_paths(path: str, is_dir: bool, companions: Iterable[str], inputs: Iterable[Optional[str]]) -> None:
    companions = list(companions)
    if is_dir and os.path.exists(path) and not os.path.isdir(path):
        raise PipelineError(f"output folder {path}: is a file, expected a folder")
    for target in ([] if is_dir else [path]) + companions:
        check_output_file(target)
    inputs = [p for p in inputs if p]
    for source in inputs if not is_dir else ():
        if _same_file(path, source):
            raise PipelineError(f"output {path}: is the input {source}; it would be overwritten (give another "
                                "--out)")
    for extra in companions:
        if _same_file(extra, path):
            raise PipelineError(f"output {path}: its results JSON would overwrite it; give the output another "
                                f"extension (.pth, .pt, .png)")
        for source in inputs:
            if _same_file(extra, source):
                raise PipelineError(f"output {path}: its results JSON {extra} would overwrite the input {source}")
    folder = path if is_dir else os.path.dirname(path)
    probe = folder
    while not os.path.exists(probe):  # the nearest existing ancestor must be a folder
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise PipelineError(f"output {path}: {probe} is a file, not a folder")


def _lock_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


@contextlib.contextmanager
def _locked(lock_path: str, what: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the checks above still apply, the lock does not
        yield
        return
    while True:
        try:  # not through a symbolic link planted at the lock's name: ftruncate would empty its target
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as err:
            raise PipelineError(f"{what}: cannot write ({err.strerror or err}; lock file {lock_path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _lock_owner(fd)
            os.close(fd)
            raise PipelineError(f"{what}: in use by another pm-kernels run{owner}; wait for it to finish or "
                                "choose another output") from None
        try:  # a holder that was releasing may have removed the file between our open and flock: retry
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            os.unlink(lock_path)  # while still holding the lock, so nobody can take a lock on a removed file
        except OSError:
            pass
        os.close(fd)


@contextlib.contextmanager
def claim_output(path: str, is_dir: bool = False, companions: Iterable[str] = (),
                 inputs: Iterable[Optional[str]] = (), lock: bool = True) -> Iterator[str]:
    """Check the output ``path`` (a file, or a folder with ``is_dir``) and hold its lock; yields the absolute path.

    ``companions``: other files written next to it (the results JSON); ``inputs``: files the command reads,
    which no companion may overwrite. ``lock=False`` only checks (DDP ranks other than 0 write nothing).
    """
    path = os.path.abspath(path)
    _check_paths(path, is_dir, companions, inputs)
    if not lock:
        yield path
        return
    folder = path if is_dir else os.path.dirname(path)
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise PipelineError(f"output {path}: cannot create folder ({err.strerror or err})") from None
    lock_path = os.path.join(folder, DIR_LOCK_NAME if is_dir else "." + os.path.basename(path) + ".lock")
    try:
        with _locked(lock_path, f"output {path}"):
            yield path
    except BaseException:
        if created:  # a failed run leaves no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def claim_command_output(args, demo_folder: str, lock: bool = True):
    """``claim_output`` for the output of ``args.command`` (its ``--out`` / ``--out-dir`` / demo folder), its
    companion files and the files it reads; ``lock=False`` only checks (DDP ranks other than 0)."""
    command = args.command
    if command == "evaluate":
        files = [os.path.join(args.out_dir, name) for name in ("results.json", "accuracy_vs_keep.png")]
        return claim_output(args.out_dir, is_dir=True, companions=files, inputs=[args.dense, *args.checkpoint],
                            lock=lock)
    if command == "demo":
        return claim_output(args.out or demo_folder, is_dir=True, lock=lock)
    if command == "export":
        companions = [args.out + ".json", args.out + ".data"]
    else:
        companions = [companion_json(args.out)]
        if command == "visualize":  # a task's extra picture (segmentation: the prediction)
            companions.append(os.path.splitext(args.out)[0] + "_prediction.png")
    inputs = [getattr(args, name, None) for name in ("checkpoint", "teacher", "scores")]
    return claim_output(args.out, companions=companions, inputs=inputs, lock=lock)
