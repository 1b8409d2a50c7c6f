"""Moving state between live ranks: executing a reshard plan, and buddy replication.

``reshard_state`` is what a survivor runs after re-forming its process groups.
Every rank of the group calls it with the same ``needs``; each advertises only
copies that verified against their checksums (the caller may have done that
already and pass everyone's ``inventory``), and every rank computes the same
transfer plan (``trainer.reshard.plan_transfers``). The plan then runs as ONE
``all_to_all_single`` of bytes over the group: each rank packs, per
destination, the pieces it sends into one segment that starts with the CRC32
of its payload, and unpacks the segments it receives into place. One
collective instead of one message per piece: a recovery moves a few hundred
small slices (three per parameter), and the per-message cost of Python and of
a thread per point-to-point wait (gloo's send/recv have no future) dominated
the transfer; a collective completes through a future, so waiting on it needs
no thread. A segment that arrives corrupt fails all of its pieces; they are
re-planned around that source (excluded). A slice with no good copy anywhere
fails the whole recovery with a reason (``Unrecoverable``), and the caller
falls back to the disk checkpoint.

``BuddyReplicator`` sends each rank's latest snapshot to its buddy — a rank on
another node (``buddy_ring``) — and receives its ward's, without any thread of
its own. Each buddy pair has its own two-rank gloo group
(``replication_groups``): replication bytes never queue in front of a training
collective on a shared connection, and pairs that do not talk cost nothing.
One round per snapshot boundary, all from the training thread:

* ``post(snapshot)`` issues the round: an ``isend`` of the snapshot's slab to
  the buddy, an ``irecv`` of the ward's into a spare slab. A slab carries its
  own header (step, checksums: trainer.snapshot), so a round is exactly these
  two operations; gloo's transport thread moves the bytes while the next step
  trains. Point-to-point rather than collectives: a collective runs on its
  group's worker thread, and waking those threads on every rank at every
  boundary cost ~1.5 ms of the step on the 2-core test host (measured inside
  one run, boundary work with two broadcasts against two isend/irecv: 1.7 ms
  against 0.2 ms).
* ``complete()``, at the next boundary, finishes the round. Its peers posted
  their side before the step that just ended could complete (every step has
  a world collective), so for a small round (``DIRECT_WAIT_BYTES``) the waits
  return at once; a dead peer raises ``CommFailed``. A bigger round may still
  be moving when the next boundary comes (hundreds of MiB through the network
  take longer than a step): its send and receive are waited on by one waiter
  thread per round, started at ``post``, and while ``busy`` the trainer skips
  the boundary's round instead of waiting (every rank skips the same
  boundaries: the decision rides on the step's all-reduce, trainer.elastic),
  so rounds on both ends of every pair stay matched and training never holds
  for replication; ``recoverable_step`` lags by the rounds skipped.
  ``complete()`` where the round must be done (a switch) waits for it through
  the generation's abortable wait. The
  header is read (step and checksums, the header itself CRC-checked) and the
  replica kept. Its data is verified when a recovery uses it, not here: a CRC
  pass over every replica on the training thread would cost a multi-GiB shard
  more than its step, and a copy can rot in memory after any check anyway.

What the receiver must know before it can post a receive — the slab layout
and the snapshot's metadata — is exchanged once, at the first round of a
replicator (one replicator per generation: the layout never changes within
one); a sender whose layout changes anyway sends an empty round flagged
``RENEGOTIATE``, and both ends exchange terms again before the next.

There are no acknowledgements: the holder knows what it holds. ``replica`` is
the ward's newest snapshot received whole, and since every rank keeps exactly
one ward's, the minimum of ``replica.step`` over the ranks is the step the job
can recover to from off-node copies (``recoverable_step``), one round behind
the newest snapshot. A recovery uses the copies actually held, including the
replica of a round that arrived but was never ``complete()``-d (``replicas()``
picks it up), and verifies every copy at use.

The sender keeps its side of that step: the snapshot of its last completed round
stays pinned (``acked``) until a newer round completes, and the snapshotter
(three buffer sets) writes around it. On the background snapshot path a round
carries the step *before* the newest snapshot, so without it the own buffers
(newest, and the one being written) could both be past the step a dead rank's
buddy holds, and a kill while that rank's round was still moving would leave no
in-memory step covering every shard.

Tensors on the wire are CPU tensors (gloo); pass ``device`` to stage them
through a CUDA device when the transfer group is NCCL.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from trainer import comm
from trainer.abort import CommFailed
from trainer.reshard import OWNER, Holding, Layout, Transfer, plan_transfers
from trainer.snapshot import (CRC32, Snapshot, SlabLayout, allocate_slab, as_slab, checksum_kind_of_flags,
                              chunk_checksums, read_header, slab_layout, slab_offsets, tensor_bytes, write_header)

log = logging.getLogger(__name__)

Wait = Callable[[list[Any], str], None]
"""(works, what) -> None; raises if they cannot complete (``AbortWatcher.wait`` is one)."""
WaitEvent = Callable[[threading.Event, str], None]
"""(event, what) -> None once ``event`` is set; raises if it cannot be (``AbortWatcher.wait_for``)."""


class Unrecoverable(RuntimeError):
    """Some slice has no good copy on any live rank: fall back to the disk checkpoint."""


@dataclass(kw_only=True)
class TransferSettings:
    timeout_s: float = 60.0
    """Longest one collective of the transfer may take (seconds) with the default wait."""
    max_rounds: int = 3
    """Re-plans allowed after corrupted arrivals before giving up."""
    device: str | None = None
    """Stage tensors through this device on the wire (``cuda`` for NCCL groups); None: CPU."""
    fault_hook: Callable[[Transfer, torch.Tensor], None] | None = None
    """Fault injection (tests): called with each outgoing piece's bytes on the wire (after
    their checksum was taken) right before they are sent."""


@dataclass(frozen=True)
class Copy:
    """A flat copy of ``name[start:end]`` that this rank can send, with its checksum."""

    holding: Holding
    data: torch.Tensor
    checksum: list[int] | None
    """``chunk_checksums`` of ``data`` when it was written (None: verified by the caller)."""
    checksum_kind: str = CRC32


@dataclass(kw_only=True)
class TransferReport:
    transfers: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_local: int = 0
    rounds: int = 0
    bad_copies: list[str] = field(default_factory=list)
    """Copies excluded: failed their checksum at home or on arrival."""
    seconds: float = 0.0
    local_s: float = 0.0
    """Seconds spent copying ``bytes_local`` into place (coalesced runs, device synchronised)."""
    local_runs: int = 0
    """Copies the local pieces took after coalescing (one per contiguous run)."""
    network_s: float = 0.0
    """Seconds of packing, the all-to-all and unpacking (``bytes_received``)."""


# ------------------------------------------------------------ copies on hand
def copies_from_snapshot(snapshot: Snapshot, rank: int, role: str = OWNER,
                         spans: Mapping[str, Sequence[int]] | None = None) -> list[Copy]:
    """Copies a snapshot offers: ``spans[name]`` is the flat range its tensor holds
    (default: ``snapshot.metadata["spans"]``, which the owner records when it snapshots)."""
    spans = spans if spans is not None else snapshot.metadata.get("spans", {})
    return [
        Copy(holding=Holding(rank=rank, name=name, start=spans[name][0], end=spans[name][1], role=role),
             data=snapshot.tensors[name], checksum=snapshot.checksums.get(name), checksum_kind=snapshot.checksum_kind)
        for name in snapshot.tensors
        if name in spans
    ]


def verified(copies: Iterable[Copy]) -> tuple[list[Copy], list[str]]:
    """(copies whose bytes match their checksum, descriptions of the others)."""
    good, bad = [], []
    for c in copies:
        if c.checksum is not None and chunk_checksums(c.data, c.checksum_kind) == list(c.checksum):
            good.append(c)
        else:
            h = c.holding
            bad.append(f"{h.role} copy of {h.name}[{h.start}:{h.end}] on rank {h.rank}")
    return good, bad


# -------------------------------------------------------------- resharding
def reshard_state(
    needs: Layout,
    copies: Sequence[Copy],
    dest: Mapping[str, tuple[int, torch.Tensor]],
    *,
    rank: int,
    group: Any = None,
    wait: Wait | None = None,
    settings: TransferSettings | None = None,
    inventory: Sequence[Holding] | None = None,
) -> TransferReport:
    """Fill ``dest`` (``{name: (first element, flat tensor)}``) with this rank's
    ``needs[rank]`` from the copies held across ``group``. Collective: every rank
    of the group calls it with the same ``needs``. ``wait(works, what)`` is how
    to wait (pass ``AbortWatcher.wait`` to make it abortable); default: a wait
    with ``settings.timeout_s``.

    ``inventory``: every rank's holdings, when the caller has already verified its
    ``copies`` and gathered what every rank holds (trainer.elastic does both in the
    collective that picks the resume step); then this rank's copies need no
    checksum and no gather is repeated here. None: verify ``copies`` and gather."""
    settings = settings or TransferSettings()
    started = time.monotonic()
    wait = wait or _timed_wait(settings.timeout_s)
    report = TransferReport()
    if inventory is None:
        good, bad = verified(copies)
        report.bad_copies += bad
        everyone = _gather_holdings([c.holding for c in good], group, wait)
    else:
        good, everyone = list(copies), sorted(inventory)
    excluded: set[tuple[int, str, str]] = set()
    pending = needs
    for _ in range(settings.max_rounds + 1):
        report.rounds += 1
        transfers, reason = plan_transfers(pending, [h for h in everyone if _key(h) not in excluded])
        if transfers is None:
            raise Unrecoverable(reason)
        failed = _execute(transfers, good, dest, rank=rank, group=group, wait=wait, report=report,
                          settings=settings)
        all_failed = _gather_failures(failed, group, wait)
        if not all_failed:
            report.seconds = time.monotonic() - started
            return report
        report.bad_copies += [f"{t.via} copy of {t.name}[{t.start}:{t.end}] from rank {t.src} (arrived corrupt)"
                              for t in all_failed]
        excluded |= {(t.src, t.name, t.via) for t in all_failed}
        pending = _as_layout(all_failed)  # only the pieces that arrived corrupt
    raise Unrecoverable(f"transfers still corrupt after {settings.max_rounds} re-plans")


def _key(h: Holding) -> tuple[int, str, str]:
    return h.rank, h.name, h.role


def _as_layout(transfers: Iterable[Transfer]) -> dict[int, dict[str, list[tuple[int, int]]]]:
    layout: dict[int, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for t in transfers:
        layout[t.dst][t.name].append((t.start, t.end))
    return {r: dict(v) for r, v in layout.items()}


def _wait_round(r: _Round) -> None:
    """A big round's waiter thread: each gloo send/recv is waited on exactly once, here; the
    receive first and regardless of the send (a buddy that died after sending its part
    still leaves us a whole replica). No per-call timeout (on a gloo send/recv it closes the
    pair): a stuck peer is bounded by the pair group's own timeout, and the training thread
    only ever waits on ``moved`` through the abortable ``wait_for``."""
    try:
        try:
            r.in_work.wait()
            r.received = True
        except BaseException as exc:  # noqa: BLE001 - surfaced by complete() on the training thread
            r.error = exc
        try:
            r.out_work.wait()
        except BaseException as exc:  # noqa: BLE001
            r.error = r.error or exc
    finally:
        r.moved.set()


def _timed_event_wait(timeout_s: float) -> WaitEvent:
    def wait(event: threading.Event, what: str) -> None:
        if not event.wait(timeout_s):
            raise TimeoutError(f"{what} timed out after {timeout_s} s")
    return wait


def _timed_wait(timeout_s: float) -> Wait:
    def wait(works: list[Any], what: str) -> None:
        for w in works:
            if not w.wait(timeout=timedelta(seconds=timeout_s)):
                raise TimeoutError(f"{what} timed out after {timeout_s} s")
    return wait


GATHER_SLOT = 4096
"""Bytes per rank of gather_json's first (usually only) all_gather."""


