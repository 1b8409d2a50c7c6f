"""End to end: `tenax chaos slow` makes one rank's compute 50% slower; the leader
flags it within 30 steps (robust z-score of compute time, over a window), writes
plan g+1 with rebalanced sample shares at a step boundary (global batch
unchanged), and the job's throughput recovers as far as a rebalance can.

"Within 30 steps" is measured from the first step the slowed rank ran slow (its
own metrics line says so) to the step the controller decided on: the newest step
of the window that flagged the rank, which the leader records in the job's
``straggler`` event in etcd (controller/health_loop.py ``straggler_event``).

What "recovers" can mean: the slowed rank stays slow (its hardware did not get
better), so no share layout brings back the healthy run's wall-clock throughput:
the best split of 16 samples over one normal and one 1.5x slower rank (10/6)
runs at 80% of it. This test asserts the mechanics (flagged within 30 steps, new
shares at a step boundary, global batch and placement unchanged, the job
finishes) and PRINTS the step times and the waiting share of each phase; the
throughput a rebalance reaches is asserted deterministically in
tests/controller/test_health_loop.py (real decision code, synthetic per-rank speeds).
Getting back to within 10% of the healthy throughput takes replacing the rank:
``straggler_policy: evict``, tests/e2e/test_health_straggler_evict_e2e.py.
Each worker gets one CPU thread (OMP_NUM_THREADS=1) and a model where compute
dominates the step; the test polls rarely.
"""

from __future__ import annotations

import json
import statistics

import pytest

from protos.plan import Plan
from tests.helpers.health_e2e_helpers import (FAST_DETECTION_ARGS, chaos_rpc, cluster_with_env, controller_metrics_address,
                                      job_events, metric_value, metrics_lines, scrape, wait_rarely)
from tests.e2e.test_e2e_cluster import KEYS, etcd_read, job_file, submit, tenax

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

DP = 2
SLOW_RANK = 1
FACTOR = 1.5
STEPS = 120
SLOW_AT = 35
WINDOW = 12
"""Straggler window (steps) of this test's controller: 12 steps of which 80% slow flags a rank."""


def step_seconds(lines: list[dict], first: int, last: int) -> float:
    """Median wall time of one step over steps [first, last]."""
    times = [r["step_time"] for r in lines if "step_time" in r and first <= r["step"] <= last]
    return statistics.median(times) if times else float("nan")  # printed only


