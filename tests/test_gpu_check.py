"""tools/gpu_check.sh --dry-run: every measurement part of the prepared GPU check runs on the CPU (tiny models,
one step) and lands in the report, so that a typo cannot kill the script on the device. The GPU test subset
itself (tests/test_gpu_cuda.py) runs on the CPU in this suite, so the dry run here skips it."""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from tools import gpu_check


def test_dry_run_writes_every_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "OUT")}
    env.update(OMP_NUM_THREADS="1", GPU_CHECK_TESTS="0", GPU_CHECK_PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md",
                                                          "gpu_tests.log"]  # <= 8 files: the device returns them
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert {name: part["status"] for name, part in parts.items()} == {name: "ok" for name in gpu_check.PARTS}
    figures = {name: part["figures"] for name, part in parts.items()}
    for model in gpu_check.MODELS:
        assert figures["throughput"][model]["best"]["images_per_s"] > 0
        assert 0 < figures["loss_share"][model]["share"]
        assert figures["loader"]["against_gpu"][model]["loader_over_gpu"] > 0
    compiled, eager = figures["compile"]["vit_l16"], figures["throughput"]["vit_l16"]["best"]
    assert compiled["images_per_s"] > 0 and compiled["micro_batch"] == eager["micro_batch"]
    # The compiled step's TFLOP/s: the eager count of the same step over the compiled step's time.
    assert compiled["flops_per_step"] == eager["flops_per_step"] > 0
    assert compiled["tflops_per_s_per_rank"] * 1e12 * compiled["step_s"] == pytest.approx(eager["flops_per_step"])
    assert figures["max_batch"]["largest"]["micro_batch"] == 4 and figures["max_batch"]["largest"]["checkpointing"] == "timm"
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| vit_l16 | compiled | 2 |" in report and "| vit_h14 | eager | 2 |" in report


def test_report_names_a_failed_part(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "matmul.json").write_text(json.dumps({"status": "failed", "error": "Traceback ...\nKeyError: 'x'",
                                                   "figures": None, "wall_s": 1.0}))
    assert gpu_check.main(["--parts-dir", str(parts), "--report", str(tmp_path / "out")]) == 1
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "### matmul failed" in report and "KeyError: 'x'" in report


def test_device_wheel_check_names_each_problem(tmp_path):
    """tools/prepare_device_wheels.py --check: a missing package, a doubled one (pip refuses two versions), a
    version off the lock and a wheel for another Python are each named with the file."""
    from tools import prepare_device_wheels as W

    versions = W.lock_versions()
    names = {n: f"{n.replace('-', '_')}-{versions[W.normalise(n)]}-py3-none-any.whl" for n in W.BUILT + W.DOWNLOADED}
    names["pydantic_core"] = f"pydantic_core-{versions['pydantic_core']}-cp311-cp311-manylinux_2_17_x86_64.whl"
    names.pop("hjson")
    for name in names.values():
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "submitit-0.0.1-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "lacvit_dist-0.1.0-py3-none-any.whl").write_bytes(b"")
    problems = "\n".join(W.check(tmp_path, versions))
    assert "0 wheels for hjson" in problems
    assert "2 wheels for submitit" in problems
    assert "cp311-cp311-manylinux_2_17_x86_64 do not install on CPython 3.12" in problems
    (tmp_path / "submitit-0.0.1-py3-none-any.whl").rename(tmp_path / "submitit-0.0.1-py3-none-any.whl.bak")
    (tmp_path / names["submitit"]).unlink()
    (tmp_path / "submitit-0.0.1-py3-none-any.whl.bak").rename(tmp_path / "submitit-0.0.1-py3-none-any.whl")
    assert "version 0.0.1, but requirements/lock.txt pins" in "\n".join(W.check(tmp_path, versions))
    assert W.main(["--check", "--out", str(tmp_path)]) == 1
