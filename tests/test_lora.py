"""LoRA continued pretraining (`lora:`) and `litgpt-ext merge-lora`: litgpt's LoRA model on a frozen
base, adapter-only checkpoints, exact resume (kill -9 too), FSDP2 with 2 gloo processes, the merged
checkpoint read by our commands and litgpt's, and the one-line refusals."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from litgpt.config import Config
from litgpt.model import GPT

sys.path.insert(0, str(Path(__file__).parent))
from test_sft_data import tok_dir, tokenizer  # noqa: E402, F401  (fixtures of `source`)
from test_sft_run import _config as _sft_config  # noqa: E402
from test_sft_run import source  # noqa: E402, F401  (a tiny source checkpoint with a tokenizer + SFT data)
from train_fakes import VOCAB, FakeMixedData  # noqa: E402

from litgpt_ext import checkpoint as ckpt  # noqa: E402
from litgpt_ext.checkpoint.lora import LORA_TARGETS, BaseRef, LoRAArgs, find_base, weights_digest  # noqa: E402
from litgpt_ext.checkpoint.merge_lora import merge_lora  # noqa: E402
from litgpt_ext.cli import main as cli_main  # noqa: E402
from litgpt_ext.train import loop  # noqa: E402
from litgpt_ext.train.args import EvalArgs, TrainArgs  # noqa: E402
from litgpt_ext.train.state import TrainingState  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ADAMW = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2, "weight_decay": 0.0}}
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["query", "value", "projection", "mlp", "head"]}
ALL = [t for t in LORA_TARGETS]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _lora_model(base_dir: Path, adapter_dir: Path) -> torch.nn.Module:
    """The unmerged model: litgpt's LoRA GPT with the base and the adapter, as training uses it."""
    from litgpt_ext.model.lora import build_lora_model, load_adapter, load_base

    rec = json.loads((adapter_dir / ckpt.LORA_RECORD).read_text())
    cfg = Config.from_file(adapter_dir / ckpt.CONFIG_FILE)
    model = build_lora_model(cfg, LoRAArgs.parse(rec["lora"]))
    load_base(model, base_dir, cfg)
    load_adapter(model, torch.load(adapter_dir / ckpt.LORA_FILE, weights_only=True), adapter_dir)
    return model


def _plain(ckpt_dir: Path) -> GPT:
    """litgpt's own loading: `litgpt.GPT(Config.from_file(...))` + a strict `load_state_dict`."""
    model = GPT(Config.from_file(ckpt_dir / "model_config.yaml"))
    model.load_state_dict(torch.load(ckpt_dir / "lit_model.pth", weights_only=True), strict=True)
    return model


# ------------------------------------------------------------------------------------------ settings


def test_targets_are_litgpts_lora_switches():
    from litgpt.lora import Config as LoRAConfig

    switches = [f.name[len("lora_"):] for f in dataclasses.fields(LoRAConfig) if f.name.startswith("lora_")
                and f.type in (bool, "bool")]
    assert sorted(switches) == sorted(LORA_TARGETS)
    fields = LoRAArgs(r=2, targets=["mlp", "query"]).litgpt_fields()
    assert fields["lora_mlp"] and fields["lora_query"] and not fields["lora_key"] and fields["lora_r"] == 2


