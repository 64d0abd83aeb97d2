"""Submit a lacvit_dist run to SLURM with submitit: one job per stage, all writing into one run folder.

    python launchers/submit.py --config configs/my_run.yaml --nodes 2 --gpus-per-node 8 --partition gpu \
        stage1.epochs=100                                  # trailing key=value: config overrides

* Each stage is its own job; stage 2 and the baseline wait for stage 1 with `--dependency=afterok:<stage-1
  job>` (and are cancelled if stage 1 fails: `--kill-on-invalid-dep=yes`).
* Every job writes into the run folder `<run.output_dir>/<run name>`; the run name defaults to
  `<run.name>-<timestamp>`. submitit's pickles and logs go to `<run>/slurm/<job id>/`, the job ids to
  `<run>/jobs.json` (read back by `--status`).
* Inside a job every task runs `launchers.slurm_job.SlurmStageJob`: the same entry as `train.py`, and on
  SIGUSR1 (`--signal-delay-s` before the time limit) checkpoint, exit 75 and requeue (see that module).
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
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from launchers.plan import Plan, dry_run_text, make_plan
from launchers.slurm_job import PREEMPT_SIGNAL, SlurmStageJob
from launchers.status import JOBS_FILE, active_jobs, status_text, wait_for
from lacvit_dist.io import read_json, write_json
from lacvit_dist.stages import STAGE_NAMES

REPO = Path(__file__).resolve().parent.parent


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
    r.add_argument("--stages", nargs="+", choices=STAGE_NAMES, help="stages to submit (default: run.stages)")
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
            # after srun: requeue a job whose tasks were all killed before a rank could (slurm_job.after_step)
            slurm_teardown=["rc=$?", f"{shlex.quote(sys.executable)} -m launchers.slurm_job "
                            f"{shlex.quote(str(plan.run_dir / 'slurm'))}/\"$SLURM_JOB_ID\" \"$rc\"", 'exit "$rc"'],
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
    data = read_json(path, {"run_dir": str(run_dir), "jobs": []})
    data.update(cluster=cluster, config=str(config))
    data["jobs"].extend(entries)
    write_json(path, data)


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
        job = executor.submit(SlurmStageJob(plan.spec(stage, args.max_requeues)))
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
    data = read_json(path, {"jobs": []})
    for entry in data["jobs"]:
        if (entry["stage"], entry["job_id"]) == (stage, job_id):
            entry["state"] = state
    write_json(path, data)


def _remove_unformatted_folder(slurm_dir: Path) -> None:
    """submitit's local controller creates its log folder argument `<run>/slurm/%j` literally (it writes into
    the formatted `<run>/slurm/<job id>/`); drop that empty folder."""
    try:
        (slurm_dir / "%j").rmdir()
    except OSError:  # absent, or (unexpectedly) not empty: keep whatever is in it
        pass


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
    busy = active_jobs(plan.run_dir, plan.stages) if args.cluster == "slurm" else []
    if busy:  # a second copy would train into the same folder, and its pruning delete the first one's checkpoints
        print(f"submit: {plan.run_dir} already has {', '.join(busy)}; it resumes this run by itself. Wait for it "
              f"(--status {plan.run_dir}) or cancel it (scancel) before submitting again", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    raise SystemExit(main())
