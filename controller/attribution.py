"""Communication vs compute attribution (issue #20, C4-style): a pure decision.

Each rank's step line carries its compute time and, per pipeline peer, the time it waited
for that peer's receives (``comm.peer["pipeline receive|<peer>"]``, trainer/comm.py). A rank
that waits long for one peer while that peer's compute is normal points at the link between
them (or the peer's sending side), not at any rank's compute; a peer whose compute is itself
slow explains its neighbours' waits. ``attribute(window, settings) -> (attribution, reason)``.

In 1F1B a stage's receive waits depend on its place (the first stage waits longest for
gradients), so with the layout (``stage_of``) a wait is compared with the same stage pair's
waits in the other data-parallel replicas, and a compute time with its stage's (leave-one-out
medians: in dp2 the two replicas are compared with each other; dp1 has nothing to compare
with). Without it, all edges are compared: a 4-stage dp1 CPU run with one sender delayed by
30 ms per micro-batch was not singled out on the 2-core test host (bubbles of ~1 s dominate).

The controller's health loop (controller/health_loop.py) runs it on the agents' per-rank
summaries (agent/rank_health.py ``comm``, ``window_from_summaries``) and reports links and
peers in the straggler event and ``tenax_slow_links_total``; it never evicts or rebalances
for a link (moving a healthy rank does not fix its peer's link).
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
    min_slowdown: float = 0.05
    """A compute time is slow only if also at least this fraction above its reference (0.05 = 5%;
    >= 0); the health loop uses the straggler statistic's ``min_slowdown`` here."""
    explain_fraction: float = 0.5
    """A sender's slow compute explains a slow edge only if its compute excess (seconds per step)
    is at least this fraction of the wait's excess ((0, 1]): a rank 10% slower cannot make its
    peer wait 0.4 s longer."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.z) and self.z > 0):
            raise ValueError(f"z: must be > 0, got {self.z}")
        if not (math.isfinite(self.min_excess_s) and self.min_excess_s >= 0):
            raise ValueError(f"min_excess_s: must be >= 0 seconds, got {self.min_excess_s}")
        if not (math.isfinite(self.min_spread) and self.min_spread >= 0):
            raise ValueError(f"min_spread: must be >= 0, got {self.min_spread}")
        if not (math.isfinite(self.min_slowdown) and self.min_slowdown >= 0):
            raise ValueError(f"min_slowdown: must be >= 0, got {self.min_slowdown}")
        if not (math.isfinite(self.explain_fraction) and 0 < self.explain_fraction <= 1):
            raise ValueError(f"explain_fraction: must be in (0, 1], got {self.explain_fraction}")


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
    links: tuple["SlowLink", ...] = ()
    """Slow (sender -> receiver) pipeline edges that the sender's compute does not explain:
    the link, or the sender's sending side, not a rank's compute."""
    peers: tuple[int, ...] = ()
    """Senders all of whose (two or more) outgoing edges are slow: their sending side."""

    @property
    def link_pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple((link.sender, link.receiver) for link in self.links)

    def to_dict(self) -> dict[str, Any]:
        return {"compute_ranks": list(self.compute_ranks), "links": [link.to_dict() for link in self.links],
                "peers": list(self.peers)}


def _reference(values: Mapping[Any, float], key: Any, settings: AttributionSettings) -> tuple[float, float] | None:
    """(the median of the other values, one unit of spread) that ``values[key]`` is compared with;
    None when ``key`` has nothing to be compared with. Leave-one-out, so that two values (a
    dp2 job's two replicas of a stage) are compared with each other, as the straggler
    statistic does (controller/detection.py)."""
    others = [v for k, v in values.items() if k != key]
    if not others:
        return None
    median = statistics.median(others)
    mad = statistics.median(abs(v - median) for v in others) * 1.4826
    return median, max(mad, settings.min_spread * abs(median), 1e-9)


def _grouped(values: Mapping[Any, float], group_of) -> dict[Any, dict[Any, float]]:
    groups: dict[Any, dict[Any, float]] = {}
    for key, value in values.items():
        groups.setdefault(group_of(key), {})[key] = value
    return groups


def _outliers(values: Mapping[Any, float], group_of, settings: AttributionSettings, *,
              min_excess_s: float = 0.0, min_ratio: float = 0.0) -> dict[Any, float]:
    """key -> the median it is compared with, for every value that is a robust outlier above the
    others of its group (z > ``settings.z``) by at least ``min_excess_s`` and ``min_ratio`` of it."""
    out = {}
    for group in _grouped(values, group_of).values():
        for key, value in group.items():
            ref = _reference(group, key, settings)
            if ref is not None and (value - ref[0]) / ref[1] > settings.z and value - ref[0] >= min_excess_s \
                    and value >= (1 + min_ratio) * ref[0]:
                out[key] = ref[0]
    return out


@dataclass(kw_only=True, frozen=True)
class SlowLink:
    """One slow (sender -> receiver) pipeline edge, with the numbers behind it (seconds per step)."""

    sender: int
    receiver: int
    wait_s: float
    """The receiver's median wait for the sender's transfers."""
    reference_s: float
    """The median of the same stage pair's waits elsewhere (the other replicas)."""
    sender_compute_s: float
    sender_compute_reference_s: float
    """The sender's median compute, and that of the other ranks of its stage (itself when alone)."""

    def to_dict(self) -> dict[str, Any]:
        return {"sender": self.sender, "receiver": self.receiver, "wait_s": round(self.wait_s, 4),
                "reference_s": round(self.reference_s, 4), "sender_compute_s": round(self.sender_compute_s, 4),
                "sender_compute_reference_s": round(self.sender_compute_reference_s, 4)}


def attribute(window: Mapping[int, RankComm], settings: AttributionSettings,
              stage_of: Mapping[int, int] | None = None) -> tuple[Attribution, str]:
    """Which slowness is compute and which is communication. Pure.

    With ``stage_of`` (rank -> pipeline stage), a rank's compute is compared with the ranks of
    its stage and a wait with the same (sender stage, receiver stage) wait of the other
    data-parallel replicas (a stage's waits depend on its place in the pipeline); without it,
    everything with everything. A slow edge is the sender's compute when the sender's compute
    is an outlier too and its excess explains at least ``explain_fraction`` of the wait's
    excess; otherwise the link (or the sender's sending side). A sender whose every outgoing
    edge (two or more) is slow is named as a peer: its sending side, not one link."""
    stage = (lambda r: stage_of.get(r, -1)) if stage_of is not None else (lambda r: 0)
    compute = {r: c.compute_s for r, c in window.items()}
    slow_compute = _outliers(compute, stage, settings, min_ratio=settings.min_slowdown)
    edges = {(peer, rank): wait for rank, c in window.items() for peer, wait in c.receive_wait_s.items()}
    slow_edges = _outliers(edges, lambda e: (stage(e[0]), stage(e[1])), settings, min_excess_s=settings.min_excess_s)

    def compute_reference(rank: int) -> float:
        ref = _reference({r: t for r, t in compute.items() if stage(r) == stage(rank)}, rank, settings)
        return ref[0] if ref is not None else compute.get(rank, 0.0)

    def explained(edge: tuple[int, int]) -> bool:
        sender = edge[0]
        if sender not in slow_compute:
            return False
        return compute[sender] - slow_compute[sender] >= settings.explain_fraction * (edges[edge] - slow_edges[edge])

    # a sender that itself waits on a slow link (from a third rank) sends late because of it: the
    # delay propagated down the pipeline, and only the upstream-most slow links are named; of a
    # pair's two directions, both slow, the one with the larger excess is the origin (the other
    # rank waited for it, then answered late)
    unexplained = [e for e in slow_edges if not explained(e)]
    excess = {e: edges[e] - slow_edges[e] for e in unexplained}
    found = [e for e in unexplained if not any(x[1] == e[0] and x[0] != e[1] for x in unexplained)]
    found = sorted(e for e in found if not ((e[1], e[0]) in found and excess[(e[1], e[0])] > excess[e]))
    links = tuple(SlowLink(sender=s, receiver=r, wait_s=edges[(s, r)], reference_s=slow_edges[(s, r)],
                           sender_compute_s=compute.get(s, 0.0), sender_compute_reference_s=compute_reference(s))
                  for s, r in found)
    outgoing: dict[int, set[int]] = {}
    for s, r in edges:
        outgoing.setdefault(s, set()).add(r)
    peers = tuple(sorted(s for s in {link.sender for link in links}
                         if len(outgoing.get(s, ())) >= 2 and outgoing[s] == {l.receiver for l in links if l.sender == s}))
    parts = [f"rank {r} compute slow: {compute[r]:.3f}s/step vs {ref:.3f}s on its stage"
             + (f" (explains the waits of {sorted(e[1] for e in slow_edges if e[0] == r and explained(e))})"
                if any(e[0] == r and explained(e) for e in slow_edges) else "")
             for r, ref in sorted(slow_compute.items())]
    for link in links:
        who = f"peer rank {link.sender} slow to send" if link.sender in peers else \
            f"link rank {link.sender} -> rank {link.receiver} slow"
        parts.append(f"{who}: rank {link.receiver} waits {link.wait_s:.3f}s/step for rank {link.sender}'s pipeline "
                     f"sends vs {link.reference_s:.3f}s on the same stage pair elsewhere, while rank {link.sender}'s "
                     f"compute {'is normal' if link.sender not in slow_compute else 'explains little of it'} "
                     f"({link.sender_compute_s:.3f}s vs {link.sender_compute_reference_s:.3f}s): not compute")
    return (Attribution(compute_ranks=tuple(sorted(slow_compute)), links=links, peers=peers),
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


def window_from_summaries(summaries: Mapping[int, Mapping[str, Any]], *, scale: Mapping[int, float] | None = None
                          ) -> dict[int, RankComm]:
    """RankComm per rank from the agents' ``comm`` summaries (agent/rank_health.py: medians over a
    rank's recent steps); ``scale`` (rank -> factor) normalises a rank's seconds to an even
    sample share (after a rebalance ranks hold different shares on purpose). Pure."""
    out: dict[int, RankComm] = {}
    for rank, summary in summaries.items():
        compute = summary.get("compute")
        if isinstance(compute, bool) or not isinstance(compute, (int, float)) or not compute > 0:
            continue
        factor = (scale or {}).get(rank, 1.0)
        waits = {}
        peers = summary.get("peer")
        for key, seconds in (peers.items() if isinstance(peers, dict) else ()):
            what, _, peer = str(key).rpartition("|")
            if what == RECEIVE and peer.isdigit() and isinstance(seconds, (int, float)) \
                    and not isinstance(seconds, bool):
                waits[int(peer)] = float(seconds) * factor
        out[rank] = RankComm(compute_s=float(compute) * factor, receive_wait_s=waits)
    return out
