"""`litgpt-ext merge-lora <adapter checkpoint> <out_dir>`: a LoRA run's checkpoint as full weights.

litgpt's own `litgpt merge_lora` reads `finetune_lora`'s output (its hyperparameters.yaml's
`checkpoint_dir` and `lora_*` keys) and writes lit_model.pth into the adapter's folder; our adapter
checkpoints record their base in lora.json (checked against its sha256) and checkpoints are never
changed in place, so this command does the same merge (litgpt's `litgpt.lora.GPT` and
`merge_lora_weights`, and merge_lora's renaming) into a new folder.

The output is a plain litgpt checkpoint: lit_model.pth (the base's keys and dtypes), model_config.yaml
(litgpt's `Config`, no lora fields), tokenizer files and config.json, so `evaluate`, `sft`,
`convert-to-hf` and litgpt's loaders read it; plus training_state.pth (step, tokens, data
cursors, RNG; no optimizer state: the adapter's does not apply to full weights), the run's
hyperparameters.yaml (with `lora: null`), merged_from.json (adapter, base and their hashes) and the
manifest, so `fork` and `resume` take it too: a midtraining run that trains every weight can
continue where the LoRA run stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from litgpt_ext.checkpoint.layout import (
    CONFIG_FILE,
    HPARAMS_FILE,
    LORA_FILE,
    MODEL_FILE,
    _sha256,
    load_training_state,
)
from litgpt_ext.checkpoint.lora import find_base, is_adapter, read_record, record_args
from litgpt_ext.checkpoint.verify import verify_checkpoint

MERGE_RECORD = "merged_from.json"


def merge_lora(checkpoint: Path, out_dir: Path, base_checkpoint_dir: Optional[Path] = None, force: bool = False) -> Path:
    """Merge a LoRA adapter checkpoint into its base: W + (alpha / r)·B·A, as a full checkpoint.

    Args:
        checkpoint: a LoRA run's checkpoint (`step-*/` or `final/` holding lit_model.pth.lora + lora.json).
        out_dir: the merged checkpoint's folder (a new one; see --force).
        base_checkpoint_dir: where the adapter's base is now, when it moved (default: the path in its
            lora.json, then `lora_base/` beside it); its lit_model.pth must have the recorded sha256.
        force: replace an existing out_dir.
    """
    import torch
    import yaml
    from litgpt import Config

    from litgpt_ext.checkpoint.io import load_model_state, write_checkpoint
    from litgpt_ext.model.lora import build_lora_model, load_adapter, load_base, merged_state_dict

    src, out = Path(checkpoint), Path(out_dir)
    if src.is_file():
        src = src.parent
    if not src.is_dir():
        raise FileNotFoundError(f"merge-lora: checkpoint {str(src)!r} does not exist")
    if not is_adapter(src):
        what = (f"it is a full checkpoint ({MODEL_FILE}) already: evaluate or fork it as it is" if (src / MODEL_FILE).is_file()
                else "expected a LoRA run's step-*/ or final/ folder (lit_model.pth.lora + lora.json)")
        raise ValueError(f"merge-lora: {str(src)!r} holds no LoRA adapter ({LORA_FILE}); {what}")
    why = verify_checkpoint(src)
    if why is not None:
        raise FileNotFoundError(f"merge-lora: cannot merge {str(src)!r}: {why}")
    if out.resolve() == src.resolve():
        raise ValueError(f"merge-lora: out_dir {str(out)!r} is the adapter checkpoint itself; give a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"merge-lora: out_dir {str(out)!r} exists; pass --force true to replace it")
    rec = read_record(src)
    args = record_args(rec)
    base = find_base(src, rec, base_checkpoint_dir, what="--base_checkpoint_dir")
    config = Config.from_file(src / CONFIG_FILE)

    with torch.device("meta"):  # no init: every tensor comes from the base or the adapter (litgpt's merge_lora too)
        model = build_lora_model(config, args)
    load_base(model, base, config, assign=True)
    load_adapter(model, torch.load(src / LORA_FILE, map_location="cpu", weights_only=True), src / LORA_FILE, assign=True)
    dtypes = {k: v.dtype for k, v in load_model_state(base).items()}
    merged = merged_state_dict(model, dtypes)

    state = load_training_state(src)
    state["optimizer"] = None  # the adapter's moments; a run on the merged weights starts its optimizer fresh
    hparams = yaml.safe_load((src / HPARAMS_FILE).read_text()) or {}
    hparams["lora"] = None
    record = {"adapter": str(src.resolve()), "adapter_sha256": _sha256(src / LORA_FILE), "lora": rec["lora"],
              "base": str(base.resolve()), "base_sha256": rec["base"]["sha256"], "step": state.get("step")}
    tokenizer = src if any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model")) else None
    write_checkpoint(out, merged, state, config, hparams, tokenizer_dir=tokenizer,
                     extra_files={MERGE_RECORD: json.dumps(record, indent=1) + "\n"})
    n = sum(t.numel() for t in merged.values())
    print(f"merged {src} ({args.describe()}) into its base {base} -> {out} ({len(merged)} tensors, {n:,} values;"
          f" step {state.get('step')})")
    return out
