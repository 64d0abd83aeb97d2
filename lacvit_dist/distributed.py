"""Who am I in the job (torchrun, the deepspeed launcher, SLURM or a plain process), process-group set-up,
and the collectives the losses and the evaluation need."""
from __future__ import annotations

import contextlib
import os
import pickle
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "env" (torchrun / deepspeed launcher), "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on the loopback interface right now (for single-process runs, tests, local launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except KeyError:
        raise RuntimeError(f"environment variable {key} is not set (launcher variables are incomplete)") from None
    except ValueError:
        raise RuntimeError(f"environment variable {key}={env[key]!r} is not an integer") from None


def slurm_hostnames(nodelist: str) -> list[str]:
    """Every host of a SLURM node list ('a,b[1-3]', 'node[01-03]-ib', 'rack[1-2]-n[01-04]'), in SLURM's order,
    without `scontrol` (which compute nodes may lack): submitit's parser, the one its JobEnvironment uses."""
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(nodelist)


def slurm_master_port(env: Mapping[str, str]) -> int:
    """The rendezvous port every task of a job agrees on without talking: 20000-39999 from the job id and the
    requeue count. Jobs sharing a node get different ports (ids less than 20000 apart), and so does each
    requeue of one job (4099 is prime to 20000), whose previous run may still hold its port in TIME_WAIT."""
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    return 20000 + (_require_int(env, "SLURM_JOB_ID") + 4099 * restarts) % 20000


def started_by_launcher(env: Mapping[str, str]) -> str | None:
    """'torchrun' or 'deepspeed' when that launcher started this process (its own marker variables, which no
    shell exports by accident), else None."""
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env and "LOCAL_SIZE" in env:  # deepspeed/launcher/launch.py sets both for every rank
        return "deepspeed"
    return None


