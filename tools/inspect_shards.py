"""Summarise / verify a WebDataset shard set (see `python tools/inspect_shards.py --help`)."""
from lacvit_dist.data.inspect import main

# The guard matters: worker processes (forkserver/spawn) re-import this file as `__mp_main__`, and an
# unguarded call would run the whole command again inside every worker.
if __name__ == "__main__":
    raise SystemExit(main())
