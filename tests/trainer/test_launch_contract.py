"""The worker launch contract: every variable named once (protos/launch.py), parsed once
(trainer.settings.WorkerSettings.from_env) with a clear error naming the variable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from protos import launch
from trainer.settings import ElasticSettings, WorkerSettings
from trainer.telemetry import TelemetrySettings

REPO = Path(__file__).resolve().parents[2]


def test_every_name_is_defined_once_with_a_docstring():
    tree = ast.parse((REPO / "protos" / "launch.py").read_text())
    body = tree.body
    documented = {}
    for stmt, after in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
            documented[stmt.targets[0].id] = (stmt.value.value, doc)
    assert documented, "protos/launch.py defines no names"
    values = [value for value, _ in documented.values()]
    assert len(values) == len(set(values)), "a variable name is defined twice"
    assert sorted(values) == sorted(launch.ALL)
    for const, (value, doc) in documented.items():
        assert value.startswith("TENAX_") and doc.strip(), f"{const}: no docstring"
    # protos is the bottom layer: it imports nothing of ours
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(getattr(n, "module", "") == "__future__" for n in imports)


def test_defaults_without_any_variable():
    s = WorkerSettings.from_env({})
    assert (s.rank, s.launch_file, s.plan_file, s.ready_file) == (None, "", "", "")
    assert (s.store_timeout_s, s.collective_timeout_s, s.plan_wait_s, s.prepare_wait_s, s.heartbeat_s) == (
        30.0, 60.0, 60.0, 300.0, 1.0)
    assert (s.elastic, s.snapshots, s.telemetry, s.compile, s.backend) == (True, True, True, "auto", "")
    assert (s.p2p_staging, s.snapshot_buffers) == ("auto", 3)
    assert WorkerSettings.from_env({launch.SNAPSHOT_BUFFERS: "2"}).snapshot_buffers == 2
    with pytest.raises(ValueError, match=launch.SNAPSHOT_BUFFERS):
        WorkerSettings.from_env({launch.SNAPSHOT_BUFFERS: "1"})


def test_values_are_parsed_and_empty_means_unset():
    env = {launch.RANK: "3", launch.LAUNCH_FILE: "/l.json", launch.PLAN_FILE: "/p.json", launch.READY_FILE: "",
           launch.PLAN_WAIT_S: "2.5", launch.ELASTIC: "0", launch.SNAPSHOTS: "0", launch.TELEMETRY: "1",
           launch.COMPILE: "0", launch.BACKEND: "gloo", launch.FAULT: "rank=1,kind=kill", launch.RUN_DIR: "/r",
           launch.HEARTBEAT_S: "0.25", launch.GROWTH_ID: "g1"}
    s = WorkerSettings.from_env(env)
    assert (s.rank, s.launch_file, s.plan_file, s.ready_file, s.plan_wait_s) == (3, "/l.json", "/p.json", "", 2.5)
    assert (s.elastic, s.snapshots, s.telemetry, s.compile, s.backend) == (False, False, True, "0", "gloo")
    assert (s.faults, s.growth_id) == ("rank=1,kind=kill", "g1")
    telemetry = TelemetrySettings.from_worker(s)
    assert (telemetry.enabled, telemetry.heartbeat_s, telemetry.control_dir) == (True, 0.25, "/r")
    elastic = ElasticSettings.from_worker(s, snapshot_every="auto", checkpoint_every=5)
    assert (elastic.plan_wait_s, elastic.transfer_timeout_s, elastic.snapshots, elastic.run_dir) == (2.5, 60.0, False, "/r")


@pytest.mark.parametrize("name, raw, message", [
    (launch.STORE_TIMEOUT_S, "soon", "TENAX_STORE_TIMEOUT_S must be a number of seconds, got 'soon'"),
    (launch.COLLECTIVE_TIMEOUT_S, "0", "TENAX_COLLECTIVE_TIMEOUT_S must be > 0"),
    (launch.PLAN_WAIT_S, "-1", "TENAX_PLAN_WAIT_S must be > 0"),
    (launch.PREPARE_WAIT_S, "inf", "TENAX_PREPARE_WAIT_S must be > 0"),
    (launch.HEARTBEAT_S, "nan", "TENAX_HEARTBEAT_S must be > 0"),
    (launch.ELASTIC, "no", "TENAX_ELASTIC must be one of 0, 1"),
    (launch.SNAPSHOTS, "off", "TENAX_SNAPSHOTS must be one of 0, 1"),
    (launch.TELEMETRY, "yes", "TENAX_TELEMETRY must be one of 0, 1"),
    (launch.COMPILE, "2", "TENAX_COMPILE must be one of auto, 0, 1"),
    (launch.BACKEND, "mpi", "TENAX_BACKEND must be one of gloo, nccl"),
    (launch.RANK, "-1", "TENAX_RANK='-1' is not a rank"),
])
def test_a_bad_value_is_an_error_naming_the_variable(name, raw, message):
    with pytest.raises(ValueError) as exc:
        WorkerSettings.from_env({name: raw})
    assert message in str(exc.value)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string statements (module, class, function and attribute docstrings)."""
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            out |= {id(stmt.value) for stmt in body
                    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)}
    return out


def test_no_contract_name_is_spelled_out_in_the_trainer():
    """Outside docstrings, ``TENAX_`` appears in no string of trainer/ (names come from protos/launch.py)."""
    found = []
    for path in sorted((REPO / "trainer").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        found += [f"{path.name}:{n.lineno}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and "TENAX_" in n.value
                  and id(n) not in docs]
    assert found == []
