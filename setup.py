"""Build of pm_kernels (the native extension is added by the csrc/ build, see README)."""
from setuptools import find_packages, setup

setup(
    name="pm_kernels",
    version="0.1.0",
    packages=find_packages(include=["pm_kernels", "pm_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "timm>=1.0"],
)
