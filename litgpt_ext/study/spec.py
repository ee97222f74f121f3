"""The sweep spec: typed sections read from YAML, and the arm vocabulary (names, mixes, domain steps).

Spec (YAML; every key is listed in `SweepSpec`):

    name: demo_study
    base_config: midtrain_configs/demo/pretrain.yaml
    total_steps: 240
    seeds: [42]
    grid: {domain: [math, code], start: [80, 160], weight: [0.2]}
    arms: [{name: cpt_math, domain: math, start: 200, weight: 1.0}]
    sft: {config: midtrain_configs/sft/demo_math.yaml, tasks: {math: {...}}, lr: [1e-3, 3e-3], seeds: [0, 1, 2]}
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

STAGES = ("prep", "base", "synth", "midtrain", "merge", "soup", "sft")


ROLES = ("mid", "cpt", "cross", "ablation")  # what an arm feeds in the report: litgpt_ext.study.report


@dataclass
class SFTGrid:
    config: Optional[Path] = None
    """Base SFT config (for `litgpt-ext sft`); every SFT run is a copy with the overrides below"""
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Task name -> dotted-key overrides of the SFT config (e.g. its data paths)"""
    lr: list[float] = field(default_factory=list)
    """Learning rates to sweep (the best by SFT validation loss is kept per checkpoint and task)"""
    seeds: list[int] = field(default_factory=lambda: [0])
    """SFT seeds (mean and std are reported over them)"""
    include_base: bool = True
    """Also fine-tune the base run's final checkpoint: the general-only baseline"""
    lr_key: str = "optimizer.init_args.lr"
    """Where the LR goes in the SFT config"""
    checkpoint_key: str = "checkpoint_dir"
    """Where the source checkpoint goes in the SFT config"""


@dataclass
class ReportSpec:
    """`--action report`: how the sweep's arms and SFT tasks map onto the paper's findings F1-F4."""

    task_domains: dict[str, str] = field(default_factory=dict)
    """SFT task -> the midtraining domain it measures (the paper: pycode: code, gsm8k: math, lima: instruct,
    sciq: qa); a task without a domain is reported, not used by F1/F2/F4"""
    far_domains: list[str] = field(default_factory=lambda: ["code", "math"])
    """Domains far from general text (F1's far points); mid arms of other domains give its near points"""
    near_task: Optional[str] = None
    """A near-domain task the far arms are also fine-tuned on (an F1 near point per far arm)"""
    similarity_docs: int = 1000
    """Documents per shard and SFT set for the bridge (F3); 0 skips it"""
    data_path: Optional[Path] = None
    """Token shards for the bridge (default: the base config's data.init_args.data_path)"""
    tokenizer_dir: Optional[Path] = None
    """Tokenizer for the bridge (default: the base config's tokenizer_dir)"""
    bootstrap: int = 1000
    """Hierarchical-bootstrap replicates behind every finding's 95% interval (0: no intervals)"""
    kind: str = "findings"
    """findings: the paper's F1-F4 (`litgpt_ext.study.report`); methods: a ranking of the arms as ways to
    gain a domain without forgetting (gain, forgetting, post-SFT loss, the Pareto front:
    `litgpt_ext.study.methods_report`)"""
    general_set: str = "general"
    """methods: the validation set whose rise is forgetting"""
    reference: Optional[str] = None
    """methods: the arm every other arm is compared with on paired differences (e.g. no_replay)"""


@dataclass
class PrepStep:
    """`prep:` one command that makes an input of the study before anything trains (its SFT set, the
    demo corpus): a job like any other (skipped once `creates` exists; every base run waits for it)."""

    name: str
    """The job's name (`prep_<name>`; its log goes to <out_root>/prep/<name>/)"""
    command: str
    """A litgpt-ext command (build-demo, build-sft-tasks, prepare, …)"""
    creates: Path
    """A path the command leaves when it has finished: the job counts as done once it exists"""
    args: dict[str, Any] = field(default_factory=dict)
    """The command's arguments (its `--config` mapping)"""


