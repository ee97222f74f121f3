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
    out_dir/final/          the same at the end of the run
    out_dir/.run.lock       host, pid and SLURM job of the one process writing this run

A checkpoint is written into `<name>.tmp/` and renamed into place, so a killed run never leaves a
half-written directory that resume would pick; `*.tmp` directories are ignored and cleaned up.
Evaluation needs only the weights (`is_complete(p, need="weights")`: lit_model.pth +
model_config.yaml, e.g. a converted Pythia); resuming needs everything (`need="resume"`).

This module imports torch, yaml and litgpt lazily: the util scripts use its names without them.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

MODEL_FILE = "lit_model.pth"
STATE_FILE = "training_state.pth"
HPARAMS_FILE = "hyperparameters.yaml"
CONFIG_FILE = "model_config.yaml"
HF_CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
FORK_RECORD = "forked_from.json"
LOCK_FILE = ".run.lock"
FINAL = "final"
# Files a resumable checkpoint must hold (the manifest lists them all, plus tokenizer files).
REQUIRED_FILES = (MODEL_FILE, STATE_FILE, HPARAMS_FILE, CONFIG_FILE)
STEP_RE = re.compile(r"^step-(\d+)$")  # we write 8 digits; any width is read
_WRAPPER_PREFIXES = ("_orig_mod.", "_forward_module.", "module.")  # torch.compile, Fabric, DDP/FSDP


class CheckpointError(OSError):
    """A checkpoint could not be written or read back (names the file and the cause)."""


# ----------------------------------------------------------------------------------------- naming


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Union[Path, str]) -> float:
    """Sort key from the folder name: `step-N` -> N, `final` -> +inf (written last), else NaN."""
    name = Path(path).name
    if name == FINAL:
        return float("inf")
    m = STEP_RE.match(name)
    return float(m.group(1)) if m else float("nan")


