"""Build of the native extension ``pm_kernels._C``; the project's metadata lives in pyproject.toml.

The extension (csrc/) registers the ops ``torch.ops.pm_kernels.*``: C++ kernels for CPU tensors, and CUDA
kernels for CUDA tensors when a CUDA toolkit is found. It is compiled against the torch that runs the build, so
install with build isolation off (an isolated build would install another torch and build against that one):

    pip install --no-build-isolation .           # or -e . ; CUDA_HOME=/usr/local/cuda if the toolkit is elsewhere

The extension is optional: when it cannot be built the package installs as pure Python and the "torch" and
"triton" backends still work. Whatever happens is written to pm_kernels/_build_info.json (read by
pm_kernels/_build_info.py): ``import pm_kernels`` then warns once and ``pm_kernels.backends()`` says why.

Environment:
    PM_KERNELS_REQUIRE_EXT=1 a failed build (CUDA kernels included, when they are built) is an error (CI sets it)
    PM_KERNELS_NO_EXT=1      skip the extension (pure-Python install)
    PM_KERNELS_NO_CUDA=1     build the CPU-only extension even when a CUDA toolkit is found
    CUDA_HOME / CUDA_PATH    the CUDA toolkit (default: /usr/local/cuda when it has bin/nvcc)
    TORCH_CUDA_ARCH_LIST     CUDA archs to compile for (default here: "9.0", Hopper H100/H200)
    MAX_JOBS                 parallel compile jobs (ninja)
"""
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CPP_SOURCES = ["csrc/pm_ops.cpp"]
CUDA_SOURCES = ["csrc/pm_ops_cuda.cu"]
DEFAULT_CUDA_ARCHS = "9.0"
RECORD = os.path.join("pm_kernels", "_build_info.json")  # read by pm_kernels/_build_info.py


def _say(msg):
    # stderr: `python -m build` shows it; pip shows it with -v (and on failure), hence the build record too.
    print(f"[pm_kernels setup] {msg}", file=sys.stderr, flush=True)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


REQUIRE_EXT = _flag("PM_KERNELS_REQUIRE_EXT")


def _failed(reason, torch_version=None):
    """A build problem: an error under PM_KERNELS_REQUIRE_EXT=1; otherwise one line, and a pure-Python install
    whose record says why."""
    if REQUIRE_EXT:
        raise SystemExit(f"[pm_kernels setup] error: {reason} (PM_KERNELS_REQUIRE_EXT=1 makes this an error)")
    _say(f"WARNING: {reason}. Installing without the native extension pm_kernels._C: backend 'cuda' is "
         "unavailable, 'torch' and 'triton' still work (pm_kernels.backends() says why).")
    return {"extension": "failed", "reason": reason, "torch": torch_version}


@contextlib.contextmanager
def _stdout_captured(sink):
    """Run the block with file descriptor 1 (where torch's ninja call sends the compiler's messages) in a
    temporary file, then replay it to stdout and append the text to ``sink``: the messages appear as usual,
    late, and the first error line can go into the build record."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            sink.append(text)


def _error_line(err, output="", limit=300):
    """The line that says what went wrong: the compiler's first `error:` / `fatal` line in ``output``, else the
    exception's first line; shortened for the build record."""
    lines = [line.strip() for line in output.splitlines()]
    pick = next((line for line in lines if re.search(r"error\s*:|\bfatal\b", line, re.IGNORECASE)
                 and not line.startswith(("[", "FAILED:"))), None)
    text = pick or next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _missing_sources(sources):
    """The first source or quoted #include of ``sources`` that does not exist, as a message; None if complete.
    Checked before compiling so an incomplete source tree (an sdist without a header) says which file; quoted
    includes are the project's own (csrc/ includes everything else with <>)."""
    seen, todo = set(), [(s, None) for s in sources]
    while todo:
        path, included_by = todo.pop(0)
        if path in seen:
            continue
        seen.add(path)
        if not os.path.isfile(os.path.join(HERE, path)):
            by = f" (included by {included_by})" if included_by else ""
            return f"{path} is missing{by}: the source tree is incomplete"
        with open(os.path.join(HERE, path), encoding="utf-8", errors="replace") as f:
            for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', f.read(), re.MULTILINE):
                todo.append((os.path.normpath(os.path.join(os.path.dirname(path), name)), path))
    return None


