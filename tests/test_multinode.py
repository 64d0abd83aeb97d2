"""The launcher across a real 2-node SLURM cluster on this one machine (launchers/local_cluster.py --nodes 2: one
network namespace per node on a bridge, slurmctld in the root namespace, one slurmd per namespace with its own
host name and an /etc/hosts naming both nodes), 2 CPU tasks per node, 4 gloo ranks across the two nodes:

* `launchers/submit.py --nodes 2 --tasks-per-node 2`: stage 1 then stage 2 (afterok), both COMPLETED on node[1-2],
  one process group of 4, every test sample counted;
* the text `--dry-run` prints, run as it is: it writes the plain sbatch script (`srun python train.py ...`) and
  submits it; the job completes on both nodes (its ranks find the master, node1, by name through the
  namespace's /etc/hosts), here through a lost node and a requeue;
* `stop` removes daemons, namespaces, veths and bridge, and may be repeated; a start that fails half-way leaves
  nothing behind.

Without SLURM, iproute2/util-linux or root the cluster tests are skipped, except under CI=true where they fail.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO
from test_slurm import (CONFIG, TINY, both_stages_completed, jobs_of, running_cluster, signal_requeue_resume,
                        submit, submit_two_stages, wait_until)

from launchers import local_cluster, status
from launchers.cluster import daemons, netns
from launchers.cluster.state import ClusterError, ClusterState
from lacvit_dist.data.shards import load_info

NODES = 2
RESOURCES = ["--nodes", str(NODES), "--gpus-per-node", "0", "--tasks-per-node", "2", "--timeout-min", "10"]
WORLD = NODES * 2


def _problem() -> str | None:
    missing = local_cluster.missing_binaries(nodes=NODES)
    if missing:
        return f"a {NODES}-node SLURM cluster needs {', '.join(missing)} (run .ci/install_slurm.sh as root)"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root"
    return None


def _skip_or_fail() -> None:
    problem = _problem()
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: {problem}")
        pytest.skip(problem)


def job_fields(job_id: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def wait_for_job(job_id: str, timeout: float, details) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = status.job_states([job_id])[job_id]
        if state["state"] in status.TERMINAL_STATES:
            return state
        time.sleep(1)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f} s\n{details()}")


def _is_slurm_daemon(pid: int) -> bool:
    """A live (not zombie) slurm* process: a daemon the cluster failed to stop."""
    try:
        return daemons.alive(pid) and Path(f"/proc/{pid}/comm").read_text().startswith("slurm")
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    """A 2-node cluster for this module (no accounting: the launcher follows jobs through scontrol)."""
    _skip_or_fail()
    with running_cluster(tmp_path_factory.mktemp("slurm2"), accounting="none", nodes=NODES) as state:
        yield state


@pytest.fixture(scope="module")
def two_stage_run(cluster2, digits_root, tmp_path_factory) -> Path:
    return submit_two_stages(tmp_path_factory.mktemp("multinode_runs"), RESOURCES, digits_root, cluster2)


# ----------------------------------------------------------------------------------------------- tests

def test_network_plan_is_unique_per_cluster():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    a, b = netns.plan("a1b2c3", 3, "host"), netns.plan("d4e5f6", 3, "host")
    names = lambda net: {net["bridge"], *(n[k] for n in net["nodes"] for k in ("netns", "veth", "peer"))}
    assert not names(a) & names(b)
    assert all(len(name) <= 15 for net in (a, b) for name in names(net) if not name.startswith("lacvit-"))  # IFNAMSIZ
    assert [n["name"] for n in a["nodes"]] == ["node1", "node2", "node3"]
    assert a["subnet"].endswith("/24") and a["bridge_addr"] != a["nodes"][0]["addr"]
    assert netns.plan("a1b2c3", 2, "host")["subnet"] == a["subnet"]  # derived from the id


def test_cluster_has_every_node(cluster2):
    assert cluster2.nodes == NODES and cluster2.node_names == ["node1", "node2"]
    text = local_cluster.status(cluster2.dir)
    for node in cluster2.net["nodes"]:
        assert re.search(rf"node {node['name']} \({re.escape(node['addr'])}, {node['netns']}, namespace present\): "
                         rf"slurmd running, idle", text), text
    conf = Path(cluster2.slurm_conf).read_text()
    assert f"SlurmctldHost={cluster2.hostname}({cluster2.net['bridge_addr']})" in conf
    assert "SlurmdParameters=config_overrides" in conf
    hosts = (Path(cluster2.dir) / "hosts").read_text().splitlines()
    assert all(f"{node['addr']} {node['name']}" in hosts for node in cluster2.net["nodes"]), hosts


def test_two_stage_run_across_two_nodes(two_stage_run, digits_root, cluster2):
    run_dir = two_stage_run
    jobs = both_stages_completed(run_dir, cluster2)
    for job_id in jobs.values():
        fields = job_fields(job_id)
        assert fields.get("NumNodes") == str(NODES) and fields.get("NodeList") == "node[1-2]", fields
    entries = json.loads((run_dir / "jobs.json").read_text())["jobs"]
    assert entries[1]["depends_on"] == jobs["stage1"]

    s1 = json.loads((run_dir / "stage1" / "results.json").read_text())
    s2 = json.loads((run_dir / "stage2" / "results.json").read_text())
    assert s1["world_size"] == WORLD and s2["world_size"] == WORLD  # 4 tasks on 2 nodes formed one process group
    assert s2["test"]["samples"] == load_info(digits_root).split("test").num_samples  # every test sample, once
    logs = {p.name for p in (run_dir / "slurm" / jobs["stage1"]).glob("*_log.out")}
    assert logs == {f"{jobs['stage1']}_{rank}_log.out" for rank in range(WORLD)}
    rank3 = (run_dir / "slurm" / jobs["stage1"] / f"{jobs['stage1']}_3_log.out").read_text(errors="replace")
    assert re.search(r"rank 3/4 master node1:\d+", rank3), rank3[-3000:]  # the master by name, not 127.0.0.1


def dry_run(digits_root: Path, out: Path, name: str, *args: str) -> str:
    """The text `submit.py --dry-run` prints for a 2-node x 2-task stage 1 (sbatch scripts + the sbatch calls)."""
    proc = submit("--config", str(CONFIG), *RESOURCES, "--stages", "stage1", "--output-dir", str(out),
                  "--run-name", name, "--dry-run", f"data.root={digits_root}", *TINY, *args, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "#SBATCH --nodes=2" in proc.stdout and "#SBATCH --ntasks-per-node=2" in proc.stdout
    assert re.search(r"\nsrun --unbuffered \S*python\S* \S*train\.py ", proc.stdout), proc.stdout
    return proc.stdout


def plain_logs(run_dir: Path, cluster: ClusterState) -> str:
    logs = sorted(p for p in (run_dir / "slurm").rglob("*") if p.suffix in (".out", ".err"))
    text = "\n".join(f"---- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]) for p in logs)
    return f"{text or '(no job logs)'}\n{local_cluster.daemon_logs(cluster.dir)}\n{local_cluster.status(cluster.dir)}"


def test_signal_on_two_nodes_checkpoints_into_one_folder_requeues_and_resumes(cluster2, digits_root, tmp_path):
    """USR1 to a 2-node job under ZeRO-2: the 4 ranks (2 per node) write their optimizer partitions into one
    checkpoint folder with one `latest` and one completion marker, rank 0 requeues, and the job resumes on both
    nodes with no step lost."""
    run_dir = signal_requeue_resume(cluster2, digits_root, tmp_path, RESOURCES, WORLD, "deepspeed.zero_stage=2")
    checkpoints = run_dir / "stage1" / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    assert (checkpoints / tag / "lacvit_complete.json").is_file()
    partitions = sorted(p.name for p in (checkpoints / tag).glob("*optim_states.pt"))
    assert len(partitions) == WORLD, partitions  # one per rank, from both nodes


def training_pids(netns_name: str, marker: bytes) -> list[int]:
    """The job's task processes (python, their command line holds `marker`; not srun, whose command line holds it
    too) running in one node's namespace."""
    pids = []
    for pid in netns.pids_in(netns_name):
        try:
            proc = Path(f"/proc/{pid}")
            if (proc / "comm").read_text().startswith("python") and marker in (proc / "cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


def submit_job(launch: str, digits_root: Path, out: Path, *args: str) -> tuple[str, Path, Callable[[], str], bytes]:
    """Stage 1 on 2 nodes x 2 ranks through `launch` (submit.py, or the sbatch script its --dry-run prints): the
    job id, the run folder, rank 0's log, and what marks the job's training processes on a node."""
    run_dir = out / launch
    if launch.startswith("submit_py"):
        proc = submit("--config", str(CONFIG), *RESOURCES, "--stages", "stage1", "--output-dir", str(out),
                      "--run-name", launch, "--max-requeues", "2", f"data.root={digits_root}", *TINY, *args,
                      timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        job_id = jobs_of(run_dir)["stage1"]
        logs = lambda: "".join(p.read_text(errors="replace")
                               for p in (run_dir / "slurm" / job_id).glob(f"{job_id}_0_log.*"))
        return job_id, run_dir, logs, b"submitit.core._submit"
    text = dry_run(digits_root, out, launch, "--max-requeues", "2", *args)
    sub = subprocess.run(["bash", "-c", text], cwd=REPO, capture_output=True, text=True, timeout=60)
    match = re.search(r"stage1: job (\d+)", sub.stdout)
    assert sub.returncode == 0 and match, sub.stdout + sub.stderr
    job_id = match.group(1)
    log = run_dir / "slurm" / f"stage1-{job_id}.out"  # every task's output; the trainer logs on rank 0 only
    return job_id, run_dir, lambda: log.read_text(errors="replace") if log.exists() else "", b"train.py"


@pytest.mark.parametrize("launch, killed", [("submit_py", "node2"), ("sbatch_script", "node2"),
                                            ("submit_py_all", "node1 node2")])
def test_a_node_dies_the_job_is_requeued_and_resumes_on_both_nodes(launch, killed, cluster2, digits_root, tmp_path):
    """node2's training processes are killed (SIGKILL) after a checkpoint: the ranks on node1 see the lost peer
    at once (not after run.collective_timeout_s, 600 s here) and leave with 76, the job is requeued (submit.py: by
    one of them, counted against --max-requeues; the printed sbatch script: by its batch shell, srun's exit code
    137), and it resumes from the latest checkpoint on both nodes: it redoes the steps after that checkpoint with
    the losses the killed run logged, logs every step once and completes. With every rank killed (what NCCL's
    watchdog does to the survivors when the collective timeout expires) submit.py's batch shell requeues."""
    steps, every = 200, 40
    job_id, run_dir, rank0, marker = submit_job(launch, digits_root, tmp_path, f"stage1.steps_per_epoch={steps}",
                                                "stage1.log_every_steps=5", f"run.checkpoint_every_steps={every}",
                                                "run.collective_timeout_s=600")
    details = lambda: f"{status.job_states([job_id])[job_id]}\n{plain_logs(run_dir, cluster2)}"
    latest = run_dir / "stage1" / "checkpoints" / "latest"
    logged = lambda: [int(n) for n in re.findall(rf"stage1 epoch \d+ step (\d+)/{steps}", rank0())]

    # killed after a checkpoint and at least 5 logged steps past it
    wait_until(lambda: latest.exists() and max(logged(), default=0) >= int(latest.read_text()[4:]) + 5, 150,
               "a checkpoint and 5 more steps", details)
    checkpoint_step = int(latest.read_text().strip()[4:])
    victims = [pid for node in cluster2.net["nodes"] if node["name"] in killed.split()
               for pid in training_pids(node["netns"], marker)]
    assert len(victims) == 2 * len(killed.split()), f"{killed} run {victims}\n{details()}"
    killed_at = time.time()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)

    wait_until(lambda: int(status.job_states([job_id])[job_id].get("restarts", "0")) >= 1, 90,
               "the job to be requeued", details)
    wait_until(lambda: status.job_states([job_id])[job_id]["state"] in status.TERMINAL_STATES, 240,
               "the requeued job to finish", details)
    assert status.job_states([job_id])[job_id]["state"] == "COMPLETED", details()
    fields = job_fields(job_id)
    assert fields.get("NumNodes") == str(NODES) and fields.get("NodeList") == "node[1-2]", fields
    text = rank0()
    first_run, _, _ = text.partition("resumed from")
    if launch == "submit_py_all":
        outcome = json.loads((run_dir / "slurm" / job_id / "requeue_0.json").read_text())
        assert outcome["requeued"] is True and outcome["rank"] is None, outcome  # the batch shell requeued
        assert "every task of the job step was killed (srun exit code 137)" in outcome["reason"], outcome
        assert json.loads((run_dir / "slurm" / "requeues.json").read_text()) == {"stage1": 1}
    else:
        assert re.search(r"rank [01] lost a peer in a collective \(RuntimeError: .*gloo", first_run), details()
    if launch == "submit_py":
        job_dir = run_dir / "slurm" / job_id
        detected_s = (job_dir / "lost_peer_0.claim").stat().st_mtime - killed_at
        print(f"node2 killed: a surviving rank claimed the requeue after {detected_s:.1f} s")
        assert detected_s < 30, details()  # a reset connection, not the 600 s collective timeout
        outcome = json.loads((job_dir / "requeue_0.json").read_text())
        assert outcome["requeued"] is True and outcome["rank"] in (0, 1), outcome  # a rank on node1 requeued
        assert "a peer rank was lost" in outcome["reason"], outcome
        assert json.loads((run_dir / "slurm" / "requeues.json").read_text()) == {"stage1": 1}

    assert not list((run_dir / "slurm" / job_id).glob("failed_*")), details()  # no rank failed on its own
    match = re.search(rf"resumed from \S+ at step (\d+)/{steps}", text)
    assert match and int(match.group(1)) >= checkpoint_step, details()  # from the latest, not from the start
    resumed_at = int(match.group(1))
    results = json.loads((run_dir / "stage1" / "results.json").read_text())
    assert results["steps"] == steps and results["world_size"] == WORLD
    assert [e["step"] for e in results["train_log"]] == list(range(5, steps + 1, 5)), details()
    # the steps redone after the restart give the losses the killed run had logged (4 significant digits shown)
    before = dict(re.findall(rf"stage1 epoch \d+ step (\d+)/{steps}  loss (\S+)", first_run))
    redone = {e["step"]: f"{e['loss']:.4g}" for e in results["train_log"] if str(e["step"]) in before
              and e["step"] > resumed_at}
    assert len(redone) >= 1, (before, resumed_at)
    assert all(before[str(step)] == loss for step, loss in redone.items()), (before, redone)


def test_failed_start_leaves_nothing(cluster2, tmp_path, monkeypatch):
    """slurmd of node2 fails to start: start() raises, and everything it made is gone (slurmctld, node1's slurmd,
    namespaces, veths, bridge), while the module's cluster keeps running."""
    real = netns.start_slurmd

    def failing(state, node, *args, **kwargs):
        if node["name"] == "node2":
            raise ClusterError("node2 refused (test)")
        return real(state, node, *args, **kwargs)

    monkeypatch.setattr(netns, "start_slurmd", failing)
    directory = tmp_path / "broken"
    with pytest.raises(ClusterError, match="node2 refused"):
        local_cluster.start(directory, accounting="none", timeout=60, nodes=NODES)
    state = ClusterState.load(directory)
    assert state is not None and state.net and state.cluster_id != cluster2.cluster_id
    assert state.net["subnet"] != cluster2.net["subnet"] and state.net["bridge"] != cluster2.net["bridge"]
    assert netns.leftovers(state.net) == []
    assert state.pids == {}
    assert local_cluster.status(cluster2.dir).count("slurmd running, idle") == NODES  # the other cluster is intact


def test_stop_removes_everything_and_is_idempotent(cluster2):
    """Last: stops the module's cluster itself (the fixture's own stop is then a no-op)."""
    pids = dict(cluster2.pids)
    local_cluster.stop(cluster2.dir)
    state = ClusterState.load(cluster2.dir)
    assert netns.leftovers(state.net) == [], netns.leftovers(state.net)
    assert state.pids == {} and not any(_is_slurm_daemon(pid) for pid in pids.values()), pids
    local_cluster.stop(cluster2.dir)  # again: nothing left to do, no error
    assert "NOT running" in local_cluster.status(cluster2.dir)