def read_manifest(path: Path) -> Optional[dict]:
    try:
        return json.loads((Path(path) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_complete(path: Path, need: str = "resume") -> bool:
    """Cheap completeness check (file presence and sizes; `verify_checkpoint` checks contents).

    need="weights": lit_model.pth + model_config.yaml (what evaluation and litgpt need).
    need="resume": every file a resume reads; with a manifest, every file it lists at its size.
    """
    path = Path(path)
    if need == "weights":
        return (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file()
    if need != "resume":
        raise ValueError(f"need={need!r}; valid: 'resume', 'weights'")
    if not all((path / f).is_file() for f in REQUIRED_FILES):
        return False
    man = read_manifest(path)
    if man is None:  # written before manifests existed: the required files are all we can check
        return not (path / MANIFEST_FILE).exists()
    try:
        return all((path / f).stat().st_size == meta["size"] for f, meta in man["files"].items())
    except (OSError, KeyError, TypeError):
        return False


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: Path) -> Optional[str]:
    """None if `path` is a complete checkpoint whose files match its manifest, else why not."""
    path = Path(path)
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        broken = [f for f in missing if (path / f).is_symlink()]
        if broken:
            return f"{', '.join(broken)} point(s) to files that no longer exist ({os.readlink(path / broken[0])})"
        return f"missing {', '.join(missing)}"
    if not (path / MANIFEST_FILE).exists():
        return None  # a checkpoint from before manifests: presence is all we can check
    man = read_manifest(path)
    if man is None or not isinstance(man.get("files"), dict):
        return f"{MANIFEST_FILE} is unreadable"
    for f, meta in man["files"].items():
        p = path / f
        if not p.is_file():
            return f"{f} is missing"
        if p.stat().st_size != meta.get("size"):
            return f"{f} has {p.stat().st_size} bytes, the manifest says {meta.get('size')}"
        if meta.get("sha256") and _sha256(p) != meta["sha256"]:
            return f"{f} does not match its sha256 checksum (corrupt)"
    return None


def checkpoint_step_of(path: Path) -> int:
    """The training step a checkpoint holds: from its name, its manifest, or its training state."""
    path = Path(path)
    m = STEP_RE.match(path.name)
    if m:
        return int(m.group(1))
    man = read_manifest(path)
    if man is not None and "step" in man:
        return int(man["step"])
    return int(load_training_state(path)["step"])


def list_checkpoints(out_dir: Union[str, Path], final: bool = False, need: str = "resume") -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first; `*.tmp` and partial dirs skipped.

    final=True includes `final/` (sorted after a step-* of the same step).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = STEP_RE.match(p.name)
        if (m or (final and p.name == FINAL)) and p.is_dir() and is_complete(p, need):
            step = int(m.group(1)) if m else (checkpoint_step_of(p) if need == "resume" else None)
            found.append((step, p))
    if need == "weights":  # `final` may have no training state: order by name, final last
        return sorted(found, key=lambda sp: checkpoint_step(sp[1]))
    return sorted(found, key=lambda sp: (sp[0], sp[1].name == FINAL))


def latest_checkpoint(out_dir: Union[str, Path]) -> Optional[Path]:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1][1] if ckpts else None


def checkpoint_dir_of(path: Union[str, Path], need: str = "resume") -> Path:
    """A checkpoint folder from the folder itself, a file in it, or a run dir (its latest step)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if path.is_dir() and is_complete(path, need):
        return path
    if path.is_dir():
        found = list_checkpoints(path, final=need == "weights", need=need)
        if found:
            return found[-1][1]
    what = f"{MODEL_FILE} and {CONFIG_FILE}" if need == "weights" else ", ".join(REQUIRED_FILES)
    raise FileNotFoundError(
        f"{str(path)!r} is not a checkpoint: expected a folder with {what}"
        " (or a file in one, or a run dir holding step-* checkpoints)"
    )


def resolve_checkpoints(path: Path, all_checkpoints: bool = False) -> list[Path]:
    """For evaluation: a checkpoint folder -> [it]; a run folder -> its latest (or all, in order)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint or run directory {str(path)!r} does not exist")
    if is_complete(path, "weights"):
        return [path]
    ckpts = [p for _, p in list_checkpoints(path, final=True, need="weights")]
    if not ckpts:
        raise FileNotFoundError(
            f"{str(path)!r} is neither a checkpoint ({MODEL_FILE} + {CONFIG_FILE}) "
            "nor a run directory with step-*/ or final/ checkpoints"
        )
    return ckpts if all_checkpoints else ckpts[-1:]


# ----------------------------------------------------------------------------------------- resume


def _candidates(out_dir: Path) -> list[Path]:
    """Every step-*/final folder (complete or not), newest first."""
    if not out_dir.is_dir():
        return []
    dirs = [p for p in out_dir.iterdir() if p.is_dir() and (STEP_RE.match(p.name) or p.name == FINAL)]

    def key(p: Path):
        try:
            return (checkpoint_step_of(p), p.name == FINAL)
        except Exception:  # unreadable final/: try it last
            return (-1, False)

    return sorted(dirs, key=key, reverse=True)


def resolve_resume(resume: Union[bool, str, Path], out_dir: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """`True`: the newest checkpoint in out_dir that verifies (error if none); 'auto': the same,
    or None when out_dir holds no checkpoint at all; a path: that one (error if it does not verify).

    `final/` counts (a finished run resumes from it; the loop then reports it finished). A newer
    checkpoint that fails verification is skipped with a line saying which and why; if checkpoints
    exist but none verifies, this is an error, never a silent fresh start.
    """
    if resume is False or resume is None:
        return None
    out_dir = Path(out_dir)
    if resume is True or resume == "auto":
        skipped = []
        for p in _candidates(out_dir):
            why = verify_checkpoint(p)
            if why is None:
                for s, reason in skipped:
                    log(f"resume: skipped {s} ({reason}); resuming from {p}")
                return p
            skipped.append((p, why))
        if skipped:
            fork_note = ""
            if (out_dir / FORK_RECORD).is_file():
                rec = json.loads((out_dir / FORK_RECORD).read_text())
                fork_note = (f" This run was forked from {rec.get('source')}; fork it again"
                             " (`litgpt-ext fork --force true`) if that checkpoint still exists.")
            raise FileNotFoundError(
                f"{str(out_dir)!r} holds checkpoints but none is usable: "
                + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                + f". Refusing to start over from step 0.{fork_note} Move them aside to start fresh."
            )
        if resume is True:
            raise FileNotFoundError(
                f"resume=true but {str(out_dir)!r} holds no complete step-* checkpoint; use resume: auto to start"
                " fresh when there is none, or `litgpt-ext fork` to start from another run's checkpoint"
            )
        return None
    path = checkpoint_dir_of(resume)
    why = verify_checkpoint(path)
    if why is not None:
        raise FileNotFoundError(f"cannot resume from {str(path)!r}: {why}")
    return path


def set_aside_newer(resume: Union[bool, str, Path, None], out_dir: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """An explicit resume from an older step abandons the newer checkpoints of out_dir: move them
    (and final/) into `out_dir/abandoned-<stamp>/`, so that a requeue (`resume: auto`) continues
    the branch being trained, not the abandoned one. Nothing is deleted. Call on rank 0 only."""
    if resume in (False, None, True, "auto"):
        return None
    try:
        src = checkpoint_dir_of(resume)
    except FileNotFoundError:
        return None  # resolve_resume names the bad path, on every rank
    step = checkpoint_step_of(src)
    out_dir = Path(out_dir)
    newer = [p for p in _candidates(out_dir) if p.resolve() != src.resolve()
             and (p.name == FINAL or checkpoint_step(p) > step)]
    if not newer:
        return None
    dest = out_dir / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    dest.mkdir()
    for p in newer:
        os.replace(p, dest / p.name)
    log(f"resume from {src} (step {step}): moved the newer checkpoints {sorted(p.name for p in newer)} of"
        f" {out_dir} aside into {dest}, so later requeues continue this branch")
    return dest


# ------------------------------------------------------------------------------------------ write


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _hf_config_json(model_config: Any, tokenizer_dir: Optional[Path]) -> Optional[str]:
    """The Transformers config.json `litgpt evaluate` needs, or None where there is none (MoE,
    architectures convert-to-hf refuses, transformers not installed)."""
    if model_config.name.lower().startswith(("falcon", "gemma", "phi", "qwen", "qwq", "olmo")):
        return None  # litgpt converts these by name, with layouts convert-to-hf does not describe
    try:
        from litgpt_ext.eval.convert import hf_config, hf_family

        family = hf_family(model_config)
        eos = bos = None
        if tokenizer_dir is not None:
            from litgpt import Tokenizer

            tok = Tokenizer(Path(tokenizer_dir))
            eos, bos = tok.eos_id, tok.bos_id
        return hf_config(model_config, family, eos_id=eos, bos_id=bos).to_json_string()
    except Exception:  # no exact HF equivalent: no config.json rather than a wrong one
        return None


def _save_step(tmp: Path, name: str, write: Callable[[Path], None]) -> None:
    """One file of a checkpoint; a failure names the file and the cause (disk full, quota, ...)."""
    file = tmp / name
    try:
        write(file)
    except Exception as e:
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        no_space = (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)) or "unexpected pos" in str(e)
        try:
            free = shutil.disk_usage(tmp).free
        except OSError:
            free = -1
        written = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file()) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        reason = ("the disk is full or over quota" if no_space or 0 <= free < (1 << 20)
                  else f"{type(cause).__name__}: {cause}")
        raise CheckpointError(
            errno.ENOSPC if no_space else getattr(cause, "errno", None) or errno.EIO,
            f"writing {file} failed: {reason} ({free / 2**30:.2f} GiB free on its file system after"
            f" {written / 2**30:.2f} GiB of this checkpoint; raw error: {e}). The partial checkpoint was removed;"
            " earlier checkpoints are intact. Free space (or lower keep_last_k) and resume.",
        ) from e


def write_checkpoint(
    ckpt_dir: Path,
    model_state: dict,
    training_state: dict,
    model_config: Any,
    hparams: dict,
    tokenizer_dir: Optional[Path] = None,
) -> Path:
    """Write one checkpoint atomically (rank 0 only): into `<ckpt_dir>.tmp`, then rename."""
    import torch
    import yaml
    from litgpt.utils import copy_config_files, save_config

    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _save_step(tmp, MODEL_FILE, lambda f: torch.save(model_state, f))  # bare: litgpt's own format
    _save_step(tmp, STATE_FILE, lambda f: torch.save(training_state, f))

    def hparams_yaml(f: Path) -> None:
        with open(f, "w", encoding="utf-8") as fh:
            yaml.safe_dump(_jsonable(hparams), fh, sort_keys=False)

    _save_step(tmp, HPARAMS_FILE, hparams_yaml)
    if tokenizer_dir is not None:
        _save_step(tmp, "tokenizer files", lambda f: copy_config_files(Path(tokenizer_dir), tmp))
    # after the tokenizer files: the tokenizer dir may carry another model's configs
    _save_step(tmp, CONFIG_FILE, lambda f: save_config(model_config, tmp))
    (tmp / HF_CONFIG_FILE).unlink(missing_ok=True)
    hf = _hf_config_json(model_config, tokenizer_dir)
    if hf is not None:
        _save_step(tmp, HF_CONFIG_FILE, lambda f: f.write_text(hf))
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {"format": 1, "step": int(training_state.get("step", 0)), "files": files}
    _save_step(tmp, MANIFEST_FILE, lambda f: f.write_text(json.dumps(manifest, indent=1) + "\n"))
    _save_step(tmp, "(fsync)", lambda f: _fsync_tree(tmp))
    if ckpt_dir.exists():  # e.g. `final/` of an earlier invocation: swap, never leave neither in place
        old = ckpt_dir.with_name(ckpt_dir.name + ".old.tmp")
        if old.exists():
            shutil.rmtree(old)
        os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, ckpt_dir)
    return ckpt_dir


