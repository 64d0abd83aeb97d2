"""DataLoader workers never fork the (multi-threaded) trainer: CPython 3.11.7 can deadlock a child forked while
another thread holds the interpreter's thread-list lock (gh-112275), and evaluation starts fresh workers every
time. Workers come from a fork server instead; many loaders back to back, while threads come and go, finish."""
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import webdataset as wds
from PIL import Image

from conftest import REPO
from lacvit_dist.data.pipeline import eval_loader, train_loader
from lacvit_dist.data.shards import SplitInfo
from lacvit_dist.data.transforms import ImageStats, evaluation

STATS = ImageStats(img_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _split(tmp_path, shards: int = 2, per_shard: int = 8) -> SplitInfo:
    names = []
    for s in range(shards):
        names.append(str(tmp_path / f"train-{s:06d}.tar"))
        with wds.TarWriter(names[-1]) as sink:
            for i in range(per_shard):
                buffer = io.BytesIO()
                Image.new("RGB", (8, 8), (i, s, 0)).save(buffer, format="PNG")
                sink.write({"__key__": f"s{s}_{i}", "png": buffer.getvalue(), "cls": str(i % 3).encode()})
    return SplitInfo(name="train", filenames=tuple(names), shard_lengths=(per_shard,) * shards)


def test_train_and_eval_workers_come_from_a_fork_server(tmp_path):
    split = _split(tmp_path)
    stream = train_loader(split, 3, evaluation(STATS), 4, seed=0, num_workers=2, shuffle_buffer=0, rank=0,
                          world_size=1)
    assert len(next(stream).keys) == 4
    assert {type(worker).__name__ for worker in stream._workers} == {"ForkServerProcess"}
    passes = eval_loader(split, 3, evaluation(STATS), 4, rank=0, world_size=1, num_workers=2)
    assert passes.loader.multiprocessing_context.get_start_method() == "forkserver"
    assert sum(len(keys) for _, _, keys in passes) == 16


STRESS = textwrap.dedent("""
    import ctypes, sys, threading, time
    from lacvit_dist.data.pipeline import eval_loader
    from lacvit_dist.data.shards import SplitInfo
    from lacvit_dist.data.transforms import ImageStats, evaluation

    libc = ctypes.CDLL(None)
    # A native thread entering and leaving Python: its thread state is created and deleted under the
    # interpreter's thread-list lock, partly without the GIL, i.e. possibly while the main thread forks.
    ENTER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(lambda _: None)

    def churn(stop):
        tid = ctypes.c_ulong()
        while not stop.is_set():
            if libc.pthread_create(ctypes.byref(tid), None, ENTER, None) == 0:
                libc.pthread_join(tid, None)
            worker = threading.Thread(target=lambda: None)
            worker.start()
            worker.join()

    files, passes = sys.argv[1].split(","), int(sys.argv[2])
    split = SplitInfo("train", tuple(files), (8,) * len(files))
    stop = threading.Event()
    threads = [threading.Thread(target=churn, args=(stop,), daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    started = time.time()
    for n in range(passes):
        loader = eval_loader(split, 3, evaluation(ImageStats(8, (0.5,) * 3, (0.5,) * 3)), 4, rank=0,
                             world_size=1, num_workers=2)
        assert sum(len(keys) for _, _, keys in loader) == 8 * len(files), n
    stop.set()
    print(f"{passes} loaders in {time.time() - started:.1f} s")
""")


def test_many_loaders_back_to_back_while_threads_come_and_go(tmp_path):
    """30 evaluation passes, 2 fresh workers each, while two threads keep starting native and Python threads
    that enter and leave the interpreter. A deadlocked worker would hang the pass: the bound catches it."""
    split = _split(tmp_path)
    proc = subprocess.run([sys.executable, "-c", STRESS, ",".join(split.filenames), "30"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "30 loaders in" in proc.stdout


ORPHAN = textwrap.dedent("""
    import sys, time
    from lacvit_dist.data.pipeline import train_loader
    from lacvit_dist.data.shards import SplitInfo
    from lacvit_dist.data.transforms import ImageStats, evaluation

    split = SplitInfo("train", tuple(sys.argv[1].split(",")), (8, 8))
    stream = train_loader(split, 3, evaluation(ImageStats(8, (0.5,) * 3, (0.5,) * 3)), 4, seed=0, num_workers=2,
                          shuffle_buffer=0, rank=0, world_size=1)
    next(stream)
    print(" ".join(str(worker.pid) for worker in stream._workers), flush=True)
    time.sleep(600)
""")


def test_workers_end_with_a_killed_trainer(tmp_path):
    """kill -9 of the trainer: its workers (children of the fork server, which torch's parent check cannot see
    die) exit, the server and resource tracker with them, and the trainer's output pipe closes."""
    split = _split(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN, ",".join(split.filenames)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(pids) == 2, proc.stdout.read()
    proc.kill()
    proc.communicate(timeout=60)  # EOF only once every process holding the pipe has exited
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
