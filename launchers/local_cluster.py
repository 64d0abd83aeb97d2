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
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lacvit_dist.distributed import free_port

STATE_FILE = "cluster.json"
CLUSTER_NAME = "lacvit"
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_KEY = Path("/etc/munge/munge.key")
DAEMONS = ("slurmctld", "slurmd")  # required; slurmdbd and mariadbd are optional
CRED_EXPIRE_S = 10  # job credential lifetime: also how long a requeued job waits before it may start again


class ClusterError(RuntimeError):
    pass


@dataclass
class ClusterState:
    dir: str
    hostname: str
    slurm_conf: str
    accounting: str  # "dbd" or "none"
    pids: dict[str, int] = field(default_factory=dict)  # daemon -> pid, in start order
    ports: dict[str, int] = field(default_factory=dict)
    munge_started: bool = False

    @property
    def env(self) -> dict[str, str]:
        """What a SLURM client needs in its environment to talk to this cluster."""
        return {"SLURM_CONF": self.slurm_conf}

    def save(self) -> None:
        path = Path(self.dir) / STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, directory: str | Path) -> "ClusterState | None":
        path = Path(directory) / STATE_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------- helpers

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_pid(path: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text().strip()
            if text:
                return int(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise ClusterError(f"no pid file {path} after {timeout:.0f} s")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not written)"


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 30, check: bool = True,
         **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _client_env(state: ClusterState) -> dict[str, str]:
    return {**os.environ, **state.env}


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def missing_binaries(accounting: bool = False) -> list[str]:
    names = ["slurmctld", "slurmd", "sinfo", "sbatch", "munged", "munge"]
    if accounting:
        names += ["slurmdbd", "mariadbd", "mariadb-install-db", "sacctmgr"]
    return [n for n in names if shutil.which(n) is None and not Path("/usr/sbin", n).exists()]


def _which(name: str) -> str:
    found = shutil.which(name) or (str(Path("/usr/sbin", name)) if Path("/usr/sbin", name).exists() else None)
    if found is None:
        raise ClusterError(f"{name} is not installed (run .ci/install_slurm.sh as root)")
    return found


# --------------------------------------------------------------------------------------------- munge

def _munge_works() -> bool:
    if shutil.which("munge") is None or shutil.which("unmunge") is None:
        return False
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_munge() -> bool:
    """Make sure the system munged answers; returns True if this call started it."""
    if _munge_works():
        return False
    munged = _which("munged")
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        if shutil.which("mungekey"):
            _run(["mungekey", "--create", "--keyfile", str(MUNGE_KEY)])
        else:
            MUNGE_KEY.write_bytes(secrets.token_bytes(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
    for d in (MUNGE_SOCKET.parent, Path("/var/log/munge"), Path("/var/lib/munge")):
        d.mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    MUNGE_SOCKET.parent.chmod(0o755)
    _run(["runuser", "-u", "munge", "--", munged])  # daemonises itself, pid file /run/munge/munged.pid
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if _munge_works():
            return True
        time.sleep(0.2)
    raise ClusterError("munged did not answer within 15 s (see /var/log/munge/munged.log)")


def _stop_munge() -> None:
    pid_file = MUNGE_SOCKET.parent / "munged.pid"
    try:
        _terminate("munged", int(pid_file.read_text().strip()))
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------------------------- config files

def _write_slurm_conf(state: ClusterState, cpus: int, memory_mb: int) -> None:
    d = Path(state.dir)
    host = state.hostname
    lines = [
        "# Written by launchers/local_cluster.py: a one-node test cluster; everything lives in this folder.",
        f"ClusterName={CLUSTER_NAME}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={state.ports['slurmctld']}",
        f"SlurmdPort={state.ports['slurmd']}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # A requeued job is held until the launch credentials of its previous run have expired (the new ones
        # must be newer than the revoked ones): 120 s by default; 5 s is the least slurm accepts.
        f"AuthInfo=cred_expire={CRED_EXPIRE_S}",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "JobRequeue=1",
        "MinJobAge=3600",         # finished jobs stay visible to `scontrol show job` for an hour
        "KillWait=15",
        "InactiveLimit=0",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=batch_sched_delay=1,sched_min_interval=500000",
        f"StateSaveLocation={d / 'state'}",
        f"SlurmdSpoolDir={d / 'spool'}",
        f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={d / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={d / 'log' / 'jobcomp.txt'}",
    ]
    if state.accounting == "dbd":
        lines += ["AccountingStorageType=accounting_storage/slurmdbd",
                  "AccountingStorageHost=127.0.0.1",
                  f"AccountingStoragePort={state.ports['slurmdbd']}"]
    else:
        lines += ["AccountingStorageType=accounting_storage/none"]
    lines += [f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
              f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP"]
    path = Path(state.slurm_conf)
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)


def _write_slurmdbd_conf(state: ClusterState, db_password: str) -> None:
    d = Path(state.dir)
    path = d / "slurmdbd.conf"  # slurmdbd looks for it beside $SLURM_CONF
    path.write_text("\n".join([
        "AuthType=auth/munge",
        "DbdHost=localhost",
        "DbdAddr=127.0.0.1",
        f"DbdPort={state.ports['slurmdbd']}",
        "SlurmUser=root",
        "DebugLevel=info",
        f"LogFile={d / 'log' / 'slurmdbd.log'}",
        f"PidFile={d / 'run' / 'slurmdbd.pid'}",
        "StorageType=accounting_storage/mysql",
        "StorageHost=127.0.0.1",
        f"StoragePort={state.ports['mariadb']}",
        "StorageUser=slurm",
        f"StoragePass={db_password}",
        "StorageLoc=slurm_acct_db",
    ]) + "\n")
    path.chmod(0o600)  # slurmdbd refuses a world-readable file holding a password


# --------------------------------------------------------------------------------------------- daemons

def _wait_port(port: int, timeout: float, what: str, log_file: Path, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if pid is not None and not _alive(pid):
            raise ClusterError(f"{what} exited during start-up; {log_file}:\n{_tail(log_file)}")
        time.sleep(0.2)
    raise ClusterError(f"{what} did not listen on port {port} within {timeout:.0f} s; {log_file}:\n{_tail(log_file)}")


def _start_mariadb(state: ClusterState, db_password: str, timeout: float) -> None:
    d = Path(state.dir)
    datadir = d / "mysql"
    log_file = d / "log" / "mariadb.log"
    if not (datadir / "mysql").is_dir():
        datadir.mkdir(parents=True, exist_ok=True)
        _run([_which("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", "--user=root",
              "--skip-test-db", "--auth-root-authentication-method=socket"], timeout=120)
    init = d / "mariadb-init.sql"
    init.write_text(
        "CREATE DATABASE IF NOT EXISTS slurm_acct_db;\n"
        + "".join(f"CREATE USER IF NOT EXISTS 'slurm'@'{h}' IDENTIFIED BY '{db_password}';\n"
                  f"ALTER USER 'slurm'@'{h}' IDENTIFIED BY '{db_password}';\n"
                  f"GRANT ALL ON slurm_acct_db.* TO 'slurm'@'{h}';\n" for h in ("localhost", "127.0.0.1")))
    init.chmod(0o600)
    proc = subprocess.Popen(
        [_which("mariadbd"), "--no-defaults", f"--datadir={datadir}", "--user=root", "--bind-address=127.0.0.1",
         f"--port={state.ports['mariadb']}", f"--socket={d / 'run' / 'mariadb.sock'}",
         f"--pid-file={d / 'run' / 'mariadb.pid'}", f"--log-error={log_file}", f"--init-file={init}",
         "--innodb-buffer-pool-size=32M", "--skip-log-bin", "--innodb-log-file-size=8M"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state.pids["mariadbd"] = proc.pid
    state.save()
    _wait_port(state.ports["mariadb"], timeout, "mariadbd", log_file, proc.pid)


def _start_daemon(state: ClusterState, name: str, timeout: float) -> None:
    """slurmctld / slurmd / slurmdbd: each daemonises itself and writes its pid file under <dir>/run."""
    d = Path(state.dir)
    pid_file = d / "run" / f"{name}.pid"
    pid_file.unlink(missing_ok=True)
    cmd = [_which(name)] + ([] if name == "slurmdbd" else ["-f", state.slurm_conf])
    log_file = d / "log" / f"{name}.log"
    proc = subprocess.run(cmd, env=_client_env(state), capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ClusterError(f"{name} failed to start ({proc.returncode}): {proc.stderr.strip()}\n{log_file}:\n"
                           f"{_tail(log_file)}")
    try:
        pid = _read_pid(pid_file, timeout)
    except ClusterError as err:
        raise ClusterError(f"{name}: {err}; {log_file}:\n{_tail(log_file)}") from None
    state.pids[name] = pid
    state.save()
    port = state.ports[name]
    _wait_port(port, timeout, name, log_file, pid)


def _terminate(name: str, pid: int, timeout: float = 20) -> None:
    if not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _node_state(state: ClusterState) -> str:
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=_client_env(state), capture_output=True, text=True,
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
                           env=_client_env(state), capture_output=True, timeout=15)
        time.sleep(0.5)
    raise ClusterError(f"node {state.hostname} not idle after {timeout:.0f} s (sinfo: {last!r})\n"
                       f"{daemon_logs(state.dir, 25)}")


# --------------------------------------------------------------------------------------------- API

def start(directory: str | Path, accounting: str = "auto", timeout: float = 60) -> ClusterState:
    """Start (or find already running) the cluster in `directory`; returns its state (`.env` for clients)."""
    d = Path(directory).resolve()
    existing = ClusterState.load(d)
    if existing is not None and all(_alive(existing.pids.get(n, -1)) for n in DAEMONS):
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
        state.munge_started = _start_munge()
        state.save()
        if use_dbd:
            password = secrets.token_hex(12)
            try:
                _write_slurmdbd_conf(state, password)
                _start_mariadb(state, password, timeout)
                _start_daemon(state, "slurmdbd", timeout)
            except (ClusterError, OSError, subprocess.TimeoutExpired) as err:
                if accounting == "dbd":
                    raise
                print(f"local_cluster: accounting unavailable, continuing without slurmdbd ({err})", file=sys.stderr)
                for name in ("slurmdbd", "mariadbd"):
                    if name in state.pids:
                        _terminate(name, state.pids.pop(name))
                state.accounting = "none"
                state.save()
        _write_slurm_conf(state, os.cpu_count() or 1, max(256, int(_memory_mb() * 0.9)))
        _start_daemon(state, "slurmctld", timeout)
        if state.accounting == "dbd":
            # slurmctld registers its cluster itself; adding it first makes that immediate (and is idempotent).
            subprocess.run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME], env=_client_env(state),
                           capture_output=True, timeout=30)
        _start_daemon(state, "slurmd", timeout)
        _wait_idle(state, timeout)
    except BaseException:
        stop(d)
        raise
    return state


def _cancel_jobs(state: ClusterState, timeout: float = 30) -> None:
    """Cancel this cluster's jobs and let slurmd clean them up (a slurmstepd outlives a stopped slurmd)."""
    if not all(_alive(state.pids.get(n, -1)) for n in DAEMONS):
        return
    env = _client_env(state)
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
        _terminate("slurmstepd", int(proc.name), timeout=10)


def stop(directory: str | Path) -> None:
    """Stop the daemons recorded in `<directory>/cluster.json`, newest first (only those PIDs)."""
    state = ClusterState.load(directory)
    if state is None:
        return
    _cancel_jobs(state)
    for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd"):
        pid = state.pids.pop(name, None)
        if pid is not None:
            _terminate(name, pid)
    _kill_orphan_steps(state)
    if state.munge_started:
        _stop_munge()
        state.munge_started = False
    state.save()


def daemon_logs(directory: str | Path, lines: int = 60) -> str:
    """The last lines of slurmctld's and slurmd's logs (for a failing test or job)."""
    log_dir = Path(directory) / "log"
    return "\n".join(f"---- {log_dir / name}\n{_tail(log_dir / name, lines)}" for name in ("slurmctld.log", "slurmd.log"))


def status(directory: str | Path) -> str:
    state = ClusterState.load(directory)
    if state is None:
        return f"no cluster in {directory}"
    rows = [f"cluster {CLUSTER_NAME} in {state.dir} (accounting: {state.accounting})",
            f"export SLURM_CONF={state.slurm_conf}"]
    for name, pid in state.pids.items():
        rows.append(f"  {name:<10} pid {pid:<8} {'running' if _alive(pid) else 'NOT running'}")
    if all(_alive(state.pids.get(n, -1)) for n in DAEMONS):
        rows.append(f"  node {state.hostname}: {_node_state(state)}")
        queue = subprocess.run(["squeue", "-h", "-o", "%i %j %T %M"], env=_client_env(state), capture_output=True,
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
