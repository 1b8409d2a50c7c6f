"""Moving state between live ranks: executing a reshard plan, and buddy replication.

``reshard_state`` is what a survivor runs after re-forming its process groups:
it checks its own copies (owner snapshot, buddy replicas) against their
checksums, advertises only the good ones, and every rank computes the same
transfer plan (``trainer.reshard.plan_transfers``). Each rank then posts all its
receives and sends at once (``isend``/``irecv`` with one tag per transfer, so no
ordering between pairs can deadlock), verifies the CRC32 of every piece on
arrival, and re-plans around a bad source (excluding it) if one arrives
corrupted. A slice with no good copy anywhere fails the whole recovery with a
reason, and the caller falls back to the disk checkpoint.

``BuddyReplicator`` sends each rank's latest snapshot to its buddy — a rank on
another node (``buddy_ring``) — on a dedicated group from a background thread,
and receives its ward's. The buddy acknowledges a replica only after it
verified it; a step is recoverable once every rank's snapshot of it (or a later
one) is acknowledged: ``recoverable_step`` over the ranks' ``acked_step``.

Tensors on the wire are CPU tensors (gloo); pass ``device`` to stage them
through a CUDA device when the group is NCCL.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from trainer.reshard import OWNER, Holding, Layout, Transfer, plan_transfers
from trainer.snapshot import Snapshot, checksum, chunk_checksums, tensor_bytes

log = logging.getLogger(__name__)


class Unrecoverable(RuntimeError):
    """Some slice has no good copy on any live rank: fall back to the disk checkpoint."""


@dataclass(kw_only=True)
class TransferSettings:
    timeout_s: float = 60.0
    """Longest one batch of sends/receives may take (seconds)."""
    max_rounds: int = 3
    """Re-plans allowed after corrupted arrivals before giving up."""
    device: str | None = None
    """Stage tensors through this device on the wire (``cuda`` for NCCL groups); None: CPU."""
    fault_hook: Callable[[Transfer, torch.Tensor], None] | None = None
    """Fault injection (tests): called with each outgoing piece right before it is sent."""


@dataclass(frozen=True)
class Copy:
    """A flat copy of ``name[start:end]`` that this rank can send, with its checksum."""

    holding: Holding
    data: torch.Tensor
    checksum: list[int] | None
    """``chunk_checksums`` of ``data`` when it was written."""


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


# ------------------------------------------------------------ copies on hand
def copies_from_snapshot(snapshot: Snapshot, rank: int, role: str = OWNER,
                         spans: Mapping[str, Sequence[int]] | None = None) -> list[Copy]:
    """Copies a snapshot offers: ``spans[name]`` is the flat range its tensor holds
    (default: ``snapshot.metadata["spans"]``, which the owner records when it snapshots)."""
    spans = spans if spans is not None else snapshot.metadata.get("spans", {})
    return [
        Copy(holding=Holding(rank=rank, name=name, start=spans[name][0], end=spans[name][1], role=role),
             data=snapshot.tensors[name], checksum=snapshot.checksums.get(name))
        for name in snapshot.tensors
        if name in spans
    ]


def verified(copies: Iterable[Copy]) -> tuple[list[Copy], list[str]]:
    """(copies whose bytes match their checksum, descriptions of the others)."""
    good, bad = [], []
    for c in copies:
        if c.checksum is not None and chunk_checksums(c.data) == list(c.checksum):
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
    wait: Callable[[list[Any], str], None] | None = None,
    settings: TransferSettings | None = None,
) -> TransferReport:
    """Fill ``dest`` (``{name: (first element, flat tensor)}``) with this rank's
    ``needs[rank]`` from the copies held across ``group``. Collective: every rank
    of the group calls it with the same ``needs``. ``wait(works, what)`` is how
    to wait (pass ``AbortWatcher.wait`` to make it abortable); default: a wait
    with ``settings.timeout_s``."""
    settings = settings or TransferSettings()
    started = time.monotonic()
    wait = wait or _timed_wait(settings.timeout_s)
    report = TransferReport()
    good, bad = verified(copies)
    report.bad_copies += bad
    excluded: set[tuple[int, str, str]] = set()
    pending = needs
    for _ in range(settings.max_rounds + 1):
        report.rounds += 1
        holdings = _gather_holdings([c.holding for c in good if _key(c.holding) not in excluded], group, wait)
        transfers, reason = plan_transfers(pending, holdings)
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


def _timed_wait(timeout_s: float) -> Callable[[list[Any], str], None]:
    def wait(works: list[Any], what: str) -> None:
        for w in works:
            if not w.wait(timeout=timedelta(seconds=timeout_s)):
                raise TimeoutError(f"{what} timed out after {timeout_s} s")
    return wait


def gather_json(value: Any, group: Any = None, wait: Callable[[list[Any], str], None] | None = None) -> list[Any]:
    """all_gather of a JSON-able value (all_gather_object without pickle or numpy),
    waited through ``wait`` (abortable) or with a 60 s timeout."""
    wait = wait or _timed_wait(60.0)
    payload = json.dumps(value).encode()
    world = dist.get_world_size(group)
    size = torch.tensor([len(payload)], dtype=torch.int64)
    sizes = [torch.empty(1, dtype=torch.int64) for _ in range(world)]
    wait([dist.all_gather(sizes, size, group=group, async_op=True)], "gather sizes")
    longest = max(int(s) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    if payload:
        mine[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
    wait([dist.all_gather(parts, mine, group=group, async_op=True)], "gather values")
    return [json.loads(bytes(tensor_bytes(p)[:int(n)]).decode()) for p, n in zip(parts, sizes)]


def _gather_holdings(mine: list[Holding], group: Any, wait: Callable) -> list[Holding]:
    parts = gather_json([list(vars(h).values()) for h in mine], group, wait)
    return sorted(Holding(*fields) for part in parts for fields in part)


def _gather_failures(mine: list[Transfer], group: Any, wait: Callable) -> list[Transfer]:
    parts = gather_json([list(vars(t).values()) for t in mine], group, wait)
    return sorted(Transfer(*fields) for part in parts for fields in part)


def _find(copies: Sequence[Copy], t: Transfer) -> torch.Tensor:
    for c in copies:
        h = c.holding
        if h.name == t.name and h.role == t.via and h.start <= t.start and t.end <= h.end:
            return c.data[t.start - h.start:t.end - h.start]
    raise KeyError(f"rank {t.src} has no {t.via} copy for {t}")


def _dest_view(dest: Mapping[str, tuple[int, torch.Tensor]], t: Transfer) -> torch.Tensor:
    first, tensor = dest[t.name]
    return tensor[t.start - first:t.end - first]


def _execute(transfers: Sequence[Transfer], copies: Sequence[Copy], dest: Mapping[str, tuple[int, torch.Tensor]],
             *, rank: int, group: Any, wait: Callable, report: TransferReport,
             settings: TransferSettings) -> list[Transfer]:
    """Run this rank's part of the plan; returns the transfers into this rank that arrived corrupt."""
    device = settings.device
    works: list[Any] = []
    incoming: list[tuple[Transfer, torch.Tensor]] = []
    sums_out: dict[int, list[int]] = defaultdict(list)
    sums_in: dict[int, list[Transfer]] = defaultdict(list)
    keep_alive: list[torch.Tensor] = []
    for tag, t in enumerate(transfers):
        if t.src == rank and t.dst == rank:
            _dest_view(dest, t).copy_(_find(copies, t))
            report.bytes_local += _nbytes(t, dest)
        elif t.src == rank:
            data = _find(copies, t).contiguous()
            sums_out[t.dst].append(checksum(data))
            wire = data.to(device) if device else data
            if settings.fault_hook is not None:
                wire = wire.clone()  # never damage the copy itself
                settings.fault_hook(t, wire)
            keep_alive.append(wire)
            works.append(dist.isend(wire, _peer(t.dst, group), group=group, tag=tag))
            report.bytes_sent += data.numel() * data.element_size()
        elif t.dst == rank:
            view = _dest_view(dest, t)
            wire = torch.empty_like(view, device=device) if device else view
            incoming.append((t, wire))
            sums_in[t.src].append(t)
            works.append(dist.irecv(wire, _peer(t.src, group), group=group, tag=tag))
    report.transfers += sum(1 for t in transfers if t.dst == rank)
    base = len(transfers)  # checksum messages use tags after the data's
    sum_bufs = {}
    for dst, sums in sorted(sums_out.items()):
        buf = torch.tensor(sums, dtype=torch.int64)
        keep_alive.append(buf)
        works.append(dist.isend(buf, _peer(dst, group), group=group, tag=base))
    for src, ts in sorted(sums_in.items()):
        sum_bufs[src] = torch.empty(len(ts), dtype=torch.int64)
        works.append(dist.irecv(sum_bufs[src], _peer(src, group), group=group, tag=base))
    if works:
        wait(works, "state transfer")
    failed = []
    expected = {id(t): int(sum_bufs[t.src][i]) for src, ts in sums_in.items() for i, t in enumerate(ts)}
    for t, wire in incoming:
        view = _dest_view(dest, t)
        if device:
            view.copy_(wire)
        report.bytes_received += view.numel() * view.element_size()
        if checksum(view) != expected[id(t)]:
            failed.append(t)
    return failed


