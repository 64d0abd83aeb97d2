"""SupConLoss against a naive single-process reference on the concatenated global batch.

Distributed runs use 2 and 3 gloo processes (one spawn per world size runs every case; the parent compares).
The reference lives here, not in the package: explicit loops over anchors, fp64, the full global matrix.
"""
from __future__ import annotations

import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_helpers import run_in_processes

from lacvit_dist.train.losses import SupConLoss, supcon_loss

BATCH, DIM, DIN = 4, 8, 6  # per-rank images, projection dim, input dim of the shared Linear
T = 0.1
BF16_U, FP16_U = 2.0 ** -8, 2.0 ** -11  # unit roundoff (8 and 11 significant bits)


# ----------------------------------------------------------------------------------------------------------
# Naive reference (single process, full global matrix, loops). Mutation hooks model plausible bugs.
# ----------------------------------------------------------------------------------------------------------
def reference(z, labels, t=T, bt=None, *, world=1, self_index=None, reduction="global"):
    """z: [N, d] global views in gathered order (rank-major, then image, then view); labels: [N].

    self_index(i, n_local) -> the column excluded as "self" for anchor i (default i); reduction:
    "global" (correct: mean over all valid anchors), "per_rank" (mean over each rank's valid anchors, then
    mean over ranks), "all_anchors" (anchors without positive counted as 0 in the mean).
    """
    N = z.shape[0]
    n = N // world
    scale = 1.0 if bt is None else t / bt
    terms, n_pos_total, without = [[] for _ in range(world)], 0, 0
    for i in range(N):
        s = i if self_index is None else self_index(i, n)
        others = [a for a in range(N) if a != s]
        logits = z[others] @ z[i] / t  # one anchor's row of the full global matrix
        log_den = torch.logsumexp(logits, dim=0)
        pos = [k for k, a in enumerate(others) if int(labels[a]) == int(labels[i])]
        n_pos_total += len(pos)
        if not pos:
            without += 1
            continue
        terms[i // n].append(-scale * (logits[pos] - log_den).mean())
    flat = [x for r in terms for x in r]
    zero = z.sum() * 0
    if reduction == "global":
        loss = torch.stack(flat).sum() / len(flat) if flat else zero
    elif reduction == "per_rank":
        loss = torch.stack([torch.stack(r).mean() if r else zero for r in terms]).mean()
    elif reduction == "all_anchors":
        loss = torch.stack(flat).sum() / N
    else:
        raise ValueError(reduction)
    stats = {"anchors_without_positive": float(without), "positives_per_anchor": n_pos_total / N,
             "contrast_size": float(N - 1)}
    return loss, stats


MUTANTS = {
    "self column one to the right": dict(self_index=lambda i, n: i + 1),
    "self column one to the left": dict(self_index=lambda i, n: i - 1),
    "self offset ignores rank": dict(self_index=lambda i, n: i % n),
    "self offset counts images not views": dict(self_index=lambda i, n: (i // n) * BATCH + i % n),
    "denominator counts self": dict(self_index=lambda i, n: -1),
    "mean per rank": dict(reduction="per_rank"),
    "anchors without positive in the mean": dict(reduction="all_anchors"),
}


# ----------------------------------------------------------------------------------------------------------
# Cases: label patterns, shared across world sizes.
# ----------------------------------------------------------------------------------------------------------
def make_labels(pattern: str, world: int) -> tuple[torch.Tensor, int]:
    """(global labels [world * BATCH], views)."""
    g = torch.Generator().manual_seed(100 + world)
    N = world * BATCH
    if pattern == "one_class":
        return torch.zeros(N, dtype=torch.int64), 2
    if pattern == "distinct":  # the only positive is the image's other view
        return torch.randperm(N, generator=g) * 7 + 3, 2
    if pattern == "imbalanced":  # a large class, a small one, a singleton image
        base = torch.tensor([5] * (N - 4) + [2, 2, 2, 9])
        return base[torch.randperm(N, generator=g)], 2
    if pattern == "rank_local_classes":  # every class lives on one rank only
        return torch.tensor([100 * r + b % 2 for r in range(world) for b in range(BATCH)]), 2
    if pattern == "views1_missing":
        # One view: singletons have no positive. Cross-rank pairs/triples, an in-rank pair, and a different
        # number of valid anchors on each rank (so a per-rank mean would differ from the global mean).
        per_rank = {2: [[0, 1, 7, 8], [0, 1, 5, 5]],
                    3: [[0, 1, 7, 8], [0, 5, 5, 9], [1, 0, 10, 11]]}[world]
        return torch.tensor([x for r in per_rank for x in r]), 1
    raise ValueError(pattern)


PATTERNS = ["one_class", "distinct", "imbalanced", "rank_local_classes", "views1_missing"]


def make_case(pattern: str, world: int, dtype: torch.dtype, *, t=T, bt=None, seed=0) -> dict:
    labels, views = make_labels(pattern, world)
    g = torch.Generator().manual_seed(seed + 17 * world)
    N = world * BATCH
    feats = F.normalize(torch.randn(N, views, DIM, generator=g, dtype=torch.float64), dim=-1)
    inputs = torch.randn(N, views, DIN, generator=g, dtype=torch.float64)
    lin_w = torch.randn(DIM, DIN, generator=g, dtype=torch.float64) / math.sqrt(DIN)
    lin_b = torch.randn(DIM, generator=g, dtype=torch.float64) * 0.1
    return dict(pattern=pattern, dtype=dtype, labels=labels, views=views, feats=feats.to(dtype), inputs=inputs,
                lin_w=lin_w, lin_b=lin_b, t=t, bt=bt, linear=dtype in (torch.float64, torch.float32))


def build_cases(world: int) -> list[dict]:
    cases = [make_case(p, world, dt) for p in PATTERNS for dt in (torch.float64, torch.float32)]
    cases += [make_case(p, world, dt) for p in ("imbalanced", "views1_missing")
              for dt in (torch.bfloat16, torch.float16)]
    cases += [make_case("imbalanced", world, torch.float64, t=0.5, bt=0.07, seed=1)]
    return cases


# ----------------------------------------------------------------------------------------------------------
# Child side (module level: spawned processes import it by name).
# ----------------------------------------------------------------------------------------------------------
def _run_case(rank: int, world: int, case: dict) -> dict:
    sl = slice(rank * BATCH, (rank + 1) * BATCH)
    labels, dtype = case["labels"][sl], case["dtype"]
    loss_fn = SupConLoss(case["t"], case["bt"])
    out = {}
    # (a) Leaf features: the gradient on rank r's own slice after ITS backward is world * dL/dx_r.
    f = case["feats"][sl].clone().requires_grad_()
    loss, stats = loss_fn(f, labels)
    loss.backward()
    out.update(loss=loss.detach().double(), loss_dtype=loss.dtype, grad=f.grad.double(), grad_dtype=f.grad.dtype,
               stats={k: v.double() for k, v in stats.items()},
               stats_detached=all(not v.requires_grad for v in stats.values()),
               finite=bool(torch.isfinite(loss)) and bool(torch.isfinite(f.grad).all()))
    # Same call again: deterministic, bit for bit.
    loss2, _ = loss_fn(case["feats"][sl].clone(), labels)
    out["deterministic"] = bool(torch.equal(loss2.detach(), loss.detach()))
    if case["linear"]:
        # (b) A shared Linear (same init on every rank) + normalise; average the parameter gradients over ranks
        # exactly as DDP / DeepSpeed do, and compare with the single-process gradient of the global loss.
        lin = torch.nn.Linear(DIN, DIM, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(case["lin_w"])
            lin.bias.copy_(case["lin_b"])
        z = F.normalize(lin(case["inputs"][sl].to(dtype)), dim=-1)
        loss_lin, _ = loss_fn(z, labels)
        loss_lin.backward()
        grads = []
        for p in (lin.weight, lin.bias):
            g = p.grad.clone()
            dist.all_reduce(g)
            grads.append((g / world).double())
        out["lin_grads"] = grads
    return out


def _worker_all_cases(rank: int, world: int, cases: list[dict]) -> dict:
    results = [_run_case(rank, world, c) for c in cases]
    # Ranks with different local batches: every rank raises the same clear error (after the same collective,
    # so the process group stays usable).
    f = F.normalize(torch.randn(4 if rank == 0 else 3, 2, DIM), dim=-1)
    try:
        SupConLoss()(f, torch.zeros(f.shape[0], dtype=torch.int64))
        uneven_error = None
    except ValueError as exc:
        uneven_error = str(exc)
    if world != 2:  # DDP's first construction costs seconds of imports; once is enough
        return {"cases": results, "uneven_error": uneven_error}
    # (c) The real thing: torch DDP (gloo) averaging the gradients of a shared Linear.
    case = cases[[c["pattern"] for c in cases].index("imbalanced")]
    sl = slice(rank * BATCH, (rank + 1) * BATCH)
    lin = torch.nn.Linear(DIN, DIM, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(case["lin_w"])
        lin.bias.copy_(case["lin_b"])
    ddp = torch.nn.parallel.DistributedDataParallel(lin)
    z = F.normalize(ddp(case["inputs"][sl]), dim=-1)
    loss, _ = SupConLoss(T)(z, case["labels"][sl])
    loss.backward()
    ddp_grads = [lin.weight.grad.clone(), lin.bias.grad.clone()]
    return {"cases": results, "uneven_error": uneven_error, "ddp_grads": ddp_grads}


def _worker_raises(rank: int, world: int) -> None:
    if rank == 1:
        raise KeyError("boom from rank 1")
    dist.barrier()  # rank 0 waits on a peer that died: the parent must not hang on it


def _worker_hangs(rank: int, world: int) -> None:
    time.sleep(3600)


# ----------------------------------------------------------------------------------------------------------
# Parent side.
# ----------------------------------------------------------------------------------------------------------
def _global(x: torch.Tensor) -> torch.Tensor:
    """[N_images, views, d] -> [N_images * views, d] in the gathered order."""
    return x.reshape(-1, x.shape[-1])


def reference_for(case: dict, world: int, **mutant):
    """(loss, grad w.r.t. the features [N, V, D], stats, (grad W, grad b) of the Linear check)."""
    feats = case["feats"].double().clone().requires_grad_()  # the (rounded) features the children used
    labels = case["labels"].repeat_interleave(case["views"])
    loss, stats = reference(_global(feats), labels, case["t"], case["bt"], world=world, **mutant)
    (grad,) = torch.autograd.grad(loss, feats)
    w, b = case["lin_w"].clone().requires_grad_(), case["lin_b"].clone().requires_grad_()
    z = F.normalize(case["inputs"] @ w.T + b, dim=-1)
    loss_lin, _ = reference(_global(z), labels, case["t"], case["bt"], world=world, **mutant)
    lin_grads = torch.autograd.grad(loss_lin, (w, b))
    return loss.detach(), grad, stats, lin_grads


def tolerance(dtype: torch.dtype) -> float:
    # fp64 in -> fp64 compute; fp32 in -> fp32 compute; bf16/fp16 in -> fp32 compute on the rounded inputs.
    return 1e-9 if dtype == torch.float64 else 2e-5


def _case_id(c: dict) -> str:
    s = f"{c['pattern']}-{str(c['dtype']).replace('torch.', '')}"
    return s + (f"-t{c['t']}-bt{c['bt']}" if c["bt"] is not None else "")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def dist_run(request):
    world = request.param
    cases = build_cases(world)
    t0 = time.monotonic()
    out = run_in_processes(_worker_all_cases, world, cases, timeout=120)
    return world, cases, out, time.monotonic() - t0


def test_matches_reference_value_grads_and_stats(dist_run):
    world, cases, out, _ = dist_run
    for i, case in enumerate(cases):
        cid = _case_id(case)
        tol = tolerance(case["dtype"])
        ref_loss, ref_grad, ref_stats, ref_lin = reference_for(case, world)
        per_rank = [out[r]["cases"][i] for r in range(world)]
        for r, res in enumerate(per_rank):
            assert res["finite"], cid
            assert res["stats_detached"], cid
            assert res["deterministic"], cid
            assert res["loss_dtype"] == (torch.float64 if case["dtype"] == torch.float64 else torch.float32), cid
            assert res["grad_dtype"] == case["dtype"], cid
            # the logged global loss equals the reference on every rank
            torch.testing.assert_close(res["stats"]["loss"], ref_loss, atol=tol, rtol=tol, msg=cid)
            for k, v in ref_stats.items():
                assert float(res["stats"][k]) == pytest.approx(v, rel=1e-6), (cid, k)
            # gradient on rank r's own slice = world * dL_global/dx_r
            g_ref = world * ref_grad[r * BATCH:(r + 1) * BATCH]
            gtol = tol if case["dtype"] in (torch.float64, torch.float32) else None
            if gtol is None:  # bf16/fp16 gradient: fp32 value rounded once to the input dtype (relative u)
                u = BF16_U if case["dtype"] == torch.bfloat16 else FP16_U
                torch.testing.assert_close(res["grad"], g_ref, atol=2 * u * float(g_ref.abs().max()) + 1e-6,
                                           rtol=2 * u, msg=cid)
            else:
                torch.testing.assert_close(res["grad"], g_ref, atol=tol, rtol=tol, msg=cid)
            if case["linear"]:
                for got, want in zip(res["lin_grads"], ref_lin):
                    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=cid)
        # the mean of the per-rank returned losses is the global loss
        mean_loss = torch.stack([res["loss"] for res in per_rank]).mean()
        torch.testing.assert_close(mean_loss, ref_loss, atol=tol, rtol=tol, msg=cid)


def test_ddp_averaged_gradients_match_single_process(dist_run):
    world, cases, out, _ = dist_run
    if "ddp_grads" not in out[0]:
        pytest.skip("DDP is exercised in the 2-process run only (start-up cost)")
    case = cases[[c["pattern"] for c in cases].index("imbalanced")]
    _, _, _, ref_lin = reference_for(case, world)
    for r in range(world):
        for got, want in zip(out[r]["ddp_grads"], ref_lin):
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_views1_anchors_without_positive_are_excluded_and_counted(dist_run):
    world, cases, out, _ = dist_run
    i = next(k for k, c in enumerate(cases) if c["pattern"] == "views1_missing" and c["dtype"] == torch.float64)
    stats = out[0]["cases"][i]["stats"]
    _, ref_stats = reference(_global(cases[i]["feats"]), cases[i]["labels"], world=world)
    assert float(stats["anchors_without_positive"]) == ref_stats["anchors_without_positive"] > 0
    assert float(stats["contrast_size"]) == world * BATCH - 1
    assert all(out[r]["cases"][i]["finite"] for r in range(world))


def test_mutants_would_be_detected(dist_run):
    """Each plausible bug changes the loss or the gradients far beyond the tolerance on some case of the suite
    (so an implementation with that bug fails the test above): the label patterns are sensitive by design."""
    world, cases, _, _ = dist_run
    fp64 = [c for c in cases if c["dtype"] == torch.float64]
    correct = [reference_for(c, world) for c in fp64]
    missed = []
    for name, mutant in MUTANTS.items():
        for case, (loss, grad, _, lin) in zip(fp64, correct):
            m_loss, m_grad, _, m_lin = reference_for(case, world, **mutant)
            gap = max(float((loss - m_loss).abs()), float((grad - m_grad).abs().max()),
                      *(float((a - b).abs().max()) for a, b in zip(lin, m_lin)))
            if gap > 1e-3:  # >= 1e6 x the fp64 tolerance of the comparison above
                break
        else:
            missed.append(name)
    assert not missed, f"the label patterns cannot see these bugs: {missed}"


def test_temperature_and_base_temperature_scaling(dist_run):
    world, cases, out, _ = dist_run
    i = next(k for k, c in enumerate(cases) if c["bt"] is not None)
    case = cases[i]
    labels = case["labels"].repeat_interleave(case["views"])
    plain, _ = reference(_global(case["feats"]), labels, t=case["t"], world=world)
    want = plain * case["t"] / case["bt"]
    torch.testing.assert_close(out[0]["cases"][i]["stats"]["loss"], want, atol=1e-9, rtol=1e-9)


def test_world_size_one_without_process_group():
    assert not dist.is_initialized()
    for pattern in PATTERNS:
        case = make_case(pattern, 2, torch.float64)  # a "global" batch of 8 images in one process
        f = case["feats"].clone().requires_grad_()
        loss, stats = SupConLoss(T)(f, case["labels"])
        loss.backward()
        ref_loss, ref_grad, ref_stats, _ = reference_for(case, 1)
        torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(f.grad, ref_grad, atol=1e-10, rtol=1e-10)
        for k, v in ref_stats.items():
            assert float(stats[k]) == pytest.approx(v)


def test_closed_form_two_orthogonal_classes():
    """Two images, two identical views each, orthogonal across images: every anchor has one positive with
    dot 1 and two negatives with dot 0, so L = log(e^{1/t} + 2) - 1/t = log(1 + 2 e^{-1/t})."""
    for t, bt in ((0.1, None), (0.5, None), (0.1, 0.07)):
        z = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
        want = math.log(1 + 2 * math.exp(-1 / t)) * (1.0 if bt is None else t / bt)
        loss, _ = supcon_loss(z, torch.tensor([0, 1]), t, bt)
        ref, _ = reference(_global(z), torch.tensor([0, 0, 1, 1]), t, bt)
        assert float(loss) == pytest.approx(want, rel=1e-12)
        assert float(ref) == pytest.approx(want, rel=1e-12)


def test_low_precision_inputs_close_to_fp32():
    """bf16/fp16 features: finite, fp32 loss, close to the fp32 loss of the unrounded features.

    Bound: rounding gives |dz| <= u |z| (u = 2^-8 bf16, 2^-11 fp16), so each logit z_i.z_a/t moves by at most
    ~2u/t; a log-probability (logit minus a log-sum-exp, which is 1-Lipschitz in the max norm) by at most
    4u/t, and so does their mean: |L_lowp - L_fp32| <= 4u/t (0.156 for bf16, 0.0195 for fp16 at t = 0.1).
    """
    g = torch.Generator().manual_seed(3)
    f32 = F.normalize(torch.randn(64, 2, 128, generator=g), dim=-1)
    labels = torch.randint(0, 10, (64,), generator=g)
    ref32, _ = supcon_loss(f32, labels)
    for dtype, u in ((torch.bfloat16, BF16_U), (torch.float16, FP16_U)):
        f = f32.to(dtype).requires_grad_()
        loss, stats = supcon_loss(f, labels)
        loss.backward()
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss) and torch.isfinite(f.grad).all()
        assert abs(float(loss.detach()) - float(ref32)) <= 4 * u / T
        # the compute itself is fp32: equal to fp32 on the rounded inputs
        same, _ = supcon_loss(f.detach().float(), labels)
        torch.testing.assert_close(loss.detach(), same, atol=1e-6, rtol=1e-6)
    # Under autocast the logits and log-sum-exp still run in fp32 (a low-precision sum of up to 127 terms of
    # e^10 would overflow fp16's 65504): same value as without autocast.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ac, _ = supcon_loss(f32, labels)
    assert loss_ac.dtype == torch.float32
    torch.testing.assert_close(loss_ac, ref32, atol=1e-6, rtol=1e-6)


def test_uneven_local_batch_is_a_clear_error_in_every_rank(dist_run):
    world, _, out, _ = dist_run
    shapes = ", ".join(f"rank {r}: ({4 if r == 0 else 3}, 2, {DIM})" for r in range(world))
    for r in range(world):
        assert out[r]["uneven_error"] is not None and "same local [batch, views, dim]" in out[r]["uneven_error"]
        assert shapes in out[r]["uneven_error"]


def test_helper_reraises_child_exception_with_traceback():
    with pytest.raises(KeyError, match="boom from rank 1") as info:
        run_in_processes(_worker_raises, 2, timeout=60)
    assert "_worker_raises" in str(info.value.__cause__)  # the child's traceback text


def test_helper_kills_hung_children():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0, 1\] did not finish"):
        run_in_processes(_worker_hangs, 2, timeout=5)
    assert time.monotonic() - t0 < 15


def test_bad_arguments():
    f = F.normalize(torch.randn(4, 2, DIM), dim=-1)
    with pytest.raises(ValueError, match="labels has 3"):
        supcon_loss(f, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="integers"):
        supcon_loss(f, torch.zeros(4))
    with pytest.raises(ValueError, match="temperatures"):
        SupConLoss(temperature=0.0)
    loss, stats = supcon_loss(f[:1, :1], torch.zeros(1, dtype=torch.int64))  # a single view: 0, no NaN
    assert float(loss) == 0.0 and float(stats["anchors_without_positive"]) == 1.0