def prune_checkpoints(out_dir: Path, keep_last_k: Optional[int]) -> list[Path]:
    """Delete all but the newest `keep_last_k` step-* checkpoints (and stale *.tmp dirs)."""
    removed = []
    for p in Path(out_dir).glob("*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if keep_last_k is None:
        return removed
    for _, p in list_checkpoints(out_dir)[:-keep_last_k]:
        shutil.rmtree(p)
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------- load


def load_training_state(ckpt_dir: Path) -> dict:
    import torch

    return torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)


def load_model_state(path: Path) -> dict:
    """Weights from a checkpoint folder or a `lit_model.pth`: a bare state dict, or the older
    `{"model": sd}`; wrapper prefixes (torch.compile, Fabric, DDP) are stripped."""
    import torch

    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} at {str(path)!r}")
    sd = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
    if isinstance(sd.get("model"), dict):
        sd = sd["model"]
    out = {}
    for k, v in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------- lock


class RunLockedError(FileExistsError):
    """Another live process is writing this run."""


def _job_id() -> Optional[str]:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return job


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time (jiffies since boot) to tell a reused pid apart; None off Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


_HELD: dict[Path, "RunLock"] = {}


class RunLock:
    """One writer per out_dir: `out_dir/.run.lock` holds the writer's host, pid and SLURM job id.

    Taken with O_EXCL; a heartbeat thread touches it every `heartbeat_s`. A lock is stale (and taken
    over, logged) when its pid is dead on this host, when it belongs to this same SLURM job id (an
    earlier incarnation of a requeued job), or when its heartbeat is older than `stale_after_s`
    (its node died). Re-entrant within one process (the loop's fork holds the same lock).
    """

    def __init__(self, out_dir: Union[str, Path], stale_after_s: float = 600.0, heartbeat_s: float = 30.0,
                 log: Callable[[str], None] = print) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self.stale_after_s, self.heartbeat_s, self.log = stale_after_s, heartbeat_s, log
        self.token = secrets.token_hex(8)
        self.depth = 0
        self._stop = threading.Event()

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": _job_id(),
                "proc_start": _proc_start(os.getpid()), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "token": self.token}

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a process killed while taking it: judged by its age

    def _stale(self, rec: dict) -> Optional[str]:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released"
        if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
            if rec["pid"] == os.getpid():
                return "it was left by this process"  # held locks are re-entered before this check
            if not _pid_alive(rec["pid"], rec.get("proc_start")):
                return f"pid {rec['pid']} on this host is gone"
            return None
        if rec.get("job_id") and rec.get("job_id") == _job_id():
            return f"it belongs to an earlier run of this SLURM job {rec['job_id']} (requeued)"
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f}s (> {self.stale_after_s:.0f}s)"
        return None

    @staticmethod
    def describe(rec: dict) -> str:
        job = f", SLURM job {rec['job_id']}" if rec.get("job_id") else ", not a SLURM job"
        return f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}{job}, since {rec.get('started', '?')}"

    def _write_new(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
        return True

    def acquire(self) -> "RunLock":
        key = self.path.resolve() if self.path.exists() else self.out_dir.resolve() / LOCK_FILE
        held = _HELD.get(key)
        if held is not None:  # re-entrant in this process
            held.depth += 1
            return held
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._write_new():
                break
            rec = self._read()
            if rec is None:
                continue  # released meanwhile: try again
            why = self._stale(rec)
            if why is None:
                age = time.time() - self.path.stat().st_mtime
                raise RunLockedError(
                    f"{str(self.out_dir)!r} is being written by another training run ({self.describe(rec)};"
                    f" heartbeat {age:.0f}s ago). Two writers would mix two trainings' checkpoints. Wait for it"
                    f" or stop it; if it is dead on another node, its lock is taken over once its heartbeat is"
                    f" older than {self.stale_after_s:.0f}s (or delete {self.path})."
                )
            if self._take_over(rec, why):
                break
        else:
            raise RunLockedError(f"could not take the lock {self.path}: it keeps changing hands")
        self.depth = 1
        _HELD[self.path.resolve()] = self
        atexit.register(self.release)
        threading.Thread(target=self._heartbeat, daemon=True, name="run-lock-heartbeat").start()
        return self

    def _take_over(self, rec: dict, why: str) -> bool:
        """Replace a stale lock; a short-lived O_EXCL mutex serializes two processes taking it over."""
        mutex = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - mutex.stat().st_mtime > 60:  # left by a process killed mid-takeover
                    mutex.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.2)
            return False
        os.close(fd)
        try:
            if self._read() != rec:  # changed hands meanwhile: judge again
                return False
            tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}")
            tmp.write_text(json.dumps(self._record()))
            os.replace(tmp, self.path)
            self.log(f"run lock: took over the stale lock of {self.out_dir} ({self.describe(rec)}): {why}")
            return True
        finally:
            mutex.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self._read() or {}).get("token") == self.token:
                    os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self.depth == 0:
            return
        self.depth -= 1
        if self.depth:
            return
        self._stop.set()
        _HELD.pop(self.path.resolve(), None)
        if (self._read() or {}).get("token") == self.token:  # never remove another writer's lock
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self._held = self.acquire()  # this object, or the one this process already holds
        return self._held

    def __exit__(self, *exc) -> None:
        self._held.release()


