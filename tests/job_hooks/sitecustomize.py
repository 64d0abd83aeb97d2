"""Test-only instruments for the training processes of SLURM jobs started by the tests: on those jobs' PYTHONPATH
only (tests/job_hooks; the launch commands and the product code stay as they are). Each wraps the training loop's
`train_loader` when its variable is set (one at a time):

* LACVIT_TEST_TRACE=<folder>: append, per rank, who the process is (host, how `detect_world` placed it) and the
  keys of every batch the trainer takes to <folder>/<rank>.jsonl (tests/test_multinode_launchers.py);
* LACVIT_TEST_FAIL_RANK=<k>: rank k raises a RuntimeError of its own when it takes its 3rd batch, a bug on one
  rank while its peers run on (tests/test_slurm.py).
"""
import importlib.abc
import importlib.util
import os
import sys


class _WrapTrainLoader(importlib.abc.MetaPathFinder):
    """Wraps lacvit_dist.train.loop.train_loader with `wrap` once that module is first imported."""

    def __init__(self, wrap):
        self.wrap = wrap

    def find_spec(self, name, path=None, target=None):
        if name != "lacvit_dist.train.loop":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            module.train_loader = self.wrap(module.train_loader)

        spec.loader.exec_module = exec_module
        return spec


def _recording(train_loader):
    def wrapped(*args, **kwargs):
        import json
        import socket

        import torch.distributed as dist
        from lacvit_dist.distributed import detect_world

        world = detect_world()
        rank = dist.get_rank()
        out = open(os.path.join(os.environ["LACVIT_TEST_TRACE"], f"{rank}.jsonl"), "a")
        out.write(json.dumps({"host": socket.gethostname(), "rank": rank, "world_size": dist.get_world_size(),
                              "detected": [world.launcher, world.rank, world.world_size, world.local_rank],
                              "master": f"{world.master_addr}:{world.master_port}"}) + "\n")
        out.flush()
        batches = train_loader(*args, **kwargs)

        def recorded():
            for batch in batches:
                out.write(json.dumps(batch.keys) + "\n")
                out.flush()
                yield batch

        return recorded()

    return wrapped


def _failing(train_loader):
    def wrapped(*args, **kwargs):
        import torch.distributed as dist

        batches = train_loader(*args, **kwargs)
        rank = dist.get_rank()
        if rank != int(os.environ["LACVIT_TEST_FAIL_RANK"]):
            return batches

        def failing():
            for taken, batch in enumerate(batches):
                if taken == 2:
                    raise RuntimeError(f"injected bug on rank {rank}")
                yield batch

        return failing()

    return wrapped


if os.environ.get("LACVIT_TEST_TRACE"):
    sys.meta_path.insert(0, _WrapTrainLoader(_recording))
if os.environ.get("LACVIT_TEST_FAIL_RANK"):
    sys.meta_path.insert(0, _WrapTrainLoader(_failing))
