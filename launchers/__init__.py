"""Job launchers for lacvit_dist: `submit.py` (the `lacvit-submit` command: one submitit job per stage, in one run
folder), the job callable and its requeue protocol (`slurm_job.py`), what to submit and the `--dry-run` sbatch
scripts (`plan.py`), `--status` (`status.py`), and a SLURM cluster on this machine for tests and laptops
(`local_cluster.py`, internals in `cluster/`)."""
