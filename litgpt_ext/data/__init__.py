"""Typed token shards, mix resolution and the exact, resumable ShardedMixedDataset."""

from litgpt_ext.data.mixing import Blend, MixSpec, mix_spec, parse_weights_str, resolve_weights
from litgpt_ext.data.shard_types import DEFAULT_SHARD_TYPES, MixError, Shard, build_registry, discover_shards
from litgpt_ext.data.sharded_mixed import MixedLoader, ShardedMixedDataset

__all__ = [
    "Blend", "DEFAULT_SHARD_TYPES", "MixError", "MixSpec", "MixedLoader", "Shard", "ShardedMixedDataset",
    "build_registry", "discover_shards", "mix_spec", "parse_weights_str", "resolve_weights",
]
