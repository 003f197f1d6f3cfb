"""data_prep: images -> multi-scale token shards, tokenizer training and the demo data set."""
