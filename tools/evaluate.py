"""Evaluate an exported classifier or stage-1 backbone on any split (see lacvit_dist/offline_eval.py)."""
from lacvit_dist.offline_eval import main

if __name__ == "__main__":
    raise SystemExit(main())
