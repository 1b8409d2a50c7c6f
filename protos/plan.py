"""The plan record: who runs which rank, in what layout, from which step.

The controller writes plan generation ``g+1`` of a job in one etcd transaction
guarded by ``g`` (key ``Keys.job_plan``). Agents read it to start and stop
workers; workers read it (through the launch file, and later from etcd) to form
their process groups. The stored value is ``Plan.to_json()``.

Worker launch contract (agent -> ``python -m trainer.worker``): the environment variables
are named once, with their meaning and defaults, in protos/launch.py (the launch file
``{"spec": JobSpec.to_dict(), "plan": Plan.to_dict()}``, the rank, the metrics file, etcd,
the growth id, ...); besides them ``CUDA_VISIBLE_DEVICES`` is the slot when the job's
device is cuda.

The rendezvous store is a TCPStore served by an agent (``NodeInfo.store_address``);
each generation uses its own key prefix, so a new generation never reads
stale keys of the one before.

Generations: workers survive plan changes in process (trainer/elastic.py). On
plan g+1 an agent keeps every worker whose (node, slot) is in g+1's workers or
``extra["idle"]`` and starts workers only for new (node, slot)s; each worker
appends a recovery record (protos/recovery.py) to its metrics file. The whole
control-side contract: docs/elastic-worker.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


class PlanError(ValueError):
    """A plan value is malformed (for example, a corrupted etcd value)."""


def is_metrics_rank(dp_rank: int, pp_rank: int, pp: int) -> bool:
    """The rank whose per-step records become the job's metrics: dp rank 0 on the last stage
    (it computes the loss)."""
    return dp_rank == 0 and pp_rank == pp - 1


@dataclass(kw_only=True, frozen=True)
class WorkerAssignment:
    rank: int
    """Global rank; ranks are 0..world-1, dp-major: rank = dp_rank * pp + pp_rank."""
    node: str
    """Node id of the agent that runs this rank."""
    slot: int
    """Slot on that node (GPU index on CUDA nodes)."""
    dp_rank: int
    pp_rank: int


@dataclass(kw_only=True, frozen=True)
class Plan:
    job_id: str
    generation: int
    """Starts at 1; every change of workers, layout or shares is a new generation."""
    workers: tuple[WorkerAssignment, ...]
    dp: int
    pp: int
    zero_stage: int
    layer_partition: tuple[int, ...]
    """pp+1 boundaries: stage s owns layers [p[s], p[s+1]); p[0]=0, p[-1]=layers."""
    sample_shares: tuple[int, ...]
    """Samples per step for each dp rank; sums to the job's global batch size."""
    store_address: str
    """host:port of the rendezvous TCPStore."""
    store_prefix: str
    """Key prefix for this generation inside the store."""
    switch_at_step: int = -1
    """Step boundary at which to switch to this plan; -1 means now (failures)."""
    reason: str = ""
    """Why this generation exists (submit, worker-failed, node-lost, grow, drain, rebalance...)."""
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Forward-compatible extension fields; ignored by readers that do not know them."""

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def worker(self, rank: int) -> WorkerAssignment:
        for w in self.workers:
            if w.rank == rank:
                return w
        raise KeyError(f"rank {rank} is not in plan generation {self.generation} of job {self.job_id}")

    def workers_on(self, node: str) -> list[WorkerAssignment]:
        return [w for w in self.workers if w.node == node]

    def metrics_worker(self) -> WorkerAssignment | None:
        """The worker whose step records are the job's metrics (``is_metrics_rank``)."""
        return next((w for w in self.workers if is_metrics_rank(w.dp_rank, w.pp_rank, self.pp)), None)

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["workers"] = [asdict(w) for w in self.workers]
        d["layer_partition"] = list(self.layer_partition)
        d["sample_shares"] = list(self.sample_shares)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "Plan":
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        if not isinstance(data, dict):
            raise PlanError(f"plan must be a JSON object, got {type(data).__name__}")
        try:
            workers = tuple(WorkerAssignment(**w) for w in data["workers"])
            plan = cls(
                job_id=str(data["job_id"]),
                generation=int(data["generation"]),
                workers=workers,
                dp=int(data["dp"]),
                pp=int(data["pp"]),
                zero_stage=int(data["zero_stage"]),
                layer_partition=tuple(int(x) for x in data["layer_partition"]),
                sample_shares=tuple(int(x) for x in data["sample_shares"]),
                store_address=str(data["store_address"]),
                store_prefix=str(data["store_prefix"]),
                switch_at_step=int(data.get("switch_at_step", -1)),
                reason=str(data.get("reason", "")),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"plan is malformed: {exc!r}") from exc
        plan.check()
        return plan

    def check(self) -> None:
        """Raise PlanError unless the plan is internally consistent."""
        if self.generation < 1:
            raise PlanError(f"plan generation must be >= 1, got {self.generation}")
        if self.dp < 1 or self.pp < 1 or self.dp * self.pp != len(self.workers):
            raise PlanError(f"plan layout dp={self.dp} pp={self.pp} does not match {len(self.workers)} workers")
        if sorted(w.rank for w in self.workers) != list(range(len(self.workers))):
            raise PlanError("plan ranks must be exactly 0..world-1")
        for w in self.workers:
            if w.rank != w.dp_rank * self.pp + w.pp_rank:
                raise PlanError(f"rank {w.rank} does not match dp_rank={w.dp_rank} pp_rank={w.pp_rank}")
        if len(self.layer_partition) != self.pp + 1 or self.layer_partition[0] != 0:
            raise PlanError(f"layer_partition must have pp+1={self.pp + 1} boundaries starting at 0")
        if any(b <= a for a, b in zip(self.layer_partition, self.layer_partition[1:])):
            raise PlanError("layer_partition must be strictly increasing (every stage owns a layer)")
        if len(self.sample_shares) != self.dp or any(s < 1 for s in self.sample_shares):
            raise PlanError(f"sample_shares must have dp={self.dp} positive entries")
        if self.zero_stage not in (0, 1, 2):
            raise PlanError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
