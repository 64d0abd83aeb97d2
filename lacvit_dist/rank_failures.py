"""A rank's own failure, recorded in the run folder for whoever decides whether a SLURM job is requeued.

When one rank fails in its own program (a bug, a bad input it alone reads), its peers see the connection to it
break and leave with LOST_PEER_EXIT_CODE (76), exactly as if its node had died, and srun reports the highest exit
code of the tasks: 76. Retrying a bug only repeats it, so the failing rank writes
`<run>/slurm/<job id>/failed_<restart>_rank<k>.json` before it exits, and the requeue decisions read these
first: the lost-peer leader of a submitit job (launchers/slurm_job.py) and the plain sbatch script after srun
(launchers/plan.py). A rank killed outright (a node lost, the OOM killer) records nothing and is retried.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from lacvit_dist.io import read_json, write_json


def restart_count() -> int:
    """How many times SLURM has requeued this job (0 for its first run, and outside SLURM)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def job_folder(run_dir: str | os.PathLike) -> Path | None:
    """<run>/slurm/<job id>: the SLURM job's folder in the run (submitit's log folder), None outside SLURM."""
    job_id = os.environ.get("SLURM_JOB_ID")
    return Path(run_dir) / "slurm" / job_id if job_id else None


def record_failure(run_dir: str | os.PathLike, rank: int, error: str) -> None:
    """This rank's program failed (not a lost peer). The first record of a rank wins: the trainer records the
    error itself, the launcher's wrapper around it only what escaped the trainer. Outside SLURM, nothing."""
    folder = job_folder(run_dir)
    if folder is None:
        return
    path = folder / f"failed_{restart_count()}_rank{rank}.json"
    with contextlib.suppress(Exception):  # never hide the error being reported
        if not path.exists():
            write_json(path, {"rank": rank, "error": error})


def recorded_failures(folder: Path) -> list[str]:
    """'rank k failed: <error>' for every rank of this run of the job (this restart) that recorded its own
    failure in the job's folder."""
    paths = sorted(folder.glob(f"failed_{restart_count()}_rank*.json"))
    return [f"rank {entry['rank']} failed: {entry['error']}" for entry in (read_json(p, {}) for p in paths) if entry]
