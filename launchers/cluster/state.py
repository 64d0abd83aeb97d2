"""What a started test cluster records in `<dir>/cluster.json`, and the constants it is built with."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lacvit_dist.io import write_json

STATE_FILE = "cluster.json"
CLUSTER_NAME = "lacvit"
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_KEY = Path("/etc/munge/munge.key")
DAEMONS = ("slurmctld", "slurmd")  # required on a one-node cluster; slurmdbd and mariadbd are optional
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
    # Several nodes (launchers/cluster/netns.py): `nodes` slurmd, one per network namespace, each its own host
    # name; `cluster_id` makes every name (namespaces, bridge, veths) and the subnet unique to this cluster, and
    # `net` records all of them (written before anything is created, so `stop` can remove what exists).
    nodes: int = 1
    cluster_id: str = ""
    net: dict = field(default_factory=dict)

    @property
    def node_names(self) -> list[str]:
        """SLURM's node names: the host name on one node, else node1..nodeN (each namespace's host name)."""
        if self.nodes <= 1:
            return [self.hostname]
        return [node["name"] for node in self.net.get("nodes", [])]

    def slurmd_key(self, node: str) -> str:
        """The key of a node's slurmd in `pids` ("slurmd" on a one-node cluster, as before)."""
        return "slurmd" if self.nodes <= 1 else f"slurmd:{node}"

    @property
    def required_daemons(self) -> tuple[str, ...]:
        """The daemons without which the cluster is down: slurmctld and every node's slurmd."""
        return ("slurmctld", *(self.slurmd_key(n) for n in self.node_names)) if self.nodes > 1 else DAEMONS

    def slurmd_log(self, node: str) -> Path:
        return Path(self.dir) / "log" / ("slurmd.log" if self.nodes <= 1 else f"slurmd-{node}.log")

    @property
    def env(self) -> dict[str, str]:
        """What a SLURM client needs in its environment to talk to this cluster."""
        return {"SLURM_CONF": self.slurm_conf}

    def save(self) -> None:
        write_json(Path(self.dir) / STATE_FILE, asdict(self), sort_keys=False)

    @classmethod
    def load(cls, directory: str | Path) -> "ClusterState | None":
        path = Path(directory) / STATE_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


