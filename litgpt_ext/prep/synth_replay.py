"""`litgpt-ext synth-replay`: replay data sampled from a frozen checkpoint, for when the original
pretraining data is gone.

The checkpoint (litgpt layout: lit_model.pth, model_config.yaml, tokenizer files) continues prompt
prefixes (a text file, one prefix per line, or a JSONL file of `{"text": ...}`; cycled through in
order) with litgpt's own `generate` (temperature, top-p, top-k); document i is sampled under a seed
derived from (seed, i), so the output is reproducible and does not depend on the documents before
it. Each prompt is conditioned on a document boundary (BOS if the tokenizer adds one, else EOS:
what precedes a document in the training stream), and the prompt is part of the document.
Near duplicates are removed with `clean`'s MinHash dedup (exact duplicates, then estimated word
5-gram Jaccard >= `dedup_threshold`; the first one is kept), and the kept documents are tokenized by
`prepare` into a typed shard (`s1`, type `synth`) under `out_dir`, so `main:0.5,synth:0.3,math:0.2`
is a mix over that data folder. Written next to the shard's `prepare_meta.json`: `synth_docs.jsonl`
(the kept documents, with the prompt and sample index of each) and `synth_meta.json` (settings,
counts, the dedup report).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional

SYNTH_TYPE = "synth"
DOCS_FILE = "synth_docs.jsonl"
META_FILE = "synth_meta.json"


class SynthReplayError(ValueError):
    """Bad arguments or an output synth-replay will not write onto; the message names the culprit."""


def read_prompts(path: Path, field: str = "text") -> list[str]:
    """Prompt prefixes: `.jsonl` (one JSON object per line, `field` holds the prefix, or a bare string),
    else one prefix per line. Blank lines are skipped; an empty result is refused."""
    path = Path(path)
    if not path.is_file():
        raise SynthReplayError(f"prompts file {str(path)!r} does not exist (or is a folder); give a text file "
                               "with one prefix per line or a JSONL file of {\"text\": ...}")
    prompts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SynthReplayError(f"prompts file {str(path)!r} line {n} is not JSON: {e}") from None
                text = obj.get(field) if isinstance(obj, dict) else obj
                if not isinstance(text, str):
                    raise SynthReplayError(f"prompts file {str(path)!r} line {n} has no string field {field!r}")
                prompts.append(text)
            else:
                prompts.append(line.rstrip("\r\n"))
    if not prompts:
        raise SynthReplayError(f"prompts file {str(path)!r} holds no prompt (it is empty or blank)")
    return prompts


def doc_seed(seed: int, index: int) -> int:
    """The sampling seed of document `index`: a hash of (seed, index), so each document is
    reproducible on its own."""
    return int.from_bytes(hashlib.blake2b(f"synth:{seed}:{index}".encode(), digest_size=8).digest(), "little") >> 1


def check_args(checkpoint: Path, prompts: Path, num_docs: int, out_dir: Path, shard: str, temperature: float,
               top_p: float, top_k: Optional[int], max_new_tokens: int, dedup_threshold: float,
               prompt_tokens: Optional[int] = None, link_shards_from: Optional[Path] = None) -> None:
    """Every refusal that needs no model: before anything is loaded or written."""
    from litgpt_ext.data.shard_types import DEFAULT_SHARD_TYPES
    from litgpt_ext.prep.prepare import SHARD_NAME_RE

    if num_docs < 1:
        raise SynthReplayError(f"num_docs={num_docs} must be >= 1")
    if temperature < 0:
        raise SynthReplayError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise SynthReplayError(f"top_p={top_p} must be in (0, 1] (1: no nucleus cut)")
    if top_k is not None and top_k < 1:
        raise SynthReplayError(f"top_k={top_k} must be >= 1 (or null: no cut)")
    if max_new_tokens < 1:
        raise SynthReplayError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not 0 < dedup_threshold <= 1:
        raise SynthReplayError(f"dedup_threshold={dedup_threshold} must be in (0, 1]")
    if prompt_tokens is not None and (isinstance(prompt_tokens, bool) or prompt_tokens < 1):
        raise SynthReplayError(f"prompt_tokens={prompt_tokens!r} must be >= 1 (or null: whole prompts)")
    prefix = DEFAULT_SHARD_TYPES[SYNTH_TYPE]
    shard = str(shard)
    if not SHARD_NAME_RE.match(shard) or shard.rstrip("0123456789") != prefix:
        owner = next((n for n, p in DEFAULT_SHARD_TYPES.items() if p == shard.rstrip("0123456789")), None)
        raise SynthReplayError(
            f"shard={shard!r} is not a {SYNTH_TYPE} shard name: use {prefix}1, {prefix}2, …"
            + (f" ({shard!r} is a {owner} shard)" if owner else ""))
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise SynthReplayError(f"checkpoint {str(checkpoint)!r} does not exist (or is not a folder)")
    missing = [f for f in ("lit_model.pth", "model_config.yaml") if not (checkpoint / f).is_file()]
    if missing:
        raise SynthReplayError(f"checkpoint {str(checkpoint)!r} is not a checkpoint: it has no {' and no '.join(missing)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SynthReplayError(f"out_dir {str(out_dir)!r} is a file; give the data folder that holds the shard folders")
    for target in (out_dir / shard, out_dir / "val" / shard):
        if target.exists():
            raise SynthReplayError(
                f"shard folder {str(target)!r} already exists: synth-replay never writes onto an existing shard; "
                f"give another --shard ({prefix}2, …) or another out_dir")
    if link_shards_from is not None:
        link_targets(Path(link_shards_from), out_dir, shard)
    read_prompts(prompts)  # refuses a missing or empty file


def link_targets(source: Path, out_dir: Path, shard: str) -> list[Path]:
    """The shard folders of `source` that `link_shards_from` links into `out_dir`, checked: `source` is a
    data folder that lacks `shard`, and what `out_dir` already holds is those links (a rerun) and nothing else."""
    from litgpt_ext.data.shard_io import is_shard_dir
    from litgpt_ext.data.shard_types import _SHARD_NAME

    if not source.is_dir():
        raise SynthReplayError(f"link_shards_from {str(source)!r} does not exist (or is not a folder); give the data"
                               " folder whose shard folders the new one should sit beside")
    found = sorted(c for c in source.iterdir() if c.is_dir() and _SHARD_NAME.match(c.name) and is_shard_dir(c))
    if not found:
        raise SynthReplayError(f"link_shards_from {str(source)!r} holds no shard folder (1, 2, c1, m1, … with an "
                               "index.json)")
    if any(c.name == shard for c in found):
        raise SynthReplayError(f"link_shards_from {str(source)!r} already has a shard {shard!r}: the linked folder"
                               f" would hold two; give another --shard")
    if out_dir.is_dir():
        for c in out_dir.iterdir():
            if c.name.startswith(".") or c.name in (shard, "val") or (c / META_FILE).is_file():
                continue  # hidden work folders, and synth shards written into this view before
            if not (c.is_symlink() and c.resolve() == (source / c.name).resolve()):
                raise SynthReplayError(f"out_dir {str(out_dir)!r} holds {c.name!r}, which is not a link to"
                                       f" {str(source / c.name)!r}: with link_shards_from, out_dir is a new folder"
                                       " (or one an earlier run of the same command left)")
    return found


def _mask_padding(model: Any, vocab: int):
    """Padded vocabulary rows (ids >= the tokenizer's vocabulary) are never sampled."""
    import torch

    def hook(_module, _inputs, logits):
        if isinstance(logits, torch.Tensor) and logits.size(-1) > vocab:
            logits[..., vocab:] = float("-inf")
        return logits

    return model.register_forward_hook(hook)


def generate_documents(model: Any, tokenizer: Any, prompts: list[str], num_docs: int, *, temperature: float,
                       top_p: float, top_k: Optional[int], max_new_tokens: int, seed: int,
                       bar: Any = None, prompt_tokens: Optional[int] = None) -> Iterator[dict]:
    """Yield `num_docs` sampled documents ({index, prompt_index, text, new_tokens, eos}), prompt i % P
    (its first `prompt_tokens` tokens) for document i, each under `doc_seed(seed, i)`."""
    import torch
    from litgpt.generate.base import generate

    device = next(model.parameters()).device
    block = int(model.config.block_size)
    start = tokenizer.bos_id if tokenizer.use_bos else tokenizer.eos_id
    encoded = []
    for k, p in enumerate(prompts):
        ids = tokenizer.encode(p, bos=False, eos=False).tolist()[:prompt_tokens]
        if start is not None:
            ids = [start] + ids
        if not ids:
            raise SynthReplayError(f"prompt {k + 1} is empty and the tokenizer has no BOS/EOS token to start from")
        if len(ids) >= block:
            raise SynthReplayError(f"prompt {k + 1} ({p[:40]!r}…) has {len(ids)} tokens; the model's block_size is "
                                   f"{block}: shorten it")
        encoded.append(ids)
    model.max_seq_length = block
    model.set_kv_cache(batch_size=1, device=device, dtype=next(model.parameters()).dtype)
    handle = _mask_padding(model, int(tokenizer.processor.get_vocab_size(with_added_tokens=True))
                           if tokenizer.backend == "huggingface" else tokenizer.vocab_size)
    eos = tokenizer.eos_id
    try:
        for i in range(num_docs):
            k = i % len(prompts)
            ids = encoded[k]
            torch.manual_seed(doc_seed(seed, i))
            prompt = torch.tensor(ids, dtype=torch.long, device=device)
            out = generate(model, prompt, min(len(ids) + max_new_tokens, block), temperature=temperature,
                           top_k=top_k, top_p=top_p, eos_id=eos, include_prompt=False)
            new = out.tolist()
            stopped = bool(new) and eos is not None and new[-1] == eos
            if stopped:
                new = new[:-1]
            body = ids[1:] if start is not None else ids
            text = tokenizer.decode(torch.tensor(body + new, dtype=torch.long))
            if bar is not None:
                bar.update(1)
            yield {"index": i, "prompt_index": k, "text": text, "new_tokens": len(new), "eos": stopped}
    finally:
        handle.remove()
        model.clear_kv_cache()


def synth_replay(
    checkpoint: Path,
    prompts: Path,
    num_docs: int,
    out_dir: Path,
    shard: str = "s1",
    temperature: float = 1.0,
    top_p: float = 0.95,
    top_k: Optional[int] = None,
    max_new_tokens: int = 256,
    seed: int = 1234,
    dedup_threshold: float = 0.85,
    prompt_field: str = "text",
    prompt_tokens: Optional[int] = None,
    link_shards_from: Optional[Path] = None,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer_dir: Optional[Path] = None,
) -> dict:
    """Sample replay documents from a frozen checkpoint into a typed `synth` shard.

    Args:
        checkpoint: A checkpoint folder (lit_model.pth, model_config.yaml and the tokenizer files).
        prompts: Prompt prefixes: a text file (one per line) or a .jsonl file (`prompt_field` of each line);
            cycled through in order (document i continues prompt i mod the number of prompts).
        num_docs: Documents to sample (before near-duplicate removal).
        out_dir: The data folder to write the shard into (it may already hold 1, 2, m1, …).
        shard: The shard folder to write: s1, s2, … (type `synth`); an existing one is refused.
        temperature: Sampling temperature (0: greedy).
        top_p: Nucleus sampling: keep the most probable tokens up to this total probability, in (0, 1].
        top_k: Keep only the k most probable tokens (null: all).
        max_new_tokens: Tokens to sample per document at most (fewer when EOS comes first or the block is full).
        seed: Seed of the sampling; document i uses a seed derived from (seed, i), so a rerun is identical.
        dedup_threshold: Estimated Jaccard similarity (word 5-grams, MinHash) at or above which a document is
            dropped as a near duplicate of an earlier kept one (exact duplicates are always dropped).
        prompt_field: The JSON field holding the prefix in a .jsonl prompts file.
        prompt_tokens: Keep only the first this many tokens of each prompt (null: whole prompts), so that
            whole held-out documents serve as prefixes.
        link_shards_from: A data folder whose shard folders are linked (symlinks) into `out_dir` before
            the synth shard is written there: a mix over `out_dir` then sees the original shards and the
            new one, and the original folder is not written to (`sweep`'s synth_replay stage does this).
        device: auto (CUDA if available), cpu, cuda, cuda:1, …
        dtype: auto (bf16 on a GPU that supports it, else fp32), float32, bfloat16, float16.
        tokenizer_dir: Tokenizer folder if not the checkpoint's own.

    Returns:
        A summary: documents sampled and kept, duplicates removed, the shard's tokens, rates.
    """
    check_args(checkpoint, prompts, num_docs, out_dir, shard, temperature, top_p, top_k, max_new_tokens,
               dedup_threshold, prompt_tokens, link_shards_from)
    from litgpt_ext.checkpoint.loading import load_model, load_tokenizer
    from litgpt_ext.prep.clean import clean_documents
    from litgpt_ext.prep.prepare import prepare
    from litgpt_ext.prep.tokenizer import check_tokenizer_dir
    from litgpt_ext.progress import progress

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    tok_dir = check_tokenizer_dir(tokenizer_dir if tokenizer_dir is not None else checkpoint,
                                  "tokenizer_dir" if tokenizer_dir is not None else "checkpoint")
    prompt_list = read_prompts(prompts, prompt_field)
    t0 = time.perf_counter()
    model, _config = load_model(checkpoint, device, dtype)
    tokenizer = load_tokenizer(checkpoint, tokenizer_dir)
    print(f"synth-replay: {checkpoint} -> {out_dir / shard}: {num_docs:,} documents from {len(prompt_list):,} "
          f"prompt(s), temperature {temperature}, top_p {top_p}, top_k {top_k}, max_new_tokens {max_new_tokens}, "
          f"seed {seed} (model on {next(model.parameters()).device})", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    if link_shards_from is not None:
        for src in link_targets(Path(link_shards_from), out_dir, shard):
            if not (out_dir / src.name).exists():
                (out_dir / src.name).symlink_to(src.resolve(), target_is_directory=True)
    work = out_dir / f".{shard}.synth-tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    docs_path = work / DOCS_FILE
    sampled = {"docs": 0, "new_tokens": 0, "eos": 0}
    t_gen = time.perf_counter()
    try:
        with progress(total=num_docs, desc=f"synth-replay {shard}", unit="doc") as bar, \
                open(docs_path, "w", encoding="utf-8") as f:
            last: dict = {}

            def texts() -> Iterator[str]:
                for rec in generate_documents(model, tokenizer, prompt_list, num_docs, temperature=temperature,
                                              top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed,
                                              bar=bar, prompt_tokens=prompt_tokens):
                    sampled["docs"] += 1
                    sampled["new_tokens"] += rec["new_tokens"]
                    sampled["eos"] += rec["eos"]
                    last.clear()
                    last.update(rec)
                    yield rec["text"]

            # clean_documents yields a kept document right after reading it, so `last` is its record
            gen = clean_documents(texts(), None, dedup=True, threshold=dedup_threshold)
            while True:
                try:
                    next(gen)
                except StopIteration as stop:
                    report = stop.value
                    break
                f.write(json.dumps({"text": last["text"], "prompt": prompt_list[last["prompt_index"]],
                                    "index": last["index"]}, ensure_ascii=False) + "\n")
        gen_s = time.perf_counter() - t_gen
        print(f"synth-replay: sampled {sampled['docs']:,} documents ({sampled['new_tokens']:,} new tokens, "
              f"{sampled['new_tokens'] / max(gen_s, 1e-9):,.0f} tokens/s, {sampled['docs'] / max(gen_s, 1e-9):,.2f} "
              f"docs/s; {sampled['eos']:,} ended at EOS) in {gen_s:.1f}s", flush=True)
        removed = ", ".join(f"{n:,} {rule.replace('_', ' ')}" for rule, n in sorted(report.removed.items())) or "none"
        print(f"synth-replay dedup (threshold {dedup_threshold}): kept {report.kept:,} of {report.documents:,}; "
              f"removed: {removed}", flush=True)
        for line in report.summary().splitlines()[1:]:  # an example of each removal
            print(f"synth-replay dedup:{line}", flush=True)
        if report.kept == 0:
            raise SynthReplayError("every sampled document was empty; no shard written (raise max_new_tokens or "
                                   "check the prompts)")
        stats = prepare(inputs=[str(docs_path)], output_dir=out_dir, shard=shard, tokenizer_dir=tok_dir,
                        text_field="text", log_interval_s=30.0)
        meta = {
            "checkpoint": str(checkpoint),
            "prompts": str(prompts),
            "settings": {"num_docs": num_docs, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                         "max_new_tokens": max_new_tokens, "seed": seed, "dedup_threshold": dedup_threshold,
                         "prompt_field": prompt_field, "prompt_tokens": prompt_tokens,
                         "num_prompts": len(prompt_list)},
            "linked_shards_from": None if link_shards_from is None else str(link_shards_from),
            "sampled": sampled,
            "kept": report.kept,
            "removed": report.removed,
            "dedup_examples": report.examples,
            "tokens": stats.tokens,
            "generation_seconds": round(gen_s, 3),
        }
        shutil.move(str(docs_path), str(out_dir / shard / DOCS_FILE))
        (out_dir / shard / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"shard": str(out_dir / shard), "sampled": sampled["docs"], "kept": report.kept,
               "removed": dict(report.removed), "tokens": stats.tokens, "seconds": round(time.perf_counter() - t0, 2),
               "stats": asdict(stats)}
    print(f"synth-replay: wrote {out_dir / shard} ({report.kept:,} documents, {stats.tokens:,} tokens); mix it with "
          f"e.g. --data.init_args.mix_weights_str main:0.5,{SYNTH_TYPE}:0.3,math:0.2", flush=True)
    return summary
