"""Checks that run in training setup, before the first step: the optimizer spec and the shards'
token ids against the model's vocabulary. Each failure is a ValueError naming the bad value and
what would be valid (the CLI shows it without a traceback)."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any, Union

SPEC_KEYS = ("class_path", "init_args")


def resolve_optimizer(optimizer: Union[str, dict]) -> dict:
    """`optimizer` as {class_path, init_args} with command-line overrides applied and checked.

    jsonargparse types `optimizer: Union[str, dict]` as a plain dict, so `--optimizer.init_args.lr 0.1`
    (and `--optimizer.lr 0.1`) do not reach `init_args`: it stores them as a top-level key `lr` with the
    string value '0.1', and litgpt's `instantiate_torch_optimizer` ignores top-level keys, so the YAML's
    lr silently won. Here such keys are parsed as YAML scalars and override `init_args`.
    """
    from litgpt_ext.train.optim import EXT_KEYS, _number, split_spec

    ext: dict[str, Any] = {}
    if isinstance(optimizer, str):
        spec: dict[str, Any] = {"class_path": optimizer, "init_args": {}}
    elif isinstance(optimizer, dict):
        spec = {"class_path": optimizer.get("class_path", "AdamW"), "init_args": dict(optimizer.get("init_args") or {})}
        for key, value in optimizer.items():
            if key in EXT_KEYS:  # layer_lr_decay, adamw, muon_params: litgpt_ext.train.optim
                ext[key] = value
            elif key not in SPEC_KEYS:
                spec["init_args"][key] = _number(value)  # a flag's string: YAML scalar ('1e-3' too)
    else:
        raise ValueError(f"optimizer={optimizer!r}: give a torch.optim class name (AdamW) or {{class_path, init_args}}")
    spec, ext = split_spec({**spec, **ext})  # checked: (0, 1] decay, AdamW args, Muon-only keys
    path = str(spec["class_path"])
    module_name, _, cls_name = path.rpartition(".")
    module_name = module_name or "torch.optim"
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        import torch.optim

        names = sorted(n for n, c in vars(torch.optim).items()
                       if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer)
        raise ValueError(f"optimizer class_path {path!r} is not an importable class; choose a torch.optim"
                         f" class ({', '.join(names)}) or a full module path") from None
    params = inspect.signature(cls).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(spec["init_args"]) - set(params) - {"params"})
        if unknown:
            valid = [n for n in params if n != "params"]
            raise ValueError(f"optimizer {cls.__name__} takes no argument {', '.join(map(repr, unknown))};"
                             f" valid: {', '.join(valid)}")
    lr = spec["init_args"].get("lr", params["lr"].default if "lr" in params else None)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"optimizer lr={lr!r} (optimizer.init_args.lr): the peak learning rate must be a number > 0")
    spec["class_path"] = f"{module_name}.{cls_name}"
    return {**spec, **ext}


SCAN_BYTES = 256 * 2**20
"""Shards without a recorded max token id are scanned up to this many bytes each (a shard from another
tokenizer has out-of-range ids everywhere, so its first chunks show it; a full scan of a large
corpus at every start would cost minutes)."""


def shard_max_token_id(path: Path, scan_bytes: int = SCAN_BYTES) -> int:
    """The largest token id in a shard: recorded by `prepare` (prepare_meta.json), else scanned
    (its first `scan_bytes` of chunk data)."""
    meta_path = Path(path) / "prepare_meta.json"
    if meta_path.is_file():
        try:
            value = json.loads(meta_path.read_text()).get("max_token_id")
        except (OSError, json.JSONDecodeError):
            value = None
        if isinstance(value, int):
            return value
    from litgpt_ext.data.shard_io import token_chunks

    layout = token_chunks(path)
    if layout is None:
        return -1  # cannot scan cheaply; the tokenizer check still applies
    top, budget = -1, scan_bytes
    for k in range(len(layout.chunks)):
        mm = layout.memmap(k)
        n = min(mm.size, max(budget // mm.itemsize, 0))
        if n:
            top = max(top, int(mm[:n].max()))
        budget -= n * mm.itemsize
        if budget <= 0:
            break
    return top


def _tokenizer_digest(tokenizer_dir: Path) -> str:
    from litgpt_ext.prep.tokenizer import tokenizer_digest as digest

    return digest(Path(tokenizer_dir))


def check_shards_fit_model(data: Any, config: Any, tokenizer_dir: Path | None) -> None:
    """Refuse shards whose token ids the model cannot embed, or that another tokenizer prepared.

    Without this a shard prepared with a bigger vocabulary fails at step 1 with an IndexError inside
    the embedding (or a CUDA device-side assert). Checks every train and validation shard the data
    module will read (ShardedMixedDataset); other data modules are not checked.
    """
    shards = getattr(data, "shards_by_id", None)
    if not shards:
        return
    paths = {sid: s.path for sid, s in shards.items() if sid in (getattr(data, "weights", None) or shards)}
    if hasattr(data, "val_data_path") and data.val_data_path not in (None, ""):
        from litgpt_ext.data.sharded_mixed import _val_paths

        named = data.val_data_path if isinstance(data.val_data_path, dict) else {"val": data.val_data_path}
        for name, p in named.items():
            for q in _val_paths(name, p):
                paths[f"val:{name}:{q.name}"] = q
    from litgpt_ext.data.vocab_record import check_shard_tokenizers

    check_shard_tokenizers(paths, tokenizer_dir)  # old-vocabulary shards (extend-vocab), mixed tokenizers
    vocab = config.padded_vocab_size or config.vocab_size
    digest = _tokenizer_digest(tokenizer_dir) if tokenizer_dir is not None else None
    for sid, path in paths.items():
        meta = _meta(path)
        if digest is not None and meta and meta.get("settings", {}).get("tokenizer") not in (None, digest):
            raise ValueError(
                f"shard {sid!r} ({path}) was prepared with the tokenizer in {meta.get('tokenizer_dir')!r}, not with"
                f" this run's tokenizer_dir {str(tokenizer_dir)!r} (different files): re-prepare it with"
                f" `litgpt-ext prepare --tokenizer_dir {tokenizer_dir}` or point tokenizer_dir at the shard's tokenizer"
            )
        top = shard_max_token_id(path)
        if top >= vocab:
            raise ValueError(
                f"shard {sid!r} ({path}) holds token id {top}, but the model's vocabulary has {vocab} ids"
                f" (model_config.padded_vocab_size / vocab_size): the shard was tokenized with a larger vocabulary;"
                f" set the model's vocab_size/padded_vocab_size >= {top + 1} or re-prepare the shard with the"
                f" model's tokenizer"
            )


def _meta(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / "prepare_meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_model_name(name: str) -> None:
    """litgpt says only "'x' is not a supported config name": name the closest valid ones."""
    import difflib

    from litgpt.config import name_to_config

    if name not in name_to_config:
        close = difflib.get_close_matches(name, list(name_to_config), n=5, cutoff=0.5)
        raise ValueError(f"model_name={name!r} is not a litgpt model name; closest: {', '.join(close) or 'none'}"
                         f" (e.g. pythia-14m, pythia-160m; or give an inline model_config)")


def check_pretrain_inputs(optimizer: Union[str, dict], tokenizer_dir: Path | None, num_nodes: int | None = None,
                          model_name: str | None = None) -> dict:
    """What `pretrain` checks before building anything: the resolved optimizer spec is returned.
    `model_name` is checked only when it picks the architecture (no inline model_config)."""
    if model_name:
        check_model_name(model_name)
    if num_nodes is not None and num_nodes < 1:
        raise ValueError(f"num_nodes={num_nodes} must be >= 1 (or null: SLURM_JOB_NUM_NODES, else 1)")
    if tokenizer_dir is not None:
        from litgpt_ext.prep.tokenizer import check_tokenizer_dir

        check_tokenizer_dir(tokenizer_dir)
    return resolve_optimizer(optimizer)
