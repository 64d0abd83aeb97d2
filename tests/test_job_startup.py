"""One start-up path for every program (lacvit_dist.distributed.job): a plain process joins a one-rank job,
gets its device and threads, and leaves nothing behind, so a second job in the same process works (two stages
under submitit's debug executor)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

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
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "two jobs ok" in proc.stdout
