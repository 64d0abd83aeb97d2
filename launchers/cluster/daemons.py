"""Starting, watching and stopping the test cluster's processes: munge, MariaDB, slurmctld, slurmdbd and slurmd."""
from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import socket
import sys
import subprocess
import time
from pathlib import Path
from typing import Iterator


from launchers.cluster import netns
from launchers.cluster.state import MUNGE_KEY, MUNGE_SOCKET, ClusterError, ClusterState

# munged is shared by every cluster on the machine (SLURM clients use its system socket). One started by a test
# cluster is marked (MUNGE_MARK: its pid) and stopped by whichever test cluster stops last, once no SLURM daemon of
# any cluster is left; a munged running without the mark (the system's) is never stopped. The check is made under
# MUNGE_LOCK, which a starting cluster holds from its munge check until its first SLURM daemon runs.
MUNGE_LOCK = Path("/run/lacvit-munge.lock")
MUNGE_MARK = Path("/run/lacvit-munged.pid")
SLURM_DAEMONS = ("slurmctld", "slurmd", "slurmstepd", "slurmdbd")


def alive(pid: int) -> bool:
    if pid <= 0:  # no pid recorded (-1: os.kill would signal every process and "succeed")
        return False
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


def read_pid(path: Path, timeout: float) -> int:
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


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not written)"


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 30, check: bool = True,
         **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def client_env(state: ClusterState) -> dict[str, str]:
    return {**os.environ, **state.env}


def memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def missing_binaries(accounting: bool = False, nodes: int = 1) -> list[str]:
    names = ["slurmctld", "slurmd", "sinfo", "sbatch", "munged", "munge"]
    if accounting:
        names += ["slurmdbd", "mariadbd", "mariadb-install-db", "sacctmgr"]
    if nodes > 1:  # network namespaces (iproute2) and nsenter / unshare / mount (util-linux, mount)
        names += list(netns.TOOLS)
    return [n for n in names if shutil.which(n) is None and not Path("/usr/sbin", n).exists()]


def which(name: str) -> str:
    found = shutil.which(name) or (str(Path("/usr/sbin", name)) if Path("/usr/sbin", name).exists() else None)
    if found is None:
        raise ClusterError(f"{name} is not installed (run .ci/install_slurm.sh as root)")
    return found



