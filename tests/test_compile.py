"""deepspeed.compile: the stage-1 step through torch.compile (DeepSpeed's engine.compile) trains the same
model as the eager step. Backend aot_eager captures the forward and backward graphs without generating code,
which keeps the test fast on CPU; inductor (the default) is for GPUs."""
import pytest
from dist_helpers import run_in_processes

from conftest import REPO


def _stage1_losses(rank, world_size, data_root, out_dir):
    import torch._dynamo

    from lacvit_dist.cli import run
    from lacvit_dist.config import load_config
    from lacvit_dist.distributed import detect_world, init_distributed

    init_distributed(detect_world(), "gloo")
    out = {}
    for compiled in (False, True):
        torch._dynamo.utils.counters.clear()
        cfg = load_config(REPO / "configs" / "demo_digits.yaml", [
            f"data.root={data_root}", f"run.output_dir={out_dir}", f"run.name=compile{compiled}",
            "run.stages=[stage1]", "model.overrides.embed_dim=32", "model.overrides.depth=1",
            "model.overrides.num_heads=2", "model.proj_dim=16", "data.num_workers=0", "data.shuffle_buffer=50",
            "stage1.epochs=1", "stage1.steps_per_epoch=4", "stage1.micro_batch_size=16", "stage1.log_every_steps=1",
            f"deepspeed.compile={str(compiled).lower()}", "deepspeed.compile_backend=aot_eager"])
        log = run(cfg)["stage1"]["train_log"]
        out[compiled] = {"losses": [entry["loss"] for entry in log],
                         "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}
    return out


def test_compiled_step_trains_like_eager(digits_root, tmp_path):
    (runs,) = run_in_processes(_stage1_losses, 1, str(digits_root), str(tmp_path), timeout=400)
    assert runs[False]["graphs"] == 0 and runs[True]["graphs"] > 0  # the compiled run really went through dynamo
    assert len(runs[True]["losses"]) == 4
    assert runs[True]["losses"] == pytest.approx(runs[False]["losses"], abs=1e-4)
