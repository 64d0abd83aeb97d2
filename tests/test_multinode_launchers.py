"""Every launch path of the README across a real 2-node SLURM cluster (launchers/local_cluster.py --nodes 2, as in
tests/test_multinode.py), 2 gloo ranks per node, gives exactly the numbers of 1 node x 4 ranks:

* the reference: stage 1 in finite epochs (tiny model, 2 epochs) as one SLURM job of 4 tasks on one node
  (`srun python train.py`; each test node declares 2 CPUs, so the job is `--overcommit`: sbatch refuses
  `--ntasks-per-node=4` there even with it, `--ntasks=4` it takes);
* the same config on node[1-2], 2 ranks each, through
  - `launchers/submit.py --nodes 2 --tasks-per-node 2` (submitit, one SLURM task per rank);
  - `srun --ntasks-per-node=1 torchrun --nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d ...` in an sbatch
    script (one agent per node, c10d rendezvous on the first node, across the two network namespaces);
  - `deepspeed --launcher slurm --hostfile ... --no_ssh_check --master_addr <first node>` in an sbatch script
    (DeepSpeed's runner calls `srun -n 4 python train.py`; without those two flags it would ssh to the first
    node, once to check it and once for its address);
  - `srun --ntasks-per-node=1 deepspeed --no_ssh --node_rank=$SLURM_NODEID --hostfile ... --master_addr ...` in
    an sbatch script (one deepspeed launcher per node, no ssh at all).

Each ends COMPLETED on node[1-2] with world size 4 and logs the reference's loss sequence bitwise: every global
rank reads the same samples in the same order (the data deal depends on rank, world size and workers only) and
gloo reduces in rank order whatever the hosts, so nothing in the arithmetic depends on the layout.

What each trainer process read is recorded without touching the launch commands or the product code: the jobs
get tests/job_hooks/sitecustomize.py on PYTHONPATH (with LACVIT_TEST_TRACE) that wraps the training loop's
`train_loader` and appends, per rank, its host, how `detect_world` placed it, and the keys of every batch the
trainer took. So the test also checks who ran where (ranks 0-1 on node1, 2-3 on node2, by the launcher's
variables or SLURM's), that each rank read the reference rank's samples in the reference's order, and that in
each epoch the 4 ranks and their data workers read no sample twice and read every sample the finite-epoch plan
deals (1,024 of the 1,258: 8 batches of 32 per rank; the 234 the equal cut leaves out are logged by the trainer;
exact cover of a split that divides evenly is tests/test_epochs.py's).

Without SLURM, iproute2/util-linux or root the module is skipped, except under CI=true where it fails.
"""
import json
import os
import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, pythonpath
from test_multinode import NODES, WORLD, cluster2, job_fields, plain_logs, wait_for_job  # noqa: F401 (a fixture)
from test_slurm import CONFIG, SUBMIT, jobs_of
from test_train import BIN, TINY

from launchers import status
from lacvit_dist.data.pipeline import finite_epoch_plan
from lacvit_dist.data.shards import load_info

PER_NODE = WORLD // NODES
EPOCHS = 2
MICRO_BATCH = 32
# Stage 1 of the tiny model in finite epochs (stage chosen by --stages: submit.py takes it, so does train.py).
OVERRIDES = [*TINY, "data.epoch_mode=finite", "stage1.steps_per_epoch=null", f"stage1.epochs={EPOCHS}",
             f"stage1.micro_batch_size={MICRO_BATCH}", "data.num_workers=1", "data.val_split=null"]
HOOKS = REPO / "tests" / "job_hooks"  # sitecustomize.py: the trace (LACVIT_TEST_TRACE)
JOB_TIMEOUT_S = 300  # one run takes 25-40 s on 2 idle cores

