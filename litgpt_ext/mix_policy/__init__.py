"""Online data mixing: the blend's weights chosen during training (ODM's EXP3, DoReMi), exact and replayable.

`args` (the `mix_policy:` config section), `policies` (the pure update arithmetic) and `trajectory`
(`mix_trajectory.jsonl` and `litgpt-ext mix-replay`); the loop's side (per-source signals, updates
at step boundaries, the checkpointed state) is `litgpt_ext.train.mixing`. Docs: docs/data.md, "Online mixing".
"""

from litgpt_ext.mix_policy.args import POLICIES, MixPolicyArgs, MixPolicyConfig

__all__ = ["MixPolicyArgs", "MixPolicyConfig", "POLICIES"]
