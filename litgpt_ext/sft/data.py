"""SFTData: instruction / plain-text records -> padded `input_ids`/`labels` batches with exact resume.

Records come from litgpt's JSON/JSONL format (`instruction`, optional `input`, `output`) or are
plain text (`{"text": ...}`: the whole text is the target). Prompts are rendered with a
`litgpt.prompts` style or `plain` (the paper's "instruction + input", nothing added). With
`mask_prompt`, labels on prompt tokens are `ignore_index`; padding always carries `ignore_index`.

What is reused from litgpt and what is not:
- `litgpt.prompts.PromptStyle` renders prompts; `litgpt.data.get_sft_collate_fn` pads batches
  (`pad_id` on inputs, `ignore_index` on labels), so a batch is exactly what `finetune_full` sees.
- Tokenization follows `litgpt.data.SFTDataset.__getitem__` token for token (prompt encoded with
  the tokenizer's BOS rule, response with `bos=False, eos=True`, concatenated, cut to
  `max_seq_length`), but runs once in `setup`, not lazily: SFTDataset truncates silently and we
  must count truncated examples, and length-grouped batches need every length up front.
- litgpt's `JSON` module shuffles with a `DataLoader(shuffle=True)` whose position cannot be saved;
  `SFTLoader` instead derives each epoch's batch order from (seed, epoch) and keeps
  (epoch, cursor) as its state, so a preempted run resumes on the very next batch.
"""

from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import numpy as np
import torch
from litgpt.data import DataModule, get_sft_collate_fn
from litgpt.prompts import Default, PromptStyle, prompt_styles

from litgpt_ext.sft import checks
from litgpt_ext.sft.records import load_records, read_json_rows  # noqa: F401  (re-exported: prepare.py reads them here)

log = logging.getLogger(__name__)
STATE_VERSION = 1
PLAIN = "plain"


class Plain(PromptStyle):
    """The paper's prompt: the instruction, then the input (if any) on the next line; no template.

    The response follows the prompt directly, so the data decides separators (e.g. an instruction
    ending in "Answer:" and an output starting with " ").
    """

    def apply(self, prompt: str, *, sys_prompt: str | None = None, **kwargs: str) -> str:
        inp = kwargs.get("input") or ""
        return f"{prompt}\n{inp}" if inp else prompt


def get_prompt_style(name: str | PromptStyle) -> PromptStyle:
    if isinstance(name, PromptStyle):
        return name
    if name == PLAIN:
        return Plain()
    if name == "default":  # litgpt's `Default` (the instruction alone) is a class but not in its name registry
        return Default()
    if name not in prompt_styles:
        raise ValueError(f"unknown prompt_style {name!r}; choose {PLAIN!r} (the paper's instruction + input), "
                         f"'default' or a litgpt style: {', '.join(sorted(prompt_styles))}")
    return PromptStyle.from_name(name)


# ----------------------------------------------------------------------------------------------- records


