import os

import pytest
import torch
import yaml
from litgpt.config import Config

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.cli import main as cli_main

CFG = Config(name="tiny", block_size=8, n_layer=1, n_head=1, n_embd=8, padded_vocab_size=16, vocab_size=16)


def write(out, step, extra=None):
    st = {"step": step, **(extra or {})}
    return ckpt.write_checkpoint(out / ckpt.step_dir_name(step), {"w": torch.tensor([float(step)])}, st, CFG,
                                 {"out_dir": str(out), "train": {"max_iters": 10}})


def test_atomic_write_and_leftover_tmp_ignored(tmp_path):
    write(tmp_path, 2)
    assert not list(tmp_path.glob("*.tmp"))
    # a save killed half way: a .tmp dir (even a complete-looking one) and a partial step dir
    (tmp_path / "step-00000009.tmp").mkdir()
    (tmp_path / "step-00000009.tmp" / "lit_model.pth").write_bytes(b"half")
    (tmp_path / "step-00000008").mkdir()
    (tmp_path / "step-00000008" / "lit_model.pth").write_bytes(b"no state file")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"
    assert ckpt.resolve_resume(True, tmp_path) == tmp_path / "step-00000002"
    ckpt.prune_checkpoints(tmp_path, None)
    assert not (tmp_path / "step-00000009.tmp").exists()
    d = tmp_path / "step-00000002"
    assert torch.load(d / "lit_model.pth")["w"].item() == 2.0  # a bare state dict, as litgpt writes it
    assert Config.from_file(d / "model_config.yaml") == CFG  # litgpt reads the architecture back
    assert yaml.safe_load((d / "hyperparameters.yaml").read_text()) == {"out_dir": str(tmp_path), "train": {"max_iters": 10}}


def test_rewrite_final_swaps_in_place(tmp_path):
    for v in (1, 2):
        ckpt.write_checkpoint(tmp_path / "final", {"w": torch.tensor([float(v)])}, {"step": v}, CFG, {})
    assert torch.load(tmp_path / "final" / "lit_model.pth")["w"].item() == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_keep_last_k(tmp_path):
    for s in (1, 2, 3, 4):
        write(tmp_path, s)
    removed = ckpt.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["step-00000001", "step-00000002"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]


def test_resolve_resume_variants(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume=true but .* holds no complete step-\\* checkpoint"):
        ckpt.resolve_resume(True, tmp_path)
    assert ckpt.resolve_resume("auto", tmp_path) is None and ckpt.resolve_resume(False, tmp_path) is None
    d = write(tmp_path, 5)
    assert ckpt.resolve_resume(d / "lit_model.pth", tmp_path / "elsewhere") == d
    assert ckpt.resolve_resume(tmp_path, tmp_path / "elsewhere") == d  # a run dir: its latest
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        ckpt.resolve_resume(tmp_path / "nope", tmp_path)


def test_fork_command_links_without_copying(tmp_path):
    src = write(tmp_path / "run", 7)
    new = tmp_path / "mid"
    cli_main(["fork", "--from", str(src / "lit_model.pth"), "--to", str(new)])
    dst = new / "step-00000007"
    assert ckpt.latest_checkpoint(new) == dst
    for f in src.iterdir():
        a, b = os.stat(f), os.stat(dst / f.name)
        assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) and not os.path.islink(dst / f.name)
    assert '"step": 7' in (new / "forked_from.json").read_text()
    with pytest.raises(FileExistsError, match=r"already holds the fork \['step-00000007'\]; pass --force true"):
        ckpt.fork(src, new)
    ckpt.fork(src, new, force=True)
    assert ckpt.verify_checkpoint(dst) is None