# The sbatch scripts' bodies (README "Multi-node launchers": the same commands). {train} is
# `train.py --config ... overrides --stages stage1`, {bin} the venv's bin folder, {hostfile} a shared path.
REFERENCE = """\
srun {bin}/python {train}
"""
TORCHRUN = """\
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --ntasks-per-node=1 {bin}/torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node=2 \\
    --rdzv_backend=c10d --rdzv_endpoint="$head:$((20000 + SLURM_JOB_ID % 20000))" --rdzv_id="$SLURM_JOB_ID" \\
    {train}
"""
DEEPSPEED_SLURM = """\
hostfile={hostfile}-$SLURM_JOB_ID
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots=$SLURM_NTASKS_PER_NODE/" > "$hostfile"
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
{bin}/deepspeed --launcher slurm --hostfile="$hostfile" --no_ssh_check --master_addr="$head" {train}
"""
DEEPSPEED_NO_SSH = """\
hostfile={hostfile}-$SLURM_JOB_ID
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots=2/" > "$hostfile"
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --ntasks-per-node=1 bash -c 'exec "$0" --no_ssh --node_rank="$SLURM_NODEID" "$@"' {bin}/deepspeed \\
    --hostfile="$hostfile" --master_addr="$head" --master_port=$((20000 + SLURM_JOB_ID % 20000)) {train}
"""
ONE_AGENT_PER_NODE = {"nodes": NODES, "ntasks-per-node": 1, "cpus-per-task": PER_NODE}
ONE_TASK_PER_RANK = {"nodes": NODES, "ntasks-per-node": PER_NODE}
# (sbatch options, script body or None for submit.py, what detect_world says in the ranks)
LAUNCHES = {
    "submit_py": (None, None, "slurm"),
    "torchrun_c10d": (ONE_AGENT_PER_NODE, TORCHRUN, "env"),
    "deepspeed_slurm": (ONE_TASK_PER_RANK, DEEPSPEED_SLURM, "slurm"),
    "deepspeed_no_ssh": (ONE_AGENT_PER_NODE, DEEPSPEED_NO_SSH, "env"),
}


# ----------------------------------------------------------------------------------------------- helpers

def job_env(trace: Path) -> dict[str, str]:
    """The submitting environment (sbatch exports it to the job): one thread per rank, the trace hook."""
    trace.mkdir(parents=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath(HOOKS), "LACVIT_TEST_TRACE": str(trace)}


def train_args(run_dir: Path, data: Path) -> str:
    return shlex.join([str(REPO / "train.py"), "--config", str(CONFIG), f"data.root={data}",
                       f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", *OVERRIDES,
                       "--stages", "stage1"])


def sbatch(run_dir: Path, options: dict, body: str, env: dict[str, str]) -> str:
    """Write `run_dir/slurm/job.sbatch` (its output beside it) and submit it; the job id."""
    (run_dir / "slurm").mkdir(parents=True)
    header = {"job-name": run_dir.name, **options, "time": 5, "output": str(run_dir / "slurm" / "job-%j.out")}
    lines = ["#!/bin/bash", *(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}"
                              for key, value in header.items()), f"cd {shlex.quote(str(REPO))}", body]
    script = run_dir / "slurm" / "job.sbatch"
    script.write_text("\n".join(lines))
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, f"sbatch {script}: {proc.stdout}{proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def finish(job_id: str, run_dir: Path, cluster, nodelist: str) -> dict:
    """Wait for the job (cancelled if it hangs, so the next job gets the nodes); check that it COMPLETED on
    `nodelist`; its stage-1 results."""
    details = lambda: plain_logs(run_dir, cluster)  # noqa: E731
    try:
        state = wait_for_job(job_id, JOB_TIMEOUT_S, details)
    finally:
        if status.job_states([job_id])[job_id]["state"] not in status.TERMINAL_STATES:
            subprocess.run(["scancel", job_id], timeout=30)
    assert state["state"] == "COMPLETED", f"job {job_id}: {state}\n{details()}"
    fields = job_fields(job_id)
    assert fields.get("NodeList") == nodelist, f"{fields}\n{details()}"
    results_file = run_dir / "stage1" / "results.json"
    assert results_file.is_file(), details()
    return json.loads(results_file.read_text())


def read_trace(trace: Path, run_dir: Path, cluster) -> tuple[dict[int, dict], dict[int, list[list[str]]]]:
    """Per rank: who it was (host, process-group rank, detect_world's answer) and the keys of every batch."""
    files = sorted(trace.glob("*.jsonl"))
    assert [p.name for p in files] == [f"{rank}.jsonl" for rank in range(WORLD)], \
        f"trace files {files}\n{plain_logs(run_dir, cluster)}"
    who, batches = {}, {}
    for rank in range(WORLD):
        head, *rows = (json.loads(line) for line in (trace / f"{rank}.jsonl").read_text().splitlines())
        who[rank], batches[rank] = head, rows
    return who, batches


def losses(results: dict) -> list[float]:
    return [entry["loss"] for entry in results["train_log"]]


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def plan(digits_root):
    split = load_info(digits_root).split("train")
    return split, finite_epoch_plan(split, WORLD, 1, MICRO_BATCH)


