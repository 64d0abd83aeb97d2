"""Training checkpoints through DeepSpeed (2 gloo ranks): exact resume for ZeRO 0 and 2, crash-safe `latest`,
pruning, incomplete tags ignored; RNG round trip; safe loading of user weight files."""
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_helpers import run_in_processes

from lacvit_dist.distributed import barrier
from lacvit_dist.models.layouts import load_state_dict_file
from lacvit_dist.train import checkpoint as ck

K, N = 3, 6  # save after step K, train to step N


def _engine(zero_stage, world_size, init_seed):
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    torch.manual_seed(init_seed)
    # Dropout draws from torch's RNG: an exact resume needs each rank's RNG stream back too.
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    scheduler = LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "train_batch_size": 4 * world_size, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": zero_stage}, "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                      dist_init_required=False)
    return engine


def _train(engine, rank, steps):
    losses = []
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + rank)  # the data of a step depends on the step only
        x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def _full_params(engine, zero_stage):
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {n: p.detach().clone().numpy() for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone().numpy() for n, p in engine.module.named_parameters()}


def _resume_run(rank, world_size, root, zero_stage):
    """Train 1..N saving at K; a fresh engine (other init, other RNG) resumes from `latest` and trains K+1..N."""
    ckpt_dir = Path(root) / f"zero{zero_stage}"
    engine = _engine(zero_stage, world_size, init_seed=0)
    torch.manual_seed(100 + rank)  # per-rank dropout streams
    _train(engine, rank, range(1, K + 1))
    ck.save_training_checkpoint(engine, ckpt_dir, K, {"step": K, "rng": ck.gather_rng_states()}, keep_last=2)
    reference = _train(engine, rank, range(K + 1, N + 1))
    ref_params, ref_lr = _full_params(engine, zero_stage), engine.get_lr()[0]
    del engine

    resumed = _engine(zero_stage, world_size, init_seed=1)
    torch.manual_seed(999)
    tag = ck.find_latest_everywhere(ckpt_dir)
    client = ck.load_training_checkpoint(resumed, ckpt_dir, tag)
    ck.set_rng_state(client["rng"][rank])
    losses = _train(resumed, rank, range(client["step"] + 1, N + 1))
    return {"tag": tag, "step": client["step"], "reference": reference, "resumed": losses,
            "params": (ref_params, _full_params(resumed, zero_stage)), "lr": (ref_lr, resumed.get_lr()[0]),
            "global_steps": resumed.global_steps}


def _check_resume(results):
    for r in results:
        assert r["tag"] == "step00000003" and r["step"] == K
        assert len(r["resumed"]) == N - K
        np.testing.assert_allclose(r["resumed"], r["reference"], rtol=0, atol=1e-6)
        ref, got = r["params"]
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-6, err_msg=name)
        assert r["lr"][0] == pytest.approx(r["lr"][1])
        assert r["global_steps"] == N
    assert results[0]["reference"] != results[1]["reference"]  # the ranks really saw different data


def _all_runs(rank, world_size, root):
    """One 2-process job for every engine scenario (spawning and importing DeepSpeed once)."""
    out = {"save_cycle": _save_cycle(rank, world_size, root)}
    for zero_stage in ZERO_STAGES:
        out[zero_stage] = _resume_run(rank, world_size, root, zero_stage)
    return out


ZERO_STAGES = (0, 2, 3)  # ZeRO-3 works on CPU with gloo (params partitioned, gathered to compare)


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_runs")
    (root / "ckpt").mkdir()
    (root / "ckpt" / "notes").mkdir()  # not one of our tags: never touched
    return root, run_in_processes(_all_runs, 2, str(root), timeout=240)


@pytest.mark.parametrize("zero_stage", ZERO_STAGES)
def test_resume_continues_exactly(engine_runs, zero_stage):
    _check_resume([r[zero_stage] for r in engine_runs[1]])


def _save_cycle(rank, world_size, root):
    """keep_last pruning, a crash during a save (exception after part of the folder was written), recovery."""
    from lacvit_dist.distributed import detect_world, init_distributed

    init_distributed(detect_world(), "gloo")  # hands the helper's process group to DeepSpeed
    ckpt_dir = Path(root) / "ckpt"
    engine = _engine(0, world_size, init_seed=0)
    seen = {}
    for step in (1, 2, 3):
        _train(engine, rank, [step])
        path = ck.save_training_checkpoint(engine, ckpt_dir, step, {"step": step}, keep_last=2)
        seen[step] = (path.name, sorted(p.name for p in ckpt_dir.iterdir()))
    params_at_3 = _full_params(engine, 0)

    original = engine.save_checkpoint

    def crashing_save(save_dir, tag, **kwargs):  # part of the folder is written, then the save dies
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        Path(save_dir, tag, f"partial_rank{rank}.pt").write_bytes(b"torn")
        raise OSError("disk full (simulated)")

    engine.save_checkpoint = crashing_save
    _train(engine, rank, [4])
    try:
        ck.save_training_checkpoint(engine, ckpt_dir, 4, {"step": 4}, keep_last=2)
        crash = None
    except OSError as exc:
        crash = str(exc)
    engine.save_checkpoint = original
    barrier()
    after_crash = (ck._read_latest(ckpt_dir), ck.find_latest(ckpt_dir), ck.is_complete(ckpt_dir, "step00000004"),
                   (ckpt_dir / "step00000004").is_dir())

    # A fresh engine resumes from the last good tag and gets the step-3 weights.
    resumed = _engine(0, world_size, init_seed=5)
    client = ck.load_training_checkpoint(resumed, ckpt_dir, ck.find_latest_everywhere(ckpt_dir))
    resumed_ok = all(np.array_equal(v, params_at_3[k]) for k, v in _full_params(resumed, 0).items())

    _train(resumed, rank, [4, 5])  # the next good save replaces the debris and prunes
    ck.save_training_checkpoint(resumed, ckpt_dir, 5, {"step": 5}, keep_last=2)
    final = sorted(p.name for p in ckpt_dir.iterdir())
    return {"seen": seen, "crash": crash, "after_crash": after_crash, "client": client, "resumed_ok": resumed_ok,
            "final": final, "latest": ck._read_latest(ckpt_dir)}


