"""The `tenax` command: the one user entry point, and the only package that may
import every part (controller, agent, trainer) — see the README's architecture.

Each module here registers its own subcommands (``register(subparsers)``), so
this file only wires them together:

* cli/controller.py   controller
* cli/client.py       submit, jobs, job, nodes, cancel, logs
* cli/chaos.py        chaos
* cli/local.py        up, down, demo
* cli/agent.py        agent
* cli/train_local.py  train-local
* cli/security.py     audit, tokens, certs
* cli/export.py       export
* cli/data.py         data

Controller address resolution for client commands: ``--controller``, else
``TENAX_CONTROLLER``, else the local cluster recorded by ``tenax up``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Each module's `register` adds its subcommands; each subcommand sets `func`
# (args -> exit code). Order is the order of `tenax --help`.
COMMANDS = {
    "controller": "controller",
    **dict.fromkeys(("submit", "jobs", "job", "events", "nodes", "cordon", "uncordon", "drain", "cancel", "logs"),
                    "client"),
    "up": "local", "down": "local", "demo": "demo", "agent": "agent", "train-local": "train_local",
    **dict.fromkeys(("audit", "tokens", "certs"), "security"),
    "chaos": "chaos", "export": "export", "data": "data", "diagnose": "diagnose",
}
"""Subcommand -> the cli module that registers it. A command imports only its own module: `tenax job`
does not load the controller server, nor `tenax agent` the controller (every CLI call and every agent
or controller start is that much cheaper). tests/cli/test_cli_main.py keeps it equal to what the
modules register."""

_PARTS = tuple(dict.fromkeys(COMMANDS.values()))
"""The cli modules, in the order of `tenax --help`."""


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (None: none, or help asked before it)."""
    for arg in argv:
        if arg in ("-h", "--help"):
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `tenax` parser: every subcommand, or only ``command``'s module's when it is a known one."""
    parser = argparse.ArgumentParser(prog="tenax", description="Fault-tolerant elastic training cluster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (COMMANDS[command],) if command in COMMANDS else _PARTS:
        importlib.import_module(f"cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
