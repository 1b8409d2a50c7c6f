"""Quarantine instead of exile: when a job may use a slot again after one of its workers failed there.

A crash is usually transient, so a slot where a worker failed is not given up for good: it is
*quarantined* for a cool-down that doubles with every further failure of that slot
(``base_cooldown_s * 2**(count-1)``, capped at ``max_cooldown_s``) and starts again from the
base once the slot has gone ``healthy_reset_s`` without a failure. Past its cool-down the slot
is free for the job again, and the existing two-phase growth (controller/recovery_decisions.py
``should_grow``) brings the job back towards ``max_workers`` onto it.

A slot that keeps failing (``slot_cordon_failures`` failures within ``window_s``) is *cordoned
for the job*: never used again by this job while its node's agent runs on. A node that keeps
failing (``node_cordon_failures`` failures of the job's workers on it, or losses of the node
itself, within ``window_s``) is cordoned for the whole cluster (a ``CordonRecord``, an event and
a metric; an operator uncordons it). So a flapping slot or node costs the job a bounded number
of re-plans, never an endless grow/fail oscillation.

A node that rejoins (its agent registered after a failure there: ``NodeRecord.started``) is
usable at once: its records from before the restart are void. A lost node is never quarantined
(a node coming back is a node joining); its losses only count towards cordoning it.

Pure, no I/O and no clock: ``controller/recovery.py`` carries the records from plan to plan in
``plan.extra["quarantine"]`` (written in the plan's own transaction, so they are exactly as
durable as the plan), and ``plan.extra["failed_slots"]`` lists the slots excluded when the plan
was written (readers that have no clock, e.g. the health loop's choice of a spare, use it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

QUARANTINE_KEY = "quarantine"
"""``Plan.extra`` key holding the job's quarantine records (a list of ``SlotRecord.to_dict()``)."""
FAILED_SLOTS_KEY = "failed_slots"
"""``Plan.extra`` key: [[node, slot], ...] excluded (quarantined or cordoned) when the plan was written."""
NODE_WIDE = -1
"""``SlotRecord.slot`` of a record about a whole node (its losses): no cool-down, counts towards its cordon."""
MAX_REMEMBERED_FAILURES = 64
"""Failure times kept per record (the window rarely holds more; bounds the plan's size)."""

AUTO_CORDON_REASON = "failing"
"""``CordonRecord.reason`` prefix of a node cordoned by these decisions (``failing: <why>``), so
an operator's cordon and a drain stay distinguishable."""

@dataclass(kw_only=True)
class QuarantineSettings:
    base_cooldown_s: float = 300.0
    """Time a slot stays out of the job after its first failure (seconds): long enough that a
    growth back onto it (a stall of the whole job) is not spent on a slot that fails again at once."""
    max_cooldown_s: float = 3600.0
    """Longest cool-down, however often the slot failed (seconds)."""
    healthy_reset_s: float = 3600.0
    """A slot with no failure for this long starts again at ``base_cooldown_s`` (seconds)."""
    window_s: float = 3600.0
    """Failures older than this do not count towards a cordon (seconds)."""
    slot_cordon_failures: int = 3
    """Failures of one slot within ``window_s`` that cordon the slot for the job (count)."""
    node_cordon_failures: int = 5
    """Failures on one node (any slot of the job, or the node lost) within ``window_s`` that cordon the node (count)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("base_cooldown_s", "max_cooldown_s", "healthy_reset_s", "window_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"quarantine.{name}: must be a positive number of seconds, got {value!r}")
        if self.max_cooldown_s < self.base_cooldown_s:
            raise ValueError(f"quarantine.max_cooldown_s: must be >= base_cooldown_s={self.base_cooldown_s}, "
                             f"got {self.max_cooldown_s}")
        for name in ("slot_cordon_failures", "node_cordon_failures"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"quarantine.{name}: must be an integer >= 1, got {value!r}")


@dataclass(kw_only=True, frozen=True)
class SlotRecord:
    """What the job remembers of the failures at one (node, slot)."""

    node: str
    slot: int
    """Slot index, or NODE_WIDE for the losses of the node itself."""
    failures: tuple[float, ...] = ()
    """Failure times (unix seconds), oldest first, at most MAX_REMEMBERED_FAILURES."""
    count: int = 0
    """Failures in a row, each within ``healthy_reset_s`` of the one before: the cool-down's exponent."""
    until: float = 0.0
    """The job may use the slot again from this time (unix seconds)."""
    cordoned: str = ""
    """Non-empty: the slot is cordoned for the job (why), until its node's agent restarts."""

    @property
    def last_failure(self) -> float:
        return self.failures[-1] if self.failures else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "slot": self.slot, "failures": list(self.failures), "count": self.count,
                "until": self.until, "cordoned": self.cordoned}

    @classmethod
    def from_dict(cls, data: Any) -> "SlotRecord | None":
        """The record, or None for garbage (a plan's extra is forward-compatible, never trusted)."""
        if not isinstance(data, dict):
            return None
        node, slot = data.get("node"), data.get("slot")
        if not isinstance(node, str) or not node or isinstance(slot, bool) or not isinstance(slot, int):
            return None
        times = data.get("failures", [])
        times = [float(t) for t in times if _number(t)] if isinstance(times, list) else []
        count, until, cordoned = data.get("count", 0), data.get("until", 0.0), data.get("cordoned", "")
        return cls(node=node, slot=slot, failures=tuple(sorted(times))[-MAX_REMEMBERED_FAILURES:],
                   count=int(count) if _number(count) and count >= 0 else 0,
                   until=float(until) if _number(until) else 0.0,
                   cordoned=cordoned if isinstance(cordoned, str) else "")


