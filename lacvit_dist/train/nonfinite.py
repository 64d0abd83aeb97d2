"""Non-finite steps: a step whose gradients are not finite on some rank is skipped on every rank together.

A step whose gradients are not finite on some rank is skipped on every rank, with DeepSpeed's counters
(micro_steps, accumulation boundary) kept identical everywhere; `NonFiniteGuard` counts skipped steps and
gives up after N in a row. How a skip happens (read in deepspeed/runtime/engine.py `_take_model_step` and
zero/stage_1_and_2.py / bf16_optimizer.py `step`):

* DeepSpeed's ZeRO-1/2/3 optimizers (non-finite global grad norm) and its BF16 optimizer
  (`bf16.check_grad_overflow`, default true, required by deepspeed_config) already skip a step whose
  gradients are not finite: they clear their own gradient buffers, count `engine.skipped_steps`, and do not
  step the LR scheduler (`engine.was_step_applied()` is False). Their grad norm is all-reduced, so the skip is
  global. There `guarded_backward_step` adds NOTHING to the hot path: it reads `was_step_applied()` at the
  boundary (a host flag DeepSpeed already computed) and counts. No extra collective, no extra device sync.
* fp16 also skips on overflow, but loss-scale overflows are routine (the scaler's calibration), so there the
  guard checks the LOSS instead: one all-reduce per micro-batch decides whether it is finite on every rank,
  and only such steps count towards giving up.
* With ZeRO stage 0 in fp32 the engine's optimizer is the plain torch optimizer: nothing is checked, NaN would
  be applied (tests/test_resilience.py shows it). There too the loss is checked per micro-batch, and at the
  boundary of a skipped step the gradients are zeroed and `engine.step()` runs with the optimizer's and LR
  scheduler's `step` shadowed by no-ops for that call, then `engine.skipped_steps` is counted: the same
  outcome as DeepSpeed's overflow path (no parameter, momentum or LR change; micro/global step counters
  advance).
* On the loss-checked paths a skipped micro-batch is back-propagated as `loss * NaN` (every parameter in the
  graph gets a NaN gradient, on every rank; the real graph, so ZeRO-3's hooks run as usual). NaN survives
  accumulation, so later micro-batches of the same optimizer step need nothing special.
"""
from __future__ import annotations

import logging

import torch

from lacvit_dist.distributed import any_rank

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss (or gradient)."""


class NonFiniteGuard:
    """Skip optimizer steps whose loss is not finite on some rank, on every rank together; give up after
    `max_consecutive` skipped steps in a row (raise NonFiniteError on every rank, since every rank counts the
    same global decisions).

    Counting is per optimizer step: with an engine, `check` notes a non-finite micro-batch and settles the
    step at the accumulation boundary (engine.is_gradient_accumulation_boundary()); without one, every call
    is a step. Attributes: `skipped` (total skipped steps), `consecutive`, `step_poisoned` (the optimizer step
    in progress will be skipped), `checked_steps`.
    """

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self.checked_steps = 0
        self.step_poisoned = False

    def check(self, loss: torch.Tensor, engine=None) -> bool:
        """Is `loss` finite on every rank? (one all-reduce; every rank gets the same answer). Call it before
        backward, once per micro-batch, on every rank. Raises NonFiniteError at the end of the
        `max_consecutive`-th skipped step in a row."""
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        finite = not any_rank(local_bad, loss.device)
        if not finite:
            self.step_poisoned = True
        boundary = True if engine is None else bool(engine.is_gradient_accumulation_boundary())
        if boundary:
            self._settle()
        return finite

    def settle(self, skipped: bool) -> None:
        """Count one finished optimizer step that the engine itself skipped or applied (every rank calls it
        with the same answer). Raises NonFiniteError at the end of the `max_consecutive`-th skip in a row."""
        self.step_poisoned = skipped
        self._settle()
        self.step_poisoned = False

    def _settle(self) -> None:
        self.checked_steps += 1
        if not self.step_poisoned:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        where = f"optimizer step {self.checked_steps}"
        log.warning("non-finite loss or gradients at %s on at least one rank: step skipped on all ranks "
                    "(%d in a row, %d in total)", where, self.consecutive, self.skipped)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradients "
                                 f"(last at {where}; {self.skipped} skipped in total); giving up. Lower the learning rate, enable "
                                 "gradient clipping, or check the data and the precision (fp16/bf16 losses "
                                 "should be computed in fp32)")

    def end_step(self) -> None:
        """Forget the poisoned state once the optimizer step is over (guarded_backward_step calls it)."""
        self.step_poisoned = False

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "checked_steps": self.checked_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.checked_steps = int(state.get("checked_steps", 0))


def engine_skips_nonfinite_grads(engine) -> bool:
    """True if DeepSpeed's optimizer wrapper checks gradients itself and skips an overflowing step
    (`optimizer.overflow` exists: ZeRO-1/2/3, BF16_Optimizer, FP16 optimizers). False for ZeRO-0 fp32, where
    the engine hands the plain torch optimizer whatever gradients there are."""
    return hasattr(engine.optimizer, "overflow")


def _step_without_update(engine) -> None:
    """ZeRO-0 fp32 boundary of a skipped step: run engine.step() (its counters, zero_grad, hooks) with the
    gradients zeroed (finite, so gradient clipping's norm works) and the optimizer's and LR scheduler's
    step() shadowed by no-ops for this one call, the same outcome as DeepSpeed's own overflow path."""
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.detach_()
            p.grad.zero_()
    shadowed = [obj for obj in (engine.optimizer, getattr(engine, "lr_scheduler", None)) if obj is not None]
    for obj in shadowed:
        obj.step = lambda *args, **kwargs: None  # an instance attribute hides the method
    try:
        engine.step()
    finally:
        for obj in shadowed:
            del obj.step
    engine.zero_grad()
    engine.skipped_steps += 1
    engine._step_applied = False


def engine_skip_is_reliable(engine) -> bool:
    """True where a step DeepSpeed skips means non-finite gradients, not a routine fp16 loss-scale overflow."""
    return engine_skips_nonfinite_grads(engine) and not engine.fp16_enabled()


def guarded_backward_step(engine, loss: torch.Tensor, guard: NonFiniteGuard, **backward_kwargs) -> None:
    """`engine.backward(loss); engine.step()` for one micro-batch, except that a step with non-finite loss or
    gradients on any rank is skipped on every rank (see the module docstring for the three paths).
    `backward_kwargs` go to engine.backward (e.g. scale_wrt_gas=False for the feature-cache path)."""
    boundary = bool(engine.is_gradient_accumulation_boundary())
    if engine_skip_is_reliable(engine):  # DeepSpeed checks the gradients itself: nothing to add per micro-batch
        engine.backward(loss, **backward_kwargs)
        engine.step()
        if boundary:
            guard.settle(skipped=not engine.was_step_applied())
        return
    finite = guard.check(loss, engine)
    # NaN times the real graph: NaN gradients for every parameter in it on this rank, which the gradient
    # reduction spreads to every rank; DeepSpeed's overflow path (or our clearing below) then skips the step.
    engine.backward(loss if finite else loss * float("nan"), **backward_kwargs)
    skip = boundary and guard.step_poisoned
    if skip and not engine_skips_nonfinite_grads(engine):
        _step_without_update(engine)
    else:
        engine.step()
    if boundary:
        guard.end_step()
