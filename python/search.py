"""Structure search: ``python python/search.py calibrate ARGS`` then ``python python/search.py compress ARGS``
(= ``pm-kernels calibrate`` / ``pm-kernels compress``); with no sub-command, ``compress``."""
import os
import sys

try:
    from pm_kernels.cli import main
except ImportError:  # not installed: run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pm_kernels.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    command = argv.pop(0) if argv and argv[0] in ("calibrate", "compress") else "compress"
    sys.exit(main([command] + argv))
