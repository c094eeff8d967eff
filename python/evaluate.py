"""Top-1, GFLOPs, images/s of dense vs PM checkpoints: ``python python/evaluate.py ARGS`` (= ``pm-kernels evaluate``)."""
import sys

from pm_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate"] + sys.argv[1:]))