@pytest.mark.parametrize("cfg, fragments", [
    ({"r": 0}, ["lora.r=0", "integer > 0"]),
    ({"r": -2}, ["lora.r=-2"]),
    ({"r": 2.5}, ["lora.r=2.5"]),
    ({"alpha": 0}, ["lora.alpha=0", "> 0"]),
    ({"alpha": -1.5}, ["lora.alpha=-1.5"]),
    ({"dropout": 1.0}, ["lora.dropout=1.0", "[0, 1)"]),
    ({"dropout": -0.1}, ["lora.dropout=-0.1", "[0, 1)"]),
    ({"targets": ["query", "qkv"]}, ["'qkv' is not a LoRA target", "valid targets: query, key, value, projection, mlp, head"]),
    ({"targets": []}, ["lora.targets=[]", "non-empty list"]),
    ({"targets": "query"}, ["lora.targets='query'", "list"]),
    ({"targets": ["mlp", "mlp"]}, ["names a target twice"]),
    ({"rank": 8}, ["unknown key(s) ['rank']", "valid: r, alpha, dropout, targets, base"]),
    ([8], ["lora must be a mapping"]),
])
def test_bad_lora_values_are_one_line(cfg, fragments):
    with pytest.raises(ValueError) as e:
        LoRAArgs.parse(cfg)
    assert "\n" not in str(e.value)
    for f in fragments:
        assert f in str(e.value), str(e.value)


def test_a_bad_lora_section_is_refused_before_torch_is_imported(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"lora": {"r": 4, "targets": ["query", "attn"]}}))
    p = subprocess.run([sys.executable, "-c", "import sys; from litgpt_ext.cli import main\ntry:\n main(sys.argv[1:])\n"
                        "finally:\n print('torch' in sys.modules)", "pretrain", "--config", str(cfg)],
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=60)
    assert p.returncode == 2 and p.stdout.strip() == "False", p.stderr
    assert p.stderr.startswith("litgpt-ext pretrain: error: config") and "'attn' is not a LoRA target" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 2 and "Traceback" not in p.stderr


def _tiny_run(out: Path, **kw):
    cfg = Config(name="tiny", block_size=16, n_layer=1, n_head=2, n_embd=16, padded_vocab_size=VOCAB, vocab_size=VOCAB,
                 **kw.pop("model", {}))
    return loop.pretrain(model_config=cfg, out_dir=out, data=FakeMixedData(), devices=1, logger_name="csv",
                         train=TrainArgs(max_iters=2, global_batch_size=2, micro_batch_size=2, min_lr=0.0),
                         eval=EvalArgs(interval=4, max_iters=1), optimizer=ADAMW, **kw)


@pytest.mark.parametrize("kw, fragment", [
    (dict(lora=LORA), "a fresh pretrain has none"),
    (dict(lora=LORA, initial_checkpoint_dir="x", model={"mlp_class_name": "LLaMAMoE", "n_expert": 2,
                                                         "n_expert_per_token": 1, "moe_intermediate_size": 8}),
     "mixture-of-experts model (n_expert=2) is not supported"),
    (dict(lora=LORA, initial_checkpoint_dir="x", speed={"checkpoint_format": "sharded"}), "checkpoint_format: full"),
    (dict(lora=LORA, initial_checkpoint_dir="x", regularizer={"type": "l2_anchor", "lambda": 1.0}),
     "with regularizer: is not supported"),
])
def test_lora_runs_the_loop_cannot_train_are_refused_before_any_work(tmp_path, kw, fragment):
    from litgpt_ext.train.speed import SpeedArgs

    if "speed" in kw:
        kw["speed"] = SpeedArgs(**kw["speed"])
    with pytest.raises(ValueError, match="^lora: ") as e:
        _tiny_run(tmp_path / "out", **kw)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_resume_auto_without_a_checkpoint_has_no_base(tmp_path):
    with pytest.raises(ValueError, match=r"^lora: .* holds no checkpoint to continue and the run names none"):
        _tiny_run(tmp_path / "out", lora=LORA, resume="auto")
    assert not (tmp_path / "out" / "lora_base").exists() and not ckpt.list_checkpoints(tmp_path / "out")


