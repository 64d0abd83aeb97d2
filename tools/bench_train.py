"""Synthetic-data benchmark of the full stage-1 training step (tools/bench_train.py).

One step = 2 views per image through the backbone and projection head, the gathered label-aware contrastive
loss, backward and the optimizer step, all through the DeepSpeed engine that train.py builds
(engine.build_optimizer / initialize_engine, tasks.SupConObjective.train_step with a NonFiniteGuard).
Reports images/s and views/s (global), peak memory (torch.cuda.max_memory_allocated on GPU, peak RSS on CPU),
FLOPs per step COUNTED with torch.utils.flop_counter.FlopCounterMode over one real step, MFU on GPU (counted
FLOPs / step time / peak FLOPs of the device), and, in a 1-process run, the ratio of our step time to a bare
PyTorch loop (same model, batch, losses.supcon_loss, torch optimizer, clipping) as a framework-overhead check.

Runs without a launcher (it creates a 1-rank process group itself) and under torchrun / the deepspeed launcher.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"vit_b16": "configs/vit_b16.yaml", "vit_l16": "configs/vit_l16.yaml", "vit_h14": "configs/vit_h14.yaml"}
VIEWS = 2

# Dense peak TFLOP/s per GPU (vendor data sheets, without sparsity) for MFU; --peak-tflops overrides.
PEAK_TFLOPS = {  # name fragment: {dtype: TFLOP/s}
    "H200": {"bf16": 989.5, "fp16": 989.5, "fp32": 494.7},   # fp32 via TF32 tensor cores
    "H100": {"bf16": 989.5, "fp16": 989.5, "fp32": 494.7},   # SXM; PCIe is lower: pass --peak-tflops
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "fp32": 183.0},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="configs/<preset>.yaml")
    src.add_argument("--config", help="any run config (YAML)")
    p.add_argument("--batch", type=int, default=None, help="images per rank per micro-batch (default: the config's)")
    p.add_argument("--accum", type=int, default=None, help="micro-batches per optimizer step (default: config's)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--classes", type=int, default=None, help="synthetic label range (default: batch / 4)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: the config's run.device")
    p.add_argument("--baseline", choices=["auto", "on", "off"], default="auto",
                   help="bare PyTorch loop for the overhead ratio (auto: on CPU in a 1-process run)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra step)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.overrides.depth=2")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_bytes(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "GPU max_memory_allocated"
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak RSS (whole process)"


def _peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, table in PEAK_TFLOPS.items():
        if fragment in name:
            return table.get(precision) or None
    return None


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def _time_steps(step_fn, n_warmup: int, n_steps: int, device: torch.device, show: bool, label: str) -> list[float]:
    for _ in _progress(range(n_warmup), f"{label} warm-up", show):
        step_fn()
    _sync(device)
    times = []
    for _ in _progress(range(n_steps), f"{label} timed", show):
        start = time.perf_counter()
        step_fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _count_flops(step_fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step_fn()
    return float(counter.get_total_flops())


def _synthetic(micro: int, accum: int, img: int, classes: int, device, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(accum):
        views = torch.randn(micro, VIEWS, 3, img, img, generator=gen).to(device, dtype)
        labels = torch.randint(0, classes, (micro,), generator=gen).to(device)
        batches.append((views, labels))
    return batches


def bare_pytorch_step(cfg, batches, device, dtype):
    """The same model, batch, loss and a torch optimizer in a plain loop: no engine, no guard, no gather.
    Returns a function running one optimizer step."""
    from lacvit_dist.train.losses import supcon_loss
    from lacvit_dist.models.factory import build_contrastive_model

    torch.manual_seed(cfg.run.seed)
    model = build_contrastive_model(cfg.model).to(device, dtype).train()
    opt = cfg.stage1.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
    clip = cfg.deepspeed.gradient_clipping
    accum = len(batches)

    def step():
        for views, labels in batches:
            loss, _ = supcon_loss(model(views), labels, cfg.stage1.temperature, cfg.stage1.base_temperature,
                                  check_shapes=False)
            (loss / accum).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _time_interleaved(ours, bare, n_steps: int, device: torch.device, show: bool) -> tuple[list[float], list[float]]:
    """Alternate one step of each, so that both see the same machine state (other load, clocks, caches)."""
    t_ours, t_bare = [], []
    for _ in _progress(range(n_steps), "timed (lacvit_dist + bare PyTorch, interleaved)", show):
        for fn, out in ((ours, t_ours), (bare, t_bare)):
            start = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - start)
    return t_ours, t_bare


def run(args: argparse.Namespace) -> dict[str, Any]:

    from lacvit_dist import distributed as D
    from lacvit_dist.config import load_config

    overrides = list(args.overrides)
    if args.batch is not None:
        overrides.append(f"stage1.micro_batch_size={args.batch}")
    if args.accum is not None:
        overrides.append(f"stage1.grad_accum_steps={args.accum}")
    if args.device is not None:
        overrides.append(f"run.device={args.device}")
    config_path = REPO / PRESETS[args.preset] if args.preset else args.config
    cfg = load_config(config_path, overrides)
    with D.job(cfg.run.device, cfg.deepspeed.backend) as job:  # a 1-rank gloo group when there is no launcher
        if job.device.type == "cpu":
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        return _benchmark(cfg, args)


def _benchmark(cfg, args: argparse.Namespace) -> dict[str, Any]:
    from lacvit_dist import distributed as D
    from lacvit_dist.train.engine import build_optimizer, initialize_engine
    from lacvit_dist.models.factory import image_stats
    from lacvit_dist.models.memory import count_parameters
    from lacvit_dist.train.nonfinite import NonFiniteGuard
    from lacvit_dist.train.objectives import SupConObjective, engine_dtype

    rank, world_size = D.rank(), D.world_size()
    show = rank == 0 and not args.quiet
    stage = cfg.stage1
    micro, accum = stage.micro_batch_size, stage.grad_accum_steps
    classes = args.classes or max(2, micro // 4)
    total_steps = args.warmup + args.steps + (0 if args.no_flops else 1)
    torch.manual_seed(cfg.run.seed)
    task = SupConObjective(cfg, num_classes=classes)
    params = count_parameters(task.model)
    optimizer, scheduler = build_optimizer(task.model, stage, total_steps)
    engine = initialize_engine(cfg, stage, task.model, optimizer, scheduler, world_size)
    device, dtype = engine.device, engine_dtype(engine)
    img = image_stats(task.backbone).img_size
    batches = _synthetic(micro, accum, img, classes, device, dtype, seed=1000 + rank)
    guard = NonFiniteGuard(cfg.run.max_nonfinite_steps)
    task.set_train_mode(engine.module)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        task.train_step(engine, batches, guard)

    baseline = args.baseline == "on" or (args.baseline == "auto" and device.type == "cpu" and world_size == 1)
    baseline = baseline and world_size == 1  # the bare loop is one process
    # Warm-up, the FLOP count (one real step) and the peak memory of our step come first; with the baseline,
    # the timed steps then alternate between the two loops.
    times = _time_steps(step, args.warmup, 0 if baseline else args.steps, device, show, "lacvit_dist")
    flops = None if args.no_flops else _count_flops(step)
    peak_bytes, peak_kind = _peak_memory_bytes(device)
    bare_times = None
    if baseline:
        bare = bare_pytorch_step(cfg, batches, device, dtype)
        _time_steps(bare, args.warmup, 0, device, show, "bare PyTorch")
        times, bare_times = _time_interleaved(step, bare, args.steps, device, show)
    if guard.skipped:
        raise RuntimeError(f"{guard.skipped} benchmark steps had a non-finite loss; the timings are not valid")

    # The slowest rank sets the pace: take the max over ranks of the median step time.
    median = statistics.median(times)
    if world_size > 1:
        slowest = torch.tensor([median], dtype=torch.float64, device=D.collective_device())
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        median = float(slowest.item())
    global_images = micro * accum * world_size
    result: dict[str, Any] = {
        "model": cfg.model.name, "params_m": params / 1e6, "img_size": img, "world": world_size,
        "micro_batch": micro, "accum": accum, "global_images": global_images, "precision": cfg.deepspeed.precision,
        "zero_stage": cfg.deepspeed.zero_stage, "checkpointing": cfg.model.activation_checkpointing,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "step_s": median, "step_s_mean": statistics.fmean(times), "images_per_s": global_images / median,
        "views_per_s": VIEWS * global_images / median, "peak_memory_gib": peak_bytes / 1024 ** 3,
        "peak_memory_kind": peak_kind, "flops_per_step": flops, "mfu": None, "bare_step_s": None, "ratio": None,
    }
    if flops is not None:
        # FlopCounterMode counts this rank's step; every rank does the same work.
        result["tflops_per_s_per_rank"] = flops / median / 1e12
        peak = _peak_tflops(device, cfg.deepspeed.precision, args.peak_tflops)
        if peak:
            result["mfu"] = flops / median / (peak * 1e12)
            result["peak_tflops"] = peak
    if bare_times is not None:
        result["bare_step_s"] = statistics.median(bare_times)
        result["ratio"] = median / result["bare_step_s"]
    return result


def result_table(r: dict[str, Any]) -> str:
    from lacvit_dist.log import figure_or as fmt, markdown_table

    rows = [
        ("model", f"{r['model']} ({r['params_m']:.2f}M params, {r['img_size']}px)"),
        ("device", r["device"]),
        ("world x micro x accum = global images", f"{r['world']} x {r['micro_batch']} x {r['accum']} = {r['global_images']}"),
        ("precision / ZeRO / activation checkpointing", f"{r['precision']} / {r['zero_stage']} / {r['checkpointing']}"),
        ("step time (median, s)", fmt(r["step_s"], ".4f")),
        ("images/s", fmt(r["images_per_s"], ".1f")),
        ("views/s", fmt(r["views_per_s"], ".1f")),
        (f"peak memory (GiB, {r['peak_memory_kind']})", fmt(r["peak_memory_gib"], ".3f")),
        ("GFLOPs per step per rank (counted)", fmt(None if r["flops_per_step"] is None else r["flops_per_step"] / 1e9, ".2f")),
        ("achieved TFLOP/s per rank", fmt(r.get("tflops_per_s_per_rank"), ".3g")),
        ("MFU" if r["checkpointing"] == "none" else "MFU (counted FLOPs include the recompute: HFU)",
         fmt(r["mfu"], ".3f")),
        ("bare PyTorch step (median, s)", fmt(r["bare_step_s"], ".4f")),
        ("step time ratio lacvit_dist / bare PyTorch", fmt(r["ratio"], ".3f")),
    ]
    return markdown_table(("metric", "value"), rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    from lacvit_dist import distributed as D

    if D.rank() == 0:
        print(result_table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