def munge_works() -> bool:
    if shutil.which("munge") is None or shutil.which("unmunge") is None:
        return False
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_munge() -> bool:
    """Make sure the system munged answers; returns True if this call started it."""
    if munge_works():
        return False
    munged = which("munged")
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        if shutil.which("mungekey"):
            run(["mungekey", "--create", "--keyfile", str(MUNGE_KEY)])
        else:
            MUNGE_KEY.write_bytes(secrets.token_bytes(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
    for d in (MUNGE_SOCKET.parent, Path("/var/log/munge"), Path("/var/lib/munge")):
        d.mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    MUNGE_SOCKET.parent.chmod(0o755)
    run(["runuser", "-u", "munge", "--", munged])  # daemonises itself, pid file /run/munge/munged.pid
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if munge_works():
            pid = _munged_pid()
            if pid is not None:
                MUNGE_MARK.write_text(f"{pid}\n")
            return True
        time.sleep(0.2)
    raise ClusterError("munged did not answer within 15 s (see /var/log/munge/munged.log)")


def _munged_pid() -> int | None:
    try:
        return int((MUNGE_SOCKET.parent / "munged.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def stop_munge() -> None:
    pid = _munged_pid()
    if pid is not None:
        terminate("munged", pid)


@contextlib.contextmanager
def munge_lock(timeout: float = 180) -> Iterator[None]:
    """Machine-wide lock between a cluster's munge check and its first daemon, and a stop's decision to stop munged."""
    try:
        fd = os.open(MUNGE_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:  # not root: nothing can be started or stopped anyway
        yield
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"{MUNGE_LOCK} still locked after {timeout:.0f} s") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def slurm_daemons_running() -> list[str]:
    """Live SLURM daemons of any cluster on this machine ("name pid"), zombies aside: they all need munged."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if comm in SLURM_DAEMONS and alive(int(proc.name)):
            found.append(f"{comm} {proc.name}")
    return found


def release_munge() -> None:
    """A cluster has stopped its daemons: stop munged if a test cluster started it (MUNGE_MARK names the running
    munged) and no SLURM daemon of any cluster uses it any more; else leave it running."""
    with munge_lock():
        try:
            marked = int(MUNGE_MARK.read_text().strip())
        except (OSError, ValueError):
            return  # not started by a test cluster: the system's, left alone
        if marked != _munged_pid() or not alive(marked):
            MUNGE_MARK.unlink(missing_ok=True)  # that munged is gone; the running one (if any) is not ours
            return
        users = slurm_daemons_running()
        if users:
            print(f"local_cluster: leaving munged running, other SLURM daemons use it ({', '.join(users[:4])}); "
                  f"the last test cluster to stop stops it", file=sys.stderr)
            return
        stop_munge()
        MUNGE_MARK.unlink(missing_ok=True)



def wait_port(port: int, timeout: float, what: str, log_file: Path, pid: int | None = None,
              host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            pass
        if pid is not None and not alive(pid):
            raise ClusterError(f"{what} exited during start-up; {log_file}:\n{tail(log_file)}")
        time.sleep(0.2)
    raise ClusterError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s; {log_file}:\n{tail(log_file)}")


def start_mariadb(state: ClusterState, db_password: str, timeout: float) -> None:
    d = Path(state.dir)
    datadir = d / "mysql"
    log_file = d / "log" / "mariadb.log"
    if not (datadir / "mysql").is_dir():
        datadir.mkdir(parents=True, exist_ok=True)
        run([which("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", "--user=root",
              "--skip-test-db", "--auth-root-authentication-method=socket"], timeout=120)
    init = d / "mariadb-init.sql"
    init.write_text(
        "CREATE DATABASE IF NOT EXISTS slurm_acct_db;\n"
        + "".join(f"CREATE USER IF NOT EXISTS 'slurm'@'{h}' IDENTIFIED BY '{db_password}';\n"
                  f"ALTER USER 'slurm'@'{h}' IDENTIFIED BY '{db_password}';\n"
                  f"GRANT ALL ON slurm_acct_db.* TO 'slurm'@'{h}';\n" for h in ("localhost", "127.0.0.1")))
    init.chmod(0o600)
    proc = subprocess.Popen(
        [which("mariadbd"), "--no-defaults", f"--datadir={datadir}", "--user=root", "--bind-address=127.0.0.1",
         f"--port={state.ports['mariadb']}", f"--socket={d / 'run' / 'mariadb.sock'}",
         f"--pid-file={d / 'run' / 'mariadb.pid'}", f"--log-error={log_file}", f"--init-file={init}",
         "--innodb-buffer-pool-size=32M", "--skip-log-bin", "--innodb-log-file-size=8M"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state.pids["mariadbd"] = proc.pid
    state.save()
    wait_port(state.ports["mariadb"], timeout, "mariadbd", log_file, proc.pid)


def start_daemon(state: ClusterState, name: str, timeout: float) -> None:
    """slurmctld / slurmd / slurmdbd: each daemonises itself and writes its pid file under <dir>/run."""
    d = Path(state.dir)
    pid_file = d / "run" / f"{name}.pid"
    pid_file.unlink(missing_ok=True)
    cmd = [which(name)] + ([] if name == "slurmdbd" else ["-f", state.slurm_conf])
    log_file = d / "log" / f"{name}.log"
    proc = subprocess.run(cmd, env=client_env(state), capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ClusterError(f"{name} failed to start ({proc.returncode}): {proc.stderr.strip()}\n{log_file}:\n"
                           f"{tail(log_file)}")
    try:
        pid = read_pid(pid_file, timeout)
    except ClusterError as err:
        raise ClusterError(f"{name}: {err}; {log_file}:\n{tail(log_file)}") from None
    state.pids[name] = pid
    state.save()
    port = state.ports[name]
    wait_port(port, timeout, name, log_file, pid)


def terminate(name: str, pid: int, timeout: float = 20) -> None:
    if not alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


