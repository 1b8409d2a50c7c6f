"""The `tenax` command: the one user entry point.

Each part registers its own subcommands (``register(subparsers)``), so this
file only wires them together:

* controller/client_cli.py  submit, jobs, job, nodes, cancel, logs, controller
* controller/chaos_cli.py   chaos
* controller/local.py       up, down, demo
* agent/main.py             agent
* trainer/local.py          train-local
* controller/security_cli.py audit, tokens, certs

Controller address resolution for client commands: ``--controller``, else
``TENAX_CONTROLLER``, else the local cluster recorded by ``tenax up``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module path -> function that adds its subcommands; each subcommand sets
# `func` (args -> exit code).
_PARTS = (
    "controller.client_cli",
    "controller.local",
    "agent.main",
    "trainer.local",
    "controller.security_cli",
    "controller.chaos_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenax", description="Fault-tolerant elastic training cluster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _PARTS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # that part is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
