"""Unblocking survivors: abort the communicators of a generation, then re-form.

Design note (what torch 2.13 offers, measured in tests/trainer/test_abort.py):

* A peer that *dies* (kill -9, crash) closes its TCP connections: gloo raises
  "Connection closed by peer" on the ranks that talk to it directly, within
  tens of milliseconds. Ranks that are not in a collective with it (a
  pipeline neighbour waiting on a send from a rank that is itself waiting on
  the dead one) stay blocked, so the first rank that sees the error tells the
  others: it sets the generation's ``abort`` key in the rendezvous store.
* A peer that *hangs* (SIGSTOP, deadlock, stuck kernel) keeps its sockets open;
  gloo blocks until its collective timeout. ``ProcessGroupGloo.abort()``,
  ``shutdown()`` and ``distributed_c10d._abort_process_group()`` all return at
  once but do NOT release a thread blocked in ``Work.wait()`` (tried: the
  blocked allreduce stays blocked). What works on every backend is to never
  block inside C++ for long: issue collectives with ``async_op=True`` and wait
  through ``AbortWatcher.wait(work)``. On gloo it waits on a collective in C++
  in 20 ms slices (``Work.wait(timeout)`` leaves the collective running), and
  between slices looks at ``abort()`` and the generation's abort key; gloo's
  send/recv (a timed-out wait would close the pair) and NCCL works are waited
  on through an Event set by the work's completion or by ``abort()``. The stuck gloo worker thread
  of the old group is left behind (it ends when the hung process is killed),
  and the old group object is parked (``retire``) so that its destructor —
  which joins that thread — never runs on the training thread.
* NCCL: ``abort()`` additionally calls ``ProcessGroup.abort()`` on registered
  NCCL groups (ncclCommAbort), which frees kernels stuck on a dead peer; with
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0`` so the watchdog does not tear the
  process down first. Not exercised here (no GPUs in the test host).
* After the abort, survivors read plan g+1 and form the new group with
  ``form_group`` under the new store prefix (``PrefixStore``): keys of the old
  generation are never read again, and no process restarts. The old groups are
  destroyed later on a reaper thread (``reap_parked_once``), once nothing refers
  to them: a parked gloo group's transport thread can spin on a socket.
* The rendezvous of a new generation is abortable too. ``init_process_group``
  blocks in C++ until every rank connected (up to its timeout, 60 s by
  default): a participant that died before it joined would hold every other
  rank there that long. So ``form_group`` first runs ``rendezvous``: each rank
  sets ``tenax/joined/<rank>`` under the generation's prefix and polls (short,
  non-blocking ``check`` calls) until all ranks' keys are there, the
  generation's ``abort`` key is set, or ``should_abort`` (the worker: a newer
  plan arrived, e.g. g+2 without the dead rank) names a reason -> CommAborted
  within a poll interval. Only then does ``init_process_group`` run, with every
  rank present. (A rank dying in the few milliseconds between its last poll and
  the gloo connect is still bounded by the timeout only.)

Triggers of ``abort()``: the plan watcher (plan g+1 appeared: a hung rank was
detected by heartbeats, or a node was lost), the generation's store key (set by
a survivor that saw a collective fail, by the agent, or by the controller),
and the backstop collective timeout of ``wait``.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from common.layout import public_store_prefix

log = logging.getLogger(__name__)

ABORT_KEY = "abort"
"""Key inside a generation's PrefixStore; its value is the reason (UTF-8)."""


class CommAborted(RuntimeError):
    """The generation's communicators were aborted; read the next plan and re-form."""


class CommFailed(RuntimeError):
    """A collective failed on this rank (a peer died); peers have been told to abort."""


@dataclass(kw_only=True)
class AbortSettings:
    poll_interval_s: float = 0.02
    """A wait that lasts longer than this looks at the store's abort key (and at ``abort()``
    from another thread, for collectives) once per interval (seconds)."""
    sliced_waits: bool = True
    """Wait on collectives inside C++ in ``poll_interval_s`` slices (``Work.wait(timeout)``,
    which gloo allows without harm to the collective) instead of through a completion
    callback and an Event: no thread hop per wait. Off for NCCL, whose timed wait is not
    a harmless poll."""
    collective_timeout_s: float = 300.0
    """Backstop: the longest one wait() may block with nobody aborting (seconds)."""


