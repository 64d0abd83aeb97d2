"""Several SLURM nodes on one machine: one network namespace per node, joined to a bridge in the root namespace.

    root namespace:  slurmctld (+ slurmdbd, MariaDB), bridge lvb<id> with 10.A.B.1/24 (SlurmctldHost=<host>(10.A.B.1))
    node k:          namespace lacvit-<id>-nodek, veth lv<id>h<k> (bridge side) <-> eth0 (10.A.B.<k+1>/24), lo up;
                     slurmd -N nodek, started by `nsenter --net=/run/netns/<ns> unshare --uts --mount`, which then
                     bind-mounts <dir>/hosts (every node's name and address) over /etc/hosts and sets the host name.

`ip netns exec` is not used for slurmd: it remounts /sys in the new mount namespace, and slurmd dies on the missing
cgroup file system. The bind mount and the host name live only in the node's own mount and UTS namespaces (which end
with its last process); the network namespace, veths and bridge are removed by `teardown`. Every name and the subnet
derive from the cluster's short id (kept in cluster.json with everything else `teardown` needs, written before
anything is created), so two clusters on one machine do not collide, and `teardown` touches nothing else.
Traffic only goes between the bridge's address and the namespaces' addresses; nothing is routed or NATed.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from launchers.cluster.state import ClusterError, ClusterState

NETNS_DIR = Path("/run/netns")
SUBNET_POOL = ipaddress.ip_network("10.128.0.0/9")  # /24s drawn from here, skipping any network this machine uses
MAX_NODES = 250
TOOLS = ("ip", "nsenter", "unshare", "mount")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine has an address or a route in (all tables), default routes aside."""
    used: list[ipaddress.IPv4Network] = []
    for args in (("-4", "-j", "route", "show", "table", "all"), ("-4", "-j", "addr", "show")):
        try:
            entries = json.loads(_ip(*args).stdout or "[]")
        except (ClusterError, ValueError):
            continue
        for entry in entries:
            values = [entry.get("dst")] + [f"{a.get('local')}/{a.get('prefixlen')}" for a in entry.get("addr_info", [])]
            for value in values:
                if not value or value == "default":
                    continue
                try:
                    net = ipaddress.ip_network(value, strict=False)
                except ValueError:
                    continue
                if net.prefixlen > 0:
                    used.append(net)
    return used


def pick_subnet(cluster_id: str) -> ipaddress.IPv4Network:
    """A /24 in 10.128.0.0/9 derived from the cluster id that overlaps nothing this machine has addresses or routes
    for (other test clusters included: their bridges carry their subnets)."""
    used = _networks_in_use()
    count = 2 ** (24 - SUBNET_POOL.prefixlen)
    start = int.from_bytes(hashlib.sha256(cluster_id.encode()).digest()[:4], "big") % count
    for k in range(count):
        base = int(SUBNET_POOL.network_address) + ((start + k) % count) * 256
        subnet = ipaddress.ip_network(f"{ipaddress.ip_address(base)}/24")
        if not any(subnet.overlaps(net) for net in used):
            return subnet
    raise ClusterError(f"no free /24 left in {SUBNET_POOL} for the cluster's nodes")


def plan(cluster_id: str, nodes: int, hostname: str) -> dict:
    """Every name and address of a cluster's network (nothing is created)."""
    if not 2 <= nodes <= MAX_NODES:
        raise ClusterError(f"--nodes must be between 1 and {MAX_NODES}, not {nodes}")
    subnet = pick_subnet(cluster_id)
    hosts = list(subnet.hosts())
    return {
        "subnet": str(subnet),
        "bridge": f"lvb{cluster_id}",
        "bridge_addr": str(hosts[0]),
        "controller_host": hostname,
        "nodes": [{"name": f"node{k}", "netns": f"lacvit-{cluster_id}-node{k}", "veth": f"lv{cluster_id}h{k}",
                   "peer": f"lv{cluster_id}n{k}", "addr": str(hosts[k])} for k in range(1, nodes + 1)],
    }


def hosts_file(state: ClusterState) -> Path:
    return Path(state.dir) / "hosts"


