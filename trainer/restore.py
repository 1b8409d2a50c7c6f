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
from trainer.snapshot import Snapshotter
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


def transfer_state(*, model_spec, rank: int, layout, resume: Resume, wait, snapper: Snapshotter, copies: Copies,
                   disk: DiskCheckpoints | None, settings: ElasticSettings, started: float) -> Restored:
    """Collective over the current default group: one gather of what every participant
    holds (its verified copies, one line per snapshot), the newest step they cover
    together, one all-to-all of the slices (``reshard_state``), else the disk checkpoint.
    Every rank derives each decision from the same gathered facts (the plan, the
    corrupt arrivals), so no further round is needed to agree on it. ``started``:
    time.monotonic() when TRANSFERRING began."""
    snapper.wait(settings.collective_timeout_s)  # no copy may still be writing a buffer
    needs = state_layout(model_spec, layout)
    held, bad = copies.offered(rank)  # a bad copy is never advertised
    inventory = gather_json({"at_step": resume.at_step, "copies": [
        [snap.step, role, {k: v for k, v in snap.metadata.items() if k != "step"}, kinds]
        for role, snap, kinds in held]}, wait=wait)
    at_step = max(part["at_step"] for part in inventory)
    by_step = holdings_by_step(model_spec, inventory)
    step = choose_resume_step(needs, by_step)
    restored = Restored(step=step if step is not None else -1, at_step=at_step, bad_copies=list(bad))
    mine = needs.get(rank, {})
    if step is not None:
        dest = {name: (spans[0][0], torch.empty(spans[0][1] - spans[0][0])) for name, spans in mine.items()}
        pieces = [c for role, snap, kinds in held if snap.step == step
                  for c in copies.pieces(rank, role, snap, kinds)]
        try:
            report = reshard_state(needs, pieces, dest, rank=rank, wait=wait, inventory=by_step[step],
                                   settings=TransferSettings(timeout_s=settings.transfer_timeout_s))
            restored.received, restored.local = report.bytes_received, report.bytes_local
            restored.bad_copies += report.bad_copies
            restored.tensors = {name: t for name, (_, t) in dest.items()}
        except Unrecoverable as exc:
            log.warning("rank %d: in-memory copies cannot cover the new layout: %s", rank, exc)
    if restored.tensors is None:  # on every rank alike (see above)
        restored.step, restored.tensors, restored.received = load_from_disk(disk, mine, wait,
                                                                            settings.transfer_timeout_s)
        restored.local, restored.from_disk = 0, restored.tensors is not None
    restored.transfer_s = time.monotonic() - started
    return restored


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


def recovery_record(trainer, restored: Restored, resume: Resume, rebuild_s: float) -> RecoveryRecord:
    """The record of one outage on this rank (``protos.recovery``), timed from the first notice."""
    return RecoveryRecord(
        cause=resume.cause, reason=resume.reason, old_generation=resume.old_generation,
        new_generation=trainer.generation, old_layout=resume.old_layout, new_layout=trainer.layout.describe(),
        rank=trainer.rank, at_step=restored.at_step, resumed_step=restored.step,
        steps_lost=steps_lost(restored.at_step, restored.step), noticed_time=resume.noticed_time,
        plan_wait_s=resume.plan_wait_s, rebuild_s=rebuild_s, transfer_s=restored.transfer_s,
        total_s=time.monotonic() - resume.noticed, bytes_moved=restored.received, bytes_local=restored.local,
        from_disk=restored.from_disk, bad_copies=restored.bad_copies, time=time.time())
