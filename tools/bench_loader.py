"""Loader benchmark: the stage-1 train_loader against a bare decode + augment loop (see lacvit_dist/bench_loader.py).

    .venv/bin/python tools/bench_loader.py --img-size 224 --workers 2 --batch 64 --batches 60
    .venv/bin/python tools/bench_loader.py --root data/cifar10 --img-size 224 --workers 8 --batches 200
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lacvit_dist.bench_loader import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
