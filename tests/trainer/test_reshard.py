"""trainer.reshard: the transfer planner (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.reshard import BUDDY, OWNER, Holding, Transfer, check_plan, holdings_from_layout, plan_transfers


def test_a_rank_keeps_what_it_already_owns_and_pulls_only_the_rest():
    old = {0: {"w": [(0, 50)]}, 1: {"w": [(50, 100)]}}
    new = {0: {"w": [(0, 100)]}}  # dp 2 -> 1: rank 0 now owns the whole optimizer shard
    transfers, reason = plan_transfers(new, holdings_from_layout(old))
    assert transfers == [Transfer(dst=0, name="w", start=0, end=50, src=0),
                         Transfer(dst=0, name="w", start=50, end=100, src=1)]
    assert "50 elements over the network, 50 local" in reason


def test_the_owner_copy_is_preferred_over_a_buddy_copy():
    holdings = [Holding(rank=2, name="w", start=0, end=10, role=BUDDY),
                Holding(rank=1, name="w", start=0, end=10, role=OWNER)]
    transfers, _ = plan_transfers({0: {"w": [(0, 10)]}}, holdings)
    assert transfers == [Transfer(dst=0, name="w", start=0, end=10, src=1)]


def test_the_buddy_copy_is_used_when_the_owner_is_gone():
    holdings = [Holding(rank=2, name="w", start=0, end=10, role=BUDDY)]
    transfers, _ = plan_transfers({0: {"w": [(0, 10)]}}, holdings)
    assert transfers == [Transfer(dst=0, name="w", start=0, end=10, src=2, via=BUDDY)]


def test_load_is_spread_over_equally_good_sources():
    # two replicas of the same parameter (ZeRO-0 stage peers); four new ranks need it
    holdings = holdings_from_layout({1: {"w": [(0, 100)]}, 2: {"w": [(0, 100)]}})
    needs = {r: {"w": [(0, 100)]} for r in (3, 4, 5, 6)}
    transfers, _ = plan_transfers(needs, holdings)
    sent = {1: 0, 2: 0}
    for t in transfers:
        sent[t.src] += t.numel
    assert sent == {1: 200, 2: 200}


def test_a_slice_without_any_surviving_copy_fails_with_the_slice_named():
    holdings = holdings_from_layout({0: {"w": [(0, 40)]}})
    transfers, reason = plan_transfers({1: {"w": [(0, 100)]}}, holdings)
    assert transfers is None
    assert reason == "no surviving copy of 1 slice(s): w[40:100] for rank 1"


def test_an_unknown_name_fails():
    transfers, reason = plan_transfers({0: {"v": [(0, 4)]}}, [])
    assert transfers is None and "v[0:4] for rank 0" in reason


def test_check_plan_finds_overlaps_gaps_and_phantom_sources():
    holdings = holdings_from_layout({0: {"w": [(0, 10)]}})
    needs = {1: {"w": [(0, 10)]}}
    assert check_plan(needs, [Transfer(dst=1, name="w", start=0, end=10, src=0)], holdings) == []
    assert check_plan(needs, [Transfer(dst=1, name="w", start=0, end=6, src=0),
                              Transfer(dst=1, name="w", start=4, end=10, src=0)], holdings)
    assert check_plan(needs, [Transfer(dst=1, name="w", start=0, end=6, src=0)], holdings)
    assert check_plan(needs, [Transfer(dst=1, name="w", start=0, end=10, src=3)], holdings)


# ------------------------------------------------------------ random layouts
@st.composite
def splits(draw, size: int, parts: int):
    """Contiguous split of [0, size) into ``parts`` possibly empty spans."""
    cuts = sorted(draw(st.lists(st.integers(0, size), min_size=parts - 1, max_size=parts - 1)))
    edges = [0, *cuts, size]
    return list(zip(edges, edges[1:]))


@st.composite
def scenarios(draw):
    names = {f"p{i}": draw(st.integers(1, 300)) for i in range(draw(st.integers(1, 4)))}
    old_world = draw(st.integers(1, 6))
    new_world = draw(st.integers(1, 6))
    old, new = {r: {} for r in range(old_world)}, {r: {} for r in range(new_world)}
    for name, size in names.items():
        for r, span in enumerate(draw(splits(size, old_world))):
            old[r][name] = [span]
        for r, span in enumerate(draw(splits(size, new_world))):
            new[r][name] = [span]
    dead = draw(st.sets(st.integers(0, old_world - 1), max_size=old_world))
    return names, old, new, dead


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_random_layouts_are_covered_exactly_and_disjointly_or_refused(scenario):
    names, old, new, dead = scenario
    world = max(len(old), len(new))
    holdings = []
    for r, held in old.items():
        if r not in dead:
            holdings += holdings_from_layout({r: held}, OWNER)
        buddy = (r + 1) % len(old)  # every rank's buddy keeps a copy of its snapshot
        if buddy not in dead and buddy != r:
            holdings += holdings_from_layout({buddy: held}, BUDDY)
    transfers, reason = plan_transfers(new, holdings)
    covered = {name: [False] * size for name, size in names.items()}
    for h in holdings:
        for i in range(h.start, h.end):
            covered[h.name][i] = True
    recoverable = all(all(flags) for flags in covered.values())
    assert (transfers is not None) == recoverable, reason
    if transfers is None:
        assert reason.startswith("no surviving copy")
        return
    assert check_plan(new, transfers, holdings) == []
    assert all(0 <= t.src < world for t in transfers)
    # local first: no element a rank holds itself is ever fetched from elsewhere
    own = {(h.rank, h.name, i) for h in holdings for i in range(h.start, h.end)}
    for t in transfers:
        if not t.is_local:
            assert not any((t.dst, t.name, i) in own for i in range(t.start, t.end))
    # owner before buddy: a buddy copy is used only where no live owner copy exists
    owner_elems = {(h.name, i) for h in holdings if h.role == OWNER for i in range(h.start, h.end)}
    buddy_only = {(h.rank, h.name) for h in holdings if h.role == BUDDY}
    for t in transfers:
        if t.is_local or (t.src, t.name) not in buddy_only:
            continue
        src_owns = any(h.rank == t.src and h.name == t.name and h.role == OWNER
                       and h.start <= t.start and t.end <= h.end for h in holdings)
        if not src_owns:
            assert not any((t.name, i) in owner_elems for i in range(t.start, t.end))
