"""Top-1, GFLOPs, images/s of dense vs PM checkpoints: ``python python/evaluate.py ARGS`` (= ``pm-kernels evaluate``)."""
import os
import sys

try:
    from pm_kernels.cli import main
except ImportError:  # not installed: run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pm_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate"] + sys.argv[1:]))
