"""A one-node SLURM cluster started by hand, for the tests and for trying the launcher on a laptop.

    sudo .ci/install_slurm.sh                                   # once: slurmctld slurmd slurm-client munge (+ slurmdbd mariadb)
    sudo python launchers/local_cluster.py start --dir /tmp/slurm
    export SLURM_CONF=/tmp/slurm/slurm.conf                     # every SLURM client (sbatch, squeue, sacct) reads it
    python launchers/submit.py --config configs/demo_digits.yaml --nodes 1 --gpus-per-node 0 --tasks-per-node 2
    sudo python launchers/local_cluster.py status --dir /tmp/slurm
    sudo python launchers/local_cluster.py stop --dir /tmp/slurm

Everything the cluster writes lives under --dir: slurm.conf, slurmdbd.conf, state, spool, logs, pid files and,
with accounting, a private MariaDB data directory. No systemd: the daemons are started in the background and
stopped by the PIDs recorded in `<dir>/cluster.json`. munge is the exception: SLURM clients talk to the system
munged socket, so an already running munged is reused (and left running); one started here is stopped here.

Accounting (`--accounting auto|dbd|none`, default auto): without slurmdbd there is no `sacct`, and submitit
cannot tell that a job died once slurmctld has forgotten it. `dbd` starts a MariaDB server (own datadir, TCP on
127.0.0.1 with a free port, started as root) and slurmdbd, and points slurmctld at it; `auto` does that when the
binaries are installed and falls back to `none` (with a warning) if they fail to come up. Either way
slurmctld keeps finished jobs for an hour (MinJobAge) so `scontrol show job` still answers, and every finished
job is appended to `<dir>/log/jobcomp.txt` (jobcomp/filetxt).

Needs root (slurmd launches jobs as the submitting user). Ports are chosen free at start, so a second cluster
(or a real one) on the same machine does not collide.
"""
from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from lacvit_dist.distributed import free_port

from launchers.cluster import daemons
from launchers.cluster.conf import write_slurm_conf, write_slurmdbd_conf
from launchers.cluster.state import CLUSTER_NAME, DAEMONS, ClusterError, ClusterState
from launchers.cluster.daemons import missing_binaries


def _node_state(state: ClusterState) -> str:
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=daemons.client_env(state), capture_output=True, text=True,
                          timeout=15)
    return proc.stdout.strip() if proc.returncode == 0 else f"sinfo failed: {proc.stderr.strip()}"


def _wait_idle(state: ClusterState, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        last = _node_state(state)
        if last.rstrip("*") in ("idle", "mixed", "allocated"):
            return
        if last.startswith(("down", "drain")):
            subprocess.run(["scontrol", "update", f"nodename={state.hostname}", "state=resume"],
                           env=daemons.client_env(state), capture_output=True, timeout=15)
        time.sleep(0.5)
    raise ClusterError(f"node {state.hostname} not idle after {timeout:.0f} s (sinfo: {last!r})\n"
                       f"{daemon_logs(state.dir, 25)}")


# --------------------------------------------------------------------------------------------- API

def start(directory: str | Path, accounting: str = "auto", timeout: float = 60) -> ClusterState:
    """Start (or find already running) the cluster in `directory`; returns its state (`.env` for clients)."""
    d = Path(directory).resolve()
    existing = ClusterState.load(d)
    if existing is not None and all(daemons.alive(existing.pids.get(n, -1)) for n in DAEMONS):
        _wait_idle(existing, timeout)
        return existing
    if existing is not None:
        stop(d)
    if os.geteuid() != 0:
        raise ClusterError("a local SLURM cluster needs root (slurmd starts jobs as the submitting user): use sudo")
    missing = missing_binaries()
    if missing:
        raise ClusterError(f"not installed: {', '.join(missing)} (run .ci/install_slurm.sh as root)")
    if accounting not in ("auto", "dbd", "none"):
        raise ClusterError(f"accounting must be auto, dbd or none, not {accounting!r}")
    use_dbd = accounting == "dbd" or (accounting == "auto" and not missing_binaries(accounting=True))
    if accounting == "dbd" and missing_binaries(accounting=True):
        raise ClusterError(f"not installed: {', '.join(missing_binaries(accounting=True))}")

    for sub in ("state", "spool", "log", "run"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    state = ClusterState(dir=str(d), hostname=socket.gethostname().split(".")[0],
                         slurm_conf=str(d / "slurm.conf"), accounting="dbd" if use_dbd else "none",
                         ports={name: free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mariadb")})
    state.save()
    try:
        state.munge_started = daemons.start_munge()
        state.save()
        if use_dbd:
            password = secrets.token_hex(12)
            try:
                write_slurmdbd_conf(state, password)
                daemons.start_mariadb(state, password, timeout)
                daemons.start_daemon(state, "slurmdbd", timeout)
            except (ClusterError, OSError, subprocess.TimeoutExpired) as err:
                if accounting == "dbd":
                    raise
                print(f"local_cluster: accounting unavailable, continuing without slurmdbd ({err})", file=sys.stderr)
                for name in ("slurmdbd", "mariadbd"):
                    if name in state.pids:
                        daemons.terminate(name, state.pids.pop(name))
                state.accounting = "none"
                state.save()
        write_slurm_conf(state, os.cpu_count() or 1, max(256, int(daemons.memory_mb() * 0.9)))
        daemons.start_daemon(state, "slurmctld", timeout)
        if state.accounting == "dbd":
            # slurmctld registers its cluster itself; adding it first makes that immediate (and is idempotent).
            subprocess.run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME], env=daemons.client_env(state),
                           capture_output=True, timeout=30)
        daemons.start_daemon(state, "slurmd", timeout)
        _wait_idle(state, timeout)
    except BaseException:
        stop(d)
        raise
    return state


def _cancel_jobs(state: ClusterState, timeout: float = 30) -> None:
    """Cancel this cluster's jobs and let slurmd clean them up (a slurmstepd outlives a stopped slurmd)."""
    if not all(daemons.alive(state.pids.get(n, -1)) for n in DAEMONS):
        return
    env = daemons.client_env(state)
    try:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True,
                              timeout=15).stdout.split()
        if not jobs:
            return
        subprocess.run(["scancel", *jobs], env=env, capture_output=True, timeout=15)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True,
                                  timeout=15).stdout.split():
                return
            time.sleep(0.5)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _kill_orphan_steps(state: ClusterState) -> None:
    """slurmstepd processes (and their tasks) of THIS cluster still alive after slurmd stopped."""
    marker = f"SLURM_CONF={state.slurm_conf}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "comm").read_text().startswith("slurmstepd"):
                continue
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        daemons.terminate("slurmstepd", int(proc.name), timeout=10)


