"""The parts of tools/gpu_check.sh (one prepared check on one H100/H200) and its report.

    python tools/gpu_check.py --parts-dir D --part throughput [--dry-run] [--deadline EPOCH_S]
    python tools/gpu_check.py --parts-dir D --report OUT_DIR

Each part writes D/<part>.json: {"status": ok | failed | skipped, "error", "figures"}. The figures come from
the project's own benchmarks (tools.bench_train: the full stage-1 step through the DeepSpeed engine, FLOPs
counted; tools.bench_loader: the real training stream), never from a second benchmark loop.
--dry-run: the same code on the CPU with the same presets shrunk to a tiny ViT, one or two steps, aot_eager
instead of inductor; tests/test_gpu_check.py runs it so that a typo cannot waste device time.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable


MODELS = ("vit_b16", "vit_l16", "vit_h14")
# Micro-batches (images per GPU, 2 views each) tried for the best throughput; ZeRO / bf16 as in the presets.
GPU_BATCHES = {"vit_b16": (128, 256), "vit_l16": (64, 128), "vit_h14": (32, 64)}
# ViT-H/14 with ZeRO-2 + activation checkpointing: ~80 MB of activations per image (2 views) estimated, so
# ~1500 images on 140 GB; each try builds the model and takes 2 steps, and the search stops at the first OOM.
GPU_MAX_BATCHES = (256, 512, 1024, 1536, 2048)
DRY_TINY = ["model.overrides.img_size=16", "model.overrides.patch_size=4", "model.overrides.embed_dim=32",
            "model.overrides.depth=1", "model.overrides.num_heads=2", "model.proj_dim=16"]
PARTS = ("matmul", "throughput", "loss_share", "loader", "max_batch", "compile")


class Plan:
    """What each part runs: the device plan or the CPU dry run."""

    def __init__(self, dry_run: bool, deadline: float):
        self.dry_run, self.deadline = dry_run, deadline
        self.device = "cpu" if dry_run else "cuda"
        self.batches = {m: (2,) for m in MODELS} if dry_run else GPU_BATCHES
        # The compile path is the same code for every preset: the dry run compiles one (aot_eager, slow on CPU).
        self.compile_models = ("vit_l16",) if dry_run else ("vit_l16", "vit_b16", "vit_h14")
        self.loader_img = 32 if dry_run else 224
        self.max_batches = (2, 4) if dry_run else GPU_MAX_BATCHES
        self.steps, self.warmup = (1, 1) if dry_run else (10, 3)
        self.compile_backend = "aot_eager" if dry_run else "inductor"

    def left_s(self) -> float:
        return self.deadline - time.time()

    def bench_args(self, model: str, batch: int, extra: list[str], steps: int | None = None,
                   flops: bool = True, warmup: int | None = None) -> list[str]:
        args = ["--preset", model, "--batch", str(batch), "--steps", str(steps or self.steps),
                "--warmup", str(self.warmup if warmup is None else warmup), "--device", self.device, "--baseline", "off", "--quiet"]
        if not flops:
            args.append("--no-flops")
        # Random weights: the device cannot download, and the speed does not depend on them.
        overrides = ["model.pretrained=false", "data.num_workers=0", *extra]
        return args + overrides + (DRY_TINY if self.dry_run else [])


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower()


def bench(plan: Plan, model: str, batch: int, extra: list[str] | None = None, **kw) -> dict[str, Any]:
    """One tools.bench_train run (the stage-1 step through the engine) in this process's process group."""
    from tools import bench_train as B

    try:
        return B.run(B.parse_args(plan.bench_args(model, batch, list(extra or []), **kw)))
    finally:
        _free_memory()


