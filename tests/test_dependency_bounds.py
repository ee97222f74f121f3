"""pyproject's lower bounds are true: each equals the version the tests ran with (the pins in
constraints-tested.txt / constraints-cpu.txt, which `make test` installs), so no bound claims an
untested version (litgpt>=0.5.8 once did; 0.5.11 lacks Config.n_expert_groups and MoE fails)."""

import re
import sys
from importlib.metadata import PackageNotFoundError, version

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import ROOT


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, Version]:
    pins = {}
    for f in ("constraints-tested.txt", "constraints-cpu.txt"):
        for line in (ROOT / f).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                name, _, v = line.partition("==")
                pins[_norm(name)] = Version(v.split("+")[0])
    return pins


def test_every_lower_bound_is_the_tested_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [(Requirement(r), None) for r in project["dependencies"]]
    reqs += [(Requirement(r), name) for name, extra in project["optional-dependencies"].items() for r in extra]
    pins, wrong = _pins(), []
    for req, extra in reqs:
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        pin = pins.get(_norm(req.name))
        if len(lows) != 1 or pin is None or lows[0] != pin:
            wrong.append(f"{req} (tested: {pin or 'not pinned'})")
        # what is installed here must satisfy the bound too (the tests ran with it); an extra that
        # `make install` does not install (lint: ruff arrives with `make lint`) may be absent
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            assert extra not in (None, "test"), f"{req} (a required or test dependency) is not installed"
            continue
        assert req.specifier.contains(Version(installed.split("+")[0]), prereleases=True), req
    assert not wrong, "lower bounds that are not the tested version: " + ", ".join(wrong)
    floor = Version(project["requires-python"].removeprefix(">="))
    assert sys.version_info[:2] >= (floor.major, floor.minor)
