"""The GPU test subset (tools/gpu_check.sh runs it on the lent GPU machine): what only CUDA can break.

- the bf16 contrastive loss on the device against a float64 reference on the CPU;
- a DeepSpeed engine with torch's fused AdamW under ZeRO-2 (bf16), saved and loaded back: the reloaded engine
  then takes exactly the step the original takes (weights AND Adam moments came back);
- a forward on an empty batch under ZeRO-3 (the lock-step evaluation sends those to ranks that ran out);
- the contrast-enlarging feature-cache step under engine.compile (inductor on CUDA) against the eager step, and
  its premise with drop-path and dropout: the compiled recompute draws the compiled cached forward's masks.

Without CUDA the same tests run on the CPU (aot_eager instead of inductor, no fused kernel, gloo): the CPU
suite is their dry run, so that a typo cannot waste device time.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from lacvit_dist.train.engine import build_optimizer, initialize_engine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = ["model.overrides.img_size=16", "model.overrides.patch_size=4", "model.overrides.embed_dim=32",
        "model.overrides.depth=2", "model.overrides.num_heads=2", "model.proj_dim=16", "model.drop_path_rate=0.0"]
CLASSES = 4


@pytest.fixture(scope="module")
def job():
    """One 1-rank process group (NCCL on CUDA, gloo on the CPU) for every test here."""
    from lacvit_dist import distributed as D

    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(D.free_port()))
    try:
        with D.job(DEVICE) as j:
            yield j
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def _engine(overrides: list[str], seed: int = 0):
    from lacvit_dist.config import load_config
    from lacvit_dist.train.objectives import SupConObjective

    cfg = load_config(REPO / "configs" / "demo_digits.yaml", [
        *TINY, f"run.device={DEVICE}", "deepspeed.precision=bf16", "stage1.micro_batch_size=8",
        "stage1.optimizer.warmup_steps=0", *overrides])
    torch.manual_seed(seed)
    task = SupConObjective(cfg, num_classes=CLASSES)
    optimizer, scheduler = build_optimizer(task.model, cfg.stage1, total_steps=10)
    engine = initialize_engine(cfg, cfg.stage1, task.model, optimizer, scheduler, world_size=1)
    task.set_train_mode(engine.module)
    return task, engine


def _batches(engine, micro: int, accum: int, seed: int):
    from tools.bench_train import _synthetic
    from lacvit_dist.train.objectives import engine_dtype

    return _synthetic(micro, accum, 16, CLASSES, engine.device, engine_dtype(engine), seed)


def _step(task, engine, batches) -> dict[str, torch.Tensor]:
    from lacvit_dist.train.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(1)
    stats = task.train_step(engine, batches, guard)
    assert guard.skipped == 0
    return stats


def _params(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def test_bf16_loss_on_device_matches_float64_reference(job):
    from lacvit_dist.train.losses import supcon_loss

    gen = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(256, 2, 128, generator=gen), dim=-1).bfloat16()
    labels = torch.randint(0, 16, (256,), generator=gen)
    ref_x = features.double().requires_grad_(True)  # the same bf16 values: only the arithmetic differs
    ref, _ = supcon_loss(ref_x, labels, 0.1, check_shapes=False)
    ref.backward()
    x = features.to(job.device).requires_grad_(True)
    loss, _ = supcon_loss(x, labels.to(job.device), 0.1, check_shapes=False)
    loss.backward()
    assert torch.isfinite(loss) and x.grad is not None and torch.isfinite(x.grad).all()
    assert abs(loss.item() - ref.item()) / ref.item() < 5e-3
    grad_error = (x.grad.double().cpu() - ref_x.grad).norm() / ref_x.grad.norm()
    assert grad_error < 2e-2, grad_error  # bf16 gradient rounding: 1e-3..1e-2 expected


def test_fused_adamw_zero2_engine_saves_and_loads_back(job, tmp_path):
    overrides = ["deepspeed.zero_stage=2", "stage1.optimizer.name=adamw"]
    task, engine = _engine(overrides)
    assert bool(engine.optimizer.optimizer.defaults.get("fused")) is (DEVICE == "cuda")  # torch's fused CUDA kernel
    _step(task, engine, _batches(engine, 8, 1, seed=1))
    engine.save_checkpoint(str(tmp_path), tag="after1")
    task2, engine2 = _engine(overrides, seed=123)  # other initial weights: the load must overwrite them
    engine2.load_checkpoint(str(tmp_path), tag="after1")
    assert all(torch.equal(a, b) for a, b in zip(_params(engine).values(), _params(engine2).values()))
    # Adam's moments and the step count came back too: the next step is the same on both.
    next_batch = _batches(engine, 8, 1, seed=2)
    _step(task, engine, next_batch)
    _step(task2, engine2, next_batch)
    for (name, a), b in zip(_params(engine).items(), _params(engine2).values()):
        assert torch.equal(a, b), name


def test_feature_cache_step_compiled_matches_eager(job):
    import torch._dynamo

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    overrides = ["stage1.grad_accum_steps=2", "stage1.accumulation=enlarge_contrast", "deepspeed.zero_stage=2"]
    results = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        task, engine = _engine([*overrides, f"deepspeed.compile={str(compiled).lower()}",
                                f"deepspeed.compile_backend={backend}"])
        stats = _step(task, engine, _batches(engine, 8, 2, seed=3))
        results[compiled] = (stats["loss"].item(), _params(engine),
                             torch._dynamo.utils.counters["stats"]["unique_graphs"])
    (eager_loss, eager_params, eager_graphs), (loss, params, graphs) = results[False], results[True]
    assert eager_graphs == 0 and graphs > 0  # the compiled run really went through dynamo
    assert loss == pytest.approx(eager_loss, rel=2e-2)
    for name, p in params.items():
        ref = eager_params[name]
        assert (p - ref).norm() <= 2e-2 * ref.norm() + 1e-6, name


def test_compiled_recompute_draws_the_cached_forwards_masks():
    """The feature cache's premise under torch.compile: with the random state replayed, the compiled forward
    with gradients draws the drop-path and dropout masks of the compiled no-grad forward. Grad mode is a guard,
    so these are two graphs, and inductor generates its own random kernels (aot_eager on the CPU runs torch's)."""
    import torch._dynamo

    from lacvit_dist.config import load_config
    from lacvit_dist.models.factory import build_contrastive_model
    from lacvit_dist.train.feature_cache import capture_rng, replayed_rng

    torch._dynamo.reset()
    torch.manual_seed(0)
    stochastic = [o for o in TINY if not o.startswith("model.drop_path_rate")] + [
        "model.drop_path_rate=0.3", "model.overrides.proj_drop_rate=0.2", "model.overrides.attn_drop_rate=0.2"]
    model = build_contrastive_model(load_config(REPO / "configs" / "demo_digits.yaml", stochastic).model)
    model = torch.compile(model.to(DEVICE).train(), backend="inductor" if DEVICE == "cuda" else "aot_eager")
    views = torch.randn(8, 2, 3, 16, 16, device=DEVICE)
    state = capture_rng(torch.device(DEVICE))
    with torch.no_grad():
        cached = model(views)
    with replayed_rng(state):
        recomputed = model(views)
    with torch.no_grad():
        fresh = model(views)  # other masks: what a replay that failed would look like
    error = ((recomputed.detach() - cached).norm() / cached.norm()).item()
    assert (fresh - cached).norm() / cached.norm() > 0.01  # 0.04 on the CPU (unit-norm projections)
    assert error < 1e-3, error  # fused kernels may round differently, by far less than other masks


# Last: on torch 2.11 a ZeRO-3 engine earlier in the process left a later compiled ZeRO-2 engine's cls_token
# without its update (aot_eager, CPU; not on 2.14.1). Training builds one ZeRO stage per process.
def test_empty_batch_forward_under_zero3(job):
    """What evaluation runs on an empty batch: stage 1's encode (backbone + head), a classifier's forward."""
    from lacvit_dist.train.objectives import CEFineTuneObjective

    task, engine = _engine(["deepspeed.zero_stage=3"])
    baseline = CEFineTuneObjective(task.cfg, num_classes=CLASSES)
    optimizer, scheduler = build_optimizer(baseline.model, task.cfg.baseline, total_steps=10)
    classifier = initialize_engine(task.cfg, task.cfg.baseline, baseline.model, optimizer, scheduler, world_size=1)
    empty = torch.zeros(0, 3, 16, 16, device=engine.device, dtype=torch.bfloat16)
    for model in (engine, classifier):
        model.eval()
    with torch.no_grad():
        out = task.encode(engine.module)(empty)
        logits = classifier(empty)
        views = engine(torch.zeros(0, 2, 3, 16, 16, device=engine.device, dtype=torch.bfloat16))
    assert out["backbone"].shape == (0, 32) and out["projection"].shape == (0, 16)
    assert views.shape == (0, 2, 16)  # the stage-1 model's own forward on no images
    assert logits.shape == (0, CLASSES)