def gather_json(value: Any, group: Any = None, wait: Wait | None = None) -> list[Any]:
    """all_gather of a JSON-able value (all_gather_object without pickle or numpy),
    waited through ``wait`` (abortable) or with a 60 s timeout.

    One all_gather of fixed GATHER_SLOT-byte slots (8 bytes of length, then the
    start of the value) carries every value that fits; only when one does not, a
    second all_gather carries the rest. Recoveries call this a few times, and
    each collective is a round trip through every rank of a busy host."""
    wait = wait or _timed_wait(60.0)
    payload = json.dumps(value).encode()
    world = dist.get_world_size(group)
    room = GATHER_SLOT - 8
    parts = _all_gather_bytes(len(payload).to_bytes(8, "little") + payload[:room], GATHER_SLOT, world, group, wait,
                              "gather values")
    lengths = [int.from_bytes(bytes(tensor_bytes(p[:8])), "little") for p in parts]
    heads = [bytes(tensor_bytes(p[8:8 + min(n, room)])) for p, n in zip(parts, lengths)]
    longest_rest = max(n - room for n in lengths)
    if longest_rest > 0:
        rests = _all_gather_bytes(payload[room:], longest_rest, world, group, wait, "gather values (rest)")
        heads = [h + bytes(tensor_bytes(r[:max(0, n - room)])) for h, r, n in zip(heads, rests, lengths)]
    return [json.loads(h.decode()) for h in heads]


