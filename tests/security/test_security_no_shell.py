"""Nothing from a job spec reaches a shell: workers run the declared entry point with spec data as data."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from common.spec import JobSpec, SpecError

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("agent", "controller", "trainer")
SHELL_CALLS = {
    ("os", "system"), ("os", "popen"), ("os", "execlp"), ("os", "execvp"), ("os", "execvpe"), ("os", "execlpe"),
    ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"), ("asyncio", "create_subprocess_shell"),
}


def _shell_uses(path: Path, root: Path = REPO) -> list[str]:
    """Calls that run a shell or search PATH for an arbitrary program, by line."""
    found = []
    where = path.relative_to(root)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if (func.value.id, func.attr) in SHELL_CALLS:
                found.append(f"{where}:{node.lineno} {func.value.id}.{func.attr}")
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{where}:{node.lineno} shell={ast.unparse(kw.value)}")
    return found


def test_no_service_code_runs_a_shell():
    files = [p for part in SCANNED for p in (REPO / part).rglob("*.py")]
    assert any(p.match("agent/supervisor.py") for p in files), "the agent's launch code moved: update this test"
    uses = [use for path in files for use in _shell_uses(path)]
    assert uses == []


def test_the_scanner_does_catch_shell_use(tmp_path):
    bad = tmp_path / "sample.py"
    bad.write_text("import os, subprocess\nos.system('x')\nsubprocess.run('x', shell=True)\n"
                   "subprocess.run(['x'], shell=False)\n")
    assert [u.split(" ", 1)[1] for u in _shell_uses(bad, tmp_path)] == ["os.system", "shell=True"]


def test_workers_run_the_fixed_entry_point_with_spec_values_in_env_only():
    from agent.supervisor import default_worker_command

    assert default_worker_command() == [sys.executable, "-m", "trainer.worker"]
    source = (REPO / "agent" / "supervisor.py").read_text()
    tree = ast.parse(source)
    launches = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                and n.func.attr in ("create_subprocess_exec", "Popen", "run", "call", "check_call")]
    assert launches, "no process launch found in agent/supervisor.py"
    # argv is built from the configured worker command (plus the agent's own pid for the
    # parent-death wrapper) and nothing else: no plan, spec or assignment value is spliced in.
    allowed = {"self", "self.worker_command", "os", "os.getpid", "sys", "sys.executable",
               "with_parent_death_signal"}
    for call in launches:
        used = {ast.unparse(n) for arg in call.args for n in ast.walk(arg) if isinstance(n, (ast.Name, ast.Attribute))}
        assert "self.worker_command" in used and used <= allowed, f"line {call.lineno}: argv uses {sorted(used)}"


@pytest.mark.parametrize("name", [
    "$(rm -rf /)", "`id`", "a;reboot", "a && b", "a|b", "../../etc/passwd", "a/b", "a b", "a\nb", "-rf",
    "job-", "UPPER", "", "x" * 64, "名前", "a\x00b", "${IFS}", "a'b", 'a"b',
])
def test_hostile_job_names_are_refused(name):
    with pytest.raises(SpecError, match="^name:"):
        JobSpec.from_dict({"name": name})


def test_other_spec_strings_are_bounded_and_enumerated():
    with pytest.raises(SpecError, match="^model.arch:"):
        JobSpec.from_dict({"model": {"arch": "gpt; rm -rf /"}})
    with pytest.raises(SpecError, match="^resources.device:"):
        JobSpec.from_dict({"resources": {"device": "$(reboot)"}})
    with pytest.raises(SpecError, match="^elastic.snapshot_every:"):
        JobSpec.from_dict({"elastic": {"snapshot_every": "1; id"}})
    with pytest.raises(SpecError, match="longer than"):
        JobSpec.from_dict({"data": {"kind": "tokens", "path": "p" * 5000}})


@pytest.mark.parametrize("field, value", [("optimizer.lr", "inf"), ("optimizer.weight_decay", "nan"),
                                          ("optimizer.grad_clip", float("nan")), ("model.dropout", "-inf")])
def test_non_finite_numbers_are_refused(field, value):
    """NaN slips past every `< 0` check and inf cannot be stored as JSON (both found by the fuzzer)."""
    section, name = field.split(".")
    with pytest.raises(SpecError, match=f"^{field}: must be a finite number"):
        JobSpec.from_dict({section: {name: value}})