@pytest.fixture(scope="module")
def reference(cluster2, digits_root, plan, tmp_path_factory):
    """1 node x 4 ranks: one SLURM job of 4 tasks on node1 (`srun python train.py`)."""
    out = tmp_path_factory.mktemp("reference")
    run_dir, trace = out / "one_node_of_four", out / "trace"
    env = job_env(trace)
    job_id = sbatch(run_dir, {"nodes": 1, "ntasks": WORLD, "overcommit": True},
                    REFERENCE.format(bin=BIN, train=train_args(run_dir, digits_root)), env)
    results = finish(job_id, run_dir, cluster2, "node1")
    split, finite = plan
    assert results["world_size"] == WORLD and results["steps"] == EPOCHS * finite.batches_per_rank, results
    who, batches = read_trace(trace, run_dir, cluster2)
    assert {rank: (w["host"], w["world_size"], w["detected"]) for rank, w in who.items()} == \
        {rank: ("node1", WORLD, ["slurm", rank, WORLD, rank]) for rank in range(WORLD)}, \
        f"{who}\n{plain_logs(run_dir, cluster2)}"
    return {"results": results, "batches": batches, "logs": lambda: plain_logs(run_dir, cluster2)}


# ----------------------------------------------------------------------------------------------- tests

def test_one_node_of_four_reads_each_dealt_sample_once_per_epoch(reference, plan):
    """In each finite epoch the 4 ranks (1 data worker each) read 8 batches of 32: 1,024 different train samples,
    every one the plan deals; the 234 the equal cut leaves out change from epoch to epoch."""
    split, finite = plan
    keys = set()
    for shard in split.filenames:
        with tarfile.open(shard) as tar:
            keys |= {Path(member.name).name.split(".", 1)[0] for member in tar.getmembers()}
    assert len(keys) == split.num_samples
    batches = reference["batches"]
    assert all(len(batches[rank]) == EPOCHS * finite.batches_per_rank for rank in range(WORLD)), reference["logs"]()
    assert all(len(batch) == MICRO_BATCH for rank in range(WORLD) for batch in batches[rank])
    per_epoch = []
    for epoch in range(EPOCHS):
        share = slice(epoch * finite.batches_per_rank, (epoch + 1) * finite.batches_per_rank)
        read = [key for rank in range(WORLD) for batch in batches[rank][share] for key in batch]
        assert len(read) == len(set(read)) == split.num_samples - finite.unused_samples, f"epoch {epoch + 1}"
        assert set(read) <= keys
        per_epoch.append(set(read))
    assert per_epoch[0] != per_epoch[1]  # epochs deal the shards anew


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_two_nodes_of_two_ranks_give_the_reference_losses(launch, reference, cluster2, digits_root, tmp_path):
    options, body, detected = LAUNCHES[launch]
    run_dir, trace = tmp_path / launch, tmp_path / "trace"
    env = job_env(trace)
    if body is None:  # launchers/submit.py --nodes 2 --tasks-per-node 2
        proc = subprocess.run([*SUBMIT, "--config", str(CONFIG), "--nodes", str(NODES), "--gpus-per-node", "0",
                               "--tasks-per-node", str(PER_NODE), "--timeout-min", "5", "--stages", "stage1",
                               "--output-dir", str(tmp_path), "--run-name", launch, f"data.root={digits_root}",
                               *OVERRIDES], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{plain_logs(run_dir, cluster2)}"
        job_id = jobs_of(run_dir)["stage1"]
    else:
        job_id = sbatch(run_dir, options, body.format(bin=BIN, train=train_args(run_dir, digits_root),
                                                      hostfile=run_dir / "slurm" / "hostfile"), env)
    results = finish(job_id, run_dir, cluster2, "node[1-2]")
    logs = lambda: plain_logs(run_dir, cluster2)  # noqa: E731
    assert job_fields(job_id).get("NumNodes") == str(NODES)
    assert results["world_size"] == WORLD, f"{results}\n{logs()}"

    who, batches = read_trace(trace, run_dir, cluster2)
    placed = {rank: (w["host"], w["world_size"], w["detected"]) for rank, w in who.items()}
    assert placed == {rank: (f"node{rank // PER_NODE + 1}", WORLD, [detected, rank, WORLD, rank % PER_NODE])
                      for rank in range(WORLD)}, f"{who}\n{logs()}"  # ranks 0-1 on node1, 2-3 on node2
    assert {w["master"].split(":")[0] for w in who.values()} == {"node1"}, who  # the master by name

    differ = [(rank, k) for rank in range(WORLD) for k, (a, b) in
              enumerate(zip(batches[rank], reference["batches"][rank])) if a != b]
    assert not differ and batches == reference["batches"], \
        f"(rank, batch) read other samples than the reference's: {differ[:10]}\n{logs()}"
    assert losses(results) == losses(reference["results"]), \
        f"{launch}: {losses(results)}\nreference: {losses(reference['results'])}\n{logs()}"  # bitwise
