"""tools/bench_train.py: one tiny stage-1 step through the DeepSpeed engine (1-rank gloo group created by the
tool itself), with the FLOP count and the bare-PyTorch comparison; the printed figures exist and are positive."""
import os
import re
import subprocess
import sys

from conftest import REPO, pythonpath

TINY = ["model.name=vit_tiny_patch16_224", "model.overrides.img_size=16", "model.overrides.patch_size=4",
        "model.overrides.embed_dim=32", "model.overrides.depth=1", "model.overrides.num_heads=2", "model.proj_dim=16"]


def test_bench_train_prints_positive_figures():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=pythonpath(REPO))
    cmd = [sys.executable, str(REPO / "tools" / "bench_train.py"), "--config", str(REPO / "configs" / "demo_digits.yaml"),
           "--batch", "8", "--steps", "1", "--warmup", "1", "--baseline", "on", "--quiet", "run.device=cpu", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", proc.stdout, flags=re.M))
    assert rows["world x micro x accum = global images"] == "1 x 8 x 1 = 8"

    def number(prefix):
        (value,) = [v for k, v in rows.items() if k.startswith(prefix)]
        return float(value)

    for prefix in ("step time (median, s)", "images/s", "views/s", "peak memory", "GFLOPs per step",
                   "achieved TFLOP/s", "bare PyTorch step", "step time ratio"):
        assert number(prefix) > 0, prefix
    assert number("views/s") == __import__("pytest").approx(2 * number("images/s"), rel=1e-3)
    assert rows["MFU"] == "-"  # no GPU: no MFU claimed
