"""The worker's elastic runtime: survive a lost peer in process, reshard, resume.

State machine of one worker process (decisions are the pure functions below)::

                 launch plan g (generation 1, or > 1 for a worker that joins)
                                      │
                                      ▼
    ┌──────────────► FORMING(g) ── rendezvous of g under plan.store_prefix,
    │                    │          abort watcher on the generation's store,
    │                    │          replication group, Trainer for g's layout
    │                    ▼
    │          fresh start (step 0)  or  TRANSFERRING: every participant
    │                    │            advertises its verified copies (own
    │                    │            snapshots, buddy replicas; a joiner has
    │                    │            none), all pick the newest step every
    │                    │            needed slice has a copy of
    │                    │            (``choose_resume_step``), reshard_state
    │                    │            moves the slices (checksummed; a bad copy
    │                    │            is re-planned around), import_state.
    │                    │            No step covered, or Unrecoverable: load the
    │                    │            newest disk checkpoint that covers it.
    │                    ▼
    │                RUNNING(g) ── steps; after each (every ``snapshot_every``)
    │                    │          a host snapshot (inline for a small CPU state),
    │                    │          replicated to a buddy on another node by two
    │                    │          collectives that run during the next step, no
    │                    │          helper thread (``_snapshot_boundary``); disk
    │                    │          checkpoints every ``checkpoint_every``.
    │                    │
    │     ┌──────────────┼───────────────────────────┬────────────────────┐
    │     │ plan g+1 with switch_at_step = -1         │ plan g+1 with       │ last step
    │     │ seen by the PlanWatcher thread, or a      │ switch_at_step = S  │ done
    │     │ collective failed here (CommFailed ->     │ and step == S:      ▼
    │     │ abort key), or the abort key was set,     │ SWITCHING: sync   EXIT 0
    │     │ or a backstop timeout                     │ snapshot S, one
    │     ▼                                           │ replication round
    │  ABORTING: every blocked wait raises            │
    │  CommAborted (it reads abort() and the abort    │
    │  key between 20 ms slices); the old groups      │
    │  are retired, never destroyed                   │
    │     └──────────────┬───────────────────────────┘
    │                    ▼
    │                REFORMING: wait (bounded) for a plan newer than g in etcd;
    │                    │      my new rank = the worker at my (node, slot);
    │                    │      listed in plan.extra["idle"] -> take part in the
    │                    │      transfer (group "<prefix>transfer/": the plan's
    │                    │      ranks, then the idle ones), then EXIT 0;
    │                    │      in neither (drained, dropped) -> EXIT 0
    └────────────────────┘

A failure while FORMING or TRANSFERRING goes back to REFORMING (a failure during
a recovery); the recovery record then covers the whole outage. The rendezvous of
FORMING is abortable (``trainer.abort.rendezvous``): while waiting for the other
ranks of g it polls the store and gives up at once (CommAborted -> REFORMING) when
a plan newer than g that switches now appears (a participant died before it
joined: the controller re-plans without it) or g's abort key is set; the
collective timeout is only the backstop.

A worker started for a two-phase growth (``TENAX_GROWTH_ID``, launched with the
tentative plan g+1 while the job still runs plan g) first PREPARES::

    PREPARING: imports, layout math, model stage build, store reachable
        │       -> JoinerRecord READY in etcd (Keys.job_joiner)
        ▼
    WAIT FOR COMMIT (bounded, ``prepare_wait_s``): the first plan > g in etcd
        ├─ names my (node, slot) -> FORMING(that plan) as a joiner (no state)
        └─ does not, or none in time (growth abandoned) -> EXIT 0

so that survivors, which switch at the step the controller picks once every
joiner is READY, wait at the boundary only for the rendezvous and the transfer.

Timing of a recovery (``protos.recovery.RecoveryRecord``) starts when the worker
notices (abort time, error time, or the switch boundary). The contract with the
control side (agents keep processes, start only new slots, fold the records) is
docs/elastic-worker.md.

Steady state never waits for the control plane (principle 2): plans arrive on a
watch thread, the loop only reads an attribute at each step boundary.
Every blocking call has a timeout: rendezvous, plan wait, collectives (through
the abort watcher), transfers, snapshot fences.

Fault injection (test infrastructure, ``TENAX_FAULT``): ``;``-separated faults of
``key=value`` pairs, e.g. ``rank=3,step=4,kind=kill,when=mid``:

    kind=kill            SIGKILL this process at step boundary ``step`` (when=between)
                         or during the next step (when=mid), once ``step`` is replicated
                         (and due disk checkpoints written); when=posted: at that
                         boundary at once, its replication round still to move
    kind=corrupt-own     at recovery, flip a byte in each of this rank's own snapshots
    kind=corrupt-replica at recovery, flip a byte in each buddy replica it holds
    kind=kill-in-transfer SIGKILL at the start of the transfer of generation ``gen``
                         (``rank``: the rank in that generation's transfer group)
    ``rank`` is the rank in generation ``gen`` (default 1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from protos.plan import Plan, PlanError
from protos.recovery import RecoveryRecord
from trainer import comm
from trainer.abort import AbortSettings, AbortWatcher, CommAborted, CommFailed, form_group, generation_store
from trainer.reshard import BUDDY, OWNER, Holding, plan_transfers
from trainer.optim import STATE_KINDS, state_key
from trainer.sharding import state_layout
from trainer.snapshot import Snapshot, Snapshotter, SnapshotSettings, chunk_checksums, corrupt
from trainer.transfer import (BuddyReplicator, Copy, ReplicationSettings, TransferSettings, Unrecoverable,
                              buddy_ring, gather_json, reshard_state)

log = logging.getLogger(__name__)

class StoreUnreachable(RuntimeError):
    """The generation's rendezvous store cannot be reached (its node may be gone)."""


Interruptions = (CommAborted, CommFailed, TimeoutError, dist.DistError)
"""What a generation ends with when a peer dies or hangs, or the plan changes."""


# =================================================================== settings
@dataclass(kw_only=True)
class ElasticSettings:
    store_timeout_s: float = 30.0
    collective_timeout_s: float = 60.0
    """Backstop for one wait and the rendezvous of a generation (aborts come much sooner)."""
    plan_wait_s: float = 60.0
    """Longest a worker waits for plan g+1 after it noticed a failure."""
    transfer_timeout_s: float = 60.0
    prepare_wait_s: float = 300.0
    """A worker prepared for a growth waits this long for the plan that takes it in, then exits 0."""
    snapshot_every: str = "1"
    checkpoint_every: int = 0
    run_dir: str = ""


# ============================================================ pure decisions
def rank_in_plan(plan: Plan, node: str, slot: int) -> int | None:
    """My rank in ``plan``: the worker placed on my (node, slot); None if I have no place."""
    for w in plan.workers:
        if w.node == node and w.slot == slot:
            return w.rank
    return None


def idle_survivors(plan: Plan) -> list[tuple[str, int]]:
    """(node, slot) of the survivors plan g+1 leaves idle (``extra["idle"]``, controller/replan.py)."""
    return [(str(i["node"]), int(i["slot"])) for i in plan.extra.get("idle", [])
            if isinstance(i, dict) and "node" in i and "slot" in i]


