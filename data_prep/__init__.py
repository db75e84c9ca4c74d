"""Turn unlabeled image corpora into WebDataset shards with DALI indexes and a manifest."""
