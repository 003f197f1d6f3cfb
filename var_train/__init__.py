"""var_train: train VAR (next-scale prediction) from pre-extracted token shards, at any scale."""

__version__ = "0.1.0"
