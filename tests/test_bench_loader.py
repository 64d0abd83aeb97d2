"""tools/bench_loader.py on tiny settings (digits shards written to a temporary folder): the table names both
loops and a ratio, each a positive number (not a timing test)."""
import re
import subprocess
import sys

from conftest import REPO


def test_bench_loader_prints_both_loops_and_the_ratio():
    cmd = [sys.executable, str(REPO / "tools" / "bench_loader.py"), "--img-size", "16", "--workers", "1",
           "--batch", "8", "--batches", "2", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "digits (temporary shards), split train: img 16, workers 1, batch 8, 2 timed batches" in proc.stdout
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", proc.stdout, flags=re.M))
    for key in ("train_loader images/s", "bare loop images/s", "ratio train_loader / bare"):
        assert float(rows[key]) > 0, key
    ratio = float(rows["train_loader images/s"]) / float(rows["bare loop images/s"])
    assert abs(ratio - float(rows["ratio train_loader / bare"])) < 0.01
