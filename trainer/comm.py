"""How the trainer waits for its communication: one hook for every wait.

Plain runs wait on each ``Work`` directly. An elastic worker installs
``AbortWatcher.wait`` (trainer.abort) instead, so that a collective or a
pipeline receive stuck on a dead or hung peer raises as soon as the
generation is aborted, instead of blocking inside C++ until the backend's
timeout. Call sites issue every operation with ``async_op=True`` (or
``isend``/``irecv``) and hand the work to ``wait``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

Waiter = Callable[[Any, str], None]
"""(work or list of works, what) -> None; raises if they cannot complete."""

_waiter: Waiter | None = None


def set_waiter(waiter: Waiter | None) -> None:
    """Install (or, with None, remove) the process-wide wait hook."""
    global _waiter
    _waiter = waiter


def wait(work: Any | Sequence[Any], what: str, *, peer: int | None = None) -> None:
    """Wait for ``work``; the wall time is added to this step's communication times under
    ``what`` (and ``peer``, the global rank of a point-to-point operation's other end)."""
    start = time.perf_counter()
    try:
        if _waiter is not None:
            _waiter(work, what)
            return
        for w in work if isinstance(work, (list, tuple)) else [work]:
            w.wait()
    finally:
        elapsed = time.perf_counter() - start
        _kind_s[what] = _kind_s.get(what, 0.0) + elapsed
        if peer is not None:
            key = f"{what}|{peer}"
            _peer_s[key] = _peer_s.get(key, 0.0) + elapsed


# Wall seconds waited per kind (the ``what`` of ``wait``) and per ``kind|peer`` since the last
# ``drain``: the per-step communication times of the step line (issue #20). Wall time, not
# device time: on gloo the wait is the time the collective took to complete for this rank.
_kind_s: dict[str, float] = {}
_peer_s: dict[str, float] = {}


_send_delays: dict[int, float] = {}
"""Global rank -> seconds each pipeline send to it is posted late (fault injection only:
trainer/faults.py ``delay_send``)."""


def set_send_delays(delays: dict[int, float]) -> None:
    """Install (or, with {}, remove) the pipeline send delays of this process."""
    _send_delays.clear()
    _send_delays.update(delays)


def before_send(peer: int) -> None:
    """Called before a pipeline send to ``peer`` is posted: sleeps out an injected delay."""
    delay = _send_delays.get(peer)
    if delay:
        time.sleep(delay)


def drain() -> dict[str, dict[str, float]]:
    """``{"kind": {what: s}, "peer": {"what|peer": s}}`` since the last call; resets them."""
    out = {"kind": dict(_kind_s), "peer": dict(_peer_s)}
    _kind_s.clear()
    _peer_s.clear()
    return out
