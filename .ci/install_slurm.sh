#!/usr/bin/env bash
# Install what launchers/local_cluster.py needs for a one-node SLURM cluster (tests/test_slurm.py):
# slurmctld, slurmd and the client commands, munge, and slurmdbd + MariaDB for accounting (sacct); for several nodes
# on one machine (tests/test_multinode.py: network namespaces) iproute2's `ip` and util-linux's nsenter / unshare.
# Idempotent and quiet: does nothing when everything is already there. Debian/Ubuntu (apt-get), as root.
# Starts nothing: Debian's postinst scripts try to start the services, which is refused without systemd
# (policy-rc.d) and harmless; local_cluster.py starts the daemons by hand.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2 util-linux)
BINARIES=(slurmctld slurmd sbatch sacct munged slurmdbd mariadbd ip nsenter unshare)

missing=0
for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing=1
done
if [ "$missing" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm.sh: needs root to apt-get install ${PACKAGES[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm.sh: no apt-get; install ${PACKAGES[*]} with this system's package manager" >&2
    exit 1
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq "${PACKAGES[@]}"; } >"$log" 2>&1; then
    echo "install_slurm.sh: apt-get failed:" >&2
    tail -n 30 "$log" >&2
    exit 1
fi
echo "install_slurm.sh: installed ${PACKAGES[*]}"
