"""Submit a lacvit_dist run to SLURM through submitit: one job per stage, one run folder, requeue on preemption.

    python launchers/submit.py --config configs/my_run.yaml --nodes 2 --gpus-per-node 8 --partition gpu
    python launchers/submit.py --config configs/my_run.yaml --nodes 1 --gpus-per-node 8 --dry-run
    python launchers/submit.py --status runs/<run name>

`python launchers/submit.py --help` lists every option; the logic lives in launchers/slurm_jobs.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `launchers` and `lacvit_dist` from the checkout

from launchers.slurm_jobs import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
