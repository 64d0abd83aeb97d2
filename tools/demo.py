"""The README's main job: shard scikit-learn's digits, then run LaCViT stage 1, stage 2 and the CE baseline
on 2 CPU ranks under the deepspeed launcher, and print method / Top-1 / Top-5 / wall time.

    python tools/demo.py [--ranks 2] [--config configs/demo_digits.yaml] [extra key=value overrides]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lacvit_dist.distributed import free_port
from lacvit_dist.log import markdown_table

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo_digits.yaml"))
    parser.add_argument("--data", default=str(REPO / "data" / "digits"))
    parser.add_argument("--output-dir", default=str(REPO / "runs"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    if not (Path(args.data) / "_info.json").exists():
        from lacvit_dist.data.make_shards import main as make_shards
        if make_shards(["digits", "--out", args.data]) != 0:
            return 1
    run_name = time.strftime("demo-%Y%m%d-%H%M%S")
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
           str(REPO / "train.py"), "--config", args.config, f"data.root={args.data}",
           f"run.output_dir={args.output_dir}", f"run.name={run_name}", *args.overrides]
    print("+", " ".join(cmd), flush=True)
    started = time.time()
    code = subprocess.call(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if code != 0:
        print(f"training failed with exit code {code}", file=sys.stderr)
        return code
    run_dir = Path(args.output_dir) / run_name
    res = {s: json.loads((run_dir / s / "results.json").read_text()) for s in ("stage1", "stage2", "baseline")}
    rows = [("LaCViT (stage 1 + stage 2)", res["stage2"]["test"], res["stage1"]["wall_time_s"] + res["stage2"]["wall_time_s"]),
            ("CE fine-tuning baseline", res["baseline"]["test"], res["baseline"]["wall_time_s"])]
    print(f"\nDigits test split ({res['stage2']['test']['samples']} images, every one evaluated once), "
          f"{args.ranks} CPU ranks, run folder {run_dir}:")
    print(markdown_table(("method", "Top-1", "Top-5", "wall time (s)"),
                         [(method, f"{test['top1']:.4f}", f"{test['top5']:.4f}", f"{wall:.0f}")
                          for method, test, wall in rows]))
    print(f"\ntotal {time.time() - started:.0f} s; TensorBoard: tensorboard --logdir {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
