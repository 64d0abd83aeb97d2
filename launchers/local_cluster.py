"""A SLURM cluster on this machine started by hand (one node, or several in network namespaces), for the tests and
for trying the launcher on a laptop.

    sudo .ci/install_slurm.sh                                   # once: slurmctld slurmd slurm-client munge (+ slurmdbd mariadb)
    sudo python launchers/local_cluster.py start --dir /tmp/slurm
    export SLURM_CONF=/tmp/slurm/slurm.conf                     # every SLURM client (sbatch, squeue, sacct) reads it
    python launchers/submit.py --config configs/demo_digits.yaml --nodes 1 --gpus-per-node 0 --tasks-per-node 2
    sudo python launchers/local_cluster.py status --dir /tmp/slurm
    sudo python launchers/local_cluster.py stop --dir /tmp/slurm

Everything the cluster writes lives under --dir: slurm.conf, slurmdbd.conf, state, spool, logs, pid files and,
with accounting, a private MariaDB data directory. No systemd: the daemons are started in the background and
stopped by the PIDs recorded in `<dir>/cluster.json`. munge is the exception: SLURM clients talk to the system
munged socket, so an already running munged is reused (and left running); one started by a test cluster is stopped
by the last test cluster to stop (never while any cluster's SLURM daemons still use it).

Accounting (`--accounting auto|dbd|none`, default auto): without slurmdbd there is no `sacct`, and submitit
cannot tell that a job died once slurmctld has forgotten it. `dbd` starts a MariaDB server (own datadir, TCP on
127.0.0.1 with a free port, started as root) and slurmdbd, and points slurmctld at it; `auto` does that when the
binaries are installed and falls back to `none` (with a warning) if they fail to come up. Either way
slurmctld keeps finished jobs for an hour (MinJobAge) so `scontrol show job` still answers, and every finished
job is appended to `<dir>/log/jobcomp.txt` (jobcomp/filetxt).

Needs root (slurmd launches jobs as the submitting user). Ports are chosen free at start, so a second cluster
(or a real one) on the same machine does not collide.

Several nodes (`--nodes N`, N >= 2; launchers/cluster/netns.py): a bridge in the root namespace and one network
namespace per node (node1..nodeN on a private /24 of their own), slurmctld in the root namespace on the bridge's
address, one slurmd per node inside its namespace with its own host name and an /etc/hosts naming every node, so
`sbatch -N 2` runs real multi-node steps whose ranks find their master by name:

    sudo python launchers/local_cluster.py start --dir /tmp/slurm2 --nodes 2 --accounting none
    SLURM_CONF=/tmp/slurm2/slurm.conf python launchers/submit.py ... --nodes 2 --tasks-per-node 2

Namespace, bridge and veth names and the subnet derive from a short id kept in cluster.json (written before anything
is created), so two clusters on one machine do not collide; `stop` removes daemons, namespaces (and everything left
running in them), veths and bridge, also after a failed start, and may be run again.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from lacvit_dist.distributed import free_port

from launchers.cluster import daemons, netns
from launchers.cluster.conf import write_slurm_conf, write_slurmdbd_conf
from launchers.cluster.state import CLUSTER_NAME, ClusterError, ClusterState
from launchers.cluster.daemons import missing_binaries


def _node_state(state: ClusterState) -> str:
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=daemons.client_env(state), capture_output=True, text=True,
                          timeout=15)
    return proc.stdout.strip() if proc.returncode == 0 else f"sinfo failed: {proc.stderr.strip()}"


def _node_states(state: ClusterState) -> dict[str, str]:
    """Every node's state as sinfo reports it ({} if sinfo fails)."""
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=daemons.client_env(state), capture_output=True,
                          text=True, timeout=15)
    if proc.returncode != 0:
        return {}
    return dict(line.split(None, 1) for line in proc.stdout.splitlines() if len(line.split(None, 1)) == 2)


READY = ("idle", "mixed", "allocated")


def _wait_idle(state: ClusterState, timeout: float) -> None:
    if state.nodes > 1:
        return _wait_nodes_idle(state, timeout)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        last = _node_state(state)
        if last.rstrip("*") in READY:
            return
        if last.startswith(("down", "drain")):
            subprocess.run(["scontrol", "update", f"nodename={state.hostname}", "state=resume"],
                           env=daemons.client_env(state), capture_output=True, timeout=15)
        time.sleep(0.5)
    raise ClusterError(f"node {state.hostname} not idle after {timeout:.0f} s (sinfo: {last!r})\n"
                       f"{daemon_logs(state.dir, 25)}")