def _nbytes(t: Transfer, dest: Mapping[str, tuple[int, torch.Tensor]]) -> int:
    return t.numel * dest[t.name][1].element_size()


def _peer(rank: int, group: Any) -> int:
    """dist.isend/irecv take global ranks; plans use ranks of ``group``."""
    return rank if group is None else dist.get_global_rank(group, rank)


# ---------------------------------------------------------- buddy placement
def buddy_ring(nodes_by_rank: Mapping[int, str]) -> dict[int, int]:
    """{rank: buddy rank}: a permutation where, whenever possible, a rank's buddy
    lives on another node. Ranks are ordered by node and shifted by the size of
    the biggest node, so every rank also receives exactly one replica."""
    order = sorted(nodes_by_rank, key=lambda r: (nodes_by_rank[r], r))
    n = len(order)
    if n < 2:
        return {}
    counts: dict[str, int] = defaultdict(int)
    for r in order:
        counts[nodes_by_rank[r]] += 1
    shift = max(counts.values())
    if shift >= n:  # a single node: no off-node copy exists; still keep a copy elsewhere in memory
        shift = 1
    return {order[i]: order[(i + shift) % n] for i in range(n)}


def recoverable_step(acked_steps: Iterable[int]) -> int:
    """The newest step every rank can recover to from off-node copies (-1: none)."""
    steps = list(acked_steps)
    return min(steps) if steps else -1


