"""Stop signals agreed by every rank, and non-finite steps skipped on every rank together, inside a real
DeepSpeed engine (2 gloo ranks, ZeRO 0 and 2, with and without gradient accumulation)."""
import os
import signal

import numpy as np
import pytest
import torch
from dist_helpers import run_in_processes

from lacvit_dist.train.nonfinite import NonFiniteError, NonFiniteGuard
from lacvit_dist.train.preemption import REQUEUE_EXIT_CODE, StopCheck, StopSignal


def test_stop_signal_sets_a_flag_and_restores_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with StopSignal() as stop:
        assert not stop.requested and not stop.requested_anywhere()  # single process: no collective
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not kill the process either
        assert stop.received == signal.SIGTERM and stop.requested_anywhere()
    assert {s: signal.getsignal(s) for s in before} == before
    assert REQUEUE_EXIT_CODE == 75


def _signal_on_rank1(rank, world_size):
    from lacvit_dist.train.preemption import StopSignal

    with StopSignal([signal.SIGUSR1]) as stop:
        first = stop.requested_anywhere()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return first, stop.requested, stop.requested_anywhere()


def test_stop_requested_on_one_rank_is_seen_by_all():
    results = run_in_processes(_signal_on_rank1, 2, timeout=60)
    assert results == [(False, False, True), (False, True, True)]


def test_stop_check_runs_every_n_steps_when_steps_are_fast():
    with StopSignal([signal.SIGUSR1]) as stop:
        check = StopCheck(stop, every_steps=10, every_s=1000.0, step=40)
        assert not check.due(40) and check.due(41)  # the first check comes after one step, to learn the pace
        assert not check.agree(41)  # single process: no collective
        assert [s for s in range(42, 60) if check.due(s)][:1] == [51]
        with pytest.raises(ValueError):
            StopCheck(stop, every_steps=10, every_s=0, step=0)


SLOW_STEP_S = {0: 0.05, 1: 0.2}  # rank 1 is the slow one; no per-step collective keeps them in step
SIGNAL_AT, EVERY_S = 6, 1.0


def _slow_steps_then_signal(rank, world_size):
    import time

    from lacvit_dist.train.preemption import StopCheck, StopSignal

    with StopSignal([signal.SIGUSR1]) as stop:
        check = StopCheck(stop, every_steps=1000, every_s=EVERY_S, step=0)
        checked = []
        for step in range(1, 40):
            time.sleep(SLOW_STEP_S[rank])
            if rank == 1 and step == SIGNAL_AT:
                os.kill(os.getpid(), signal.SIGUSR1)
            if check.due(step):  # each rank decides alone whether to enter the collective: they must agree
                checked.append(step)
                if check.agree(step):
                    return checked, step
        return checked, None


def test_stop_check_keeps_time_bound_with_slow_steps_on_every_rank():
    """A step interval far too large for the 1 s bound: the check comes from the agreed pace (the slowest rank's
    ~0.2 s per step), at the same steps on both ranks, and the stop is agreed within about 1 s of the signal."""
    (checked0, stop0), (checked1, stop1) = run_in_processes(_slow_steps_then_signal, 2, timeout=120)
    assert checked0 == checked1 and stop0 == stop1, (checked0, checked1)
    assert stop0 is not None and SIGNAL_AT < stop0 <= SIGNAL_AT + EVERY_S / SLOW_STEP_S[1] + 1, checked0
    assert len(checked0) >= 2 and checked0[0] == 1


def test_guard_counts_and_gives_up_without_engine():
    guard = NonFiniteGuard(max_consecutive=2)
    assert guard.check(torch.tensor(1.0))
    guard.end_step()
    assert not guard.check(torch.tensor(float("nan")))
    guard.end_step()
    assert (guard.skipped, guard.consecutive) == (1, 1)
    assert guard.check(torch.tensor(2.0))
    guard.end_step()
    assert guard.consecutive == 0
    assert not guard.check(torch.tensor(float("inf")))
    guard.end_step()
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        guard.check(torch.tensor(float("nan")))
    with pytest.raises(ValueError):
        NonFiniteGuard(0)


def _engine(zero_stage, accum, world_size, bf16=False):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": accum,
              "train_batch_size": 4 * accum * world_size, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": bf16}, "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def _params(engine):
    return {n: p.detach().float().clone().numpy() for n, p in engine.module.named_parameters()}


