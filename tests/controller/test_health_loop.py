"""The leader's health loop: its pure gathering functions, and one pass of the loop
against an in-memory etcd mirror with a fake recovery (which plan it would ask for).

Includes the "no rank flagged over 500 steps of a healthy run" check, with
synthetic seeded telemetry (per-rank jitter, a shared slow step now and then)
through the real agent summary format, ``step_window`` and controller/detection.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

import pytest
import yaml

from cli.controller import add_controller_args, health_settings_from_args, settings_from_args
from controller import metrics
from controller.decisions import Slot, build_plan
from controller.detection import HangSettings, StragglerSettings
from controller.health_loop import (HealthLoop, HealthSettings, hang_decision, nodes_to_drain, rank_progress,
                                    spare_exists, step_window, telemetry_ranks, telemetry_since)
from controller.handle import ControllerHandle
from controller.recovery import RecoverySettings
from controller.state import ClusterCache, NodeSummary
from protos.keys import Keys
from protos.records import JobStatusRecord
from tests.conftest import REPO
from common.spec import JobSpec

KEYS = Keys()
JOB = "job-a"


def spec(**overrides) -> JobSpec:
    data = yaml.safe_load((REPO / "examples" / "tiny-gpt.yaml").read_text())
    data.update(overrides)
    return JobSpec.from_dict(data)


def plan_for(s: JobSpec, nodes=("n0", "n1")):
    world = s.parallelism.dp * s.parallelism.pp
    placement = [Slot(node=nodes[r * len(nodes) // world], slot=r % 2) for r in range(world)]
    return build_plan(job_id=JOB, spec=s, placement=placement, store_address="127.0.0.1:1")


def entry(*, generation=1, step=0, progress_at=0.0, heartbeat_at=None, stopped=False, phase="", steps=()):
    return {"pid": 1, "generation": generation, "step": step, "progress_at": progress_at,
            "heartbeat_at": heartbeat_at, "phase": phase, "stopped": stopped, "steps": [list(s) for s in steps]}


def steps_of(first: int, last: int, compute: float, generation=1, step_time=0.2):
    return [[s, compute, 0.01, step_time, generation] for s in range(first, last + 1)]


# ------------------------------------------------------------------ pure gathering
def test_telemetry_ranks_merges_nodes_skips_garbage_and_prefers_fresher():
    a = json.dumps({"node": "n0", "ranks": {"0": entry(progress_at=5), "1": entry(progress_at=9)}})
    b = json.dumps({"node": "n1", "ranks": {"1": entry(progress_at=7), "x": {}, "2": "junk"}})
    ranks = telemetry_ranks([a, b, "not json", json.dumps([1, 2])])
    assert sorted(ranks) == [0, 1]
    assert ranks[1]["progress_at"] == 9


def test_step_window_keeps_complete_steps_of_the_plan_generation_and_splits_waiting():
    plan = plan_for(spec(parallelism={"dp": 2, "pp": 1, "zero_stage": 1}, resources={"workers": 2, "device": "cpu"}))
    ranks = {0: entry(steps=[[1, 0.1, 0.30, 0.4, 1], [2, 0.1, 0.3, 0.4, 1], [3, 0.1, 0.3, 0.4, 2]]),
             1: entry(steps=[[1, 0.3, 0.05, 0.4, 1], [3, 0.3, 0.05, 0.4, 2]])}
    window = step_window(plan, ranks)
    assert [t.step for t in window] == [1]  # step 2: rank 1 missing; step 3: another generation
    assert window[0].compute_s == {0: 0.1, 1: 0.3}
    assert window[0].collective_wait_s[0] == pytest.approx(0.25)  # waited for the slow rank
    assert window[0].collective_wait_s[1] == 0.0


def test_rank_progress_never_predates_the_generation_and_reads_stopped():
    plan = plan_for(spec())
    ranks = {0: entry(progress_at=10.0, stopped=True, phase="collective"), 1: entry(generation=7)}
    progress = rank_progress(plan, ranks, generation_seen_at=50.0)
    assert [p.rank for p in progress] == [0]  # rank 1 reports another generation
    assert progress[0].progress_at == 50.0 and progress[0].process_stopped and progress[0].in_collective


def test_hang_decision_startup_ranks_get_the_startup_timeout_not_k_times_median():
    plan = plan_for(spec())
    settings = HangSettings(k=5, floor_s=4, startup_timeout_s=60)
    # rank 1 finished step 1 (2 s); the others are still starting up, 11 s after launch
    ranks = {r: entry(progress_at=0.0, heartbeat_at=10.5) for r in (0, 2, 3)}
    ranks[1] = entry(step=1, progress_at=11.0, steps=steps_of(1, 1, 1.2, step_time=2.0))
    decision, reason = hang_decision(plan, ranks, 11.5, generation_seen_at=0.0, settings=settings)
    assert decision.hung_ranks == (), reason


def test_hang_decision_a_stopped_rank_of_a_new_generation_is_judged_with_the_floor_not_the_startup_timeout():
    # soak (issue #16): a survivor SIGSTOPped just before a re-plan never joins the new
    # generation's rendezvous; with the startup timeout the others waited 300 s for it
    plan = plan_for(spec())
    settings = HangSettings(k=5, floor_s=4, startup_timeout_s=300)
    ranks = {r: entry(progress_at=0.0, heartbeat_at=9.5, phase="collective") for r in (0, 1, 2)}
    ranks[3] = entry(progress_at=0.0, heartbeat_at=0.0, stopped=True)
    early, reason = hang_decision(plan, ranks, 3.0, generation_seen_at=0.0, settings=settings)
    assert early.hung_ranks == (), reason  # within the floor: a SIGSTOP/SIGCONT blip is no hang
    decision, reason = hang_decision(plan, ranks, 4.5, generation_seen_at=0.0, settings=settings)
    assert decision.hung_ranks == (3,), reason
    assert "stopped" in reason
    running = dict(ranks)
    running[3] = entry(progress_at=0.0, heartbeat_at=4.4)  # the same rank, not stopped: still starting up
    healthy, reason = hang_decision(plan, running, 4.5, generation_seen_at=0.0, settings=settings)
    assert healthy.hung_ranks == (), reason


def test_hang_decision_picks_the_stopped_rank_among_stalled_ones():
    plan = plan_for(spec())
    settings = HangSettings(k=5, floor_s=4, startup_timeout_s=60)
    now = 100.0
    ranks = {r: entry(step=20, progress_at=90.0, heartbeat_at=99.5, phase="collective",
                      steps=steps_of(1, 20, 0.1)) for r in range(4)}
    ranks[2] = entry(step=20, progress_at=90.0, heartbeat_at=90.0, stopped=True, phase="compute",
                     steps=steps_of(1, 20, 0.1))
    decision, reason = hang_decision(plan, ranks, now, generation_seen_at=0.0, settings=settings)
    assert decision.hung_ranks == (2,), reason
    assert decision.stalled_ranks == (0, 1, 2, 3)
    healthy, _ = hang_decision(plan, {r: entry(step=20, progress_at=99.0, steps=steps_of(1, 20, 0.1))
                                      for r in range(4)}, now, generation_seen_at=0.0, settings=settings)
    assert healthy.hung_ranks == ()


def test_an_etcd_outage_is_not_counted_as_the_ranks_silence():
    # the ranks stepped until t=100 (0.1 s steps), then etcd was away from 100.5 to 108 and the
    # mirror reloaded at 108.5; the agents write again a little later (their own backoff)
    plan = plan_for(spec())
    settings = HangSettings(k=5, floor_s=4, startup_timeout_s=60)
    stale = {r: entry(step=50, progress_at=100.0, heartbeat_at=100.2, steps=steps_of(1, 50, 0.1))
             for r in range(4)}
    assert telemetry_since(synced=False, synced_at=0.0, generation_seen_at=0.0) is None  # outage: not judged
    since = telemetry_since(synced=True, synced_at=108.5, generation_seen_at=0.0)
    assert since == 108.5
    # the frozen timestamps alone would make every rank "silent, no heartbeat" (all killed)
    wrong, reason = hang_decision(plan, stale, 110.0, generation_seen_at=0.0, settings=settings)
    assert wrong.hung_ranks == (0, 1, 2, 3), reason
    decision, reason = hang_decision(plan, stale, 110.0, generation_seen_at=since, settings=settings)
    assert decision.hung_ranks == () and decision.stalled_ranks == (), reason
    # a rank that really stopped during the outage is found a timeout after the reload
    stopped = {**stale, 2: {**stale[2], "stopped": True}}
    fresh = {r: {**e, "step": 130, "progress_at": 111.9, "heartbeat_at": 112.0} for r, e in stopped.items() if r != 2}
    fresh[2] = stopped[2]
    early, reason = hang_decision(plan, fresh, 112.0, generation_seen_at=since, settings=settings)
    assert early.hung_ranks == (), reason
    late, reason = hang_decision(plan, fresh, 113.0, generation_seen_at=since, settings=settings)
    assert late.hung_ranks == (2,), reason
    # the generation's own first sighting still counts when it is the later one
    assert telemetry_since(synced=True, synced_at=108.5, generation_seen_at=120.0) == 120.0


def test_loop_judges_no_hang_while_the_mirror_is_broken_or_just_reloaded():
    s = spec()
    c, plan = controller_with_job(s)
    loop = HealthLoop(c.handle, c.recovery, HealthSettings(hang=HangSettings(floor_s=4, startup_timeout_s=60)))
    publish(c, plan, {r: entry(step=10, progress_at=80.0, heartbeat_at=80.0, steps=steps_of(1, 10, 0.1))
                      for r in range(4)})
    loop._jobs.clear()
    asyncio.run(loop.tick(79.0))  # the generation is first seen
    c.cache.synced.clear()  # etcd went away at ~80: the watch broke
    asyncio.run(loop.tick(95.0))
    c.cache.synced_at = 96.0  # reloaded; the agents have not written again yet
    c.cache.synced.set()
    asyncio.run(loop.tick(99.0))
    assert not [k for k in c.etcd.puts if k.startswith(KEYS.prefix + "/chaos/")], "judged stale telemetry"
    assert not [k for k in c.etcd.puts if k.startswith(KEYS.job_events(JOB))]
    asyncio.run(loop.tick(100.5))  # past the floor after the reload, still nothing new: judged now
    kills = [json.loads(v) for k, v in c.etcd.puts.items() if k.startswith(KEYS.prefix + "/chaos/")
             and json.loads(v)["action"] == "kill"]
    assert kills, "a rank silent for a whole timeout after the reload must be judged"


def node(node_id, *, condition="HEALTHY", used=1, cordon=None, slots=2, registered=True):
    return NodeSummary(id=node_id, record={"id": node_id, "slots": slots, "condition": condition,
                                           "condition_reason": "gpu 0: XID 13" if condition != "HEALTHY" else ""},
                       registered=registered, state="READY", reason="", cordon=cordon, used_slots=used)


def test_nodes_to_drain_only_bad_uncordoned_registered_nodes_with_workers():
    nodes = {"a": node("a", condition="DEGRADED"), "b": node("b", condition="FAILED", used=0),
             "c": node("c", condition="DEGRADED", cordon=object()), "d": node("d"),
             "e": node("e", condition="FAILED", registered=False)}
    assert nodes_to_drain(nodes) == [("a", "node DEGRADED: gpu 0: XID 13")]
    assert spare_exists({"d": node("d", used=1)}) and not spare_exists({"d": node("d", used=2)})
    assert not spare_exists({"a": node("a", condition="DEGRADED", used=0)})


def controller_flags(*argv: str):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_controller_args(parser)
    return parser.parse_args(["--tls", "plaintext", *argv])


def test_health_settings_from_controller_flags_validate_and_name_the_flag():
    s = health_settings_from_args(controller_flags("--hang-floor-s=3", "--straggler-window=12",
                                                   "--straggler-window-s=0.5", "--no-drain-degraded"))
    assert s.hang.floor_s == 3 and s.straggler.window_steps == 12 and s.straggler.min_window_s == 0.5
    assert s.drain_degraded is False
    default = health_settings_from_args(controller_flags())
    assert default == HealthSettings() and default.straggler.min_window_s == 2.0 and default.drain_degraded
    for bad in ("--hang-k=0.5", "--straggler-window-s=-1", "--health-interval-s=0", "--hang-floor-s=0",
                "--straggler-window=0", "--straggler-z=0"):
        flag = bad.partition("=")[0]
        with pytest.raises(ValueError, match=f"^{flag}: "):
            health_settings_from_args(controller_flags(bad))
    for unparsable in ("--hang-floor-s=x", "--straggler-window=2.5", "--drain-degraded=yes"):
        with pytest.raises((argparse.ArgumentError, SystemExit)):
            controller_flags(unparsable)


def test_recovery_and_server_settings_from_controller_flags_name_the_flag():
    settings = settings_from_args(controller_flags("--growth-prepare-s=4", "--hang-floor-s=4"))
    assert settings.recovery.growth_prepare_s == 4 and settings.health.hang.floor_s == 4
    assert settings_from_args(controller_flags()).recovery == RecoverySettings()
    assert RecoverySettings().survivors_first is True
    assert settings_from_args(controller_flags("--no-survivors-first")).recovery.survivors_first is False
    for bad in ("--growth-prepare-s=0", "--lease-ttl=0", "--listen=nowhere", "--prefix=tenax/"):
        flag = bad.partition("=")[0]
        with pytest.raises(ValueError, match=f"^{flag}: "):
            settings_from_args(controller_flags(bad))


# ------------------------------------------------------------------ 500 healthy steps
def healthy_telemetry(world: int, steps: int, seed: int) -> list[dict[int, float]]:
    """Per-step compute of ``world`` equal ranks: ~3% lognormal jitter per rank, and every
    ~25 steps one rank has a 25% hiccup (page cache, a GC pause) for a single step."""
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        shared = rng.uniform(0.95, 1.05)  # the whole step is a little slower or faster
        row = {r: 0.2 * shared * rng.lognormvariate(0, 0.03) for r in range(world)}
        if rng.random() < 0.04:
            row[rng.randrange(world)] *= 1.25
        out.append(row)
    return out


@pytest.mark.parametrize("dp,pp", [(4, 1), (2, 2), (2, 1)])
def test_no_rank_flagged_over_500_healthy_steps(dp, pp):
    from controller.detection import StragglerPolicy, decide_straggler

    s = spec(parallelism={"dp": dp, "pp": pp, "zero_stage": 1}, resources={"workers": dp * pp, "device": "cpu"})
    plan = plan_for(s)
    settings = StragglerSettings()
    rows = healthy_telemetry(plan.world_size, 500, seed=dp * 10 + pp)
    flagged_ever = set()
    for end in range(1, len(rows) + 1):
        # what the agents would publish: each rank's last 64 steps
        start = max(0, end - 64)
        ranks = {r: entry(step=end, steps=[[i + 1, rows[i][r], 0.01, 0.25, 1] for i in range(start, end)])
                 for r in range(plan.world_size)}
        window = step_window(plan, ranks)
        decision, _ = decide_straggler(window, policy=StragglerPolicy.REBALANCE, shares=plan.sample_shares,
                                       micro_batch=s.micro_batch_size, pp=plan.pp, settings=settings)
        flagged_ever |= set(decision.flagged_ranks)
    assert flagged_ever == set()


# ------------------------------------------------------------------ one pass of the loop
class FakeEtcd:
    def __init__(self):
        self.puts: dict[str, str] = {}

    async def put(self, key, value, **_):
        self.puts[key] = value
        return 1


class FakeRecovery:
    def __init__(self):
        self.calls = []

    async def request_rebalance(self, job_id, shares, at_step=None, cause="rebalance"):
        self.calls.append(("rebalance", job_id, tuple(shares), at_step, cause))
        return True, "written"

    async def request_migration(self, job_id, ranks, cause="migrate", *, at_step=None):
        self.calls.append(("migrate", job_id, tuple(ranks), cause))
        return True, "written"

    async def request_drain(self, node_id, reason="drain"):
        self.calls.append(("drain", node_id, reason))
        return True, "draining"


class FakeController:
    def __init__(self):
        self.keys = KEYS
        self.etcd = FakeEtcd()
        self.cache = ClusterCache(self.etcd, KEYS)
        self.cache.synced.set()  # as after its first load (the loop judges only a synced mirror)
        self.recovery = FakeRecovery()
        self.handle = ControllerHandle(etcd=self.etcd, keys=KEYS, cache=self.cache, wake=lambda: None,
                                       is_leader=lambda: True)

    def put(self, key: str, value: str) -> None:
        self.cache.data[key] = (value, len(self.cache.data) + 1)


def controller_with_job(s: JobSpec, *, policy="rebalance", conditions=None) -> tuple[FakeController, object]:
    c = FakeController()
    data = s.to_dict()
    data["elastic"] = {**data["elastic"], "straggler_policy": policy}
    plan = plan_for(s)
    c.put(KEYS.job_spec(JOB), json.dumps(data))
    c.put(KEYS.job_status(JOB), JobStatusRecord(phase="RUNNING", generation=1).to_json())
    c.put(KEYS.job_plan(JOB), plan.to_json())
    for n in ("n0", "n1", "n2"):
        c.put(KEYS.node(n), json.dumps({"id": n, "slots": 2, "condition": (conditions or {}).get(n, "HEALTHY"),
                                        "condition_reason": "gpu 1: XID 13" if (conditions or {}).get(n) else ""}))
    return c, plan


def publish(c: FakeController, plan, ranks: dict[int, dict]) -> None:
    by_node: dict[str, dict] = {}
    for w in plan.workers:
        if w.rank in ranks:
            by_node.setdefault(w.node, {})[str(w.rank)] = ranks[w.rank]
    for n, entries in by_node.items():
        c.put(KEYS.job_telemetry_node(JOB, n), json.dumps({"node": n, "time": 0, "ranks": entries}))


def test_loop_flags_a_slow_rank_and_asks_for_a_rebalance_at_a_step_boundary():
    s = spec(parallelism={"dp": 4, "pp": 1, "zero_stage": 1}, resources={"workers": 4, "device": "cpu"})
    c, plan = controller_with_job(s)
    loop = HealthLoop(c.handle, c.recovery, HealthSettings(hang=HangSettings(floor_s=4, startup_timeout_s=60)))
    ranks = {r: entry(step=30, progress_at=99.9, steps=steps_of(1, 30, 0.2)) for r in range(4)}
    ranks[3] = entry(step=30, progress_at=99.9, steps=steps_of(1, 30, 0.3))  # +50% compute
    publish(c, plan, ranks)
    asyncio.run(loop.tick(100.0))
    [call] = c.recovery.calls
    kind, job, shares, at_step, cause = call
    assert (kind, job, cause) == ("rebalance", JOB, "straggler-rebalance")
    assert sum(shares) == s.global_batch_size and shares[3] < min(shares[:3])
    assert at_step == 30 + loop.settings.switch_ahead_steps
    assert metrics.STRAGGLER_SCORE.labels(JOB, "3")._value.get() > 3.5
    assert ("flag", f"{JOB}/3") in [(k, t) for k, t, _ in loop.actions]
    asyncio.run(loop.tick(100.5))
    assert len(c.recovery.calls) == 1, "asked twice in one generation"
    # generation 2 with the new shares; the same rank still looks slow per sample: no new plan
    # (per-sample speeds measured under uneven shares are biased; no ratcheting its share down)
    g2 = plan.__class__.from_dict({**plan.to_dict(), "generation": 2, "sample_shares": list(shares)})
    c.put(KEYS.job_plan(JOB), g2.to_json())
    publish(c, g2, {r: {**e, "generation": 2, "steps": [[*x[:4], 2] for x in e["steps"]]} for r, e in ranks.items()})
    asyncio.run(loop.tick(101.0))
    assert len(c.recovery.calls) == 1, "rebalanced again for the same straggler"


def test_loop_alert_policy_flags_but_writes_no_plan():
    s = spec(parallelism={"dp": 4, "pp": 1, "zero_stage": 1}, resources={"workers": 4, "device": "cpu"})
    c, plan = controller_with_job(s, policy="alert")
    loop = HealthLoop(c.handle, c.recovery, HealthSettings())
    ranks = {r: entry(step=30, progress_at=99.9, steps=steps_of(1, 30, 0.3 if r == 0 else 0.2)) for r in range(4)}
    publish(c, plan, ranks)
    before = metrics.STRAGGLERS_FLAGGED.labels(JOB)._value.get()
    asyncio.run(loop.tick(100.0))
    assert c.recovery.calls == []
    assert metrics.STRAGGLERS_FLAGGED.labels(JOB)._value.get() == before + 1


def test_loop_kills_a_stopped_rank_through_its_agent_once():
    s = spec()
    c, plan = controller_with_job(s)
    loop = HealthLoop(c.handle, c.recovery, HealthSettings(hang=HangSettings(floor_s=4, startup_timeout_s=60)))
    ranks = {r: entry(step=10, progress_at=80.0, heartbeat_at=99.0, steps=steps_of(1, 10, 0.1)) for r in range(4)}
    ranks[1] = {**ranks[1], "stopped": True, "heartbeat_at": 80.0}
    publish(c, plan, ranks)
    loop._jobs.clear()
    before = metrics.HANGS_DETECTED.labels(JOB)._value.get()
    asyncio.run(loop.tick(10.0))  # first pass: the generation is first seen now (progress floor)
    asyncio.run(loop.tick(100.0))
    chaos_puts = {k: json.loads(v) for k, v in c.etcd.puts.items() if k.startswith(KEYS.prefix + "/chaos/")}
    # before the kill: a Flight Recorder dump request to every node of the plan (controller/flight.py)
    dumps = [r for r in chaos_puts.values() if r["action"] == "flight-dump"]
    assert sorted(r["node"] for r in dumps) == sorted({w.node for w in plan.workers})
    [hang_event] = [json.loads(v) for k, v in c.etcd.puts.items() if k.startswith(KEYS.job_events(JOB))]
    assert hang_event["kind"] == "hang" and hang_event["data"]["ranks"] == [1]
    requests = {k: r for k, r in chaos_puts.items() if r["action"] != "flight-dump"}
    assert len(requests) == 1
    [(key, record)] = requests.items()
    assert key.startswith(KEYS.chaos(plan.worker(1).node))
    assert (record["action"], record["job"], record["rank"], record["generation"]) == ("kill", JOB, 1, 1)
    assert record["reason"] == "hang: rank 1 made no progress for 20.0 s, stopped by SIGSTOP"
    assert metrics.HANGS_DETECTED.labels(JOB)._value.get() == before + 1
    asyncio.run(loop.tick(101.0))
    assert len([k for k, v in c.etcd.puts.items() if k.startswith(KEYS.prefix + "/chaos/")
                and json.loads(v)["action"] == "kill"]) == 1, "killed twice"


def test_loop_kills_a_stopped_rank_while_the_job_recovers():
    # soak (issue #16): rank 1 was SIGSTOPped, then another worker died; plan 2 keeps rank 1,
    # whose rendezvous never forms while the job stays RECOVERING
    s = spec()
    c, plan = controller_with_job(s)
    g2 = plan.__class__.from_dict({**plan.to_dict(), "generation": 2})
    c.put(KEYS.job_plan(JOB), g2.to_json())
    c.put(KEYS.job_status(JOB), JobStatusRecord(phase="RECOVERING", generation=2).to_json())
    loop = HealthLoop(c.handle, c.recovery, HealthSettings(hang=HangSettings(floor_s=4, startup_timeout_s=300)))
    ranks = {r: entry(generation=2, step=10, progress_at=0.0, heartbeat_at=0.0, steps=steps_of(1, 10, 0.1))
             for r in range(4)}
    ranks[1] = {**ranks[1], "stopped": True}
    publish(c, g2, ranks)
    asyncio.run(loop.tick(10.0))  # the generation is first seen now
    asyncio.run(loop.tick(13.0))
    chaos_puts = lambda: [json.loads(v) for k, v in c.etcd.puts.items() if k.startswith(KEYS.prefix + "/chaos/")]
    assert chaos_puts() == [], "killed within the floor"
    asyncio.run(loop.tick(14.5))
    [record] = [r for r in chaos_puts() if r["action"] != "flight-dump"]  # dumps are asked for before a kill
    assert (record["action"], record["rank"], record["generation"]) == ("kill", 1, 2)
    assert "stopped by SIGSTOP" in record["reason"]


def test_loop_drains_a_degraded_node_that_runs_workers_once():
    s = spec()
    c, plan = controller_with_job(s, conditions={"n1": "DEGRADED"})
    loop = HealthLoop(c.handle, c.recovery, HealthSettings())
    asyncio.run(loop.tick(100.0))
    asyncio.run(loop.tick(100.5))
    assert c.recovery.calls == [("drain", "n1", "node DEGRADED: gpu 1: XID 13")]


def test_worth_rebalancing_needs_a_real_gain():
    from controller.health_loop import worth_rebalancing

    speeds = [1.0, 1.5]  # seconds per sample of each dp rank
    assert worth_rebalancing((8, 8), (10, 6), speeds, 0.05)  # 12 -> 10
    assert not worth_rebalancing((10, 6), (10, 6), speeds, 0.05)
    assert not worth_rebalancing((10, 6), (9, 7), speeds, 0.05)  # 10 -> 10.5: worse
    assert not worth_rebalancing((9, 7), (10, 6), [1.0, 1.4], 0.05)  # 9.8 -> 10: not better


def test_loop_leaves_shares_that_already_fit_and_scales_compute_by_share():
    s = spec(parallelism={"dp": 2, "pp": 1, "zero_stage": 1}, resources={"workers": 2, "device": "cpu"})
    c, plan = controller_with_job(s)
    rebalanced = plan.__class__.from_dict({**plan.to_dict(), "sample_shares": [10, 6]})
    c.put(KEYS.job_plan(JOB), rebalanced.to_json())
    # per sample, rank 1 is 1.5x slower; with 10/6 shares their raw compute is close (0.25 vs 0.225)
    ranks = {0: entry(step=30, progress_at=99.9, steps=steps_of(1, 30, 0.25)),
             1: entry(step=30, progress_at=99.9, steps=steps_of(1, 30, 0.225))}
    publish(c, rebalanced, ranks)
    window = step_window(rebalanced, ranks)
    assert window[-1].compute_s == {0: pytest.approx(0.2), 1: pytest.approx(0.3)}  # as if 8 samples each
    loop = HealthLoop(c.handle, c.recovery, HealthSettings())
    asyncio.run(loop.tick(100.0))
    assert c.recovery.calls == []  # the shares already fit: no plan
    assert [t for k, t, _ in loop.actions if k == "flag"] == [f"{JOB}/1"]  # still the slow hardware


@pytest.mark.parametrize("dp,global_batch", [(2, 16), (4, 64), (8, 256)])
def test_rebalanced_throughput_reaches_the_best_a_slow_rank_allows(dp, global_batch):
    """A rank 1.5x slower per sample, shares rebalanced by the real decision code: the
    predicted throughput (slowest replica: max share x seconds per sample) against the
    healthy run, and against the ceiling (every rank busy all step: sum of speeds)."""
    from controller.detection import StragglerPolicy, StragglerSettings, StepTiming, decide_straggler
    from controller.health_loop import predicted_step_factor

    speeds = [1.0] * (dp - 1) + [1.5]  # seconds per sample
    even = [global_batch // dp] * dp
    window = [StepTiming(step=s, compute_s={r: even[r] * speeds[r] * 0.01 for r in range(dp)})
              for s in range(20)]
    decision, reason = decide_straggler(window, policy=StragglerPolicy.REBALANCE, shares=even, micro_batch=1,
                                        settings=StragglerSettings())
    assert decision.flagged_ranks == (dp - 1,), reason
    healthy = predicted_step_factor(even, [1.0] * dp)
    slowed = predicted_step_factor(even, speeds)
    rebalanced = predicted_step_factor(decision.shares, speeds)
    ceiling = global_batch / sum(1 / t for t in speeds)  # every rank finishes together
    print(f"dp={dp}: throughput vs healthy: slowed {healthy / slowed:.0%}, rebalanced {healthy / rebalanced:.0%}, "
          f"best possible {healthy / ceiling:.0%}")
    assert sum(decision.shares) == global_batch
    assert rebalanced <= 1.1 * ceiling  # within 10% of the best any split allows
    if dp >= 8:  # where the ceiling itself is within 10% of healthy, so is the rebalanced run
        assert healthy / rebalanced >= 0.9


# ------------------------------------------------------------------ the straggler record, evictions
def straggler_events(c: FakeController) -> dict[str, dict]:
    events = {k: json.loads(v) for k, v in c.etcd.puts.items() if k.startswith(KEYS.job_events(JOB))}
    return {k: e for k, e in events.items() if e["kind"] == "straggler"}


def test_loop_records_the_decision_step_in_a_straggler_event():
    s = spec(parallelism={"dp": 4, "pp": 1, "zero_stage": 1}, resources={"workers": 4, "device": "cpu"})
    c, plan = controller_with_job(s)
    loop = HealthLoop(c.handle, c.recovery, HealthSettings())
    ranks = {r: entry(step=30, progress_at=99.9, steps=steps_of(1, 30, 0.2)) for r in range(4)}
    ranks[3] = entry(step=30, progress_at=99.9, steps=steps_of(1, 30, 0.3))
    ranks[0] = entry(step=33, progress_at=99.9, steps=steps_of(1, 33, 0.2))  # ahead: steps 31-33 not complete
    publish(c, plan, ranks)
    asyncio.run(loop.tick(100.0))
    [(key, event)] = straggler_events(c).items()
    assert key == KEYS.job_event(JOB, plan.generation * 10 + 5)
    data = event["data"]
    assert data["generation"] == plan.generation and data["policy"] == "rebalance"
    assert data["flagged"] == {"3": {"step": 30, "seen_step": 33, "time": 100.0,
                                     "score": pytest.approx(data["flagged"]["3"]["score"])}}
    assert data["flagged"]["3"]["score"] > 3.5
    assert data["action"] == "rebalance" and data["action_step"] == 30 and data["action_ranks"] == [3]
    asyncio.run(loop.tick(101.0))
    assert straggler_events(c)[key] == event, "re-written although nothing changed"


def test_loop_writes_no_straggler_event_for_a_healthy_job():
    s = spec(parallelism={"dp": 4, "pp": 1, "zero_stage": 1}, resources={"workers": 4, "device": "cpu"})
    c, plan = controller_with_job(s)
    loop = HealthLoop(c.handle, c.recovery, HealthSettings())
    publish(c, plan, {r: entry(step=30, progress_at=99.9, steps=steps_of(1, 30, 0.2)) for r in range(4)})
    asyncio.run(loop.tick(100.0))
    assert straggler_events(c) == {} and c.recovery.calls == []


def one_slot_cluster(policy: str = "evict"):
    """Nodes n0, n1, n2 of one slot each; a dp2 job on n0 and n1 (n2 is the spare)."""
    s = spec(parallelism={"dp": 2, "pp": 1, "zero_stage": 1}, resources={"workers": 2, "device": "cpu"})
    c = FakeController()
    data = s.to_dict()
    data["elastic"] = {**data["elastic"], "straggler_policy": policy}
    plan = build_plan(job_id=JOB, spec=s, placement=[Slot(node="n0", slot=0), Slot(node="n1", slot=0)], store_address="127.0.0.1:1")
    c.put(KEYS.job_spec(JOB), json.dumps(data))
    c.put(KEYS.job_status(JOB), JobStatusRecord(phase="RUNNING", generation=1).to_json())
    c.put(KEYS.job_plan(JOB), plan.to_json())
    for n in ("n0", "n1", "n2"):
        c.put(KEYS.node(n), json.dumps({"id": n, "slots": 1, "condition": "HEALTHY"}))
    return c, plan


def test_loop_evicts_a_slow_rank_to_a_spare_and_never_back_to_the_slot_it_left():
    c, plan = one_slot_cluster()
    loop = HealthLoop(c.handle, c.recovery, HealthSettings())
    ranks = {0: entry(step=30, progress_at=99.9, steps=steps_of(1, 30, 0.2)),
             1: entry(step=30, progress_at=99.9, steps=steps_of(1, 30, 0.3))}
    publish(c, plan, ranks)
    asyncio.run(loop.tick(100.0))
    assert c.recovery.calls == [("migrate", JOB, (1,), "straggler-evict")]
    data = next(iter(straggler_events(c).values()))["data"]
    assert data["action"] == "evict" and data["action_ranks"] == [1] and "1" in data["flagged"]
    # generation 2: rank 1 now on the spare n2; only n1 (the slot it was evicted from) is free.
    # If the new rank looks slow too, there is no spare left for this job: rebalance instead.
    moved = build_plan(job_id=JOB, spec=spec(parallelism={"dp": 2, "pp": 1, "zero_stage": 1},
                                             resources={"workers": 2, "device": "cpu"}),
                       placement=[Slot(node="n0", slot=0), Slot(node="n2", slot=0)], store_address="127.0.0.1:1", generation=2)
    c.put(KEYS.job_plan(JOB), moved.to_json())
    c.put(KEYS.job_status(JOB), JobStatusRecord(phase="RUNNING", generation=2).to_json())
    c.cache.data.pop(KEYS.job_telemetry_node(JOB, "n1"))
    publish(c, moved, {r: {**e, "generation": 2, "steps": [[*x[:4], 2] for x in e["steps"]]}
                       for r, e in ranks.items()})
    asyncio.run(loop.tick(101.0))
    assert [call[0] for call in c.recovery.calls] == ["migrate", "rebalance"], c.recovery.calls


def test_spare_exists_skips_avoided_slots():
    nodes = {"a": node("a", slots=2, used=1), "b": node("b", slots=1, used=0)}
    assert spare_exists(nodes)
    nodes["a"].used = frozenset({0})
    assert spare_exists(nodes, avoid={("a", 1)})  # b/0 is free
    assert not spare_exists(nodes, avoid={("a", 1), ("b", 0)})


# ------------------------------------------------------------------ communication vs compute (issue #20)
def comm_entry(rank: int, *, compute=0.2, waits=None, generation=1, n=20):
    """A rank of the dp2·pp2 example (rank = dp * 2 + stage) with the agent's comm summary."""
    peer = rank + 1 if rank % 2 == 0 else rank - 1
    base = 0.05 if rank % 2 else 0.3  # stage 1 waits for activations, stage 0 for gradients (1F1B)
    wait = (waits or {}).get((peer, rank), base + 0.002 * rank)
    e = entry(step=30, progress_at=99.9, steps=steps_of(1, 30, compute), generation=generation)
    e["comm"] = {"n": n, "generation": generation, "compute": compute,
                 "kind": {"pipeline receive": wait, "gradient all-reduce": 0.02},
                 "peer": {f"pipeline receive|{peer}": wait, f"pipeline send|{peer}": 0.001}}
    return e


