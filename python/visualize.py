"""Per-layer structure PNG of a PM checkpoint: ``python python/visualize.py ARGS`` (= ``pm-kernels visualize``)."""
import sys

from pm_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["visualize"] + sys.argv[1:]))
