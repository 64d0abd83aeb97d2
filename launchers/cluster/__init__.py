"""The test cluster behind `launchers/local_cluster.py`: its recorded state, SLURM and munge daemons, config files."""
