"""Write a labelled image set as WebDataset shards (see `lacvit-make-shards --help`)."""
from lacvit_dist.data.make_shards import main

# The guard matters: worker processes (forkserver/spawn) re-import this file as `__mp_main__`, and an
# unguarded call would run the whole command again inside every worker.
if __name__ == "__main__":
    raise SystemExit(main())
