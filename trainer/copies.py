"""State copies: every copy of training state a worker holds across generations (its own
snapshots, the buddy replicas it keeps), as the verified per-parameter slices a recovery
moves, and the gathered inventory of them (``holdings_by_step``)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from trainer.decisions import named_pieces
from trainer.reshard import BUDDY, OWNER, Holding
from trainer.snapshot import Snapshot, Snapshotter
from trainer.transfer import BuddyReplicator, Copy


def flat_state(trainer) -> dict[str, torch.Tensor]:
    """The owned state as three flat live views (see ``named_pieces``)."""
    opt = trainer.optimizer
    return {"param": trainer.flat.params[opt.lo:opt.hi], "exp_avg": opt.exp_avg, "exp_avg_sq": opt.exp_avg_sq}


class Copies:
    """Every copy of training state this process holds, across generations: its own
    snapshots (every buffer of the Snapshotter) and the buddy replicas it keeps for its
    wards. Replicas are taken from the replicators of the last two generations when
    asked, so a round that arrived but was never finished (the generation ended
    first) counts too. Only complete snapshots are held out, and a recovery uses only
    the tensors that verify right then (trainer.restore.settle_copies): checksums
    decide, at use."""

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

    def held(self) -> list[tuple[str, Snapshot]]:
        """(role, snapshot) of every complete copy held, not verified (``restore.settle_copies``
        verifies the ones a recovery uses)."""
        return [(OWNER, s) for s in self.own()] + [(BUDDY, s) for s in self.replicas]

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
