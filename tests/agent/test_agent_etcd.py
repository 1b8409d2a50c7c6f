"""Agent against a real etcd: registration, leases, worker supervision, exit reports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from agent.registration import Registration
from agent.supervisor import Supervisor
from common.embedded_etcd import start_etcd
from common.etcd import Etcd
from protos.keys import Keys
from protos.records import NodeRecord, WorkerStatusRecord
from tests.conftest import REPO, run_async
from tests.agent.test_agent_unit import make_plan

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


async def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def node_info(node: str) -> dict:
    return NodeRecord(id=node, slots=2, address="127.0.0.1:1").to_dict()


# ------------------------------------------------------------------ registration
def test_registration_survives_lease_revocation_and_etcd_restart(etcd_server):
    keys = Keys()

    async def scenario():
        global_server = etcd_server
        async with Etcd(global_server.url, timeout_s=2.0) as etcd:
            reg = Registration(etcd=etcd, keys=keys, node_id="n1", ttl_s=2, node_info=lambda: node_info("n1"))
            reg.start()
            try:
                await asyncio.wait_for(reg.registered.wait(), 10)
                kv = await etcd.get(keys.node("n1"))
                assert NodeRecord.from_json(kv.value).slots == 2 and kv.lease == reg.lease_id

                # someone revokes our lease: NodeInfo vanishes, the agent registers again
                first_lease = reg.lease_id
                await etcd.revoke_lease(first_lease)
                await wait_for(lambda: _registered_with_new_lease(etcd, keys, reg, first_lease), 5,
                               "re-registration after revoke")

                # etcd goes away for longer than the TTL, then comes back with its data
                second_lease = reg.lease_id
                global_server.stop()
                await asyncio.sleep(3.0)
                restarted = start_etcd(global_server.data_dir, client_port=global_server.client_port,
                                       peer_port=global_server.peer_port, log_path=global_server.log_path)
                try:
                    t0 = time.monotonic()
                    await wait_for(lambda: _registered_with_new_lease(etcd, keys, reg, second_lease), 15,
                                   "re-registration after etcd restart")
                    took = time.monotonic() - t0
                    assert reg.registrations == 3
                    return took
                finally:
                    restarted.kill()
            finally:
                await reg.stop(revoke=False)

    took = run_async(scenario(), 60)
    assert took < 10


async def _registered_with_new_lease(etcd, keys, reg, old_lease) -> bool:
    try:
        kv = await etcd.get(keys.node("n1"))
    except Exception:
        return False
    return kv is not None and reg.lease_id not in (None, old_lease) and kv.lease == reg.lease_id


# ------------------------------------------------------------------ supervision
def test_worker_exit_is_reported_at_once_the_agent_part_within_100ms(etcd_url, tmp_path):
    keys = Keys()

    async def scenario():
        async with Etcd(etcd_url) as etcd:
            sup = Supervisor(etcd=etcd, keys=keys, node_id="n1", work_dir=tmp_path,
                             worker_command=SLEEPER, kill_grace_s=2.0)
            plan = make_plan(1, [("n1", 0), ("n1", 1)])
            actions = await sup.apply_plan(plan, spec={"resources": {"device": "cpu"}})
            assert len(actions) == 2
            try:
                async def started():
                    kvs = await etcd.get_prefix(keys.job_workers("j1"))
                    recs = [WorkerStatusRecord.from_json(kv.value) for kv in kvs]
                    return recs if len(recs) == 2 and all(r.state == "STARTING" for r in recs) else None

                recs = await wait_for(started, 10, "two STARTING workers")
                victim = next(r for r in recs if r.rank == 1)
                latencies = []
                seen = asyncio.get_running_loop().create_future()

                async def watch():
                    async for ev in etcd.watch_prefix(keys.job_worker("j1", 1)):
                        rec = WorkerStatusRecord.from_json(ev.value)
                        if rec.state == "FAILED" and not seen.done():
                            seen.set_result((time.monotonic(), rec))

                watcher = asyncio.create_task(watch())
                await asyncio.sleep(0.3)  # the watch is established
                t0 = time.monotonic()
                os.kill(victim.pid, signal.SIGKILL)
                t_seen, rec = await asyncio.wait_for(seen, 5)
                watcher.cancel()
                latencies.append(t_seen - t0)
                assert rec.signal == "SIGKILL" and rec.exit_code == 128 + 9 and rec.pid == victim.pid
                # rank 0 keeps running: one death is not the job's end
                assert sup.workers[("j1", 0)].alive
                # the same plan again does not restart the dead rank
                assert await sup.apply_plan(plan, spec={}) == []
                report_s = await wait_for(lambda: _async_true(sup.last_exit_report_s), 2, "the report latency")
                return latencies[0], report_s
            finally:
                await sup.stop_all("test over")

    end_to_end_s, report_s = run_async(scenario(), 60)
    print(f"exit -> visible in etcd watch: {end_to_end_s * 1000:.1f} ms; exit seen -> put done: "
          f"{report_s * 1000:.1f} ms")
    # the agent's own part (exit seen -> status written) is the claim; the end-to-end figure also
    # holds this test's event loop and etcd's watch delivery, which a loaded 2-core host can delay
    # (0.124 s once in a full-suite run), so it only has to show "at once", not a number
    assert report_s < 0.1
    assert end_to_end_s < 0.5


def test_cancel_kills_workers_and_reports_killed(etcd_url, tmp_path):
    keys = Keys()
    # it says when its SIGTERM handler is in place (a loaded host can take over a second to get there)
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "open('handler-ready', 'w').close(); time.sleep(120)"]

    async def scenario():
        async with Etcd(etcd_url) as etcd:
            sup = Supervisor(etcd=etcd, keys=keys, node_id="n1", work_dir=tmp_path,
                             worker_command=stubborn, kill_grace_s=0.5)
            await sup.apply_plan(make_plan(1, [("n1", 0)]), spec={})
            pid = sup.workers[("j1", 0)].pid
            ready = tmp_path / "jobs" / "j1" / "run" / "handler-ready"  # its cwd is the job's run dir
            deadline = time.monotonic() + 20
            while not ready.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            await sup.cancel_job("j1")
            took = time.monotonic() - t0
            rec = WorkerStatusRecord.from_json((await etcd.get(keys.job_worker("j1", 0))).value)
            return pid, took, rec

    pid, took, rec = run_async(scenario(), 30)
    assert rec.state == "KILLED" and rec.signal == "SIGKILL"
    assert 0.5 <= took < 3.0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# ------------------------------------------------------------------ the agent process
def _start_agent(etcd_url: str, tmp_path: Path, node: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cli.main", "agent", "--etcd", etcd_url, "--node-id", node,
           "--slots", "2", "--lease-ttl", "2", "--work-dir", str(tmp_path / node), "--kill-grace", "1",
           "--worker-command", " ".join(SLEEPER[:2]) + " 'import time; time.sleep(120)'"]
    log = open(tmp_path / f"{node}.log", "wb")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_workers_never_outlive_their_agent(etcd_url, tmp_path, how):
    keys = Keys()
    agent = _start_agent(etcd_url, tmp_path, "n1")
    pids: list[int] = []
    try:
        async def scenario():
            async with Etcd(etcd_url) as etcd:
                async def registered():
                    return await etcd.get(keys.node("n1"))

                info = NodeRecord.from_json((await wait_for(registered, 30, "agent registration")).value)
                assert info.slots == 2 and info.store_address and info.address
                # malformed values are logged and skipped; the agent keeps serving
                await etcd.put(keys.job_plan("garbage"), "{not json")
                await etcd.put(keys.job_plan("wrong"), json.dumps({"job_id": "wrong", "generation": 1}))
                await etcd.put(keys.job_plan("j1"), make_plan(1, [("n1", 0), ("n1", 1)]).to_json())

                async def both_started():
                    kvs = await etcd.get_prefix(keys.job_workers("j1"))
                    recs = [WorkerStatusRecord.from_json(kv.value) for kv in kvs]
                    return recs if len(recs) == 2 else None

                recs = await wait_for(both_started, 15, "workers started")
                pids.extend(r.pid for r in recs)
                assert all(not _gone(p) for p in pids)
                t0 = time.monotonic()
                agent.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
                await wait_for(lambda: _async_true(all(_gone(p) for p in pids)), 10, "workers to die")
                workers_dead_s = time.monotonic() - t0

                async def node_gone():
                    return await etcd.get(keys.node("n1")) is None

                await wait_for(node_gone, 10, "node key to vanish")
                node_gone_s = time.monotonic() - t0
                final = [WorkerStatusRecord.from_json(kv.value)
                         for kv in await etcd.get_prefix(keys.job_workers("j1"))]
                return workers_dead_s, node_gone_s, final

        workers_dead_s, node_gone_s, final = run_async(scenario(), 90)
        assert workers_dead_s < 1.5
        if how == "sigkill":
            assert node_gone_s < 2 + 1  # lease TTL + 1 s
        else:  # a clean stop kills with SIGTERM, reports KILLED, revokes the lease at once
            assert node_gone_s < 1.0
            assert sorted(r.state for r in final) == ["KILLED", "KILLED"]
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(10)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def _async_true(value):
    return value


# ------------------------------------------------------------------ the agent in-process, fake GPUs
def test_agent_publishes_telemetry_and_condition_from_fake_gpus(etcd_url, tmp_path):
    from agent.main import Agent, AgentSettings
    from agent.telemetry import FakeGpuSource, GpuSample

    keys = Keys()
    gpus = FakeGpuSource([GpuSample(index=0, utilization=10.0), GpuSample(index=1, utilization=20.0)])
    settings = AgentSettings(etcd=etcd_url, node_id="gpu-node", work_dir=tmp_path, lease_ttl_s=2,
                             telemetry_interval_s=0.2).validate()

    async def scenario():
        agent = Agent(settings, gpu_source=gpus)
        runner = asyncio.create_task(agent.run())
        try:
            async with Etcd(etcd_url) as etcd:
                async def info():
                    kv = await etcd.get(keys.node("gpu-node"))
                    return NodeRecord.from_json(kv.value) if kv else None

                first = await wait_for(info, 30, "registration")
                assert first.slots == 2 and first.condition == "HEALTHY"  # slots = GPUs seen

                async def health():
                    kv = await etcd.get(keys.node_health("gpu-node"))
                    return json.loads(kv.value) if kv else None

                record = await wait_for(health, 5, "health record")
                assert [g["utilization"] for g in record["gpus"]] == [10.0, 20.0]
                assert kv_lease(await etcd.get(keys.node_health("gpu-node"))) == agent.registration.lease_id

                gpus.gpus[1].xid_events = [79]  # fell off the bus

                async def failed():
                    rec = await info()
                    return rec if rec and rec.condition == "FAILED" else None

                rec = await wait_for(failed, 5, "condition FAILED")
                assert "XID 79" in rec.condition_reason

                # /healthz and /metrics on the advertised address
                host, port = first.address.split(":")
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
                body = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                assert b'tenax_gpu_healthy{gpu="1"} 0.0' in body
        finally:
            agent.stopping.set()
            await asyncio.wait_for(runner, 20)

    run_async(scenario(), 60)


def kv_lease(kv) -> int:
    return kv.lease if kv else 0


def test_progress_relay_throttles_and_batches_steps(etcd_url, tmp_path):
    from agent.progress import ProgressRelay
    from protos.records import MetricsBatch, ProgressRecord

    keys = Keys()
    path = tmp_path / "rank-1.metrics.jsonl"
    path.write_text("")

    async def scenario():
        async with Etcd(etcd_url) as etcd:
            relay = ProgressRelay(etcd=etcd, keys=keys, job="j1", rank=1, path=path, generation=2,
                                  min_interval_s=1.0, relay_steps=True)
            relay.start()
            t0 = time.monotonic()
            with open(path, "a") as f:
                for step in range(1, 101):  # 100 steps in ~2 s, then a garbage line and a partial line
                    f.write(json.dumps({"step": step, "loss": 5.0 - step / 100, "tokens": 512,
                                        "step_time": 0.02}) + "\n")
                    f.flush()
                    await asyncio.sleep(0.02)
                f.write("not json\n")
                f.write('{"step": 101, "loss": 3.9, "tok')
            elapsed = time.monotonic() - t0
            writes_while_running = relay.writes
            with open(path, "a") as f:
                f.write('ens": 512, "step_time": 0.02}\n')
            await relay.stop()
            progress = ProgressRecord.from_json((await etcd.get(keys.job_progress_rank("j1", 1))).value)
            steps = []
            for kv in await etcd.get_prefix(keys.job_metrics("j1")):
                steps += [s.step for s in MetricsBatch.from_json(kv.value).steps]
            return elapsed, writes_while_running, progress, steps

    elapsed, writes, progress, steps = run_async(scenario(), 30)
    # <= 1 progress write + 1 batch write per second (plus the first), never one per step
    assert writes <= 2 * (int(elapsed) + 2), (writes, elapsed)
    assert progress.step == 101 and progress.generation == 2 and progress.tokens_per_s == 512 / 0.02
    assert steps == list(range(1, 102))


def test_a_survivor_re_sends_the_steps_a_lost_metrics_rank_never_relayed(etcd_url, tmp_path):
    from agent.progress import ProgressRelay
    from controller.state import step_metrics

    keys = Keys()
    lost_path, survivor_path = tmp_path / "rank-1.metrics.jsonl", tmp_path / "rank-0.metrics.jsonl"

    def line(step: int, generation: int, rank: int) -> str:
        return json.dumps({"step": step, "loss": 5.0 - step / 100, "tokens": 512, "step_time": 0.02,
                           "generation": generation, "rank": rank, "dp_rank": 0, "pp_rank": rank,
                           "layout": "dp1pp2", "time": 1000.0 + step}) + "\n"

    async def scenario():
        async with Etcd(etcd_url) as etcd:
            # generation 1, dp1·pp2: rank 1 (last stage) is the metrics rank; its agent relayed
            # steps 1-6 and was lost with steps 7-10 unrelayed; rank 0 trained 1-10 as well
            lost_path.write_text("".join(line(s, 1, 1) for s in range(1, 7)))
            lost = ProgressRelay(etcd=etcd, keys=keys, job="j1", rank=1, path=lost_path, relay_steps=True)
            await lost.stop()
            survivor_path.write_text("".join(line(s, 1, 0) for s in range(1, 11)))
            survivor = ProgressRelay(etcd=etcd, keys=keys, job="j1", rank=0, path=survivor_path)
            survivor.start()
            # generation 2 makes the survivor the metrics rank; it re-runs step 10 and trains 11
            survivor.set_role(2, 0, True)
            with open(survivor_path, "a") as f:
                f.write(line(10, 2, 0) + line(11, 2, 0))
            sent = survivor.backfill(2)
            again = survivor.backfill(2)
            await survivor.stop()
            records = await step_metrics(etcd, keys, "j1", 0)
            batch_keys = [kv.key for kv in await etcd.get_prefix(keys.job_metrics("j1"))]
            return sent, again, records, batch_keys

    sent, again, records, batch_keys = run_async(scenario(), 30)
    # its records of generation 1 (not its re-run of step 10): once per generation
    assert (sent, again) == (9, 0)
    assert [(r.step, r.generation) for r in records] == [(s, 1) for s in range(1, 10)] + [(10, 2), (11, 2)]
    # the lost rank's own batch from step 1 is still there (the re-sent one has a key of its own)
    assert keys.job_metrics_batch("j1", 1) in batch_keys and keys.job_metrics_backfill("j1", 1, 2) in batch_keys


def test_step_lines_replayed_from_a_disk_checkpoint_go_to_the_metrics_only(etcd_url, tmp_path):
    from agent.progress import ProgressRelay
    from controller.state import step_metrics

    keys = Keys()
    path = tmp_path / "rank-0-g2.metrics.jsonl"
    replayed = [{"step": s, "loss": 5.0 - s / 100, "generation": 1, "rank": 1, "time": 1000.0 + s,
                 "step_time": 0.5, "replayed": True} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in replayed)
                    + json.dumps({"step": 4, "loss": 4.96, "generation": 2, "time": 2000.0, "step_time": 0.5}) + "\n")

    async def scenario():
        async with Etcd(etcd_url) as etcd:
            relay = ProgressRelay(etcd=etcd, keys=keys, job="j1", rank=0, path=path, generation=2, relay_steps=True)
            await relay.stop()
            return relay, await step_metrics(etcd, keys, "j1", 0), \
                [kv.key for kv in await etcd.get_prefix(keys.job_metrics("j1"))]

    relay, records, batch_keys = run_async(scenario(), 30)
    assert [(r.step, r.generation) for r in records] == [(1, 1), (2, 1), (3, 1), (4, 2)]
    assert sorted(batch_keys) == sorted([keys.job_metrics_batch("j1", 4), keys.job_metrics_backfill("j1", 1, 2)])
    # history, not this worker's progress: its first step at generation 2 is step 4
    assert relay.first_step == {"generation": 2, "step": 4, "time": 2000.0} and relay.latest["step"] == 4


def test_restarted_agent_reports_orphans_and_does_not_rerun_finished_ranks(etcd_url, tmp_path):
    """A previous life of this node left rank 0 RUNNING (its worker died with it): the new
    agent reports it FAILED and does not start it again for the same generation; rank 1,
    never started, is started."""
    from agent.main import Agent, AgentSettings

    keys = Keys()
    settings = AgentSettings(etcd=etcd_url, node_id="n1", work_dir=tmp_path, lease_ttl_s=2, slots=2,
                             worker_command=SLEEPER, kill_grace_s=1.0).validate()

    async def scenario():
        async with Etcd(etcd_url) as etcd:
            await etcd.put(keys.job_plan("j1"), make_plan(1, [("n1", 0), ("n1", 1)]).to_json())
            stale = WorkerStatusRecord(rank=0, node="n1", state="RUNNING", slot=0, pid=999999, generation=1)
            await etcd.put(keys.job_worker("j1", 0), stale.to_json())
            agent = Agent(settings)
            runner = asyncio.create_task(agent.run())
            try:
                async def settled():
                    recs = {int(kv.key.rsplit("/", 1)[1]): WorkerStatusRecord.from_json(kv.value)
                            for kv in await etcd.get_prefix(keys.job_workers("j1"))}
                    return recs if len(recs) == 2 and recs[0].state == "FAILED" else None

                recs = await wait_for(settled, 30, "orphan reported and rank 1 started")
                assert recs[0].pid == 999999 and recs[0].signal == "SIGKILL"
                assert recs[1].state == "STARTING" and recs[1].pid > 0
                assert ("j1", 0) not in agent.supervisor.workers
            finally:
                agent.stopping.set()
                await asyncio.wait_for(runner, 20)

    run_async(scenario(), 60)


def test_worker_that_cannot_start_is_reported_failed(etcd_url, tmp_path):
    keys = Keys()

    async def scenario():
        async with Etcd(etcd_url) as etcd:
            sup = Supervisor(etcd=etcd, keys=keys, node_id="n1", work_dir=tmp_path,
                             worker_command=["/nonexistent/python"])
            # the shim execs the command: it fails in the child, which exits non-zero
            await sup.apply_plan(make_plan(1, [("n1", 0)]), spec={})

            async def failed():
                kv = await etcd.get(keys.job_worker("j1", 0))
                rec = WorkerStatusRecord.from_json(kv.value) if kv else None
                return rec if rec and rec.state == "FAILED" else None

            rec = await wait_for(failed, 10, "FAILED report")
            await sup.stop_all("test over")
            return rec, sup.log_path("j1", 0).read_text()

    rec, log_text = run_async(scenario(), 30)
    assert rec.exit_code == 127 and "cannot run worker command '/nonexistent/python'" in log_text


def test_new_generation_moves_a_rank_to_another_slot(etcd_url, tmp_path):
    """Generation 2 moves rank 0 from slot 0 to slot 1: a new process starts on slot 1; the old
    one is retired (it would exit by itself; this one ignores plans, so it is stopped after the
    retire grace period); generation 3 keeps the new one (adopted, same pid)."""
    keys = Keys()

    async def scenario():
        async with Etcd(etcd_url) as etcd:
            sup = Supervisor(etcd=etcd, keys=keys, node_id="n1", work_dir=tmp_path,
                             worker_command=SLEEPER, kill_grace_s=1.0, retire_grace_s=0.5)
            try:
                await sup.apply_plan(make_plan(1, [("n1", 0)]), spec={})
                old = sup.workers[("j1", 0)]
                await sup.apply_plan(make_plan(2, [("n1", 1)]), spec={})
                new = sup.workers[("j1", 0)]
                assert new.alive and new.slot == 1 and new.pid != old.pid
                assert old.retired and sup.retired[("j1", 0)] is old
                await asyncio.wait_for(old.exit_reported.wait(), 10)
                assert not old.alive and old.state == "KILLED"
                await sup.apply_plan(make_plan(3, [("n1", 1)]), spec={})
                assert sup.workers[("j1", 0)] is new and new.generation == 3 and new.alive
                assert sum(1 for w in sup.local_views() if w.alive) == 1
            finally:
                await sup.stop_all("test over")

    run_async(scenario(), 30)


def test_survivors_swap_ranks_across_generations_without_a_restart(etcd_url, tmp_path):
    """Generation 2 swaps the ranks of the two workers (slot 0 -> rank 1, slot 1 -> rank 0):
    both keep their process; their status is written under their new rank."""
    keys = Keys()

    async def scenario():
        async with Etcd(etcd_url) as etcd:
            sup = Supervisor(etcd=etcd, keys=keys, node_id="n1", work_dir=tmp_path,
                             worker_command=SLEEPER, kill_grace_s=1.0)
            try:
                await sup.apply_plan(make_plan(1, [("n1", 0), ("n1", 1)]), spec={})
                pids = {w.slot: w.pid for w in sup.workers.values()}
                await sup.apply_plan(make_plan(2, [("n1", 1), ("n1", 0)]), spec={})
                assert {(rank, w.slot, w.pid, w.generation) for (_, rank), w in sup.workers.items()} == {
                    (0, 1, pids[1], 2), (1, 0, pids[0], 2)}

                async def reported():
                    recs = {int(kv.key.rsplit("/", 1)[1]): WorkerStatusRecord.from_json(kv.value)
                            for kv in await etcd.get_prefix(keys.job_workers("j1"))}
                    return recs if len(recs) == 2 and all(r.generation == 2 for r in recs.values()) else None

                deadline = time.monotonic() + 10
                recs = None
                while recs is None and time.monotonic() < deadline:
                    recs = await reported()
                    await asyncio.sleep(0.05)
                assert recs is not None, "statuses of generation 2 not written"
                assert {r: (rec.slot, rec.pid) for r, rec in recs.items()} == {0: (1, pids[1]), 1: (0, pids[0])}
            finally:
                await sup.stop_all("test over")

    run_async(scenario(), 30)


def test_growth_workers_run_outside_the_plan_until_it_switches_or_are_stopped(etcd_url, tmp_path):
    """Plan 1 runs rank 0 on slot 0 (rank key 0). A growth prepares a worker for plan 2 whose rank
    0 is that new worker on slot 1: while preparing it writes NO rank key (rank 0's key is still
    the plan-1 worker's). The committed plan 2 adopts it (same pid); an abandoned growth's worker
    is stopped and its exit is reported as a joiner record."""
    from protos.records import GrowthRecord, JoinerRecord

    keys = Keys()

    def growth(growth_id: str, state: str = "PREPARING") -> GrowthRecord:
        tentative = make_plan(2, [("n1", 1), ("n1", 0)])
        return GrowthRecord(id=growth_id, base_generation=1, plan=tentative.to_dict(), state=state,
                            joiners=[{"node": "n1", "slot": 1, "rank": 0}])

    async def rank0(etcd) -> WorkerStatusRecord:
        return WorkerStatusRecord.from_json((await etcd.get(keys.job_worker("j1", 0))).value)

    async def scenario():
        async with Etcd(etcd_url) as etcd:
            sup = Supervisor(etcd=etcd, keys=keys, node_id="n1", work_dir=tmp_path,
                             worker_command=SLEEPER, kill_grace_s=1.0)
            try:
                await sup.apply_plan(make_plan(1, [("n1", 0)]), spec={})
                first = sup.workers[("j1", 0)]
                await wait_for(lambda: _status_pid_is(etcd, keys, first.pid), 10, "rank 0's status")
                # attempt 1: prepared, then abandoned -> stopped, its exit is a joiner record
                await sup.apply_growth("j1", growth("g2-a"), plan_generation=1, spec={})
                doomed = sup.preparing[("j1", 1)]
                assert doomed.alive and doomed.preparing == "g2-a" and doomed.generation == 2
                await sup.apply_plan(make_plan(1, [("n1", 0)]), spec={})  # plan 1 again: left alone
                assert doomed.alive and not doomed.retired
                await sup.apply_growth("j1", growth("g2-a", "ABANDONED"), plan_generation=1, spec={})
                assert not doomed.alive and not psutil.pid_exists(doomed.pid)  # no orphan left
                kv = await wait_for(lambda: etcd.get(keys.job_joiner("j1", "n1", 1)), 10, "the joiner's exit")
                gone = JoinerRecord.from_json(kv.value)
                assert (gone.growth_id, gone.state, gone.pid) == ("g2-a", "KILLED", doomed.pid)
                # attempt 2: prepared, then committed -> adopted in place under its new rank
                await sup.apply_growth("j1", growth("g2-b"), plan_generation=1, spec={})
                joiner = sup.preparing[("j1", 1)]
                assert joiner is not doomed and joiner.alive
                await asyncio.sleep(0.3)
                assert (await rank0(etcd)).pid == first.pid  # never overwritten while preparing
                await sup.apply_plan(make_plan(2, [("n1", 1), ("n1", 0)]), spec={})
                await sup.apply_growth("j1", growth("g2-b", "COMMITTED"), plan_generation=2, spec={})
                assert sup.workers[("j1", 0)] is joiner and joiner.alive and joiner.preparing == ""
                assert sup.workers[("j1", 1)] is first and not sup.preparing
                await wait_for(lambda: _status_pid_is(etcd, keys, joiner.pid), 10, "the joiner's status at rank 0")
            finally:
                await sup.stop_all("test over")

    run_async(scenario(), 40)


async def _status_pid_is(etcd, keys, pid: int) -> bool:
    kv = await etcd.get(keys.job_worker("j1", 0))
    return kv is not None and WorkerStatusRecord.from_json(kv.value).pid == pid
