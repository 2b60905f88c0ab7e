"""requirements/lock.txt against pyproject.toml, the environment the tests run in, and the README's commands.

The lock is what CI and the Docker image install (as pip constraints); pyproject's ranges are what a user of the
package resolves. These tests keep the two in step: every range is closed above, the lock pins every package of
the dependency tree exactly, each pin lies inside its range, and the environment running these tests is the
locked one.
"""
from __future__ import annotations

import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
LOCKED_EXTRAS = ("dev",)  # the extras that refresh-lock.sh installs (flash-attn needs CUDA to build)


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _project_requirements(extras=LOCKED_EXTRAS) -> list[Requirement]:
    project = _pyproject()
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert m, f"lock.txt line {n} is not 'name==version': {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"lock.txt pins {name} twice"
        pins[name] = Version(m.group(2))
    return pins


def test_every_dependency_is_bounded_above():
    """A range open above lets a new major release send pip's resolver backtracking (datasets 5 needing
    huggingface-hub>=1 did, for hours): every requirement names an upper bound or an exact version."""
    open_ended = []
    for req in _project_requirements(extras=_pyproject()["optional-dependencies"]):
        if not any(s.operator in ("<", "<=", "==", "~=", "===") for s in req.specifier):
            open_ended.append(str(req))
    assert not open_ended, f"add an upper bound (the next release line) to: {open_ended}"


def test_lock_pins_every_project_dependency_inside_its_range():
    pins = _lock()
    problems = []
    for req in _project_requirements():
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name}: not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}: locked {pins[name]} is outside pyproject's '{req.specifier}'")
    assert not problems, "refresh the lock (bash requirements/refresh-lock.sh):\n" + "\n".join(problems)


def test_lock_closes_the_dependency_tree_of_this_environment():
    """Walk the installed dependency tree of mpt-forge[dev] (markers evaluated for this interpreter): every package
    on it is pinned in the lock, installed at the pinned version, and the pin meets every requirement on it."""
    pins = _lock()
    env = default_environment()
    problems: list[str] = []
    seen: set[str] = set()
    todo: list[tuple[Requirement, str]] = [(r, "pyproject.toml") for r in _project_requirements()]
    while todo:
        req, wanted_by = todo.pop()
        name = canonicalize_name(req.name)
        pin = pins.get(name)
        if pin is None:
            problems.append(f"{req.name} (needed by {wanted_by}) is not in the lock")
            continue
        if not req.specifier.contains(pin, prereleases=True):
            problems.append(f"{wanted_by} needs {req}, the lock pins {pin}")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} is locked but not installed")
            continue
        if Version(dist.version) != pin:
            problems.append(f"{req.name} {dist.version} is installed, the lock pins {pin}")
            continue
        for extra in req.extras or {""}:
            for dep in map(Requirement, dist.requires or []):
                if dep.marker is None or dep.marker.evaluate({**env, "extra": extra}):
                    todo.append((dep, f"{req.name} {pin}"))
    assert not problems, ("this environment does not match requirements/lock.txt; install with "
                          "`pip install -c requirements/lock.txt -e '.[dev]'`, or refresh the lock:\n"
                          + "\n".join(sorted(set(problems))))


def _readme_block(heading: str) -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split(f"## {heading}", 1)[1]
    return section.split("```bash", 1)[1].split("```", 1)[0].strip()


@pytest.mark.parametrize("heading", ["Quick start", "Tests"])
def test_ci_runs_the_readme_commands_as_written(heading):
    """.ci/run runs each step of the README's two commands, word for word (it adds only a time limit before the
    install and quiet/cache flags after it)."""
    ci_lines = [_words(line) for line in (REPO / ".ci" / "run").read_text().splitlines()]
    steps = [s.strip() for s in _readme_block(heading).split("&&")]
    assert len(steps) == 3, steps
    for step in steps:
        words = shlex.split(step)
        assert any(_contains(line, words) for line in ci_lines), f".ci/run does not run the README's `{step}`"


def _words(line: str) -> list[str]:
    """A shell line's words, [] for comments and lines that are not whole commands (an echo's continued string)."""
    if line.lstrip().startswith("#"):
        return []
    try:
        return shlex.split(line)
    except ValueError:
        return []


def _contains(line: list[str], words: list[str]) -> bool:
    return any(line[i:i + len(words)] == words for i in range(len(line) - len(words) + 1))