def buddy_and_ward(plan: Plan, rank: int) -> tuple[int, int] | None:
    """(rank I replicate to, rank whose replica I keep), on another node when possible."""
    ring = buddy_ring({w.rank: w.node for w in plan.workers})
    if not ring:
        return None
    ward = next(r for r, b in ring.items() if b == rank)
    return ring[rank], ward


LAYOUT_FIELDS = ("dp", "pp", "zero_stage", "layer_partition", "sample_shares", "micro_batch_size")


def snapshot_metadata(layout, rank: int, generation: int) -> dict[str, Any]:
    """What a flat snapshot needs to be read in any later layout: whose state it is, in which layout."""
    fields = {f: getattr(layout, f) for f in LAYOUT_FIELDS}
    fields["layer_partition"], fields["sample_shares"] = list(layout.layer_partition), list(layout.sample_shares)
    return {"layout": fields, "rank": rank, "generation": generation}


_PIECES: dict[tuple, tuple[tuple[str, str, int, int, int], ...]] = {}


def named_pieces(model_spec, metadata: Mapping[str, Any]) -> list[tuple[str, str, int, int, int]]:
    """(kind, "kind/name", start, end, offset) of every per-parameter slice in a flat snapshot:
    ``name[start:end]`` of that kind lives at ``tensors[kind][offset:offset + end - start]``.

    A snapshot is three flat tensors (the owned range of the stage's flat parameters and
    the two AdamW moments of that range): a few large copies, checksums and sends per step
    instead of three per parameter. Pieces are cut out only when a recovery needs them
    (memoised: every participant cuts every advertised copy)."""
    key = (repr(model_spec), json.dumps(metadata["layout"], sort_keys=True), int(metadata["rank"]))
    pieces = _PIECES.get(key)
    if pieces is None:
        pieces = _PIECES[key] = tuple(_cut_pieces(model_spec, metadata))
    return list(pieces)


def _cut_pieces(model_spec, metadata: Mapping[str, Any]) -> list[tuple[str, str, int, int, int]]:
    from trainer.parallel import ParallelLayout
    from trainer.sharding import stage_offsets, update_range

    fields = dict(metadata["layout"])
    fields["layer_partition"], fields["sample_shares"] = tuple(fields["layer_partition"]), tuple(fields["sample_shares"])
    layout = ParallelLayout(**fields)
    dp_rank, pp_rank = layout.coords(int(metadata["rank"]))
    offsets = stage_offsets(model_spec, layout, pp_rank)
    lo, hi = update_range(max((b for _, b in offsets.values()), default=0), layout, dp_rank)
    pieces = []
    for name, (a, b) in offsets.items():
        if a < hi and b > lo:
            start, end = max(a, lo) - a, min(b, hi) - a
            for kind in STATE_KINDS:
                pieces.append((kind, state_key(kind, name), start, end, a + start - lo))
    return pieces


def choose_resume_step(needs: Mapping[int, Mapping[str, Sequence[tuple[int, int]]]],
                       holdings_by_step: Mapping[int, Sequence[Holding]]) -> int | None:
    """The newest step whose copies (over all participants) cover every need; None if none does."""
    for step in sorted(holdings_by_step, reverse=True):
        transfers, _ = plan_transfers(needs, holdings_by_step[step])
        if transfers is not None:
            return step
    return None


def common_disk_step(per_rank_steps: Iterable[Iterable[int]]) -> int | None:
    """The newest checkpoint step that every participant can load its part from."""
    sets = [set(s) for s in per_rank_steps]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def auto_snapshot_interval(copy_s: float, step_s: float, replication_wait_s: float = 0.0) -> int:
    """Smallest interval (steps) whose snapshot copy, and replication round, are hidden by the
    training between two snapshots. A round that held a boundary for ``replication_wait_s``
    (it was not done one step after it started) takes about a step plus that."""
    if step_s <= 0:
        return 1
    return max(1, math.ceil(copy_s / step_s), math.ceil((step_s + replication_wait_s) / step_s))


def steps_lost(at_step: int, resumed_step: int) -> int:
    return max(0, at_step - resumed_step)


# ============================================================ fault injection
@dataclass(kw_only=True, frozen=True)
class Fault:
    kind: str
    rank: int
    step: int = -1
    gen: int = 1
    when: str = "between"


def parse_faults(raw: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in raw.split(";"))):
        fields = dict(kv.split("=", 1) for kv in item.split(","))
        faults.append(Fault(kind=fields["kind"], rank=int(fields["rank"]), step=int(fields.get("step", -1)),
                            gen=int(fields.get("gen", 1)), when=fields.get("when", "between")))
    return faults


def _kill_self() -> None:
    """SIGKILL this process; the moment goes to TENAX_RUN_DIR/killed-PID (benchmarks time MTTR from it)."""
    run_dir = os.environ.get("TENAX_RUN_DIR")
    if run_dir:
        Path(run_dir, f"killed-{os.getpid()}").write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


