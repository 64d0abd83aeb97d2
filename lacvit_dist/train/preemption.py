"""Stop signals agreed by all ranks: preemption, `scancel` and time limits end in a checkpoint and a requeue.

SLURM (preemption, `scancel`, `--signal=USR1@120` before the time limit), submitit and Kubernetes announce the
end of a job with a signal. `StopSignal` only sets a flag in the handler (nothing else is safe there: a handler
runs between two bytecodes, possibly inside a collective). The loop asks at a step boundary, every N steps or
about every S seconds, whichever comes first (`StopCheck`); that is ONE all-reduce of two numbers (a few
microseconds on NCCL, well under a millisecond on gloo), and it makes every rank see the same answer at the
same step, so all ranks save the same checkpoint and leave together. Then the process exits with
`REQUEUE_EXIT_CODE`.
"""
from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Iterable

import torch

from lacvit_dist.distributed import any_rank, max_over_ranks


# EX_TEMPFAIL from sysexits.h: "temporary failure, try again". A preempted / time-limited run that saved a
# checkpoint exits with it; launchers requeue on it (submitit: raise from checkpoint(); a plain sbatch script:
# `python train.py ...; [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID`). It is distinct from 0 (finished),
# 1 (Python error), 76 (a lost peer: distributed.LOST_PEER_EXIT_CODE), 124 (timeout(1)) and 128+N (killed by
# signal N).
REQUEUE_EXIT_CODE = 75


class StopSignal:
    """Catch stop signals as a flag; agree on them across ranks at a step boundary.

        with StopSignal() as stop:                        # SIGTERM and SIGUSR1 by default
            for step in ...:
                ...train one step...
                if step % check_every == 0 and stop.requested_anywhere():
                    save_training_checkpoint(...); sys.exit(REQUEUE_EXIT_CODE)

    The previous handlers are restored on `close()` / leaving the `with` block. Only the main thread may install
    signal handlers (a Python rule); elsewhere a ValueError says so. A second signal does not kill the process
    (it only sets the flag again); SLURM follows SIGTERM with SIGKILL after KillWait (30 s by default), so
    check often enough that a checkpoint fits in that window, or ask SLURM for an early `--signal=USR1@<s>`.
    """

    def __init__(self, signals: Iterable[int | signal.Signals] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = [signal.Signals(s) for s in signals]
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self.install()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def install(self) -> None:
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handler)

    @property
    def requested(self) -> bool:
        """This rank got one of the signals (no communication)."""
        return self.received is not None

    def requested_anywhere(self, device: torch.device | str | None = None) -> bool:
        """True on every rank if ANY rank got a signal; a collective (one tiny all-reduce and a host read):
        call it on all ranks at the same step, every few steps rather than every step."""
        return any_rank(self.requested, device)

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StopCheck:
    """When the ranks agree on a pending stop signal, so that the save starts soon after it however slow the
    steps are (SLURM's USR1 comes a fixed time, e.g. 120 s, before the kill).

    Agreeing is a collective, so every rank must decide to take part at the same step; a decision from each
    rank's own clock could differ and deadlock. So each check all-reduces (MAX) the signal flag together with
    the seconds since the previous check, and every rank derives the same next check step from those agreed
    figures: as many steps as fit in `every_s` at the slowest rank's recent pace, at least 1 and at most
    `every_steps`. The first check comes after one step, to learn the pace. A pace that slows down suddenly is
    seen at the next check; the loop also checks before and after every evaluation (`agree` directly).

        check = StopCheck(stop, every_steps=10, every_s=30, step=start_step)
        ... after each step:  if check.due(step) and check.agree(step): save; exit
    """

    def __init__(self, stop: StopSignal, every_steps: int, every_s: float, step: int,
                 device: torch.device | str | None = None):
        if every_steps < 1 or every_s <= 0:
            raise ValueError(f"StopCheck needs every_steps >= 1 and every_s > 0, got {every_steps}, {every_s}")
        self.stop, self.every_steps, self.every_s, self.device = stop, every_steps, every_s, device
        self.next_step = step + 1
        self._last_step, self._last_time = step, time.monotonic()

    def due(self, step: int) -> bool:
        """The schedule's answer for `step` (no communication; the same on every rank)."""
        return step >= self.next_step

    def agree(self, step: int) -> bool:
        """True on every rank if any rank got a stop signal; plans the next check. A collective: call it on all
        ranks at the same step."""
        now = time.monotonic()
        flag, slowest = max_over_ranks([float(self.stop.requested), now - self._last_time], self.device)
        seconds_per_step = slowest / max(1, step - self._last_step)
        fit = int(self.every_s / seconds_per_step) if seconds_per_step > 0 else self.every_steps
        self.next_step = step + max(1, min(self.every_steps, fit))
        self._last_step, self._last_time = step, now
        return flag > 0