def run_lock(out_dir: Union[str, Path], **kw: Any) -> RunLock:
    """`with run_lock(out_dir):` — hold the run's writer lock (see RunLock)."""
    return RunLock(out_dir, **kw)


def hold_run_lock(fabric: Any, out_dir: Path) -> Optional[RunLock]:
    """Rank 0 takes the run lock; if another writer holds it, every rank raises the same error
    (the other ranks would otherwise wait for rank 0 forever)."""
    lock, err = None, None
    if fabric.global_rank == 0:
        try:
            lock = RunLock(out_dir, log=fabric.print).acquire()
        except RunLockedError as e:
            err = str(e)
    if fabric.world_size > 1:
        err = fabric.broadcast(err, src=0)
    if err:
        raise RunLockedError(err)
    return lock


# ------------------------------------------------------------------------------------------- fork


def _link_or_copy(src: Path, dst: Path) -> str:
    """A hard link (no copy, survives the source being deleted); a copy across file systems.
    Never a symlink: a fork must not depend on its source staying in place."""
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _own_progress(to: Path) -> list[Path]:
    """Checkpoints in `to` that are not the one an earlier fork made."""
    forked = None
    if (to / FORK_RECORD).is_file():
        try:
            rec = json.loads((to / FORK_RECORD).read_text())
            forked = rec.get("dst") or step_dir_name(int(rec["step"]))
        except (ValueError, KeyError, TypeError):
            pass
    return [p for p in _candidates(to) if p.name != forked]


