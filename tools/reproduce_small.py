"""The paper's transfer claim at a small scale on real data (see lacvit_dist/reproduce.py).

    .venv/bin/python tools/reproduce_small.py                                   # digits 0-4 -> 5-9, 1 CPU rank
    .venv/bin/deepspeed --num_gpus 2 tools/reproduce_small.py --seeds 0 1 2     # 2 ranks
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lacvit_dist.reproduce import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