def detect_world(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Read rank and rendezvous from the environment of whoever started this process, in this order:

    1. torchrun or the deepspeed launcher (`started_by_launcher`): their RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*,
       also inside a SLURM step (`srun torchrun ...`, one agent per node).
    2. A SLURM job step (SLURM_STEP_ID set: `srun`, submitit): SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, the
       master is the job's first node (127.0.0.1 on a one-node job, so nothing depends on the host name
       resolving) on `slurm_master_port`.
    3. Elsewhere in a SLURM job (the batch shell: no step) one process: `python train.py` there is not rank 0 of
       N waiting for peers that never come. In 2 and 3, RANK & co. leaked from the submitting shell (sbatch
       exports the environment) are ignored.
    4. RANK and WORLD_SIZE set by another starter outside SLURM (submitit's local executor, a test harness).
    5. Otherwise one process.
    """
    env = os.environ if env is None else env
    if started_by_launcher(env) is None and "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env:
        return WorldInfo(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                         launcher="single")
    if started_by_launcher(env) is None and "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        hosts = slurm_hostnames(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1")
        return WorldInfo(rank=_require_int(env, "SLURM_PROCID"), local_rank=_require_int(env, "SLURM_LOCALID"),
                         world_size=_require_int(env, "SLURM_NTASKS"),
                         master_addr="127.0.0.1" if len(hosts) == 1 else hosts[0],
                         master_port=slurm_master_port(env), launcher="slurm")
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(rank=_require_int(env, "RANK"), local_rank=int(env.get("LOCAL_RANK", "0")),
                         world_size=_require_int(env, "WORLD_SIZE"),
                         master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                         master_port=int(env.get("MASTER_PORT", "29500")), launcher="env")
    return WorldInfo(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                     launcher="single")


def init_distributed(world: WorldInfo, backend: str, timeout_s: float | None = None) -> None:
    """Create the default process group through DeepSpeed (or hand it an existing one), from `world`.

    DeepSpeed falls back to MPI discovery when RANK & co. are missing, so they are exported first: this is
    what lets a plain `python train.py` and `srun` reach the same code path as torchrun.
    """
    import deepspeed  # heavy import; keep it off module import time

    if backend == "gloo":
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU (~65 s on 2 cores) that only its
        # inference all-reduce uses; training never needs it, so mark it unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ.update(RANK=str(world.rank), LOCAL_RANK=str(world.local_rank), WORLD_SIZE=str(world.world_size),
                      MASTER_ADDR=world.master_addr, MASTER_PORT=str(world.master_port))
    # Wraps an already-initialised torch process group instead of creating one.
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **timeout)
    from deepspeed.utils import groups

    if timeout and groups._WORLD_GROUP is None:
        # DeepSpeed runs its own collectives (ZeRO's reductions, gradient clipping) on a clone of the world group
        # that it makes on first use, and torch gives a group made without a timeout the 30-minute default, not
        # the world's: without this clone a rank waiting for a hung peer there would ignore timeout_s.
        groups._WORLD_GROUP = dist.new_group(ranks=range(dist.get_world_size()), **timeout)


@dataclass(frozen=True)
class Job:
    """This process's place in a started job: who it is, where it computes, how ranks talk."""
    world: WorldInfo
    device: torch.device
    backend: str


def resolve_device(requested: str) -> str:
    """'cpu' or 'cuda' for run.device ('auto': a GPU when one is visible)."""
    from lacvit_dist.config import ConfigError

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda requested but no GPU is visible")
    return requested


def set_threads(world: WorldInfo) -> None:
    """Share the cores between the ranks of this node; the deepspeed launcher does not set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
                or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


@contextlib.contextmanager
def job(device: str = "auto", backend: str = "auto", seed: int | None = None,
        timeout_s: float | None = None) -> Iterator[Job]:
    """Join the job the launcher started (or a one-process job) the one way every program does: world from
    the environment, one GPU per local rank, threads shared per node, the process group (through DeepSpeed),
    and the seed. A process group that already exists (a caller's) is used and left alone. `timeout_s`: how long
    a collective may wait for a peer before it raises (DeepSpeed's default, 30 minutes, when None)."""
    world = detect_world()
    kind = resolve_device(device)
    set_threads(world)
    if kind == "cuda":
        torch.cuda.set_device(world.local_rank)  # before the process group: NCCL binds to the current device
    backend = backend if backend != "auto" else ("nccl" if kind == "cuda" else "gloo")
    owned = not (dist.is_available() and dist.is_initialized())
    init_distributed(world, backend, timeout_s)  # hands an existing group to DeepSpeed too
    if seed is not None:
        torch.manual_seed(seed)
    try:
        yield Job(world, torch.device("cuda", world.local_rank) if kind == "cuda" else torch.device("cpu"), backend)
    finally:
        if owned and dist.is_initialized():
            import deepspeed

            # Through DeepSpeed, which also forgets the groups it cached: a second job in this process (two
            # stages under submitit's debug executor) would otherwise meet groups of the destroyed world.
            deepspeed.comm.destroy_process_group()


# EX_PROTOCOL from sysexits.h ("remote error in protocol"): the run stopped because a peer rank was lost (its
# process died, hung or was cut off) in a collective. Launchers requeue on it like on REQUEUE_EXIT_CODE (75); the
# restart resumes from the latest checkpoint.
LOST_PEER_EXIT_CODE = 76

# What a collective raises when a peer is gone: gloo's transport errors (a dead process resets or closes the
# connection; a hung or cut-off one runs into the timeout, run.collective_timeout_s) and the c10d store's.
_LOST_PEER_MESSAGES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out waiting",
                       "Socket Timeout", "Connection refused", "NCCL communicator was aborted")


def is_lost_peer(err: BaseException) -> bool:
    """Whether `err` (or an exception it was raised from) says a peer rank was lost in a collective, rather
    than that this rank's program failed. torch's DistError family (NCCL errors raised when the watchdog aborts
    a communicator, store and network errors) counts as lost peers too."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, dist.DistError) or (isinstance(err, RuntimeError)
                                              and any(m in str(err) for m in _LOST_PEER_MESSAGES)):
            return True
        err = err.__cause__ or err.__context__
    return False


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all-gather forward; backward sums every rank's gradient for this rank's slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n = grad.shape[0] // world_size()
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((n, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out
        # gloo has no reduce-scatter: all-reduce the whole gradient and keep this rank's rows.
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad[rank() * n:(rank() + 1) * n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, in rank order, keeping the autograd graph.

    The backward pass sums, on each rank, the gradients that every rank's loss sends to that rank's slice:
    a loss summed over ranks is therefore differentiated exactly. Every rank must pass the same shape.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (same shape on every rank), without gradient."""
    if world_size() == 1:
        return x
    x = x.contiguous()
    if dist.get_backend() == "nccl":
        out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x)
        return out
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 when ranks hold different numbers of rows (evaluation
    shares): sizes are exchanged first, rows padded to the largest share, and the padding dropped."""
    if world_size() == 1:
        return x
    sizes = all_gather_no_grad(torch.tensor([x.shape[0]], device=x.device)).tolist()
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = all_gather_no_grad(padded).split(max(sizes))
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks (a new, detached tensor; `x` is left untouched)."""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def collective_device() -> torch.device:
    """Where this backend's collectives take tensors: the current GPU for NCCL, the CPU for gloo."""
    if world_size() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def any_rank(flag: bool, device: torch.device | str | None = None) -> bool:
    """True if `flag` is True on any rank (one all-reduce MAX of one int32; no collective in a single process)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device or collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(values: list[float], device: torch.device | str | None = None) -> list[float]:
    """Element-wise maximum of `values` over all ranks (one all-reduce; the values themselves in one process)."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device or collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


T = TypeVar("T")


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - sent as text instead
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def rank0_decides(decide: Callable[[], T]) -> T:
    """Run `decide()` on rank 0 only and hand its result, or the exception it raised, to every rank.

    For decisions every rank must take alike (stage finished? backbone present? which checkpoint?): ranks that
    each read a shared file system can see different things for a while (NFS attribute caches, a file written
    a moment ago), and ranks that take different branches deadlock in their next collective. A collective:
    every rank must call it; every rank raises if `decide` raised."""
    if world_size() == 1:
        return decide()
    box: list[Any] = [None]
    error: Exception | None = None
    if rank() == 0:
        try:
            box = [("ok", decide())]
        except Exception as exc:  # noqa: BLE001 - every rank raises it below, not only rank 0
            error, box = exc, [("error", _picklable(exc))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise value
    return value


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order, on every rank (a collective; [obj] in a single process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
