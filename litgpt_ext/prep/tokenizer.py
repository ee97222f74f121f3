"""Train a byte-level BPE tokenizer offline and save it in the folder layout `litgpt.Tokenizer` loads.

litgpt's Tokenizer reads `tokenizer.json` (HF tokenizers) and resolves `bos_id`/`eos_id` from
`tokenizer_config.json` (`bos_token`/`eos_token`); it also reads `tokenizer_class` and
`add_bos_token` from there, so all of these are written. `<|endoftext|>` is both EOS and BOS, as
in GPT-2: documents are separated by EOS and no BOS is added (`add_bos_token: false`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Iterable, Iterator, Literal

from litgpt_ext.prep.readers import DocStream, expand_inputs

EOS_TOKEN = "<|endoftext|>"


def build_bpe_trainer_and_model(vocab_size: int, special_tokens: list[str], min_frequency: int, split_digits: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # Splitting digits one by one keeps numbers compositional, which small models need for arithmetic.
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def train_tokenizer_from_texts(
    texts: Iterable[str],
    out_dir: Path,
    vocab_size: int = 8192,
    special_tokens: list[str] | None = None,
    min_frequency: int = 2,
    split_digits: bool = True,
    model_max_length: int = 4096,
    meta: dict | None = None,
) -> Path:
    """Train on an iterable of documents and write tokenizer.json + configs into `out_dir`."""
    specials = [EOS_TOKEN] + [t for t in (special_tokens or []) if t != EOS_TOKEN]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {256 + len(specials)}")
    tok, trainer = build_bpe_trainer_and_model(vocab_size, specials, min_frequency, split_digits)
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    eos_id = tok.token_to_id(EOS_TOKEN)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "additional_special_tokens": specials[1:],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "additional_special_tokens": specials[1:]}, indent=2) + "\n"
    )
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id}, indent=2) + "\n"
    )
    info = {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "eos_token": EOS_TOKEN, "eos_id": eos_id,
            "special_tokens": specials, "split_digits": split_digits, "min_frequency": min_frequency, **(meta or {})}
    (out_dir / "train_meta.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def _limited(stream: Iterator[tuple[str, int]], max_docs: int | None, max_chars: int | None) -> Iterator[str]:
    chars = 0
    for text, _ in itertools.islice(stream, max_docs):
        if not text:
            continue
        if max_chars is not None and chars + len(text) > max_chars:
            rest = max_chars - chars
            if rest > 0:
                yield text[:rest]
            return
        chars += len(text)
        yield text


def train_tokenizer(
    inputs: list[str] | None = None,
    out_dir: Path = Path("data/tokenizer"),
    vocab_size: int = 8192,
    text_field: str = "text",
    max_docs: int | None = None,
    max_chars: int | None = 200_000_000,
    special_tokens: list[str] | None = None,
    min_frequency: int = 2,
    split_digits: bool = True,
    model_max_length: int = 4096,
    invalid_utf8: Literal["error", "replace", "skip"] = "error",
) -> Path:
    """Train a byte-level BPE tokenizer on local text files, offline, into a folder litgpt loads.

    Args:
        inputs: Files, directories or globs of .jsonl/.json/.parquet/.txt/.md/.rst (text formats may be .gz).
        out_dir: Folder to write tokenizer.json, tokenizer_config.json, generation_config.json into.
        vocab_size: Target vocabulary size, special tokens included.
        text_field: Field (JSONL) or column (Parquet) holding the text. Plain text files are one document each.
        max_docs: Train on at most this many documents (None: all).
        max_chars: Stop after this many characters of training text (None: no limit).
        special_tokens: Extra special tokens besides `<|endoftext|>` (which is EOS and BOS).
        min_frequency: Minimum pair frequency for a merge.
        split_digits: Split numbers into single digits before BPE (helps arithmetic).
        model_max_length: Written to tokenizer_config.json for Hugging Face users.
        invalid_utf8: Input bytes that are not UTF-8: error, replace (U+FFFD) or skip (the document); counted.
    """
    for name, value in (("max_docs", max_docs), ("max_chars", max_chars), ("min_frequency", min_frequency),
                        ("model_max_length", model_max_length)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be >= 1" + (" (or null: no limit)" if name.startswith("max_") else ""))
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} is a file; give a folder for tokenizer.json and its configs")
    if not inputs:
        raise ValueError("no inputs: give text files, directories or globs, e.g. --inputs+ 'corpus/*.jsonl'")
    files = expand_inputs(inputs)
    t0 = time.perf_counter()
    stream = DocStream(files, text_field=text_field, invalid_utf8=invalid_utf8)
    out = train_tokenizer_from_texts(
        _limited(iter(stream), max_docs, max_chars),
        Path(out_dir),
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        min_frequency=min_frequency,
        split_digits=split_digits,
        model_max_length=model_max_length,
        meta={"inputs": [str(f) for f in files], "text_field": text_field, "max_docs": max_docs, "max_chars": max_chars},
    )
    if stream.utf8.documents:
        print(f"warning: {stream.utf8.documents:,} documents held {stream.utf8.bytes:,} bytes that are not UTF-8 "
              f"({'replaced by U+FFFD' if invalid_utf8 == 'replace' else 'skipped'})")
    print(f"trained tokenizer (vocab {vocab_size}) on {len(files)} file(s) in {time.perf_counter() - t0:.1f}s -> {out}")
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def check_tokenizer_dir(tokenizer_dir: str | Path, what: str = "tokenizer_dir") -> Path:
    """A folder `litgpt.Tokenizer` can load, else a ValueError naming it and the files it needs.

    litgpt answers a folder without tokenizer.json/tokenizer.model with a bare NotImplementedError.
    """
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is not a folder; train one with `litgpt-ext train-tokenizer` "
                         f"or point it at a Hugging Face checkpoint folder")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        present = sorted(p.name for p in path.iterdir())[:10]
        raise ValueError(f"{what} {str(path)!r} holds no tokenizer: it needs {' or '.join(TOKENIZER_FILES)} "
                         f"(found: {present or 'nothing'}); train one with `litgpt-ext train-tokenizer`")
    return path


class FastTokenizer:
    """The parts of `litgpt.Tokenizer` that data preparation needs, without importing litgpt.

    `import litgpt` pulls in lightning and transformers (~15 s on a small machine); preparing data
    only needs the HF tokenizer and the BOS/EOS ids, resolved exactly as litgpt resolves them
    (tokenizer_config.json first, then generation_config.json). Sentencepiece folders fall back to
    litgpt's own class.
    """

    def __init__(self, tokenizer_dir: str | Path) -> None:
        tokenizer_dir = check_tokenizer_dir(tokenizer_dir)
        self.bos_id: int | None = None
        self.eos_id: int | None = None
        self._litgpt = None
        if not (tokenizer_dir / "tokenizer.json").is_file():
            from litgpt import Tokenizer

            self._litgpt = Tokenizer(tokenizer_dir)
            self.bos_id, self.eos_id, self.processor = self._litgpt.bos_id, self._litgpt.eos_id, None
            return
        from tokenizers import Tokenizer as HFTokenizer

        self.processor = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        cfg_path = tokenizer_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token")):
                tok = cfg.get(key)
                if isinstance(tok, dict):
                    tok = tok.get("content")
                if tok is not None:
                    id_ = self.processor.token_to_id(tok)
                    if id_ is None:
                        raise ValueError(f"{cfg_path}: {key} {tok!r} is not in the vocabulary")
                    setattr(self, attr, id_)
        gen_path = tokenizer_dir / "generation_config.json"
        if gen_path.is_file():
            try:
                gen = json.loads(gen_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                gen = {}
            if self.bos_id is None:
                self.bos_id = gen.get("bos_token_id")
            if self.eos_id is None:
                self.eos_id = gen.get("eos_token_id")

    def encode_docs(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, as `litgpt.Tokenizer.encode(text, bos=False, eos=True)` gives them."""
        bos, eos = self.bos_id, self.eos_id
        if self._litgpt is not None:
            return [self._litgpt.encode(t, bos=False, eos=True).tolist() for t in texts]
        out = []
        for enc in self.processor.encode_batch(texts):
            ids = enc.ids
            if bos is not None and ids and ids[0] == bos:
                ids = ids[1:]
            if not ids or ids[-1] != eos:
                ids = ids + [eos]
            out.append(ids)
        return out


def tokenizer_digest(tokenizer_dir: Path) -> str:
    """A short fingerprint of a tokenizer folder's files (recorded with the shards it tokenized)."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        p = tokenizer_dir / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]
