"""Write a labelled image set as WebDataset shards (see `lacvit-make-shards --help`)."""
from lacvit_dist.data.make_shards import main

raise SystemExit(main())