def _compact(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("model", "params_m", "micro_batch", "precision", "zero_stage", "checkpointing", "step_s", "images_per_s",
            "views_per_s", "peak_memory_gib", "flops_per_step", "tflops_per_s_per_rank", "mfu", "peak_tflops", "device")
    return {k: r.get(k) for k in keys}


def part_matmul(plan: Plan, _: dict) -> dict[str, Any]:
    """The bf16 matrix-product ceiling of this card (random data, median of 10 after 3 warm-ups)."""
    import torch

    n = 256 if plan.dry_run else 8192
    a, b = (torch.randn(n, n, device=plan.device).to(torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        if plan.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if plan.device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return {"n": n, "bf16_matmul_tflops": 2 * n ** 3 / statistics.median(times) / 1e12,
            "device": torch.cuda.get_device_name() if plan.device == "cuda" else "cpu",
            "torch": torch.__version__}


def part_throughput(plan: Plan, _: dict) -> dict[str, Any]:
    """Eager bf16 stage-1 throughput of each preset at each candidate micro-batch; the best per model."""
    out: dict[str, Any] = {}
    for model in MODELS:
        runs = []
        for batch in plan.batches[model]:
            if plan.left_s() < 20:
                runs.append({"micro_batch": batch, "skipped": "time budget"})
                continue
            try:
                runs.append(_compact(bench(plan, model, batch)))
            except Exception as err:  # noqa: BLE001 - an OOM at the larger batch is a result, not a failure
                if not _is_oom(err):
                    raise
                runs.append({"micro_batch": batch, "oom": True})
        timed = [r for r in runs if r.get("images_per_s")]
        out[model] = {"runs": runs, "best": max(timed, key=lambda r: r["images_per_s"]) if timed else None}
    return out


def _eager_best(done: dict, model: str) -> dict[str, Any] | None:
    return (done.get("throughput", {}).get("figures") or {}).get(model, {}).get("best")


def part_compile(plan: Plan, done: dict) -> dict[str, Any]:
    """The same step under torch.compile (DeepSpeed's engine.compile) at each model's best eager batch;
    ViT-L first (the MFU goal is set for it). MFU counts the model's FLOPs, which compiling does not change: the
    eager run's count at the same batch is used, since a FLOP counter (a dispatch mode) sees only the kernels of
    a compiled graph that go through aten, and makes dynamo skip frames it has not compiled yet."""
    out: dict[str, Any] = {}
    for model in plan.compile_models:
        if plan.left_s() < (30 if plan.dry_run else 120):  # inductor's first compile of a ViT takes ~1 min
            out[model] = {"skipped": "time budget"}
            continue
        eager = _eager_best(done, model)
        extra = ["deepspeed.compile=true", f"deepspeed.compile_backend={plan.compile_backend}"]
        start = time.time()
        r = _compact(bench(plan, model, eager["micro_batch"] if eager else plan.batches[model][0], extra,
                           flops=eager is None))
        if eager and eager.get("flops_per_step"):
            r["flops_per_step"] = eager["flops_per_step"]
            r["tflops_per_s_per_rank"] = eager["flops_per_step"] / r["step_s"] / 1e12
            if eager.get("peak_tflops"):
                r.update(mfu=r["tflops_per_s_per_rank"] / eager["peak_tflops"], peak_tflops=eager["peak_tflops"])
        out[model] = {**r, "backend": plan.compile_backend, "wall_s_with_compile": time.time() - start}
        import torch._dynamo

        torch._dynamo.reset()
    return out


def part_loss_share(plan: Plan, done: dict) -> dict[str, Any]:
    """Share of the eager step time spent in the gathered loss (forward + backward of SupConLoss on bf16
    projections at the best batch). On one GPU the gather copies nothing across ranks: the collective's own
    cost on N GPUs is not in this figure."""
    import torch

    from lacvit_dist.train.losses import SupConLoss

    out = {}
    for model in MODELS:
        best = _eager_best(done, model)
        if not best:
            out[model] = {"skipped": "no eager throughput figure"}
            continue
        micro = best["micro_batch"]
        gen = torch.Generator().manual_seed(0)
        z = torch.nn.functional.normalize(torch.randn(micro, 2, 128, generator=gen), dim=-1)
        labels = torch.randint(0, max(2, micro // 4), (micro,), generator=gen).to(plan.device)
        loss_fn = SupConLoss(0.1, check_shapes="never")
        times = []
        for i in range(3 + 3 * plan.steps):
            x = z.to(plan.device, torch.bfloat16).requires_grad_(True)
            if plan.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss_fn(x, labels)[0].backward()
            if plan.device == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - start)
        loss_s = statistics.median(times)
        out[model] = {"micro_batch": micro, "loss_s": loss_s, "step_s": best["step_s"],
                      "share": loss_s / best["step_s"]}
    return out


def part_loader(plan: Plan, done: dict) -> dict[str, Any]:
    """The real training stream at 224 px with one worker per core (digits shards, PNG, upscaled), against
    the images/s each model's best step consumes."""
    from tools import bench_loader as L

    workers = 1 if plan.dry_run else (os.cpu_count() or 1)
    args = ["--img-size", str(plan.loader_img), "--workers", str(workers), "--batch", "8" if plan.dry_run else "256",
            "--batches", "2" if plan.dry_run else "40", "--quiet"]
    result = L.run(L.parse_args(args))
    figures = done.get("throughput", {}).get("figures") or {}
    compiled = done.get("compile", {}).get("figures") or {}
    consumed = {}
    for model in MODELS:
        rates = [r.get("images_per_s") for r in ((figures.get(model) or {}).get("best") or {}, compiled.get(model) or {})]
        rates = [r for r in rates if r]
        if rates:
            consumed[model] = {"gpu_images_per_s": max(rates),
                               "loader_over_gpu": result["train_loader_images_per_s"] / max(rates)}
    return {"loader": result, "against_gpu": consumed}


def part_max_batch(plan: Plan, _: dict) -> dict[str, Any]:
    """The largest ViT-H/14 micro-batch that trains one step with ZeRO-2 and activation checkpointing."""
    extra = ["deepspeed.zero_stage=2", "model.activation_checkpointing=timm"]
    tried, largest = [], None
    for batch in plan.max_batches:
        if plan.left_s() < 30:
            tried.append({"micro_batch": batch, "skipped": "time budget"})
            break
        try:
            r = _compact(bench(plan, "vit_h14", batch, extra, steps=1, flops=False, warmup=1))
        except Exception as err:  # noqa: BLE001
            if not _is_oom(err):
                raise
            tried.append({"micro_batch": batch, "oom": True})
            break
        tried.append(r)
        largest = r
    return {"largest": largest, "tried": tried, "searched_up_to": plan.max_batches[-1]}


RUNNERS: dict[str, Callable[[Plan, dict], dict[str, Any]]] = {
    "matmul": part_matmul, "throughput": part_throughput, "loss_share": part_loss_share, "loader": part_loader,
    "compile": part_compile, "max_batch": part_max_batch}


def load_parts(parts_dir: Path) -> dict[str, dict]:
    return {p: json.loads((parts_dir / f"{p}.json").read_text()) for p in PARTS if (parts_dir / f"{p}.json").exists()}


def run_parts(names: list[str], plan: Plan, parts_dir: Path) -> int:
    """Run the parts in one process group; a failed part is recorded and the next one still runs."""
    from lacvit_dist import distributed as D

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(D.free_port()))
    failed = 0
    with D.job(plan.device):
        for name in names:
            start = time.time()
            entry: dict[str, Any] = {"status": "ok", "error": None, "figures": None}
            try:
                entry["figures"] = RUNNERS[name](plan, load_parts(parts_dir))
            except Exception:  # noqa: BLE001 - reported in the part's entry; the other parts still run
                entry.update(status="failed", error=traceback.format_exc(limit=8))
                failed += 1
            entry["wall_s"] = time.time() - start
            (parts_dir / f"{name}.json").write_text(json.dumps(entry, indent=1, default=str))
            print(f"gpu_check: {name}: {entry['status']} in {entry['wall_s']:.1f} s", flush=True)
            _free_memory()
    return 1 if failed else 0


def markdown(parts: dict[str, dict], tests: dict[str, Any]) -> str:
    from lacvit_dist.log import figure_or, markdown_table

    lines = ["# GPU check", ""]
    mm = (parts.get("matmul") or {}).get("figures") or {}
    ceiling = mm.get("bf16_matmul_tflops")
    lines += [f"Device: {mm.get('device', '?')}, torch {mm.get('torch', '?')}; bf16 matmul ceiling "
              f"{figure_or(ceiling, '.3g')} TFLOP/s (n={mm.get('n')}).", "",
              f"GPU test subset (tests/test_gpu_cuda.py): exit {tests.get('rc')}; {tests.get('summary', '-')}", "",
              markdown_table(("part", "status", "wall s"),
                             [(p, parts[p]["status"] if p in parts else "not run",
                               figure_or(parts.get(p, {}).get("wall_s"), ".0f")) for p in PARTS], align="llr")]
    rows = []
    thr = (parts.get("throughput") or {}).get("figures") or {}
    comp = (parts.get("compile") or {}).get("figures") or {}
    for model in MODELS:
        for mode, r in (("eager", (thr.get(model) or {}).get("best")), ("compiled", comp.get(model))):
            if not r or "images_per_s" not in r:
                continue
            tf = r.get("tflops_per_s_per_rank")
            rows.append((model, mode, r["micro_batch"], figure_or(r["images_per_s"], ".1f"), figure_or(r["views_per_s"], ".1f"),
                         figure_or(r["step_s"], ".4f"), figure_or(r["peak_memory_gib"], ".1f"), figure_or(tf, ".1f"),
                         figure_or(r.get("mfu"), ".3f"), figure_or(tf / ceiling if tf and ceiling else None, ".3f")))
    lines += ["", "## Stage-1 throughput (bf16, 224 px, one GPU)", "",
              markdown_table(("model", "mode", "micro-batch", "images/s", "views/s", "step s", "peak GiB", "TFLOP/s",
                              "MFU (datasheet)", "MFU (matmul ceiling)"), rows, align="llrrrrrrrr")]
    mb = (parts.get("max_batch") or {}).get("figures") or {}
    largest = mb.get("largest") or {}
    lines += ["", f"Largest ViT-H/14 micro-batch, ZeRO-2 + activation checkpointing: {largest.get('micro_batch', '-')} "
              f"(peak {figure_or(largest.get('peak_memory_gib'), '.1f')} GiB; tried {[t.get('micro_batch') for t in mb.get('tried', [])]}, "
              f"OOM at {[t['micro_batch'] for t in mb.get('tried', []) if t.get('oom')] or 'none'}).", ""]
    share = (parts.get("loss_share") or {}).get("figures") or {}
    lines += ["Share of the eager step in the gathered loss (forward + backward; one GPU, no cross-rank traffic): " +
              ", ".join(f"{m} {figure_or(v.get('share'), '.3f')}" for m, v in share.items()), ""]
    ld = (parts.get("loader") or {}).get("figures") or {}
    loader = ld.get("loader") or {}
    lines += [f"Loader at {loader.get('img_size', '-')} px, {loader.get('workers', '-')} workers: {figure_or(loader.get('train_loader_images_per_s'), '.0f')} "
              f"images/s (bare decode + augment {figure_or(loader.get('bare_images_per_s'), '.0f')}); loader / GPU: " +
              ", ".join(f"{m} {figure_or(v['loader_over_gpu'], '.2f')}" for m, v in (ld.get("against_gpu") or {}).items()), ""]
    for p in PARTS:
        if parts.get(p, {}).get("status") == "failed":
            lines += [f"### {p} failed", "", "```", parts[p]["error"].strip(), "```", ""]
    return "\n".join(lines)


def write_report(parts_dir: Path, out: Path) -> dict[str, Any]:
    parts = load_parts(parts_dir)
    tests_file = parts_dir / "tests.json"
    tests = json.loads(tests_file.read_text()) if tests_file.exists() else {"rc": None, "summary": "not run"}
    out.mkdir(parents=True, exist_ok=True)
    report = {"parts": parts, "gpu_tests": tests}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(parts, tests))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts-dir", type=Path, required=True)
    p.add_argument("--part", help=f"comma-separated, from {','.join(PARTS)}")
    p.add_argument("--report", type=Path, help="merge the parts into OUT/gpu_check.{md,json}")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, one step")
    p.add_argument("--deadline", type=float, default=time.time() + 420, help="epoch seconds; later runs are skipped")
    args = p.parse_args(argv)
    args.parts_dir.mkdir(parents=True, exist_ok=True)
    if args.report:
        report = write_report(args.parts_dir, args.report)
        print((args.report / "gpu_check.md").read_text(), flush=True)
        failed = [k for k, v in report["parts"].items() if v["status"] == "failed"]
        return 1 if failed or report["gpu_tests"].get("rc") not in (0, None) else 0
    names = [n for n in (args.part or ",".join(PARTS)).split(",") if n]
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        p.error(f"--part: unknown {unknown}; parts are {list(PARTS)}")
    return run_parts(names, Plan(args.dry_run, args.deadline), args.parts_dir)


if __name__ == "__main__":
    sys.exit(main())