@dataclass
class SynthReplaySpec:
    """`synth_replay:` a `synth` shard sampled from each pretraining seed's own base checkpoint
    (`litgpt-ext synth-replay`), for the arms whose mix has type synth. It is written into
    <out_root>/synth_replay_seed<S>/data, a data folder that links the base config's shard folders beside it
    (the original folder is not written to), and those arms train on that folder."""

    args: dict[str, Any] = field(default_factory=dict)
    """synth-replay's arguments (prompts, num_docs, max_new_tokens, prompt_tokens, seed, …); checkpoint,
    out_dir, shard and link_shards_from are set by the plan"""
    shard: str = "s1"
    """The synth shard's folder name"""
    step: Optional[int] = None
    """The base checkpoint's step it samples from (default: the start of the arms that use it, which
    must then be one)"""


@dataclass
class LocalSpec:
    """`local:` how `--action local` runs the plan on this machine (not what it computes)."""

    workers: int = 1
    """Jobs run at once, each in its own process as soon as every job it depends on has finished; with
    > 1 each is forked from a process that imported torch, lightning and litgpt once (~7 CPU-seconds
    less per job than a new interpreter)"""
    threads: Optional[int] = None
    """torch threads per job (OMP_NUM_THREADS; default: torch's own). On a small CPU machine,
    workers x threads = its cores: a tiny model gains little from a second thread"""


@dataclass
class SweepSpec:
    name: str
    """Sweep name; runs go to out_root/<run>, configs to out_root/configs"""
    base_config: Path
    """The general-only pretraining config every run is derived from"""
    total_steps: int
    """The shared total: every run ends at this optimizer step (the paper: 61,035)"""
    out_root: Optional[Path] = None
    """Default runs/sweeps/<name>"""
    seeds: list[int] = field(default_factory=lambda: [42])
    """Pretraining seeds: one base run each (sets `seed` and `data.init_args.seed`)"""
    replay: str = "main"
    """The general (replay) shard type mixed with the domain"""
    grid: dict[str, list] = field(default_factory=dict)
    """Cartesian product over domain, start, weight (each a list)"""
    arms: list[dict[str, Any]] = field(default_factory=list)
    """Explicit extra arms: {domain, start, weight[, name][, seeds]} (e.g. continued-pretraining controls;
    `seeds` limits an arm to some of the pretraining seeds). `match_tokens_of: <arm>` instead of `start`
    starts the arm where it sees as many domain tokens as that arm: a token-matched CPT control.
    `role` (mid | cpt | cross | ablation; default cpt at weight 1.0, else mid) says which finding of
    `--action report` the arm feeds (ablation: the results table only)"""
    base_overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted-key overrides of the base runs (e.g. train.log_interval)"""
    arm_overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted-key overrides of every midtraining arm"""
    split_base: bool = True
    """Run each base run as one job per fork step (`train.pause_at_step`): an arm forking at 6k starts
    once step 6k is saved, not after the whole base run. The plan, LR and data order are those of one
    uninterrupted run; false: one job per base run"""
    arm_data_seeds: list[int] = field(default_factory=list)
    """Run every arm once per data seed (`data.init_args.seed`), all forked from the same base checkpoint
    (empty: one run per pretraining seed, with the data seed = the pretraining seed)"""
    soup_data_seeds: bool = False
    """Average each arm's `arm_data_seeds` runs (same fork point, different data order) into
    `soup_<arm>_seed<s>` (`litgpt-ext soup`, as OLMo soups its anneal runs); SFT then also starts from
    each soup. Runs of different pretraining seeds are never souped: they start from different random
    initializations and their average is not a working model"""
    prep: list[PrepStep] = field(default_factory=list)
    """Commands that make the study's inputs first (`PrepStep`); every base run depends on them"""
    synth_replay: Optional[SynthReplaySpec] = None
    """A synth shard per pretraining seed, sampled from its base run (`SynthReplaySpec`)"""
    sft: Optional[SFTGrid] = None
    report: Optional[ReportSpec] = None
    """`--action report`: the findings' mapping (`ReportSpec`); `--action local` writes it at its end"""
    local: LocalSpec = field(default_factory=LocalSpec)
    """`--action local`: workers and threads (`LocalSpec`)"""


