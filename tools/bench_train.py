"""Synthetic-data benchmark of the full stage-1 training step (see lacvit_dist/bench.py).

    .venv/bin/python tools/bench_train.py --preset vit_l16 --batch 64 --steps 20        # one GPU or CPU
    torchrun --nproc_per_node 8 tools/bench_train.py --preset vit_h14 --batch 64        # 8 GPUs
    .venv/bin/python tools/bench_train.py --config configs/demo_digits.yaml --batch 64 run.device=cpu
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lacvit_dist.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
