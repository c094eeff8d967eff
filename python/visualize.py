"""Per-layer structure PNG of a PM checkpoint: ``python python/visualize.py ARGS`` (= ``pm-kernels visualize``)."""
import os
import sys

try:
    from pm_kernels.cli import main
except ImportError:  # not installed: run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pm_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["visualize"] + sys.argv[1:]))
