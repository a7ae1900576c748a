"""Data: corpora (sources), token shards (prepare) and training batches."""
