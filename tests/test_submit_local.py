"""launchers/submit.py with submitit's local executor (no SLURM needed): a 2-task job per stage runs like a SLURM
one (issue 13 item 6): every task's result is collected, both stages complete in one run folder, the task logs
live in `<run>/slurm/<job id>/`, and no literal `%j` folder is left."""
import json
import subprocess

from conftest import REPO
from lacvit_dist.data.shards import load_info
from test_slurm import CONFIG, SUBMIT, TINY, job_logs


def test_two_task_local_run_completes_both_stages(digits_root, tmp_path):
    proc = subprocess.run([*SUBMIT, "--cluster", "local", "--tasks-per-node", "2", "--config", str(CONFIG),
                           "--stages", "stage1", "stage2", "--output-dir", str(tmp_path), "--run-name", "loc",
                           f"data.root={digits_root}", *TINY], cwd=REPO, capture_output=True, text=True, timeout=300)
    run_dir = tmp_path / "loc"
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{job_logs(run_dir)}"

    assert not (run_dir / "slurm" / "%j").exists()
    jobs = {j["stage"]: j for j in json.loads((run_dir / "jobs.json").read_text())["jobs"]}
    assert set(jobs) == {"stage1", "stage2"} and all(j["state"] == "COMPLETED" for j in jobs.values()), jobs
    for stage, job in jobs.items():  # one log and one result per task, in the job's own folder
        names = {p.name for p in (run_dir / "slurm" / job["job_id"]).iterdir()}
        assert {f"{job['job_id']}_{t}_{kind}" for t in (0, 1) for kind in ("log.out", "result.pkl")} <= names, names
    for line in proc.stdout.splitlines():  # the status table printed at the end
        if line.startswith(("stage1 ", "stage2 ")):
            assert "COMPLETED" in line and "finished at step 2" in line, proc.stdout

    s1 = json.loads((run_dir / "stage1" / "results.json").read_text())
    s2 = json.loads((run_dir / "stage2" / "results.json").read_text())
    assert s1["world_size"] == 2 and s2["world_size"] == 2  # the two local tasks formed one process group
    assert s2["test"]["samples"] == load_info(digits_root).split("test").num_samples
    for path in ("config.yaml", "summary.csv", "stage1/timm/model.safetensors", "stage1/tb", "stage2/tb"):
        assert (run_dir / path).exists(), path


def test_debug_cluster_refuses_several_tasks(tmp_path):
    proc = subprocess.run([*SUBMIT, "--cluster", "debug", "--tasks-per-node", "2", "--config", str(CONFIG),
                           "--output-dir", str(tmp_path), "--run-name", "dbg"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--cluster debug runs one rank" in proc.stderr, proc.stderr
    assert not (tmp_path / "dbg").exists()