@dataclass(kw_only=True, frozen=True)
class Cordon:
    """A cordon decided by ``record_failures``: the loop writes it (and an event, and a metric)."""

    node: str
    slot: int | None
    """None: the whole node (a cluster ``CordonRecord``); else the slot, for this job only."""
    reason: str


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------ reading a plan
def records_from(extra: Mapping[str, Any], *, settings: QuarantineSettings) -> list[SlotRecord]:
    """The quarantine records carried in a plan's extra.

    A plan written before quarantine existed only lists ``failed_slots`` (exile): each becomes
    one failure at the plan's ``planned_at``, so it gets the base cool-down, not a life sentence."""
    raw = extra.get(QUARANTINE_KEY)
    if isinstance(raw, list):
        return [r for r in (SlotRecord.from_dict(item) for item in raw) if r is not None]
    at = extra.get("planned_at", 0.0)
    at = float(at) if _number(at) else 0.0
    out: list[SlotRecord] = []
    for item in extra.get(FAILED_SLOTS_KEY) or []:
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) \
                and isinstance(item[1], int) and not isinstance(item[1], bool):
            out.append(SlotRecord(node=item[0], slot=item[1], failures=(at,), count=1,
                                  until=at + settings.base_cooldown_s))
    return out


# ------------------------------------------------------------------ decisions
def cooldown_s(count: int, settings: QuarantineSettings) -> float:
    """Cool-down after the ``count``-th failure in a row: base * 2^(count-1), capped."""
    if count < 1:
        return 0.0
    return min(settings.max_cooldown_s, settings.base_cooldown_s * 2.0 ** min(count - 1, 60))


def voided(record: SlotRecord, node_started: Mapping[str, float]) -> bool:
    """A slot's node re-registered after the slot's last failure: a fresh agent, usable at once.
    A node's own losses are never voided by its return (it always returns after one): they
    are what cordons a flapping node."""
    if record.slot == NODE_WIDE:
        return False
    started = node_started.get(record.node, 0.0)
    return bool(record.failures) and started > record.last_failure


def slot_state(record: SlotRecord, *, now: float, node_started: Mapping[str, float] = {}) -> tuple[bool, str]:
    """(usable now, reason) for one record's slot."""
    where = f"{record.node}/{record.slot}"
    if record.slot == NODE_WIDE:
        return True, f"node {record.node}: losses only count towards a cordon"
    if voided(record, node_started):
        return True, f"{where}: its node's agent restarted after the last failure"
    if record.cordoned:
        return False, f"{where} cordoned for the job: {record.cordoned}"
    if now < record.until:
        return False, (f"{where} quarantined for {record.until - now:.0f} s more "
                       f"(failure {record.count} in a row)")
    return True, f"{where}: cool-down over"


def excluded_slots(records: Iterable[SlotRecord], *, now: float,
                   node_started: Mapping[str, float] = {}) -> dict[tuple[str, int], str]:
    """(node, slot) the job must not use now -> why (quarantined or cordoned)."""
    out: dict[tuple[str, int], str] = {}
    for r in records:
        ok, why = slot_state(r, now=now, node_started=node_started)
        if not ok:
            out[(r.node, r.slot)] = why
    return out


