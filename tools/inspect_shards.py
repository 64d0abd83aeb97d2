"""Summarise / verify a WebDataset shard set (see `python tools/inspect_shards.py --help`)."""
from lacvit_dist.data.inspect import main

raise SystemExit(main())
