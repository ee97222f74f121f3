"""Checkpoints: the one place that names, writes, verifies, finds, loads and forks them.

Layout (litgpt's own, so `litgpt generate/finetune_lora/evaluate/convert` read it as theirs):

    out_dir/step-00001000/  lit_model.pth        the bare model state dict (litgpt's format; older
                                                 {"model": sd} files still load)
                            model_config.yaml    litgpt.utils.save_config
                            config.json          the matching Transformers config (`litgpt evaluate`
                                                 converts with it); only for dense GPT-NeoX/Llama-like
                                                 models and when transformers is installed
                            hyperparameters.yaml the resolved run config (loadable with --config)
                            tokenizer files      copied from tokenizer_dir
                            training_state.pth   optimizer (full, FQN-keyed: resumes on any device
                                                 count), step, tokens, data loader state, RNG,
                                                 resolved mix, LR schedule record, val baseline
                            manifest.json        step, and size + sha256 of every file above; written
                                                 last, so a checkpoint without it is not complete
    (lora: in the run config) lit_model.pth.lora (the adapter: litgpt finetune_lora's name) + lora.json (its
    settings, and the base checkpoint's path and sha256) replace lit_model.pth; the optimizer holds the adapter
    only; the base is hard-linked once into out_dir/lora_base/ (`litgpt-ext merge-lora` gives full weights;
    see litgpt_ext.checkpoint.lora)
    out_dir/final/          the same at the end of the run
    (speed.checkpoint_format: sharded) sharded/ (torch.distributed.checkpoint: every rank's model and
    optimizer shards) replaces lit_model.pth and the optimizer in training_state.pth; the manifest
    lists sharded/* too (`litgpt-ext consolidate` adds a lit_model.pth; see litgpt_ext.checkpoint.dcp)
    out_dir/.run.lock       host, pid and SLURM job of the one process writing this run

A checkpoint is written into `<name>.tmp/` and renamed into place, so a killed run never leaves a
half-written directory that resume would pick; `*.tmp` directories are ignored and cleaned up.
Evaluation needs only the weights (`is_complete(p, need="weights")`: lit_model.pth +
model_config.yaml, e.g. a converted Pythia); resuming needs everything (`need="resume"`).

One job per module: `layout` (names, manifest), `verify` (complete? matches its manifest?), `select`
(finding checkpoints), `resume` (which one a run continues from), `io` (the atomic writer, pruning,
weights), `lock` (the one-writer lock), `fork` (a new run from a checkpoint), `hf` (config.json),
`dcp` (sharded checkpoints), `loading` (building a model from one). Train, eval and SFT import this
package; it imports none of them. The names below are the package's API.

The modules import torch, yaml and litgpt lazily (except `dcp`, `hf` and `loading`, which this file
does not import): the util scripts use these names without them.
"""

from __future__ import annotations

from litgpt_ext.checkpoint.fork import fork  # noqa: F401
from litgpt_ext.checkpoint.io import (  # noqa: F401
    _jsonable,
    _save_step,
    load_model_state,
    prune_checkpoints,
    tmp_dir_of,
    write_checkpoint,
)
from litgpt_ext.checkpoint.layout import (  # noqa: F401
    CONFIG_FILE,
    FINAL,
    FORK_RECORD,
    HF_CONFIG_FILE,
    HPARAMS_FILE,
    LOCK_FILE,
    LORA_FILE,
    LORA_RECORD,
    LORA_REQUIRED_FILES,
    MANIFEST_FILE,
    MODEL_FILE,
    REQUIRED_FILES,
    SHARDED_DIR,
    SHARDED_REQUIRED_FILES,
    STATE_FILE,
    STEP_RE,
    CheckpointError,
    adapter_hint,
    checkpoint_step,
    config_diff,
    load_training_state,
    read_manifest,
    required_files,
    step_dir_name,
)
from litgpt_ext.checkpoint.lock import RunLock, RunLockedError, hold_run_lock, run_lock  # noqa: F401
from litgpt_ext.checkpoint.resume import resolve_resume, set_aside_newer  # noqa: F401
from litgpt_ext.checkpoint.select import (  # noqa: F401
    checkpoint_dir_of,
    checkpoint_step_of,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoints,
)
from litgpt_ext.checkpoint.verify import is_complete, verify_checkpoint  # noqa: F401
