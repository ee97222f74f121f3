"""`litgpt-ext extend-vocab`: add tokens to a checkpoint's tokenizer and embedding.

The new tokens become regular (non-special) *added tokens* of the HF `tokenizer.json`: the tokenizer
matches them in the raw text before pre-tokenization, so `litgpt.Tokenizer.encode` (and `prepare`)
give the new id wherever the string occurs, across pre-token boundaries (spaces, digits), which BPE
merges could not; decoding gives the string back. Their ids follow the old tokenizer's last id.

Each new row of the input embedding (and of `lm_head`, bias included, when it is not tied to the
embedding) is the mean of the rows of the token's old sub-pieces: the old tokenizer's encoding of the
token's text. Rows of old ids are copied unchanged, so the logits of old tokens on old-token input are
unchanged. `padded_vocab_size` stays a multiple of the model's `padding_multiple` (new ids that fit in
the old padding reuse those rows; otherwise the matrices grow, new padding rows are zeros in the
embedding and, in `lm_head`, the mean of the old padding rows, which training pushed down).

Written into `out_dir`: lit_model.pth, model_config.yaml (vocab_size, padded_vocab_size), the new
tokenizer files, the checkpoint's hyperparameters.yaml, config.json (Transformers, dense models), and `vocab_extension.json` (the tokens, their
ids and sub-pieces, both tokenizer digests). `tokenizer_config.json` records the digests of the
tokenizers it extends (`litgpt_ext.data.vocab_record`), so training with the new tokenizer refuses
shards that the old one tokenized, naming them. The output is a weights-only checkpoint: start from it
with `initial_checkpoint_dir` (the old optimizer state has the old shapes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

RECORD_FILE = "vocab_extension.json"
WTE = "transformer.wte.weight"
HEAD = "lm_head.weight"
HEAD_BIAS = "lm_head.bias"


class ExtendVocabError(ValueError):
    """Bad arguments or tokens that cannot be added; the message names the culprit."""


def read_new_tokens(path: Path) -> list[str]:
    """The tokens to add: a `.json` list of strings, or one token per line (taken verbatim but for the
    line break, so a leading space is part of the token; blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ExtendVocabError(f"new_tokens file {str(path)!r} does not exist (or is a folder)")
    if path.suffix == ".json":
        try:
            tokens = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ExtendVocabError(f"new_tokens file {str(path)!r} is not JSON: {e}") from None
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ExtendVocabError(f"new_tokens file {str(path)!r} must hold a JSON list of strings")
        tokens = [t for t in tokens if t.strip()]
    else:
        tokens = [ln.rstrip("\r\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not tokens:
        raise ExtendVocabError(f"new_tokens file {str(path)!r} holds no token (it is empty or blank)")
    dups = sorted({t for t in tokens if tokens.count(t) > 1})
    if dups:
        raise ExtendVocabError(f"new_tokens file {str(path)!r} lists {', '.join(map(repr, dups[:5]))} more than once")
    return tokens


def _existing(old, token: str) -> Optional[int]:
    """The id `token` already has: a vocabulary entry, an added token, or a text the old tokenizer
    encodes as one token."""
    id_ = old.token_to_id(token)
    if id_ is not None:
        return id_
    ids = old.encode(token, add_special_tokens=False).ids
    return ids[0] if len(ids) == 1 else None


def _mean_rows(weight, pieces: list[int]):
    return weight[pieces].float().mean(dim=0).to(weight.dtype)


def extend_vocab(
    checkpoint: Path,
    new_tokens: Path,
    out_dir: Path,
    tokenizer_dir: Optional[Path] = None,
) -> dict:
    """Add tokens to a checkpoint's tokenizer; new embedding rows are the mean of their old sub-pieces.

    Args:
        checkpoint: A checkpoint folder (lit_model.pth + model_config.yaml).
        new_tokens: The tokens to add: one per line (verbatim: a leading space belongs to the token) or a .json list.
        out_dir: The new checkpoint (weights, model_config.yaml, tokenizer, vocab_extension.json); must not exist.
        tokenizer_dir: The tokenizer to extend (a folder with tokenizer.json); default: the checkpoint's own.

    Returns:
        The record written to `vocab_extension.json`.
    """
    from litgpt_ext.data.vocab_record import EXTENDED_FROM_KEY, extended_from
    from litgpt_ext.prep.tokenizer import tokenizer_digest

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_dir():
        raise ExtendVocabError(f"checkpoint {str(checkpoint)!r} does not exist (or is not a folder)")
    missing = [f for f in ("lit_model.pth", "model_config.yaml") if not (checkpoint / f).is_file()]
    if missing:
        raise ExtendVocabError(f"checkpoint {str(checkpoint)!r} is not a checkpoint: it has no {' and no '.join(missing)}")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else checkpoint
    if not (tok_dir / "tokenizer.json").is_file():
        raise ExtendVocabError(f"tokenizer_dir {str(tok_dir)!r} has no tokenizer.json (extend-vocab extends a Hugging "
                               f"Face tokenizers file; sentencepiece tokenizer.model is not supported)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExtendVocabError(f"out_dir {str(out_dir)!r} already exists and is not empty; give a new folder")
    tokens = read_new_tokens(new_tokens)

    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    old = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    taken = [(t, i) for t in tokens if (i := _existing(old, t)) is not None]
    if taken:
        shown = ", ".join(f"{t!r} (id {i})" for t, i in taken[:5]) + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
        raise ExtendVocabError(f"already in the vocabulary of {str(tok_dir / 'tokenizer.json')!r}: {shown}; "
                               f"remove them from {str(new_tokens)!r}")
    pieces = {t: old.encode(t, add_special_tokens=False).ids for t in tokens}
    empty = [t for t, p in pieces.items() if not p]
    if empty:
        raise ExtendVocabError(f"the old tokenizer encodes {', '.join(map(repr, empty[:5]))} as nothing; "
                               "no sub-pieces to initialise them from")

    new = HFTokenizer.from_str(old.to_str())
    first_id = new.get_vocab_size(with_added_tokens=True)
    new.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)
                    for t in tokens])
    ids = {t: new.token_to_id(t) for t in tokens}
    bad = [t for t in tokens if new.encode(t, add_special_tokens=False).ids != [ids[t]]]
    if bad:
        raise ExtendVocabError(f"after adding, {', '.join(map(repr, bad[:5]))} do not encode as their own new token "
                               "(one contains another new token?)")

    import torch
    from litgpt import Config
    from litgpt.utils import save_config

    from litgpt_ext.checkpoint import load_model_state

    config = Config.from_file(checkpoint / "model_config.yaml")
    sd = dict(load_model_state(checkpoint))
    if WTE not in sd:
        raise ExtendVocabError(f"checkpoint {str(checkpoint)!r} has no {WTE} (not a litgpt GPT state dict)")
    wte = sd[WTE]
    tied = HEAD not in sd or sd[HEAD].data_ptr() == wte.data_ptr()
    old_rows = wte.shape[0]
    old_vocab = int(config.vocab_size)
    top = max(ids.values()) + 1
    new_vocab = max(old_vocab, top)
    mult = int(getattr(config, "padding_multiple", 1) or 1)
    padded = max(old_rows, math.ceil(new_vocab / mult) * mult)
    if padded % mult:  # the old matrix was not a multiple already: round it up too
        padded = math.ceil(padded / mult) * mult
    tok_size = first_id  # ids below this are the old tokenizer's; rows in [tok_size, old_rows) were padding

    def grow(weight, pad_init):
        out = torch.zeros((padded, *weight.shape[1:]), dtype=weight.dtype)
        out[:old_rows] = weight
        if padded > old_rows and pad_init is not None:
            out[old_rows:] = pad_init
        for t in tokens:
            out[ids[t]] = _mean_rows(weight, pieces[t])
        return out

    new_wte = grow(wte, None)
    sd[WTE] = new_wte
    if tied:
        if HEAD in sd:
            sd[HEAD] = new_wte
    else:
        head = sd[HEAD]
        pad_rows = head[tok_size:old_rows] if old_rows > tok_size else None
        sd[HEAD] = grow(head, pad_rows.float().mean(dim=0).to(head.dtype) if pad_rows is not None and len(pad_rows) else None)
        if HEAD_BIAS in sd:
            bias = sd[HEAD_BIAS]
            pad_b = bias[tok_size:old_rows].float().mean().to(bias.dtype) if old_rows > tok_size else None
            sd[HEAD_BIAS] = grow(bias, pad_b)
    config.vocab_size = new_vocab
    config.padded_vocab_size = padded

    old_digest = tokenizer_digest(tok_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    try:
        torch.save(sd, tmp / "lit_model.pth")
        save_config(config, tmp)
        new.save(str(tmp / "tokenizer.json"))
        for name in ("special_tokens_map.json", "generation_config.json"):
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, tmp / name)
        cfg_path = tok_dir / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        tok_cfg[EXTENDED_FROM_KEY] = [old_digest] + [d for d in extended_from(tok_dir) if d != old_digest]
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        from litgpt_ext.checkpoint.hf import hf_config_json  # config.json for `litgpt evaluate` (dense models)

        hf = hf_config_json(config, tmp)
        if hf is not None:
            (tmp / "config.json").write_text(hf)
        if (checkpoint / "hyperparameters.yaml").is_file():
            shutil.copy2(checkpoint / "hyperparameters.yaml", tmp / "hyperparameters.yaml")
        record = {
            "source_checkpoint": str(checkpoint),
            "source_tokenizer": str(tok_dir),
            "old_tokenizer_digest": old_digest,
            "new_tokenizer_digest": tokenizer_digest(tmp),
            "old_vocab_size": old_vocab, "new_vocab_size": new_vocab,
            "old_padded_vocab_size": old_rows, "new_padded_vocab_size": padded, "padding_multiple": mult,
            "tied_embeddings": tied,
            "tokens": [{"text": t, "id": ids[t], "pieces": pieces[t]} for t in tokens],
        }
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"extend-vocab: added {len(tokens)} token(s) (ids {min(ids.values())}-{top - 1}) to {tok_dir}; vocab_size "
          f"{old_vocab} -> {new_vocab}, padded_vocab_size {old_rows} -> {padded} (padding_multiple {mult}); wrote "
          f"{out_dir} (start training from it with initial_checkpoint_dir and tokenizer_dir {out_dir}; re-prepare "
          f"shards with --tokenizer_dir {out_dir})", flush=True)
    return record
