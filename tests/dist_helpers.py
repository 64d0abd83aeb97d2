"""Run a function in N local gloo processes (CPU) and collect what each returns.

    results = run_in_processes(fn, 2, arg1, arg2)   # fn(rank, world_size, arg1, arg2) in each process

`fn` must be a module-level (picklable) function; its arguments and result must be picklable. Each child
gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, a gloo process group on 127.0.0.1 and one torch
thread. An exception in a child is re-raised in the parent (same type when it can be pickled) with the
child's traceback text attached; children that do not finish within `timeout` seconds are killed and a
TimeoutError names them.
"""
from __future__ import annotations

import os
import pickle
import queue as queue_mod
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lacvit_dist.distributed import free_port  # noqa: F401 (the tests import it from here)


class RemoteTraceback(Exception):
    """Carries a child's formatted traceback (shown as the cause of the re-raised exception)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class ChildProcessFailed(RuntimeError):
    """A child failed with an exception that could not be sent back as itself, or died without a result."""


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    status, payload, failed_at = "ok", None, None
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))
        try:
            # Plain pickle to bytes: torch's queue would pass tensors as shared-memory handles that die with
            # this process; bytes survive it. Fails here, with a clear message, if the result is unpicklable.
            payload = pickle.dumps(fn(rank, world_size, *args))
        except BaseException:
            failed_at = time.time()  # the first failure in time is the root cause; peers then fail on it
            raise
        dist.destroy_process_group()  # not on failure: a peer may be gone, and the process ends anyway
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            blob = pickle.dumps(exc)
            pickle.loads(blob)
        except Exception:  # noqa: BLE001
            blob = None
        status, payload = "error", (text, blob, failed_at or time.time())
    results.put((rank, status, payload))


def _raise_child_error(rank: int, text: str, blob: bytes | None, others: list[int]) -> None:
    remote = RemoteTraceback(f"\n\n--- traceback in child rank {rank} ---\n{text}")
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:  # noqa: BLE001
            exc = None
    if not isinstance(exc, Exception):
        raise ChildProcessFailed(f"rank {rank} failed:\n{text}")
    if hasattr(exc, "add_note"):
        also = f"; rank(s) {others} failed after it" if others else ""
        exc.add_note(f"(raised in child process rank {rank}; its traceback is the cause above{also})")
    raise exc from remote


class _PortTaken(Exception):
    pass


def run_in_processes(fn: Callable, world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes; results in rank order.

    The rendezvous port is picked free just before the start; if another process takes it in between
    (tests running in parallel), the whole group is started again on a new port (up to 3 tries).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, timeout)
        except _PortTaken:
            if attempt == 2:
                raise ChildProcessFailed("could not get a free rendezvous port in 3 tries") from None
    raise AssertionError("unreachable")


def _run_once(fn: Callable, world_size: int, args: tuple, timeout: float) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # Not daemonic: a rank may start DataLoader workers of its own; the finally below reaps every child.
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, results), daemon=False,
                         name=f"dist-helper-rank{r}") for r in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    errors: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout
    grace_until = None  # after a first error, wait briefly for the others and report the earliest
    try:
        while len(done) + len(errors) < world_size:
            now = time.monotonic()
            if grace_until is not None and now >= grace_until:
                break
            if now >= deadline:
                if errors:
                    break
                missing = sorted(set(range(world_size)) - set(done))
                raise TimeoutError(f"run_in_processes({getattr(fn, '__name__', fn)}): rank(s) {missing} did not "
                                   f"finish within {timeout:g} s (hung in a collective?); killed")
            try:
                rank, status, payload = results.get(timeout=max(0.01, min(deadline - now, 0.5)))
            except queue_mod.Empty:
                # A child that died without posting (segfault, os._exit, OOM kill) never will.
                dead = [r for r, p in enumerate(procs) if r not in done and r not in errors
                        and p.exitcode is not None and p.exitcode != 0]
                if dead and not errors:
                    time.sleep(0.5)  # its message may still be in flight
                    if results.empty():
                        raise ChildProcessFailed(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} "
                                                 "without a result") from None
                continue
            if status == "error":
                errors[rank] = payload
                if grace_until is None:
                    grace_until = time.monotonic() + 1.0
            else:
                done[rank] = pickle.loads(payload)
        if errors:
            first = min(errors, key=lambda r: errors[r][2])
            text, blob, _ = errors[first]
            if "EADDRINUSE" in text or "ddress already in use" in text:
                raise _PortTaken()
            _raise_child_error(first, text, blob, sorted(r for r in errors if r != first))
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        return [done[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