def read_yaml_for(path: Path, what: str, cls: type) -> dict:
    """A YAML file's mapping, refusing keys that are not fields of the dataclass `cls` (named)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{what} {str(path)!r}: unknown keys {unknown}; known: {sorted(known)}")
    return raw


def _section(raw: dict, key: str, cls: type) -> Any:
    """The spec's `key:` mapping as a `cls`, refusing keys that are not its fields (named)."""
    sec = raw.pop(key, None)
    if sec is None:
        return None
    bad = sorted(set(sec) - set(cls.__dataclass_fields__))
    if bad:
        raise ValueError(f"sweep spec {key}: unknown keys {bad}; known: {sorted(cls.__dataclass_fields__)}")
    return cls(**sec)


def load_spec(path: Path) -> SweepSpec:
    raw = read_yaml_for(path, "sweep spec", SweepSpec)
    missing = [k for k in ("name", "base_config", "total_steps") if k not in raw]
    if missing:
        raise ValueError(f"sweep spec {str(path)!r} lacks {missing}")
    sft, rep = _section(raw, "sft", SFTGrid), _section(raw, "report", ReportSpec)
    if rep is not None and rep.kind not in ("findings", "methods"):
        raise ValueError(f"sweep spec report.kind must be findings or methods, got {rep.kind!r}")
    synth, local = _section(raw, "synth_replay", SynthReplaySpec), _section(raw, "local", LocalSpec) or LocalSpec()
    prep = [_prep_step(p) for p in raw.pop("prep", None) or []]
    _check_local(local)
    spec = SweepSpec(**raw, sft=sft, report=rep, synth_replay=synth, local=local, prep=prep)
    spec.base_config = Path(spec.base_config)
    check_seeds(spec.seeds, "seeds (pretraining)")
    if spec.sft is not None:
        check_seeds(spec.sft.seeds, "sft.seeds")
    return spec


def _prep_step(raw: Any) -> PrepStep:
    known = sorted(PrepStep.__dataclass_fields__)
    if not isinstance(raw, dict):
        raise ValueError(f"sweep spec prep: {raw!r} is not a mapping; a step is {{name, command, creates, args}}")
    bad, missing = sorted(set(raw) - set(known)), [k for k in ("name", "command", "creates") if not raw.get(k)]
    if bad or missing:
        raise ValueError(f"sweep spec prep step {raw}: " + (f"unknown keys {bad}; " if bad else "")
                         + (f"lacks {missing}; " if missing else "") + f"known: {known}")
    from litgpt_ext.cli import COMMANDS

    if raw["command"] not in COMMANDS:
        raise ValueError(f"sweep spec prep step {raw['name']!r}: command {raw['command']!r} is not a litgpt-ext command;"
                         f" commands: {', '.join(sorted(COMMANDS))}")
    if not isinstance(raw.get("args") or {}, dict):
        raise ValueError(f"sweep spec prep step {raw['name']!r}: args must be a mapping of the command's arguments")
    return PrepStep(name=str(raw["name"]), command=str(raw["command"]), creates=Path(raw["creates"]),
                    args=dict(raw.get("args") or {}))


def _check_local(local: LocalSpec) -> None:
    for key, value, lo in (("workers", local.workers, 1), ("threads", local.threads, 1)):
        if value is None and key == "threads":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"sweep spec local.{key} must be an integer >= {lo}, got {value!r}")


def check_seeds(seeds: Any, what: str) -> None:
    """A list of distinct integer seeds: a repeated seed would plan two jobs into one output folder."""
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ValueError(f"sweep spec {what}: expected a non-empty list of integers, got {seeds!r}")
    dup = sorted({x for x in seeds if seeds.count(x) > 1})
    if dup:
        raise ValueError(f"sweep spec {what}: seed {', '.join(map(str, dup))} is given more than once in {seeds}; "
                         "each seed is one run (one output folder)")


