"""lm-eval model backend that runs our checkpoints natively (no conversion to Hugging Face).

Registered as `litgpt_ext` in lm-eval's model registry when this module is imported. It follows the
scoring conventions of lm-eval's HF backend (`HFLM`) so numbers are comparable: the context is
left-truncated to the model's block size, continuations are scored token by token, requests are
sorted longest-first and batched with right padding (a causal model never looks at the padding to
its right, so no attention mask is needed), and multiple-choice requests that share a context and
differ only in a one-token continuation are computed once (lm-eval's `Collator` "contexts" cache).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, normalize_gen_kwargs

from litgpt_ext.checkpoint.loading import load_model, load_tokenizer, resolve_device
from litgpt_ext.progress import progress

log = logging.getLogger(__name__)


@register_model("litgpt_ext")
class LitGPTExtLM(TemplateLM):
    """Our checkpoints (dense or MoE) behind lm-eval's `LM` interface.

    Args:
        pretrained: checkpoint folder (`lit_model.pth`, `model_config.yaml`, tokenizer files).
        batch_size: sequences per forward pass.
        device: `auto` (CUDA if available), `cpu`, `cuda`, `cuda:1`, ...
        dtype: `auto` (bf16 on GPUs that support it, else fp32), `float32`, `bfloat16`, `float16`.
        max_length: context window used for scoring; defaults to the model's `block_size`.
        add_bos: prepend the BOS token to every encoded context; defaults to the tokenizer's
            `add_bos_token` setting (what litgpt's `Tokenizer.encode` does).
        tokenizer_dir: tokenizer folder if the checkpoint has none.
        max_gen_toks: default generation budget when a task does not set one.
    """

    def __init__(
        self,
        pretrained: str | Path,
        batch_size: int | str = 8,
        device: str | None = "auto",
        dtype: str = "auto",
        max_length: int | None = None,
        add_bos: bool | None = None,
        tokenizer_dir: str | Path | None = None,
        max_gen_toks: int = 256,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            log.warning("litgpt_ext backend ignores unknown arguments: %s", sorted(kwargs))
        if isinstance(batch_size, str):
            if not batch_size.isdigit():
                raise ValueError(f"batch_size must be a positive integer for litgpt_ext, got {batch_size!r}")
            batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.checkpoint_dir = Path(pretrained)
        self._device = resolve_device(device or "auto")
        self.model, self.config = load_model(self.checkpoint_dir, self._device, dtype)
        self.tokenizer = load_tokenizer(self.checkpoint_dir, tokenizer_dir)
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self._max_length = int(max_length or self.config.block_size)
        if self._max_length > self.config.block_size:
            raise ValueError(f"max_length {self._max_length} exceeds the model's block_size {self.config.block_size}")
        self.add_bos = self.tokenizer.use_bos if add_bos is None else bool(add_bos)
        if self.add_bos and self.tokenizer.bos_id is None:
            raise ValueError(f"add_bos=True but the tokenizer in {self.checkpoint_dir} has no BOS token")
        self._split_head()

    # ----------------------------------------------------------------------------------- basics
    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eos_id is None:
            raise ValueError(f"the tokenizer in {self.checkpoint_dir} has no EOS token (tokenizer_config.json)")
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context is conditioned on: BOS if the tokenizer has one, else EOS (as HFLM).
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos if add_special_tokens is None else (add_special_tokens and self.add_bos)
        return self.tokenizer.encode(string, bos=bos, eos=False).tolist()

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.processor.decode(tokens) if self.tokenizer.backend == "huggingface" \
            else self.tokenizer.decode(torch.tensor(tokens))

    def _split_head(self) -> None:
        """Run the LM head only on the positions that are scored (as HF's `logits_to_keep`).

        With a real vocabulary the head is a large share of a small model's FLOPs, and scoring
        needs only the continuation positions. We swap litgpt's `lm_head` for an identity so the
        model returns final hidden states and apply the head ourselves. Models without a plain
        linear head, or with final-logit softcapping (applied after the head), keep full logits.
        """
        self._head = None
        head = getattr(self.model, "lm_head", None)
        if isinstance(head, torch.nn.Linear) and getattr(self.config, "final_logit_softcapping", None) is None:
            self._head = head
            self.model.lm_head = torch.nn.Identity()

    @torch.inference_mode()
    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Hidden states (B, T, C) -- or logits if the head is not split -- for right-padded rows.

        Positions past a row's length are garbage and never read.
        """
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return self.model(batch.to(self._device))

    @torch.inference_mode()
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self._head is None else self._head(hidden)

    # ----------------------------------------------------------------------------- loglikelihood
    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, use_cache: bool = True, **kwargs
    ) -> list[tuple[float, bool]]:
        """Score each `(strings, context_tokens, continuation_tokens)`; (sum logprob, is_greedy)."""

        self._refuse_truncated(requests)

        def sort_key(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        collator = Collator(
            requests,
            sort_fn=sort_key,
            group_by="contexts" if use_cache else None,
            group_fn=lambda req: req[-2] + req[-1][:-1],
        )
        results = []
        pbar = progress(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood", unit="req")
        for chunk in collator.get_batched(n=self.batch_size):
            rows, cont_lens = [], []
            for _, ctx, cont in chunk:
                if not cont:
                    raise ValueError("empty continuation: lm-eval should never send one")
                # Keep the last max_length+1 tokens and drop the final one (it is only a target).
                inp = (ctx + cont)[-(self.max_length + 1):][:-1]
                rows.append(inp)
                cont_lens.append(min(len(cont), len(inp)))
            hidden = self._forward(rows)
            for (req_str, ctx, cont), inp, n, row_hidden in zip(chunk, rows, cont_lens, hidden):
                # Position t predicts token t+1: the continuation is predicted by the n positions
                # that end at the last input token.
                sel = self._logits(row_hidden[len(inp) - n : len(inp)]).float().log_softmax(dim=-1).unsqueeze(0)
                for r_str, r_cont, r_logits in collator.get_cache(
                    req_str=req_str, cxt_toks=ctx, cont_toks=cont, logits=sel
                ):
                    target = torch.tensor(r_cont[-n:], dtype=torch.long, device=r_logits.device)
                    greedy = bool((r_logits[0].argmax(dim=-1) == target).all())
                    logprob = float(r_logits[0].gather(-1, target.unsqueeze(-1)).sum())
                    results.append((logprob, greedy))
                    if r_str is not None:
                        self.cache_hook.add_partial("loglikelihood", r_str, (logprob, greedy))
                    pbar.update(1)
        pbar.close()
        return collator.get_original(results)

    def _refuse_truncated(self, requests) -> None:
        """Refuse continuations longer than the context window instead of scoring only their tail.

        Keeping the last `max_length` tokens (what the left-truncation would do) scores a different
        answer than the task asked about; HF's backend refuses these too. Fix the task (shorter
        choices) or evaluate with a longer `max_length`.
        """
        bad = [(s, len(cont)) for s, _, cont in requests if len(cont) > self.max_length]
        if bad:
            (ctx, cont), n = bad[0][0] or ("?", "?"), bad[0][1]
            raise ValueError(
                f"{len(bad)} of {len(requests)} loglikelihood request(s) have a continuation longer than "
                f"max_length={self.max_length} tokens, which would be scored truncated; first: "
                f"{n} tokens, context {str(ctx)[:60]!r}..., continuation {str(cont)[:80]!r}...; "
                "shorten the task's answer choices or raise max_length (up to the model's block_size)"
            )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Full-document log-likelihood in disjoint windows of `max_length` tokens (perplexity)."""
        windows, owners = [], []
        for idx, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owners.append(idx)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm, use_cache=False)
        totals = [0.0] * len(requests)
        for idx, (logprob, _) in zip(owners, scores):
            totals[idx] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -------------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, batched: each step re-runs the right-padded batch (no KV cache).

        Re-running the prefix costs O(T^2) per request but keeps batching trivially correct for
        prompts of different lengths; eval generations are short.
        """
        eos_text = self.tok_decode([self.eot_token_id])
        collator = Collator(
            [req.args for req in requests],
            sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
            group_by="gen_kwargs",
            group_fn=lambda x: x[1],
        )
        results = []
        warned = False
        pbar = progress(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="generate_until", unit="req")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kw = normalize_gen_kwargs(dict(all_kwargs[0]), default_max_gen_toks=self.max_gen_toks)
            if kw.get("do_sample") and not warned:
                log.warning("litgpt_ext backend decodes greedily; ignoring do_sample/temperature")
                warned = True
            until = [u for u in kw["until"] if u]
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kw["max_gen_toks"])
            budget = self.max_length - max_new
            if budget < 1:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
            rows = [self.tok_encode(c)[-budget:] for c in contexts]
            prompt_lens = [len(r) for r in rows]
            done = [False] * len(rows)
            for _ in range(max_new):
                active = [i for i, d in enumerate(done) if not d]
                if not active:
                    break
                hidden = self._forward([rows[i] for i in active])
                last = torch.stack([hidden[j, len(rows[i]) - 1] for j, i in enumerate(active)])
                next_toks = self._logits(last).argmax(dim=-1).tolist()
                for i, tok in zip(active, next_toks):
                    rows[i].append(tok)
                    if tok == self.eot_token_id:
                        done[i] = True
                    elif until:
                        text = self.tok_decode(rows[i][prompt_lens[i]:])
                        done[i] = any(u in text for u in until)
            for ctx, row, plen in zip(contexts, rows, prompt_lens):
                text = self.tok_decode(row[plen:])
                for u in until:
                    text = text.split(u)[0]
                results.append(text)
                self.cache_hook.add_partial("generate_until", (ctx, all_kwargs[0]), text)
                pbar.update(1)
        pbar.close()
        return collator.get_original(results)
