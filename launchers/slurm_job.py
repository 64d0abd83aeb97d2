"""The callable submitit runs in every task of a stage's job, and the requeue protocol around it.

Inside a job every task calls `lacvit_dist.cli.main(["--config", ..., "--stages", <stage>, overrides...])`, the same
entry as `train.py`, after exporting its rank, world size and master (from SLURM's variables through
`lacvit_dist.distributed.detect_world`; on a single node the master is 127.0.0.1, so nothing depends on the
host name resolving).

Requeue: SLURM sends SIGUSR1 `--signal-delay-s` seconds before the time limit (`--signal=USR1@120`; submitit is
told to use USR1 too, so the signal never kills a process before the trainer has installed its handler). The
trainer sets a flag, all ranks agree at a step boundary, save one checkpoint and leave with `REQUEUE_EXIT_CODE`
(75). Rank 0 then writes the resubmission (the same task: the run folder is the only state, nothing about the
checkpoint is frozen in the pickle) where submitit's job reads its task, and runs `scontrol requeue`; the other
ranks wait for it (`<run>/slurm/<job id>/requeue_<restart>.json`) so that no early exit ends the step before the
requeue. The restarted job resumes the unfinished stage from its latest checkpoint. Successful requeues are
counted per stage in `<run>/slurm/requeues.json`, against `--max-requeues`; a failing `scontrol requeue` (SLURM
already requeueing a preempted job) is logged, not counted. A job signalled before training started is requeued
by submitit's own handler, which calls `checkpoint()` (counted there).

A lost peer: when a rank's process dies, hangs or is cut off (its node failed), the others fail in a collective
at once (a reset connection) or after `run.collective_timeout_s` and leave the trainer with `LOST_PEER_EXIT_CODE`
(76). The first of them to claim it requeues the job the same way (counted against --max-requeues), unless a rank
recorded a failure of its own program (`failed_<restart>_rank<k>.json`, lacvit_dist.rank_failures; a bug is not
retried). The restart resumes from the latest checkpoint. When every task was killed before one could (NCCL's
watchdog ends the waiting ranks itself at the timeout), the job's batch shell requeues it after srun
(`after_step`, submitit's teardown). A node that SLURM sees fail (NODE_FAIL) is requeued by SLURM itself
(`--requeue`).
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from lacvit_dist.distributed import LOST_PEER_EXIT_CODE
from lacvit_dist.io import read_json, write_json
from lacvit_dist.rank_failures import record_failure, recorded_failures, restart_count
from lacvit_dist.train.preemption import REQUEUE_EXIT_CODE

REQUEUES_FILE = "requeues.json"
PREEMPT_SIGNAL = "USR1"
LEADER_REQUEUE_WAIT_S = 90.0  # the requeueing rank's `scontrol requeue` has 60 s
FAILURE_REPORT_GRACE_S = 3.0  # how long the requeueing rank gives a failing peer to record its own error
MARKER_GRACE_S = 3.0  # how long the batch shell gives a requeueing rank to write its decision


@dataclass(frozen=True)
class StageSpec:
    """Everything one stage's job needs; plain data, so the pickle stays valid across code edits."""
    stage: str
    config: str                  # absolute path
    overrides: tuple[str, ...]   # includes run.output_dir=<abs> and run.name=<name>
    run_dir: str                 # absolute
    cwd: str                     # the submission's working directory (relative paths in the config)
    max_requeues: int
    timeout_min: int


