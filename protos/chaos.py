"""Chaos and kill requests: the record the controller writes at
``Keys.chaos_request(node, id)`` and the agent carries out (controller/chaos.py
and agent/chaos.py), with the one validation both sides apply."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

RANK_ACTIONS = ("kill", "hang", "slow")
NODE_ACTIONS = ("kill-node",)
FLIGHT_DUMP = "flight-dump"
INTERNAL_ACTIONS = (FLIGHT_DUMP,)
"""Written by the controller only (controller/flight.py asks for dumps with it); not offered to operators."""
ACTIONS = RANK_ACTIONS + NODE_ACTIONS
MAX_SLOW_FACTOR = 100.0
"""Largest slowdown accepted (dimensionless): beyond it a rank is hung, not slow."""


@dataclass(kw_only=True, frozen=True)
class ChaosRecord:
    """One request at ``Keys.chaos_request(node, id)`` (JSON)."""

    id: str
    action: str
    """kill | hang | slow | kill-node."""
    node: str
    """The agent that carries it out."""
    job: str = ""
    rank: int = -1
    generation: int = 0
    """Plan generation the rank was resolved in; the agent acts only on that rank's current worker."""
    factor: float = 1.0
    """slow: compute time multiplier (>= 1; 1 restores full speed)."""
    reason: str = ""
    """Why (operator chaos, or the health loop's decision)."""
    time: float = 0.0
    """Unix seconds when the request was written."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> "ChaosRecord":
        """Raises ValueError on anything malformed (the agent logs and drops it)."""
        try:
            data = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"chaos request is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("chaos request must be a JSON object")
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        try:
            record = cls(**known)
            record = cls(**{**asdict(record), "rank": int(record.rank), "generation": int(record.generation),
                            "factor": float(record.factor), "time": float(record.time)})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"chaos request is malformed: {exc}") from exc
        if record.action in INTERNAL_ACTIONS:
            return record
        problem = validate_action(record.action, job=record.job, rank=record.rank, factor=record.factor,
                                  node=record.node)
        if problem:
            raise ValueError(problem)
        return record


def validate_action(action: str, *, job: str, rank: int, factor: float, node: str) -> str:
    """'' when the request makes sense, else what is wrong with it (naming the field). Pure."""
    if action not in ACTIONS:
        return f"action: must be one of {', '.join(ACTIONS)}, got {action!r}"
    if action in NODE_ACTIONS:
        return "" if node else "node_id: required for kill-node"
    if not job:
        return f"job_id: required for {action}"
    if rank < 0:
        return f"rank: must be >= 0, got {rank}"
    if action == "slow" and not (math.isfinite(factor) and 1.0 <= factor <= MAX_SLOW_FACTOR):
        return f"factor: must be in [1, {MAX_SLOW_FACTOR:g}] for slow, got {factor}"
    return ""