def _wait_nodes_idle(state: ClusterState, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = _node_states(state)
        if all(states.get(n, "").rstrip("*") in READY for n in state.node_names):
            return
        down = [n for n in state.node_names if states.get(n, "").startswith(("down", "drain"))]
        if down:
            subprocess.run(["scontrol", "update", f"nodename={','.join(down)}", "state=resume"],
                           env=daemons.client_env(state), capture_output=True, timeout=15)
        time.sleep(0.5)
    raise ClusterError(f"nodes not all idle after {timeout:.0f} s (sinfo: {states!r})\n{daemon_logs(state.dir, 25)}")


def _start_nodes(state: ClusterState, timeout: float) -> None:
    """Several nodes: the namespaces and bridge (names recorded in cluster.json first), then one slurmd in each."""
    netns.create(state)
    slurmd = daemons.which("slurmd")
    run = Path(state.dir) / "run"
    for node in state.net["nodes"]:
        (Path(state.dir) / "spool" / node["name"]).mkdir(parents=True, exist_ok=True)
        pid_file = run / f"slurmd-{node['name']}.pid"
        pid_file.unlink(missing_ok=True)
        log_file = state.slurmd_log(node["name"])
        try:
            netns.start_slurmd(state, node, slurmd, daemons.client_env(state))
            pid = daemons.read_pid(pid_file, timeout)
        except ClusterError as err:
            raise ClusterError(f"{err}; {log_file}:\n{daemons.tail(log_file)}") from None
        state.pids[state.slurmd_key(node["name"])] = pid
        state.save()
    for node in state.net["nodes"]:
        daemons.wait_port(state.ports["slurmd"], timeout, f"slurmd of {node['name']}", state.slurmd_log(node["name"]),
                          state.pids[state.slurmd_key(node["name"])], host=node["addr"])


# --------------------------------------------------------------------------------------------- API

def _running(state: ClusterState) -> bool:
    return all(daemons.alive(state.pids.get(n, -1)) for n in state.required_daemons)


def start(directory: str | Path, accounting: str = "auto", timeout: float = 60, nodes: int = 1) -> ClusterState:
    """Start (or find already running) the cluster in `directory`; returns its state (`.env` for clients).

    `nodes` >= 2: that many slurmd, each in its own network namespace (module docstring)."""
    d = Path(directory).resolve()
    if not 1 <= nodes <= netns.MAX_NODES:
        raise ClusterError(f"nodes must be between 1 and {netns.MAX_NODES}, not {nodes}")
    existing = ClusterState.load(d)
    if existing is not None and existing.nodes == nodes and _running(existing):
        _wait_idle(existing, timeout)
        return existing
    if existing is not None:
        stop(d)
    if os.geteuid() != 0:
        raise ClusterError("a local SLURM cluster needs root (slurmd starts jobs as the submitting user): use sudo")
    missing = missing_binaries(nodes=nodes)
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
    if nodes > 1:  # every name stored before anything is created, so that stop() finds it
        state.nodes = nodes
        state.cluster_id = secrets.token_hex(3)
        state.net = netns.plan(state.cluster_id, nodes, state.hostname)
    state.save()
    # Held from the munge check until slurmctld runs: a cluster stopping meanwhile must not stop the shared munged
    # this one is about to use (daemons.release_munge).
    munge_guard = contextlib.ExitStack()
    try:
        munge_guard.enter_context(daemons.munge_lock())
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
        munge_guard.close()
        if state.accounting == "dbd":
            # slurmctld registers its cluster itself; adding it first makes that immediate (and is idempotent).
            subprocess.run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME], env=daemons.client_env(state),
                           capture_output=True, timeout=30)
        if nodes > 1:
            _start_nodes(state, timeout)
        else:
            daemons.start_daemon(state, "slurmd", timeout)
        _wait_idle(state, timeout)
    except BaseException:
        munge_guard.close()
        stop(d)
        raise
    return state


