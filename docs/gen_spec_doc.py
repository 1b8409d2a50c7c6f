"""Print the job-spec reference table (Markdown) from common/spec.py.

The README's "Job spec reference" section is this script's output; a test
checks they match, so the docs cannot drift from the code.
Usage: python docs/gen_spec_doc.py
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import spec as config  # noqa: E402


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string literal right after each field."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def rows(cls: type, prefix: str = "") -> list[str]:
    out: list[str] = []
    docs = field_docs(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.extend(rows(type(value), prefix=f"{path}."))
            continue
        out.append(f"| `{path}` | `{value!r}` | {docs.get(f.name, '')} |")
    return out


def table() -> str:
    lines = ["| field | default | meaning |", "|---|---|---|", *rows(config.JobSpec)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
