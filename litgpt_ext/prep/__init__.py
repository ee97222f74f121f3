"""Data preparation: tokenizer training, raw text -> litdata token shards, the offline demo corpus."""
