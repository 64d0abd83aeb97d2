"""Submit a lacvit_dist run to SLURM with submitit: one job per stage, all writing into one run folder.

    python launchers/submit.py --config configs/my_run.yaml --nodes 2 --gpus-per-node 8 --partition gpu \
        stage1.epochs=100                                  # trailing key=value: config overrides

* Each stage is its own job (`StageTask`, a picklable callable); stage 2 and the baseline wait for stage 1 with
  `--dependency=afterok:<stage-1 job>` (and are cancelled if stage 1 fails: `--kill-on-invalid-dep=yes`).
* Every job writes into the run folder `<run.output_dir>/<run name>`; the run name defaults to
  `<run.name>-<timestamp>`. submitit's pickles and logs go to `<run>/slurm/<job id>/`, the job ids to
  `<run>/jobs.json` (read back by `--status`).
* Inside a job every task calls `lacvit_dist.cli.main(["--config", ..., "--stages", <stage>, overrides...])`, the
  same entry as `train.py`. Rank / world size / master come from SLURM (`SLURM_PROCID`, `SLURM_NTASKS`, first host
  of `SLURM_JOB_NODELIST`, port 20000 + job id % 20000, as `lacvit_dist.distributed.detect_world` computes
  them); on a single node the master is 127.0.0.1, so nothing depends on the host name resolving.
* Requeue: SLURM sends SIGUSR1 `--signal-delay-s` seconds before the time limit (`--signal=USR1@120`; submitit is
  told to use USR1 too, so the signal never kills a process before the trainer has installed its handler).
  The trainer sets a flag, all ranks agree at a step boundary, save one checkpoint and leave with
  `REQUEUE_EXIT_CODE` (75). Rank 0 then writes the resubmission (the same task: the run folder is the only
  state, nothing about the checkpoint is frozen in the pickle) where submitit's job reads its task, and runs
  `scontrol requeue`; the other ranks wait for it (`<run>/slurm/<job id>/requeue_<restart>.json`) so that no
  early exit ends the step before the requeue. The restarted job resumes the unfinished stage from its latest
  checkpoint. Successful requeues are counted per stage in `<run>/slurm/requeues.json`, against
  `--max-requeues`; a failing `scontrol requeue` (SLURM already requeueing a preempted job) is logged, not
  counted. A job signalled before training started is requeued by submitit's own handler, which calls
  `checkpoint()` (counted there).
* `--dry-run` prints an equivalent plain `sbatch` script per stage (with `srun python train.py ...`, the
  requeue-on-75 logic and the `afterok` dependency) and submits nothing. `--status RUN_DIR` shows the jobs,
  their SLURM states, the latest step of each stage and the TensorBoard folders.
* `--cluster slurm|local|debug` is handed to submitit explicitly (its AutoExecutor would pick SLURM whenever
  `srun` is on PATH). `local` runs the tasks as local processes and `debug` in this process (one rank); neither
  has dependencies, so the launcher then runs the stages one after the other, waits for every task's result,
  and records each job's final state in jobs.json for `--status`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lacvit_dist.resilience import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "train.py"
STAGE_ORDER = ("stage1", "stage2", "baseline")
DEPENDS_ON_STAGE1 = ("stage2", "baseline")
JOBS_FILE = "jobs.json"
REQUEUES_FILE = "requeues.json"
PREEMPT_SIGNAL = "USR1"
RANK0_REQUEUE_WAIT_S = 90.0  # rank 0's `scontrol requeue` has 60 s
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


def _atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


# ============================================================================================ the job's task

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


class StageTask:
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
        try:
            code = main(argv)
        except SystemExit as exit_:  # the trainer may leave with sys.exit(75)
            code = exit_.code if isinstance(exit_.code, int) else 1
        if code == 0:
            results = _read_json(Path(spec.run_dir) / spec.stage / "results.json", {})
            return {"stage": spec.stage, "steps": results.get("steps"), "test": results.get("test", {}).get("top1")}
        if code == REQUEUE_EXIT_CODE:
            self._requeue_after_checkpoint(int(world["RANK"]))
        raise RuntimeError(f"train.py --stages {spec.stage} exited with code {code} (rank {world['RANK']}); "
                           f"logs in {_job_folder(spec.run_dir)}")

    def _requeue_after_checkpoint(self, rank: int) -> None:
        """The trainer saved a checkpoint on every rank and asked for a requeue (exit code 75).

        Rank 0 requeues the whole job; the other ranks wait until it has tried (a marker file in the job's log
        folder), because a task that exits early can make SLURM end the step, rank 0 with it, before the requeue.
        A failed `scontrol requeue` (e.g. SLURM already requeues the preempted job) is logged, not counted against
        --max-requeues, and the task still leaves with 75."""
        import submitit

        env = submitit.JobEnvironment()
        marker = _job_folder(self.spec.run_dir) / f"requeue_{os.environ.get('SLURM_RESTART_COUNT', '0')}.json"
        if rank != 0:
            _wait_for_rank0(marker, rank)
            raise SystemExit(REQUEUE_EXIT_CODE)
        try:
            outcome = self._requeue_job(env)
        except BaseException as err:  # the others must not wait for nothing
            _atomic_write_json(marker, {"requeued": False, "reason": f"rank 0: {err}"})
            raise
        _atomic_write_json(marker, outcome)
        print(f"[lacvit launcher] {self.spec.stage}: {outcome['reason']}", flush=True)
        raise SystemExit(REQUEUE_EXIT_CODE)

    def _requeue_job(self, env) -> dict[str, Any]:
        """Rank 0: resubmission pickle + `scontrol requeue`; returns {"requeued": bool, "reason": str}."""
        import submitit

        resume = f"the run is resumable: resubmit with --run-name {Path(self.spec.run_dir).name}"
        if env.cluster != "slurm":
            raise RuntimeError(f"{self.spec.stage} saved a checkpoint to stop, but the {env.cluster} executor "
                               f"cannot requeue; {resume}")
        done = _read_json(self._requeues_path(), {}).get(self.spec.stage, 0)
        if done >= self.spec.max_requeues:
            raise RuntimeError(f"{self.spec.stage}: requeue limit ({self.spec.max_requeues}) reached; {resume}")
        delayed = submitit.helpers.DelayedSubmission(type(self)(self.spec))
        delayed.set_timeout(self.spec.timeout_min, self.spec.max_requeues)
        pickle_path = Path(env.paths.submitted_pickle)
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
            return {"requeued": False, "reason": f"checkpoint saved; `scontrol requeue {env.job_id}` failed "
                    f"({error}), not counted against --max-requeues (SLURM may be requeueing "
                    f"the job itself, e.g. on preemption); otherwise {resume}"}
        self._add_requeue()
        return {"requeued": True, "reason": f"checkpoint saved, job {env.job_id} requeued"}

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
        counts = _read_json(path, {})
        counts[self.spec.stage] = int(counts.get(self.spec.stage, 0)) + 1
        _atomic_write_json(path, counts)
        return counts[self.spec.stage]

    def __repr__(self) -> str:
        return f"StageTask({self.spec.stage}, run_dir={self.spec.run_dir})"


def _job_folder(run_dir: str) -> Path:
    """This job's submitit folder, <run>/slurm/<job id> (the debug executor sets no SUBMITIT_FOLDER)."""
    import submitit

    env = submitit.JobEnvironment()
    return Path(env.paths.folder) if "SUBMITIT_FOLDER" in os.environ else Path(run_dir) / "slurm" / str(env.job_id)