class AbortWatcher:
    """Makes every collective of one generation abortable from another thread."""

    def __init__(self, settings: AbortSettings | None = None, *, rank: int = -1) -> None:
        self.settings = settings or AbortSettings()
        self.rank = rank
        self._lock = threading.Lock()
        self._aborted = threading.Event()
        self._reason = ""
        self._waiters: set[threading.Event] = set()
        self._groups: list[Any] = []
        self._store: Any = None
        self._store_lock = threading.Lock()
        self.on_abort: list[Callable[[str], None]] = []
        """Callbacks run (on the aborting thread) once per abort, with the reason."""
        self.aborted_at: float | None = None
        """time.monotonic() of the abort, for recovery timing."""

    # ---------------------------------------------------------------- state
    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    @property
    def reason(self) -> str:
        return self._reason

    def register(self, *groups: Any) -> None:
        """Process groups to abort at the backend level too (effective for NCCL)."""
        self._groups.extend(g for g in groups if g is not None)

    # ---------------------------------------------------------------- abort
    def abort(self, reason: str) -> bool:
        """Abort this generation: every current and future wait() raises CommAborted.

        Idempotent and thread-safe; returns True for the call that aborted."""
        with self._lock:
            if self._aborted.is_set():
                return False
            self._reason = reason
            self.aborted_at = time.monotonic()
            self._aborted.set()
            waiters = list(self._waiters)
        for ev in waiters:
            ev.set()
        for group in self._groups:
            _abort_backend(group)
        for callback in self.on_abort:
            try:
                callback(reason)
            except Exception:  # a bad callback must not stop the abort
                log.exception("on_abort callback failed")
        log.warning("rank %d: communicators aborted: %s", self.rank, reason)
        return True

    def signal_peers(self, reason: str) -> None:
        """Tell every rank of the generation to abort (sets the store key), then abort here."""
        if self._store is not None:
            try:
                with self._store_lock:
                    self._store.set(ABORT_KEY, reason)
            except Exception as exc:  # the store may be gone with its node; abort locally anyway
                log.warning("rank %d: could not set the abort key: %r", self.rank, exc)
        self.abort(reason)

    # ------------------------------------------------------------ the store
    def watch_store(self, store: Any) -> None:
        """Use ``store`` (a PrefixStore of this generation, on its own connection with a
        short timeout) for the abort key: set by ``signal_peers``, read by a wait that has
        lasted a poll interval (``check_store``).

        No thread polls it: a poll every 20 ms on every rank cost ~0.5 ms of CPU per
        0.06 s step on the 2-core host (and woke the store server as often). A rank blocked
        in a collective is the one that needs the key, and it reads it within an interval;
        a rank that is computing reads it once its next collective has waited as long."""
        self._store = store

    def check_store(self) -> bool:
        """Abort if a peer has set the generation's abort key; True if aborted (by anyone)."""
        if self._store is None or self._aborted.is_set():
            return self._aborted.is_set()
        try:
            with self._store_lock:  # one connection, one call at a time
                reason = self._store.get(ABORT_KEY) if self._store.check([ABORT_KEY]) else None
        except Exception as exc:  # store unreachable: its node is gone; the plan watcher decides
            log.debug("rank %d: abort-key check failed: %r", self.rank, exc)
            return False
        if reason is not None:
            self.abort(f"abort key set: {reason.decode(errors='replace')}")
        return self._aborted.is_set()

    def close(self) -> None:
        """The generation is over (nothing runs in the background to stop)."""
        self._store = None

    # ------------------------------------------------------------- waiting
    def wait(self, work: Any | Sequence[Any], what: str = "collective", *, timeout_s: float | None = None) -> None:
        """Wait for one ``Work`` (or several) like ``work.wait()``, but abortably.

        Raises CommAborted if the generation is aborted meanwhile, CommFailed
        (after telling the peers) if a work itself failed, TimeoutError after
        ``timeout_s`` (default: the backstop collective timeout)."""
        works = list(work) if isinstance(work, (list, tuple)) else [work]
        if self._aborted.is_set():
            raise CommAborted(f"{what}: {self._reason}")
        if not works:
            return
        limit = self.settings.collective_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        collectives, blocking = _split_collectives(works)
        if self.settings.sliced_waits:
            for w in collectives:
                self._wait_sliced(w, what, deadline, limit)
            collectives = []
            if not blocking:
                return
        batch = _Completion(collectives, blocking)
        with self._lock:
            self._waiters.add(batch.event)
        try:
            self._wait_event_sliced(batch.event, what, deadline, limit)
            if batch.error is None and not batch.done:  # woken by abort()
                raise CommAborted(f"{what}: {self._reason}")
            try:
                if batch.error is not None:
                    raise batch.error
                for w in batch.with_future:
                    w.wait()  # completed: returns at once, or raises the work's error
            except Exception as exc:
                self.failed(exc, what)
        finally:
            with self._lock:
                self._waiters.discard(batch.event)

    def failed(self, exc: BaseException, what: str) -> None:
        """An operation of this generation failed on this rank, in a wait or as it was posted
        (trainer.comm ``post``: gloo writes a send on the calling thread, so a dead peer's
        closed connection raises there): tell the peers, raise CommFailed. Never returns."""
        first_line = (str(exc).splitlines() or [""])[0]
        self.signal_peers(f"rank {self.rank}: {what} failed: {first_line[:200]}")
        raise CommFailed(f"{what} failed: {exc}") from exc

    def wait_for(self, event: threading.Event, what: str = "wait", *, timeout_s: float | None = None) -> None:
        """Wait until another thread sets ``event``, abortably: CommAborted on an abort (here or
        the key), TimeoutError (after telling the peers) once ``timeout_s`` has passed."""
        if self._aborted.is_set():
            raise CommAborted(f"{what}: {self._reason}")
        limit = self.settings.collective_timeout_s if timeout_s is None else timeout_s
        self._wait_event_sliced(event, what, time.monotonic() + limit, limit)

    def _wait_event_sliced(self, event: threading.Event, what: str, deadline: float, limit: float) -> None:
        """Sleep on ``event`` a poll interval at a time, looking for an abort or the deadline between."""
        while not event.wait(max(0.0, min(self.settings.poll_interval_s, deadline - time.monotonic()))):
            self._between_slices(what, deadline, limit)

    def _wait_sliced(self, work: Any, what: str, deadline: float, limit: float) -> None:
        """Block in C++ (GIL released) on one collective, a poll interval at a time."""
        piece = timedelta(seconds=self.settings.poll_interval_s)
        while True:
            try:
                work.wait(timeout=piece)
                return
            except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/DistError subclasses
                if not _slice_ran_out(exc):
                    self.failed(exc, what)
            self._between_slices(what, deadline, limit)

    def _between_slices(self, what: str, deadline: float, limit: float) -> None:
        """A wait has lasted another poll interval: aborted (here or by a peer), or past its time?"""
        if self.check_store():
            raise CommAborted(f"{what}: {self._reason}")
        if time.monotonic() >= deadline:
            self.signal_peers(f"rank {self.rank}: {what} timed out after {limit} s")
            raise TimeoutError(f"{what} did not complete within {limit} s")