class SlurmStageJob:
    """The callable submitit runs in every task of a stage's job (`__call__`), and its requeue hook
    (`checkpoint`). Picklable: it holds a StageSpec and nothing else."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec

    # ------------------------------------------------------------------------------------------ running
    def __call__(self) -> dict[str, Any]:
        spec = self.spec
        os.chdir(spec.cwd)
        world = _export_world()
        from lacvit_dist.cli import main  # after the environment is set (thread count, rank variables)

        argv = ["--config", spec.config, *spec.overrides, "--stages", spec.stage]  # --stages last: it takes 1+
        print(f"[lacvit launcher] {spec.stage}: rank {world['RANK']}/{world['WORLD_SIZE']} master "
              f"{world['MASTER_ADDR']}:{world['MASTER_PORT']}; train.py {shlex.join(argv)}", flush=True)
        rank = int(world["RANK"])
        try:
            code = main(argv)
        except SystemExit as exit_:  # the trainer may leave with sys.exit(75)
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException as err:
            record_failure(spec.run_dir, rank, f"{type(err).__name__}: {err}")  # so that no peer requeues
            raise
        if code == 0:
            results = read_json(Path(spec.run_dir) / spec.stage / "results.json", {})
            return {"stage": spec.stage, "steps": results.get("steps"), "test": results.get("test", {}).get("top1")}
        if code in (REQUEUE_EXIT_CODE, LOST_PEER_EXIT_CODE):
            self._requeue(rank, code)
        record_failure(spec.run_dir, rank, f"train.py exited with code {code}")
        raise RuntimeError(f"train.py --stages {spec.stage} exited with code {code} (rank {rank}); "
                           f"logs in {_job_folder(spec.run_dir)}")

    def _requeue(self, rank: int, code: int) -> NoReturn:
        """The trainer asked for a requeue: it saved a checkpoint on every rank to stop (code 75), or this rank
        lost a peer in a collective (code 76: a process died, hung or was cut off; the restart resumes from the
        latest checkpoint).

        One rank requeues the whole job: rank 0 after a checkpoint; after a lost peer, the first surviving rank to
        claim it, once it has given the others a moment to report a failure of their own program (a bug is not
        retried: the job fails). The other ranks wait until it has tried (a marker file in the job's log folder),
        because a task that exits early can make SLURM end the step, the requeueing rank with it. A failed
        `scontrol requeue` (e.g. SLURM already requeues the preempted job) is logged, not counted against
        --max-requeues, and the task still leaves with its code."""
        folder = _job_folder(self.spec.run_dir)
        marker = _marker(folder)
        lost_peer = code == LOST_PEER_EXIT_CODE
        leader = _claim(folder / f"lost_peer_{restart_count()}.claim", rank) if lost_peer else 0
        if rank != leader:
            _wait_for_requeue(marker, rank, leader, "lost a peer" if lost_peer else "checkpoint saved")
            raise SystemExit(code)
        try:
            failures = []
            if lost_peer:  # the failing rank saw the broken connection at the same time: give it a moment to record
                time.sleep(FAILURE_REPORT_GRACE_S)
                failures = recorded_failures(folder)
            if failures:
                outcome = {"requeued": False, "reason": f"not requeued: {failures[0]}"}
            else:
                outcome = self._requeue_job("a peer rank was lost" if lost_peer else "checkpoint saved")
        except BaseException as err:  # the others must not wait for nothing
            write_json(marker, {"requeued": False, "rank": rank, "reason": f"rank {rank}: {err}"})
            raise
        write_json(marker, {**outcome, "rank": rank})
        print(f"[lacvit launcher] {self.spec.stage}: {outcome['reason']}", flush=True)
        if failures:
            raise RuntimeError(f"{self.spec.stage}: {outcome['reason']}")
        raise SystemExit(code)

    def _requeue_job(self, why: str) -> dict[str, Any]:
        """Resubmission pickle + `scontrol requeue`; returns {"requeued": bool, "reason": str}. From a task or
        from the job's batch shell (both see SLURM_JOB_ID)."""
        import submitit

        env = submitit.JobEnvironment()

        resume = f"the run is resumable: resubmit with --run-name {Path(self.spec.run_dir).name}"
        if env.cluster != "slurm":
            raise RuntimeError(f"{self.spec.stage}: {why}, but the {env.cluster} executor cannot requeue; {resume}")
        done = read_json(self._requeues_path(), {}).get(self.spec.stage, 0)
        if done >= self.spec.max_requeues:
            raise RuntimeError(f"{self.spec.stage}: requeue limit ({self.spec.max_requeues}) reached; {resume}")
        delayed = submitit.helpers.DelayedSubmission(type(self)(self.spec))
        delayed.set_timeout(self.spec.timeout_min, self.spec.max_requeues)
        pickle_path = _job_folder(self.spec.run_dir) / f"{env.job_id}_submitted.pkl"
        tmp = pickle_path.with_name(pickle_path.name + ".requeue.tmp")
        delayed.dump(tmp)
        os.replace(tmp, pickle_path)
        try:
            proc = subprocess.run(["scontrol", "requeue", str(env.job_id)], capture_output=True, text=True,
                                  timeout=60)
            error = "" if proc.returncode == 0 else (proc.stderr.strip() or f"exit code {proc.returncode}")
        except (OSError, subprocess.TimeoutExpired) as err:
            error = str(err)
        if error:
            return {"requeued": False, "reason": f"{why}; `scontrol requeue {env.job_id}` failed "
                    f"({error}), not counted against --max-requeues (SLURM may be requeueing "
                    f"the job itself, e.g. on preemption); otherwise {resume}"}
        self._add_requeue()
        return {"requeued": True, "reason": f"{why}, job {env.job_id} requeued"}

    # ------------------------------------------------------------------------------------------ submitit hook
    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's requeue hook (a job signalled before training started): the same task again (it resumes
        from the run folder), or None past the limit. submitit requeues right after, so the requeue counts here."""
        import submitit

        count = self._add_requeue()
        if count > self.spec.max_requeues:
            print(f"[lacvit launcher] {self.spec.stage}: not requeued, {count - 1} requeues "
                  f"already (--max-requeues {self.spec.max_requeues})", flush=True)
            return None
        return submitit.helpers.DelayedSubmission(type(self)(self.spec))

    def _requeues_path(self) -> Path:
        return Path(self.spec.run_dir) / "slurm" / REQUEUES_FILE

    def _add_requeue(self) -> int:
        """Count one requeue of this stage in <run>/slurm/requeues.json; returns the new count."""
        path = self._requeues_path()
        counts = read_json(path, {})
        counts[self.spec.stage] = int(counts.get(self.spec.stage, 0)) + 1
        write_json(path, counts)
        return counts[self.spec.stage]

    def __repr__(self) -> str:
        return f"SlurmStageJob({self.spec.stage}, run_dir={self.spec.run_dir})"


def after_step(job_folder: Path, exit_code: int) -> None:
    """The job's batch shell once its step ended (submitit's teardown): requeue a job whose tasks were all killed
    before any of them could (srun's exit code > 128 and no rank's decision on record), as NCCL's watchdog does to
    every rank when a peer is lost and the collective timeout expires, or as a dying node does to the rank that was
    about to requeue. Counted against --max-requeues like the ranks' own requeues. The ranks' own exits (0, 75,
    76, a Python error) are theirs to handle, and a job SLURM requeues or cancels never gets here."""
    import submitit

    marker = _marker(job_folder)
    if exit_code <= 128:
        return
    deadline = time.monotonic() + MARKER_GRACE_S  # a rank that is requeueing writes its marker any moment
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if marker.exists():
        return
    job = submitit.helpers.DelayedSubmission.load(job_folder / f"{os.environ['SLURM_JOB_ID']}_submitted.pkl").function
    # The requeue sends SIGTERM to the batch shell and to this process; live on to record it (SIGKILL follows
    # after KillWait, 30 s by default), as the tasks do under submitit's handler.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    why = f"every task of the job step was killed (srun exit code {exit_code}) before a rank could requeue"
    try:
        outcome = job._requeue_job(why)
    except RuntimeError as err:  # the requeue limit
        outcome = {"requeued": False, "reason": str(err)}
    write_json(marker, {**outcome, "rank": None})
    print(f"[lacvit launcher] {job.spec.stage}: {outcome['reason']}", flush=True)


def _job_folder(run_dir: str) -> Path:
    """This job's submitit folder, <run>/slurm/<job id> (the debug executor sets no SUBMITIT_FOLDER)."""
    import submitit

    env = submitit.JobEnvironment()
    return Path(env.paths.folder) if "SUBMITIT_FOLDER" in os.environ else Path(run_dir) / "slurm" / str(env.job_id)


