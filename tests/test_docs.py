"""The README and docs/*.md name only things that exist.

What is checked, in README.md and every docs/*.md:

(a) links: every relative link target (`[text](path)`, `[text](path#anchor)`, `[id]: path`) exists,
    relative to the page; an `#anchor` into a Markdown page (or the page itself) must be one of its
    headings, slugged as GitHub does. Links with a scheme (`https:`, `mailto:`) are not followed.
(b) repository paths: in code (inline `code` spans and fenced blocks), every path whose *first
    component* is one of the source folders in REPO_DIRS (midtrain_configs/, training_scripts/,
    util_scripts/, data_prep/, benchmarks/, litgpt_ext/, docs/, tests/, .ci/) exists; a trailing `/`
    means a folder, `{a,b}` is expanded as in bash, and `*` must match at least one file.
    The rule for outputs: a path that starts anywhere else (runs/, data/, out/, logs/, results/,
    checkpoints/, corpus/, <placeholders>, …) is something a command writes or the reader brings,
    and is never checked; so is a path that is a suffix of a longer one (`runs/x/tests/…`). A path
    is cut at the first placeholder character (`<`, `…`) and the part before it is checked.
(c) commands: every `litgpt-ext <command>` / `python -m litgpt_ext <command>` in code names a command
    of `litgpt_ext.cli.COMMANDS` (`litgpt-ext --help` and `litgpt-ext <command>` are not commands).
(d) make targets: every `make <target>` in code (at the start of a command: a line, an inline span,
    or after `;`, `&&`, `|`, `(`) is a rule of the Makefile.
(e) modules: every dotted `litgpt_ext.a.b[.Name]` in code is a module or package under litgpt_ext/,
    optionally followed by a name that its source mentions.
(f) the README stays a front door: at most README_MAX_LINES lines, it links to every docs page, and
    its layout map (the fenced block under "## Layout") names only folders and files that exist and
    has an entry for every folder of REPO_DIRS and every package under litgpt_ext/.

Prose outside code is not searched for (b)-(e): words like "make" and "lists" are English there.
Only `litgpt_ext.cli` is imported (it is light: no torch; checked below), so this runs in well
under a second.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

from litgpt_ext.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
REPO_DIRS = ("midtrain_configs", "training_scripts", "util_scripts", "data_prep", "benchmarks", "litgpt_ext",
             "docs", "tests", ".ci")
README_MAX_LINES = 200

FENCE = re.compile(r"^ {0,3}(```|~~~)[^\n]*\n(.*?)^ {0,3}\1[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
PATH = re.compile(r"(?<![\w./$~-])((?:" + "|".join(re.escape(d) for d in REPO_DIRS) + r")/(?:[\w.*+@~-]|/|\{[^}\s]*\})*)")
COMMAND = re.compile(r"(?:(?<![\w/-])litgpt-ext|(?<![\w-])-m\s+litgpt_ext)[ \t]+(?:\\\n\s*)?([A-Za-z][\w-]*)")
MAKE = re.compile(r"(?:^|[;|(]|&&)[ \t]*(?:\$[ \t]+)?make((?:[ \t]+[^\s;|&)]+)*)", re.M)
MODULE = re.compile(r"(?<![\w./-])litgpt_ext((?:\.[A-Za-z_]\w*)+)")


def split_markdown(text: str) -> tuple[str, list[str]]:
    """(prose with code removed, code snippets: fenced blocks and inline spans)."""
    code = [m.group(2) for m in FENCE.finditer(text)]
    rest = FENCE.sub("\n", text)
    code += [m.group(2) for m in INLINE.finditer(rest)]
    return INLINE.sub(" ", rest), code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("\n", text)):
        s = slug(m.group(2))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def link_problems(text: str, page: Path) -> list[str]:
    prose, _ = split_markdown(text)
    targets = [m.group(1) for m in LINK.finditer(prose)] + [m.group(1) for m in REF_LINK.finditer(prose)]
    problems = []
    for target in targets:
        if re.match(r"^[A-Za-z][\w+.-]*:", target):  # https:, mailto:, …: not ours to check
            continue
        path_part, _, anchor = target.partition("#")
        if not path_part:  # `#anchor`: a heading of this page
            if anchor not in anchors(text):
                problems.append(f"link to {target!r}: no heading with anchor #{anchor} on this page")
            continue
        dest = (page.parent / path_part).resolve()
        if not dest.exists():
            problems.append(f"link to {target!r}: {dest} does not exist")
            continue
        if anchor and dest.suffix == ".md" and dest.is_file():
            if anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"link to {target!r}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def _expand_braces(path: str) -> list[str]:
    parts = re.split(r"(\{[^}]*\})", path)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(c) for c in itertools.product(*choices)]


def repo_paths(code: list[str]) -> set[str]:
    found = set()
    for snippet in code:
        for m in PATH.finditer(snippet):
            found.add(m.group(1).rstrip(".,:;"))
    return found


def path_problems(text: str, root: Path = ROOT) -> list[str]:
    _, code = split_markdown(text)
    problems = []
    for path in sorted(repo_paths(code)):
        for p in _expand_braces(path):
            if "*" in p:
                ok = any(root.glob(p.rstrip("/")))
            else:
                target = root / p
                ok = target.is_dir() if p.endswith("/") else target.exists()
            if not ok:
                problems.append(f"path `{p}` does not exist in the repository")
    return problems


def named_commands(code: list[str]) -> set[str]:
    return {m.group(1) for snippet in code for m in COMMAND.finditer(snippet)}


def command_problems(text: str) -> list[str]:
    _, code = split_markdown(text)
    return [f"`litgpt-ext {c}` is not a command (litgpt_ext/cli.py COMMANDS: {', '.join(COMMANDS)})"
            for c in sorted(named_commands(code) - set(COMMANDS))]


def makefile_targets(makefile: Path = ROOT / "Makefile") -> set[str]:
    targets = set()
    for line in makefile.read_text(encoding="utf-8").splitlines():
        if line.startswith(("\t", "#", " ")) or ":" not in line:
            continue
        head, _, after = line.partition(":")
        if after.startswith("=") or "=" in head:  # `X := y`, `X ?= y`: variables, not rules
            continue
        targets.update(t for t in head.split() if not t.startswith((".", "$")))
    return targets


def named_make_targets(code: list[str]) -> set[str]:
    found = set()
    for snippet in code:
        for m in MAKE.finditer(snippet):
            words = [w for w in m.group(1).split() if not w.startswith("-") and "=" not in w]
            if words and re.fullmatch(r"[\w.-]+", words[0]):  # not `# comment`, not `<target>`
                found.add(words[0])
    return found


def make_problems(text: str, makefile: Path = ROOT / "Makefile") -> list[str]:
    _, code = split_markdown(text)
    targets = makefile_targets(makefile)
    return [f"`make {t}`: no such target in the Makefile (targets: {', '.join(sorted(targets))})"
            for t in sorted(named_make_targets(code) - targets)]


def module_problems(text: str, root: Path = ROOT) -> list[str]:
    _, code = split_markdown(text)
    problems = []
    names = {m.group(1) for snippet in code for m in MODULE.finditer(snippet)}
    for dotted in sorted(names):
        parts = dotted.strip(".").split(".")
        where, source = root / "litgpt_ext", None
        i = 0
        while i < len(parts) and ((where / parts[i]).is_dir() or (where / f"{parts[i]}.py").is_file()):
            where = where / parts[i]
            i += 1
        module_file = where / "__init__.py" if where.is_dir() else where.with_suffix(".py")
        if where.is_dir() and not module_file.is_file():
            problems.append(f"`litgpt_ext{dotted}`: {where.relative_to(root)} is not a package")
            continue
        rest = parts[i:]
        if rest:
            source = module_file.read_text(encoding="utf-8")
            if not re.search(rf"\b{re.escape(rest[0])}\b", source):
                kind = "no module or name" if where.is_dir() else "no name"
                problems.append(f"`litgpt_ext{dotted}`: {module_file.relative_to(root)} has {kind} {rest[0]!r}")
    return problems


@pytest.fixture(params=DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def page(request) -> tuple[Path, str]:
    return request.param, request.param.read_text(encoding="utf-8")


def test_docs_exist():
    assert len(DOC_FILES) > 1, "docs/*.md: no pages"


def test_links_resolve(page):
    path, text = page
    problems = link_problems(text, path)
    assert not problems, "\n".join(problems)


def test_repo_paths_exist(page):
    _, text = page
    problems = path_problems(text)
    assert not problems, "\n".join(problems)


def test_commands_are_known(page):
    _, text = page
    problems = command_problems(text)
    assert not problems, "\n".join(problems)


def test_make_targets_exist(page):
    _, text = page
    problems = make_problems(text)
    assert not problems, "\n".join(problems)


def test_modules_exist(page):
    _, text = page
    problems = module_problems(text)
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_door():
    """At most README_MAX_LINES lines, and every docs page reachable from it."""
    text = README.read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/ (limit {README_MAX_LINES})"
    prose, _ = split_markdown(text)
    linked = {(README.parent / m.group(1).partition("#")[0]).resolve() for m in LINK.finditer(prose)}
    unlinked = [p.name for p in DOC_FILES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def layout_problems(readme_text: str, root: Path = ROOT) -> list[str]:
    """The README's layout map (the fenced block under "## Layout") against the tree.

    A line at indent 0 names a top-level path, one at indent 2 ending in `/` a folder inside the last
    top-level folder; deeper lines continue the entry above. Every entry exists, every `x.py`/`x.sh`/
    `x.yaml`/`x.md` and `x/` word in an entry's description exists inside it, and every package under
    litgpt_ext/ and every folder of REPO_DIRS has an entry.
    """
    section = readme_text.split("\n## Layout", 1)
    blocks = FENCE.findall(section[1]) if len(section) == 2 else []
    if not blocks:
        return ["README.md: no fenced layout map under '## Layout'"]
    problems, entries, top, entry = [], set(), None, None
    for line in blocks[0][1].splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        first, *desc = line.split(None, 1)
        if indent == 0:
            top = entry = root / first
        elif indent == 2 and first.endswith("/") and top is not None:
            entry = top / first
        else:
            desc = [line]
        if entry is None:
            continue
        if entry not in entries:
            entries.add(entry)
            if not entry.exists():
                problems.append(f"layout map: {entry.relative_to(root)} does not exist")
                continue
        if desc and entry.is_dir():
            for word in re.findall(r"(?<![\w/.-])([\w-]+(?:\.(?:py|sh|yaml|md)|/))(?=[\s,()]|$)", desc[0]):
                if not (entry / word).exists():
                    problems.append(f"layout map: {word} is not in {entry.relative_to(root)}/")
    listed = {e.resolve() for e in entries} | {e.parent.resolve() for e in entries if e.is_file()}  # `.ci/run`
    wanted = [root / d for d in REPO_DIRS] + [p.parent for p in (root / "litgpt_ext").glob("*/__init__.py")]
    problems += [f"layout map: no entry for {w.relative_to(root)}/" for w in sorted(wanted)
                 if w.exists() and w.resolve() not in listed]
    return problems


def test_layout_map_matches_the_tree():
    problems = layout_problems(README.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


def test_the_checks_can_fail():
    """Each check reports a deliberately broken page (so a green run means something)."""
    page = ROOT / "docs" / "_synthetic.md"
    text = ("# Title\n\nSee [gone](missing.md), [bad anchor](../README.md#no-such-heading), [ok](#title) "
            "[no anchor](#nothing) and [web](https://example.com/x.md).\n\n"
            "```bash\nlitgpt-ext pretrain --config midtrain_configs/demo/no_such.yaml --out_dir runs/x/tests/y\n"
            "litgpt-ext no-such-command --help\nmake no-such-target\n# make sure: not a command\n```\n\n"
            "Also `litgpt_ext/no_such_module.py`, `midtrain_configs/{demo,nowhere}/`, `litgpt_ext.train.no_such`, "
            "`litgpt_ext.data.NoSuchName` and `make test`.\n")
    links = link_problems(text, page)
    assert len(links) == 3 and "missing.md" in links[0] and "no-such-heading" in links[1] and "#nothing" in links[2], links
    paths = path_problems(text)
    assert {p.split("`")[1] for p in paths} == {"midtrain_configs/demo/no_such.yaml", "litgpt_ext/no_such_module.py",
                                                "midtrain_configs/nowhere/"}, paths
    assert named_commands(split_markdown(text)[1]) == {"pretrain", "no-such-command"}
    assert len(command_problems(text)) == 1 and "no-such-command" in command_problems(text)[0]
    assert named_make_targets(split_markdown(text)[1]) == {"no-such-target", "test"}
    assert len(make_problems(text)) == 1 and "no-such-target" in make_problems(text)[0]
    layout = layout_problems("# x\n\n## Layout\n\n```\nlitgpt_ext/   cli.py, gone.py\n  train/      loop.py\n"
                             "  nowhere/    x\nmidtrain_configs/  demo/, lost/\n```\n")
    for expected in ("gone.py is not in litgpt_ext/", "litgpt_ext/nowhere does not exist", "lost/ is not in midtrain_configs/",
                     "no entry for tests/", "no entry for litgpt_ext/checkpoint/"):
        assert f"layout map: {expected}" in layout, (expected, layout)
    assert not any("cli.py" in p or "loop.py" in p or "demo/ is not in" in p for p in layout), layout
    modules = module_problems(text)
    assert len(modules) == 2 and any("NoSuchName" in m for m in modules) and any("no_such'" in m for m in modules), modules


def test_parsers_on_real_constructs():
    assert slug("Post-training (SFT): `litgpt-ext sft` and `litgpt-ext sft-grid`") == \
        "post-training-sft-litgpt-ext-sft-and-litgpt-ext-sft-grid"
    assert slug("litgpt's and lm-eval's own CLIs") == "litgpts-and-lm-evals-own-clis"
    assert _expand_braces("midtrain_configs/{pretrain,midtrain}/") == ["midtrain_configs/pretrain/",
                                                                       "midtrain_configs/midtrain/"]
    code = ["python -m litgpt_ext.eval.interop lm-eval ...", ".venv/bin/python -m litgpt_ext sft --config x",
            "litgpt-ext <command> --help", "litgpt-ext", "PYTHONPATH=$PWD python benchmarks/gpu_throughput.py",
            "make install CONSTRAINTS=", "cd x && make -j2 demo", "make <target>", "runs/x/benchmarks/y"]
    assert named_commands(code) == {"sft"}
    assert named_make_targets(code) == {"install", "demo"}
    assert repo_paths(code) == {"benchmarks/gpu_throughput.py"}
    assert {"install", "demo", "test"} <= makefile_targets()


def test_cli_import_is_light():
    """This file imports litgpt_ext.cli for COMMANDS: it must not pull in torch or lightning."""
    out = subprocess.run([sys.executable, "-c", "import sys, litgpt_ext.cli; print(sorted(m for m in "
                          "('torch', 'lightning', 'litgpt', 'lm_eval', 'jsonargparse') if m in sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
