"""Job launchers for lacvit_dist: submitit/SLURM submission (`launchers/submit.py`, logic in
`launchers.slurm_jobs`) and a one-node SLURM cluster started by hand for tests and laptops
(`launchers/local_cluster.py`)."""