def _marker(folder: Path) -> Path:
    """Where the rank (or batch shell) that requeues this run of the job records its decision."""
    return folder / f"requeue_{restart_count()}.json"


def _wait_for_requeue(marker: Path, rank: int, leader: int, why: str,
                      timeout_s: float = LEADER_REQUEUE_WAIT_S) -> None:
    """A rank that does not requeue: stay alive until the leader has tried to requeue the job."""
    print(f"[lacvit launcher] rank {rank}: {why}, waiting for rank {leader} to requeue the job", flush=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        outcome = read_json(marker, None)
        if outcome is not None:
            print(f"[lacvit launcher] rank {rank}: rank {leader} is done: {outcome.get('reason')}", flush=True)
            return
        time.sleep(0.5)
    print(f"[lacvit launcher] rank {rank}: no word from rank {leader} after {timeout_s:.0f} s ({marker} missing); "
          f"leaving anyway", flush=True)


def _claim(path: Path, rank: int) -> int:
    """The rank that requeues after a lost peer: the first to create `path` (every surviving rank tries)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        for _ in range(20):  # the winner writes its rank right after creating the file
            text = path.read_text().strip()
            if text:
                return int(text)
            time.sleep(0.05)
        return -1
    with os.fdopen(fd, "w") as f:
        f.write(f"{rank}\n")
    return rank


def _export_world() -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT of this task, exported.

    Under SLURM they are what lacvit_dist.distributed.detect_world computes from the job step's variables (it
    ignores RANK & co. leaked in from the submitting shell); the master host is checked to resolve here, so a
    bad node name fails at once instead of in the rendezvous. submitit's local executor sets no SLURM
    variables; its JobEnvironment gives the ranks there.
    """
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    if "OMP_NUM_THREADS" not in os.environ and os.environ.get("SLURM_CPUS_PER_TASK"):
        os.environ["OMP_NUM_THREADS"] = os.environ["SLURM_CPUS_PER_TASK"]
    import submitit

    env = submitit.JobEnvironment()
    if env.cluster == "slurm":
        from lacvit_dist.distributed import detect_world

        world = detect_world()
        try:
            socket.getaddrinfo(world.master_addr, world.master_port)
        except OSError as err:
            raise RuntimeError(f"master host {world.master_addr!r} (first node of {os.environ.get('SLURM_JOB_NODELIST')})"
                               f" does not resolve on {socket.gethostname()}: {err}") from None
        nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))
        values = dict(RANK=world.rank, WORLD_SIZE=world.world_size, LOCAL_RANK=world.local_rank,
                      LOCAL_WORLD_SIZE=max(1, world.world_size // max(1, nodes)), MASTER_ADDR=world.master_addr,
                      MASTER_PORT=world.master_port)
    elif env.num_tasks > 1:
        dist_env = submitit.helpers.TorchDistributedEnvironment()
        values = dict(RANK=dist_env.rank, WORLD_SIZE=dist_env.world_size, LOCAL_RANK=dist_env.local_rank,
                      LOCAL_WORLD_SIZE=dist_env.local_world_size, MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=dist_env.master_port)
    else:
        from lacvit_dist.distributed import free_port

        values = dict(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=free_port())
    values = {k: str(v) for k, v in values.items()}
    os.environ.update(values)
    return values


if __name__ == "__main__":  # submitit's teardown in a stage's batch script: python -m launchers.slurm_job <folder> "$rc"
    import sys

    after_step(Path(sys.argv[1]), int(sys.argv[2]))
