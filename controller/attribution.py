"""Communication vs compute attribution (issue #20, C4-style): a pure decision.

Each rank's step line carries its compute time and, per pipeline peer, the time it waited
for that peer's receives (``comm.peer["pipeline receive|<peer>"]``, trainer/comm.py). A rank
that waits long for one peer while that peer's compute is normal points at the link between
them (or the peer's sending side), not at any rank's compute; a peer whose compute is itself
slow explains its neighbours' waits. ``attribute(window, settings) -> (attribution, reason)``.

In 1F1B a stage's receive waits depend on its place (the first stage waits longest for
gradients), so with the layout (``stage_of``) a wait is compared with the same stage pair's
waits in the other data-parallel replicas (needs dp >= 3 for a robust comparison). Without
it, all edges are compared: a 4-stage dp1 CPU run with one sender delayed by 30 ms per
micro-batch was not singled out on the 2-core test host (bubbles of ~1 s dominate). The
controller does not act on this yet.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RECEIVE = "pipeline receive"
"""The ``what`` of the trainer's pipeline receive waits (trainer/schedule.py)."""


@dataclass(kw_only=True)
class AttributionSettings:
    z: float = 3.5
    """Robust z-score above which a compute time or a peer wait is an outlier (> 0)."""
    min_excess_s: float = 0.02
    """A wait must exceed the median wait by at least this many seconds to count (>= 0): waits of
    a balanced pipeline are near zero, so their spread alone means nothing."""
    min_spread: float = 0.05
    """Floor of the robust spread, as a fraction of the median (>= 0): identical times have MAD 0."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.z) and self.z > 0):
            raise ValueError(f"z: must be > 0, got {self.z}")
        if not (math.isfinite(self.min_excess_s) and self.min_excess_s >= 0):
            raise ValueError(f"min_excess_s: must be >= 0 seconds, got {self.min_excess_s}")
        if not (math.isfinite(self.min_spread) and self.min_spread >= 0):
            raise ValueError(f"min_spread: must be >= 0, got {self.min_spread}")


@dataclass(kw_only=True, frozen=True)
class RankComm:
    compute_s: float
    """Median compute seconds per step over the window."""
    receive_wait_s: Mapping[int, float] = field(default_factory=dict)
    """Peer global rank -> median seconds per step waited for its pipeline receives."""


@dataclass(kw_only=True, frozen=True)
class Attribution:
    compute_ranks: tuple[int, ...] = ()
    """Ranks whose own compute is slow."""
    links: tuple[tuple[int, int], ...] = ()
    """(sender, receiver) pairs whose transfers are slow while the sender computes normally:
    the link, or the sender's sending side, not a rank's compute."""


def _outliers(values: Mapping[Any, float], settings: AttributionSettings, *, min_excess_s: float = 0.0) -> set:
    if len(values) < 3:
        return set()
    median = statistics.median(values.values())
    mad = statistics.median(abs(v - median) for v in values.values()) * 1.4826
    spread = max(mad, settings.min_spread * abs(median), 1e-9)
    return {k for k, v in values.items() if (v - median) / spread > settings.z and v - median >= min_excess_s}


def _grouped_outliers(values: Mapping[Any, float], group_of, settings: AttributionSettings, *,
                      min_excess_s: float = 0.0) -> set:
    groups: dict[Any, dict[Any, float]] = {}
    for key, value in values.items():
        groups.setdefault(group_of(key), {})[key] = value
    return set().union(*(_outliers(g, settings, min_excess_s=min_excess_s) for g in groups.values()))


def attribute(window: Mapping[int, RankComm], settings: AttributionSettings,
              stage_of: Mapping[int, int] | None = None) -> tuple[Attribution, str]:
    """Which slowness is compute and which is communication. Pure.

    With ``stage_of`` (rank -> pipeline stage), a rank's compute is compared with the ranks of
    its stage and a wait with the same (sender stage, receiver stage) wait of the other
    data-parallel replicas (a stage's waits depend on its place in the pipeline); without it,
    everything with everything."""
    stage = (lambda r: stage_of.get(r, -1)) if stage_of is not None else (lambda r: 0)
    slow_compute = _grouped_outliers({r: c.compute_s for r, c in window.items()}, stage, settings)
    edges = {(peer, rank): wait for rank, c in window.items() for peer, wait in c.receive_wait_s.items()}
    slow_edges = _grouped_outliers(edges, lambda e: (stage(e[0]), stage(e[1])), settings,
                                   min_excess_s=settings.min_excess_s)
    # a sender that itself waits on a slow link sends late because of it: the delay propagated
    # down the pipeline, and only the upstream-most slow links are named
    waiting = {receiver for _, receiver in slow_edges}
    links = tuple(sorted(e for e in slow_edges if e[0] not in slow_compute and e[0] not in waiting))
    explained = sorted(e for e in slow_edges if e[0] in slow_compute)
    parts = []
    if slow_compute:
        parts.append(f"compute slow on ranks {sorted(slow_compute)}"
                     + (f" (explains the waits of {[e[1] for e in explained]})" if explained else ""))
    for sender, receiver in links:
        parts.append(f"rank {receiver} waits {edges[(sender, receiver)]:.3f}s/step for rank {sender}'s pipeline "
                     f"sends while rank {sender}'s compute is normal: link {sender}->{receiver} or rank {sender}'s "
                     f"sending side, not compute")
    return (Attribution(compute_ranks=tuple(sorted(slow_compute)), links=links),
            "; ".join(parts) or "no slow compute or communication")


def window_from_steps(lines_by_rank: Mapping[int, Sequence[Mapping[str, Any]]]) -> dict[int, RankComm]:
    """RankComm per rank from its step lines (``compute_time`` and ``comm``); lines without them are skipped."""
    out: dict[int, RankComm] = {}
    for rank, lines in lines_by_rank.items():
        compute = [float(x["compute_time"]) for x in lines if isinstance(x.get("compute_time"), (int, float))]
        waits: dict[int, list[float]] = {}
        for x in lines:
            peers = (x.get("comm") or {}).get("peer") if isinstance(x.get("comm"), dict) else None
            if not isinstance(peers, dict):
                continue
            for key, seconds in peers.items():
                what, _, peer = str(key).rpartition("|")
                if what == RECEIVE and peer.isdigit() and isinstance(seconds, (int, float)):
                    waits.setdefault(int(peer), []).append(float(seconds))
        if compute:
            out[rank] = RankComm(compute_s=statistics.median(compute),
                                 receive_wait_s={p: statistics.median(v) for p, v in waits.items()})
    return out