def test_slow_rank_is_flagged_shares_rebalanced_and_throughput_recovers(tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    with cluster_with_env(tmp_path, env, agents=DP, slots=1,
                          controller_args=(*FAST_DETECTION_ARGS, f"--straggler-window={WINDOW}")) as info:
        model = {"arch": "gpt", "layers": 4, "d_model": 128, "heads": 4, "vocab_size": 256, "seq_len": 64,
                 "dropout": 0.1}
        path = job_file(tmp_path, steps=STEPS, model=model, parallelism={"dp": DP, "pp": 1, "zero_stage": 1},
                        resources={"workers": DP, "device": "cpu"},
                        elastic={"min_workers": 1, "max_workers": DP, "snapshot_every": "1",
                                 "straggler_policy": "rebalance"})
        job_id = submit(info, path)
        job = wait_rarely(info, job_id, lambda j: j["step"] >= SLOW_AT, 150, interval_s=1.0)
        chaos_rpc(info, action="slow", job_id=job_id, rank=SLOW_RANK, factor=FACTOR)
        done = wait_rarely(info, job_id, lambda j: j["phase"] == "SUCCEEDED", 200)
        assert done["step"] == STEPS

        nodes = {w["rank"]: w["node"] for w in job["workers"]}
        slow_lines = [r for r in metrics_lines(info, nodes[SLOW_RANK], job_id, SLOW_RANK) if "step_time" in r]
        lines = [r for r in metrics_lines(info, nodes[0], job_id, 0) if "step_time" in r]
        first_slow = min(r["step"] for r in slow_lines if r.get("slow_factor", 1.0) > 1.0)
        generations = sorted({r["generation"] for r in lines})
        assert len(generations) >= 2, "no rebalanced plan"
        first_switch = min(r["step"] for r in lines if r["generation"] == generations[1]) - 1
        # the controller's own record of its decision (the straggler event of generation 1 in etcd):
        # the newest step of the window it decided on, and the newest step it had seen from any rank
        event = job_events(info, job_id, "straggler")[0]
        assert event["generation"] == generations[0] and sorted(event["flagged"]) == [str(SLOW_RANK)], event
        flagged = event["flagged"][str(SLOW_RANK)]
        at_flag = max((r["step"] for r in lines if r["time"] <= flagged["time"]), default=0)
        assert event["action"] == "rebalance" and event["action_ranks"] == [SLOW_RANK], event
        # the same event in the job's timeline (`tenax events --json`): it names the rank and its score
        out = tenax("events", job_id, "--json", "--controller", info["controller"], home=info["home"]).stdout
        straggler = next(json.loads(line) for line in out.splitlines() if '"straggler"' in line)
        assert f"rank {SLOW_RANK} (score {flagged['score']})" in straggler["message"], straggler
        assert straggler["step"] == event["action_step"] and straggler["action"] == "rebalance", straggler
        seq = model["seq_len"]
        shares_by_generation = {g: (next(r["rank_tokens"] for r in lines if r["generation"] == g) // seq,
                                    next(r["rank_tokens"] for r in slow_lines if r["generation"] == g) // seq)
                                for g in generations}
        print(f"slowed from step {first_slow}; flagged at step {flagged['step']} (controller had seen step "
              f"{flagged['seen_step']}, rank 0 had done step {at_flag}), rebalance decided at step {event['action_step']}, switched at step "
              f"{first_switch}; shares per generation {shares_by_generation}")
        assert first_slow <= flagged["step"] <= first_slow + 30, "not flagged within 30 steps of the slowdown"
        assert flagged["step"] <= event["action_step"] <= first_switch
        assert all(sum(shares) == 16 for shares in shares_by_generation.values()), "the global batch changed"
        final_generation = generations[-1]
        final = shares_by_generation[final_generation]
        assert final[SLOW_RANK] < final[1 - SLOW_RANK], final
        plan = Plan.from_json(etcd_read(info["etcd"], lambda e: e.get(KEYS.job_plan(job_id))).value)
        assert plan.generation == final_generation and plan.switch_at_step >= 0 and plan.sample_shares == final
        assert [w.node for w in plan.workers] == [nodes[r] for r in range(DP)], "a rebalance moves no worker"
        text = scrape(controller_metrics_address(info))
        assert metric_value(text, "tenax_stragglers_flagged_total", job=job_id) >= 1

        final_switch = min(r["step"] for r in lines if r["generation"] == final_generation) - 1
        phases = {"healthy": (15, first_slow - 1), "slowed": (first_slow + 1, first_switch),
                  "rebalanced": (final_switch + 3, STEPS)}
        waiting = {name: waiting_fraction(lines, slow_lines, *span) for name, span in phases.items()}
        wall = {name: step_seconds(lines, *span) for name, span in phases.items()}
        print("share of a step spent waiting for a peer: " + ", ".join(f"{k} {v:.0%}" for k, v in waiting.items())
              + "; median step time: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in wall.items())
              + f"; throughput vs healthy: slowed {wall['healthy'] / wall['slowed']:.0%}, "
              f"rebalanced {wall['healthy'] / wall['rebalanced']:.0%}")


def waiting_fraction(a: list[dict], b: list[dict], first: int, last: int) -> float:
    """Median over steps [first, last] of the mean over both ranks of (collective time above the
    fastest rank's) / step time: the time a rank spent waiting for its peer."""
    by_step = {r["step"]: r for r in b}
    fractions = []
    for ra in a:
        rb = by_step.get(ra["step"])
        if rb is None or not first <= ra["step"] <= last:
            continue
        fastest = min(ra["collective_time"], rb["collective_time"])
        fractions.append(((ra["collective_time"] - fastest) / ra["step_time"]
                          + (rb["collective_time"] - fastest) / rb["step_time"]) / 2)
    return statistics.median(fractions) if fractions else float("nan")  # printed only
