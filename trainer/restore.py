"""TRANSFERRING (trainer/elastic.py): the participants of a new generation agree on the newest
step their verified copies cover together and move the slices each rank needs
(``reshard_state``), else load the newest disk checkpoint all of them can cover; then the
recovery record of the outage."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from protos.recovery import RecoveryRecord
from trainer.checkpoints import DiskCheckpoints
from trainer.copies import Copies, holdings_by_step
from trainer.decisions import choose_resume_step, common_disk_step, steps_lost
from trainer.settings import ElasticSettings
from trainer.sharding import state_layout
from trainer.snapshot import Snapshot, Snapshotter
from trainer.transfer import TransferSettings, Unrecoverable, gather_json, reshard_state

log = logging.getLogger(__name__)


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
    comm_error: str = ""
    """Class of the communication failure that stopped the generation (common.comm_errors)."""
    comm_error_detail: str = ""


@dataclass
class Restored:
    """The outcome of TRANSFERRING on one rank."""

    step: int
    at_step: int
    tensors: dict[str, torch.Tensor] | None = None
    """The state for ``Trainer.import_state``; None when it was restored in place (``into``)."""
    in_place: bool = False
    """The state was written straight into the trainer's own tensors (``into``)."""
    received: int = 0
    local: int = 0
    from_disk: bool = False
    bad_copies: list[str] = field(default_factory=list)
    rebuild_s: float = 0.0
    transfer_s: float = 0.0
    verify_s: float = 0.0
    """Seconds verifying the copies of the resume step this rank holds (checksums)."""
    local_s: float = 0.0
    """Seconds copying ``local`` bytes into place (one copy per contiguous run)."""
    network_s: float = 0.0
    """Seconds of the all-to-all that moved ``received`` bytes."""


VerifiedCopies = list[tuple[str, Snapshot, list[str]]]


def settle_copies(model_spec, rank: int, needs, held: list[tuple[str, Snapshot]], inventory: list[dict],
                  wait) -> tuple[int | None, VerifiedCopies, list[str], float]:
    """The newest step every needed slice has a *verified* copy of: (that step or None, my
    copies of it with the tensors that verify, descriptions of the bad ones, seconds spent
    verifying). Collective: a gather per round.

    Only the copies of the step a recovery would use are verified (not every buffer of every
    own snapshot and replica: that cost a pass over several times the state): pick the
    newest step the advertised copies cover, every rank verifies its copies of it, and the
    bad tensors, gathered, leave the inventory on every rank alike; then pick again. Each
    round either finds nothing bad or removes a bad tensor, so it ends."""
    verified: set[int] = set()
    bad: list[str] = []
    verify_s = 0.0
    mine = inventory[rank]["copies"]
    while True:
        step = choose_resume_step(needs, holdings_by_step(model_spec, inventory))
        if step is None:
            return None, [], bad, verify_s
        rotten: list[list] = []
        started = time.perf_counter()
        for i, (role, snap) in enumerate(held):
            if snap.step != step or i in verified:
                continue
            verified.add(i)
            for kind in snap.verify(mine[i][3]):
                rotten.append([i, kind])
                bad.append(f"{role} snapshot {kind} of step {snap.step} (generation {snap.metadata.get('generation')}, "
                           f"rank {snap.metadata.get('rank')}) held on rank {rank}")
        verify_s += time.perf_counter() - started
        everyone = gather_json(rotten, wait=wait)
        if not any(everyone):
            return step, [(role, snap, mine[i][3]) for i, (role, snap) in enumerate(held)
                          if snap.step == step and mine[i][3]], bad, verify_s
        for r, part in enumerate(everyone):
            for i, kind in part:
                kinds = inventory[r]["copies"][i][3]
                if kind in kinds:
                    kinds.remove(kind)


