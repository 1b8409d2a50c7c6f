"""The recovery record a worker writes after every change of generation.

Written by ``trainer.elastic`` as one JSON line in the worker's
TENAX_METRICS_FILE, next to its per-step lines. It has ``"event": "recovery"``
and deliberately no ``"step"`` key, so step-line readers (agent/progress.py)
skip it. Every participant of the new generation writes one; the control side
relays them (agent) and folds them into ``JobStatusRecord.recoveries`` /
``JobEventRecord(kind="recovery")`` (controller), taking per recovery
(``new_generation``) the slowest rank's seconds and the sum of bytes_moved.

Fields (times in seconds; ``*_s`` are durations measured on this worker):

    event            "recovery"
    cause            why: "plan" (plan g+1 seen first), "comm-failed" (a collective
                     failed here), "comm-aborted" (a peer or the abort key told us),
                     "timeout", "switch" (planned switch at switch_at_step), "join"
                     (a new worker that had no state)
    reason           plan g+1's reason (e.g. "worker-failed: dp=2·pp=2 -> dp=1·pp=2")
    old_generation   generation the worker ran before (0 for a joining worker)
    new_generation   generation it runs now
    old_layout       e.g. "dp2pp2z1" ("" for a joining worker)
    new_layout       e.g. "dp1pp2z1"
    rank             this worker's rank in the new generation
    at_step          newest step committed by any participant when it stopped
    resumed_step     step the new generation resumes from (its first step is resumed_step+1)
    steps_lost       at_step - resumed_step: committed steps redone (the step in flight is
                     never counted; it is always redone)
    noticed_time     unix time the worker noticed (abort, error, plan, or the switch boundary)
    plan_wait_s      noticed -> plan g+1 read from etcd
    rebuild_s        process-group rendezvous + model rebuild for the new layout
    transfer_s       inventory exchange + resharding transfers (or disk load) + import
    total_s          noticed -> ready to run the next step (MTTR as seen by the worker;
                     detection before "noticed" is the control side's to add)
    bytes_moved      bytes this worker received over the network (plus read from disk)
    bytes_local      bytes it copied from copies it held itself (own snapshot, buddy replica)
    verify_s         checksumming the copies of the resume step it held (GPU fold64 for CUDA jobs)
    local_s          copying bytes_local into place (one copy per contiguous run, synchronised)
    local_gbps       bytes_local / (verify_s + local_s) / 1e9: the restore from local copies
    network_s        the all-to-all that brought bytes_moved (packing and unpacking included)
    network_gbps     bytes_moved / network_s / 1e9
    from_disk        true if the state came from the disk checkpoint
    bad_copies       descriptions of copies that failed their checksum (never used)
    time             unix time the record was written
    comm_error       class of the communication failure that stopped this rank: "peer-died",
                     "timeout", "nccl-error", "other" (common.comm_errors), "" when none did
                     (a plan, a planned switch)
    comm_error_detail the words of the exception that decided it
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

RECOVERY_EVENT = "recovery"

ARRIVAL_EVENT = "rendezvous"
"""``"event"`` of the line a worker writes to its TENAX_METRICS_FILE when it reaches the
rendezvous of a plan generation (it announced itself in the store and now waits for the
others): ``{"event": "rendezvous", "generation": g, "rank": r, "time": unix seconds,
"startup_s": s}``. ``startup_s`` (first rendezvous of the process only, and not for a
growth joiner, which waits for its commit): seconds from the process start. The agent relays
the newest one per rank (agent/rank_health.py); the controller's rendezvous deadline uses
them (controller/rendezvous.py)."""


@dataclass(kw_only=True)
class RecoveryRecord:
    cause: str
    reason: str
    old_generation: int
    new_generation: int
    old_layout: str
    new_layout: str
    rank: int
    at_step: int
    resumed_step: int
    steps_lost: int
    noticed_time: float
    plan_wait_s: float
    rebuild_s: float
    transfer_s: float
    total_s: float
    bytes_moved: int
    from_disk: bool
    bytes_local: int = 0
    bad_copies: list[str] = field(default_factory=list)
    time: float = 0.0
    verify_s: float = 0.0
    local_s: float = 0.0
    local_gbps: float = 0.0
    network_s: float = 0.0
    network_gbps: float = 0.0
    comm_error: str = ""
    comm_error_detail: str = ""
    gpu_wait_s: float = 0.0
    """Seconds this rank waited, before rebuilding, for the GPU memory of a process still exiting on
    its device (a rank that shared the GPU with the dead one)."""

    def to_dict(self) -> dict[str, Any]:
        return {"event": RECOVERY_EVENT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RecoveryRecord":
        if data.get("event") != RECOVERY_EVENT:
            raise ValueError(f"not a recovery record: event={data.get('event')!r}")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def is_recovery_line(data: Any) -> bool:
    return isinstance(data, dict) and data.get("event") == RECOVERY_EVENT