def _all_gather_bytes(data: bytes, size: int, world: int, group: Any, wait: Wait, what: str) -> list[torch.Tensor]:
    mine = torch.zeros(size, dtype=torch.uint8)
    if data:
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty(size, dtype=torch.uint8) for _ in range(world)]
    wait([dist.all_gather(parts, mine, group=group, async_op=True)], what)
    return parts


def _gather_holdings(mine: list[Holding], group: Any, wait: Wait) -> list[Holding]:
    parts = gather_json([list(vars(h).values()) for h in mine], group, wait)
    return sorted(Holding(*fields) for part in parts for fields in part)


def _gather_failures(mine: list[Transfer], group: Any, wait: Wait) -> list[Transfer]:
    parts = gather_json([list(vars(t).values()) for t in mine], group, wait)
    return sorted(Transfer(*fields) for part in parts for fields in part)


class _CopyIndex:
    """Finds the copy a transfer reads from (one dict lookup, not a scan per transfer)."""

    def __init__(self, copies: Sequence[Copy]) -> None:
        self._by: dict[tuple[str, str], list[Copy]] = defaultdict(list)
        for c in copies:
            self._by[(c.holding.name, c.holding.role)].append(c)

    def find(self, t: Transfer) -> torch.Tensor:
        for c in self._by.get((t.name, t.via), ()):
            h = c.holding
            if h.start <= t.start and t.end <= h.end:
                return c.data[t.start - h.start:t.end - h.start]
        raise KeyError(f"rank {t.src} has no {t.via} copy for {t}")