def _cancel_jobs(state: ClusterState, timeout: float = 30) -> None:
    """Cancel this cluster's jobs and let slurmd clean them up (a slurmstepd outlives a stopped slurmd)."""
    if not _running(state):
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
    """Stop the daemons recorded in `<directory>/cluster.json`, newest first (only those PIDs); with several nodes
    also whatever is left in their namespaces, then the namespaces, veths and bridge. Safe to repeat."""
    state = ClusterState.load(directory)
    if state is None:
        return
    _cancel_jobs(state)
    slurmds = [name for name in state.pids if name == "slurmd" or name.startswith("slurmd:")]
    for name in (*slurmds, "slurmctld", "slurmdbd", "mariadbd"):
        pid = state.pids.pop(name, None)
        if pid is not None:
            daemons.terminate(name, pid)
    _kill_orphan_steps(state)
    if state.net:
        problems = netns.teardown(state.net)
        if problems:
            print(f"local_cluster: could not remove: {'; '.join(problems)}", file=sys.stderr)
    # munged started by a test cluster (this one or another) stops with the last cluster that uses it
    daemons.release_munge()
    state.munge_started = False
    state.save()


def daemon_logs(directory: str | Path, lines: int = 60) -> str:
    """The last lines of slurmctld's and every node's slurmd's logs (for a failing test or job)."""
    log_dir = Path(directory) / "log"
    state = ClusterState.load(directory)
    if state is not None and state.nodes > 1:
        names = ["slurmctld.log"] + [state.slurmd_log(n).name for n in state.node_names]
    else:
        names = ["slurmctld.log", "slurmd.log"]
    return "\n".join(f"---- {log_dir / name}\n{daemons.tail(log_dir / name, lines)}" for name in names)


def status(directory: str | Path) -> str:
    state = ClusterState.load(directory)
    if state is None:
        return f"no cluster in {directory}"
    rows = [f"cluster {CLUSTER_NAME} in {state.dir} (accounting: {state.accounting})",
            f"export SLURM_CONF={state.slurm_conf}"]
    if state.net:
        rows.append(f"  {state.nodes} nodes (id {state.cluster_id}): bridge {state.net['bridge']} "
                    f"{state.net['bridge_addr']} on {state.net['subnet']}")
    for name, pid in state.pids.items():
        rows.append(f"  {name:<10} pid {pid:<8} {'running' if daemons.alive(pid) else 'NOT running'}")
    if state.nodes > 1:  # every node, even when some daemon is down
        ctld = daemons.alive(state.pids.get("slurmctld", -1))
        states = _node_states(state) if ctld else {}
        for node in state.net["nodes"]:
            slurmd = daemons.alive(state.pids.get(state.slurmd_key(node["name"]), -1))
            where = "namespace present" if (netns.NETNS_DIR / node["netns"]).exists() else "no namespace"
            rows.append(f"  node {node['name']} ({node['addr']}, {node['netns']}, {where}): "
                        f"slurmd {'running' if slurmd else 'NOT running'}, "
                        f"{states.get(node['name'], 'unknown to sinfo') if ctld else 'slurmctld not running'}")
    if _running(state):
        if state.nodes <= 1:
            rows.append(f"  node {state.hostname}: {_node_state(state)}")
        queue = subprocess.run(["squeue", "-h", "-o", "%i %j %T %M"], env=daemons.client_env(state), capture_output=True,
                               text=True, timeout=15).stdout.strip()
        rows.append("  queue: " + (queue.replace("\n", "\n         ") if queue else "(empty)"))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start, stop or inspect a SLURM cluster on this machine (one node, or "
                                                 "several in network namespaces) kept in one folder.")
    parser.add_argument("action", choices=("start", "stop", "status", "env"))
    parser.add_argument("--dir", required=True, type=Path, help="folder for config, state, logs (created)")
    parser.add_argument("--accounting", default="auto", choices=("auto", "dbd", "none"),
                        help="slurmdbd + a private MariaDB (sacct works), or none (default: dbd if installed)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for each daemon")
    parser.add_argument("--nodes", type=int, default=1,
                        help="slurmd nodes; 2 or more run each in its own network namespace (default: 1)")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            state = start(args.dir, args.accounting, args.timeout, nodes=args.nodes)
            nodes = f"{state.nodes} nodes: {', '.join(state.node_names)}; " if state.nodes > 1 else ""
            print(f"cluster up ({nodes}accounting: {state.accounting}); for SLURM clients:\n"
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