# ------------------------------------------------------- buddy replication
@dataclass(kw_only=True)
class ReplicationSettings:
    timeout_s: float = 60.0
    """Longest one replication round may take (seconds); a round that times out is abandoned."""


class BuddyReplicator:
    """Background replication of this rank's latest snapshot to its buddy.

    Every rank of ``group`` (a dedicated group: replication must never sit in
    the ordering of training collectives) calls ``submit(snapshot)`` the same
    number of times — once per snapshot interval, even if its own snapshot was
    skipped — and each call is one round: send the snapshot to ``buddy``,
    receive the ward's (whose buddy this rank is), verify it, acknowledge it.
    """

    def __init__(self, *, rank: int, buddy: int, ward: int, group: Any = None,
                 settings: ReplicationSettings | None = None) -> None:
        self.rank, self.buddy, self.ward, self.group = rank, buddy, ward, group
        self.settings = settings or ReplicationSettings()
        self.acked_step = -1
        """Newest step of ours the buddy verified and holds."""
        self.replica: Snapshot | None = None
        """The ward's newest verified snapshot (its spans in ``replica.metadata['spans']``)."""
        self.rounds = 0
        self.bytes_sent = 0
        self.rejected = 0
        """Replicas received corrupt (dropped; the previous replica stays)."""
        self.error: BaseException | None = None
        self._pending: queue.Queue = queue.Queue()
        self._spare: Snapshot | None = None
        self._thread = threading.Thread(target=self._run, name=f"buddy-{rank}", daemon=True)
        self._stop = threading.Event()
        self._thread.start()

    def replicas(self) -> list[Snapshot]:
        """The ward's verified replicas still held: the newest and the one before it (the
        spare, until the next round receives into it). Call after ``close()`` to keep them."""
        return [s for s in (self._spare, self.replica) if s is not None and s.complete]

    def submit(self, snapshot: Snapshot | None) -> None:
        """Queue one replication round of ``snapshot`` (None: nothing to send this time —
        the round still runs, to receive the ward's). The snapshot stays pinned until
        sent, so the snapshotter skips rather than overwrite it."""
        if snapshot is not None:
            snapshot.pin()
        self._pending.put(snapshot)

    def drain(self, timeout_s: float) -> None:
        """Wait until every submitted round finished (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._pending.unfinished_tasks:
            if time.monotonic() > deadline:
                raise TimeoutError("replication rounds still pending")
            if self.error is not None:
                raise RuntimeError(f"replication failed: {self.error!r}") from self.error
            time.sleep(0.005)

    def close(self) -> None:
        self._stop.set()
        self._pending.put(None)

    def _run(self) -> None:
        while not self._stop.is_set():
            snapshot = self._pending.get()
            try:
                if self._stop.is_set():
                    return
                self._round(snapshot)
                self.rounds += 1
            except BaseException as exc:  # the trainer sees it in drain()/health; no more rounds
                self.error = exc
                log.warning("rank %d: buddy replication stopped: %r", self.rank, exc)
                return
            finally:
                if snapshot is not None:
                    snapshot.unpin()
                self._pending.task_done()

    def _round(self, snapshot: Snapshot | None) -> None:
        timeout = timedelta(seconds=self.settings.timeout_s)
        g = self.group
        header = _header(snapshot)
        out_len = torch.tensor([len(header)], dtype=torch.int64)
        in_len = torch.empty(1, dtype=torch.int64)
        buddy, ward = _peer(self.buddy, g), _peer(self.ward, g)
        _wait_all([dist.isend(out_len, buddy, group=g), dist.irecv(in_len, ward, group=g)], timeout)
        out_hdr = torch.frombuffer(bytearray(header), dtype=torch.uint8) if header else torch.empty(0, dtype=torch.uint8)
        in_hdr = torch.empty(int(in_len), dtype=torch.uint8)
        _wait_all([dist.isend(out_hdr, buddy, group=g), dist.irecv(in_hdr, ward, group=g)], timeout)
        meta = json.loads(bytes(tensor_bytes(in_hdr)).decode()) if int(in_len) else None
        incoming = self._buffers_for(meta)
        works = []
        if snapshot is not None:  # pinned since submit(): not overwritten while sent
            for name in sorted(snapshot.tensors):
                works.append(dist.isend(snapshot.tensors[name], buddy, group=g))
                self.bytes_sent += snapshot.tensors[name].numel() * snapshot.tensors[name].element_size()
        if incoming is not None:
            for name in sorted(incoming.tensors):
                works.append(dist.irecv(incoming.tensors[name], ward, group=g))
        _wait_all(works, timeout)
        ack_out = torch.tensor([-1], dtype=torch.int64)
        if incoming is not None:
            if incoming.verify() == []:
                incoming.complete = True
                self._spare, self.replica = self.replica, incoming
                ack_out[0] = incoming.step
            else:
                self.rejected += 1
                self._spare = incoming
        ack_in = torch.empty(1, dtype=torch.int64)
        _wait_all([dist.isend(ack_out, ward, group=g), dist.irecv(ack_in, buddy, group=g)], timeout)
        if int(ack_in) >= 0:
            self.acked_step = max(self.acked_step, int(ack_in))

    def _buffers_for(self, meta: dict | None) -> Snapshot | None:
        """A Snapshot to receive into: the spare buffer set when its shapes match (double buffering)."""
        if meta is None:
            return None
        spare = self._spare
        names = meta["tensors"]
        same = spare is not None and not spare.in_use and spare.tensors.keys() == names.keys() and all(
            spare.tensors[n].numel() == v[0] and str(spare.tensors[n].dtype) == v[1] for n, v in names.items())
        tensors = spare.tensors if same else {
            n: torch.empty(numel, dtype=_dtype(dt)) for n, (numel, dt) in names.items()}
        return Snapshot(step=meta["step"], tensors=tensors, checksums=dict(meta["checksums"]),
                        metadata=dict(meta["metadata"]))


def _header(snapshot: Snapshot | None) -> bytes:
    if snapshot is None:
        return b""
    return json.dumps({
        "step": snapshot.step,
        "tensors": {n: [t.numel(), str(t.dtype)] for n, t in snapshot.tensors.items()},
        "checksums": snapshot.checksums,
        "metadata": snapshot.metadata,
    }, sort_keys=True).encode()


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a replica header")
    return dtype


def _wait_all(works: Sequence[Any], timeout: timedelta) -> None:
    for w in works:
        if not w.wait(timeout=timeout):
            raise TimeoutError("replication round timed out")