def _find_cuda_home():
    """A CUDA toolkit root with bin/nvcc, or None. Checked before torch.utils.cpp_extension is imported,
    because that module fixes its CUDA_HOME at import time (and can guess wrong from a wrapper nvcc)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _in_place(cmd):
    return bool(getattr(cmd, "inplace", False) or getattr(cmd, "editable_mode", False))


def _write_record(cmd, record, in_place):
    """Write the build record where the installed package will find it: the build directory (what wheels
    and installs copy) and, for in-place and editable builds, the source package."""
    targets = [os.path.join(cmd.build_lib, RECORD)] + ([os.path.join(HERE, RECORD)] if in_place else [])
    for target in targets:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.write("\n")


def _extension_setup():
    """(ext_modules, cmdclass, record): the extension to build, or none and the record that says why not."""
    if _flag("PM_KERNELS_NO_EXT"):
        if REQUIRE_EXT:
            raise SystemExit("[pm_kernels setup] error: PM_KERNELS_NO_EXT=1 and PM_KERNELS_REQUIRE_EXT=1 "
                             "contradict each other")
        _say("PM_KERNELS_NO_EXT=1: skipping the native extension (pure-Python install).")
        return [], {}, {"extension": "skipped", "reason": "PM_KERNELS_NO_EXT=1 at install time"}
    try:
        import torch
    except Exception as err:  # no torch in the build environment: pip's build isolation, or not installed
        return [], {}, _failed(f"torch is not importable at build time ({err}); install torch, then "
                               "pip install --no-build-isolation (build isolation hides your torch)")

    cuda_home, cpu_only_because = None, None
    found_home = _find_cuda_home()
    if found_home is not None:
        os.environ.setdefault("CUDA_HOME", found_home)  # so that torch does not guess a wrong one
    if _flag("PM_KERNELS_NO_CUDA"):
        cpu_only_because = "PM_KERNELS_NO_CUDA=1"
    elif torch.version.cuda is None:
        cpu_only_because = f"torch {torch.__version__} is a CPU-only build"
    elif found_home is None:
        cpu_only_because = "no CUDA toolkit found (set CUDA_HOME)"
    else:
        cuda_home = found_home
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    if cuda_home is None:
        _say(f"{cpu_only_because}: building the CPU-only extension.")
    else:
        _say(f"CUDA toolkit {cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}: building CPU + CUDA.")

    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as err:
        return [], {}, _failed(f"torch.utils.cpp_extension is unusable ({err})", torch.__version__)

    cxx_flags = ["-O3", "-g0"]  # -g0: no debug info (faster build, 10x smaller library)
    if cuda_home is not None:
        ext = CUDAExtension(
            "pm_kernels._C",
            sources=CPP_SOURCES + CUDA_SOURCES,
            define_macros=[("PM_KERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-Xcompiler", "-g0"]},
        )
    else:
        ext = CppExtension("pm_kernels._C", sources=CPP_SOURCES, extra_compile_args={"cxx": cxx_flags})

    class OptionalBuildExtension(BuildExtension):
        """torch's BuildExtension, but a failed build does not fail the install (unless PM_KERNELS_REQUIRE_EXT):
        failed CUDA kernels retry CPU-only, a failed CPU build leaves a pure-Python package; either is recorded."""

        cuda_failure = None

        def _compile(self, ext):
            """torch's build_extension; a failure carries the compiler's first error line as ``.first_error``."""
            output = []
            try:
                with _stdout_captured(output):
                    super().build_extension(ext)
            except Exception as err:
                err.first_error = _error_line(err, "".join(output))
                raise

        def build_extension(self, ext):
            try:
                self._compile(ext)
                return
            except Exception as err:
                if not any(s.endswith(".cu") for s in ext.sources):
                    raise
                reason = f"the CUDA kernels failed to compile ({err.first_error})"
                if REQUIRE_EXT:
                    _say(f"error: {reason} (PM_KERNELS_REQUIRE_EXT=1 makes this an error)")
                    raise
                _say(f"WARNING: {reason}; retrying the CPU-only extension.")
                self.cuda_failure = reason
                ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                ext.define_macros = [m for m in ext.define_macros if m[0] != "PM_KERNELS_WITH_CUDA"]
            self._compile(ext)

        def run(self):
            in_place = _in_place(self)  # before super().run(), which clears self.inplace when it raises
            missing = _missing_sources(ext.sources)
            if missing:
                record = _failed(missing, torch.__version__)
            else:
                try:
                    super().run()
                except Exception as err:
                    first_error = getattr(err, "first_error", None) or _error_line(err)
                    if REQUIRE_EXT:
                        _say(f"error: building pm_kernels._C failed ({first_error}) "
                             "(PM_KERNELS_REQUIRE_EXT=1 makes this an error)")
                        raise
                    record = _failed(f"compiling pm_kernels._C failed ({first_error})", torch.__version__)
                else:
                    with_cuda = any(s.endswith(".cu") for s in ext.sources)
                    record = {"extension": "built", "kernels": "cpu+cuda" if with_cuda else "cpu",
                              "reason": self.cuda_failure or cpu_only_because,
                              "cuda_failed": self.cuda_failure is not None, "torch": torch.__version__}
            _write_record(self, record, in_place)

    return [ext], {"build_ext": OptionalBuildExtension}, None


class BuildPyWithRecord(build_py):
    """build_py that also writes the build record when there is no extension to build (build_ext, which
    runs after it, writes the record otherwise)."""

    def run(self):
        super().run()
        if SETUP_RECORD is not None:
            _write_record(self, SETUP_RECORD, _in_place(self))


ext_modules, cmdclass, SETUP_RECORD = _extension_setup()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithRecord, **cmdclass})