def fork(source: Path, to: Path, force: bool = False, abandon_progress: bool = False) -> Path:
    """Start a new run from another run's checkpoint, without copying it.

    Makes `<to>/step-XXXXXXXX/` whose files are hard links to the source checkpoint's files (copies
    across file systems), and records the source in `<to>/forked_from.json`. Then
    `litgpt-ext pretrain --out_dir <to> --resume true` (with the new blend) continues from it, and a
    requeued job resumes from the new run's own latest checkpoint. Checkpoint files are never
    modified in place, so the links are safe; the source is verified against its manifest first.

    Args:
        source: the checkpoint to start from: its folder, a file in it, or a run dir (its latest step).
        to: the new run's out_dir.
        force: replace an earlier fork in `to` (refused if `to` has trained on since: see below).
        abandon_progress: `to` holds its own training progress (checkpoints other than an earlier
            fork's): move them into `to/abandoned-<stamp>/` and fork anyway. Without it, refused.
    """
    src = checkpoint_dir_of(source)
    why = verify_checkpoint(src)
    if why is not None:
        raise FileNotFoundError(f"cannot fork {str(src)!r}: {why}")
    to = Path(to)
    with run_lock(to):
        own = _own_progress(to)
        existing = _candidates(to)
        if own and not abandon_progress:
            raise FileExistsError(
                f"{str(to)!r} holds its own training progress {sorted(p.name for p in own)}; forking into it"
                " would mix two runs. Fork into a new out_dir, or pass --abandon_progress true to move them"
                f" into {to}/abandoned-<stamp>/ first"
            )
        if existing and not own and not force:
            raise FileExistsError(
                f"{str(to)!r} already holds the fork {[p.name for p in existing]}; pass --force true to replace it"
            )
        if own:
            dest = to / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            dest.mkdir()
            for p in own:
                os.replace(p, dest / p.name)
            print(f"fork: moved {sorted(p.name for p in own)} of {to} aside into {dest}")
        step = checkpoint_step_of(src)
        dst = to / step_dir_name(step)
        tmp = dst.with_name(dst.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        kinds = set()
        for f in sorted(src.iterdir()):
            if f.is_file():
                kinds.add(_link_or_copy(f, tmp / f.name))
        for p in existing:  # the earlier fork (force)
            if p.exists():
                shutil.rmtree(p)
        os.replace(tmp, dst)
        record = {"source": str(src.resolve()), "step": step, "dst": dst.name, "links": sorted(kinds)}
        (to / FORK_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    how = "hard links, no copy" if kinds == {"hardlink"} else f"{', '.join(sorted(kinds))} (another file system)"
    print(f"forked {src} -> {dst} ({how}); continue with: litgpt-ext pretrain --out_dir {to} --resume true ...")
    return dst
