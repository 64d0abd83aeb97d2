"""tools/inspect_shards.py (lacvit_dist.data.inspect): summary and --verify on clean and broken shards."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lacvit_dist.data.inspect import main as inspect_main
from lacvit_dist.data.shard_writer import write_dataset
from lacvit_dist.data.shards import INFO_FILE, load_info, Sample
from lacvit_dist.data.encoding import encode_array

REPO = Path(__file__).resolve().parent.parent


def run(argv, capsys) -> tuple[int, str]:
    code = inspect_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def rewrite_member(shard: Path, member_name: str, data: bytes) -> None:
    """Replace one member's bytes in a tar shard, keeping every other member as it is."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, old in members:
            new = data if member.name == member_name else old
            member.size = len(new)
            tar.addfile(member, io.BytesIO(new))


@pytest.fixture()
def toy(tmp_path) -> Path:
    """2 classes, train 3 shards x 4 samples, val 1 shard x 3."""
    rng = np.random.default_rng(0)
    png = lambda: encode_array(rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8))  # noqa: E731
    splits = {"train": [Sample(png(), i % 2) for i in range(12)], "val": [Sample(png(), i % 2) for i in range(3)]}
    root = tmp_path / "toy"
    write_dataset(root, "toy", ["cat", "dog"], splits, samples_per_shard=4, progress=False)
    return root


def test_clean_digits_verify_exit_0(digits_root, capsys):
    code, out = run([digits_root, "--verify", "--samples", "2"], capsys)
    assert code == 0, out
    assert "PROBLEM" not in out and "verified: no problems" in out
    info = load_info(digits_root)
    for split in info.splits.values():
        assert f"[{split.name}] {len(split.filenames)} shard(s), {split.num_samples} samples" in out
    assert "train_0000000  label" in out and "8x8 L PNG" in out


def test_summary_histogram_counts_per_class(toy, capsys):
    code, out = run([toy, "--split", "train", "--samples", "5"], capsys)
    assert code == 0
    assert "[train] 3 shard(s), 12 samples" in out and "[val]" not in out
    lines = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert lines == [["0", "cat", "6"], ["1", "dog", "6"]]
    described = [line for line in out.splitlines() if "label" in line and "PNG" in line]
    assert len(described) == 5 and "5x6 RGB PNG" in described[0]  # spans the first two shards
    assert "(cat)" in described[0] and "(dog)" in described[1]


def test_broken_shards_exit_1_naming_shard_and_key(toy, capsys):
    shard0, shard1, shard2 = (toy / f"train-00000{i}.tar" for i in range(3))
    rewrite_member(shard0, "train_0000001.png", b"\x89PNG\r\n\x1a\n garbage")  # corrupt image
    rewrite_member(shard1, "train_0000005.cls", b"7")  # label out of range (2 classes)
    rewrite_member(shard1, "train_0000006.cls", b"dog")  # not an integer
    data = shard2.read_bytes()
    shard2.write_bytes(data[:len(data) // 3])  # truncated inside the shard
    code, out = run([toy, "--verify"], capsys)
    assert code == 1
    problems = [line for line in out.splitlines() if "PROBLEM" in line]
    assert any("train-000000.tar: key train_0000001: image does not decode" in p for p in problems), problems
    assert any("train-000001.tar: key train_0000005: label 7 outside [0, 2)" in p for p in problems), problems
    assert any("train-000001.tar: key train_0000006: label 'dog' is not an integer" in p for p in problems)
    truncated = [p for p in problems if "train-000002.tar" in p and "truncated" in p]
    assert truncated and "offset" in truncated[0], problems
    assert any("train-000002.tar: holds" in p and "_info.json lists 4" in p for p in problems)
    assert not any("val-" in p for p in problems)
    # without --verify (and no samples shown) the image is not decoded; labels and the truncation are found
    code, out = run([toy, "--samples", "0"], capsys)
    assert code == 1 and "train_0000001" not in out and "train_0000005: label 7" in out


@pytest.mark.parametrize("cut", ["member_boundary", "end_marker"])
def test_truncation_at_a_member_boundary_is_found(toy, capsys, cut):
    shard = toy / "val-000000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    last = members[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    # cut before the last member (a shorter but well-formed-looking tar), or just drop the end blocks
    shard.write_bytes(shard.read_bytes()[:members[-2].offset if cut == "member_boundary" else end])
    code, out = run([toy, "--split", "val"], capsys)
    assert code == 1
    assert "val-000000.tar: no end-of-archive marker at offset" in out


def test_duplicate_keys_and_count_mismatch(toy, capsys):
    shutil.copy(toy / "train-000000.tar", toy / "train-000001.tar")  # keys train_0000000.. twice
    raw = json.loads((toy / INFO_FILE).read_text())
    raw["splits"]["val"]["shard_lengths"] = [2]
    raw["splits"]["val"]["num_samples"] = 2
    (toy / INFO_FILE).write_text(json.dumps(raw))
    code, out = run([toy, "--verify"], capsys)
    assert code == 1
    assert "train-000001.tar: key train_0000000: duplicate key (also in train-000000.tar)" in out
    assert "val-000000.tar: holds 3 samples but _info.json lists 2" in out


def test_missing_shard_unknown_split_and_usage(toy, capsys):
    code, out = run([toy, "--split", "test"], capsys)
    assert code == 1 and "no split 'test'" in out
    (toy / "val-000000.tar").unlink()
    code, out = run([toy], capsys)
    assert code == 1 and "val-000000.tar" in out
    assert run([toy, "--samples", "-1"], capsys)[0] == 2


def test_tool_script_and_workers(digits_root):
    """The thin tools/ entry point, with 2 worker processes: same output as 1; a progress bar on stderr
    (all 1797 digits), none with --quiet."""
    outs = []
    for workers, quiet in (("1", []), ("2", ["--quiet"])):
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_shards.py"), str(digits_root),
                               "--verify", "--workers", workers] + quiet, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert ("verify digits: 100%" in proc.stderr and "1797/1797" in proc.stderr) if not quiet \
            else proc.stderr == "", proc.stderr
        outs.append(proc.stdout)
    assert outs[0] == outs[1]
