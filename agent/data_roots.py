"""Which files a job may read on this host: ``data.path`` resolved under the agent's data roots.

Agents often run with more privileges than the users who submit jobs (as root, say), and a
worker's error messages reach any viewer through ``tenax logs``. So a job's ``data.path`` is
never opened as given: it is resolved (``..`` and every symlink followed) and must land
inside one of the directories the agent was started with (``--data-root``, repeatable).
Without any data root the agent reads no token files at all. A relative path is taken
relative to each root in turn. Pure apart from the file system lookups of ``realpath``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence


class DataPathRefused(PermissionError):
    """``data.path`` is not inside a data root (or there is none). The message names the field."""


def resolve_data_path(path: str, roots: Sequence[Path]) -> Path:
    """The real path ``path`` names inside one of ``roots``; DataPathRefused otherwise.

    The message names ``data.path`` and the roots, never anything read from the file.
    """
    if not roots:
        raise DataPathRefused("data.path: this agent reads no token files (it was started without --data-root)")
    if "\x00" in path:
        raise DataPathRefused("data.path: contains a NUL character")
    if ".." in Path(path).parts:
        raise DataPathRefused(f"data.path: must not contain '..', got {path!r}")
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    candidates = [Path(path)] if os.path.isabs(path) else [root / path for root in real_roots]
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))  # follows every symlink, so none can lead outside
        for root in real_roots:
            if real == root or root in real.parents:
                if real.is_file():
                    return real
    shown = ", ".join(str(r) for r in real_roots)
    raise DataPathRefused(f"data.path: {path!r} is not a file inside this agent's data roots ({shown})")


def spec_with_checked_data_path(spec: dict[str, Any] | None, roots: Sequence[Path]) -> dict[str, Any] | None:
    """``spec`` with ``data.path`` replaced by its checked real path (kind ``tokens`` only);
    DataPathRefused if the path is not allowed. The worker opens exactly the checked file."""
    data = (spec or {}).get("data") or {}
    if data.get("kind") != "tokens":
        return spec
    real = resolve_data_path(str(data.get("path", "")), roots)
    return {**spec, "data": {**data, "path": str(real)}}
