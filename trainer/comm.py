"""How the trainer waits for its communication: one hook for every wait.

Plain runs wait on each ``Work`` directly. An elastic worker installs
``AbortWatcher.wait`` (trainer.abort) instead, so that a collective or a
pipeline receive stuck on a dead or hung peer raises as soon as the
generation is aborted, instead of blocking inside C++ until the backend's
timeout. Call sites issue every operation with ``async_op=True`` (or
``isend``/``irecv``) and hand the work to ``wait``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

Waiter = Callable[[Any, str], None]
"""(work or list of works, what) -> None; raises if they cannot complete."""

_waiter: Waiter | None = None


def set_waiter(waiter: Waiter | None) -> None:
    """Install (or, with None, remove) the process-wide wait hook."""
    global _waiter
    _waiter = waiter


def wait(work: Any | Sequence[Any], what: str) -> None:
    if _waiter is not None:
        _waiter(work, what)
        return
    for w in work if isinstance(work, (list, tuple)) else [work]:
        w.wait()
