"""``python -m pm_kernels ...``: the ``pm-kernels`` command line."""
import sys

from .cli import main

sys.exit(main())