@pytest.mark.parametrize("spec, groups", [
    (ADAMW, None),
    ({**ADAMW, "layer_lr_decay": 0.5}, ["block0", "block1", "head"]),
    ({"class_path": "torch.optim.Muon", "init_args": {"lr": 0.02}}, ["muon", "adamw"]),  # block matrices, lm_head
])
def test_the_optimizer_holds_the_adapter_only(spec, groups):
    from litgpt.lora import mark_only_lora_as_trainable

    from litgpt_ext.model.lora import build_lora_model
    from litgpt_ext.train.optim import build_optimizer

    cfg = Config(name="tiny", block_size=16, n_layer=2, n_head=2, n_embd=16, padded_vocab_size=VOCAB, vocab_size=VOCAB)
    model = build_lora_model(cfg, LoRAArgs.parse(LORA))
    mark_only_lora_as_trainable(model)
    opt = build_optimizer(spec, model, log=lambda s: None)
    adapter = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == adapter and len(adapter) == 2 * (4 * 2 + 1)
    if groups is not None:
        assert [g["name"] for g in opt.param_groups] == groups


def test_find_base_refuses_a_moved_or_changed_base(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / ckpt.MODEL_FILE).write_bytes(b"weights")
    sha, size = weights_digest(base)
    adapter = tmp_path / "run" / "final"
    rec = {"lora": {}, "base": {"path": str(base), "sha256": sha, "size": size, "source": "src"}}
    assert find_base(adapter, rec) == base
    moved = tmp_path / "elsewhere"
    base.rename(moved)
    with pytest.raises(FileNotFoundError, match=r"is missing \(moved or deleted\?\): tried .*base \(does not exist\).*"
                                                 r"give its new location with lora.base"):
        find_base(adapter, rec)
    assert find_base(adapter, rec, override=moved) == moved  # relocated: the same weights
    (tmp_path / "run" / "lora_base").mkdir(parents=True)  # a run folder that moved: its own lora_base/ is found
    shutil.copy(moved / ckpt.MODEL_FILE, tmp_path / "run" / "lora_base" / ckpt.MODEL_FILE)
    assert find_base(adapter, rec) == tmp_path / "run" / "lora_base"
    (moved / ckpt.MODEL_FILE).write_bytes(b"weightz")  # same size, other bytes
    with pytest.raises(ValueError, match=r"changed: .* has sha256 .*refusing to apply it to other weights"):
        find_base(adapter, rec, override=moved)


# ------------------------------------------------------------------------------------------ merge


def test_merged_logits_equal_the_unmerged_ones_and_litgpt_loads_them(tmp_path):
    """An adapter on every target (GQA: the qkv padding path too), merged: one plain litgpt checkpoint."""
    from litgpt_ext.model.lora import build_lora_model
    from litgpt_ext.train.lora import LoRARun

    cfg = Config(name="tiny-llama", block_size=16, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, vocab_size=VOCAB,
                 padded_vocab_size=VOCAB, mlp_class_name="LLaMAMLP", intermediate_size=48, norm_class_name="RMSNorm",
                 bias=False)
    torch.manual_seed(0)
    base = GPT(cfg)
    ckpt.write_checkpoint(tmp_path / "base", base.state_dict(), TrainingState(step=3).to_dict(), cfg, {}, None)
    for targets in (ALL, ["key", "mlp"]):
        args = LoRAArgs(r=2, alpha=3.0, dropout=0.0, targets=targets)
        model = build_lora_model(cfg, args)
        model.load_state_dict(base.state_dict(), strict=False)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data.normal_(0, 0.3)  # B = 0 would make the test trivial
        run = LoRARun(args, BaseRef(str(tmp_path / "base"), *weights_digest(tmp_path / "base"), "test"))
        run.trainable = 1
        adapter = {n: p.detach().clone() for n, p in model.state_dict().items() if "lora_" in n}
        out = tmp_path / "-".join(targets)
        ckpt.write_checkpoint(out / "final", adapter, TrainingState(step=5).to_dict(), cfg, {"lora": LORA}, None,
                              model_file=run.model_file, extra_files=run.record())
        merged = merge_lora(out / "final", out / "merged")
        x = torch.randint(0, VOCAB, (2, 16))
        ref = _logits(model, x)
        torch.testing.assert_close(_logits(_plain(merged), x), ref, rtol=0, atol=1e-5)
        sd, base_sd = torch.load(merged / "lit_model.pth", weights_only=True), base.state_dict()
        assert sd.keys() == base_sd.keys()  # the base's own keys: no lora_*, no *.linear.*
        changed = {k for k in sd if not torch.equal(sd[k], base_sd[k])}
        if targets == ["key", "mlp"]:
            assert changed == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                               for m in ("attn.qkv", "mlp.fc_1", "mlp.fc_2", "mlp.proj")}
        assert "lora" not in (merged / "model_config.yaml").read_text()
        assert ckpt.load_training_state(merged)["step"] == 5 and ckpt.verify_checkpoint(merged) is None


