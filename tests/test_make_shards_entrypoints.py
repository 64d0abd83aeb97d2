"""The shard writer's three entry points (tools/make_shards.py, `python -m lacvit_dist.data.make_shards`, the
`lacvit-make-shards` console script) with worker processes, and --overwrite under failure, Ctrl-C and kill -9,
each run as a real separate process on a small ImageFolder tree of real images."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lacvit_dist.data import make_shards
from lacvit_dist.data.shard_writer import write_dataset
from lacvit_dist.data.shards import load_info, Sample
from lacvit_dist.data.encoding import encode_array

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENTRY_POINTS = {
    "tools_script": [sys.executable, str(REPO / "tools" / "make_shards.py")],
    "python_m": [sys.executable, "-m", "lacvit_dist.data.make_shards"],
    "console_script": [str(BIN / "lacvit-make-shards")],
}


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def image_tree(root: Path, per_class: int = 6) -> Path:
    """Three classes of small random-pixel images, PNG and JPEG (re-encoded to PNG by the writer)."""
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(int(rng.integers(6, 14)), int(rng.integers(6, 14)), 3),
                                  dtype=np.uint8)
            fmt = "JPEG" if i % 3 == 0 else "PNG"
            Image.fromarray(pixels).save(root / cls / f"{i}.{fmt.lower()}", format=fmt)
    return root


def tree_args(tree: Path, out: Path) -> list[str]:
    return ["imagefolder", "--root", str(tree), "--out", str(out), "--samples-per-shard", "3", "--quiet"]


def run_cli(command: list[str], argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command + argv, capture_output=True, text=True, timeout=timeout)


def old_set(root: Path) -> dict[str, bytes]:
    """A small complete shard set at `root` (the set an --overwrite run must not lose); its snapshot."""
    rng = np.random.default_rng(1)
    samples = [Sample(encode_array(rng.integers(0, 256, size=(5, 5), dtype=np.uint8)), i % 3) for i in range(7)]
    write_dataset(root, "old", ["cat", "dog", "eel"], {"train": samples}, samples_per_shard=3, progress=False)
    return snapshot(root)


@pytest.fixture(scope="module")
def tree_and_reference(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """The tree, and its shards written in this process with one worker."""
    base = tmp_path_factory.mktemp("entry")
    tree = image_tree(base / "tree")
    assert make_shards.main(tree_args(tree, base / "reference") + ["--workers", "1"]) == 0
    return tree, snapshot(base / "reference")


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_entry_points_with_workers_write_the_one_worker_bytes(tmp_path, tree_and_reference, entry):
    """Every entry point runs its worker pool (forkserver: workers re-import the main module) and writes the
    same bytes as one worker, into an existing empty folder, without a word about existing shards."""
    tree, reference = tree_and_reference
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli(ENTRY_POINTS[entry], tree_args(tree, out) + ["--workers", "2"])
    assert proc.returncode == 0, proc.stderr
    assert "already holds" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "3 classes" in proc.stdout
    assert snapshot(out) == reference
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_corrupt_image_during_overwrite_keeps_the_previous_set(tmp_path):
    tree = image_tree(tmp_path / "tree")
    good = (tree / "dog" / "1.png").read_bytes()
    (tree / "dog" / "broken.png").write_bytes(good[:len(good) // 2])  # a truncated file: fails to decode
    out = tmp_path / "out"
    before = old_set(out)
    proc = run_cli(ENTRY_POINTS["tools_script"], tree_args(tree, out) + ["--workers", "2", "--overwrite"])
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lacvit-make-shards: error: cannot read image") and "broken.png" in last, proc.stderr
    assert snapshot(out) == before and load_info(out).name == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tree"]  # nothing left beside it


def start_and_signal(argv: list[str], out: Path, sig: int) -> subprocess.Popen:
    """Start the tools script in its own process group, wait until its new set has a finished shard beside
    `out`, then send `sig` to the whole group (as a terminal's Ctrl-C does)."""
    # A shell's background job (`cmd &` without job control, nohup) starts with SIGINT ignored and its children
    # inherit that: the writer gets the disposition a terminal's foreground job has, whatever started the suite.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(ENTRY_POINTS["tools_script"] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.partial-*/train-000001.tar")):
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "no shard written within 120 s"
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)
    return proc


DIGITS_ARGV = ["digits", "--samples-per-shard", "2", "--workers", "2", "--overwrite", "--quiet"]


def test_ctrl_c_during_overwrite_keeps_the_previous_set(tmp_path):
    """Ctrl-C to the whole process group (writer and workers): exit 130 with one line, the old set intact,
    nothing left beside it."""
    out = tmp_path / "out"
    before = old_set(out)
    proc = start_and_signal(DIGITS_ARGV + ["--out", str(out)], out, signal.SIGINT)
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr
    assert f"lacvit-make-shards: interrupted; {out} is as it was" in stderr and "Traceback" not in stderr, stderr
    assert snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_kill_during_overwrite_keeps_the_previous_set_and_the_next_run_cleans_up(tmp_path, capsys):
    """kill -9 (no clean-up possible): the old set intact, the unfinished set left beside it; the next run
    deletes that and names it."""
    out = tmp_path / "out"
    before = old_set(out)
    proc = start_and_signal(DIGITS_ARGV + ["--out", str(out)], out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(out) == before and load_info(out).name == "old"
    leftover = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert len(leftover) == 1 and leftover[0].name.startswith(".out.partial-")

    tree = image_tree(tmp_path / "tree", per_class=2)
    assert make_shards.main(tree_args(tree, out) + ["--overwrite"]) == 0
    assert f"lacvit-make-shards: warning: deleted {leftover[0]}, left by an interrupted write" in capsys.readouterr().err
    assert load_info(out).name == "tree" and sorted(p.name for p in tmp_path.iterdir()) == ["out", "tree"]
