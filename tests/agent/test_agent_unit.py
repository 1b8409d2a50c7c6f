"""Agent decisions and telemetry without etcd or processes."""

from __future__ import annotations

import asyncio
import json

from agent import metrics
from agent.decisions import Adopt, LocalWorker, Retire, Start, Stop, exit_state, plan_actions, should_publish
from agent.http import AgentHttp
from agent.progress import summarize
from agent.telemetry import (DEGRADED, FAILED, HEALTHY, FakeGpuSource, GpuSample, NoGpuSource, export_gauges,
                             gpu_condition, health_record, node_condition, sample_host, throttle_names)
from protos.plan import Plan, WorkerAssignment
from protos.records import NodeHealthRecord


def make_plan(generation: int, placement: list[tuple[str, int]], job: str = "j1") -> Plan:
    """placement[rank] = (node, slot); dp = world, pp = 1."""
    workers = tuple(WorkerAssignment(rank=r, node=n, slot=s, dp_rank=r, pp_rank=0)
                    for r, (n, s) in enumerate(placement))
    return Plan(job_id=job, generation=generation, workers=workers, dp=len(workers), pp=1, zero_stage=0,
                layer_partition=(0, 4), sample_shares=tuple([4] * len(workers)), store_address="h:1",
                store_prefix=f"{job}/g{generation}", reason="test")


def local(rank: int, slot: int, generation: int, alive: bool = True, job: str = "j1") -> LocalWorker:
    return LocalWorker(job=job, rank=rank, slot=slot, generation=generation, alive=alive)


# ------------------------------------------------------------------ plan -> actions
def test_first_plan_starts_only_this_nodes_workers():
    plan = make_plan(1, [("a", 0), ("b", 0), ("a", 1)])
    actions = plan_actions("a", [], plan)
    assert [type(x) for x in actions] == [Start, Start]
    assert [x.assignment.rank for x in actions] == [0, 2]
    assert all(x.generation == 1 for x in actions)


def test_same_plan_twice_starts_nothing_again():
    plan = make_plan(1, [("a", 0)])
    assert plan_actions("a", [local(0, 0, 1)], plan) == []


def test_worker_that_exited_is_not_restarted_in_the_same_generation():
    plan = make_plan(1, [("a", 0)])
    assert plan_actions("a", [local(0, 0, 1, alive=False)], plan) == []


def test_new_generation_adopts_survivors_and_retires_dropped_workers():
    plan = make_plan(2, [("a", 0), ("b", 0)])
    actions = plan_actions("a", [local(0, 0, 1), local(2, 1, 1)], plan)
    assert Adopt(job="j1", rank=0, slot=0, generation=2) in actions
    retired = [x for x in actions if isinstance(x, Retire)]
    # not stopped at once: it hands its state over and exits by itself
    assert [(x.rank, x.slot, "generation 2" in x.reason) for x in retired] == [(2, 1, True)]
    assert not any(isinstance(x, (Start, Stop)) for x in actions)


def test_survivor_keeps_its_process_when_ranks_are_renumbered():
    """dp2 on (a,0) (b,0) (a,1) (b,1); b is lost; generation 2 renumbers a's workers 0 and 1."""
    plan = make_plan(2, [("a", 1), ("a", 0)])
    actions = plan_actions("a", [local(0, 0, 1), local(2, 1, 1)], plan)
    assert sorted(actions, key=lambda x: x.slot) == [Adopt(job="j1", rank=1, slot=0, generation=2),
                                                     Adopt(job="j1", rank=0, slot=1, generation=2)]


def test_growth_starts_new_workers_only_on_new_slots():
    plan = make_plan(3, [("a", 0), ("a", 1), ("a", 2)])
    actions = plan_actions("a", [local(0, 0, 2), local(1, 1, 2)], plan)
    assert [type(x) for x in actions] == [Adopt, Adopt, Start]
    assert actions[2].assignment.slot == 2 and actions[2].generation == 3


def test_slot_of_a_retired_worker_waits_until_it_is_gone():
    plan = make_plan(4, [("a", 0)])
    leaving = LocalWorker(job="j1", rank=3, slot=0, generation=2, alive=True, retired=True)
    assert plan_actions("a", [leaving], plan) == []
    gone = LocalWorker(job="j1", rank=3, slot=0, generation=2, alive=False, retired=True)
    assert [type(x) for x in plan_actions("a", [gone], plan)] == [Start]