def _wait_for_rank0(marker: Path, rank: int, timeout_s: float = RANK0_REQUEUE_WAIT_S) -> None:
    """A non-zero rank after the checkpoint-and-stop: stay alive until rank 0 has tried to requeue the job."""
    print(f"[lacvit launcher] rank {rank}: checkpoint saved, waiting for rank 0 to requeue the job", flush=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        outcome = _read_json(marker, None)
        if outcome is not None:
            print(f"[lacvit launcher] rank {rank}: rank 0 is done: {outcome.get('reason')}", flush=True)
            return
        time.sleep(0.5)
    print(f"[lacvit launcher] rank {rank}: no word from rank 0 after {timeout_s:.0f} s ({marker} missing); "
          f"leaving anyway", flush=True)


def _export_world() -> dict[str, str]:
    """Export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for this task, so that lacvit_dist.cli's
    detect_world takes them as they are (its "env" branch).

    Under SLURM they are computed by detect_world itself from the SLURM variables (after dropping any
    RANK & co. that leaked in from the submitting shell, since sbatch exports its environment), with the
    master replaced by 127.0.0.1 when the job has one node. submitit's local executor sets no SLURM
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
        nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))
        master = "127.0.0.1" if nodes == 1 else world.master_addr
        if nodes > 1:
            import socket

            try:
                socket.getaddrinfo(master, world.master_port)
            except OSError as err:
                raise RuntimeError(f"master host {master!r} (first node of {os.environ.get('SLURM_JOB_NODELIST')}) "
                                   f"does not resolve on {socket.gethostname()}: {err}") from None
        local_size = max(1, world.world_size // max(1, nodes))
        values = dict(RANK=world.rank, WORLD_SIZE=world.world_size, LOCAL_RANK=world.local_rank,
                      LOCAL_WORLD_SIZE=local_size, MASTER_ADDR=master, MASTER_PORT=world.master_port)
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


# ============================================================================================ options

@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    mem: str | None = None
    timeout_min: int = 240
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    signal_delay_s: int = 120
    sbatch_opts: dict[str, str] = field(default_factory=dict)

    def sbatch_options(self) -> dict[str, Any]:
        """Every #SBATCH option of a stage's job (besides output files and dependency), in sbatch's spelling."""
        opts: dict[str, Any] = {"nodes": self.nodes, "ntasks-per-node": self.tasks_per_node}
        if self.gpus_per_node:
            opts["gpus-per-node"] = self.gpus_per_node
        for key, value in (("cpus-per-task", self.cpus_per_task), ("mem", self.mem), ("partition", self.partition),
                           ("account", self.account), ("qos", self.qos), ("constraint", self.constraint)):
            if value is not None:
                opts[key] = value
        if self.exclusive:
            opts["exclusive"] = True
        opts["time"] = self.timeout_min
        opts["signal"] = f"{PREEMPT_SIGNAL}@{self.signal_delay_s}"
        opts["requeue"] = True
        opts.update(self.sbatch_opts)
        return opts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launchers/submit.py",
        description="Submit a lacvit_dist run to SLURM (submitit): one job per stage in one run folder; stage 2 and "
                    "the baseline start after stage 1 succeeded. Trailing key=value arguments override the config.",
        epilog="Example: python launchers/submit.py --config configs/demo_digits.yaml --nodes 1 --gpus-per-node 0 "
               "--tasks-per-node 2 --stages stage1 stage2 stage1.epochs=5")
    p.add_argument("--config", type=Path, help="YAML run configuration")
    g = p.add_argument_group("resources (per stage job)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: CPU job)")
    g.add_argument("--tasks-per-node", type=int, default=None, help="processes per node (default: GPUs per node, or 1)")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem", default=None, help="memory per node, sbatch syntax (64G, 500000M)")
    g.add_argument("--timeout-min", type=int, default=240, help="time limit of each job, minutes")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--exclusive", action="store_true")
    g.add_argument("--signal-delay-s", type=int, default=120,
                   help="SIGUSR1 this many seconds before the time limit: checkpoint and requeue")
    g.add_argument("--sbatch-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --sbatch-opt mail-type=END (repeatable)")
    r = p.add_argument_group("run")
    r.add_argument("--stages", nargs="+", choices=STAGE_ORDER, help="stages to submit (default: run.stages)")
    r.add_argument("--run-name", help="run folder name (default: <run.name>-<timestamp>); an existing run folder "
                                      "is continued: finished stages are skipped, unfinished ones resume")
    r.add_argument("--output-dir", type=Path, help="parent of the run folder (default: run.output_dir)")
    r.add_argument("--max-requeues", type=int, default=3, help="requeues per stage after a checkpoint-and-stop")
    r.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                   help="submitit executor (explicit: submitit would pick SLURM whenever srun exists)")
    r.add_argument("--job-name", default="lacvit", help="job name prefix (the stage is appended)")
    r.add_argument("--wait", action="store_true", help="wait until every job has finished; exit 1 if one failed")
    r.add_argument("--wait-timeout-min", type=float, default=None, help="give up waiting after this long")
    a = p.add_argument_group("other actions")
    a.add_argument("--dry-run", action="store_true", help="print equivalent sbatch scripts, submit nothing")
    a.add_argument("--status", type=Path, metavar="RUN_DIR", help="show the jobs, states and progress of a run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.status is None and args.config is None:
        parser.error("--config is required (unless --status RUN_DIR)")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must be key=value, got {bad}")
    if any(o.split("=", 1)[0].strip() in ("run.name", "run.output_dir", "run.stages") for o in args.overrides):
        parser.error("run.name / run.output_dir / run.stages: use --run-name / --output-dir / --stages")
    for opt in args.sbatch_opt:
        if "=" not in opt and not opt.strip():
            parser.error(f"--sbatch-opt expects KEY=VALUE or KEY, got {opt!r}")
    if args.nodes < 1 or args.gpus_per_node < 0 or (args.tasks_per_node is not None and args.tasks_per_node < 1):
        parser.error("--nodes and --tasks-per-node must be >= 1, --gpus-per-node >= 0")
    if args.tasks_per_node is None:
        args.tasks_per_node = max(1, args.gpus_per_node)
    if args.cluster == "local" and args.nodes > 1:
        parser.error("--cluster local runs on this machine only: --nodes must be 1")
    if args.cluster == "debug" and args.nodes * args.tasks_per_node > 1:
        parser.error("--cluster debug runs one rank inside this process: --nodes and --tasks-per-node must be 1 "
                     "(--cluster local runs several tasks)")
    return args


def resources_from_args(args: argparse.Namespace) -> Resources:
    sbatch_opts: dict[str, str] = {}
    for opt in args.sbatch_opt:
        key, _, value = opt.partition("=")
        sbatch_opts[key.strip().lstrip("-")] = value.strip() if value else True  # type: ignore[assignment]
    return Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                     cpus_per_task=args.cpus_per_task, mem=args.mem, timeout_min=args.timeout_min,
                     partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
                     exclusive=args.exclusive, signal_delay_s=args.signal_delay_s, sbatch_opts=sbatch_opts)