def _guarded_runs(rank, world_size, runs):
    from lacvit_dist.distributed import detect_world, init_distributed
    from lacvit_dist.train.nonfinite import guarded_backward_step, NonFiniteError, NonFiniteGuard

    import lacvit_dist.train.nonfinite as nonfinite

    init_distributed(detect_world(), "gloo")
    calls, real_any_rank = [0], nonfinite.any_rank

    def counting_any_rank(*args, **kwargs):  # the guard's only collective
        calls[0] += 1
        return real_any_rank(*args, **kwargs)

    nonfinite.any_rank = counting_any_rank
    out = []
    for zero_stage, accum, nan_at, steps, max_consecutive, guarded, *bf16 in runs:
        calls[0] = 0
        engine = _engine(zero_stage, accum, world_size, bool(bf16))
        guard = NonFiniteGuard(max_consecutive)
        history, error = [_params(engine)], None
        try:
            for step in range(1, steps + 1):
                for micro in range(accum):
                    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
                    x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
                    loss = torch.nn.functional.cross_entropy(engine(x.bfloat16() if bf16 else x).float(), y)
                    if rank == 1 and (step, micro) in nan_at:  # NaN on ONE rank only
                        loss = loss * float("nan")
                    if guarded:
                        guarded_backward_step(engine, loss, guard)
                    else:
                        engine.backward(loss)
                        engine.step()
                history.append(_params(engine))
        except NonFiniteError as exc:
            error = (step, str(exc))
        out.append({"history": history, "skipped": guard.skipped, "error": error, "guard_collectives": calls[0],
                    "global_steps": engine.global_steps, "micro_steps": engine.micro_steps})
    return out


RUNS = {  # zero stage, accumulation, {(step, micro-batch) with NaN on rank 1}, steps, max_consecutive, guarded
    "z0": (0, 1, {(2, 0)}, 3, 3, True),
    "z2": (2, 1, {(2, 0)}, 3, 3, True),
    "z0_accum_first": (0, 2, {(2, 0)}, 3, 3, True),  # NaN in a non-boundary micro-batch
    "z2_accum_first": (2, 2, {(2, 0)}, 3, 3, True),
    "z2_accum_last": (2, 2, {(2, 1)}, 3, 3, True),
    "z0_give_up": (0, 1, {(2, 0), (3, 0), (4, 0)}, 5, 3, True),
    "z2_give_up": (2, 1, {(2, 0), (3, 0)}, 5, 2, True),
    "z0_unguarded": (0, 1, {(2, 0)}, 2, 3, False),  # shows what the guard prevents
    "bf16_accum_first": (0, 2, {(2, 0)}, 3, 3, True, "bf16"),  # DeepSpeed's bf16 optimizer skips it
}


@pytest.fixture(scope="module")
def guarded():
    per_rank = run_in_processes(_guarded_runs, 2, list(RUNS.values()), timeout=240)
    return {name: [per_rank[r][i] for r in range(2)] for i, name in enumerate(RUNS)}


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["z0", "z2", "z0_accum_first", "z2_accum_first", "z2_accum_last",
                                  "bf16_accum_first"])
def test_nan_on_one_rank_skips_the_step_on_both(guarded, name):
    ranks = guarded[name]
    for r in ranks:
        h = r["history"]
        assert r["error"] is None and r["skipped"] == 1
        assert not _same(h[0], h[1])  # step 1 trained
        assert _same(h[1], h[2])  # step 2 (NaN on rank 1) changed nothing, on either rank
        assert not _same(h[2], h[3])  # step 3 trained again
        assert all(np.isfinite(v).all() for v in h[3].values())
        assert r["micro_steps"] == 3 * RUNS[name][1]  # DeepSpeed's counters moved on in step
    for a, b in zip(ranks[0]["history"], ranks[1]["history"]):
        assert _same(a, b)  # data parallel: identical on both ranks throughout


@pytest.mark.parametrize("name, at_step", [("z0_give_up", 4), ("z2_give_up", 3)])
def test_consecutive_non_finite_steps_raise_on_every_rank(guarded, name, at_step):
    for r in guarded[name]:
        assert r["error"] is not None, "NonFiniteError was not raised"
        step, message = r["error"]
        assert step == at_step and "in a row" in message


def test_guard_adds_no_collective_where_deepspeed_checks_gradients(guarded):
    """ZeRO (and bf16) engines skip non-finite steps themselves: the guard only reads their flag, so the hot
    path gets no extra all-reduce; ZeRO-0 fp32 needs the per-micro-batch loss check."""
    assert all(r["guard_collectives"] == 0 for r in guarded["z2_accum_first"] + guarded["bf16_accum_first"])
    assert all(r["guard_collectives"] == 3 * 2 for r in guarded["z0_accum_first"])


def test_unguarded_zero0_applies_nan(guarded):
    """Without the guard, ZeRO-0 fp32 hands NaN gradients to the torch optimizer: the test can tell."""
    last = guarded["z0_unguarded"][0]["history"][-1]
    assert not all(np.isfinite(v).all() for v in last.values())