# ============================================================== plan watcher
class PlanWatcher:
    """Follows Keys.job_plan(job) in etcd on a thread with its own event loop.

    ``newest`` is the newest valid plan seen; ``on_plan(plan)`` runs on the watch
    thread for every newer generation. Malformed values are logged and skipped."""

    def __init__(self, endpoints: str, key: str, *, on_plan=None) -> None:
        self.endpoint = endpoints.split(",")[0].strip()
        self.key = key
        self.on_plan = on_plan
        self.newest: Plan | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._etcd = None
        """The watch's connection while it is up (``put`` borrows it)."""
        self._thread = threading.Thread(target=self._thread_main, name="plan-watcher", daemon=True)
        self._thread.start()

    def wait_newer(self, generation: int, timeout_s: float) -> Plan:
        """The newest plan with a generation above ``generation``; TimeoutError if none comes in time."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.newest is None or self.newest.generation <= generation:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no plan newer than generation {generation} within {timeout_s:.0f}s")
                self._cond.wait(min(left, 0.5))
            return self.newest

    def close(self) -> None:
        self._stop.set()

    def put(self, key: str, value: str, *, timeout_s: float = 10.0) -> None:
        """Write one key through the watch's connection (on its thread); retries while etcd is
        unreachable (temporary), TimeoutError once ``timeout_s`` has passed."""
        import concurrent.futures

        from common.etcd import EtcdError, EtcdUnavailable

        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            loop, etcd = self._loop, self._etcd
            if loop is not None and etcd is not None:
                future = asyncio.run_coroutine_threadsafe(etcd.put(key, value), loop)
                try:
                    future.result(max(0.05, deadline - time.monotonic()))
                    return
                except concurrent.futures.TimeoutError:
                    future.cancel()
                    break
                except (EtcdError, EtcdUnavailable, RuntimeError) as exc:  # connection lost or being replaced: retry
                    last = exc
            time.sleep(0.05)
        raise TimeoutError(f"could not write {key} within {timeout_s:.0f} s: {last!r}")

    def _offer(self, raw: str) -> None:
        try:
            plan = Plan.from_json(raw)
        except PlanError as exc:
            log.warning("skipping malformed plan at %s: %s", self.key, exc)
            return
        with self._cond:
            if self.newest is not None and plan.generation <= self.newest.generation:
                return
            self.newest = plan
            self._cond.notify_all()
        if self.on_plan is not None:
            self.on_plan(plan)

    def _thread_main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        from common.etcd import Etcd, EtcdError, EtcdUnavailable
        from common.retry import Backoff

        self._loop = asyncio.get_running_loop()
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                async with Etcd(self.endpoint, tls=_etcd_tls_from_env()) as etcd:
                    self._etcd = etcd
                    kv = await etcd.get(self.key)
                    if kv is not None:
                        self._offer(kv.value)
                    start = kv.mod_revision + 1 if kv is not None else None
                    async for ev in etcd.watch_prefix(self.key, start_revision=start):
                        if ev.key == self.key and ev.kind == "put":
                            self._offer(ev.value)
                        backoff.reset()
                        if self._stop.is_set():
                            return
            except (EtcdError, EtcdUnavailable) as exc:
                log.debug("plan watch on %s interrupted: %r", self.key, exc)
                await backoff.sleep()
            finally:
                self._etcd = None


def _etcd_tls_from_env():
    """The agent passes its etcd client TLS files to workers (TENAX_ETCD_CA/CERT/KEY)."""
    ca = os.environ.get("TENAX_ETCD_CA", "")
    if not ca:
        return None
    from common.etcd import EtcdTls

    return EtcdTls(ca_file=ca, cert_file=os.environ.get("TENAX_ETCD_CERT", ""),
                   key_file=os.environ.get("TENAX_ETCD_KEY", ""))


def _process_age_s() -> float:
    """Seconds since this process started (a joiner's READY reports its whole start-up)."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - only informative
        return 0.0


# ================================================================ state copies
class Copies:
    """Every copy of training state this process holds, across generations: its own
    snapshots (every buffer of the Snapshotter) and the buddy replicas it keeps for its
    wards. Replicas are taken from the replicators of the last two generations when
    asked, so a round that arrived but was never finished (the generation ended
    first) counts too. Only complete snapshots are offered, and of those only the
    tensors that verify right then: checksums decide, at use."""

    def __init__(self, snapper: Snapshotter, model_spec) -> None:
        self.snapper, self.model_spec = snapper, model_spec
        self._replicators: list[BuddyReplicator] = []

    def own(self) -> list[Snapshot]:
        # every buffer: after a failure an older step may be the one every rank has
        return self.snapper.complete_snapshots()

    def keep_replicas_of(self, replicator: BuddyReplicator) -> None:
        """At the end of a generation: its replicas stay available to later recoveries."""
        if all(replicator is not r for r in self._replicators):
            self._replicators = (self._replicators + [replicator])[-2:]

    @property
    def replicas(self) -> list[Snapshot]:
        out: list[Snapshot] = []
        for replicator in self._replicators:
            out += [s for s in replicator.replicas() if all(s is not o for o in out)]
        return out

    def offered(self, rank: int) -> tuple[list[tuple[str, Snapshot, list[str]]], list[str]]:
        """((role, snapshot, its tensors that verify) of every copy with a good tensor,
        descriptions of the flat tensors that did not verify). One CRC pass per copy:
        the slices cut out of a verified tensor need no checksum of their own."""
        out, bad = [], []
        for role, snaps in ((OWNER, self.own()), (BUDDY, self.replicas)):
            for snap in snaps:
                rotten = set(snap.verify())
                bad += [f"{role} snapshot {kind} of step {snap.step} (generation {snap.metadata.get('generation')}, "
                        f"rank {snap.metadata.get('rank')}) held on rank {rank}" for kind in sorted(rotten)]
                good = [kind for kind in snap.tensors if kind not in rotten]
                if good:
                    out.append((role, snap, good))
        return out, bad

    def pieces(self, rank: int, role: str, snap: Snapshot, kinds: Sequence[str]) -> list[Copy]:
        """The per-parameter slices of a verified copy, as ``rank`` (views, no copy)."""
        return [Copy(holding=Holding(rank=rank, name=key, start=start, end=end, role=role),
                     data=snap.tensors[kind][offset:offset + end - start], checksum=None)
                for kind, key, start, end, offset in named_pieces(self.model_spec, snap.metadata) if kind in kinds]


def holdings_by_step(model_spec, inventory: Sequence[Mapping[str, Any]]) -> dict[int, list[Holding]]:
    """{step: every slice held of that step}, from the gathered inventory: participant ``r``'s
    entry lists its verified copies as [step, role, metadata, kinds that verify]."""
    out: dict[int, list[Holding]] = {}
    for r, part in enumerate(inventory):
        for step, role, metadata, kinds in part["copies"]:
            out.setdefault(step, []).extend(
                Holding(rank=r, name=key, start=start, end=end, role=role)
                for kind, key, start, end, _ in named_pieces(model_spec, metadata) if kind in kinds)
    return out


# ============================================================ disk checkpoints
class DiskCheckpoints:
    """Per-rank torch.distributed.checkpoint saves of a flat snapshot, loadable into any layout.

    Each rank writes ``run_dir/checkpoints/step-S/gG-rR`` (``no_dist``: no collective,
    so a save never waits for a peer): its three flat tensors, then a ``done`` file
    with the snapshot's metadata (layout, rank) and checksums. A rank of any later
    layout reads the flat tensors of the ranks that held what it needs, checks them
    against the checksums, and cuts out its pieces (``named_pieces``)."""

    def __init__(self, run_dir: str, model_spec) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.model_spec = model_spec
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._writer, name="disk-checkpoints", daemon=True)
        self._thread.start()

    def submit(self, snap: Snapshot, *, generation: int, rank: int) -> None:
        """Write ``snap`` on the writer thread: neither training nor replication waits. The
        snapshot is pinned only until the writer has its private copy (a memcpy), so the
        snapshotter, which wants the buffer back a step later, does not skip a step."""
        snap.pin()
        self._queue.put((snap, generation, rank))

    def _writer(self) -> None:
        import torch.distributed.checkpoint  # noqa: F401 - the first import takes ~1 s: not on a save's clock

        while True:
            snap, generation, rank = self._queue.get()
            try:
                copy = Snapshot(step=snap.step, tensors={k: t.clone() for k, t in snap.tensors.items()},
                                checksums=dict(snap.checksums), checksum_kind=snap.checksum_kind,
                                metadata=dict(snap.metadata), complete=True)
            finally:
                snap.unpin()
            try:
                self.save(copy, generation=generation, rank=rank)
            except Exception as exc:  # a failed checkpoint is logged; in-memory snapshots still protect the job
                log.warning("disk checkpoint of step %d failed: %r", snap.step, exc)
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the checkpoints submitted so far to be on disk (False:
        some still are not). A recovery reading the disk first lets its own writes land: a
        checkpoint handed to the writer a step ago is one the job has."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def save(self, snap: Snapshot, *, generation: int, rank: int) -> Path:
        import torch.distributed.checkpoint as dcp

        path = self.root / f"step-{snap.step:08d}" / f"g{generation}-r{rank}"
        path.mkdir(parents=True, exist_ok=True)
        dcp.save(dict(snap.tensors), storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
        done = {"step": snap.step, "metadata": snap.metadata, "checksums": snap.checksums,
                "checksum_kind": snap.checksum_kind,
                "numel": {kind: t.numel() for kind, t in snap.tensors.items()}}
        (path / "done").write_text(json.dumps(done))
        return path

    def _saved(self, step_dir: Path) -> list[tuple[Path, dict]]:
        out = []
        for rank_dir in sorted(step_dir.iterdir()):
            try:
                out.append((rank_dir, json.loads((rank_dir / "done").read_text())))
            except (OSError, ValueError):
                continue  # not complete (the rank died while saving)
        return out

    def steps_covering(self, needs: Mapping[str, Sequence[tuple[int, int]]]) -> list[int]:
        if not self.root.exists():
            return []
        out = []
        for step_dir in self.root.glob("step-*"):
            holdings = [Holding(rank=0, name=key, start=a, end=b)
                        for _, done in self._saved(step_dir)
                        for _, key, a, b, _ in named_pieces(self.model_spec, done["metadata"])]
            transfers, _ = plan_transfers({0: needs}, holdings)
            if transfers is not None:
                out.append(int(step_dir.name.split("-")[1]))
        return out

    def load(self, step: int, needs: Mapping[str, Sequence[tuple[int, int]]]) -> tuple[dict[str, torch.Tensor], int]:
        """({"kind/name": tensor of my needed span}, bytes read); Unrecoverable if a file is corrupt."""
        import torch.distributed.checkpoint as dcp

        out = {name: torch.empty(spans[0][1] - spans[0][0]) for name, spans in needs.items()}
        read = 0
        for rank_dir, done in self._saved(self.root / f"step-{step:08d}"):
            wanted = [p for p in named_pieces(self.model_spec, done["metadata"])
                      if p[1] in needs and p[2] < needs[p[1]][0][1] and p[3] > needs[p[1]][0][0]]
            if not wanted:
                continue
            flat = {kind: torch.empty(n) for kind, n in done["numel"].items()}
            dcp.load(flat, storage_reader=dcp.FileSystemReader(str(rank_dir)), no_dist=True)
            for kind, t in flat.items():
                if chunk_checksums(t, done.get("checksum_kind", "crc32")) != list(done["checksums"].get(kind, [])):
                    raise Unrecoverable(f"disk checkpoint {rank_dir}: {kind} does not match its checksum")
                read += t.numel() * t.element_size()
            for kind, key, a, b, offset in wanted:
                lo, hi = needs[key][0]
                x, y = max(a, lo), min(b, hi)
                out[key][x - lo:y - lo].copy_(flat[kind][offset + x - a:offset + y - a])
        return out, read


# ====================================================== one generation's comms
@dataclass
class Stopped:
    """Why a generation ended (other than finishing)."""

    cause: str
    noticed: float
    """time.monotonic() when this worker noticed."""
    noticed_time: float
    at_step: int
    planned: Plan | None = None
    trained: bool = True
    """False if the generation ended before it could train (a failure during a recovery)."""


@dataclass
class Resume:
    """What the next generation needs to know about the one before."""

    cause: str
    reason: str
    noticed: float
    noticed_time: float
    plan_wait_s: float
    old_generation: int
    old_layout: str
    at_step: int


@dataclass
class Restored:
    """The outcome of TRANSFERRING on one rank."""

    step: int
    at_step: int
    tensors: dict[str, torch.Tensor] | None = None
    received: int = 0
    local: int = 0
    from_disk: bool = False
    bad_copies: list[str] = field(default_factory=list)
    rebuild_s: float = 0.0
    transfer_s: float = 0.0


class ElasticWorker:
    """Runs one worker through generations (see the module docstring)."""

    def __init__(self, spec, launch_plan: Plan, launch_rank: int, *, device: torch.device, metrics,
                 settings: ElasticSettings, etcd: str = "", etcd_prefix: str = "/tenax",
                 faults: Sequence[Fault] = (), growth_id: str = "") -> None:
        self.spec, self.device, self.metrics, self.settings = spec, device, metrics, settings
        self.launch_plan, self.launch_rank = launch_plan, launch_rank
        me = launch_plan.worker(launch_rank)
        self.node, self.slot = os.environ.get("TENAX_NODE_ID") or me.node, me.slot
        if self.node != me.node:  # the launch plan is authoritative for where I run
            self.node = me.node
        self.faults = list(faults)
        # three buffer sets: the replicator pins the step its buddy holds (trainer.transfer)
        self.snapper = Snapshotter(SnapshotSettings(buffers=3, fence_timeout_s=settings.collective_timeout_s))
        self.copies = Copies(self.snapper, spec.model)
        self.disk = (DiskCheckpoints(settings.run_dir, spec.model)
                     if settings.run_dir and settings.checkpoint_every else None)
        self.generation = 0
        self.watcher: AbortWatcher | None = None
        self._watcher_lock = threading.Lock()
        self.plans: PlanWatcher | None = None
        from protos.keys import Keys

        self.keys = Keys(etcd_prefix)
        self.growth_id = growth_id
        """Set for a worker started for a two-phase growth: it prepares before it joins."""
        if etcd:
            self.plans = PlanWatcher(etcd, self.keys.job_plan(launch_plan.job_id), on_plan=self._on_plan)
        self.snapshot_every = 1 if settings.snapshot_every == "auto" else int(settings.snapshot_every)
        self.recoveries: list[RecoveryRecord] = []
        self._last_step = -1
        self._fired: set[Fault] = set()
        """Newest step this process committed (at_step of a recovery that fails before training)."""
        self._current_gen: _Generation | None = None
        self._running_step: int | None = None
        """The step being run (None between generations); read by the plan watch thread."""
        self._old_rank: dict[int, int] = {}
        """generation -> the rank this worker trained as in it (fault injection addresses old ranks)."""
        threading.Thread(target=_warm_up_layout_math, args=(spec.model,), name="warm-up", daemon=True).start()
        self.snapshots_on = os.environ.get("TENAX_SNAPSHOTS", "1") != "0"
        """TENAX_SNAPSHOTS=0 turns snapshots and replication off (benchmarks: their overhead)."""

    # --------------------------------------------------------------- driver
    def run(self) -> int:
        plan, rank = self.launch_plan, self.launch_rank
        if self.growth_id:
            joined = self._prepare_to_join(plan, rank)
            if joined is None:
                return 0  # the growth was abandoned, or a newer plan has no place for me
            plan, rank = joined
        resume: Resume | None = None
        if plan.generation > 1:  # started by the agent for a later generation: I join with no state
            resume = Resume(cause="join", reason=plan.reason, noticed=time.monotonic(), noticed_time=time.time(),
                            plan_wait_s=0.0, old_generation=0, old_layout="", at_step=-1)
        while True:
            stopped = self._run_generation(plan, rank, resume)
            if stopped is None:
                return 0  # trained to the end, or served my copies as an idle survivor
            if self.plans is None:
                raise RuntimeError(f"training interrupted ({stopped.cause}) and no etcd to read a new plan from")
            old_plan = plan
            plan = stopped.planned or self.plans.wait_newer(old_plan.generation, self.settings.plan_wait_s)
            plan_wait_s = time.monotonic() - stopped.noticed
            rank = rank_in_plan(plan, self.node, self.slot)
            if rank is None and (self.node, self.slot) not in idle_survivors(plan):
                log.warning("no place for %s/%d in generation %d: exiting", self.node, self.slot, plan.generation)
                return 0
            if resume is not None and not stopped.trained:
                # a failure during a recovery: one outage, timed from the first notice
                resume = dataclasses.replace(resume, cause=f"{resume.cause}+{stopped.cause}", reason=plan.reason,
                                             plan_wait_s=time.monotonic() - resume.noticed)
            else:
                resume = Resume(cause=stopped.cause, reason=plan.reason, noticed=stopped.noticed,
                                noticed_time=stopped.noticed_time, plan_wait_s=plan_wait_s,
                                old_generation=old_plan.generation,
                                old_layout=f"dp{old_plan.dp}pp{old_plan.pp}z{old_plan.zero_stage}",
                                at_step=stopped.at_step)

    def _on_plan(self, plan: Plan) -> None:
        """Watch thread: a newer plan aborts the running generation if it switches now, or if
        its switch step is already behind the step this worker is running (it saw the plan
        too late to stop at the boundary; its peers did and left)."""
        with self._watcher_lock:
            watcher, generation = self.watcher, self.generation
        running = self._running_step  # read after ``newest`` was published (see _train)
        late = plan.switch_at_step >= 0 and running is not None and running > plan.switch_at_step
        if watcher is not None and plan.generation > generation and (plan.switch_at_step < 0 or late):
            watcher.abort(f"plan generation {plan.generation}: {plan.reason}")

    def _switch_now_plan(self, generation: int) -> str | None:
        """The reason to give up forming ``generation``: a newer plan that switches now (the
        controller re-planned around a participant that died, maybe before it joined)."""
        newest = self.plans.newest if self.plans is not None else None
        if newest is not None and newest.generation > generation and newest.switch_at_step < 0:
            return f"plan generation {newest.generation} appeared while forming: {newest.reason}"
        return None

    # ------------------------------------------------------- growth: PREPARING
    def _prepare_to_join(self, launch: Plan, rank: int) -> tuple[Plan, int] | None:
        """PREPARING then WAIT FOR COMMIT (module docstring): (plan to join, my rank in it), or
        None when no plan takes me in (exit 0)."""
        if self.plans is None:
            raise RuntimeError("TENAX_GROWTH_ID needs TENAX_ETCD: a prepared worker waits for its plan in etcd")
        self._warm_up(launch, rank)
        self._announce_ready()
        try:
            plan = self.plans.wait_newer(launch.generation - 1, self.settings.prepare_wait_s)
        except TimeoutError:
            log.warning("growth %s: no plan generation %d within %.0f s (abandoned): exiting", self.growth_id,
                        launch.generation, self.settings.prepare_wait_s)
            return None
        mine = rank_in_plan(plan, self.node, self.slot)
        if mine is None:
            log.warning("growth %s: plan generation %d has no place for %s/%d: exiting", self.growth_id,
                        plan.generation, self.node, self.slot)
            return None
        log.info("growth %s: joining plan generation %d as rank %d", self.growth_id, plan.generation, mine)
        return plan, mine

    def _warm_up(self, plan: Plan, rank: int) -> None:
        """Everything a joiner can do before the plan is final: the slow first-time work of a
        fresh process (imports, lazy torch initialisation of every module kind, the layout
        math of the transfer, a CUDA context), and a check that the store answers (a joiner
        that cannot reach it fails now, and the growth is abandoned, instead of at the switch)."""
        from trainer.model import build_stage
        from trainer.parallel import ParallelLayout
        from trainer.train import Trainer  # noqa: F401 - the import is part of the warm-up

        layout = ParallelLayout.from_plan(plan, micro_batch_size=self.spec.micro_batch_size)
        state_layout(self.spec.model, layout)
        dp_rank, pp_rank = layout.coords(rank)
        stage = build_stage(self.spec.model, layers=layout.stage_layers(pp_rank), is_first=pp_rank == 0,
                            is_last=pp_rank == layout.pp - 1, device="meta")
        stage.to_empty(device=self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        host, _, port = plan.store_address.rpartition(":")
        try:
            dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                          timeout=timedelta(seconds=self.settings.store_timeout_s))
        except Exception as exc:  # noqa: BLE001 - torch raises several types
            raise StoreUnreachable(f"cannot reach the rendezvous store at {plan.store_address}: {exc}") from None

    def _announce_ready(self) -> None:
        """READY in etcd; the controller switches once every joiner of the growth said so."""
        from protos.records import JoinerRecord

        record = JoinerRecord(growth_id=self.growth_id, node=self.node, slot=self.slot, state="READY",
                              pid=os.getpid(), time=time.time(), prepare_s=_process_age_s())
        try:
            self.plans.put(self.keys.job_joiner(self.launch_plan.job_id, self.node, self.slot), record.to_json(),
                           timeout_s=self.settings.store_timeout_s)
        except (TimeoutError, OSError) as exc:  # the growth times out and is abandoned; I exit with it
            log.warning("growth %s: could not say READY: %r", self.growth_id, exc)
        else:
            log.info("growth %s: ready after %.2f s", self.growth_id, record.prepare_s)

    def _pending_switch(self) -> Plan | None:
        newest = self.plans.newest if self.plans is not None else None
        if newest is not None and newest.generation > self.generation and newest.switch_at_step >= 0:
            return newest
        return None

    # ------------------------------------------------------- one generation
    def _run_generation(self, plan: Plan, rank: int | None, resume: Resume | None) -> Stopped | None:
        """FORMING -> (TRANSFERRING) -> RUNNING; None when training is done (or I was an idle
        survivor that only served its copies). ``rank`` is None for an idle survivor."""
        from trainer.parallel import ParallelLayout
        from trainer.train import Trainer

        layout = ParallelLayout.from_plan(plan, micro_batch_size=self.spec.micro_batch_size)
        idle = idle_survivors(plan)
        gen = _Generation(plan, rank, self.settings, self.device, replicate=self.snapshots_on)
        trainer = None
        restored: Restored | None = None
        try:
            started = time.monotonic()
            if resume is not None and idle:
                # Idle survivors may hold the only good copy of a slice: they take part in
                # the transfer (ranks world.. of a transfer group), then leave; the training
                # ranks form the generation's own group afterwards.
                restored = self._transfer_with_idle(plan, rank, layout, resume, idle)
                if rank is None:
                    return None
                started = time.monotonic()
            watcher = self._form(gen)
            layout = ParallelLayout.from_plan(plan, micro_batch_size=self.spec.micro_batch_size)
            trainer = Trainer(self.spec, layout, rank, device=self.device, generation=plan.generation,
                              metrics=_RecoverableMetrics(self.metrics, self))
            rebuild_s = time.monotonic() - started
            if resume is not None:
                if restored is None:
                    restored = self._transfer(plan.generation, gen.rank, layout, resume, watcher.wait)
                else:
                    rebuild_s += restored.rebuild_s
                self._resume(trainer, restored, resume, rebuild_s)
            return self._train(gen, trainer)
        except Interruptions as exc:
            return self._stopped(gen, trainer, exc)
        except StoreUnreachable as exc:
            if resume is None or self.plans is None:  # a bad launch: fail fast (exit 1)
                raise
            return self._stopped(gen, trainer, exc)  # mid-recovery: the next plan may move the store
        except Exception as exc:
            if gen.watcher is not None and gen.watcher.check_store():  # e.g. a gloo error after the abort
                return self._stopped(gen, trainer, exc)
            raise
        finally:
            self._running_step = None
            if gen.replicator is not None:
                # Its replicas stay available (``Copies``): both buffers — the newest replica may
                # be one step ahead of what a pipeline neighbour committed (it failed in the
                # step's last all-gather) — and a round that arrived but was never finished.
                gen.replicator.close()
                self.copies.keep_replicas_of(gen.replicator)
            gen.close()
            with self._watcher_lock:
                self.watcher = None

    def _form(self, gen: "_Generation") -> AbortWatcher:
        watcher = gen.form(should_abort=lambda: self._switch_now_plan(gen.plan.generation))
        with self._watcher_lock:
            self.watcher, self.generation = watcher, gen.plan.generation
        self._current_gen = gen
        reason = self._switch_now_plan(gen.plan.generation)  # arrived between the rendezvous and now
        if reason is not None:
            watcher.abort(reason)
        return watcher

    def _transfer_with_idle(self, plan: Plan, rank: int | None, layout, resume: Resume,
                            idle: list[tuple[str, int]]) -> "Restored":
        """TRANSFERRING in a group of the plan's workers plus its idle survivors."""
        started = time.monotonic()
        me = rank if rank is not None else plan.world_size + idle.index((self.node, self.slot))
        xfer = _Generation(plan, me, self.settings, self.device, replicate=False,
                           prefix=f"{plan.store_prefix}transfer/", world_size=plan.world_size + len(idle))
        try:
            watcher = self._form(xfer)
            rebuild_s = time.monotonic() - started
            restored = self._transfer(plan.generation, me, layout, resume, watcher.wait)
            restored.rebuild_s = rebuild_s
            return restored
        finally:
            xfer.close()
            with self._watcher_lock:
                self.watcher = None

    def _stopped(self, gen: "_Generation", trainer, exc: BaseException) -> Stopped:
        watcher = gen.watcher
        if watcher is not None and not watcher.aborted:
            watcher.signal_peers(f"rank {gen.rank}: {type(exc).__name__}: {str(exc)[:200]}")
        cause = {CommAborted: "comm-aborted", CommFailed: "comm-failed", TimeoutError: "timeout",
                 StoreUnreachable: "store-unreachable"}.get(
            type(exc), "comm-failed")
        if watcher is not None and watcher.reason.startswith("plan generation"):
            cause = "plan"
        noticed = watcher.aborted_at if watcher is not None and watcher.aborted_at else time.monotonic()
        noticed_time = time.time() - (time.monotonic() - noticed)
        at_step = trainer.step if trainer is not None else self._last_step
        log.warning("rank %s generation %d stopped at step %d: %s", gen.rank, gen.plan.generation, at_step, exc)
        return Stopped(cause=cause, noticed=noticed, noticed_time=noticed_time, at_step=at_step,
                       trained=gen.trained)

    # ------------------------------------------------------------ TRANSFERRING
    def _transfer(self, generation: int, rank: int, layout, resume: Resume, wait) -> "Restored":
        """Collective over the current default group: one gather of what every participant
        holds (its verified copies, one line per snapshot), the newest step they cover
        together, one all-to-all of the slices (``reshard_state``), else the disk checkpoint.
        Every rank derives each decision from the same gathered facts (the plan, the
        corrupt arrivals), so no further round is needed to agree on it."""
        started = time.monotonic()
        self._inject_transfer_faults(generation, rank, resume.old_generation)
        self.snapper.wait(self.settings.collective_timeout_s)  # no copy may still be writing a buffer
        needs = state_layout(self.spec.model, layout)
        held, bad = self.copies.offered(rank)  # a bad copy is never advertised
        inventory = gather_json({"at_step": resume.at_step, "copies": [
            [snap.step, role, {k: v for k, v in snap.metadata.items() if k != "step"}, kinds]
            for role, snap, kinds in held]}, wait=wait)
        at_step = max(part["at_step"] for part in inventory)
        by_step = holdings_by_step(self.spec.model, inventory)
        step = choose_resume_step(needs, by_step)
        restored = Restored(step=step if step is not None else -1, at_step=at_step, bad_copies=list(bad))
        mine = needs.get(rank, {})
        if step is not None:
            dest = {name: (spans[0][0], torch.empty(spans[0][1] - spans[0][0])) for name, spans in mine.items()}
            copies = [c for role, snap, kinds in held if snap.step == step
                      for c in self.copies.pieces(rank, role, snap, kinds)]
            try:
                report = reshard_state(needs, copies, dest, rank=rank, wait=wait, inventory=by_step[step],
                                       settings=TransferSettings(timeout_s=self.settings.transfer_timeout_s))
                restored.received, restored.local = report.bytes_received, report.bytes_local
                restored.bad_copies += report.bad_copies
                restored.tensors = {name: t for name, (_, t) in dest.items()}
            except Unrecoverable as exc:
                log.warning("rank %d: in-memory copies cannot cover the new layout: %s", rank, exc)
        if restored.tensors is None:  # on every rank alike (see above)
            restored.step, restored.tensors, restored.received = self._load_from_disk(mine, wait)
            restored.local, restored.from_disk = 0, True
        restored.transfer_s = time.monotonic() - started
        return restored

    def _resume(self, trainer, restored: "Restored", resume: Resume, rebuild_s: float) -> None:
        trainer.import_state({"tensors": restored.tensors, "step": restored.step, "committed_step": restored.step})
        self._last_step = restored.step
        record = RecoveryRecord(
            cause=resume.cause, reason=resume.reason, old_generation=resume.old_generation,
            new_generation=trainer.generation, old_layout=resume.old_layout, new_layout=trainer.layout.describe(),
            rank=trainer.rank, at_step=restored.at_step, resumed_step=restored.step,
            steps_lost=steps_lost(restored.at_step, restored.step), noticed_time=resume.noticed_time,
            plan_wait_s=resume.plan_wait_s, rebuild_s=rebuild_s, transfer_s=restored.transfer_s,
            total_s=time.monotonic() - resume.noticed, bytes_moved=restored.received, bytes_local=restored.local,
            from_disk=restored.from_disk, bad_copies=restored.bad_copies, time=time.time())
        self.recoveries.append(record)
        self.metrics.write(record.to_dict())

    def _load_from_disk(self, mine, wait) -> tuple[int, dict[str, torch.Tensor], int]:
        if self.disk is not None and not self.disk.flush(self.settings.transfer_timeout_s):
            log.warning("a disk checkpoint is still being written after %.0f s; reading what is on disk",
                        self.settings.transfer_timeout_s)
        steps = self.disk.steps_covering(mine) if self.disk is not None else []
        step = common_disk_step(gather_json(steps, wait=wait))
        if step is None:
            raise Unrecoverable("no in-memory copy and no disk checkpoint covers the new layout")
        tensors, read = self.disk.load(step, mine) if mine else ({}, 0)
        return step, tensors, read

    def _inject_transfer_faults(self, generation: int, rank: int, old_generation: int) -> None:
        """Test hooks at the start of TRANSFERRING: die (a failure during a recovery), or let
        this process's copies rot in memory after their checksums were taken."""
        for f in self.faults:
            if f.kind == "kill-in-transfer" and f.gen == generation and f.rank == rank:
                _kill_self()
        for f in self.faults:
            if f.gen != old_generation or f.rank != self._old_rank.get(old_generation, -1) or f in self._fired:
                continue
            self._fired.add(f)  # once: flipping the same byte again would repair it
            if f.kind == "corrupt-own":
                for snap in self.copies.own():
                    corrupt(snap, next(iter(sorted(snap.tensors))))
            elif f.kind == "corrupt-replica":
                for snap in self.copies.replicas:
                    corrupt(snap, next(iter(sorted(snap.tensors))))

    # ----------------------------------------------------------------- RUNNING
    def _train(self, gen: "_Generation", trainer) -> Stopped | None:
        self._old_rank[gen.plan.generation] = gen.rank
        views = flat_state(trainer)
        meta = snapshot_metadata(trainer.layout, gen.rank, gen.plan.generation)
        trainer.before_update = self.snapper.fence
        # every rank says in the step's all-reduce whether its replication round still moves;
        # any -> all skip that boundary's round (rounds on both ends of a pair stay matched)
        trainer.vote = lambda: 1 if gen.replicator is not None and gen.replicator.busy else 0
        kill = self._kill_fault(gen)
        gen.first_step = trainer.step
        gen.trained = True
        threading.Thread(target=_warm_up_layout_math, args=(self.spec.model, trainer.layout),
                         name="warm-up", daemon=True).start()
        while trainer.step < self.spec.steps:
            # Publish the step about to run before looking for a planned switch; the watch
            # thread publishes the plan before looking at this: one of the two sees the other.
            self._running_step = trainer.step + 1
            planned = self._pending_switch()
            if planned is not None and trainer.step >= planned.switch_at_step:
                self._running_step = None
                return self._switch(gen, trainer, planned, views, meta)
            if kill is not None and trainer.step == kill.step:
                self._fire_kill(gen, kill)
            trainer.train_step()
            self._last_step = trainer.step
            if self.snapshots_on and trainer.step % self.snapshot_every == 0:
                self._snapshot_boundary(gen, trainer.step, views, meta, round_moving=trainer.votes > 0)
            self._tune_snapshot_interval(gen, trainer)
        self._running_step = None
        comm.wait(dist.barrier(async_op=True), "final barrier")
        return None

    def _snapshot_boundary(self, gen: "_Generation", step: int, views, meta, *, round_moving: bool = False) -> None:
        """After a committed step, all on the training thread and without waiting in steady
        state: finish the replication round of the previous boundary (a step later it is
        done), snapshot (inline for a small CPU state), hand a due disk checkpoint to its
        writer, and post this boundary's round. ``round_moving``: some rank's (big) round
        is still moving, so every rank leaves this boundary out, its snapshot included: the
        own snapshots must stay at the steps the rounds carry, or a recovery would find no
        step that its own copies and the buddies' replicas both cover."""
        cpu_started = time.thread_time()
        try:
            replicator = gen.replicator_at_boundary()
            if replicator is not None and round_moving:
                replicator.skipped += 1
                return
            if replicator is not None:
                replicator.complete()  # first: the older step it held pinned is free again for begin()
            self.snapper.begin(step, views, meta)
            latest = self.snapper.latest  # on the background path (CUDA), the previous step's
            self._checkpoint(gen, latest)
            if replicator is not None:
                replicator.post(latest)
        finally:
            gen.boundary_cpu_s = time.thread_time() - cpu_started

    def _checkpoint(self, gen: "_Generation", latest: Snapshot | None) -> None:
        """Every ``checkpoint_every`` steps, the snapshot of that step goes to disk (a background
        snapshot not complete yet at its boundary goes at the next one)."""
        every = self.settings.checkpoint_every
        if self.disk is None or not every or latest is None or latest.step % every or latest.step == gen.checkpointed:
            return
        gen.checkpointed = latest.step
        self.disk.submit(latest, generation=gen.plan.generation, rank=gen.rank)

    def _switch(self, gen: "_Generation", trainer, planned: Plan, views, meta) -> Stopped:
        """SWITCHING: the state of step S is snapshotted and replicated before anyone moves."""
        noticed, noticed_time = time.monotonic(), time.time()
        timeout_s = self.settings.collective_timeout_s
        # The replicator exists if this generation passed a snapshot boundary (all ranks alike);
        # before the first one nothing of this generation is replicated and nobody is lost in a
        # planned switch: the transfer uses the own snapshots.
        replicator = gen.replicator
        if replicator is not None:
            replicator.complete()  # the last boundary's round: no buffer is pinned any more
        snap = self.snapper.wait(timeout_s)
        if snap is None or snap.step != trainer.step:  # skipped (buffer busy) or not due: take it now
            self.snapper.take(trainer.step, views, meta, timeout_s=timeout_s)
        if replicator is not None:
            # one more round on every rank (rounds must match), finished on every rank: each
            # buddy holds step S when we leave
            replicator.post(self.snapper.latest)
            replicator.complete()
        return Stopped(cause="switch", noticed=noticed, noticed_time=noticed_time, at_step=trainer.step,
                       planned=planned)

    def _tune_snapshot_interval(self, gen: "_Generation", trainer) -> None:
        """``snapshot_every: auto``: after 3 steps all ranks agree on the smallest hidden interval."""
        if self.settings.snapshot_every != "auto" or trainer.step != gen.first_step + 3:
            return
        stats = self.snapper.stats
        waited = gen.replicator.max_wait_s if gen.replicator is not None else 0.0
        mine = auto_snapshot_interval(stats.last_copy_s + stats.last_checksum_s, gen.last_step_s or 0.0, waited)
        self.snapshot_every = max(gather_json(mine, wait=gen.watcher.wait))

    # ------------------------------------------------------------- faults
    def _kill_fault(self, gen: "_Generation") -> Fault | None:
        for f in self.faults:
            if f.kind == "kill" and f.gen == gen.plan.generation and f.rank == gen.rank:
                return f
        return None

    def _fire_kill(self, gen: "_Generation", fault: Fault) -> None:
        """Die like a lost machine. ``when=between``/``mid``: once ``fault.step`` is recoverable
        as it is in steady state — the round that carries its snapshot completed here, so the
        buddy holds it, and the disk checkpoints due are written — either right here between
        steps or a little into the next step. ``when=posted``: at once, with the round this
        boundary posted still to move (the buddy may keep only the round before)."""
        if fault.when == "posted":
            _kill_self()
        if gen.replicator is not None:
            gen.replicator.complete()
        if self.disk is not None:  # as in steady state: the checkpoints due so far are on disk
            self.disk.flush(self.settings.collective_timeout_s)
        if fault.when == "mid":
            threading.Timer(0.02, _kill_self).start()
        else:
            _kill_self()



def _warm_up_layout_math(model_spec, layout=None) -> None:
    """Off the critical path: build every module type once on the meta device (the first
    meta construction of a kind a rank never built itself, e.g. the embedding for a
    last-stage rank, costs ~0.5-1 s of lazy torch initialisation), and with ``layout`` the
    stage shapes of every stage of it (memoised in trainer.model): a recovery from this
    layout cuts its copies with them, and a next layout that keeps the pipeline stages
    needs no new ones (``state_layout``/``named_pieces``)."""
    from trainer.model import stage_param_shapes

    try:
        stage_param_shapes(model_spec, layers=range(0, 1), is_first=True, is_last=True)
        if layout is not None:
            state_layout(model_spec, layout)
    except Exception as exc:  # only an optimisation
        log.debug("warm-up failed: %r", exc)


def flat_state(trainer) -> dict[str, torch.Tensor]:
    """The owned state as three flat live views (see ``named_pieces``)."""
    opt = trainer.optimizer
    return {"param": trainer.flat.params[opt.lo:opt.hi], "exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq}


class _RecoverableMetrics:
    """Adds the recoverable step to every step line: the step of the replica this rank holds for
    its ward (without replication: its own latest snapshot). Every rank holds exactly one ward's
    replica, so the minimum over the ranks — what the controller takes — is the step the job can
    recover to (copies are verified at use: one that rotted in memory is caught then)."""

    def __init__(self, inner, worker: ElasticWorker) -> None:
        self.inner, self.worker = inner, worker

    def write(self, record: dict) -> None:
        gen = self.worker._current_gen
        if "step" in record:
            record["pid"] = os.getpid()  # lets the control side (and tests) see a survivor was never restarted
        if gen is not None and "step" in record:
            if gen.replicating:  # the ward's replica held here (one round behind); the job takes the min
                replica = gen.replicator.replica if gen.replicator is not None else None
                record["recoverable_step"] = replica.step if replica is not None else 0
                if gen.replicator is not None:  # rounds left out while a big one was moving
                    record["replication_skipped"] = gen.replicator.skipped
            else:
                latest = self.worker.snapper.latest
                record["recoverable_step"] = latest.step if latest is not None else 0
            gen.last_step_s = record.get("step_time")
            if gen.boundary_cpu_s is not None:  # the boundary after the previous step
                record["boundary_cpu_s"], gen.boundary_cpu_s = gen.boundary_cpu_s, None
        self.inner.write(record)


class _Generation:
    """The communicators of one plan generation: default group, abort watcher, replication."""

    def __init__(self, plan: Plan, rank: int | None, settings: ElasticSettings, device: torch.device,
                 *, replicate: bool = True, prefix: str | None = None, world_size: int | None = None) -> None:
        self.plan, self.rank, self.settings, self.device = plan, rank, settings, device
        self.replicate = replicate
        self.prefix = plan.store_prefix if prefix is None else prefix
        self.world_size = plan.world_size if world_size is None else world_size
        self.watcher: AbortWatcher | None = None
        self.ring = buddy_ring({w.rank: w.node for w in plan.workers}) if replicate and rank is not None else {}
        """{rank: buddy} of the generation, empty when it does not replicate."""
        self.replicator: BuddyReplicator | None = None
        self.checkpointed = -1
        """Step of the last snapshot handed to the disk writer."""
        self.first_step = 0
        self.last_step_s: float | None = None
        self.boundary_cpu_s: float | None = None
        """CPU time of the training thread in the last snapshot boundary (seconds), for the
        next step line (``boundary_cpu_s``)."""
        self.trained = False
        """True once this generation has its state (fresh start or restored) and trains."""

    def form(self, should_abort=None) -> AbortWatcher:
        """Rendezvous (abortable: ``should_abort()`` -> a reason to give up, see
        trainer.abort.rendezvous), then the watcher (replication: ``replicator_at_boundary``)."""
        from trainer.train import backend_for

        host, _, port = self.plan.store_address.rpartition(":")
        timeout_s = self.settings.store_timeout_s
        try:
            store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                                  timeout=timedelta(seconds=timeout_s))
        except Exception as exc:  # noqa: BLE001 - torch raises several types; not an interruption of training
            raise StoreUnreachable(f"cannot reach the rendezvous store at {self.plan.store_address} "
                                   f"within {timeout_s:.0f}s: {exc}") from None
        backend = backend_for(self.device)
        form_group(store, self.prefix, rank=self.rank, world_size=self.world_size,
                   backend=backend, timeout_s=self.settings.collective_timeout_s,
                   device_id=self.device if self.device.type == "cuda" else None, should_abort=should_abort)
        self.watcher = AbortWatcher(AbortSettings(collective_timeout_s=self.settings.collective_timeout_s,
                                                  sliced_waits=backend == "gloo"), rank=self.rank)
        self.watcher.register(dist.group.WORLD)
        # its own connection, short timeout: the abort key is read from inside a wait, so a
        # store host that hangs must not hold the wait longer than a few seconds
        self.watcher.watch_store(generation_store(host, int(port), self.prefix,
                                                  timeout_s=min(5.0, self.settings.store_timeout_s)))
        comm.set_waiter(self.watcher.wait)
        return self.watcher

    @property
    def replicating(self) -> bool:
        return bool(self.ring)

    def replicator_at_boundary(self) -> BuddyReplicator | None:
        """The generation's replicator, made at its first snapshot boundary, which every rank of
        the generation reaches after the same step (making the pair groups is collective).
        Not in ``form``: a recovery should not wait for groups its first step does not use.
        Like the gloo connect of ``form_group``, this connect is bounded by the collective
        timeout only; a peer that dies inside the step before it fails that step's
        collectives first, so the window is the moment between a step and its boundary."""
        if self.replicator is None and self.replicating:
            self.replicator = BuddyReplicator.for_ring(
                self.ring, self.rank, wait=self.watcher.wait, wait_event=self.watcher.wait_for,
                settings=ReplicationSettings(timeout_s=self.settings.collective_timeout_s))
        return self.replicator

    def close(self) -> None:
        comm.set_waiter(None)
        if self.replicator is not None:
            self.replicator.close()
        if self.watcher is not None:
            self.watcher.close()