def test_comm_window_needs_every_rank_of_the_generation_over_enough_steps():
    from controller.health_loop import comm_window

    plan = plan_for(spec())
    ranks = {r: comm_entry(r) for r in range(4)}
    window, stage_of = comm_window(plan, ranks, min_steps=12)
    assert set(window) == {0, 1, 2, 3} and stage_of == {0: 0, 1: 1, 2: 0, 3: 1}
    assert window[1].receive_wait_s == {0: pytest.approx(0.052)}
    assert comm_window(plan, {**ranks, 3: comm_entry(3, n=5)}, min_steps=12) == ({}, {})
    assert comm_window(plan, {**ranks, 3: comm_entry(3, generation=2)}, min_steps=12) == ({}, {})
    assert comm_window(plan, {r: e for r, e in ranks.items() if r != 2}, min_steps=12) == ({}, {})


def test_loop_reports_a_slow_link_in_the_straggler_event_and_metrics_but_changes_no_plan():
    s = spec()  # dp2 x pp2, policy evict with spares around: still nothing to move for a link
    c, plan = controller_with_job(s, policy="evict")
    loop = HealthLoop(c.handle, c.recovery, HealthSettings())
    publish(c, plan, {r: comm_entry(r, waits={(0, 1): 0.45}) for r in range(4)})
    before = metrics.SLOW_LINKS.labels(JOB)._value.get()
    asyncio.run(loop.tick(100.0))
    assert c.recovery.calls == [], "a healthy rank moved for a link"
    assert metrics.SLOW_LINKS.labels(JOB)._value.get() == before + 1
    [event] = straggler_events(c).values()
    attribution = event["data"]["attribution"]
    assert event["data"]["flagged"] == {} and attribution["compute_ranks"] == [] and attribution["step"] == 30
    assert attribution["links"] == [{"sender": 0, "receiver": 1, "wait_s": 0.45, "reference_s": 0.056,
                                     "sender_compute_s": 0.2, "sender_compute_reference_s": 0.2}]
    assert event["message"].startswith("slow communication: link rank 0 -> rank 1 slow: rank 1 waits 0.450s/step")
    assert event["step"] == 30
    # the dashboard's pipeline link panel
    assert metrics.LINK_WAIT.labels(JOB, "0", "1")._value.get() == 0.45
    assert metrics.LINK_WAIT.labels(JOB, "2", "3")._value.get() == pytest.approx(0.056)
    asyncio.run(loop.tick(101.0))
    assert metrics.SLOW_LINKS.labels(JOB)._value.get() == before + 1, "the same link counted twice"


