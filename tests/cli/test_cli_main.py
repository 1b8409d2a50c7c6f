"""`tenax` dispatch: a subcommand imports only the cli module that registers it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli.main import _PARTS, COMMANDS, build_parser, command_of
from tests.conftest import REPO


def _subcommands(parser) -> set[str]:
    [sub] = [a for a in parser._actions if a.dest == "command"]
    return set(sub.choices)


def test_the_command_table_names_every_subcommand_of_every_module():
    assert _subcommands(build_parser()) == set(COMMANDS)
    assert set(COMMANDS.values()) == set(_PARTS)
    for command, module in COMMANDS.items():
        only = _subcommands(build_parser(command))
        assert command in only
        assert only == {c for c, m in COMMANDS.items() if m == module}, command


@pytest.mark.parametrize("argv, command", [
    ([], None), (["--help"], None), (["-v", "jobs"], "jobs"), (["job", "x", "--json"], "job"),
    (["-h", "job"], None), (["submit", "--help"], "submit"), (["nosuch"], "nosuch"),
])
def test_command_of(argv, command):
    assert command_of(argv) == command


def _modules_after(argv: list[str]) -> set[str]:
    code = ("import contextlib, io, json, sys\nfrom cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            f"    main({argv!r})\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_a_client_command_loads_neither_the_controller_nor_the_agent():
    loaded = _modules_after(["jobs", "--help"])
    assert "cli.client" in loaded
    assert not {"controller.server", "controller.health_loop", "agent.main", "cli.controller"} & loaded


def test_the_agent_command_does_not_load_the_controller_server():
    loaded = _modules_after(["agent", "--help"])
    assert "agent.main" in loaded and "controller.server" not in loaded


def test_help_and_unknown_commands_still_list_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        build_parser(command_of(["nosuch"])).parse_args(["nosuch"])
    err = capsys.readouterr().err
    assert "invalid choice" in err and "'train-local'" in err and "'submit'" in err