def _set(cfg: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def _get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node = cfg
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def mix_string(replay: str, domain: str, weight: float) -> str:
    if weight == 1.0:
        return f"{domain}:1.0"
    return f"{replay}:{1 - weight:g},{domain}:{weight:g}"


@dataclass
class Arm:
    """One midtraining arm of a study (a sweep's `grid`/`arms`, reproduce's `arms`): fork the base run
    of each of its pretraining seeds at `start` and train on `replay:(1-weight),domain:weight`."""

    name: str
    """The arm's family name (its runs are `<name>_seed<pretraining seed>`); default `<domain>_w<weight>_at<start>`"""
    domain: str
    start: int
    weight: float
    seeds: Optional[list[int]] = None
    """Pretraining seeds this arm runs under (None: the study's default: every seed for a sweep, the first for reproduce)"""
    tasks: Optional[list[str]] = None
    """SFT tasks of this arm (reproduce; a sweep fine-tunes every arm on every task)"""
    role: str = "mid"
    """mid | cpt | cross | ablation: which findings the arm feeds (ablation: the results table only)"""
    match_tokens_of: Optional[str] = None
    """The arm whose domain tokens this one matches (`start` is derived: a token-matched CPT control)"""
    mix: Optional[str] = None
    """An explicit mix (`main:0.5,synth:0.3,math:0.2`) instead of replay:(1-weight),domain:weight; `weight`
    is then the domain's share of it"""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted-key overrides of this arm's runs only (after arm_overrides), e.g. a method's knobs:
    {regularizer.type: ewc, optimizer.layer_lr_decay: 0.8}; in a string value `${fork_from}` is the run's
    fork checkpoint (its pretraining seed's base run at `start`: EWC's reference)"""


ARM_KEYS = tuple(Arm.__dataclass_fields__)


def arm_of(raw: dict, what: str = "sweep arm") -> Arm:
    """An arm from its YAML mapping: unknown and missing keys named; the default name and role
    (cpt at weight 1.0, else mid) filled; `start` may wait for `match_tokens_of`."""
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {raw!r} is not a mapping; an arm is {{domain, start, weight[, name, seeds, role, tasks]}}")
    bad = sorted(set(raw) - set(ARM_KEYS))
    if bad:
        raise ValueError(f"{what} {raw}: unknown keys {bad}; known: {sorted(ARM_KEYS)}")
    raw = dict(raw)
    if raw.get("mix") is not None and raw.get("weight") is None:  # the domain's share of the explicit mix
        from litgpt_ext.data.mix_spec import parse_weights_str

        w = parse_weights_str(str(raw["mix"]), f"{what} mix")
        if raw.get("domain") not in w:
            raise ValueError(f"{what} {raw}: its mix {raw['mix']!r} has no {raw.get('domain')!r} (the arm's domain); "
                             f"types in it: {sorted(w)}")
        raw["weight"] = w[raw["domain"]] / sum(w.values())
    if not isinstance(raw.get("overrides", {}), dict):
        raise ValueError(f"{what} {raw}: overrides must be a mapping of dotted config keys to values")
    need = ("domain", "weight") + (() if raw.get("match_tokens_of") is not None else ("start",))
    missing = [k for k in need if raw.get(k) is None]
    if missing:
        raise ValueError(f"{what} {raw} lacks {missing}")
    try:
        weight = float(raw["weight"])
        start = None if raw.get("start") is None else int(raw["start"])
    except (TypeError, ValueError):
        raise ValueError(f"{what} {raw}: weight must be a number and start an integer step") from None
    if not (0 < weight <= 1):
        raise ValueError(f"{what} {raw}: weight must be in (0, 1], got {raw['weight']}")
    role = raw.get("role") or ("cpt" if weight == 1.0 else "mid")
    if role not in ROLES:
        raise ValueError(f"{what} {raw}: role must be one of {', '.join(ROLES)} (what the report's findings use it"
                         f" for), got {role!r}")
    seeds = raw.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(x, int) for x in seeds)):
        raise ValueError(f"{what} {raw}: seeds must be a list of pretraining seeds (integers), got {seeds!r}")
    arm = Arm(name=str(raw.get("name") or ""), domain=str(raw["domain"]), start=start, weight=weight,
              seeds=None if seeds is None else list(seeds),
              tasks=None if raw.get("tasks") is None else list(raw["tasks"]), role=role,
              match_tokens_of=None if raw.get("match_tokens_of") is None else str(raw["match_tokens_of"]),
              mix=None if raw.get("mix") is None else str(raw["mix"]), overrides=dict(raw.get("overrides") or {}))
    if not arm.name and arm.start is not None:
        arm.name = f"{arm.domain}_w{arm.weight:g}_at{arm.start}"
    return arm


def arm_family(a: Arm) -> str:
    """An arm's name without the pretraining seed (its seeds' runs are one family: a soup's ingredients)."""
    return a.name


def arm_name(a: Arm, seed: int) -> str:
    return f"{arm_family(a)}_seed{seed}"


def split_run_name(name: str) -> tuple[str, int]:
    """`arm_name`'s inverse: "math_mid_seed42" -> ("math_mid", 42); the one place a run name is parsed."""
    family, sep, seed = name.rpartition("_seed")
    if not sep or not seed.isdigit():
        raise ValueError(f"run name {name!r} does not end in _seed<N> (names are <arm family>_seed<pretraining seed>)")
    return family, int(seed)


def domain_steps(a: Arm, total_steps: int) -> float:
    """Optimizer steps' worth of the arm's domain data: weight x (total - start)."""
    return float(a.weight) * (total_steps - int(a.start))


def matched_start(a: Arm, arms: dict[str, Arm], total_steps: int) -> int:
    """The start at which `a` sees as much of its domain as the arm it names in `match_tokens_of`
    (a token-matched continued-pretraining control: weight 1.0 from total - w_ref x (total - start_ref))."""
    ref = arms.get(str(a.match_tokens_of))
    if ref is None:
        raise ValueError(f"sweep arm {a.name or a.domain!r}: match_tokens_of={a.match_tokens_of!r} names no arm with"
                         f" a start; arms: {sorted(arms)}")
    if ref.domain != a.domain:
        raise ValueError(f"sweep arm {a.name or a.domain!r}: match_tokens_of={a.match_tokens_of!r} trains on"
                         f" {ref.domain!r}, not {a.domain!r}; token matching compares one domain's tokens")
    start = total_steps - round(domain_steps(ref, total_steps) / float(a.weight))
    if not 0 < start < total_steps:
        raise ValueError(f"sweep arm {a.name or a.domain!r}: matching {domain_steps(ref, total_steps):.0f} steps of"
                         f" {a.domain} at weight {a.weight} needs a start of {start}, outside (0, total_steps={total_steps})")
    return start


def plan_arms(spec: SweepSpec) -> list[Arm]:
    """Every arm of a sweep (its grid's product, then its explicit arms), each checked and named."""
    raws: list[dict] = []
    if spec.grid:
        bad = sorted(set(spec.grid) - {"domain", "start", "weight"})
        if bad:
            raise ValueError(f"sweep grid: unknown dimensions {bad}; the grid spans domain, start, weight")
        missing = [k for k in ("domain", "start", "weight") if not spec.grid.get(k)]
        if missing:
            raise ValueError(f"sweep grid lacks values for {missing}")
        for d, s, w in itertools.product(spec.grid["domain"], spec.grid["start"], spec.grid["weight"]):
            raws.append({"domain": d, "start": s, "weight": w})
    raws += [dict(a) if isinstance(a, dict) else a for a in spec.arms]
    arms = [arm_of(r) for r in raws]
    by_name = {a.name: a for a in arms if a.match_tokens_of is None}
    for a in arms:
        if a.match_tokens_of is not None:
            a.start = matched_start(a, by_name, spec.total_steps)
            a.name = a.name or f"{a.domain}_w{a.weight:g}_at{a.start}"
    for a in arms:
        if not (0 < int(a.start) < spec.total_steps):
            raise ValueError(f"sweep arm {a.name}: start must be in (0, total_steps={spec.total_steps}), got {a.start}")
        unknown = sorted(set(a.seeds or []) - set(spec.seeds))
        if unknown:
            raise ValueError(f"sweep arm {a.name}: seeds {unknown} are not pretraining seeds of the sweep {list(spec.seeds)}")
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"sweep: duplicate arms {dup} (two arms with one name would write one output folder);"
                         " give each a distinct name")
    return arms
