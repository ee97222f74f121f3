"""The Transformers config of a checkpoint (config.json) and the HF family a litgpt config maps to exactly."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from litgpt import Config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "tokenizer.model")


def hf_family(config: Config) -> str:
    """`gpt_neox` or `llama`, or a ValueError naming what cannot be exported."""
    if config.n_expert > 0 or "MoE" in config.mlp_class_name:
        raise ValueError(
            f"{config.name!r} is a mixture-of-experts model (n_expert={config.n_expert}, mlp={config.mlp_class_name}); "
            "convert-to-hf exports dense models only. Evaluate MoE checkpoints natively with `litgpt-ext evaluate`."
        )
    problems = []
    for field, ok in (
        ("norm_qk", not config.norm_qk), ("post_attention_norm", not config.post_attention_norm),
        ("post_mlp_norm", not config.post_mlp_norm), ("scale_embeddings", not config.scale_embeddings),
        ("rope_adjustments", config.rope_adjustments is None), ("rope_condense_ratio", config.rope_condense_ratio == 1),
        ("lm_head_bias", not config.lm_head_bias), ("shared_attention_norm", not config.shared_attention_norm),
        ("sliding_window_size", config.sliding_window_size is None), ("attention_logit_softcapping", config.attention_logit_softcapping is None),
        ("final_logit_softcapping", config.final_logit_softcapping is None),
        ("attn_bias", not config.attn_bias or config.bias),
    ):
        if not ok:
            problems.append(f"{field}={getattr(config, field)!r}")
    if config.mlp_class_name == "GptNeoxMLP" and config.norm_class_name == "LayerNorm":
        if config.n_query_groups != config.n_head:
            problems.append(f"n_query_groups={config.n_query_groups} (GPT-NeoX has no grouped-query attention)")
        if config.head_size * config.n_head != config.n_embd:
            problems.append(f"head_size={config.head_size} (GPT-NeoX needs n_embd / n_head)")
        family = "gpt_neox"
    elif config.mlp_class_name == "LLaMAMLP" and config.norm_class_name == "RMSNorm":
        if config.parallel_residual:
            problems.append("parallel_residual=True (Llama is sequential)")
        if config.bias:
            problems.append("bias=True (litgpt's Llama converter maps no bias weights)")
        if config.rotary_percentage != 1.0:
            problems.append(f"rotary_percentage={config.rotary_percentage} (Llama rotates the whole head)")
        family = "llama"
    else:
        raise ValueError(
            f"no Transformers architecture for mlp_class_name={config.mlp_class_name!r} with "
            f"norm_class_name={config.norm_class_name!r}; supported: GptNeoxMLP+LayerNorm (GPT-NeoX), LLaMAMLP+RMSNorm (Llama)"
        )
    if problems:
        raise ValueError(f"{config.name!r} cannot be exported to {family} exactly: {', '.join(problems)}")
    return family


def _rope_kwargs(config_cls, theta: float, partial: float | None) -> dict:
    """Transformers >=5 takes `rope_parameters`; 4.x takes rotary_pct / rope_theta keywords."""
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:
        rope = {"rope_type": "default", "rope_theta": theta}
        if partial is not None:
            rope["partial_rotary_factor"] = partial
        return {"rope_parameters": rope}
    if partial is not None:  # GPT-NeoX 4.x names
        return {"rotary_pct": partial, "rotary_emb_base": theta, "rope_theta": theta}
    return {"rope_theta": theta}


def hf_config(config: Config, family: str, eos_id: int | None = None, bos_id: int | None = None):
    import transformers

    common = dict(
        vocab_size=config.padded_vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.block_size, tie_word_embeddings=False,
        bos_token_id=bos_id, eos_token_id=eos_id,
    )
    if family == "gpt_neox":
        act = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[config.gelu_approximate]
        cls = transformers.GPTNeoXConfig
        return cls(**common, hidden_act=act, layer_norm_eps=config.norm_eps,
                   use_parallel_residual=config.parallel_residual, attention_bias=True,
                   **_rope_kwargs(cls, config.rope_base, config.rotary_percentage))
    cls = transformers.LlamaConfig
    return cls(**common, num_key_value_heads=config.n_query_groups, head_dim=config.head_size,
               hidden_act="silu", rms_norm_eps=config.norm_eps, attention_bias=False, mlp_bias=False,
               **_rope_kwargs(cls, config.rope_base, None))


def hf_config_json(model_config: Any, tokenizer_dir: Optional[Path]) -> Optional[str]:
    """The Transformers config.json `litgpt evaluate` needs, or None where there is none (MoE,
    architectures convert-to-hf refuses, transformers not installed)."""
    if model_config.name.lower().startswith(("falcon", "gemma", "phi", "qwen", "qwq", "olmo")):
        return None  # litgpt converts these by name, with layouts convert-to-hf does not describe
    try:
        family = hf_family(model_config)
    except ValueError:  # no exact HF equivalent (MoE, other MLP/norm): no config.json rather than a wrong one
        return None
    try:
        import transformers  # noqa: F401
    except ImportError:  # an optional dependency: litgpt evaluate then needs a config.json of its own
        return None
    eos = bos = None
    if tokenizer_dir is not None:
        from litgpt import Tokenizer

        tok = Tokenizer(Path(tokenizer_dir))
        eos, bos = tok.eos_id, tok.bos_id
    return hf_config(model_config, family, eos_id=eos, bos_id=bos).to_json_string()
