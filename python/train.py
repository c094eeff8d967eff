"""Train a dense model or fine-tune a compressed one: ``python python/train.py [dense|finetune] ARGS``.

``dense`` (the default when the first argument is an option) is ``pm-kernels train``; ``finetune`` is
``pm-kernels finetune`` (distillation from ``--teacher``).
"""
import os
import sys

try:
    from pm_kernels.cli import main
except ImportError:  # not installed: run from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pm_kernels.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    command = "train"
    if argv and argv[0] in ("dense", "finetune"):
        command = "train" if argv.pop(0) == "dense" else "finetune"
    sys.exit(main([command] + argv))
