"""Shared fixtures: real data (scikit-learn's shipped digits) written as WebDataset shards once per session."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests run several ranks on 2 cores; one thread each keeps them from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pythonpath(*first: Path) -> str:
    """PYTHONPATH for a child process: `first`, then the caller's own (where `make test-device` puts the carried
    wheels of the GPU machine's packages)."""
    return os.pathsep.join([*map(str, first), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from lacvit_dist.data.make_shards import main as make_shards

    root = tmp_path_factory.mktemp("digits")
    assert make_shards(["digits", "--out", str(root), "--samples-per-shard", "100", "--quiet"]) == 0
    return root