# ============================================================================================ planning

@dataclass
class Plan:
    run_dir: Path
    config: Path
    stages: list[str]             # to submit, in order
    skipped: list[str]            # already finished in run_dir
    overrides: list[str]          # the user's, plus run.output_dir / run.name
    resources: Resources
    cwd: Path

    def spec(self, stage: str, max_requeues: int) -> StageSpec:
        return StageSpec(stage=stage, config=str(self.config), overrides=tuple(self.overrides),
                         run_dir=str(self.run_dir), cwd=str(self.cwd), max_requeues=max_requeues,
                         timeout_min=self.resources.timeout_min)

    def dependency(self, stage: str) -> str | None:
        """The stage this one must wait for (afterok), if it is submitted in the same call."""
        return "stage1" if stage in DEPENDS_ON_STAGE1 and "stage1" in self.stages else None


def make_plan(args: argparse.Namespace) -> Plan:
    from lacvit_dist.config import load_config

    config = args.config.resolve()
    if not config.is_file():
        raise ValueError(f"--config: {config} does not exist")
    stage_override = [f"run.stages=[{','.join(args.stages)}]"] if args.stages else []
    cfg = load_config(config, list(args.overrides) + stage_override)  # ConfigError: stop before submitting
    output_dir = (args.output_dir or Path(cfg.run.output_dir)).resolve()
    name = args.run_name or f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"--run-name: {name!r} is not a folder name")
    run_dir = output_dir / name
    requested = list(cfg.run.stages)
    skipped = [s for s in requested if (run_dir / s / "results.json").exists()]
    stages = [s for s in requested if s not in skipped]
    if "stage2" in stages and "stage1" not in stages and not cfg.stage2.backbone_path \
            and not (run_dir / "stage1" / "backbone.safetensors").exists():
        raise ValueError("stage2 needs stage 1's backbone: submit stage1 too, or set stage2.backbone_path=...")
    overrides = list(args.overrides) + [f"run.output_dir={output_dir}", f"run.name={name}"]
    return Plan(run_dir=run_dir, config=config, stages=stages, skipped=skipped, overrides=overrides,
                resources=resources_from_args(args), cwd=Path.cwd())


