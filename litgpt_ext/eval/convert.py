"""`litgpt-ext convert-to-hf`: export a dense checkpoint as a Hugging Face Transformers model.

Weights are renamed by litgpt's own converter functions (`litgpt.scripts.convert_lit_checkpoint`);
litgpt writes only a `model.pth` state dict, so we add what it leaves out: the matching
Transformers config (GPT-NeoX for pythia-like configs, Llama for LLaMA-like ones), safetensors
weights via `save_pretrained`, and the tokenizer files. Configs the target architecture cannot
express exactly (MoE, QK-norm, rope scaling, ...) are refused rather than silently approximated.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from litgpt import Config

from litgpt_ext.checkpoint.hf import TOKENIZER_FILES, hf_config, hf_family  # noqa: F401  (the export API)
from litgpt_ext.checkpoint.layout import adapter_hint
from litgpt_ext.checkpoint.loading import is_checkpoint_dir, load_state_dict, resolve_dtype


def convert_state_dict(config: Config, lit_sd: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Rename (and for GPT-NeoX, re-interleave QKV) with litgpt's converter functions."""
    from litgpt.scripts.convert_lit_checkpoint import (
        check_conversion_supported,
        copy_weights_gpt_neox,
        copy_weights_llama,
    )

    check_conversion_supported(lit_sd)
    out: dict[str, torch.Tensor] = {}
    if family == "gpt_neox":
        copy_weights_gpt_neox(config, out, lit_sd)
    else:
        copy_weights_llama(config, out, lit_sd)
    return out


@torch.inference_mode()
def convert_to_hf(checkpoint: Path, out_dir: Path, dtype: str = "float32", safe_serialization: bool = True) -> Path:
    """Export a dense checkpoint to a Transformers folder (`config.json`, weights, tokenizer).

    Args:
        checkpoint: checkpoint folder with lit_model.pth, model_config.yaml and tokenizer files.
        out_dir: output folder; load it with `AutoModelForCausalLM.from_pretrained(out_dir)` or
            lm-eval's `--model hf --model_args pretrained=<out_dir>`.
        dtype: weight dtype to save: float32, bfloat16 or float16.
        safe_serialization: save `model.safetensors` (else `pytorch_model.bin`).

    Returns:
        `out_dir`.
    """
    try:
        import transformers
    except ImportError as e:  # optional dependency
        raise ImportError("convert-to-hf needs transformers: pip install 'litgpt_ext[hf]'") from e

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not is_checkpoint_dir(checkpoint):
        raise FileNotFoundError(f"{str(checkpoint)!r} is not a checkpoint folder (lit_model.pth + model_config.yaml)"
                                f"{adapter_hint(checkpoint)}")
    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    config = Config.from_file(checkpoint / "model_config.yaml")
    family = hf_family(config)

    eos_id = bos_id = None
    if (checkpoint / "tokenizer.json").is_file() or (checkpoint / "tokenizer.model").is_file():
        from litgpt import Tokenizer

        tok = Tokenizer(checkpoint)
        eos_id, bos_id = tok.eos_id, tok.bos_id

    lit_sd = load_state_dict(checkpoint)
    hf_sd = convert_state_dict(config, lit_sd, family)
    cfg = hf_config(config, family, eos_id=eos_id, bos_id=bos_id)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    # litgpt's bias=False GPT-NeoX has no bias tensors; GPT-NeoX always has them: zeros are exact.
    really_missing = [k for k in missing if not (family == "gpt_neox" and not config.bias and k.endswith(".bias"))]
    really_missing = [k for k in really_missing if "rotary_emb" not in k and "masked_bias" not in k]
    if really_missing or unexpected:
        raise RuntimeError(f"conversion mismatch for {checkpoint}: missing {really_missing[:5]}, unexpected {unexpected[:5]}")
    for k in missing:
        if k.endswith(".bias"):
            model.get_parameter(k).zero_()
    model = model.to(torch_dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out_dir / name)
    print(f"convert-to-hf: {checkpoint} -> {out_dir} ({family}, {sum(p.numel() for p in model.parameters()):,} params, {dtype})")
    return out_dir