def test_new_generation_restarts_a_rank_that_died_in_an_older_one():
    plan = make_plan(2, [("a", 0)])
    actions = plan_actions("a", [local(0, 0, 1, alive=False)], plan)
    assert [type(x) for x in actions] == [Start]


def test_moved_slot_means_retire_and_start():
    plan = make_plan(2, [("a", 1)])
    actions = plan_actions("a", [local(0, 0, 1)], plan)
    assert [type(x) for x in actions] == [Retire, Start]


def test_stale_plan_is_ignored():
    plan = make_plan(1, [("a", 0), ("a", 1)])
    assert plan_actions("a", [local(0, 0, 2)], plan) == []


def test_cancelled_job_stops_live_workers_and_starts_none():
    plan = make_plan(1, [("a", 0), ("a", 1)])
    actions = plan_actions("a", [local(0, 0, 1), local(1, 1, 1, alive=False)], plan, cancelled=True)
    assert actions == [Stop(job="j1", rank=0, slot=0, reason="cancelled")]


def test_other_jobs_workers_are_untouched():
    plan = make_plan(1, [("a", 0)], job="j2")
    actions = plan_actions("a", [local(0, 0, 1, job="j1")], plan)
    assert [type(x) for x in actions] == [Start]


# ------------------------------------------------------------------ small decisions
def test_progress_throttle():
    assert should_publish(None, 10.0, 1.0)
    assert not should_publish(9.5, 10.0, 1.0)
    assert should_publish(9.0, 10.0, 1.0)


def test_exit_state():
    assert exit_state(0, False) == ("EXITED", "", "ok")
    assert exit_state(3, False) == ("FAILED", "", "error")
    assert exit_state(-9, False) == ("FAILED", "SIGKILL", "signal")
    assert exit_state(-15, True) == ("KILLED", "SIGTERM", "killed")


def test_summarize_worker_metrics_line():
    rec = summarize({"step": 7, "loss": 2.5, "tokens": 1000, "step_time": 0.5}, generation=3)
    assert rec["step"] == 7 and rec["loss"] == 2.5 and rec["generation"] == 3
    assert rec["tokens_per_s"] == 2000.0 and rec["step_time_s"] == 0.5
    assert summarize({"loss": 1.0}, generation=1) is None
    assert summarize({"step": 1, "loss": None, "tokens_per_s": 5.0}, generation=1)["loss"] is None


def test_an_evaluation_travels_from_the_step_line_to_the_api_like_the_loss():
    from controller.convert import step_to_proto
    from protos.records import StepRecord

    line = {"step": 10, "loss": 2.5, "step_time": 0.5, "eval_loss": 3.0, "eval_perplexity": 20.09}
    rec = summarize(line, generation=1)
    step = StepRecord.from_json(StepRecord(step=rec["step"], loss=rec["loss"], eval_loss=rec["eval_loss"],
                                           eval_perplexity=rec["eval_perplexity"]).to_json())
    proto = step_to_proto(step)
    assert proto.HasField("eval_loss") and (proto.eval_loss, proto.eval_perplexity) == (3.0, 20.09)
    between = step_to_proto(StepRecord.from_json(StepRecord(step=11, loss=2.4).to_json()))
    assert not between.HasField("eval_loss")  # no evaluation at this step: unset, not 0


# ------------------------------------------------------------------ condition (fake NVML)
def test_healthy_gpus_and_no_gpus_are_healthy():
    assert node_condition([]) == (HEALTHY, "")
    assert node_condition([GpuSample(index=0, temperature_c=60), GpuSample(index=1)]) == (HEALTHY, "")


def test_fatal_xid_fails_the_node():
    cond, reason = node_condition([GpuSample(index=0), GpuSample(index=1, xid_events=[79])])
    assert cond == FAILED and "gpu 1" in reason and "79" in reason


def test_ecc_double_bit_errors_fail_the_gpu():
    assert gpu_condition(GpuSample(index=0, ecc_volatile_dbe=2))[0] == FAILED


def test_non_fatal_xid_and_retired_pages_degrade():
    assert gpu_condition(GpuSample(index=0, xid_events=[13]))[0] == DEGRADED
    assert gpu_condition(GpuSample(index=0, retired_pages=1))[0] == DEGRADED


