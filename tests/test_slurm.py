"""The submitit/SLURM launcher (launchers/submit.py) on a real one-node SLURM cluster started for this session
(launchers/local_cluster.py; installed by .ci/install_slurm.sh), 2 CPU tasks per job:

* stage 1 then stage 2 (afterok dependency) in one run folder, both COMPLETED, every test sample counted;
* `--status` lists both jobs; `--dry-run` prints sbatch scripts with every option and the dependency;
* SIGUSR1 during training: checkpoint, exit 75, rank 0 requeues (rank 1 waits for it), resume, finish;
* a failing `scontrol requeue` is logged, not counted against --max-requeues, and the task still exits 75.

Without SLURM (or without root) the cluster tests are skipped, except under CI=true where they fail.
"""
import contextlib
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import REPO, pythonpath

from launchers import local_cluster, slurm_job, status
from lacvit_dist.data.shards import load_info
from lacvit_dist.rank_failures import record_failure, recorded_failures

SUBMIT = [sys.executable, str(REPO / "launchers" / "submit.py")]
CONFIG = REPO / "configs" / "demo_digits.yaml"
TINY = ["model.overrides.embed_dim=32", "model.overrides.depth=1", "model.overrides.num_heads=2",
        "model.proj_dim=16", "data.num_workers=0", "data.shuffle_buffer=50"] + [
    f"{stage}.{key}" for stage in ("stage1", "stage2", "baseline")
    for key in ("epochs=1", "steps_per_epoch=2", "micro_batch_size=8", "log_every_steps=1")]
