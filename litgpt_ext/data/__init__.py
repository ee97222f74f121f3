"""Typed token shards, mix resolution and the exact, resumable ShardedMixedDataset.

`ShardedMixedDataset` and `MixedLoader` are imported lazily: they pull in litgpt and lightning,
which light commands such as `inspect-mix` do not need.
"""

from litgpt_ext.data.blend import Blend
from litgpt_ext.data.mix_spec import MixSpec, mix_spec, parse_weights_str, resolve_weights
from litgpt_ext.data.shard_types import DEFAULT_SHARD_TYPES, MixError, Shard, build_registry, discover_shards

__all__ = [
    "Blend", "DEFAULT_SHARD_TYPES", "MixError", "MixSpec", "MixedLoader", "Shard", "ShardedMixedDataset",
    "build_registry", "discover_shards", "mix_spec", "parse_weights_str", "resolve_weights",
]


def __getattr__(name: str):
    if name in ("ShardedMixedDataset", "MixedLoader"):
        from litgpt_ext.data import sharded_mixed

        return getattr(sharded_mixed, name)
    raise AttributeError(f"module 'litgpt_ext.data' has no attribute {name!r}")
