"""The import layering (.importlinter) holds on this tree, and the check bites.

`make test` runs lint-imports before pytest; this runs it again from the suite, then proves each
contract still refuses what it exists to refuse: a copy of our packages with one forbidden import
added must fail, naming that import, where the unchanged copy does not. Weakening a contract (or
dropping it) fails here.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CONFIG = REPO / ".importlinter"
PACKAGES = ("protos", "common", "controller", "agent", "trainer", "cli")
CONTRACTS = ("layers", "protos-self-contained", "common-on-protos-only", "acyclic")

pytestmark = pytest.mark.timeout(120)


def lint_imports(root: Path, *args: str) -> subprocess.CompletedProcess:
    """lint-imports (the same entry point as the console script) over the packages under `root`, with
    this repo's config and only `root` on the import path, so a copy is checked and not the repo."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code, "--no-cache", "--no-logo", *args, str(CONFIG)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_tree_keeps_every_import_contract():
    result = lint_imports(REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"Contracts: 4 kept, 0 broken", output), output


@pytest.fixture(scope="module")
def clean_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


# (contract, {file: source} added to the copy, what the broken contract must name)
BITES = {
    "sibling imports sibling": ("layers", {"agent/x.py": "import controller\n"},
                                r"agent is not allowed to import controller:\s+-\s+agent\.x -> controller \(l\.1\)"),
    "sibling imports cli": ("layers", {"trainer/x.py": "from cli import main\n"},
                            r"trainer is not allowed to import cli:\s+-\s+trainer\.x -> cli(\.main)? \(l\.1\)"),
    "common imports a part": ("common-on-protos-only", {"common/x.py": "import controller.decisions\n"},
                              r"common is not allowed to import controller:\s+-\s+common\.x -> controller\.decisions \(l\.1\)"),
    "protos imports common": ("protos-self-contained", {"protos/x.py": "from common import layout\n"},
                              r"protos is not allowed to import common:\s+-\s+protos\.x -> common(\.layout)? \(l\.1\)"),
    "a cycle inside a package": ("acyclic", {"agent/_cycle_a.py": "from agent import _cycle_b\n",
                                             "agent/_cycle_b.py": "from agent import _cycle_a\n"},
                                 r"No cycles are allowed in agent\.\n.*\n\s*- \._cycle_[ab] -> \._cycle_[ab] "),
}


@pytest.mark.parametrize("contract, added, named", BITES.values(), ids=BITES.keys())
def test_a_forbidden_import_added_to_a_copy_breaks_its_contract(clean_copy, tmp_path, contract, added, named):
    assert contract in CONTRACTS
    bitten = tmp_path / "bitten"
    shutil.copytree(clean_copy, bitten)
    for name, source in added.items():
        (bitten / name).write_text(source)

    before = lint_imports(clean_copy, "--contract", contract)
    after = lint_imports(bitten, "--contract", contract)
    before_out, after_out = before.stdout + before.stderr, after.stdout + after.stderr

    assert not re.search(named, before_out), before_out
    assert after.returncode != 0, after_out
    assert re.search(named, after_out), after_out
