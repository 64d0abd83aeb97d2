"""slurm.conf and slurmdbd.conf of the test cluster, everything under its own folder."""
from __future__ import annotations

import random
from pathlib import Path

from launchers.cluster.state import CLUSTER_NAME, CRED_EXPIRE_S, ClusterState


def write_slurm_conf(state: ClusterState, cpus: int, memory_mb: int) -> None:
    d = Path(state.dir)
    host = state.hostname
    multi = state.nodes > 1
    # Several nodes: slurmctld in the root namespace on the bridge's address, one slurmd per namespace (-N <node>);
    # their spool, pid and log paths carry the node name (%n), and each node's declared CPUs and memory stand
    # (config_overrides: every "node" is this same machine).
    controller = state.net["bridge_addr"] if multi else "127.0.0.1"
    lines = [
        "# Written by launchers/local_cluster.py: a "
        + (f"{state.nodes}-node test cluster (network namespaces)" if multi else "one-node test cluster")
        + "; everything lives in this folder.",
        f"ClusterName={CLUSTER_NAME}",
        f"SlurmctldHost={host}({controller})",
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
        # Job ids start at a random point per cluster: a job's rendezvous port derives from its id
        # (distributed.slurm_master_port), and test clusters on one machine share its loopback address.
        f"FirstJobId={random.randrange(1000, 500000)}",
        "MinJobAge=3600",         # finished jobs stay visible to `scontrol show job` for an hour
        "KillWait=15",
        "InactiveLimit=0",
        "SchedulerType=sched/backfill",
        # A requeued job is held until its begin time (cred_expire, above); its passing wakes no scheduler, so the
        # job starts at the main loop's next pass: every 60 s by default (measured 26-66 s of waiting), 1 s here.
        "SchedulerParameters=batch_sched_delay=1,sched_min_interval=500000,sched_interval=1",
        f"StateSaveLocation={d / 'state'}",
        f"SlurmdSpoolDir={d / 'spool' / '%n'}" if multi else f"SlurmdSpoolDir={d / 'spool'}",
        f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={d / 'run' / ('slurmd-%n.pid' if multi else 'slurmd.pid')}",
        f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={d / 'log' / ('slurmd-%n.log' if multi else 'slurmd.log')}",
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
    if multi:
        nodes = state.net["nodes"]
        lines += ["SlurmdParameters=config_overrides"]
        lines += [f"NodeName={n['name']} NodeAddr={n['addr']} NodeHostname={n['name']} CPUs={cpus} "
                  f"RealMemory={max(1, memory_mb // len(nodes))} State=UNKNOWN" for n in nodes]
        lines += [f"PartitionName=debug Nodes={','.join(n['name'] for n in nodes)} Default=YES MaxTime=INFINITE "
                  f"State=UP"]
    else:
        lines += [f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
                  f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP"]
    path = Path(state.slurm_conf)
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)


def write_slurmdbd_conf(state: ClusterState, db_password: str) -> None:
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


