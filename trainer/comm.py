"""How the trainer waits for its communication: one hook for every wait.

Plain runs wait on each ``Work`` directly. An elastic worker installs
``AbortWatcher.wait`` (trainer.abort) instead, so that a collective or a
pipeline receive stuck on a dead or hung peer raises as soon as the
generation is aborted, instead of blocking inside C++ until the backend's
timeout. Call sites issue every operation with ``async_op=True`` (or
``isend``/``irecv``) and hand the work to ``wait``.

Posting can fail too: gloo writes a send (and arms a receive) on the calling thread,
so a peer that died is seen as "Connection closed by peer" when the operation is
posted, before there is any work to wait on. Point-to-point operations are posted
through ``post``, which hands such an error to the elastic worker's hook (the abort
watcher: tell the peers, stop the generation) as a failed wait would be.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

Waiter = Callable[[Any, str], None]
"""(work or list of works, what) -> None; raises if they cannot complete."""

PostFailed = Callable[[BaseException, str], None]
"""(the error raised while posting an operation, what) -> never returns: raises the error
the generation stops with."""

_waiter: Waiter | None = None
_post_failed: PostFailed | None = None


def set_waiter(waiter: Waiter | None, post_failed: PostFailed | None = None) -> None:
    """Install (or, with None, remove) the process-wide wait hook and the hook for an
    operation that fails as it is posted (``post``)."""
    global _waiter, _post_failed
    _waiter, _post_failed = waiter, post_failed


def post(issue: Callable[[], Any], what: str) -> Any:
    """``issue()`` (e.g. ``lambda: dist.isend(t, dst=d)``) and return its work. An error while
    posting goes to the installed hook (an elastic worker: the generation stops, its peers are
    told), or is raised as it is (plain runs)."""
    try:
        return issue()
    except Exception as exc:
        if _post_failed is not None:
            _post_failed(exc, what)
        raise


def wait(work: Any | Sequence[Any], what: str, *, peer: int | None = None) -> None:
    """Wait for ``work``; its time is added to this step's communication times under ``what``
    (and ``peer``, the global rank of a point-to-point operation's other end)."""
    start = time.perf_counter()
    events = None
    if _device_timing:
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
    try:
        if _waiter is not None:
            _waiter(work, what)
            return
        for w in work if isinstance(work, (list, tuple)) else [work]:
            w.wait()
    finally:
        if events is not None:
            events[1].record()
            _pending.append((what, peer, events[0], events[1]))
        else:
            _add(what, peer, time.perf_counter() - start)


def _add(what: str, peer: int | None, seconds: float) -> None:
    _kind_s[what] = _kind_s.get(what, 0.0) + seconds
    if peer is not None:
        key = f"{what}|{peer}"
        _peer_s[key] = _peer_s.get(key, 0.0) + seconds


# Seconds per kind (the ``what`` of ``wait``) and per ``kind|peer`` since the last ``drain``:
# the per-step communication times of the step line (issue #20). On gloo the wall time of the
# wait (the time the operation took to complete for this rank). On CUDA the device time between
# two events on the compute stream around the wait: the first fires once the compute issued
# before it is done, the second once the operation is (the wait makes the stream wait for it).
# Wall time there would count the tail of the compute the CPU ran ahead of, or nothing at all
# when a NCCL wait returns before the operation completes.
_kind_s: dict[str, float] = {}
_peer_s: dict[str, float] = {}
_pending: list[tuple[str, int | None, Any, Any]] = []
_device_timing = False


def set_device_timing(on: bool) -> None:
    """Time the waits with CUDA events (a CUDA trainer) or by the wall clock (default)."""
    global _device_timing
    _device_timing = bool(on)


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
    """``{"kind": {what: s}, "peer": {"what|peer": s}}`` since the last call; resets them.
    Device-timed waits are read here, at the step's end, when their events have fired (a
    synchronize only for one that has not)."""
    pending = list(_pending)
    _pending.clear()
    for what, peer, begin, end in pending:
        end.synchronize()
        _add(what, peer, begin.elapsed_time(end) / 1000.0)
    out = {"kind": dict(_kind_s), "peer": dict(_peer_s)}
    _kind_s.clear()
    _peer_s.clear()
    return out