def transfer_state(*, model_spec, rank: int, layout, resume: Resume, wait, snapper: Snapshotter, copies: Copies,
                   disk: DiskCheckpoints | None, settings: ElasticSettings, started: float,
                   into: dict[str, tuple[int, torch.Tensor]] | None = None) -> Restored:
    """Collective over the current default group: one gather of what every participant
    holds (one line per complete snapshot), the newest step whose copies cover every need
    and verify (``settle_copies``), one all-to-all of the slices (``reshard_state``), else
    the disk checkpoint. Every rank derives each decision from the same gathered facts (the
    plan, the bad copies, the corrupt arrivals), so no further round is needed to agree on
    it. ``started``: time.monotonic() when TRANSFERRING began. ``into``: the trainer's own
    state tensors ({"kind/name": (first element, flat view)}: ``state_destinations``), to
    restore in place: the local pieces become one copy per contiguous run, straight into
    the (GPU) tensors, no staging and no import copy."""
    snapper.wait(settings.collective_timeout_s)  # no copy may still be writing a buffer
    needs = state_layout(model_spec, layout)
    held = copies.held()
    inventory = gather_json({"at_step": resume.at_step, "copies": [
        [snap.step, role, {k: v for k, v in snap.metadata.items() if k != "step"}, list(snap.tensors)]
        for role, snap in held]}, wait=wait)
    at_step = max(part["at_step"] for part in inventory)
    step, mine_held, bad, verify_s = settle_copies(model_spec, rank, needs, held, inventory, wait)
    restored = Restored(step=step if step is not None else -1, at_step=at_step, bad_copies=list(bad),
                        verify_s=verify_s)
    mine = needs.get(rank, {})
    if step is not None:
        dest = into if into is not None else {
            name: (spans[0][0], torch.empty(spans[0][1] - spans[0][0])) for name, spans in mine.items()}
        pieces = [c for role, snap, kinds in mine_held for c in copies.pieces(rank, role, snap, kinds)]
        try:
            report = reshard_state(needs, pieces, dest, rank=rank, wait=wait,
                                   inventory=holdings_by_step(model_spec, inventory)[step],
                                   settings=TransferSettings(timeout_s=settings.transfer_timeout_s))
            restored.received, restored.local = report.bytes_received, report.bytes_local
            restored.local_s, restored.network_s = report.local_s, report.network_s
            restored.bad_copies += report.bad_copies
            if into is None:
                restored.tensors = {name: t for name, (_, t) in dest.items()}
            restored.in_place = into is not None
        except Unrecoverable as exc:
            log.warning("rank %d: in-memory copies cannot cover the new layout: %s", rank, exc)
    if restored.tensors is None and not restored.in_place:  # on every rank alike (see above)
        restored.step, restored.tensors, restored.received = load_from_disk(disk, mine, wait,
                                                                            settings.transfer_timeout_s)
        restored.local, restored.from_disk = 0, restored.tensors is not None
    restored.transfer_s = time.monotonic() - started
    return restored


def state_destinations(trainer) -> dict[str, tuple[int, torch.Tensor]]:
    """The trainer's owned state as reshard destinations: {"kind/name": (first element of the
    parameter's owned slice, live flat view)}; views of three flat tensors, in flat order."""
    opt = trainer.optimizer
    slices = opt.flat.slices_of(opt.lo, opt.hi)
    return {key: (slices[key.split("/", 1)[1]][0], view) for key, view in opt.state_views().items()}


def load_from_disk(disk: DiskCheckpoints | None, mine, wait,
                   timeout_s: float) -> tuple[int, dict[str, torch.Tensor] | None, int]:
    """(step, my needed tensors, bytes read) of the newest disk checkpoint every participant can
    load its part from (collective). With none: (0, None, 0), the initial state, which every
    rank builds itself (a pure function of the seed, DESIGN principle 4): the job starts over
    instead of failing (every copy can be gone before the first checkpoint, e.g. three of four
    ranks lost within seconds)."""
    if disk is not None and not disk.flush(timeout_s):
        log.warning("a disk checkpoint is still being written after %.0f s; reading what is on disk", timeout_s)
    steps = disk.steps_covering(mine) if disk is not None else []
    step = common_disk_step(gather_json(steps, wait=wait))
    if step is None:
        log.warning("no in-memory copy and no disk checkpoint covers the new layout: starting over from step 0")
        return 0, None, 0
    tensors, read = disk.load(step, mine) if mine else ({}, 0)
    return step, tensors, read


def recovery_record(trainer, restored: Restored, resume: Resume, rebuild_s: float,
                    gpu_wait_s: float) -> RecoveryRecord:
    """The record of one outage on this rank (``protos.recovery``), timed from the first notice;
    ``gpu_wait_s``: seconds waited, before rebuilding, for a process exiting on this GPU."""
    return RecoveryRecord(
        cause=resume.cause, reason=resume.reason, old_generation=resume.old_generation,
        new_generation=trainer.generation, old_layout=resume.old_layout, new_layout=trainer.layout.describe(),
        rank=trainer.rank, at_step=restored.at_step, resumed_step=restored.step,
        steps_lost=steps_lost(restored.at_step, restored.step), noticed_time=resume.noticed_time,
        plan_wait_s=resume.plan_wait_s, rebuild_s=rebuild_s, transfer_s=restored.transfer_s,
        total_s=time.monotonic() - resume.noticed, bytes_moved=restored.received, bytes_local=restored.local,
        from_disk=restored.from_disk, bad_copies=restored.bad_copies, time=time.time(),
        verify_s=restored.verify_s, local_s=restored.local_s, network_s=restored.network_s,
        local_gbps=gbps(restored.local, restored.verify_s + restored.local_s),
        network_gbps=gbps(restored.received, restored.network_s),
        comm_error=resume.comm_error, comm_error_detail=resume.comm_error_detail, gpu_wait_s=round(gpu_wait_s, 4))


def gbps(nbytes: int, seconds: float) -> float:
    """Achieved GB/s (1e9 bytes per second); 0 when nothing moved."""
    return round(nbytes / seconds / 1e9, 3) if nbytes and seconds > 0 else 0.0