def stop(directory: str | Path) -> None:
    """Stop the daemons recorded in `<directory>/cluster.json`, newest first (only those PIDs)."""
    state = ClusterState.load(directory)
    if state is None:
        return
    _cancel_jobs(state)
    for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd"):
        pid = state.pids.pop(name, None)
        if pid is not None:
            daemons.terminate(name, pid)
    _kill_orphan_steps(state)
    if state.munge_started:
        daemons.stop_munge()
        state.munge_started = False
    state.save()


def daemon_logs(directory: str | Path, lines: int = 60) -> str:
    """The last lines of slurmctld's and slurmd's logs (for a failing test or job)."""
    log_dir = Path(directory) / "log"
    return "\n".join(f"---- {log_dir / name}\n{daemons.tail(log_dir / name, lines)}" for name in ("slurmctld.log", "slurmd.log"))


def status(directory: str | Path) -> str:
    state = ClusterState.load(directory)
    if state is None:
        return f"no cluster in {directory}"
    rows = [f"cluster {CLUSTER_NAME} in {state.dir} (accounting: {state.accounting})",
            f"export SLURM_CONF={state.slurm_conf}"]
    for name, pid in state.pids.items():
        rows.append(f"  {name:<10} pid {pid:<8} {'running' if daemons.alive(pid) else 'NOT running'}")
    if all(daemons.alive(state.pids.get(n, -1)) for n in DAEMONS):
        rows.append(f"  node {state.hostname}: {_node_state(state)}")
        queue = subprocess.run(["squeue", "-h", "-o", "%i %j %T %M"], env=daemons.client_env(state), capture_output=True,
                               text=True, timeout=15).stdout.strip()
        rows.append("  queue: " + (queue.replace("\n", "\n         ") if queue else "(empty)"))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start, stop or inspect a one-node SLURM cluster kept in one folder.")
    parser.add_argument("action", choices=("start", "stop", "status", "env"))
    parser.add_argument("--dir", required=True, type=Path, help="folder for config, state, logs (created)")
    parser.add_argument("--accounting", default="auto", choices=("auto", "dbd", "none"),
                        help="slurmdbd + a private MariaDB (sacct works), or none (default: dbd if installed)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for each daemon")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            state = start(args.dir, args.accounting, args.timeout)
            print(f"cluster up (accounting: {state.accounting}); for SLURM clients:\n"
                  f"export SLURM_CONF={state.slurm_conf}")
        elif args.action == "stop":
            stop(args.dir)
            print(f"stopped the cluster in {args.dir}")
        elif args.action == "status":
            print(status(args.dir))
        else:
            state = ClusterState.load(args.dir)
            if state is None:
                print(f"no cluster in {args.dir}", file=sys.stderr)
                return 1
            print(f"export SLURM_CONF={state.slurm_conf}")
    except ClusterError as err:
        print(f"local_cluster: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
