"""The one place the version lives: pyproject.toml reads it (``[tool.setuptools.dynamic]``), ``pm_kernels``
re-exports it. Plain assignment, no imports, so setuptools reads it without importing the package."""
__version__ = "0.1.0"