def test_throttling_degrades_and_worst_gpu_wins():
    throttled = GpuSample(index=0, throttle_reasons=throttle_names(0x20 | 0x4))
    assert throttled.throttle_reasons == ["sw_power_cap", "sw_thermal"]
    assert node_condition([throttled])[0] == DEGRADED
    assert node_condition([throttled, GpuSample(index=1, ecc_volatile_dbe=1)])[0] == FAILED


def test_fake_source_feeds_health_record_and_gauges():
    source = FakeGpuSource([GpuSample(index=0, utilization=50.0, memory_used=1 << 30, memory_total=8 << 30,
                                      temperature_c=70.0, power_w=250.0, sm_clock_mhz=1800.0,
                                      throttle_reasons=["hw_thermal"])])
    gpus = source.sample()
    host = sample_host()
    record = health_record(host, gpus, now=123.0)
    parsed = NodeHealthRecord.from_json(json.dumps(record))
    assert parsed.time == 123.0 and parsed.gpus[0]["utilization"] == 50.0
    assert record["condition"] == DEGRADED
    export_gauges(host, gpus)
    assert metrics.GPU_TEMPERATURE.labels("0")._value.get() == 70.0
    assert metrics.GPU_THROTTLED.labels("0")._value.get() == 1
    assert metrics.NODE_CONDITION.labels(DEGRADED)._value.get() == 1
    assert host.memory_total > 0


def test_no_gpu_source_gives_no_gpu_telemetry():
    source = NoGpuSource()
    assert source.device_count() == 0 and source.sample() == []


# ------------------------------------------------------------------ http routes
def test_http_logs_route_serves_from_offset(tmp_path):
    log_file = tmp_path / "rank-0.log"
    log_file.write_bytes(b"hello world")
    http = AgentHttp(log_path=lambda job, rank: tmp_path / f"rank-{rank}.log", healthy=lambda: True)
    status, headers, body = http.route("/logs/job-1/0?offset=6")
    assert (status, body, headers["X-Next-Offset"]) == (200, b"world", "11")
    assert http.route("/logs/job-1/1")[0] == 404
    assert http.route("/logs/../etc/0")[0] == 400
    assert http.route("/healthz")[0] == 200
    assert b"tenax_agent_slots" in http.route("/metrics")[2]


def test_http_server_answers_over_tcp(tmp_path):
    async def scenario():
        http = AgentHttp(log_path=lambda job, rank: tmp_path / "none", healthy=lambda: False)
        port = await http.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return data
        finally:
            await http.stop()

    data = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert data.startswith(b"HTTP/1.0 503")


# ------------------------------------------------------------------ settings
def test_agent_settings_are_validated_once_with_clear_errors(tmp_path):
    import pytest

    from agent.main import AgentSettings

    def settings(**kw):
        base = dict(etcd="http://127.0.0.1:2379", node_id="n1", work_dir=tmp_path)
        base.update(kw)
        return AgentSettings(**base).validate()

    assert settings().advertise_host == "127.0.0.1"
    for bad, field in ((dict(node_id="a/b"), "--node-id"), (dict(lease_ttl_s=1), "--lease-ttl"),
                       (dict(slots=-1), "--slots"), (dict(etcd="nonsense"), "etcd endpoint"),
                       (dict(etcd="https://h:1"), "--etcd-ca"), (dict(kill_grace_s=0), "kill_grace_s")):
        with pytest.raises(ValueError, match=field):
            settings(**bad)


def test_agent_settings_come_from_flags_only(tmp_path, monkeypatch):
    from pathlib import Path

    from cli.agent import settings_from_args
    from cli.main import build_parser

    for name in ("TENAX_ETCD", "TENAX_ETCD_PREFIX", "TENAX_ETCD_CA", "TENAX_FAKE_GPU_DIR"):
        monkeypatch.setenv(name, "https://ignored:1" if name == "TENAX_ETCD" else "/ignored")
    monkeypatch.setenv("TENAX_HOME", str(tmp_path))  # a user convenience of the CLI: the default work dir
    parse = build_parser().parse_args
    defaults = settings_from_args(parse(["agent", "--node-id", "n1"]))
    assert (defaults.etcd, defaults.etcd_prefix, defaults.etcd_ca, defaults.fake_gpu_dir) == \
        ("http://127.0.0.1:2379", "/tenax", "", None)
    assert defaults.work_dir == tmp_path / "agents" / "n1"
    given = settings_from_args(parse(["agent", "--node-id", "n1", "--etcd", "http://e:2379", "--etcd-prefix", "/x",
                                      "--fake-gpu-dir", str(tmp_path / "gpus")]))
    assert (given.etcd, given.etcd_prefix, given.fake_gpu_dir) == ("http://e:2379", "/x", Path(tmp_path / "gpus"))