# ============================================================================================ dry run

def sbatch_script(plan: Plan, stage: str, job_name: str, max_requeues: int) -> str:
    """A plain sbatch script equivalent to the submitit job of `stage` (no submitit needed to run it)."""
    log_dir = plan.run_dir / "slurm" / "%j"
    opts = {"job-name": f"{job_name}-{stage}", **plan.resources.sbatch_options(),
            "output": str(log_dir / "%j_log.out"), "error": str(log_dir / "%j_log.err"),
            "open-mode": "append"}
    lines = ["#!/bin/bash"]
    for key, value in opts.items():
        lines.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}")
    dep = plan.dependency(stage)
    if dep:
        lines.append(f"# runs after {dep} succeeded: submit with sbatch --dependency=afterok:<{dep} job id> "
                     f"--kill-on-invalid-dep=yes")
    train = [sys.executable, str(TRAIN_PY), "--config", str(plan.config), *plan.overrides, "--stages", stage]
    lines += [
        "",
        f"cd {shlex.quote(str(plan.cwd))}",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
        "# one task per GPU; rank/world/master from SLURM_PROCID/SLURM_NTASKS/SLURM_JOB_NODELIST (lacvit_dist)",
        f"srun --unbuffered {shlex.join(train)}",
        "rc=$?",
        f"# {REQUEUE_EXIT_CODE}: a checkpoint was saved after SIGUSR1/SIGTERM; requeue, the restart resumes it",
        f'if [ "$rc" -eq {REQUEUE_EXIT_CODE} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {max_requeues} ]; then',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def dry_run_text(plan: Plan, job_name: str, max_requeues: int) -> str:
    """A shell script that writes each stage's sbatch script and submits them with their dependencies."""
    out = [f"# lacvit_dist run {plan.run_dir} (dry run: nothing was submitted)",
           f"# {len(plan.stages)} job(s): {', '.join(plan.stages) or 'none'}"
           + (f"; already finished: {', '.join(plan.skipped)}" if plan.skipped else ""),
           f"mkdir -p {shlex.quote(str(plan.run_dir / 'slurm'))}"]
    for stage in plan.stages:
        script = plan.run_dir / "slurm" / f"{stage}.sbatch"
        out += ["", f"# ---- {stage} ----", f"cat > {shlex.quote(str(script))} <<'LACVIT_SBATCH'",
                sbatch_script(plan, stage, job_name, max_requeues).rstrip("\n"), "LACVIT_SBATCH"]
    out += ["", "# ---- submit ----"]
    for stage in plan.stages:
        script = shlex.quote(str(plan.run_dir / "slurm" / f"{stage}.sbatch"))
        dep = plan.dependency(stage)
        flags = f"--dependency=afterok:${{jid_{dep}}} --kill-on-invalid-dep=yes " if dep else ""
        out.append(f"jid_{stage}=$(sbatch --parsable {flags}{script}) && echo \"{stage}: job $jid_{stage}\"")
    return "\n".join(out) + "\n"


# ============================================================================================ submission

def make_executor(plan: Plan, cluster: str, job_name: str, stage: str, max_requeues: int,
                  dependency_job: str | None):
    import submitit

    folder = plan.run_dir / "slurm" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_requeues)
    res = plan.resources
    params: dict[str, Any] = dict(name=f"{job_name}-{stage}", timeout_min=res.timeout_min, nodes=res.nodes,
                                  tasks_per_node=res.tasks_per_node)
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.cpus_per_task:
        params["cpus_per_task"] = res.cpus_per_task
    if cluster == "slurm":
        additional: dict[str, Any] = {"signal": f"{PREEMPT_SIGNAL}@{res.signal_delay_s}", "requeue": True}
        if dependency_job:
            additional.update({"dependency": f"afterok:{dependency_job}", "kill-on-invalid-dep": "yes"})
        additional.update(res.sbatch_opts)
        pythonpath = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
        params.update(
            slurm_signal_delay_s=res.signal_delay_s,
            slurm_setup=[f"export PYTHONPATH={shlex.quote(pythonpath)}",
                         f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}"],
            slurm_additional_parameters=additional)
        for key in ("partition", "account", "qos", "constraint", "mem"):
            if getattr(res, key) is not None:
                params[f"slurm_{key}"] = getattr(res, key)
        if res.exclusive:
            params["slurm_exclusive"] = True
    executor.update_parameters(**params)
    return executor