@torch.inference_mode()
def convert_moe_to_litgpt(checkpoint: Path, out_dir: Path, allow_routing_change: bool = False) -> Path:
    """Rewrite an MoE checkpoint in litgpt's own `LLaMAMoE` layout (for `litgpt generate`, `chat`, ...).

    Our MoE stacks the experts' weights (`experts.fc_1: [n_expert, I, C]`); litgpt keeps one
    module per expert (`experts.{i}.fc_1.weight`). Dense checkpoints need no conversion.

    Args:
        checkpoint: MoE checkpoint folder (lit_model.pth, model_config.yaml, hyperparameters.yaml).
        out_dir: output folder: a bare litgpt state dict in `lit_model.pth`, `model_config.yaml`
            and the tokenizer files.
        allow_routing_change: convert even when litgpt's LLaMAMoE would route differently from the
            trained model (a non-default gate, a capacity factor, or a learned aux-free routing
            bias that litgpt's softmax router has no place for). Refused by default.

    Returns:
        `out_dir`.
    """
    from litgpt import GPT
    from litgpt.utils import save_config

    from litgpt_ext.model import load_moe_args, to_litgpt_state_dict

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not is_checkpoint_dir(checkpoint):
        raise FileNotFoundError(f"{str(checkpoint)!r} is not a checkpoint folder (lit_model.pth + model_config.yaml)"
                                f"{adapter_hint(checkpoint)}")
    if out_dir.resolve() == checkpoint.resolve():
        raise ValueError(f"out_dir {str(out_dir)!r} is the checkpoint itself; choose a new folder")
    config = Config.from_file(checkpoint / "model_config.yaml")
    if config.n_expert == 0:
        raise ValueError(f"{str(checkpoint)!r} is a dense model (n_expert=0): litgpt loads it as is, nothing to convert")
    moe = load_moe_args(checkpoint)
    sd = load_state_dict(checkpoint)
    # what litgpt's LLaMAMoE computes: softmax top-k, renormalised, unless group-limited sigmoid routing
    litgpt_gate = "sigmoid" if config.n_expert_groups else "softmax"
    litgpt_norm = True if litgpt_gate == "softmax" else bool(config.norm_topk_prob)
    problems = []
    if moe is not None:
        if moe.gate not in (None, litgpt_gate):
            problems.append(f"gate={moe.gate!r} (litgpt uses {litgpt_gate!r} for this config)")
        if moe.normalize_gates not in (None, litgpt_norm):
            problems.append(f"normalize_gates={moe.normalize_gates} (litgpt: {litgpt_norm})")
        if moe.capacity_factor is not None:
            problems.append(f"capacity_factor={moe.capacity_factor} (litgpt is dropless)")
    with torch.device("meta"):
        target_keys = set(GPT(config).state_dict())
    out = to_litgpt_state_dict(sd)
    for key, value in sd.items():  # routing biases: keep them where litgpt's router has the buffer
        if key.endswith("gate.e_score_correction_bias"):
            if key in target_keys:
                out[key] = value
            elif bool(value.abs().sum() > 0):
                problems.append(f"{key} is non-zero (aux-free balancing) and litgpt's softmax router has no bias")
    if problems and not allow_routing_change:
        raise ValueError(
            f"litgpt's LLaMAMoE would route {str(checkpoint)!r} differently: {'; '.join(problems[:4])}"
            f"{' ...' if len(problems) > 4 else ''}. Pass --allow_routing_change true to convert anyway."
        )
    missing, unexpected = sorted(target_keys - set(out)), sorted(set(out) - target_keys)
    if missing or unexpected:
        raise RuntimeError(f"converted weights do not match litgpt's GPT: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(out, out_dir / "lit_model.pth")  # bare state dict, as litgpt's own checkpoints
    save_config(config, out_dir)
    for name in (*TOKENIZER_FILES, "config.json"):
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out_dir / name)
    print(f"convert-moe-to-litgpt: {checkpoint} -> {out_dir} ({config.n_expert} experts x {config.n_layer} layers)"
          + (f"; routing differs: {'; '.join(problems)}" if problems else ""))
    return out_dir