# ------------------------------------------------------------------ two-phase growth
def _growth(state="PREPARING", growth_id="g2-x", base=1):
    from protos.records import GrowthRecord

    tentative = make_plan(base + 1, [("a", 0), ("b", 0), ("b", 1)])
    return GrowthRecord(id=growth_id, base_generation=base, plan=tentative.to_dict(), state=state,
                        joiners=[{"node": "b", "slot": 0, "rank": 1}, {"node": "b", "slot": 1, "rank": 2}])


def preparing(rank: int, slot: int, generation: int, growth_id: str, alive: bool = True) -> LocalWorker:
    return LocalWorker(job="j1", rank=rank, slot=slot, generation=generation, alive=alive, preparing=growth_id)


def test_a_growth_being_prepared_starts_this_nodes_joiners_with_the_tentative_plan():
    from agent.decisions import growth_actions

    actions = growth_actions("b", [], _growth(), job="j1", plan_generation=1)
    assert [(type(x), x.assignment.slot, x.assignment.rank, x.generation, x.growth_id) for x in actions] == [
        (Start, 0, 1, 2, "g2-x"), (Start, 1, 2, 2, "g2-x")]
    assert growth_actions("a", [local(0, 0, 1)], _growth(), job="j1", plan_generation=1) == []
    # already started for this growth (alive, or exited: never twice), or a stale growth: nothing
    assert growth_actions("b", [preparing(1, 0, 2, "g2-x"), preparing(2, 1, 2, "g2-x", alive=False)], _growth(),
                          job="j1", plan_generation=1) == []
    assert growth_actions("b", [], _growth(), job="j1", plan_generation=2) == []


def test_workers_of_an_abandoned_or_replaced_growth_are_stopped():
    from agent.decisions import growth_actions

    mine = [preparing(1, 0, 2, "g2-x"), preparing(2, 1, 2, "g2-x", alive=False)]
    actions = growth_actions("b", mine, _growth(state="ABANDONED"), job="j1", plan_generation=1)
    assert actions == [Stop(job="j1", rank=1, slot=0, reason="growth abandoned")]
    assert growth_actions("b", mine, None, job="j1", plan_generation=1) == [
        Stop(job="j1", rank=1, slot=0, reason="growth superseded")]
    # a new attempt: the old attempt's worker is stopped, then a new one starts on its slot
    actions = growth_actions("b", mine, _growth(growth_id="g2-y"), job="j1", plan_generation=1)
    assert [type(x) for x in actions] == [Stop, Start, Start]
    assert growth_actions("b", mine, _growth(state="COMMITTED"), job="j1", plan_generation=1) == []


def test_a_prepared_worker_is_left_alone_by_older_plans_and_adopted_by_the_committed_one():
    g1 = make_plan(1, [("a", 0)])
    joiner = preparing(1, 0, 2, "g2-x")
    survivor = local(0, 0, 1)
    # plan 1 (re-applied) neither retires the joiner nor counts as stale because of it
    assert plan_actions("b", [joiner], make_plan(1, [("a", 0)])) == []
    assert plan_actions("a", [survivor, LocalWorker(job="j1", rank=1, slot=1, generation=2, alive=True,
                                                    preparing="g2-x")], g1) == []
    # plan 2 = the committed growth: adopted where it is, even with the same rank and generation
    committed = make_plan(2, [("a", 0), ("b", 0)])
    assert plan_actions("b", [joiner], committed) == [Adopt(job="j1", rank=1, slot=0, generation=2)]
    # plan 2 of a failure that does not name it: retired (it exits by itself)
    other = make_plan(2, [("a", 0)])
    assert [type(x) for x in plan_actions("b", [joiner], other)] == [Retire]
    # a dead prepared worker never blocks the start of a plan that names its slot
    dead = preparing(1, 0, 2, "g2-x", alive=False)
    assert [type(x) for x in plan_actions("b", [dead], committed)] == [Start]