def _failures_in_window(records: Iterable[SlotRecord], now: float, settings: QuarantineSettings) -> int:
    return sum(1 for r in records for t in r.failures if now - t < settings.window_s)


def record_failures(records: Iterable[SlotRecord], *, slots: Iterable[tuple[str, int]] = (),
                    lost_nodes: Iterable[str] = (), now: float, settings: QuarantineSettings,
                    node_started: Mapping[str, float] = {}, cordoned_nodes: Iterable[str] = ()
                    ) -> tuple[list[SlotRecord], list[Cordon]]:
    """The records after workers failed at ``slots`` and ``lost_nodes`` were lost, at ``now``;
    and the cordons that decides.

    Each failed slot: one more failure; ``count`` goes up by one (back to 1 if the slot
    had been healthy for ``healthy_reset_s``); quarantined until now + cooldown_s(count).
    A slot reaching ``slot_cordon_failures`` within the window is cordoned for the job; a
    node reaching ``node_cordon_failures`` (its slots' failures plus its own losses) is
    cordoned, unless it already is (``cordoned_nodes``); its failure history then starts
    afresh, so an operator's uncordon is not undone by the next single failure.
    """
    by_key: dict[tuple[str, int], SlotRecord] = {}
    for r in records:
        if voided(r, node_started):
            continue  # the node came back since: what happened before says nothing of it now
        by_key[(r.node, r.slot)] = r
    cordons: list[Cordon] = []
    touched: set[str] = set()
    events = [(node, slot) for node, slot in sorted(set(slots))] + \
        [(node, NODE_WIDE) for node in sorted(set(lost_nodes))]
    for node, slot in events:
        touched.add(node)
        old = by_key.get((node, slot), SlotRecord(node=node, slot=slot))
        recent = old.failures and now - old.last_failure < settings.healthy_reset_s
        count = old.count + 1 if recent else 1
        failures = tuple(t for t in old.failures if now - t < settings.window_s) + (now,)
        failures = failures[-MAX_REMEMBERED_FAILURES:]
        until, cordoned = old.until, old.cordoned
        if slot != NODE_WIDE:
            until = max(until, now + cooldown_s(count, settings))
            if not cordoned and len(failures) >= settings.slot_cordon_failures:
                cordoned = (f"{len(failures)} failures within {settings.window_s:.0f} s "
                            f"(slot_cordon_failures={settings.slot_cordon_failures})")
                cordons.append(Cordon(node=node, slot=slot, reason=cordoned))
        by_key[(node, slot)] = SlotRecord(node=node, slot=slot, failures=failures, count=count, until=until,
                                          cordoned=cordoned)
    fenced = set(cordoned_nodes)
    for node in sorted(touched - fenced):
        mine = [r for r in by_key.values() if r.node == node]
        n = _failures_in_window(mine, now, settings)
        if n >= settings.node_cordon_failures:
            cordons.append(Cordon(node=node, slot=None, reason=(
                f"{n} failures of job workers or of the node within {settings.window_s:.0f} s "
                f"(node_cordon_failures={settings.node_cordon_failures})")))
            for r in mine:
                by_key[(r.node, r.slot)] = dataclasses.replace(r, failures=())
    return sorted(by_key.values(), key=lambda r: (r.node, r.slot)), cordons


def prune(records: Iterable[SlotRecord], *, now: float, settings: QuarantineSettings,
          node_started: Mapping[str, float] = {}) -> list[SlotRecord]:
    """The records still worth carrying: a cordon, a cool-down running, or a failure recent
    enough to count (towards the exponent or a cordon). The rest are forgotten."""
    keep_s = max(settings.healthy_reset_s, settings.window_s)
    out = []
    for r in records:
        if voided(r, node_started):
            continue
        if r.cordoned or now < r.until or (r.failures and now - r.last_failure < keep_s):
            out.append(r)
    return sorted(out, key=lambda r: (r.node, r.slot))


def plan_extra(records: Iterable[SlotRecord], *, now: float, settings: QuarantineSettings,
               node_started: Mapping[str, float] = {}) -> dict[str, Any]:
    """The ``Plan.extra`` fields for the records, as of ``now`` (pruned)."""
    kept = prune(records, now=now, settings=settings, node_started=node_started)
    excluded = excluded_slots(kept, now=now, node_started=node_started)
    return {QUARANTINE_KEY: [r.to_dict() for r in kept],
            FAILED_SLOTS_KEY: [[node, slot] for node, slot in sorted(excluded)]}
