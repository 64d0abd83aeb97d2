"""Who a process is in the job, from its environment alone (lacvit_dist.distributed.detect_world): SLURM only
inside a job step, torchrun's and the deepspeed launcher's variables only when they started the process, node
lists parsed without scontrol, and a rendezvous port that differs across requeues and between jobs."""
import itertools

import pytest

from lacvit_dist.distributed import detect_world, slurm_hostnames, slurm_master_port

STEP = {"SLURM_JOB_ID": "4321", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[01-02]-ib", "SLURM_STEP_NODELIST": "node[01-02]-ib",
        "SLURM_JOB_NUM_NODES": "2"}
LEAKED = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "login1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("nodelist, hosts", [
    ("a,b[1-3]", ["a", "b1", "b2", "b3"]),
    ("node[01-03]-ib", ["node01-ib", "node02-ib", "node03-ib"]),
    ("rack[1-2]-n[01-04]", [f"rack{r}-n0{n}" for r in (1, 2) for n in range(1, 5)]),
    ("gpu[003-005,010],cpu7", ["gpu003", "gpu004", "gpu005", "gpu010", "cpu7"]),
    ("solo", ["solo"]),
])
def test_node_lists_parse_without_scontrol(nodelist, hosts, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol to ask
    assert slurm_hostnames(nodelist) == hosts


def test_a_job_step_takes_its_ranks_from_slurm_even_with_leaked_launcher_variables():
    for env in (STEP, {**STEP, **LEAKED}):
        world = detect_world(env)
        assert (world.rank, world.world_size, world.local_rank, world.launcher) == (3, 4, 1, "slurm")
        assert world.master_addr == "node01-ib" and world.master_port == slurm_master_port(STEP)


def test_one_node_step_rendezvous_on_loopback():
    world = detect_world({**STEP, "SLURM_STEP_NODELIST": "gpu7", "SLURM_JOB_NODELIST": "gpu7"})
    assert world.master_addr == "127.0.0.1" and world.launcher == "slurm"


def test_the_batch_shell_of_a_multi_task_job_is_a_one_process_world():
    batch = {k: v for k, v in STEP.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NODELIST")}
    batch.update(SLURM_PROCID="0", SLURM_LOCALID="0")
    for env in (batch, {**batch, **LEAKED, "RANK": "1", "WORLD_SIZE": "2"}):
        world = detect_world(env)
        assert (world.rank, world.world_size, world.launcher) == (0, 1, "single")


@pytest.mark.parametrize("marker", [{"TORCHELASTIC_RUN_ID": "none"}, {"CROSS_RANK": "1", "LOCAL_SIZE": "2"}])
def test_torchrun_or_deepspeed_launcher_inside_a_step_wins(marker):
    mine = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node01-ib", "MASTER_PORT": "29600"}
    world = detect_world({**STEP, **marker, **mine})
    assert (world.rank, world.world_size, world.local_rank, world.master_port, world.launcher) == (5, 8, 1, 29600, "env")


def test_variables_of_another_starter_outside_slurm():
    world = detect_world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": "29501"})
    assert (world.rank, world.world_size, world.master_port, world.launcher) == (1, 2, 29501, "env")
    assert detect_world({}).launcher == "single"


def test_master_port_differs_across_requeues_and_between_jobs_and_is_shared_by_all_tasks():
    def port(job: int, restarts: int, procid: int = 0) -> int:
        return detect_world({**STEP, "SLURM_JOB_ID": str(job), "SLURM_RESTART_COUNT": str(restarts),
                             "SLURM_PROCID": str(procid)}).master_port

    requeues = [port(4321, r) for r in range(50)]
    assert len(set(requeues)) == 50 and all(20000 <= p < 40000 for p in requeues)
    jobs = [port(j, 0) for j in range(100000, 100500)]  # jobs submitted close together may share a node
    assert len(set(jobs)) == 500
    assert len({port(4321, 2, procid) for procid in range(4)}) == 1
    assert all(port(a, 0) != port(b, 1) for a, b in itertools.product(range(5000, 5010), repeat=2))
