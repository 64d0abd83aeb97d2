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
        write_json(Path(self.dir) / STATE_FILE, asdict(self), sort_keys=False)

    @classmethod
    def load(cls, directory: str | Path) -> "ClusterState | None":
        path = Path(directory) / STATE_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


