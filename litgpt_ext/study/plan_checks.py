"""A plan that cannot run is refused when it is planned, not hours later when its job starts.

`check_plan` runs for `sweep --action plan | write | local` (not `report`, which reads finished
runs): every midtraining mix must resolve against the shards on disk (an unknown domain, or a
domain with no shards, is named with the arm; a synth job's data folder counts as the shards it
links plus the shard it will write; a folder a prep job makes is checked when its jobs run), and the
first generated config of every (stage, command, arm) must parse with that command's own parser (a
bad override, e.g. a misspelt `arm_overrides` key, or a misspelt synth-replay argument, is named
with the job). On SLURM the difference is a refused `write` instead
of a base run's hours followed by a failed array.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from litgpt_ext.study.executor import Job
from litgpt_ext.study.spec import _get


def check_plan(jobs: list[Job], here: bool = True) -> None:
    """`here`: the jobs run on this machine (`--action local`), so their data must be here too; a plan
    or a SLURM plan written where the data is absent only says that the data was not checked."""
    check_data(jobs, here)
    check_forks(jobs)
    check_configs(jobs)


def check_forks(jobs: list[Job]) -> None:
    """An arm added to a study whose base run already finished forks a checkpoint that must exist: a
    base that ran past the arm's start without saving there cannot give it (re-running the base there
    would abandon its newer checkpoints), so the arm is refused now, naming the steps the base has."""
    from litgpt_ext import checkpoint as ckpt

    by_name = {j.name: j for j in jobs}
    for j in jobs:
        fork = j.config.get("fork_from") if isinstance(j.config, dict) else None
        bases = [by_name[d] for d in j.depends if d in by_name and by_name[d].stage == "base"]
        if not fork or not bases or Path(fork).exists() or not all(b.done() for b in bases):
            continue
        run = Path(fork).parent
        steps = [s for s, _ in ckpt.list_checkpoints(run)] if run.is_dir() else []
        raise ValueError(f"{j.name} forks {fork}, but its base run {run} has finished without a checkpoint there"
                         f" (it has steps {steps}); start the arm at one of those steps, or run the study into a new"
                         " out_dir so that the base pauses at every arm's start")


def check_data(jobs: list[Job], here: bool = True) -> None:
    """Each training job's mix against the shards under its data_path (discovered once per path). A
    data_path that does not exist is an error when the jobs run here, else one line: not checked."""
    from litgpt_ext.data.mix_spec import mix_spec, resolve_weights
    from litgpt_ext.data.shard_types import MixError, build_registry, discover_shards

    planned = _planned_data(jobs)
    made = [(j.name, Path(j.info["creates"])) for j in jobs if j.stage == "prep"]
    shards: dict[tuple, list] = {}
    seen: set[tuple] = set()
    absent: set[str] = set()
    for j in jobs:
        if j.command != "pretrain":
            continue
        init = _get(j.config, "data.init_args", {}) or {}
        path = init.get("data_path")
        extra = init.get("extra_shard_types") or {}
        mix = (init.get("mix_weights_str"), init.get("literal_weights_str"), init.get("mix_config_path"),
               bool(init.get("proportional_sampling")))
        key = (str(path), tuple(sorted(extra.items())), mix)
        if key in seen or init.get("mix_schedule"):
            continue  # a schedule is checked by the run's own data module (its points need the plan)
        seen.add(key)
        registry = build_registry(extra)
        src = planned[str(path)][0] if str(path) in planned else path  # a synth folder: the folder it links
        maker = next((n for n, c in made if src and Path(src) in (c, *c.parents) and not Path(src).is_dir()), None)
        if maker is not None:
            print(f"sweep: data.init_args.data_path={str(path)!r} is made by the plan's job {maker}: the mixes are checked"
                  " against its shards when their jobs run")
            continue
        if not here and src and not Path(src).is_dir():
            if str(path) not in absent:
                absent.add(str(path))
                print(f"sweep: data.init_args.data_path={str(path)!r} is not on this machine: the mixes were not checked"
                      " against its shards (they are when the plan runs: --action local, or the jobs themselves)")
            continue
        where = f"{j.stage} job {j.name}" + (f" (arm {j.info['arm']}, mix {j.info['mix']!r})" if j.info.get("arm") else "")
        try:
            if key[:2] not in shards:
                shards[key[:2]] = (discover_shards(path, registry) if str(path) not in planned
                                   else planned[str(path)][1](registry, discover_shards))
            resolve_weights(mix_spec(*mix), shards[key[:2]], registry)
        except MixError as e:
            raise ValueError(f"sweep: {where} cannot run on data.init_args.data_path={str(path)!r}: {e}") from None


def _planned_data(jobs: list[Job]) -> dict:
    """Data folders a synth job of the plan writes: {folder: (the folder it links (`link_shards_from`),
    f(registry, discover) -> the shards it will hold: those linked plus the synth shard it samples)}."""
    from litgpt_ext.data.shard_types import Shard, shard_id

    out = {}
    for j in jobs:
        if j.command != "synth-replay":
            continue
        cfg = j.config
        shard, base = str(cfg.get("shard") or "s1"), cfg.get("link_shards_from")

        def shards(registry, discover, shard=shard, base=base, folder=Path(cfg["out_dir"])):
            kind = next(n for n, p in registry.items() if p and shard.rstrip("0123456789") == p)
            have = discover(base, registry) if base else []
            return have + [Shard(shard_id(kind, shard), kind, int(shard.lstrip("abcdefghijklmnopqrstuvwxyz")),
                                 folder / shard, None)]

        out[str(cfg["out_dir"])] = (base, shards)
    return out


def check_configs(jobs: list[Job]) -> None:
    """The first config of each (stage, command, arm) through the command's parser, without running it
    (an arm's own overrides, a method's knobs, are checked with it)."""
    firsts: dict[tuple, Job] = {}
    for j in jobs:
        firsts.setdefault((j.stage, j.command, j.info.get("arm")), j)
    with tempfile.TemporaryDirectory() as tmp:
        for (stage, command, _), j in firsts.items():
            path = Path(tmp) / f"{j.name}.yaml"
            path.write_text(yaml.safe_dump(j.config, sort_keys=False))
            try:
                _parse(command, path)
            except (ValueError, TypeError, FileNotFoundError) as e:
                raise ValueError(f"sweep: the {stage} config of {j.name} (base config + overrides) does not parse:"
                                 f" {e}") from None


def _parse(command: str, path: Path) -> None:
    if command == "sft":
        from litgpt_ext.sft.config import SFTConfig

        SFTConfig.from_yaml(path)
        return
    if command == "soup":
        return  # its config is the plan's own (checkpoints it made), nothing the user typed
    from jsonargparse import ActionConfigFile, ArgumentParser

    from litgpt_ext.cli import COMMANDS, _load, explain_parse_error

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(_load(COMMANDS[command][0]), fail_untyped=False)
    try:
        parser.parse_args(["--config", str(path)])
    except Exception as e:  # jsonargparse's ArgumentError and friends: the key, the value and the cause
        raise ValueError(explain_parse_error(parser, str(e), [])) from None
