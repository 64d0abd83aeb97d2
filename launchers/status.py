"""Following a submitted run: job states from SLURM (sacct, scontrol, squeue), each stage's progress from the run
folder, the `--status` table, and waiting for jobs to end."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Sequence

from launchers.slurm_job import REQUEUES_FILE
from lacvit_dist.io import read_json
from lacvit_dist.train.checkpoint import find_latest, step_of_tag

JOBS_FILE = "jobs.json"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


def job_states(job_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """State, exit code, elapsed time and restart count per job: sacct (accounting) when it answers, else
    `scontrol show job` (slurmctld remembers finished jobs for MinJobAge seconds), else squeue."""
    states: dict[str, dict[str, str]] = {j: {"state": "UNKNOWN"} for j in job_ids}
    if not job_ids:
        return states
    try:
        proc = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobIDRaw,State,ExitCode,Elapsed",
                               "-j", ",".join(job_ids)], capture_output=True, text=True, timeout=30)
        if proc.returncode == 0:
            for line in proc.stdout.splitlines():
                parts = line.split("|")
                if len(parts) >= 4 and parts[0] in states:
                    states[parts[0]].update(state=parts[1].split()[0], exit_code=parts[2], elapsed=parts[3],
                                            source="sacct")
    except (OSError, subprocess.TimeoutExpired):
        pass
    for job_id in job_ids:
        try:
            proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode != 0 or "JobState=" not in proc.stdout:
            continue
        fields = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
        # slurmctld is authoritative while it knows the job (sacct lags behind by a few seconds)
        states[job_id].update(state=fields.get("JobState", "UNKNOWN"), exit_code=fields.get("ExitCode", ""),
                              elapsed=fields.get("RunTime", ""), restarts=fields.get("Restarts", "0"),
                              reason=fields.get("Reason", ""), source="scontrol")
    return states


def stage_progress(stage_dir: Path) -> str:
    results = read_json(stage_dir / "results.json", None)
    if results:
        test = results.get("test") or {}
        extra = f", test top1 {test['top1']:.4f} on {test.get('samples')} samples" if "top1" in test else ""
        return f"finished at step {results.get('steps')}{extra}"
    tag = find_latest(stage_dir / "checkpoints")  # the one the stage resumes from
    if tag:
        return f"checkpoint {tag} (step {step_of_tag(tag)})"
    return "started, no checkpoint yet" if stage_dir.is_dir() else "not started"


def status_text(run_dir: Path) -> str:
    run_dir = run_dir.resolve()
    data = read_json(run_dir / JOBS_FILE, None)
    if data is None:
        raise ValueError(f"{run_dir / JOBS_FILE} not found: not a run submitted by launchers/submit.py")
    jobs = data.get("jobs", [])
    cluster = data.get("cluster", "slurm")
    states = job_states([j["job_id"] for j in jobs]) if cluster == "slurm" else \
        {j["job_id"]: {"state": j.get("state", "UNKNOWN")} for j in jobs}  # recorded when the launcher's wait ended
    requeues = read_json(run_dir / "slurm" / REQUEUES_FILE, {})
    rows = [f"run {run_dir} ({cluster}; config {data.get('config')})",
            f"{'stage':<9} {'job':<10} {'state':<12} {'exit':<6} {'elapsed':<10} {'requeues':<8} progress"]
    for job in jobs:
        st = states.get(job["job_id"], {"state": "UNKNOWN"})
        state = st["state"] + (f" ({st['reason']})" if st.get("reason") not in (None, "", "None") else "")
        rows.append(f"{job['stage']:<9} {job['job_id']:<10} {state:<12} {st.get('exit_code', ''):<6} "
                    f"{st.get('elapsed', ''):<10} {requeues.get(job['stage'], 0):<8} "
                    f"{stage_progress(run_dir / job['stage'])}")
    rows.append("logs:")
    rows += [f"  {j['stage']}: {j['log_dir']}" for j in jobs]
    tb_dirs = sorted({str(run_dir / j["stage"] / "tb") for j in jobs if (run_dir / j["stage"] / "tb").is_dir()})
    rows.append("tensorboard: " + (f"tensorboard --logdir {run_dir}   ({', '.join(tb_dirs)})" if tb_dirs
                                   else "(no event files yet)"))
    return "\n".join(rows)


def active_jobs(run_dir: Path, stages: Sequence[str]) -> list[str]:
    """The jobs recorded in `run_dir` for `stages` that SLURM still holds (pending, running, requeued...), as
    'stage job ID (STATE)'; a job SLURM no longer knows counts as ended."""
    data = read_json(run_dir / JOBS_FILE, None)
    if not data or data.get("cluster", "slurm") != "slurm":
        return []
    recorded = [job for job in data.get("jobs", []) if job["stage"] in stages]
    states = job_states([job["job_id"] for job in recorded])
    return [f"{job['stage']} job {job['job_id']} ({states[job['job_id']]['state']})" for job in recorded
            if states[job["job_id"]]["state"] not in TERMINAL_STATES | {"UNKNOWN"}]


def wait_for(job_ids: Sequence[str], timeout_s: float | None = None, poll_s: float = 2.0) -> dict[str, dict[str, str]]:
    """Poll until every job is in a terminal state (or timeout: TimeoutError); returns the final states."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        states = job_states(job_ids)
        if all(s["state"] in TERMINAL_STATES for s in states.values()):
            return states
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"jobs not finished after {timeout_s:.0f} s: {states}")
        time.sleep(poll_s)
