"""The resolved run config recorded in every checkpoint (hyperparameters.yaml), in the paper's key
format, so that `--config <checkpoint>/hyperparameters.yaml` reloads the run."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import asdict
from typing import Any

from litgpt_ext import checkpoint as ckpt


def resolved_hparams(args: dict) -> dict:
    """The resolved config in the paper's key format (reloadable with `--config`)."""
    out = {}
    for k, v in args.items():
        if k == "data" and v is not None:
            out[k] = {"class_path": f"{type(v).__module__}.{type(v).__qualname__}", "init_args": init_args_of(v)}
        elif dataclasses.is_dataclass(v):
            out[k] = asdict(v)
        else:
            out[k] = v
    return ckpt._jsonable(out)


def init_args_of(obj: Any) -> dict:
    """A data module's constructor arguments: dataclass fields, Lightning `save_hyperparameters()`,
    else the attributes named like the parameters."""
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    saved = dict(getattr(obj, "hparams", None) or {})
    params = inspect.signature(type(obj).__init__).parameters
    return {n: saved[n] if n in saved else getattr(obj, n) for n in params
            if n != "self" and (n in saved or hasattr(obj, n))}