def test_loop_names_a_slow_ranks_compute_not_the_link_its_peer_waits_on():
    s = spec()
    c, plan = controller_with_job(s, policy="alert")
    loop = HealthLoop(c.handle, c.recovery, HealthSettings())
    publish(c, plan, {r: comm_entry(r, compute=0.6 if r == 2 else 0.2, waits={(2, 3): 0.45}) for r in range(4)})
    asyncio.run(loop.tick(100.0))
    [event] = straggler_events(c).values()
    data = event["data"]
    assert set(data["flagged"]) == {"2"} and data["attribution"]["compute_ranks"] == [2]
    assert data["attribution"]["links"] == []
    assert "rank 2 compute slow: 0.600s/step vs 0.200s on its stage (explains the waits of [3])" in event["message"]


def test_an_eviction_spares_a_rank_whose_slowness_is_a_link():
    from controller.attribution import Attribution, SlowLink
    from controller.detection import StragglerAction, StragglerDecision
    from controller.health_loop import spare_link_ranks

    link = SlowLink(sender=0, receiver=1, wait_s=0.4, reference_s=0.05, sender_compute_s=0.2,
                    sender_compute_reference_s=0.2)
    evict = StragglerDecision(action=StragglerAction.EVICT, flagged_ranks=(1, 2), evict_ranks=(1, 2))
    decision, note = spare_link_ranks(evict, Attribution(compute_ranks=(2,), links=(link,)))
    assert decision.evict_ranks == (2,) and decision.action is StragglerAction.EVICT and "[1]" in note
    decision, _ = spare_link_ranks(dataclasses_replace(evict, evict_ranks=(1,)), Attribution(links=(link,)))
    assert decision.action is StragglerAction.ALERT and decision.evict_ranks == ()
    # a link's sender whose compute is slow too is the existing behaviour: evicted
    assert spare_link_ranks(evict, Attribution(compute_ranks=(1, 2), links=(link,)))[0] == evict


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)
