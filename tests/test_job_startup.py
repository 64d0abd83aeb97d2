"""One start-up path for every program (lacvit_dist.distributed.job): a plain process joins a one-rank job,
gets its device and threads, and leaves nothing behind, so a second job in the same process works (two stages
under submitit's debug executor)."""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, pythonpath

SCRIPT = textwrap.dedent("""
    import deepspeed, torch
    from lacvit_dist.distributed import job

    for attempt in range(2):
        with job(device="cpu", seed=7) as started:
            assert started.world.world_size == 1 and started.device == torch.device("cpu")
            assert started.backend == "gloo" and torch.distributed.is_initialized()
            assert torch.initial_seed() == 7
            model = torch.nn.Linear(4, 2)
            engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                              config={"train_micro_batch_size_per_gpu": 2,
                                                      "zero_optimization": {"stage": 2},
                                                      "zero_allow_untested_optimizer": True}, dist_init_required=False)
            engine.backward(engine(torch.randn(2, 4)).sum())
            engine.step()
        assert not torch.distributed.is_initialized()
    print("two jobs ok")
""")


def test_two_jobs_in_one_process():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(PYTHONPATH=pythonpath(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "two jobs ok" in proc.stdout


PEER = textwrap.dedent("""
    import os, sys, time, torch
    from deepspeed.utils import groups
    from lacvit_dist.distributed import job

    rank, mode, on = int(os.environ["RANK"]), sys.argv[1], sys.argv[2]
    with job(device="cpu", timeout_s=4) as started:
        # the world group, or the clone DeepSpeed makes for ZeRO and gradient clipping
        group = groups._get_data_parallel_group() if on == "deepspeed" else None
        torch.distributed.all_reduce(torch.ones(8), group=group)  # both ranks are up
        if rank == 1:
            if mode == "dies":
                os._exit(1)
            time.sleep(60)  # hung, or its node's link is down: it never answers
        began = time.monotonic()
        try:
            torch.distributed.all_reduce(torch.ones(8), group=group)
        except Exception as err:  # noqa: BLE001
            print(f"peer lost after {time.monotonic() - began:.1f} s: {type(err).__name__}", flush=True)
            os._exit(3)
""")


@pytest.mark.parametrize("group", ["world", "deepspeed"])
def test_a_lost_peer_stops_the_waiting_rank_within_the_collective_timeout(group):
    """A rank whose peer died is told at once; one whose peer hangs (or is cut off) raises after timeout_s
    (run.collective_timeout_s) instead of waiting in the collective for ever: on the world group and on the
    group DeepSpeed's own collectives use (ZeRO, gradient clipping)."""
    from dist_helpers import free_port

    for mode, bound in (("dies", 3.0), ("hangs", 4.0 + 3.0)):
        env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        peers = [subprocess.Popen([sys.executable, "-c", PEER, mode, group], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        try:
            out, err = peers[0].communicate(timeout=120)
        finally:
            for p in peers:
                p.kill()
        assert peers[0].returncode == 3, f"{mode}: {out}\n{err[-2000:]}"
        seconds = float(out.split("peer lost after ")[1].split()[0])
        assert seconds <= bound, f"{mode}: the waiting rank stopped after {seconds} s"
        if mode == "hangs":
            assert seconds >= 3.5  # the configured timeout, not an earlier error


def test_lost_peer_errors_are_told_from_program_errors():
    """What the trainer leaves with code 76 (a requeue) on, and what it lets fail: gloo's errors for a dead and
    a hung peer (the texts measured above), torch's DistError family, and either one as the cause of another
    exception; not a bug of this rank's own."""
    import torch.distributed as dist

    from lacvit_dist.distributed import is_lost_peer

    dead = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [10.0.0.3]:8592: Connection reset by peer.")
    hung = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms for recv operation")
    wrapped = ValueError("while saving")
    wrapped.__cause__ = hung
    for err in (dead, hung, dist.DistBackendError("NCCL communicator was aborted"), dist.DistNetworkError("x"),
                wrapped):
        assert is_lost_peer(err), err
    for err in (ValueError("bad shape"), RuntimeError("CUDA out of memory"), KeyError("label")):
        assert not is_lost_peer(err), err
