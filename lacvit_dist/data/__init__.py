"""Data: WebDataset shards (writing, reading) and the image transforms of each stage."""