RESOURCES = ["--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "--timeout-min", "10"]


# ----------------------------------------------------------------------------------------------- helpers

def submit(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """launchers/submit.py with `args`; the jobs it submits inherit `env` (default: this one, 1 thread a rank)."""
    return subprocess.run([*SUBMIT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env or {**os.environ, "OMP_NUM_THREADS": "1"})


def job_logs(run_dir: Path, lines: int = 40) -> str:
    """The tail of every task log of every job of the run (for failure messages)."""
    out = []
    for log in sorted((run_dir / "slurm").glob("*/*_log.*")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"---- {log}\n" + "\n".join(text))
    return "\n".join(out) or f"(no job logs under {run_dir / 'slurm'})"


def cluster_logs(run_dir: Path, cluster) -> str:
    """Job logs, slurmctld's and every node's slurmd log (why a job failed to launch is only written there), and
    the cluster's status."""
    return f"{job_logs(run_dir)}\n{local_cluster.daemon_logs(cluster.dir)}\n{local_cluster.status(cluster.dir)}"


def jobs_of(run_dir: Path) -> dict[str, str]:
    return {j["stage"]: j["job_id"] for j in json.loads((run_dir / "jobs.json").read_text())["jobs"]}


def wait_until(predicate, timeout: float, what: str, details=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node cluster (slurmctld + slurmd, slurmdbd + MariaDB when installed) for the whole session."""
    missing = local_cluster.missing_binaries()
    problem = (f"SLURM is not installed ({', '.join(missing)} missing; run .ci/install_slurm.sh as root)" if missing
               else "a local SLURM cluster needs root" if os.geteuid() != 0 else None)
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: {problem}")
        pytest.skip(problem)
    with running_cluster(tmp_path_factory.mktemp("slurm"), accounting="auto") as state:
        yield state


@contextlib.contextmanager
def running_cluster(directory: Path, **start: Any) -> Iterator[Any]:
    """A cluster started in `directory`, its slurm.conf used by every SLURM client here; stopped afterwards."""
    saved = os.environ.get("SLURM_CONF")
    try:
        state = local_cluster.start(directory, timeout=90, **start)
        os.environ["SLURM_CONF"] = state.slurm_conf
        yield state
    finally:
        local_cluster.stop(directory)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved


def submit_two_stages(out: Path, resources: list[str], digits_root: Path, cluster) -> Path:
    """stage1 + stage2 submitted by the launcher (stage 2 afterok stage 1), waited for; the run folder."""
    proc = submit("--config", str(CONFIG), *resources, "--stages", "stage1", "stage2", "--output-dir", str(out),
                  "--run-name", "two", "--wait", "--wait-timeout-min", "4", f"data.root={digits_root}", *TINY)
    run_dir = out / "two"
    assert proc.returncode == 0, \
        f"submit failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{cluster_logs(run_dir, cluster)}"
    return run_dir


@pytest.fixture(scope="module")
def two_stage_run(slurm_cluster, digits_root, tmp_path_factory) -> Path:
    return submit_two_stages(tmp_path_factory.mktemp("slurm_runs"), RESOURCES, digits_root, slurm_cluster)


# ----------------------------------------------------------------------------------------------- tests

def both_stages_completed(run_dir: Path, cluster) -> dict[str, str]:
    """The run's stage1 and stage2 job ids, after checking that SLURM ended both COMPLETED."""
    jobs = jobs_of(run_dir)
    assert set(jobs) == {"stage1", "stage2"}
    states = status.job_states(list(jobs.values()))
    assert all(s["state"] == "COMPLETED" for s in states.values()), f"{states}\n{cluster_logs(run_dir, cluster)}"
    return jobs


def test_two_stage_run_on_slurm(two_stage_run, digits_root, slurm_cluster):
    run_dir = two_stage_run
    jobs = both_stages_completed(run_dir, slurm_cluster)
    entries = json.loads((run_dir / "jobs.json").read_text())["jobs"]
    assert entries[1]["depends_on"] == jobs["stage1"]  # stage 2 waited for stage 1 (afterok)
    submission = next((run_dir / "slurm" / jobs["stage2"]).glob("*_submission.sh")).read_text()
    assert f"--dependency=afterok:{jobs['stage1']}" in submission

    s1 = json.loads((run_dir / "stage1" / "results.json").read_text())
    s2 = json.loads((run_dir / "stage2" / "results.json").read_text())
    assert s1["world_size"] == 2 and s2["world_size"] == 2  # two SLURM tasks formed one process group
    assert s2["test"]["samples"] == load_info(digits_root).split("test").num_samples  # every test sample, once
    assert 0.0 <= s2["test"]["top1"] <= 1.0
    assert (run_dir / "stage1" / "timm" / "model.safetensors").exists()
    assert (run_dir / "config.yaml").exists()  # one run folder for both jobs
    # submitit's logs live in the run folder, one sub-folder per job, one log per task
    assert {p.name for p in (run_dir / "slurm" / jobs["stage1"]).glob("*_log.out")} == \
        {f"{jobs['stage1']}_0_log.out", f"{jobs['stage1']}_1_log.out"}


def test_status_lists_the_jobs(two_stage_run):
    proc = submit("--status", str(two_stage_run), timeout=60)
    assert proc.returncode == 0, proc.stderr
    jobs = jobs_of(two_stage_run)
    for stage, job_id in jobs.items():
        row = next((line for line in proc.stdout.splitlines() if line.startswith(stage)), None)
        assert row is not None and job_id in row and "COMPLETED" in row, proc.stdout
    assert "finished at step 2" in proc.stdout and "test top1" in proc.stdout
    assert str(two_stage_run / "stage1" / "tb") in proc.stdout


def test_resubmitting_a_finished_run_submits_nothing(two_stage_run, digits_root):
    proc = submit("--config", str(CONFIG), *RESOURCES, "--stages", "stage1", "stage2", "--output-dir",
                  str(two_stage_run.parent), "--run-name", two_stage_run.name, f"data.root={digits_root}", *TINY,
                  timeout=60)
    assert proc.returncode == 0 and "nothing to submit" in proc.stdout, proc.stdout + proc.stderr
    assert len(json.loads((two_stage_run / "jobs.json").read_text())["jobs"]) == 2


def test_dry_run_prints_sbatch_scripts(tmp_path, digits_root):
    proc = submit("--config", str(CONFIG), "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8",
                  "--mem", "64G", "--timeout-min", "30", "--partition", "gpu", "--account", "proj", "--qos", "high",
                  "--constraint", "a100", "--exclusive", "--sbatch-opt", "mail-type=END",
                  "--stages", "stage1", "stage2", "baseline", "--output-dir", str(tmp_path), "--run-name", "dry",
                  "--dry-run", f"data.root={digits_root}", "stage1.epochs=3", timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for option in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=64G",
                   "--time=30", "--partition=gpu", "--account=proj", "--qos=high", "--constraint=a100",
                   "--exclusive", "--signal=USR1@120", "--requeue", "--mail-type=END"):
        assert text.count(f"#SBATCH {option}") == 3, f"#SBATCH {option} not in every script:\n{text}"
    assert all(f"#SBATCH --job-name=lacvit-{s}" in text for s in ("stage1", "stage2", "baseline"))
    assert re.search(r"srun --unbuffered \S*python\S* \S*train\.py --config \S+demo_digits\.yaml .*stage1\.epochs=3 "
                     r".*--stages stage1\n", text)
    assert "--dependency=afterok:${jid_stage1}" in text
    assert text.count("afterok") >= 4  # stage 2 and baseline: a comment in the script + the sbatch flag
    assert "scontrol requeue" in text and str(tmp_path / "dry") in text
    assert not (tmp_path / "dry").exists()  # nothing submitted, nothing written


def test_config_error_stops_before_submitting(tmp_path):
    proc = submit("--config", str(CONFIG), "--output-dir", str(tmp_path), "--run-name", "bad", "stage1.epoch=3",
                  timeout=60)
    assert proc.returncode == 2 and "stage1.epoch: unknown key" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_checkpoint_hook_resubmits_the_same_task_and_counts_requeues(tmp_path):
    spec = slurm_job.StageSpec(stage="stage1", config=str(CONFIG), overrides=("a=1",), run_dir=str(tmp_path),
                                cwd=str(REPO), max_requeues=2, timeout_min=10)
    task = pickle.loads(pickle.dumps(slurm_job.SlurmStageJob(spec)))  # what submitit stores
    first = task.checkpoint()
    assert isinstance(first.function, slurm_job.SlurmStageJob) and first.function.spec == spec  # nothing frozen in
    assert task.checkpoint() is not None
    assert task.checkpoint() is None  # the third exceeds --max-requeues 2
    assert json.loads((tmp_path / "slurm" / "requeues.json").read_text()) == {"stage1": 3}


def test_world_from_slurm_variables_uses_loopback_on_one_node(monkeypatch):
    # Leaked torchrun variables from the submitting shell must not win over SLURM's.
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4321", "SLURM_PROCID": "1",
                       "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node-does-not-exist",
                       "SLURM_JOB_NUM_NODES": "1", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "0", "RANK": "7", "WORLD_SIZE": "9", "LOCAL_RANK": "3",
                       "MASTER_ADDR": "elsewhere", "MASTER_PORT": "1", "LOCAL_WORLD_SIZE": "9",
                       "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    values = slurm_job._export_world()
    assert values == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "24321"}
    assert os.environ["RANK"] == "1"


def test_signal_checkpoints_requeues_and_resumes(slurm_cluster, digits_root, tmp_path):
    signal_requeue_resume(slurm_cluster, digits_root, tmp_path, RESOURCES, world=2)


def signal_requeue_resume(cluster, digits_root: Path, tmp_path: Path, resources: list[str], world: int,
                          *overrides: str) -> Path:
    """SIGUSR1 mid-training: every rank checkpoints, rank 0 requeues while the others wait for it, the job
    resumes from the checkpoint (no step lost, none redone) and completes; returns the run folder."""
    steps = 120
    proc = submit("--config", str(CONFIG), *resources, "--stages", "stage1", "--output-dir", str(tmp_path),
                  "--run-name", "rq", "--max-requeues", "2", f"data.root={digits_root}", *TINY,
                  f"stage1.steps_per_epoch={steps}", "stage1.log_every_steps=5", *overrides, timeout=60)
    run_dir = tmp_path / "rq"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = jobs_of(run_dir)["stage1"]
    job_dir = run_dir / "slurm" / job_id

    def rank_log(rank: int) -> str:
        return "".join(p.read_text(errors="replace") for p in job_dir.glob(f"{job_id}_{rank}_log.*"))

    def state() -> dict[str, str]:
        return status.job_states([job_id])[job_id]

    def details() -> str:
        return f"{state()}\n{cluster_logs(run_dir, cluster)}"

    wait_until(lambda: re.search(rf"step (1\d|[2-9]\d|1\d\d)/{steps}\b", rank_log(0)), 120,
               "stage 1 to train 10 steps", details)
    assert state()["state"] == "RUNNING", details()
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)  # what SLURM sends before the limit

    wait_until(lambda: int(state().get("restarts", "0")) >= 1, 90, "the job to be requeued", details)
    # No StartTime override: slurmctld holds the requeued job until its old launch credentials expire
    # (AuthInfo=cred_expire in the test cluster); releasing it earlier makes slurmd refuse the launch.
    wait_until(lambda: state()["state"] in status.TERMINAL_STATES, 240, "the requeued job to finish", details)
    assert state()["state"] == "COMPLETED", details()

    assert json.loads((run_dir / "slurm" / "requeues.json").read_text()) == {"stage1": 1}, details()
    assert json.loads((job_dir / "requeue_0.json").read_text())["requeued"] is True, details()
    text = rank_log(0)
    assert re.search(r"stop requested .* exiting with code 75", text), details()
    for rank in range(1, world):  # the other ranks stayed until rank 0 had requeued the job
        assert re.search(rf"rank {rank}: rank 0 is done: checkpoint saved, job {job_id} requeued",
                         rank_log(rank)), details()
    match = re.search(rf"resumed from \S+ at step (\d+)/{steps}", text)
    assert match and 10 <= int(match.group(1)) < steps, details()  # continued, did not start over
    results = json.loads((run_dir / "stage1" / "results.json").read_text())
    assert results["steps"] == steps and results["world_size"] == world
    logged = [entry["step"] for entry in results["train_log"]]
    assert logged == list(range(5, steps + 1, 5)), details()  # every logged step once: none lost, none redone
    return run_dir


def test_failed_requeue_is_not_counted_and_other_ranks_wait_for_rank0(slurm_cluster, tmp_path, monkeypatch):
    """`scontrol requeue` of a job slurmctld does not know fails (as it does for a job SLURM is already
    requeueing): rank 0 logs it, does not count it against --max-requeues and still exits 75; rank 1 waits
    for rank 0 before it exits."""
    job_id = "987654"  # never reached by the test cluster's job ids
    run_dir = tmp_path / "run"
    (run_dir / "slurm" / job_id).mkdir(parents=True)  # submitit's job folder, as sbatch found it
    spec = slurm_job.StageSpec(stage="stage1", config=str(CONFIG), overrides=(), run_dir=str(run_dir),
                                cwd=str(REPO), max_requeues=1, timeout_min=10)
    job_env = {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(run_dir / "slurm" / "%j"),
               "SLURM_JOB_ID": job_id, "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1"}
    code = ("from launchers import slurm_job as s; "
            f"s.SlurmStageJob(s.StageSpec(**{spec.__dict__!r}))._requeue(1, s.REQUEUE_EXIT_CODE)")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_RESTART_COUNT"}
    rank1 = subprocess.Popen([sys.executable, "-c", code], env={**env, **job_env, "SLURM_PROCID": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = rank1.stdout.readline()
        assert "rank 1: checkpoint saved, waiting for rank 0" in first, first + rank1.stdout.read()
        time.sleep(1.0)
        assert rank1.poll() is None, "rank 1 left before rank 0 requeued"

        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
        for key, value in {**job_env, "SLURM_PROCID": "0"}.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(SystemExit) as exit_:
            slurm_job.SlurmStageJob(spec)._requeue(0, slurm_job.REQUEUE_EXIT_CODE)
        assert exit_.value.code == slurm_job.REQUEUE_EXIT_CODE
        assert rank1.wait(timeout=30) == slurm_job.REQUEUE_EXIT_CODE
    finally:
        if rank1.poll() is None:
            rank1.kill()
    rest = rank1.stdout.read()
    assert f"rank 1: rank 0 is done: checkpoint saved; `scontrol requeue {job_id}` failed" in rest, rest

    outcome = json.loads((run_dir / "slurm" / job_id / "requeue_0.json").read_text())
    assert outcome["requeued"] is False and "not counted against --max-requeues" in outcome["reason"]
    assert not (run_dir / "slurm" / "requeues.json").exists()  # nothing counted: the budget (1) is untouched
    resubmission = pickle.loads((run_dir / "slurm" / job_id / f"{job_id}_submitted.pkl").read_bytes())
    assert resubmission.function.spec == spec  # what the requeued job would run


def test_a_lost_peer_is_not_requeued_when_a_rank_failed_on_its_own(tmp_path, monkeypatch):
    """Rank 1 failed with a bug of its own (recorded by its task); rank 0, which saw the connection to it break,
    claims the requeue but does not requeue: the job fails with rank 1's error instead of retrying a bug, and no
    requeue is counted."""
    job_id = "987655"
    run_dir = tmp_path / "run"
    job_dir = run_dir / "slurm" / job_id
    job_dir.mkdir(parents=True)
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(run_dir / "slurm" / "%j"),
                       "SLURM_JOB_ID": job_id, "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1",
                       "SLURM_PROCID": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    record_failure(run_dir, 1, "KeyError: 'label'")
    spec = slurm_job.StageSpec(stage="stage1", config=str(CONFIG), overrides=(), run_dir=str(run_dir),
                                cwd=str(REPO), max_requeues=3, timeout_min=10)
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(RuntimeError, match=r"not requeued: rank 1 failed: KeyError: 'label'"):
        slurm_job.SlurmStageJob(spec)._requeue(0, slurm_job.LOST_PEER_EXIT_CODE)
    outcome = json.loads((job_dir / "requeue_0.json").read_text())
    assert outcome == {"requeued": False, "rank": 0, "reason": "not requeued: rank 1 failed: KeyError: 'label'"}
    assert (job_dir / "lost_peer_0.claim").read_text().strip() == "0"
    assert not (run_dir / "slurm" / "requeues.json").exists()


def test_a_ranks_own_failure_is_recorded_once_per_run_of_the_job_and_only_under_slurm(tmp_path, monkeypatch):
    """The first record of a rank wins (the trainer's error, not the launcher's "exited with code 2" after it); a
    requeued run of the job starts with none; outside SLURM nothing is written."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    record_failure(tmp_path, 1, "ValueError: no job")
    assert not (tmp_path / "slurm").exists()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    record_failure(tmp_path, 1, "ValueError: shard 3 of split train")
    record_failure(tmp_path, 1, "train.py exited with code 2")
    record_failure(tmp_path, 0, "KeyError: 'cls'")
    folder = tmp_path / "slurm" / "42"
    assert recorded_failures(folder) == ["rank 0 failed: KeyError: 'cls'", "rank 1 failed: ValueError: shard 3 of split train"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert recorded_failures(folder) == []


@pytest.mark.parametrize("launch", ["submit_py", "sbatch_script"])
def test_a_bug_on_one_rank_fails_the_job_and_is_not_retried(launch, slurm_cluster, digits_root, tmp_path):
    """Rank 1 raises an error of its own at its 3rd batch (tests/job_hooks, LACVIT_TEST_FAIL_RANK) while rank 0
    trains on. Rank 0 loses its peer and leaves with 76, as when a node dies, and srun reports 76. But rank 1
    recorded its error, so the job is not requeued (a bug would only repeat) and fails naming it: under submit.py
    (rank 0 claims the lost peer, finds the record) and under the plain sbatch script --dry-run prints alike."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath(REPO / "tests" / "job_hooks"),
           "LACVIT_TEST_FAIL_RANK": "1"}
    args = ["--config", str(CONFIG), *RESOURCES, "--stages", "stage1", "--output-dir", str(tmp_path), "--run-name",
            launch, "--max-requeues", "2", f"data.root={digits_root}", *TINY, "stage1.steps_per_epoch=50",
            "run.collective_timeout_s=600"]
    run_dir = tmp_path / launch
    if launch == "submit_py":
        proc = submit(*args, env=env, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        job_id = jobs_of(run_dir)["stage1"]
        logs = lambda: job_logs(run_dir)
    else:
        text = submit(*args, "--dry-run", timeout=60).stdout
        proc = subprocess.run(["bash", "-c", text], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
        match = re.search(r"stage1: job (\d+)", proc.stdout)
        assert proc.returncode == 0 and match, proc.stdout + proc.stderr
        job_id = match.group(1)
        logs = lambda: "".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("stage1-*")))
    details = lambda: f"{status.job_states([job_id])[job_id]}\n{logs()}\n{local_cluster.daemon_logs(slurm_cluster.dir)}"
    wait_until(lambda: status.job_states([job_id])[job_id]["state"] in status.TERMINAL_STATES, 240, "the job",
               details)
    state = status.job_states([job_id])[job_id]
    assert state["state"] == "FAILED" and state.get("restarts", "0") == "0", details()
    job_dir = run_dir / "slurm" / job_id
    assert recorded_failures(job_dir) == ["rank 1 failed: RuntimeError: injected bug on rank 1"], details()
    assert re.search(r"rank 0 lost a peer in a collective \(RuntimeError: .*gloo", logs()), details()
    assert not (run_dir / "slurm" / "requeues.json").exists()
    if launch == "submit_py":
        outcome = json.loads((job_dir / "requeue_0.json").read_text())
        assert outcome == {"requeued": False, "rank": 0,
                           "reason": "not requeued: rank 1 failed: RuntimeError: injected bug on rank 1"}, outcome
    else:
        assert "lacvit: not requeued, a rank failed on its own: " in logs() and "injected bug on rank 1" in logs()


def test_batch_shell_leaves_the_ranks_exits_to_them(tmp_path, monkeypatch):
    """After srun (submitit's teardown) the batch shell requeues only a step whose tasks were all killed with no
    rank's decision on record: finished, checkpointed (75), lost-peer (76) and failed (1) steps are the ranks'
    own business, and so is a killed step a rank already decided about (it never even reads the job's pickle)."""
    folder = tmp_path / "slurm" / "987656"
    folder.mkdir(parents=True)
    monkeypatch.setenv("SLURM_JOB_ID", "987656")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    for code in (0, 1, slurm_job.REQUEUE_EXIT_CODE, slurm_job.LOST_PEER_EXIT_CODE):
        slurm_job.after_step(folder, code)  # no pickle in the folder: loading it would raise
    (folder / "requeue_0.json").write_text(json.dumps({"requeued": True, "rank": 1, "reason": "by rank 1"}))
    slurm_job.after_step(folder, 137)
    assert sorted(p.name for p in folder.iterdir()) == ["requeue_0.json"]
    with pytest.raises(FileNotFoundError, match="987656_submitted.pkl"):  # no decision on record: it would requeue
        slurm_job.after_step(tmp_path / "slurm" / "other", 137)


def test_batch_shell_is_one_process_and_each_step_task_its_own_rank(slurm_cluster, tmp_path):
    """On the real cluster: `python` in the batch shell of a 2-task job (leaked RANK/WORLD_SIZE in the submitting
    environment) is a one-process world; each task of `srun` in that job is rank k of 2 with one master port."""
    show = (f"{sys.executable} -c \"from lacvit_dist.distributed import detect_world as d; w = d(); "
            "print('world', w.launcher, w.rank, w.world_size, w.master_addr, w.master_port, flush=True)\"")
    script = tmp_path / "world.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --output={tmp_path}/out.txt\n"
                      f"cd {tmp_path}\n{show}\nsrun {show}\n")
    env = {**os.environ, "RANK": "5", "WORLD_SIZE": "9", "MASTER_ADDR": "elsewhere", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    wait_until(lambda: status.job_states([job_id])[job_id]["state"] in status.TERMINAL_STATES, 120, "the job",
               lambda: local_cluster.daemon_logs(slurm_cluster.dir))
    lines = sorted(line.split()[1:] for line in (tmp_path / "out.txt").read_text().splitlines()
                   if line.startswith("world "))
    assert lines[0][:3] == ["single", "0", "1"], lines  # the batch shell
    steps = [line for line in lines if line[0] == "slurm"]
    assert sorted(line[1] for line in steps) == ["0", "1"] and {line[2] for line in steps} == {"2"}, lines
    assert len({(line[3], line[4]) for line in steps}) == 1 and steps[0][3] == "127.0.0.1", lines


def test_resubmitting_while_a_job_of_the_stage_is_pending_is_refused(slurm_cluster, digits_root, tmp_path):
    """A second copy of a stage still held by SLURM (pending, requeued) would train into the same run folder and
    its pruning could delete the first one's checkpoints: the launcher refuses, naming the job."""
    args = ["--config", str(CONFIG), *RESOURCES, "--stages", "stage1", "--output-dir", str(tmp_path),
            "--run-name", "held", f"data.root={digits_root}", *TINY]
    first = submit(*args, "--sbatch-opt", "begin=now+3600")  # stays PENDING for an hour
    assert first.returncode == 0, first.stdout + first.stderr
    job_id = jobs_of(tmp_path / "held")["stage1"]
    try:
        again = submit(*args)
        assert again.returncode == 2, again.stdout + again.stderr
        assert f"stage1 job {job_id} (PENDING)" in again.stderr and "scancel" in again.stderr, again.stderr
        assert len(json.loads((tmp_path / "held" / "jobs.json").read_text())["jobs"]) == 1  # nothing submitted
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    wait_until(lambda: status.job_states([job_id])[job_id]["state"] in status.TERMINAL_STATES, 60, "the cancel")
    assert status.active_jobs(tmp_path / "held", ["stage1"]) == []  # a cancelled job no longer blocks
