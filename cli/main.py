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
import logging
import sys

from cli import agent, chaos, client, controller, data, demo, diagnose, export, local, security, train_local

# Each module's `register` adds its subcommands; each subcommand sets `func`
# (args -> exit code). Order is the order of `tenax --help`.
_PARTS = (controller, client, local, demo, agent, train_local, security, chaos, export, data, diagnose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenax", description="Fault-tolerant elastic training cluster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _PARTS:
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