def test_save_prune_crash_and_recover(engine_runs):
    tmp_path, per_rank = engine_runs
    results = [r["save_cycle"] for r in per_rank]
    r = results[0]
    assert r["seen"][1] == ("step00000001", ["latest", "notes", "step00000001"])
    assert r["seen"][3] == ("step00000003", ["latest", "notes", "step00000002", "step00000003"])  # keep_last=2
    for rr in results:
        assert rr["crash"] == "disk full (simulated)"
        # latest still names the previous complete tag; the torn folder exists but is never resumed from
        assert rr["after_crash"] == ("step00000003", "step00000003", False, True)
        assert rr["client"]["step"] == 3 and rr["resumed_ok"]
    assert r["final"] == ["latest", "notes", "step00000003", "step00000005"]  # debris of step 4 removed
    assert r["latest"] == "step00000005"
    marker = json.loads((tmp_path / "ckpt" / "step00000005" / ck.COMPLETE_MARKER).read_text())
    assert marker["step"] == 5 and marker["world_size"] == 2


def _fake_tag(ckpt_dir, step, complete=True):
    d = ckpt_dir / ck.tag_for_step(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / ck.COMPLETE_MARKER).write_text("{}")
    return d.name


def test_find_latest_ignores_incomplete_and_falls_back(tmp_path, caplog):
    assert ck.find_latest(tmp_path / "nothing") is None
    t1, t2 = _fake_tag(tmp_path, 10), _fake_tag(tmp_path, 20)
    t3 = _fake_tag(tmp_path, 30, complete=False)
    (tmp_path / "latest").write_text(t2)
    assert ck.find_latest(tmp_path) == t2
    (tmp_path / "latest").write_text(t3 + "\n")  # latest names an incomplete folder
    with caplog.at_level("WARNING"):
        assert ck.find_latest(tmp_path) == t2
    assert "incomplete" in caplog.text and t3 in caplog.text
    caplog.clear()
    (tmp_path / "latest").write_text("step00000099")  # ... or a missing one
    with caplog.at_level("WARNING"):
        assert ck.find_latest(tmp_path) == t2
    assert "missing" in caplog.text
    (tmp_path / "latest").unlink()
    assert ck.find_latest(tmp_path) == t2
    assert ck.complete_tags(tmp_path) == [t1, t2]
    with pytest.raises(ck.CheckpointError, match="incomplete"):
        ck.load_training_checkpoint(object(), tmp_path, t3)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_training_checkpoint(object(), tmp_path, "step00000077")


class _KillingEngine:
    """Writes part of a tag folder, then the process is SIGKILLed (as by SLURM after KillWait)."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        Path(save_dir, tag, "mp_rank_00_model_states.pt").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)


def test_kill_during_save_leaves_latest_at_previous(tmp_path):
    good = _fake_tag(tmp_path, 1)
    (tmp_path / "latest").write_text(good)
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import _KillingEngine
        from lacvit_dist.train.checkpoint import save_training_checkpoint
        save_training_checkpoint(_KillingEngine(), {str(tmp_path)!r}, 2, {{}}, keep_last=1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert (tmp_path / "latest").read_text().strip() == good
    assert (tmp_path / "step00000002").is_dir() and not ck.is_complete(tmp_path, "step00000002")
    assert ck.find_latest(tmp_path) == good


def test_rng_state_round_trip():
    state = ck.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)
    ck.set_rng_state(pickle.loads(pickle.dumps(state)))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    assert ck.gather_rng_states()[0].keys() == state.keys()  # single process: a list of one


class _Custom:
    pass


def test_load_state_dict_file(tmp_path):
    from safetensors.torch import save_file

    sd = {"w": torch.randn(2, 3), "b": torch.zeros(3)}
    save_file(sd, str(tmp_path / "a.safetensors"))
    torch.save(sd, tmp_path / "b.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "c.pth")
    torch.save({"model": sd}, tmp_path / "d.pt")
    for name in ("a.safetensors", "b.pt", "c.pth", "d.pt"):
        got = load_state_dict_file(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_state_dict_file(tmp_path / "missing.pt")
    torch.save({"w": torch.zeros(1), "obj": _Custom()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt.*weights_only=True refused"):
        load_state_dict_file(tmp_path / "evil.pt")
    torch.save({"w": torch.zeros(1), "n": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"mixed\.pt: entries that are not tensors: \['n'\]"):
        load_state_dict_file(tmp_path / "mixed.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_state_dict_file(tmp_path / "bad.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported weights format"):
        load_state_dict_file(tmp_path / "w.npz")