def test_merge_lora_refusals_are_one_line(tmp_path, capsys):
    cfg = Config(name="tiny", block_size=16, n_layer=1, n_head=2, n_embd=16, padded_vocab_size=VOCAB, vocab_size=VOCAB)
    full = ckpt.write_checkpoint(tmp_path / "full", GPT(cfg).state_dict(), TrainingState(step=1).to_dict(), cfg, {})
    with pytest.raises(SystemExit) as e:
        cli_main(["merge-lora", str(full), str(tmp_path / "out")])
    assert "holds no LoRA adapter (lit_model.pth.lora); it is a full checkpoint" in e.value.code
    with pytest.raises(SystemExit) as e:
        cli_main(["merge-lora", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert "does not exist" in e.value.code and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, source, tok_dir):  # noqa: F811
    """A LoRA midtraining run forked from `source`'s step 7 (6 steps, every target, dropout on), with the
    model as `fit` left it (a spy on `fit`), and its merged final checkpoint."""
    root = tmp_path_factory.mktemp("lora")
    base = source / "base" / "step-00000007"
    live = {}
    fit = loop.fit

    def spy(fabric, model, *a, **k):
        result = fit(fabric, model, *a, **k)
        live.update({n: t.detach().clone() for n, t in model.module.state_dict().items()})
        return result

    loop.fit = spy
    try:
        result = loop.pretrain(
            model_config=Config.from_file(base / "model_config.yaml"), out_dir=root / "run", data=FakeMixedData(),
            devices=1, logger_name="csv", fork_from=base, tokenizer_dir=tok_dir, lora=LORA,
            optimizer={**ADAMW, "init_args": {"lr": 3e-2}},
            train=TrainArgs(max_iters=13, global_batch_size=4, micro_batch_size=2, save_interval=3, log_interval=1,
                            lr_warmup_steps=1, min_lr=1e-3, max_seq_length=16), eval=EvalArgs(interval=3, max_iters=2))
    finally:
        loop.fit = fit
    merged = merge_lora(root / "run" / "final", root / "merged")
    return {"root": root, "base": base, "run": root / "run", "result": result, "live": live, "merged": merged}


@pytest.mark.slow
def test_only_the_adapter_trains_and_is_checkpointed(lora_run):
    run, base, live = lora_run["run"], lora_run["base"], lora_run["live"]
    assert lora_run["result"].step == 13 and [p.name for _, p in ckpt.list_checkpoints(run, final=True)] == \
        ["step-00000007", "step-00000009", "step-00000012", "final"]  # the fork (the base), then adapters
    start = ckpt.load_model_state(base)
    # the base weights in the trained model: bit-identical to the start checkpoint after 6 steps
    frozen = {k.replace("linear.", ""): v for k, v in live.items() if "lora_" not in k}
    assert frozen.keys() == start.keys() and all(torch.equal(frozen[k], start[k]) for k in start)
    names = sorted(k for k in live if "lora_" in k)
    assert len(names) == 2 * 5  # qkv, attn proj, mlp fc, mlp proj, lm_head
    for step in ("step-00000009", "final"):
        d = run / step
        assert not (d / ckpt.MODEL_FILE).exists() and ckpt.verify_checkpoint(d) is None
        adapter = torch.load(d / ckpt.LORA_FILE, weights_only=True)
        assert sorted(adapter) == names
        opt = ckpt.load_training_state(d)["optimizer"]
        assert sorted(opt["state"]) == names and sorted(opt["param_groups"][0]["params"]) == names
    final = torch.load(run / "final" / ckpt.LORA_FILE, weights_only=True)
    assert all(torch.equal(final[k], live[k]) for k in names)
    assert all(float(final[k].abs().max()) > 0 for k in names if k.endswith("lora_B"))  # B moved off its zero init
    rec = json.loads((run / "final" / ckpt.LORA_RECORD).read_text())
    assert rec["lora"] == {**LORA, "alpha": 8.0} and rec["trainable_parameters"] == sum(final[k].numel() for k in names)
    assert rec["base"]["path"] == str((run / "lora_base").resolve()) and rec["base"]["source"] == str(base.resolve())
    assert rec["base"]["sha256"] == ckpt.read_manifest(base)["files"]["lit_model.pth"]["sha256"]
    assert (run / "lora_base" / "lit_model.pth").stat().st_ino == (base / "lit_model.pth").stat().st_ino  # linked
    hp = yaml.safe_load((run / "final" / ckpt.HPARAMS_FILE).read_text())
    assert hp["lora"] == {**LORA, "alpha": 8.0, "base": None}
    with open(run / "val_metrics.csv") as f:
        val = {(int(r["step"]), r["set"]): float(r["loss"]) for r in csv.DictReader(f)}
    assert val[(13, "general")] < val[(7, "general")] - 0.05  # it learned


@pytest.mark.slow
def test_the_merged_checkpoint_is_read_by_our_commands_and_litgpts(lora_run, source, tmp_path):  # noqa: F811
    run, merged = lora_run["run"], lora_run["merged"]
    x = torch.randint(0, 64, (2, 16))
    unmerged = _logits(_lora_model(run / "lora_base", run / "final"), x)
    # litgpt: its GPT and a strict load_state_dict; our evaluate's loader; both give the unmerged logits
    torch.testing.assert_close(_logits(_plain(merged), x), unmerged, rtol=0, atol=1e-5)
    from litgpt_ext.checkpoint.loading import load_model

    ours, _ = load_model(merged, device="cpu")
    torch.testing.assert_close(_logits(ours, x), unmerged, rtol=0, atol=1e-5)
    assert {"tokenizer.json", "tokenizer_config.json", "model_config.yaml", "lit_model.pth"} <= {p.name for p in merged.iterdir()}
    assert ckpt.verify_checkpoint(merged) is None and json.loads((merged / "merged_from.json").read_text())["step"] == 13
    # convert-to-hf: Transformers gives the same logits
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    cli_main(["convert-to-hf", str(merged), str(hf)])
    with torch.no_grad():
        torch.testing.assert_close(transformers.AutoModelForCausalLM.from_pretrained(hf).eval()(x).logits,
                                   unmerged, rtol=0, atol=1e-4)
    # sft from it; and fork it into a full-parameter midtraining run (its step and data cursors continue)
    cfg = _sft_config(source, tmp_path / "sft", epochs=1)
    c = yaml.safe_load(cfg.read_text())
    c["checkpoint_dir"] = str(merged)
    cfg.write_text(yaml.safe_dump(c))
    cli_main(["sft", "--config", str(cfg)])
    assert ckpt.load_training_state(tmp_path / "sft" / "final")["step"] == 5  # 40 examples, 8 per step
    full = loop.pretrain(model_config=Config.from_file(merged / "model_config.yaml"), out_dir=tmp_path / "full",
                         data=FakeMixedData(), devices=1, logger_name="csv", fork_from=merged, optimizer=ADAMW,
                         train=TrainArgs(max_iters=15, global_batch_size=4, micro_batch_size=2, min_lr=1e-3,
                                         max_seq_length=16), eval=EvalArgs(interval=100, max_iters=1))
    assert full.step == 15 and ckpt.is_complete(tmp_path / "full" / "final")


@pytest.mark.slow
def test_resume_fork_and_evaluate_refuse_or_follow_the_adapter(lora_run, tmp_path, capsys):
    run, base = lora_run["run"], lora_run["base"]
    mcfg = Config.from_file(base / "model_config.yaml")

    def again(out, **kw):
        return loop.pretrain(model_config=mcfg, out_dir=out, data=FakeMixedData(), devices=1, logger_name="csv",
                             optimizer=ADAMW, train=TrainArgs(max_iters=kw.pop("max_iters", 14), global_batch_size=4,
                                                              micro_batch_size=2, min_lr=1e-3, max_seq_length=16),
                             eval=EvalArgs(interval=100, max_iters=1), **kw)

    with pytest.raises(ValueError, match=r"is a LoRA adapter checkpoint and this run has no lora: section; give the"
                                         r" adapter's \(lora: r=4, alpha=8"):
        again(tmp_path / "a", resume=run / "step-00000009")
    with pytest.raises(ValueError, match=r"holds an adapter with r=4.*this run's lora: has r=2.*r, alpha and targets"):
        again(tmp_path / "b", resume=run / "step-00000009", lora={**LORA, "r": 2})
    # a fork of an adapter checkpoint brings its base along (hard links) and resumes in its own folder
    ckpt.fork(run / "step-00000009", tmp_path / "fork")
    assert (tmp_path / "fork" / "lora_base" / "lit_model.pth").stat().st_ino == (base / "lit_model.pth").stat().st_ino
    capsys.readouterr()
    res = again(tmp_path / "fork", resume="auto", lora={**LORA, "dropout": 0.0}, max_iters=11)
    assert res.step == 11 and "adapter from" in capsys.readouterr().out
    assert json.loads((tmp_path / "fork" / "final" / "lora.json").read_text())["base"]["path"] == \
        str((tmp_path / "fork" / "lora_base").resolve())
    # evaluate, sft (its weight loader) and convert-to-hf name the adapter and the command that merges it
    with pytest.raises(FileNotFoundError, match=r"no lit_model.pth at .*is a LoRA adapter checkpoint.*merge-lora"):
        ckpt.load_model_state(run / "final")
    for argv in (["evaluate", str(run / "final")], ["evaluate", str(run)], ["convert-to-hf", str(run / "final"), "x"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert "is a LoRA adapter checkpoint" in e.value.code and "litgpt-ext merge-lora" in e.value.code, e.value.code
    # merge-lora against another base, or with the base gone: refused; pointed at a relocated copy: merged
    with pytest.raises(SystemExit) as e:
        cli_main(["merge-lora", str(run / "final"), str(tmp_path / "m"), "--base_checkpoint_dir", str(lora_run["merged"])])
    assert "changed" in e.value.code and "refusing to apply it to other weights" in e.value.code
    copy = shutil.copytree(run, tmp_path / "copy", ignore=shutil.ignore_patterns("lora_base"))
    elsewhere = shutil.copytree(base, tmp_path / "elsewhere")
    shutil.move(str(run / "lora_base"), str(tmp_path / "lora_base_aside"))
    try:
        with pytest.raises(SystemExit) as e:
            cli_main(["merge-lora", str(copy / "final"), str(tmp_path / "m")])
        assert "is missing (moved or deleted?)" in e.value.code and "--base_checkpoint_dir" in e.value.code
        out = merge_lora(copy / "final", tmp_path / "m", base_checkpoint_dir=elsewhere)
        assert all(torch.equal(a, b) for a, b in zip(ckpt.load_model_state(out).values(),
                                                    ckpt.load_model_state(lora_run["merged"]).values()))
    finally:
        shutil.move(str(tmp_path / "lora_base_aside"), str(run / "lora_base"))
