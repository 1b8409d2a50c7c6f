"""`tenax data ...`: make token files; the arguments go to ``python -m trainer.data``
(``prepare``: text/JSONL through a Hugging Face tokenizer.json; ``build``: byte-level)."""

from __future__ import annotations

import argparse


def cmd_data(args: argparse.Namespace) -> int:
    from trainer.data import main

    return main(args.rest, prog="tenax data")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make token files from text (see `tenax data --help`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of python -m trainer.data")
    p.set_defaults(func=cmd_data)
