"""Small file helpers shared by the agent and the trainer."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_atomic(path: str | Path, text: str, *, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the whole new one, never a
    part: a uniquely named file next to it, renamed over it (rename is atomic on one filesystem)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
