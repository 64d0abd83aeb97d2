"""Evaluate an exported classifier or stage-1 backbone on any split (`lacvit-evaluate`; see lacvit_dist/evaluation/offline.py)."""
from lacvit_dist.evaluation.offline import main

if __name__ == "__main__":
    raise SystemExit(main())