def split_records(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded random `fraction` of the rows (at least one) held out, order kept."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_split_fraction must be in (0, 1), got {fraction}")
    n_val = max(1, round(fraction * len(rows)))
    if n_val >= len(rows):
        raise ValueError(f"val_split_fraction={fraction} of {len(rows)} records leaves no training record")
    held = set(np.random.default_rng([seed, 0x5F7]).permutation(len(rows))[:n_val].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def render_record(row: dict, style: PromptStyle, text_field: str = "text") -> tuple[str | None, str]:
    """(prompt, response) as trained: the rendered prompt (None for plain text) and the target text."""
    if "output" in row:
        return style.apply(prompt=row.get("instruction", ""), **row), row["output"]
    return None, row[text_field]  # plain text: no prompt, the whole text is the target


def encode_record(row: dict, tokenizer, style: PromptStyle, mask_prompt: bool, text_field: str = "text",
                  ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), untruncated, exactly as `litgpt.data.SFTDataset` builds them."""
    prompt, response = render_record(row, style, text_field)
    enc_prompt = tokenizer.encode(prompt if prompt is not None else "")
    enc_response = tokenizer.encode(response, bos=False, eos=True)
    ids = torch.cat((enc_prompt, enc_response)).type(torch.int64)
    labels = ids.clone()
    if mask_prompt:
        labels[: len(enc_prompt)] = ignore_index
    return ids, labels


# ----------------------------------------------------------------------------------------------- batch order


def epoch_batches(lengths: list[int] | np.ndarray, batch_size: int, world_size: int, seed: int, epoch: int,
                  length_grouped: bool = False, group_batches: int = 32) -> list[list[int]]:
    """One epoch's global batches: batch k goes to rank k % world_size (a "round" is world_size batches).

    A seeded permutation of (seed, epoch); the tail is completed with the epoch's first examples so
    that every rank gets the same number of full batches (as `DistributedSampler` pads), so no example
    is dropped. With `length_grouped`, windows of `group_batches` rounds are sorted by length before
    cutting batches (less padding), and the batches are then shuffled (seeded).
    """
    n = len(lengths)
    per_round = batch_size * world_size
    total = math.ceil(n / per_round) * per_round
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    order = np.resize(perm, total)  # repeats from the start: the padding
    if not length_grouped:
        return [order[i:i + batch_size].tolist() for i in range(0, total, batch_size)]
    lens = np.asarray(lengths)
    window = per_round * max(1, group_batches)
    batches = []
    for w in range(0, total, window):
        chunk = order[w:w + window]
        chunk = chunk[np.argsort(-lens[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    shuffled = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return [batches[i] for i in shuffled]


def _fingerprint(examples: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """CRC of every token and label: resuming onto changed data must fail, not drift."""
    crc = 0
    for ids, labels in examples:
        crc = zlib.crc32(ids.numpy().tobytes(), crc)
        crc = zlib.crc32(labels.numpy().tobytes(), crc)
    return crc


class SFTLoader:
    """One rank's training batches over epochs, from a saved (epoch, cursor) on.

    Iterating yields dicts {input_ids, labels, token_counts} (litgpt's collate) and never ends;
    the loop stops after `rounds_per_epoch * epochs` batches. `state_dict()` after k batches
    resumes at batch k+1. The state is global (all ranks hold the same), so rank 0's copy suffices.
    """

    def __init__(self, dm: "SFTData"):
        self.dm = dm
        self.lengths = [len(ids) for ids, _ in dm.train_examples]
        self.rounds_per_epoch = math.ceil(len(self.lengths) / (dm.batch_size * dm.world_size))
        self.padding_per_epoch = self.rounds_per_epoch * dm.batch_size * dm.world_size - len(self.lengths)
        self.epoch, self.cursor = 0, 0
        self._fingerprint: int | None = None

    @property
    def fingerprint(self) -> int:
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self.dm.train_examples)
        return self._fingerprint

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.rounds_per_epoch

    def batches(self, epoch: int) -> list[list[int]]:
        dm = self.dm
        return epoch_batches(self.lengths, dm.batch_size, dm.world_size, dm.seed, epoch, dm.length_grouped,
                             dm.group_batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dm = self.dm
        while True:
            batches = self.batches(self.epoch)
            for k in range(self.cursor, self.rounds_per_epoch):
                idx = batches[k * dm.world_size + dm.rank]
                batch = dm.collate([dm.sample(dm.train_examples[i]) for i in idx])
                self.cursor = k + 1
                if self.cursor == self.rounds_per_epoch:
                    self.epoch, self.cursor = self.epoch + 1, 0
                yield batch
            # an empty epoch cannot happen: setup() refuses empty data

    def state_dict(self) -> dict[str, Any]:
        dm = self.dm
        return {"version": STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor, "seed": dm.seed,
                "num_examples": len(self.lengths), "batch_size": dm.batch_size, "world_size": dm.world_size,
                "length_grouped": dm.length_grouped, "group_batches": dm.group_batches,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"SFT loader state version {state.get('version')!r} is not {STATE_VERSION}; cannot resume it")
        if state["fingerprint"] != self.fingerprint or state["num_examples"] != len(self.lengths):
            raise ValueError(
                f"the SFT training data changed since the checkpoint ({state['num_examples']} examples then, "
                f"{len(self.lengths)} now, or different tokens: prompt_style, mask_prompt, max_seq_length, "
                "tokenizer or the file); resume with the same data"
            )
        mine = self.state_dict()
        layout = ("seed", "batch_size", "world_size", "length_grouped", "group_batches")
        changed = {k: (state[k], mine[k]) for k in layout if state[k] != mine[k]}
        if changed and state["cursor"] != 0:
            raise ValueError(
                "the batch order of the checkpoint's epoch depends on "
                + ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in changed.items())
                + f"; resume with the checkpoint's values (the change is allowed at an epoch boundary, "
                f"the checkpoint is at batch {state['cursor']} of epoch {state['epoch']})"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class SFTValLoader:
    """A finite pass over the validation examples in file order, split across ranks.

    Batch k goes to rank k % world_size; the last round is completed with batches whose labels are
    all `ignore_index` (zero tokens), so every rank runs the same number of forward passes (FSDP
    needs that) and a token-weighted mean over ranks stays exact.
    """

    def __init__(self, dm: "SFTData"):
        self.dm = dm
        n, bs, R = len(dm.val_examples), dm.batch_size, dm.world_size
        self.num_batches = math.ceil(n / bs)
        self.rounds = math.ceil(self.num_batches / R)

    def __len__(self) -> int:
        return self.rounds

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dm, bs = self.dm, self.dm.batch_size
        for k in range(dm.rank, self.rounds * dm.world_size, dm.world_size):
            if k < self.num_batches:
                yield dm.collate([dm.sample(e) for e in dm.val_examples[k * bs:(k + 1) * bs]])
            else:
                ids, _ = dm.val_examples[0]
                yield dm.collate([dm.sample((ids, torch.full_like(ids, dm.ignore_index)))])


# ----------------------------------------------------------------------------------------------- module


class SFTData(DataModule):
    """Instruction or plain-text records for supervised fine-tuning.

    Args:
        train_path: a .json/.jsonl file, or a folder with train.json(l) and val.json(l).
        val_path: the validation file (exclusive with `val_split_fraction` and a folder `train_path`).
        val_split_fraction: hold out this seeded random fraction of `train_path` for validation.
        prompt_style: `plain` (the paper's instruction + input) or a litgpt style (`default`, `alpaca`, ...).
        mask_prompt: no loss on prompt tokens (GSM8K, SciQ in the paper; not for PyCode, LIMA).
        text_field: the field of plain-text records (the whole text is the target).
        ignore_index: label value that carries no loss (prompt and padding).
        pad_id: token id used to pad inputs (never a target: padding labels are `ignore_index`).
        seed: seed of each epoch's order; None (the default): the run's seed, passed as
            `connect(..., seed=)`, so that the grid's SFT seeds also vary the data order.
        split_seed: seed of the `val_split_fraction` split (fixed across the grid's seeds, so that
            every run is validated on the same examples).
        length_grouped: batch examples of similar length together (less padding), order still seeded.
        group_batches: rounds of batches per length-sorting window when `length_grouped`.
        truncation: what to do with examples longer than max_seq_length: `warn` (cut them, log how
            many) or `error`.
        name: the name of this SFT set in logs and sft_metrics.json (e.g. demo_math).
    """

    def __init__(
        self,
        train_path: str | Path,
        val_path: str | Path | None = None,
        val_split_fraction: float | None = None,
        prompt_style: str = PLAIN,
        mask_prompt: bool = True,
        text_field: str = "text",
        ignore_index: int = -100,
        pad_id: int = 0,
        seed: int | None = None,
        split_seed: int = 42,
        length_grouped: bool = False,
        group_batches: int = 32,
        truncation: Literal["warn", "error"] = "warn",
        name: str = "sft",
    ):
        super().__init__()
        self.train_path = Path(train_path)
        self.val_path = Path(val_path) if val_path is not None else None
        self.val_split_fraction = val_split_fraction
        self.save_hyperparameters()  # the loop writes these to hyperparameters.yaml
        self.style = get_prompt_style(prompt_style)
        self.prompt_style = prompt_style
        self.mask_prompt, self.text_field = mask_prompt, text_field
        self.ignore_index, self.pad_id, self.seed, self.split_seed = ignore_index, pad_id, seed, split_seed
        self.length_grouped, self.group_batches = length_grouped, group_batches
        if truncation not in ("warn", "error"):
            raise ValueError(f"truncation must be 'warn' or 'error', got {truncation!r}")
        if group_batches < 1:
            raise ValueError(f"group_batches must be >= 1, got {group_batches}")
        self.truncation, self.name = truncation, name
        self.tokenizer = None
        self.batch_size, self.max_seq_length = 1, -1
        self.rank, self.world_size = 0, 1
        self.train_examples: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.val_examples: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stats: dict[str, dict[str, int]] = {}
        self.sources: dict[str, str] = {}
        self.block_size: int | None = None  # the model's, when known: named in the target-token refusal
        self._encoded: tuple | None = None
        self.train_rows: list[dict] = []

    def __repr__(self) -> str:
        return (f"SFTData(train_path={str(self.train_path)!r}, prompt_style={self.prompt_style!r}, "
                f"mask_prompt={self.mask_prompt})")

    def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length: int | None = None,
                seed: int | None = None, **kwargs) -> None:
        if self.seed is None:
            self.seed = seed
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.max_seq_length = -1 if max_seq_length is None else max_seq_length
        self.collate = get_sft_collate_fn(max_seq_length=self.max_seq_length, pad_id=self.pad_id,
                                          ignore_index=self.ignore_index)

    def _files(self) -> tuple[list[dict], list[dict]]:
        p = self.train_path
        if p.is_dir():
            if self.val_path is not None or self.val_split_fraction is not None:
                raise ValueError(f"train_path {str(p)!r} is a folder (train + val files): do not set val_path "
                                 "or val_split_fraction")
            found = {s: next((p / f"{s}{ext}" for ext in (".json", ".jsonl") if (p / f"{s}{ext}").is_file()), None)
                     for s in ("train", "val")}
            missing = [s for s, f in found.items() if f is None]
            if missing:
                raise FileNotFoundError(f"SFT data folder {str(p)!r} lacks {', '.join(m + '.json(l)' for m in missing)}")
            self.sources = {s: str(f) for s, f in found.items()}
            return load_records(found["train"], self.text_field), load_records(found["val"], self.text_field)
        rows = load_records(p, self.text_field)
        if self.val_path is not None and self.val_split_fraction is not None:
            raise ValueError("set either val_path or val_split_fraction, not both")
        if self.val_path is not None:
            self.sources = {"train": str(p), "val": str(self.val_path)}
            return rows, load_records(self.val_path, self.text_field)
        if self.val_split_fraction is None:
            raise ValueError(f"no SFT validation data for {str(p)!r}: set data.val_path (a file) or "
                             "data.val_split_fraction (a seeded held-out fraction)")
        held = f"{p}, val_split_fraction={self.val_split_fraction}"
        self.sources = {"train": f"{held}: the rest", "val": f"{held}: the held-out part"}
        return split_records(rows, self.val_split_fraction, self.split_seed)

    def _encode(self, split: str, rows: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out, truncated, longest, info = [], 0, 0, []
        for row in rows:
            ids, labels = encode_record(row, self.tokenizer, self.style, self.mask_prompt, self.text_field,
                                        self.ignore_index)
            longest = max(longest, len(ids))
            info.append(checks.example_target_info(labels, self.max_seq_length, self.ignore_index))
            if 0 < self.max_seq_length < len(ids):
                truncated += 1
                ids, labels = ids[: self.max_seq_length], labels[: self.max_seq_length]
            out.append((ids, labels))
        no_target = sum(kept == 0 for kept, _ in info)
        self.stats[split] = {"examples": len(rows), "truncated": truncated, "longest": longest,
                             "no_target": no_target, "tokens": sum(len(i) for i, _ in out),
                             "target_tokens": sum(kept for kept, _ in info)}
        if truncated:
            msg = (f"SFT {self.name} {split}: {truncated} of {len(rows)} examples are longer than max_seq_length="
                   f"{self.max_seq_length} (longest {longest} tokens) and were cut")
            if self.truncation == "error":
                raise ValueError(msg + "; raise train.max_seq_length or set data.truncation: warn")
            log.warning(msg)
        # refuses a split where no example keeps a target token (loss 0 / nan), whatever `truncation` says
        warning = checks.target_problems(self.name, split, self.sources.get(split, str(self.train_path)), info,
                                         self.max_seq_length, self.mask_prompt, self.block_size)
        if warning:
            log.warning(warning)
        return out

    def _cache_key(self) -> tuple:
        """What the encoded examples depend on beyond the constructor's arguments: the tokenizer (its
        ids for a probe text) and max_seq_length; `setup` reuses `preflight`'s examples when it matches."""
        probe = self.tokenizer.encode("The 12 cats, 7541 + 75 = 116.\n\tÜber").tolist()
        return (getattr(self.tokenizer, "vocab_size", None), tuple(probe), self.max_seq_length)

    def setup(self, stage: str = "", rank: int | None = None, world_size: int | None = None) -> None:
        if self.tokenizer is None:
            raise ValueError("call connect(tokenizer=…, batch_size=…, max_seq_length=…) before setup()")
        if self.seed is None:
            raise ValueError("no data order seed: set data.seed or pass connect(seed=<the run's seed>)")
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            d_rank, d_world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
            rank, world_size = d_rank if rank is None else rank, d_world if world_size is None else world_size
        self.rank, self.world_size = rank, world_size
        key = self._cache_key()
        if self._encoded is not None and self._encoded[0] == key:
            self.train_examples, self.val_examples = self._encoded[1], self._encoded[2]
            return
        train_rows, val_rows = self._files()
        self.train_examples = self._encode("train", train_rows)
        self.val_examples = self._encode("val", val_rows)
        self._encoded = (key, self.train_examples, self.val_examples)
        self.train_rows = train_rows
        for split in ("train", "val"):
            s = self.stats[split]
            log.info("SFT %s %s: %d examples, %d tokens, %d target tokens, longest %d", self.name, split,
                     s["examples"], s["tokens"], s["target_tokens"], s["longest"])

    def preflight(self, tokenizer, max_seq_length: int, block_size: int | None = None, show: bool = True) -> None:
        """Read, check and encode the data before a model is built (every refusal of `setup` happens here,
        first); with `show`, print one rendered train example with its prompt/response boundary marked
        and warn when the two sides fuse into one token run. `setup` then reuses the encoded examples."""
        self.block_size = block_size
        self.connect(tokenizer, batch_size=self.batch_size, max_seq_length=max_seq_length)
        self.setup(rank=0, world_size=1)
        if show:
            checks.report_examples(self, tokenizer, [render_record(r, self.style, self.text_field)
                                                     for r in self.train_rows[:200]])

    def num_train_examples(self) -> int:
        """Training examples (read from the files, no tokenizer needed): what the run's plan counts."""
        return len(self.train_examples) if self.train_examples else len(self._files()[0])

    @property
    def longest_seq_length(self) -> int:
        """Longest (truncated) example: what `model.max_seq_length` must cover."""
        return max(len(ids) for ids, _ in self.train_examples + self.val_examples)

    def sample(self, example: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        ids, labels = example
        n = int((labels != self.ignore_index).sum())
        return {"input_ids": ids, "labels": labels, "token_counts": {"raw": n, "raw_plus_prompt_template": len(ids)}}

    def train_dataloader(self) -> SFTLoader:
        if not self.train_examples:
            raise ValueError("call setup() before train_dataloader()")
        return SFTLoader(self)

    def val_dataloader(self) -> SFTValLoader:
        if not self.val_examples:
            raise ValueError("call setup() before val_dataloader()")
        return SFTValLoader(self)
