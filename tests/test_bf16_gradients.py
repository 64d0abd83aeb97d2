"""Under bf16, gradients are reduced across ranks and summed over micro-batches in fp32 by default
(deepspeed.grad_reduce_dtype / grad_accum_dtype): the update equals the fp32 sum of the very bf16 micro-batch
gradients each rank computes, to fp32 rounding. DeepSpeed's own default (bf16 sums, "model") misses that by
orders of magnitude, which shows the test can tell them apart."""
import pytest
from dist_helpers import run_in_processes

ACCUM, MICRO, FEATURES, CLASSES = 16, 4, 64, 10


def _updates(rank, world_size, runs):
    from lacvit_dist.distributed import detect_world, init_distributed

    init_distributed(detect_world(), "gloo")
    return [_one_step(rank, world_size, *run) for run in runs]


def _one_step(rank, world_size, zero_stage, dtypes):
    import copy

    import deepspeed
    import torch
    import torch.nn.functional as F
    from deepspeed.utils import safe_get_full_fp32_param

    from lacvit_dist.config import load_config
    from lacvit_dist.train.engine import deepspeed_config, gradient_dtypes

    cfg = load_config(None, ["run.device=cpu", "deepspeed.precision=bf16", f"deepspeed.zero_stage={zero_stage}",
                             "deepspeed.gradient_clipping=0.0", f"stage1.grad_accum_steps={ACCUM}",
                             f"stage1.micro_batch_size={MICRO}", f"deepspeed.grad_reduce_dtype={dtypes}",
                             f"deepspeed.grad_accum_dtype={dtypes}"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, FEATURES), torch.nn.GELU(),
                                torch.nn.Linear(FEATURES, CLASSES))
    reference = copy.deepcopy(model).bfloat16()  # what the engine computes with: the same bf16 weights
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=deepspeed_config(cfg, cfg.stage1, world_size), dist_init_required=False)
    gen = torch.Generator().manual_seed(10 + rank)
    batches = [(torch.randn(MICRO, FEATURES, generator=gen).bfloat16(),
                torch.randint(0, CLASSES, (MICRO,), generator=gen)) for _ in range(ACCUM)]

    exact = [torch.zeros(p.shape, dtype=torch.float64) for p in reference.parameters()]
    for x, y in batches:  # each micro-batch's bf16 gradient (of loss / ACCUM, as DeepSpeed scales it), summed in fp64
        reference.zero_grad()
        (F.cross_entropy(reference(x).float(), y) / ACCUM).backward()
        for total, p in zip(exact, reference.parameters()):
            total += p.grad.double()
    for total in exact:
        torch.distributed.all_reduce(total)
        total /= world_size

    before = [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]
    for x, y in batches:
        engine.backward(F.cross_entropy(engine(x).float(), y))
        engine.step()
    assert engine.global_steps == 1
    # SGD with lr 1: the fp32 master weights moved by exactly the reduced, accumulated gradient.
    update = [(b - safe_get_full_fp32_param(p)).double() for b, p in zip(before, engine.module.parameters())]
    error = max(float((u - e).abs().max() / e.abs().max()) for u, e in zip(update, exact))
    return error, gradient_dtypes(engine)


@pytest.fixture(scope="module")
def errors():
    runs = [(zero, dtypes) for zero in (1, 2, 3) for dtypes in ("fp32", "model")]
    per_rank = run_in_processes(_updates, 2, runs, timeout=300)
    return {run: per_rank[0][i] for i, run in enumerate(runs)}


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_bf16_gradients_are_reduced_and_accumulated_in_fp32(errors, zero_stage):
    error, summary = errors[zero_stage, "fp32"]
    assert summary == "gradients reduced in fp32, accumulated in fp32"
    assert error < 1e-5


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_bf16_sums_would_miss_that_tolerance(errors, zero_stage):
    error, summary = errors[zero_stage, "model"]
    assert summary == "gradients reduced in bf16, accumulated in bf16"
    assert error > 1e-4
