"""Which slices move from whom to whom when the layout changes: a pure planner.

Model: every parameter and its optimizer state are flat 1-D tensors named by
parameter name (``"blocks.0.attn.qkv.weight"``, ``"exp_avg/blocks.0..."`` —
the planner does not care). A layout says which ``[start, end)`` element ranges
of which names a rank needs (the new layout) or holds (the surviving copies:
each rank's own snapshot — the *owner* copy — and the copies it keeps for its
buddy). Ranks here are the ids of the processes that take part in the transfer
(the new generation's transfer group), whatever their rank was before.

``plan_transfers`` cuts every needed range at the edges of the copies that
cover it and picks, piece by piece, the best source: the rank itself (no
bytes move), then an owner copy, then a buddy copy, then the least-loaded
source so far (so a big shard is pulled from several ranks at once). Adjacent
pieces from the same source merge back into one transfer. The result is
disjoint and covers each need exactly; a piece that no surviving copy covers
makes the plan fail with a reason (the caller falls back to the disk checkpoint).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

Span = tuple[int, int]
"""[start, end) element range of a flat tensor."""

Layout = Mapping[int, Mapping[str, Sequence[Span]]]
"""{rank: {name: [(start, end), ...]}}."""

OWNER = "owner"
BUDDY = "buddy"
_ROLE_RANK = {OWNER: 1, BUDDY: 2}  # the rank itself is 0


@dataclass(frozen=True, order=True)
class Holding:
    """A copy of ``name[start:end]`` that ``rank`` can send (verified before planning)."""

    rank: int
    name: str
    start: int
    end: int
    role: str = OWNER
    """``owner``: the rank's own snapshot; ``buddy``: a replica it keeps for another rank."""


@dataclass(frozen=True, order=True)
class Transfer:
    """Send ``name[start:end]`` from ``src`` to ``dst``; src == dst is a local copy."""

    dst: int
    name: str
    start: int
    end: int
    src: int
    via: str = OWNER
    """Which of src's copies to read: its own snapshot or a buddy replica it keeps."""

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def is_local(self) -> bool:
        return self.src == self.dst


def holdings_from_layout(layout: Layout, role: str = OWNER) -> list[Holding]:
    """Flatten a layout of what ranks hold into Holding records."""
    return [
        Holding(rank=rank, name=name, start=a, end=b, role=role)
        for rank, names in layout.items()
        for name, spans in names.items()
        for a, b in spans
        if b > a
    ]


def plan_transfers(needs: Layout, holdings: Iterable[Holding]) -> tuple[list[Transfer] | None, str]:
    """Transfers that give every rank exactly what ``needs`` lists, or (None, why not).

    Deterministic: every rank computes the same plan from the same inputs.
    """
    by_name: dict[str, list[Holding]] = defaultdict(list)
    for h in holdings:
        if h.end > h.start:
            by_name[h.name].append(h)
    load: dict[int, int] = defaultdict(int)  # elements each source sends to others
    transfers: list[Transfer] = []
    missing: list[str] = []
    for dst in sorted(needs):
        for name in sorted(needs[dst]):
            for start, end in _merge(needs[dst][name]):
                pieces = _cover(dst, name, start, end, by_name.get(name, []), load)
                for piece in pieces:
                    if piece.src < 0:
                        missing.append(f"{name}[{piece.start}:{piece.end}] for rank {dst}")
                    else:
                        transfers.append(piece)
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        return None, f"no surviving copy of {len(missing)} slice(s): {shown}"
    moved = sum(t.numel for t in transfers if not t.is_local)
    local = sum(t.numel for t in transfers if t.is_local)
    return sorted(transfers), f"{len(transfers)} transfers: {moved} elements over the network, {local} local"


def _merge(spans: Sequence[Span]) -> list[Span]:
    """Sort and merge overlapping or touching spans (a need listed twice is needed once)."""
    out: list[list[int]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _cover(dst: int, name: str, start: int, end: int, copies: Sequence[Holding],
           load: dict[int, int]) -> list[Transfer]:
    """Cover [start, end) of ``name`` for ``dst`` with the best copy piece by piece.

    Returns Transfers; a piece no copy covers comes back with src = -1.
    """
    cuts = {start, end}
    relevant = [h for h in copies if h.start < end and h.end > start]
    for h in relevant:
        cuts.update(x for x in (h.start, h.end) if start < x < end)
    edges = sorted(cuts)
    pieces: list[Transfer] = []
    sources: list[Holding | None] = []
    for a, b in zip(edges, edges[1:]):
        covering = [h for h in relevant if h.start <= a and h.end >= b]
        src = min(covering, key=lambda h: _preference(h, dst, load), default=None)
        src_rank = -1 if src is None else src.rank
        via = OWNER if src is None else src.role
        # merge only within one copy, so the sender reads one contiguous buffer
        if pieces and sources[-1] == src and pieces[-1].end == a:
            pieces[-1] = Transfer(dst=dst, name=name, start=pieces[-1].start, end=b, src=src_rank, via=via)
        else:
            pieces.append(Transfer(dst=dst, name=name, start=a, end=b, src=src_rank, via=via))
            sources.append(src)
        if src_rank >= 0 and src_rank != dst:
            load[src_rank] += b - a
    return pieces


def _preference(h: Holding, dst: int, load: Mapping[int, int]) -> tuple[int, int, int]:
    role = 0 if h.rank == dst else _ROLE_RANK.get(h.role, 3)
    return role, load.get(h.rank, 0), h.rank


def check_plan(needs: Layout, transfers: Sequence[Transfer], holdings: Iterable[Holding]) -> list[str]:
    """Problems with a plan (empty when it is sound): every transfer reads from a
    real copy, transfers into one rank's tensor never overlap, and they cover
    exactly its needs. Used by tests and as a cheap assertion before executing."""
    problems: list[str] = []
    copies = defaultdict(list)
    for h in holdings:
        copies[(h.rank, h.name, h.role)].append((h.start, h.end))
    got: dict[tuple[int, str], list[Span]] = defaultdict(list)
    for t in transfers:
        if not any(a <= t.start and t.end <= b for a, b in copies[(t.src, t.name, t.via)]):
            problems.append(f"{t} reads a range rank {t.src} does not hold")
        got[(t.dst, t.name)].append((t.start, t.end))
    for key, spans in got.items():
        spans.sort()
        for (a1, b1), (a2, b2) in zip(spans, spans[1:]):
            if a2 < b1:
                problems.append(f"overlapping transfers into rank {key[0]} {key[1]}: {(a1, b1)} and {(a2, b2)}")
    wanted = {(r, n): _merge(s) for r, names in needs.items() for n, s in names.items() if _merge(s)}
    delivered = {k: _merge(v) for k, v in got.items()}
    if wanted != delivered:
        problems.append("transfers do not cover the needs exactly")
    return problems
