"""Benchmark: time and peak memory of the supervised contrastive loss, one rank's view vs the full matrix.

For each global batch of N views and a world of W ranks, on ONE process (no collectives; they are a
separate, O(N x dim) cost):

* local rows: what one rank computes in lacvit_dist.train.losses: its N/W anchor rows x the N gathered columns;
* full matrix: the N x N matrix (what a single process, or a naive "gather then compute everything"
  implementation, holds).

Both run forward + backward through ``lacvit_dist.train.losses.supcon_rows`` in fp32 with random normalised
projections and 2 views per image. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the
baseline; on CPU the process RSS sampled every millisecond by a thread (peak minus the RSS before the run;
``malloc_trim`` first so freed heap does not hide it), next to the analytic size of the largest single
intermediate (the fp32 rows x N logits). Usage:

    python tools/bench_loss.py --world 8 --views-list 256,1024,4096,16384,65536 --device cpu
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import threading
import time

import torch
import torch.nn.functional as F

from lacvit_dist.log import figure_or, markdown_table
from lacvit_dist.train.losses import supcon_rows

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency; keep the tool usable without it
    def tqdm(x, **_):
        return x

MIB = 2 ** 20
# Live n x N bytes per element at the peak of forward + backward (the fp32 logits kept for backward, the bool
# positive mask, and about four fp32 gradients/temporaries during autograd's backward; ~20 measured on CPU):
# a planning estimate, used only to skip cases that would not fit.
EST_BYTES_PER_ELEMENT = 22


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """Peak resident set size above the starting point, sampled by a thread (torch releases the GIL)."""

    def __init__(self, interval: float = 0.001):
        import psutil
        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.base = self.peak = 0

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        self.base = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / MIB


def one_run(z: torch.Tensor, labels: torch.Tensor, rows: int, offset: int, temperature: float) -> None:
    """Forward + backward of `rows` anchor rows against all of `z`."""
    z.grad = None
    anchors = z[offset:offset + rows]
    mean_log_prob_pos, _ = supcon_rows(anchors, z, labels[offset:offset + rows], labels, offset, temperature)
    (-mean_log_prob_pos).sum().backward()


def measure(z, labels, rows, offset, temperature, device, repeats) -> tuple[float, float]:
    """(median ms, peak MiB) of forward + backward; the first run also gives the memory peak."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    if device.type == "cuda":
        z.grad = None
        gc.collect()
        torch.cuda.empty_cache()
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        one_run(z, labels, rows, offset, temperature)  # warm-up (kernels, allocator)
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / MIB
    else:
        z.grad = None
        with RssPeak() as rss:
            t0 = time.perf_counter()
            one_run(z, labels, rows, offset, temperature)
            times.append(time.perf_counter() - t0)
        peak = rss.delta_mib
        if times[0] > 10:  # big CPU cases: the first run is the measurement
            repeats = 0
    # At least `repeats` timed runs, more (back to back, up to ~1 s) for short cases: on a small shared CPU a
    # lone millisecond run mostly measures thread wake-up.
    timed: list[float] = []
    budget_end = time.perf_counter() + 1.0
    while repeats and (len(timed) < repeats or (time.perf_counter() < budget_end and len(timed) < 200)):
        sync()
        t0 = time.perf_counter()
        one_run(z, labels, rows, offset, temperature)
        sync()
        timed.append(time.perf_counter() - t0)
    return 1000 * statistics.median(timed or times), peak


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=8, help="simulated number of ranks (N must divide by it)")
    ap.add_argument("--dim", type=int, default=128, help="projection dimension")
    ap.add_argument("--views-list", default="256,1024,4096,16384",
                    help="comma-separated global batch sizes in views (2 views per image)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--classes", type=int, default=100, help="number of label classes")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3,
                    help="minimum timed runs after the first, memory-measuring one (median reported; short cases "
                         "repeat for ~1 s; a first CPU run over 10 s is the only one)")
    ap.add_argument("--max-est-gib", type=float, default=None,
                    help="skip a form whose estimated peak exceeds this (default: 60%% of free memory)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU: on a small, shared machine, multi-threaded "
                         "small ops mostly measure OpenMP barrier stalls; torch's choice on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_est_gib is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
        else:
            import psutil
            free = psutil.virtual_memory().available
        args.max_est_gib = 0.6 * free / 2 ** 30
    views_list = [int(v) for v in args.views_list.split(",") if v.strip()]
    for n_views in views_list:
        if n_views % (2 * args.world):
            ap.error(f"{n_views} views do not split into {args.world} ranks of whole 2-view images")

    g = torch.Generator().manual_seed(args.seed)
    # Warm-up: lazy initialisation (kernels, thread pool, allocator) stays out of the first measurement.
    zw = F.normalize(torch.randn(256, args.dim), dim=1).to(device).requires_grad_()
    one_run(zw, torch.arange(128).repeat_interleave(2).to(device), 256, 0, args.temperature)
    del zw
    rows_out = []
    jobs = [(n, form) for n in views_list for form in ("local", "full")]
    data = {}
    for n_views, form in tqdm(jobs, desc="bench", unit="case"):
        if n_views not in data:
            data.clear()
            gc.collect()
            z = F.normalize(torch.randn(n_views, args.dim, generator=g), dim=1).to(device).requires_grad_()
            labels = torch.randint(0, args.classes, (n_views // 2,), generator=g).repeat_interleave(2).to(device)
            data[n_views] = (z, labels)
        z, labels = data[n_views]
        rows = n_views // args.world if form == "local" else n_views
        offset = (args.world - 1) * rows if form == "local" else 0  # the last rank: offset is exercised
        est_gib = EST_BYTES_PER_ELEMENT * rows * n_views / 2 ** 30
        if est_gib > args.max_est_gib:
            rows_out.append((n_views, form, None, None, 4 * rows * n_views / MIB, est_gib))
            continue
        ms, peak = measure(z, labels, rows, offset, args.temperature, device, args.repeats)
        rows_out.append((n_views, form, ms, peak, 4 * rows * n_views / MIB, est_gib))
    data.clear()

    by = {(r[0], r[1]): r for r in rows_out}
    kind = "CUDA max_memory_allocated" if device.type == "cuda" else "RSS delta (sampled)"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nSupCon loss forward+backward, fp32, dim {args.dim}, 2 views/image, {args.classes} classes, "
          f"{dev_name}, torch {torch.__version__}. Peak = {kind}; [largest tensor = fp32 rows x N logits].\n")
    def cell(value: float | None, missing: str = "skipped") -> str:
        return figure_or(value, ".1f", missing)

    table = []
    for n_views in views_list:
        _, _, lms, lpk, lbig, _ = by[(n_views, "local")]
        _, _, fms, fpk, fbig, fest = by[(n_views, "full")]
        mem_ratio = fpk / lpk if fpk and lpk and lpk > 0 else None
        time_ratio = fms / lms if fms and lms else None
        table.append((n_views, args.world, cell(lms), cell(fms), f"{cell(lpk)} [{lbig:.1f}]",
                      f"{cell(fpk, f'skipped (est {fest:.0f} GiB)')} [{fbig:.1f}]", cell(mem_ratio), cell(time_ratio)))
    print(markdown_table(("global views", "world", "local-rows ms", "full-matrix ms", "local-rows peak MiB [largest]",
                          "full-matrix peak MiB [largest]", "mem ratio full/local", "time ratio full/local"),
                         table, align="rrrrrrrr"))


if __name__ == "__main__":
    main()