def _dest_view(dest: Mapping[str, tuple[int, torch.Tensor]], t: Transfer) -> torch.Tensor:
    first, tensor = dest[t.name]
    return tensor[t.start - first:t.end - first]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(tensor_bytes(t))


def _execute(transfers: Sequence[Transfer], copies: Sequence[Copy], dest: Mapping[str, tuple[int, torch.Tensor]],
             *, rank: int, group: Any, wait: Wait, report: TransferReport,
             settings: TransferSettings) -> list[Transfer]:
    """Run this rank's part of the plan as one all_to_all_single of byte segments; returns
    the transfers into this rank that arrived corrupt."""
    world = dist.get_world_size(group)
    index = _CopyIndex(copies)
    outgoing: dict[int, list[tuple[Transfer, torch.Tensor]]] = defaultdict(list)
    incoming: dict[int, list[tuple[Transfer, torch.Tensor]]] = defaultdict(list)
    local: list[tuple[torch.Tensor, torch.Tensor]] = []
    for t in transfers:  # the same order on every rank: segments line up without any header
        if t.src == rank and t.dst == rank:
            local.append((index.find(t), _dest_view(dest, t)))
            report.bytes_local += _nbytes(t, dest)
        elif t.src == rank:
            outgoing[t.dst].append((t, index.find(t)))
        elif t.dst == rank:
            incoming[t.src].append((t, _dest_view(dest, t)))
    report.transfers += sum(1 for t in transfers if t.dst == rank)
    started = time.perf_counter()
    report.local_runs += copy_runs(local)
    report.local_s += time.perf_counter() - started
    started = time.perf_counter()
    send, send_sizes = _pack(outgoing, world, settings, report)
    recv_sizes = [8 + sum(v.numel() * v.element_size() for _, v in incoming[src]) if src in incoming else 0
                  for src in range(world)]
    received = _all_to_all(send, send_sizes, recv_sizes, group, wait, settings)
    failed = _unpack(received, recv_sizes, incoming, report)
    report.network_s += time.perf_counter() - started
    return failed


def _storage_key(t: torch.Tensor) -> tuple[str, int, torch.dtype]:
    return str(t.device), t.untyped_storage().data_ptr(), t.dtype


