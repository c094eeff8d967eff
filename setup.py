"""Build of pm_kernels: the Python package, plus the optional native extension ``pm_kernels._C``.

The extension (csrc/) registers the ops ``torch.ops.pm_kernels.*``: C++ kernels for CPU tensors, and CUDA
kernels for CUDA tensors when a CUDA toolkit is found. It needs torch at build time, so install with

    pip install --no-build-isolation -e .        # CUDA_HOME=/usr/local/cuda if the toolkit lives elsewhere

The extension is optional: without torch, without a compiler, or when compiling fails, the package installs as
pure Python (a message says why) and the "torch"/"triton" backends still work.

Environment:
    PM_KERNELS_NO_EXT=1      skip the extension (pure-Python install)
    PM_KERNELS_NO_CUDA=1     build the CPU-only extension even when a CUDA toolkit is found
    CUDA_HOME / CUDA_PATH    the CUDA toolkit (default: /usr/local/cuda when it has bin/nvcc)
    TORCH_CUDA_ARCH_LIST     CUDA archs to compile for (default here: "9.0", Hopper H100/H200)
    MAX_JOBS                 parallel compile jobs (ninja)
"""
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CPP_SOURCES = ["csrc/pm_ops.cpp"]
CUDA_SOURCES = ["csrc/pm_ops_cuda.cu"]
DEFAULT_CUDA_ARCHS = "9.0"


def _say(msg):
    # stderr: pip shows it with -v, and always when something goes wrong.
    print(f"[pm_kernels setup] {msg}", file=sys.stderr, flush=True)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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


def _extension_setup():
    """(ext_modules, cmdclass) for the native extension, or ([], {}) with a message saying why not."""
    if _flag("PM_KERNELS_NO_EXT"):
        _say("PM_KERNELS_NO_EXT=1: skipping the native extension (pure-Python install).")
        return [], {}
    try:
        import torch
    except Exception as err:  # no torch in the build environment (e.g. pip's build isolation)
        _say(f"torch is not importable at build time ({err}): installing without the native extension "
             "pm_kernels._C. To build it: pip install torch, then pip install --no-build-isolation -e .")
        return [], {}

    cuda_home = None
    found_home = _find_cuda_home()
    if found_home is not None:
        os.environ.setdefault("CUDA_HOME", found_home)  # so that torch does not guess a wrong one
    if _flag("PM_KERNELS_NO_CUDA"):
        _say("PM_KERNELS_NO_CUDA=1: building the CPU-only extension.")
    elif torch.version.cuda is None:
        _say(f"torch {torch.__version__} is a CPU-only build: building the CPU-only extension.")
    else:
        cuda_home = found_home
        if cuda_home is None:
            _say("no CUDA toolkit found (set CUDA_HOME): building the CPU-only extension.")
        else:
            os.environ["CUDA_HOME"] = cuda_home
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
            _say(f"CUDA toolkit {cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}: building CPU + CUDA.")

    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as err:
        _say(f"torch.utils.cpp_extension is unusable ({err}): installing without the native extension.")
        return [], {}

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
        """torch's BuildExtension, but a failed build never fails the install: a failed CUDA build retries
        CPU-only, and a failed CPU build leaves a pure-Python package, each with a message."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
                return
            except Exception as err:
                cu = [s for s in ext.sources if s.endswith(".cu")]
                if not cu:
                    raise
                _say(f"building the CUDA kernels failed ({err}); retrying the CPU-only extension.")
                ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                ext.define_macros = [m for m in ext.define_macros if m[0] != "PM_KERNELS_WITH_CUDA"]
            super().build_extension(ext)

        def run(self):
            try:
                super().run()
            except Exception as err:
                _say(f"building the native extension pm_kernels._C failed ({err}). Installing without it: "
                     "backend='cuda' is unavailable; 'torch' (and 'triton') still work. "
                     "Set PM_KERNELS_NO_EXT=1 to skip the build.")

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extension_setup()

setup(
    name="pm_kernels",
    version="0.1.0",
    description="Prune-and-Merge ViT token compression: fused token ops and attention kernels for PyTorch",
    packages=find_packages(include=["pm_kernels", "pm_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "timm>=1.0"],
    extras_require={
        "test": ["pytest>=7"],
        "dev": ["pytest>=7", "ninja"],
    },
    entry_points={"console_scripts": ["pm-kernels = pm_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