def _split_collectives(works: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """(works with a future: collectives, whose timed wait is a harmless poll; the others:
    gloo send/recv, where a timed-out wait closes the pair)."""
    collectives, others = [], []
    for w in works:
        try:
            w.get_future()
            collectives.append(w)
        except RuntimeError:  # "Work::getFuture not implemented"
            others.append(w)
    return collectives, others


def _slice_ran_out(exc: BaseException) -> bool:
    """``Work.wait(timeout)`` ran out of time (c10d's "Operation timed out!"), nothing failed."""
    return str(exc).startswith("Operation timed out")


class _Completion:
    """Sets ``event`` once every work completed (or one failed), without blocking the caller.

    Works with a future (collectives) report through a done-callback; gloo's
    send/recv works have none (``getFuture`` is not implemented) and report
    ``is_completed`` only after ``wait()``, so one daemon thread waits on those.
    If a peer hangs, that thread stays blocked until the peer is killed — the
    same fate as gloo's own worker thread — while the caller has moved on."""

    def __init__(self, with_future: Sequence[Any], blocking: Sequence[Any]) -> None:
        """``with_future``/``blocking``: the works as ``_split_collectives`` sorts them."""
        self.event = threading.Event()
        self.error: BaseException | None = None
        self._left = len(with_future) + len(blocking)
        self._lock = threading.Lock()
        self.with_future: list[Any] = list(with_future)
        """Works whose errors still need surfacing with wait() (the others were waited on, once:
        waiting twice on a gloo send/recv blocks until the next message)."""
        for w in self.with_future:
            w.get_future().add_done_callback(lambda _f: self._one_done())
        if blocking:
            threading.Thread(target=self._wait_blocking, args=(blocking,), name="comm-wait", daemon=True).start()

    @property
    def done(self) -> bool:
        with self._lock:
            return self._left == 0

    def _one_done(self) -> None:
        with self._lock:
            self._left -= 1
            finished = self._left == 0
        if finished:
            self.event.set()

    def _wait_blocking(self, works: Sequence[Any]) -> None:
        for w in works:
            try:
                w.wait()
            except BaseException as exc:
                self.error = exc
                self.event.set()
                return
            self._one_done()


def _abort_backend(group: Any) -> None:
    """ncclCommAbort for NCCL groups; gloo's abort does not release waits (see above)."""
    try:
        if dist.get_backend(group) == "gloo":
            return
        group.abort()
    except Exception as exc:
        log.warning("backend abort failed: %r", exc)


# ------------------------------------------------------------ re-forming
_graveyard: list[Any] = []
"""Process groups of ended generations, parked: their destructors join worker threads that
may still be blocked on a hung peer, so they never run on the training thread. The reaper
(``_reap_parked``) drops each one on its own thread once nothing else refers to it."""
_kept: list[Any] = []
"""Parked groups that are never destroyed (not gloo)."""
_graveyard_lock = threading.Lock()
_reaper: threading.Thread | None = None
REAP_INTERVAL_S = 1.0
"""How often the reaper looks for parked groups nothing else refers to (seconds)."""


def retire_default_group() -> None:
    """Forget the current default group (and every group made in it) without running their
    destructors here; the reaper destroys them later, off the training thread."""
    global _reaper
    if not dist.is_initialized():
        return
    groups = [c10d._get_default_group(), *(g for g in list(c10d._world.pg_map) if g is not None)]
    gloo = {id(g) for g in groups if _backend_name(g) == "gloo"}
    dist.destroy_process_group()
    with _graveyard_lock:
        for group in groups:
            if not any(group is g for g in _graveyard) and not any(group is g for g in _kept):
                # only gloo groups are reaped: an NCCL group's destructor was never run here
                # (no GPU) and stays parked as before, its communicator aborted (ncclCommAbort)
                (_graveyard if id(group) in gloo else _kept).append(group)
        if _reaper is None:
            _reaper = threading.Thread(target=_reap_parked, name="pg-reaper", daemon=True)
            _reaper.start()


def _backend_name(group: Any) -> str:
    try:
        return str(dist.get_backend(group))
    except Exception:  # noqa: BLE001 - a group torch no longer knows: keep it parked
        return ""


def _only_parked(group: Any) -> bool:
    # the graveyard's slot, this argument, and getrefcount's own argument
    return sys.getrefcount(group) <= 3


def reap_parked_once() -> int:
    """Destroy, on the calling thread, every parked group that nothing but the graveyard refers
    to; returns how many. A parked gloo group is not idle: its transport thread keeps polling
    its sockets, and after an abort with a transfer still queued it spun a core at 100% (seen
    in a soak: one survivor's old group halved the job's step rate). Its destructor closes
    the sockets and joins its threads, waiting (without the GIL: measured, the training
    thread runs on) for a work still blocked on a hung peer until that peer is killed."""
    with _graveyard_lock:
        idle = [i for i in range(len(_graveyard)) if _only_parked(_graveyard[i])]
        doomed = [_graveyard[i] for i in idle]
        for i in reversed(idle):
            del _graveyard[i]
    count = len(doomed)
    doomed.clear()  # the destructors run here
    return count


def _reap_parked() -> None:
    while True:
        time.sleep(REAP_INTERVAL_S)
        try:
            reap_parked_once()
        except Exception:  # a failed destructor must not end the reaper
            log.exception("destroying a parked process group failed")


JOINED_KEY = "tenax/joined/"
"""``JOINED_KEY + str(rank)`` inside a generation's prefix: that rank reached the rendezvous."""


def rendezvous(store: Any, *, rank: int, world_size: int, timeout_s: float,
               should_abort: Callable[[], str | None] | None = None, poll_s: float = 0.02,
               what: str = "rendezvous", on_arrive: Callable[[], None] | None = None) -> float:
    """Announce ``rank`` in ``store`` (a generation's PrefixStore) and wait until all
    ``world_size`` ranks did; returns the seconds waited.

    Abortable: raises CommAborted as soon as the generation's ``abort`` key is set or
    ``should_abort()`` returns a reason; TimeoutError (naming the missing ranks) after
    ``timeout_s``. Every store call is a short non-blocking one (set, check).
    ``on_arrive()`` runs once this rank announced itself (the worker tells its agent, which
    tells the controller's rendezvous deadline).

    The pause between checks starts at 2 ms and grows by half up to ``poll_s``: the last
    rank usually arrives within tens of milliseconds of the first, and a fixed 20 ms
    pause made each rank start on average ~10 ms after the last one had joined (on the
    critical path of every recovery); a rendezvous that waits for seconds still polls
    at ``poll_s``."""
    started = time.monotonic()
    pause = min(0.002, poll_s)
    deadline = started + timeout_s
    store.set(JOINED_KEY + str(rank), repr(time.time()))
    if on_arrive is not None:
        on_arrive()
    everyone = [JOINED_KEY + str(r) for r in range(world_size)]
    while not store.check(everyone):
        reason = should_abort() if should_abort is not None else None
        if reason:
            raise CommAborted(f"{what}: {reason}")
        if store.check([ABORT_KEY]):
            raise CommAborted(f"{what}: abort key set: {store.get(ABORT_KEY).decode(errors='replace')}")
        if time.monotonic() >= deadline:
            missing = [r for r in range(world_size) if not store.check([JOINED_KEY + str(r)])]
            raise TimeoutError(f"{what}: rank(s) {missing} did not join within {timeout_s:.0f} s")
        time.sleep(pause)
        pause = min(poll_s, pause * 1.5)
    return time.monotonic() - started


def form_group(store: Any, prefix: str, *, rank: int, world_size: int, backend: str = "gloo",
               timeout_s: float = 60.0, device_id: Any = None,
               should_abort: Callable[[], str | None] | None = None,
               on_arrive: Callable[[], None] | None = None) -> Any:
    """Form the generation's default group under ``prefix`` of ``store`` and return it.

    ``timeout_s`` bounds the rendezvous and is the backend's collective timeout
    (a backstop: aborts normally come from the watcher). The wait for the other
    ranks is ``rendezvous`` (abortable, see the module docstring): CommAborted or
    TimeoutError before anything of the new group exists."""
    scoped = dist.PrefixStore(prefix, store)
    rendezvous(scoped, rank=rank, world_size=world_size, timeout_s=timeout_s, should_abort=should_abort,
               what=f"rendezvous of {public_store_prefix(prefix)!r}",  # logs are for viewers: no secret
               on_arrive=on_arrive)
    retire_default_group()
    kwargs = {"device_id": device_id} if device_id is not None else {}
    dist.init_process_group(backend, store=scoped, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return c10d._get_default_group()


CONNECT_ATTEMPT_S = 2.0
"""Longest single TCPStore connect (seconds); ``connect_store`` retries until its own timeout.
Short attempts keep a connect that is given up on short-lived: torch retries a failed attempt
once more after a backoff that grows with the attempt (up to about 0.75x its length)."""

LEFT_BEHIND_GRACE_S = 2 * CONNECT_ATTEMPT_S + 1.0
"""How long past its attempt's timeout a connect given up on can still run (seconds): torch's
backoff (at most ~0.75 attempts) and one more attempt, with a second to spare."""


def connect_store(host: str, port: int, *, timeout_s: float, should_abort: Callable[[], str | None] | None = None,
                  poll_s: float = 0.02, what: str = "the rendezvous store") -> Any:
    """A TCPStore client of ``host:port`` (its operations time out after ``timeout_s``), abortably.

    The constructor blocks in C++ and does not always honour its timeout: against a listener
    that completes the TCP handshake but never answers (the port of a lost node's store still
    held open) it blocked for good in a measurement on torch 2.13, and a refused connection is
    retried for the whole timeout. So each attempt (at most ``CONNECT_ATTEMPT_S``) runs on a
    daemon thread, and this waits for it in ``poll_s`` slices: CommAborted as soon as
    ``should_abort()`` names a reason (a newer plan switches now), TimeoutError after
    ``timeout_s``. An attempt given up on is left behind; its thread ends when the attempt does,
    and the interpreter's exit waits for that (``join_left_behind_connects``)."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        attempt_s = max(0.1, min(CONNECT_ATTEMPT_S, deadline - time.monotonic()))
        attempt_end = time.monotonic() + attempt_s
        thread, done, result = _start_connect(host, port, attempt_s)
        while not done.wait(max(0.0, min(poll_s, deadline - time.monotonic()))):
            reason = should_abort() if should_abort is not None else None
            if reason:
                _leave_behind(thread, attempt_end)
                raise CommAborted(f"connecting to {what} at {host}:{port}: {reason}")
            if time.monotonic() >= deadline:
                _leave_behind(thread, attempt_end)
                raise TimeoutError(f"{what} at {host}:{port} did not answer within {timeout_s:.0f} s")
        if "store" in result:
            store = result["store"]
            store.set_timeout(timedelta(seconds=timeout_s))
            return store
        last_error = result["error"]
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} at {host}:{port} did not answer within {timeout_s:.0f} s: "
                               f"{str(last_error).splitlines()[0] if str(last_error) else type(last_error).__name__}")


def _start_connect(host: str, port: int, attempt_s: float) -> tuple[threading.Thread, threading.Event, dict]:
    done = threading.Event()
    result: dict[str, Any] = {}

    def connect() -> None:
        try:
            result["store"] = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                            timeout=timedelta(seconds=attempt_s))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=connect, name="store-connect", daemon=True)
    thread.start()
    return thread, done, result


_left_behind: list[tuple[threading.Thread, float]] = []
"""Connect attempts given up on, with the monotonic time each attempt's own timeout ends."""


def _leave_behind(thread: threading.Thread, attempt_end: float) -> None:
    _left_behind[:] = [(t, d) for t, d in _left_behind if t.is_alive()]
    _left_behind.append((thread, attempt_end))


def join_left_behind_connects(until: float | None = None) -> int:
    """Wait for the connect threads given up on, each until its own timeout (plus
    ``LEFT_BEHIND_GRACE_S``) or ``until`` (monotonic), whichever is sooner; returns how many
    are still running.

    Registered at exit because a daemon thread that comes back from C++ into a finalising
    Python 3.11 is ended by ``pthread_exit``, whose unwinding through torch's frames aborts the
    whole process (``terminate called without an active exception``): a clean exit 0 became
    SIGABRT when a store connect timed out during the interpreter's shutdown. An attempt still
    running past its grace is blocked for good (a listener that never answers) and is not
    waited for: it never re-enters Python."""
    for thread, deadline in list(_left_behind):
        end = deadline + LEFT_BEHIND_GRACE_S
        if until is not None:
            end = min(end, until)
        thread.join(max(0.0, end - time.monotonic()))
    _left_behind[:] = [(t, d) for t, d in _left_behind if t.is_alive()]
    return len(_left_behind)


atexit.register(join_left_behind_connects)


def generation_store(host: str, port: int, prefix: str, *, timeout_s: float = 5.0) -> Any:
    """A fresh client connection to the rendezvous store, scoped to one generation
    (for the watcher thread, so its polling never contends with the trainer's)."""
    return dist.PrefixStore(prefix, connect_store(host, port, timeout_s=timeout_s))


def graveyard_size() -> int:
    """Parked gloo groups not destroyed yet."""
    return len(_graveyard)