def coalesce(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(source, destination) pairs of flat views merged into as few pairs as possible: a pair
    that continues the previous one in both its source's and its destination's storage
    becomes part of it. The slices of a flat snapshot (three per parameter) that land in a
    flat state in the same order become one copy per contiguous slab."""
    ordered = sorted(pairs, key=lambda p: (_storage_key(p[1])[:2], p[1].storage_offset()))
    runs: list[list] = []  # [source, destination, first source offset, first destination offset, numel]
    for src, dst in ordered:
        if src.numel() == 0:
            continue
        if runs:
            last = runs[-1]
            s0, d0, so, do, n = last
            if (_storage_key(src) == _storage_key(s0) and _storage_key(dst) == _storage_key(d0)
                    and src.storage_offset() == so + n and dst.storage_offset() == do + n):
                last[4] = n + src.numel()
                continue
        runs.append([src, dst, src.storage_offset(), dst.storage_offset(), src.numel()])
    out = []
    for src, dst, so, do, n in runs:
        if n != src.numel():  # merged: one view over the whole run of each storage
            src = src.new_empty(0).set_(src.untyped_storage(), so, (n,), (1,))
            dst = dst.new_empty(0).set_(dst.untyped_storage(), do, (n,), (1,))
        out.append((src, dst))
    return out


def copy_runs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Copy every (source, destination) pair, coalesced (``coalesce``): one copy per contiguous
    run, non-blocking between pinned host memory and a GPU, the device synchronised once at
    the end. Returns the number of copies made."""
    runs = coalesce([(s.reshape(-1), d.reshape(-1)) for s, d in pairs])
    on_gpu = False
    for src, dst in runs:
        cross = src.device != dst.device
        on_gpu = on_gpu or src.is_cuda or dst.is_cuda
        dst.copy_(src, non_blocking=cross and (src.is_pinned() or dst.is_pinned()))
    if on_gpu:
        torch.cuda.synchronize()
    return len(runs)


def _pack(outgoing: Mapping[int, list[tuple[Transfer, torch.Tensor]]], world: int, settings: TransferSettings,
          report: TransferReport) -> tuple[torch.Tensor, list[int]]:
    """One segment per destination, in rank order: [CRC32 of the payload: 8 bytes][payload]."""
    segments, sizes = [], [0] * world
    for dst in range(world):
        pieces = outgoing.get(dst)
        if not pieces:
            continue
        payload = torch.cat([_as_bytes(data) for _, data in pieces])  # a private copy: the copies stay intact
        header = torch.frombuffer(bytearray(_crc(payload).to_bytes(8, "little")), dtype=torch.uint8)
        if settings.fault_hook is not None:
            offset = 0
            for t, data in pieces:
                n = data.numel() * data.element_size()
                settings.fault_hook(t, payload[offset:offset + n])
                offset += n
        segments += [header, payload]
        sizes[dst] = 8 + payload.numel()
        report.bytes_sent += payload.numel()
    send = torch.cat(segments) if segments else torch.empty(0, dtype=torch.uint8)
    return send, sizes


def _all_to_all(send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group: Any, wait: Wait,
                settings: TransferSettings) -> torch.Tensor:
    received = torch.empty(sum(recv_sizes), dtype=torch.uint8)
    device = settings.device
    wire_in = received.to(device) if device else received
    wire_out = send.to(device) if device else send
    wait([dist.all_to_all_single(wire_in, wire_out, recv_sizes, send_sizes, group=group, async_op=True)],
         "state transfer")
    if device:
        received.copy_(wire_in)
    return received


def _unpack(received: torch.Tensor, recv_sizes: list[int], incoming: Mapping[int, list[tuple[Transfer, torch.Tensor]]],
            report: TransferReport) -> list[Transfer]:
    failed: list[Transfer] = []
    offset = 0
    for src, size in enumerate(recv_sizes):
        if not size:
            continue
        expected = int.from_bytes(bytes(tensor_bytes(received[offset:offset + 8])), "little")
        payload = received[offset + 8:offset + size]
        offset += size
        pieces = incoming[src]
        if _crc(payload) != expected:
            failed += [t for t, _ in pieces]
            continue
        at = 0
        for _, view in pieces:
            n = view.numel() * view.element_size()
            _as_bytes(view).copy_(payload[at:at + n])  # bytes, so no alignment needed inside the segment
            at += n
        report.bytes_received += payload.numel()
    return failed


def _nbytes(t: Transfer, dest: Mapping[str, tuple[int, torch.Tensor]]) -> int:
    return t.numel * dest[t.name][1].element_size()


# ---------------------------------------------------------- buddy placement
def recoverable_step(held_steps: Iterable[int]) -> int:
    """The newest step every rank can recover to from off-node copies (-1: none), from the
    step of the replica each rank holds for its ward."""
    steps = list(held_steps)
    return min(steps) if steps else -1


def replication_groups(ring: Mapping[int, int], rank: int, *, timeout_s: float = 60.0) -> tuple[Any, Any]:
    """(group {rank, its buddy}, group {its ward, rank}): one two-rank gloo group per pair
    of ``ring``. Collective over the default group: every rank creates every pair's group
    in the same order (only the two members of a pair connect)."""
    out_group = in_group = None
    for src in sorted(ring):
        group = dist.new_group(sorted({src, ring[src]}), backend="gloo", timeout=timedelta(seconds=timeout_s))
        if src == rank:
            out_group = group
        if ring[src] == rank:
            in_group = group
    if out_group is None or in_group is None:
        raise ValueError(f"rank {rank} is not in the replication ring {dict(ring)}")
    return out_group, in_group


# ------------------------------------------------------- buddy replication
@dataclass(kw_only=True)
class ReplicationSettings:
    timeout_s: float = 60.0
    """Longest one replication wait may take (seconds) with the default wait."""
    pin_memory: bool = False
    """Receive replicas into pinned host buffers (CUDA jobs: a restore from a replica is then
    one fast host-to-device copy)."""


RENEGOTIATE = 1
"""Header flag of a round that carries no snapshot because the sender's layout changed:
both ends exchange terms again before the next round."""


@dataclass(frozen=True)
class _Terms:
    """What one direction of a pair carries in every round (agreed once per replicator): the
    slab layout and the snapshot's metadata without its step. An empty layout: a header only
    (the sender had no snapshot when they agreed)."""

    layout: SlabLayout
    metadata: dict

    @property
    def nbytes(self) -> int:
        return slab_offsets(self.layout)[1]

    def to_json(self) -> bytes:
        return json.dumps({"layout": self.layout, "metadata": self.metadata}, sort_keys=True).encode()

    @staticmethod
    def from_json(raw: bytes) -> "_Terms":
        d = json.loads(raw.decode())
        return _Terms(layout=[tuple(e) for e in d["layout"]], metadata=d["metadata"])

    @staticmethod
    def of(snapshot: Snapshot | None) -> "_Terms":
        if snapshot is None:
            return _Terms(layout=[], metadata={})
        return _Terms(layout=slab_layout(snapshot.tensors),
                      metadata={k: v for k, v in snapshot.metadata.items() if k != "step"})


DIRECT_WAIT_BYTES = 4 << 20
"""Rounds up to this size are waited on directly (see ``BuddyReplicator.complete``)."""

SLOW_ROUND_S = 0.05
"""A boundary held longer than this by its replication round is worth a warning (once)."""

HARVEST_WAIT_S = 0.05
"""How long ``replicas()`` gives a receive still in flight when a generation has ended."""


@dataclass
class _Round:
    """One posted round: a send and a receive, and the buffers they read and write."""

    out_work: Any
    in_work: Any
    sent: Snapshot | None
    incoming: Snapshot
    renegotiate: bool
    """This round asked the buddy for new terms (our layout changed)."""
    nbytes: int
    out_done: bool = False
    in_done: bool = False
    in_waited: bool = False
    """gloo's send/recv works are waited on once: a second wait blocks until the next message."""
    moved: threading.Event | None = None
    """A big round's waiter thread sets this once its send and receive are done (None: a small
    round, waited on directly at ``complete``)."""
    error: BaseException | None = None
    """What the waiter thread's waits raised (the round failed)."""
    received: bool = False
    """The waiter thread saw the receive complete (the ward's replica is whole even if our
    send failed: a recovery may still use it)."""


class BuddyReplicator:
    """Replicates this rank's snapshots to its buddy and keeps its ward's, with no thread
    (see the module docstring for the round protocol).

    Every rank of a ring calls ``post(snapshot)`` the same number of times — once per
    snapshot interval, with whatever it has (None or a stale snapshot are fine: the round
    still runs, to receive the ward's) — and ``complete()`` where it must know the round
    done (at a switch)."""

    def __init__(self, *, rank: int, buddy: int, ward: int, out_group: Any, in_group: Any,
                 wait: Wait | None = None, wait_event: WaitEvent | None = None,
                 settings: ReplicationSettings | None = None) -> None:
        self.rank, self.buddy, self.ward = rank, buddy, ward
        self.out_group, self.in_group = out_group, in_group
        self.settings = settings or ReplicationSettings()
        self._wait = wait or _timed_wait(self.settings.timeout_s)
        self._wait_event = wait_event or _timed_event_wait(self.settings.timeout_s)
        self.replica: Snapshot | None = None
        """The ward's newest snapshot received whole (its header intact; its data is verified
        at use). Its step, over all ranks (every rank keeps exactly one ward's), is what the
        job can recover to from off-node copies."""
        self.rounds = 0
        self.bytes_sent = 0
        self.rejected = 0
        """Rounds whose header arrived damaged (dropped; the previous replica stays). In a
        running generation that ends it (CommFailed): the two ends may no longer agree on
        the terms of the next round."""
        self.skipped = 0
        """Boundaries whose round was left out because a big round was still moving somewhere."""
        self.max_wait_s = 0.0
        """Longest a ``complete()`` waited for its round: a small round waited on at the next
        boundary, or a big one at a switch (in steady state a big round is skipped over, not
        waited for: ``busy``)."""
        self.acked: Snapshot | None = None
        """The own snapshot of the last round whose send completed, pinned until a newer
        one's does (the module docstring says why)."""
        self._spare: Snapshot | None = None
        self._out: _Terms | None = None
        self._in: _Terms | None = None
        self._agree_out = self._agree_in = True  # the first round starts with the exchange of terms
        self._round: _Round | None = None
        self._filler: torch.Tensor | None = None
        self._closed = False

    @classmethod
    def for_ring(cls, ring: Mapping[int, int], rank: int, *, wait: Wait | None = None,
                 wait_event: WaitEvent | None = None,
                 settings: ReplicationSettings | None = None) -> "BuddyReplicator":
        """Collective over the default group: create the pair groups, then this rank's replicator."""
        settings = settings or ReplicationSettings()
        out_group, in_group = replication_groups(ring, rank, timeout_s=settings.timeout_s)
        ward = next(r for r, b in ring.items() if b == rank)
        return cls(rank=rank, buddy=ring[rank], ward=ward, out_group=out_group, in_group=in_group, wait=wait,
                   wait_event=wait_event, settings=settings)

    # ------------------------------------------------------------ rounds
    def post(self, snapshot: Snapshot | None) -> None:
        """Start one round with ``snapshot`` (complete, or None); finishes the previous round
        first. The snapshot stays pinned until its round completes, so the snapshotter skips
        rather than overwrites it. A send and a receive, no wait."""
        if self._closed:
            raise RuntimeError("replicator is closed")
        self.complete()
        if snapshot is not None and not snapshot.complete:
            snapshot = None
        if self._agree_out or self._agree_in:
            self._agree(snapshot)
        send = snapshot if snapshot is not None and _Terms.of(snapshot) == self._out else None
        renegotiate = snapshot is not None and send is None  # a layout the agreed terms cannot carry
        wire = as_slab(send, self._out.layout) if send is not None else self._empty_round(renegotiate)
        incoming = self._receive_buffers()
        out_work = self._send(wire)
        in_work = self._receive(incoming.slab)
        if send is not None:
            send.pin()
            self.bytes_sent += wire.numel()
        nbytes = max(wire.numel(), incoming.slab.numel())
        self._round = r = _Round(out_work, in_work, send, incoming, renegotiate, nbytes)
        if nbytes > DIRECT_WAIT_BYTES:  # may outlast the next step: waited on off this thread
            r.moved, r.in_waited = threading.Event(), True
            threading.Thread(target=_wait_round, args=(r,), name="replication-wait", daemon=True).start()

    @property
    def busy(self) -> bool:
        """A big round posted earlier is still moving (its send or receive is not done)."""
        r = self._round
        return r is not None and r.moved is not None and not r.moved.is_set()

    def complete(self) -> None:
        """Finish the round in flight, if any, then keep the ward's replica. Local: the peers
        posted their side of this round before the step that just ended could complete, and
        gloo's threads moved the bytes during it, so for a round of up to DIRECT_WAIT_BYTES
        this returns at once; a failed peer raises CommFailed. A bigger round has its waiter
        thread (``busy`` until done): the trainer skips boundaries while it moves, and a call
        here waits for it through the abortable wait (a hung peer must not hold a switch past
        an abort)."""
        r = self._round
        if r is None:
            return
        started = time.monotonic()
        self._settle(r)
        waited = time.monotonic() - started
        if waited > SLOW_ROUND_S and self.max_wait_s <= SLOW_ROUND_S:  # once: the first slow round
            log.warning("rank %d: a replication round of %d bytes held the snapshot boundary %.2f s: it does "
                        "not fit in the snapshot interval (snapshot_every: auto spaces snapshots to hide it)",
                        self.rank, r.nbytes, waited)
        self.max_wait_s = max(self.max_wait_s, waited)
        self._round = None
        if not r.out_done:
            self._finish_out(r)
        if not r.in_done:  # replicas() may have taken it already
            self._finish_in(r, strict=True)

    def replicas(self) -> list[Snapshot]:
        """The ward's replicas held: the newest and the one before it, plus the round in flight
        if its receive completes within HARVEST_WAIT_S (the generation ended before the next
        boundary finished it; a recovery still counts it). The caller verifies what it uses."""
        r = self._round
        if r is not None and r.moved is not None and not r.in_done:
            if r.moved.wait(HARVEST_WAIT_S) and r.received:
                self._finish_in(r)
        elif r is not None and not r.in_waited:
            r.in_waited = True
            try:
                # a timed-out wait closes this pair's connection: its generation is over anyway
                r.in_work.wait(timeout=timedelta(seconds=HARVEST_WAIT_S))
                self._finish_in(r)
            except Exception as exc:  # noqa: BLE001 - not here (peer gone or stuck): not a copy
                log.debug("rank %d: round in flight not received: %r", self.rank, exc)
        return [s for s in (self._spare, self.replica) if s is not None and s.complete]

    def host_bytes(self) -> int:
        """Host memory this replicator holds (bytes): the ward's replicas (two buffer sets, double
        buffered) and the filler slab of empty rounds."""
        slabs = [s.slab for s in (self._spare, self.replica) if s is not None and s.slab is not None]
        if self._filler is not None:
            slabs.append(self._filler)
        return sum(t.numel() for t in slabs)

    def close(self) -> None:
        """No more rounds. A send still in flight gives its snapshot back to the snapshotter
        (a torn copy at the buddy fails its checksum there), and so does ``acked``."""
        self._closed = True
        r = self._round
        if r is not None and r.sent is not None:
            r.sent.unpin()
            r.sent = None
        if self.acked is not None:  # nothing writes snapshots until the next generation trains
            self.acked.unpin()
            self.acked = None

    # --------------------------------------------------------- internals
    def _settle(self, r: _Round) -> None:
        if r.moved is not None:
            self._wait_event(r.moved, "buddy replication")
            if r.error is not None:
                raise CommFailed(f"buddy replication failed: {r.error}") from r.error
            return
        works = [r.out_work] if r.in_waited else [r.out_work, r.in_work]
        r.in_waited = True
        try:
            for w in works:
                # no per-call timeout on purpose: on a gloo send/recv it closes the pair; a peer
                # stopped mid-round is still bounded by the pair group's own timeout (new_group)
                w.wait()
        except Exception as exc:
            raise CommFailed(f"buddy replication failed: {exc}") from exc

    def _finish_out(self, r: _Round) -> None:
        r.out_done = True
        self.rounds += 1
        if r.sent is not None:  # its pin passes to ``acked`` (an empty round leaves it)
            if self.acked is not None:
                self.acked.unpin()
            self.acked, r.sent = r.sent, None
        self._agree_out = r.renegotiate

    def _finish_in(self, r: _Round, strict: bool = False) -> None:
        r.in_done = True
        incoming = r.incoming
        header = read_header(incoming.slab, self._in.layout)
        if header is None:  # damaged: nothing in it can be trusted, not even the flags
            self.rejected += 1
            self._spare = incoming
            if strict:  # a lost RENEGOTIATE would leave the two ends posting different sizes
                raise CommFailed(f"rank {self.rank}: the header of rank {self.ward}'s replica arrived damaged")
            return
        step, flags, checksums = header
        self._agree_in = bool(flags & RENEGOTIATE)
        if step < 0 or not self._in.layout:  # nothing sent this round: the buffers are free again
            self._spare = incoming
            return
        # Kept without a CRC pass here: the checksums came with the bytes, and every copy is
        # verified when a recovery uses it (Copies.offered). For a multi-GiB shard a pass on
        # the training thread at every boundary would cost more than the step.
        incoming.step, incoming.checksums = step, checksums
        incoming.checksum_kind = checksum_kind_of_flags(flags)
        incoming.metadata["step"] = step
        incoming.complete = True
        self._spare, self.replica = self.replica, incoming

    def _agree(self, snapshot: Snapshot | None) -> None:
        """Exchange the terms of the directions that asked for it (blocking): both members of a
        pair group know from the last round's header whether its direction does."""
        header = None
        if self._agree_out:
            self._out = _Terms.of(snapshot)
            header = self._out.to_json()
        out_len = torch.tensor([len(header)], dtype=torch.int64) if header is not None else None
        in_len = torch.zeros(1, dtype=torch.int64) if self._agree_in else None
        self._exchange(out_len, in_len, "replication terms")
        out_bytes = torch.frombuffer(bytearray(header), dtype=torch.uint8) if header is not None else None
        in_bytes = torch.empty(int(in_len), dtype=torch.uint8) if in_len is not None else None
        self._exchange(out_bytes, in_bytes, "replication terms")
        if self._agree_in:
            self._in = _Terms.from_json(bytes(tensor_bytes(in_bytes)))
            self._spare = None  # buffers of the old terms
        if self._agree_out:
            self._filler = None
        self._agree_out = self._agree_in = False

    def _exchange(self, out: torch.Tensor | None, into: torch.Tensor | None, what: str) -> None:
        """Send ``out`` to the buddy and receive ``into`` from the ward. Both are posted before
        the wait: waiting on one group while the peer waits on another would close a cycle
        around the ring."""
        works = []
        if out is not None:
            works.append(self._send(out))
        if into is not None:
            works.append(self._receive(into))
        if works:
            self._wait(works, what)

    # Point-to-point, not collectives: a gloo collective runs on its group's worker thread,
    # and waking it (with the other ranks' worker threads) at every boundary cost ~1.5 ms of
    # the step on the 2-core host; a send is issued from this thread, a receive just posted.
    def _send(self, tensor: torch.Tensor) -> Any:
        return comm.post(lambda: dist.isend(tensor, self.buddy, group=self.out_group), "replication send")

    def _receive(self, tensor: torch.Tensor) -> Any:
        return comm.post(lambda: dist.irecv(tensor, self.ward, group=self.in_group), "replication receive")

    def _empty_round(self, renegotiate: bool) -> torch.Tensor:
        """A slab of the agreed terms that carries no snapshot (step -1); its contents past the
        header are never read."""
        if self._filler is None:
            self._filler = allocate_slab(self._out.layout)[0]
        write_header(self._filler, self._out.layout, -1, {}, flags=RENEGOTIATE if renegotiate else 0)
        return self._filler

    def _receive_buffers(self) -> Snapshot:
        """The spare buffer set when it fits the ward's terms (double buffering: ``replica``
        stays intact while the next one arrives), else new ones. After new terms the spare may
        be an older replica in the old layout: kept as a replica then, not written over."""
        spare, terms = self._spare, self._in
        if spare is not None and not spare.in_use and slab_layout(spare.tensors) == terms.layout:
            self._spare = None  # its buffers are about to be overwritten
            slab, tensors = spare.slab, spare.tensors
        else:
            slab, tensors = allocate_slab(terms.layout, pin=self.settings.pin_memory)
        return Snapshot(step=-1, tensors=tensors, slab=slab, metadata=dict(terms.metadata))