def record_jobs(run_dir: Path, entries: list[dict[str, Any]], cluster: str, config: Path) -> None:
    path = run_dir / JOBS_FILE
    data = _read_json(path, {"run_dir": str(run_dir), "jobs": []})
    data.update(cluster=cluster, config=str(config))
    data["jobs"].extend(entries)
    _atomic_write_json(path, data)


def submit(plan: Plan, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Submit plan.stages in order; returns the jobs.json entries and the submitit jobs by stage."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "slurm").mkdir(exist_ok=True)
    entries: list[dict[str, Any]] = []
    job_ids: dict[str, str] = {}
    jobs: dict[str, Any] = {}
    for stage in plan.stages:
        dep = plan.dependency(stage)
        if args.cluster != "slurm" and dep:
            try:
                _wait_local(jobs[dep], dep)  # no dependencies outside SLURM: run in order
            except RuntimeError as err:
                raise RuntimeError(f"{err}; later stages not started") from None
        executor = make_executor(plan, args.cluster, args.job_name, stage, args.max_requeues,
                                 job_ids.get(dep) if dep and args.cluster == "slurm" else None)
        job = executor.submit(StageTask(plan.spec(stage, args.max_requeues)))
        job_ids[stage] = str(job.job_id)
        jobs[stage] = job
        entry = {"stage": stage, "job_id": str(job.job_id), "depends_on": job_ids.get(dep) if dep else None,
                 "log_dir": str(plan.run_dir / "slurm" / str(job.job_id)),
                 "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        entries.append(entry)
        record_jobs(plan.run_dir, [entry], args.cluster, plan.config)  # one at a time: a failure keeps the rest
        print(f"{stage}: job {job.job_id}" + (f" (after {dep} job {entry['depends_on']} succeeds)" if dep else ""),
              flush=True)
    return entries, jobs


def _wait_local(job, stage: str) -> None:
    """Wait for every task of a local/debug job (`results()`: a multi-task job has one result per task)."""
    slurm_dir = Path(job.paths.folder).parent
    try:
        job.results()
    except Exception as err:  # noqa: BLE001 - the job's own error, shown to the user
        _record_state(slurm_dir.parent, stage, str(job.job_id), "FAILED")
        raise RuntimeError(f"{stage} failed: {err}") from None
    finally:
        _remove_unformatted_folder(slurm_dir)
    _record_state(slurm_dir.parent, stage, str(job.job_id), "COMPLETED")


def _record_state(run_dir: Path, stage: str, job_id: str, state: str) -> None:
    """A local/debug job's final state in jobs.json (no scheduler remembers it), shown by --status."""
    path = run_dir / JOBS_FILE
    data = _read_json(path, {"jobs": []})
    for entry in data["jobs"]:
        if (entry["stage"], entry["job_id"]) == (stage, job_id):
            entry["state"] = state
    _atomic_write_json(path, data)


def _remove_unformatted_folder(slurm_dir: Path) -> None:
    """submitit's local controller creates its log folder argument `<run>/slurm/%j` literally (it writes into
    the formatted `<run>/slurm/<job id>/`); drop that empty folder."""
    try:
        (slurm_dir / "%j").rmdir()
    except OSError:  # absent, or (unexpectedly) not empty: keep whatever is in it
        pass


# ============================================================================================ status

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
    results = _read_json(stage_dir / "results.json", None)
    if results:
        test = results.get("test") or {}
        extra = f", test top1 {test['top1']:.4f} on {test.get('samples')} samples" if "top1" in test else ""
        return f"finished at step {results.get('steps')}{extra}"
    ckpt = stage_dir / "checkpoints"
    tag = None
    if (ckpt / "latest").is_file():
        tag = (ckpt / "latest").read_text().strip() or None
    if tag is None and ckpt.is_dir():
        tags = sorted((p.name for p in ckpt.iterdir() if p.is_dir() and re.fullmatch(r"step\d+", p.name)))
        tag = tags[-1] if tags else None
    if tag:
        match = re.search(r"(\d+)$", tag)
        return f"checkpoint {tag}" + (f" (step {int(match.group(1))})" if match else "")
    return "started, no checkpoint yet" if stage_dir.is_dir() else "not started"


def status_text(run_dir: Path) -> str:
    run_dir = run_dir.resolve()
    data = _read_json(run_dir / JOBS_FILE, None)
    if data is None:
        raise ValueError(f"{run_dir / JOBS_FILE} not found: not a run submitted by launchers/submit.py")
    jobs = data.get("jobs", [])
    cluster = data.get("cluster", "slurm")
    states = job_states([j["job_id"] for j in jobs]) if cluster == "slurm" else \
        {j["job_id"]: {"state": j.get("state", "UNKNOWN")} for j in jobs}  # recorded when the launcher's wait ended
    requeues = _read_json(run_dir / "slurm" / REQUEUES_FILE, {})
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


# ============================================================================================ main

def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.status is not None:
        try:
            print(status_text(args.status))
        except ValueError as err:
            print(f"submit: {err}", file=sys.stderr)
            return 2
        return 0
    from lacvit_dist.config import ConfigError

    try:
        plan = make_plan(args)
    except (ConfigError, ValueError) as err:
        print(f"submit: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dry_run_text(plan, args.job_name, args.max_requeues), end="")
        return 0
    if plan.skipped:
        print(f"already finished in {plan.run_dir}: {', '.join(plan.skipped)} (skipped)")
    if not plan.stages:
        print(f"nothing to submit: every stage of {plan.run_dir} is finished")
        return 0
    try:
        entries, jobs = submit(plan, args)
    except (RuntimeError, ValueError, OSError) as err:
        print(f"submit: {err}", file=sys.stderr)
        return 1
    print(f"run folder: {plan.run_dir}")
    print(f"status:     {sys.executable} {Path(__file__).parent / 'submit.py'} --status {plan.run_dir}")
    if args.wait and args.cluster == "slurm":
        timeout = None if args.wait_timeout_min is None else 60 * args.wait_timeout_min
        states = wait_for([e["job_id"] for e in entries], timeout)
        print(status_text(plan.run_dir))
        return 0 if all(s["state"] == "COMPLETED" for s in states.values()) else 1
    if args.wait or args.cluster != "slurm":
        for entry in entries:
            try:
                _wait_local(jobs[entry["stage"]], entry["stage"])
            except RuntimeError as err:
                print(f"submit: {err}", file=sys.stderr)
                return 1
        print(status_text(plan.run_dir))
    return 0
