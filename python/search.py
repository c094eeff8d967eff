"""Structure search: ``python python/search.py calibrate ARGS`` then ``python python/search.py compress ARGS``
(= ``pm-kernels calibrate`` / ``pm-kernels compress``); with no sub-command, ``compress``."""
import sys

from pm_kernels.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    command = argv.pop(0) if argv and argv[0] in ("calibrate", "compress") else "compress"
    sys.exit(main([command] + argv))
