"""What a submission asks for: the resources of each stage's job, the stages still to run in the run folder (the
trainer's own restart rule decides which are finished), their order, and the plain sbatch scripts `--dry-run`
prints instead of submitting."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launchers.slurm_job import PREEMPT_SIGNAL, StageSpec
from lacvit_dist.distributed import LOST_PEER_EXIT_CODE
from lacvit_dist.stages import STAGES
from lacvit_dist.train.preemption import REQUEUE_EXIT_CODE
from lacvit_dist.train.restart import stage_plan

TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"
# Stage 2 and the baseline start after stage 1 succeeded when submitted together (afterok).
DEPENDS_ON_STAGE1 = tuple(name for name in STAGES if name != "stage1")


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


def resources_from_args(args: argparse.Namespace) -> Resources:
    sbatch_opts: dict[str, str] = {}
    for opt in args.sbatch_opt:
        key, _, value = opt.partition("=")
        sbatch_opts[key.strip().lstrip("-")] = value.strip() if value else True  # type: ignore[assignment]
    return Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                     cpus_per_task=args.cpus_per_task, mem=args.mem, timeout_min=args.timeout_min,
                     partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
                     exclusive=args.exclusive, signal_delay_s=args.signal_delay_s, sbatch_opts=sbatch_opts)


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
    skipped: list[str] = []
    stages: list[str] = []
    for stage in cfg.run.stages:  # the trainer's own restart rule, asked before anything is submitted
        decision = stage_plan(cfg, stage, run_dir, {}, input_pending=STAGES[stage].trains_on in stages)
        (skipped if "finished" in decision else stages).append(stage)
    overrides = list(args.overrides) + [f"run.output_dir={output_dir}", f"run.name={name}"]
    return Plan(run_dir=run_dir, config=config, stages=stages, skipped=skipped, overrides=overrides,
                resources=resources_from_args(args), cwd=Path.cwd())


def sbatch_script(plan: Plan, stage: str, job_name: str, max_requeues: int) -> str:
    """A plain sbatch script equivalent to the submitit job of `stage` (no submitit needed to run it)."""
    log = plan.run_dir / "slurm" / f"{stage}-%j"  # in a folder that exists: SLURM creates no folders
    opts = {"job-name": f"{job_name}-{stage}", **plan.resources.sbatch_options(),
            "output": f"{log}.out", "error": f"{log}.err", "open-mode": "append"}
    lines = ["#!/bin/bash"]
    for key, value in opts.items():
        lines.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}")
    dep = plan.dependency(stage)
    if dep:
        lines.append(f"# runs after {dep} succeeded: submit with sbatch --dependency=afterok:<{dep} job id> "
                     f"--kill-on-invalid-dep=yes")
    train = [sys.executable, str(TRAIN_PY), "--config", str(plan.config), *plan.overrides, "--stages", stage]
    failures = shlex.quote(str(plan.run_dir / "slurm"))  # lacvit_dist.rank_failures: <run>/slurm/<job id>/failed_*
    lines += [
        "",
        f"cd {shlex.quote(str(plan.cwd))}",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
        "# one task per GPU; rank/world/master from SLURM_PROCID/SLURM_NTASKS/SLURM_JOB_NODELIST (lacvit_dist)",
        f"srun --unbuffered {shlex.join(train)}",
        "rc=$?",
        f"# {REQUEUE_EXIT_CODE}: a checkpoint was saved after SIGUSR1/SIGTERM; {LOST_PEER_EXIT_CODE}: a rank lost a peer; "
        "> 128: a task was killed. Requeue: the restart resumes from `latest`.",
        "# Not when a rank failed on its own (a bug): it recorded its error, and its peers' 76 is what srun reports.",
        f'failed=$(cat {failures}/"$SLURM_JOB_ID"/failed_"${{SLURM_RESTART_COUNT:-0}}"_rank*.json 2>/dev/null)',
        'if [ -n "$failed" ]; then',
        '    echo "lacvit: not requeued, a rank failed on its own: $failed" >&2',
        f'elif {{ [ "$rc" -eq {REQUEUE_EXIT_CODE} ] || [ "$rc" -eq {LOST_PEER_EXIT_CODE} ] || [ "$rc" -gt 128 ]; }} '
        f'&& [ "${{SLURM_RESTART_COUNT:-0}}" -lt {max_requeues} ]; then',
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
