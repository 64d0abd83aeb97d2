"""Entry point for every launcher: `python train.py`, `torchrun train.py`, `deepspeed train.py`, `srun python
train.py`. All arguments are parsed in lacvit_dist.cli (see `python train.py --help`)."""
from lacvit_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
