"""The rendezvous deadline: a plan generation whose rendezvous cannot complete is abandoned.

Pure: ``(state, now) -> (decision, reason)``; the health loop (controller/health_loop.py)
gathers the state from the agents' rank telemetry and acts (an event, then
``Recovery.request_replan`` without the missing ranks: their slots are quarantined
as failures and plan g+1 switches now).

Every participant of generation g announces itself when it reaches g's rendezvous
(the worker's ``rendezvous`` metrics line, protos/recovery.py ``ARRIVAL_EVENT``,
relayed by its agent as ``arrived`` in the rank telemetry). A participant that is
alive but never arrives (hung before it joined, stopped, stuck in start-up) holds
every other rank of g in the rendezvous; its process is not dead, so nothing else
notices before the hang detector's start-up timeout or the workers' own collective
backstop.

The deadline of g runs from the first arrival of any rank of g (survivors arrive
within milliseconds of reading the plan; nobody arrives before a planned switch's
boundary) and is derived from what this job measured:

    clamp(startup_factor x slowest measured start-up + step_k x median step time, floor, cap)

* start-up: seconds a worker process of this job took from its spawn to its first
  rendezvous (a new worker on a free slot needs that much; survivors need far less);
* step time: the median wall time of recent steps (a rank may finish the step it was
  in before it notices the new plan).

Nothing measured yet -> the cap. Generation 1 (the launch) is never judged: a rank
missing there is the launch's problem, and the job has no state to re-plan with.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(kw_only=True)
class RendezvousSettings:
    """``tenax controller --rendezvous-floor-s``, ``--rendezvous-cap-s``,
    ``--rendezvous-startup-factor``, ``--rendezvous-step-k``."""

    floor_s: float = 10.0
    """Shortest rendezvous deadline (seconds, > 0)."""
    cap_s: float = 120.0
    """Longest rendezvous deadline, and the deadline while nothing is measured (seconds, >= floor_s)."""
    startup_factor: float = 3.0
    """Multiple of the slowest measured worker start-up (dimensionless, >= 1)."""
    step_k: float = 5.0
    """Median step times added to the deadline (steps, >= 0)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.floor_s) and self.floor_s > 0):
            raise ValueError(f"floor_s: must be > 0 seconds, got {self.floor_s}")
        if not (math.isfinite(self.cap_s) and self.cap_s >= self.floor_s):
            raise ValueError(f"cap_s: must be >= floor_s={self.floor_s} seconds, got {self.cap_s}")
        if not (math.isfinite(self.startup_factor) and self.startup_factor >= 1.0):
            raise ValueError(f"startup_factor: must be a finite number >= 1, got {self.startup_factor}")
        if not (math.isfinite(self.step_k) and self.step_k >= 0):
            raise ValueError(f"step_k: must be a finite number >= 0, got {self.step_k}")


@dataclass(kw_only=True, frozen=True)
class RendezvousState:
    """What the controller knows of one plan generation's rendezvous (times on one clock, seconds)."""

    generation: int
    ranks: tuple[int, ...]
    """Every rank of the plan."""
    arrived_at: Mapping[int, float]
    """rank -> when it reached this generation's rendezvous (ranks that did not: absent)."""
    seen_at: float
    """When the controller first saw this generation (a deadline never starts before it: a new
    leader does not judge on arrivals it did not watch)."""
    startup_s: Sequence[float] = ()
    """Measured worker start-ups of this job (spawn -> first rendezvous, seconds)."""
    step_times_s: Sequence[float] = ()
    """Recent step wall times of this job (seconds)."""


@dataclass(kw_only=True, frozen=True)
class RendezvousDecision:
    missing_ranks: tuple[int, ...] = ()
    """Ranks to re-plan around (empty: wait)."""
    deadline_s: float = 0.0
    """The deadline that applied (seconds)."""
    waited_s: float = 0.0
    """Seconds since the deadline's start (0: it has not started)."""


def _clean(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]


def rendezvous_deadline(startup_s: Sequence[float], step_times_s: Sequence[float],
                        settings: RendezvousSettings) -> tuple[float, str]:
    """(deadline seconds, how it was derived). Pure."""
    startups, steps = _clean(startup_s), _clean(step_times_s)
    if not startups:
        return settings.cap_s, f"cap {settings.cap_s:.1f}s (no worker start-up measured yet)"
    slowest = max(startups)
    step = statistics.median(steps) if steps else 0.0
    raw = settings.startup_factor * slowest + settings.step_k * step
    deadline = min(max(raw, settings.floor_s), settings.cap_s)
    bound = " (floor)" if raw < settings.floor_s else " (cap)" if raw > settings.cap_s else ""
    return deadline, (f"{deadline:.1f}s{bound} = {settings.startup_factor:g} x slowest start-up {slowest:.1f}s"
                      f" + {settings.step_k:g} x median step {step:.3f}s")


def decide_rendezvous(state: RendezvousState, now: float,
                      settings: RendezvousSettings) -> tuple[RendezvousDecision, str]:
    """Which ranks of ``state.generation`` to give up on at ``now``. Pure."""
    if state.generation <= 1:
        return RendezvousDecision(), "generation 1 (the launch) has no rendezvous deadline"
    missing = tuple(sorted(r for r in state.ranks if r not in state.arrived_at))
    if not missing:
        return RendezvousDecision(), "every rank reached the rendezvous"
    arrivals = [state.arrived_at[r] for r in state.ranks if r in state.arrived_at]
    if not arrivals:
        return RendezvousDecision(), "no rank reached the rendezvous yet (no one is held waiting)"
    deadline, how = rendezvous_deadline(state.startup_s, state.step_times_s, settings)
    start = max(min(arrivals), state.seen_at)
    waited = max(now - start, 0.0)
    if waited <= deadline:
        return (RendezvousDecision(deadline_s=deadline, waited_s=waited),
                f"waiting for ranks {list(missing)}: {waited:.1f}s of {how}")
    return (RendezvousDecision(missing_ranks=missing, deadline_s=deadline, waited_s=waited),
            f"ranks {list(missing)} did not reach the rendezvous of generation {state.generation} within "
            f"{deadline:.1f}s of the first arrival ({waited:.1f}s; deadline {how})")