def _write_hosts(state: ClusterState) -> None:
    net = state.net
    lines = ["# /etc/hosts inside every node's namespace (launchers/cluster/netns.py)",
             "127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
             f"{net['bridge_addr']} {net['controller_host']}"]
    lines += [f"{node['addr']} {node['name']}" for node in net["nodes"]]
    path = hosts_file(state)
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)


def create(state: ClusterState) -> None:
    """The bridge, one namespace per node with its veth pair and addresses, loopback up, the hosts file.
    `state.net` (saved by the caller) names everything; a failure leaves what exists to `teardown`."""
    net = state.net
    prefix = ipaddress.ip_network(net["subnet"]).prefixlen
    bridge = net["bridge"]
    _ip("link", "add", "name", bridge, "type", "bridge")
    _ip("addr", "add", f"{net['bridge_addr']}/{prefix}", "dev", bridge)
    _ip("link", "set", bridge, "up")
    for node in net["nodes"]:
        ns = node["netns"]
        _ip("netns", "add", ns)
        _ip("link", "add", node["veth"], "type", "veth", "peer", "name", node["peer"])
        _ip("link", "set", node["veth"], "master", bridge)
        _ip("link", "set", node["veth"], "up")
        _ip("link", "set", node["peer"], "netns", ns)
        _ip("-n", ns, "link", "set", node["peer"], "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{node['addr']}/{prefix}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")  # the ranks of one node also talk over loopback
    _write_hosts(state)


def start_slurmd(state: ClusterState, node: dict, slurmd: str, env: dict[str, str]) -> None:
    """Start `node`'s slurmd inside its namespace (it daemonises; its pid file is <dir>/run/slurmd-<node>.pid)."""
    script = (f"mount --bind {shlex.quote(str(hosts_file(state)))} /etc/hosts && "
              f"hostname {shlex.quote(node['name'])} && "
              f"exec {shlex.quote(slurmd)} -f {shlex.quote(state.slurm_conf)} -N {shlex.quote(node['name'])}")
    cmd = ["nsenter", f"--net={NETNS_DIR / node['netns']}", "unshare", "--uts", "--mount", "--propagation", "private",
           "sh", "-c", script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ClusterError(f"slurmd of {node['name']} failed to start ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")


def pids_in(netns: str) -> list[int]:
    """The processes inside one of our namespaces (none if it does not exist)."""
    if not (NETNS_DIR / netns).exists():
        return []
    proc = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill_all(pids: list[int], timeout: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
            if not pids:
                return
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def teardown(net: dict, timeout: float = 10) -> list[str]:
    """Remove what `create` made (any part of it): processes left in the namespaces, the namespaces, veths and
    bridge. Idempotent; touches only the names recorded in `net`. Returns what it could not remove."""
    problems: list[str] = []
    nodes = net.get("nodes", [])
    leftover = [pid for node in nodes for pid in pids_in(node["netns"])]
    if leftover:
        _kill_all(leftover, timeout)
    for node in nodes:
        if (NETNS_DIR / node["netns"]).exists():
            proc = _ip("netns", "del", node["netns"], check=False)
            if proc.returncode != 0:
                problems.append(f"namespace {node['netns']}: {proc.stderr.strip()}")
    for name in [node["veth"] for node in nodes] + [node["peer"] for node in nodes] + [net.get("bridge")]:
        if name and _ip("link", "show", name, check=False).returncode == 0:
            proc = _ip("link", "del", name, check=False)
            if proc.returncode != 0 and _ip("link", "show", name, check=False).returncode == 0:
                problems.append(f"link {name}: {proc.stderr.strip()}")
    return problems


def leftovers(net: dict) -> list[str]:
    """What of `net` still exists (namespaces, links): empty after a clean `teardown`."""
    names = [f"namespace {n['netns']}" for n in net.get("nodes", []) if (NETNS_DIR / n["netns"]).exists()]
    for name in [n["veth"] for n in net.get("nodes", [])] + [net.get("bridge")]:
        if name and _ip("link", "show", name, check=False).returncode == 0:
            names.append(f"link {name}")
    return names
