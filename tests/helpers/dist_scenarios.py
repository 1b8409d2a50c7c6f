"""Worker side of the multi-process tests (abort, transfer, buddy replication).

Run as ``python tests/helpers/dist_scenarios.py SCENARIO RANK WORLD STORE_PORT OUT_DIR [ARG]``;
each rank writes ``OUT_DIR/result-RANK.json``. The test process serves the
TCPStore, plays the controller (kills, abort keys) and kills every process it
started. Fault injection is explicit: the victim rank stops taking part at a
given step and announces it through the store; the test then kills or stops it.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from trainer.abort import (AbortWatcher, CommAborted, CommFailed, form_group, generation_store,  # noqa: E402
                           graveyard_size)

HOST = "127.0.0.1"
FAIL_STEP = 3
VICTIM_HANG_S = 60.0


def client(port: int) -> dist.TCPStore:
    return dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=20), wait_for_workers=False)


def gloo_threads() -> int:
    """Threads of this process that gloo runs (transport loops, work threads)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            count += "gloo" in Path(f"/proc/self/task/{task}/comm").read_text()
        except OSError:  # the thread ended meanwhile
            pass
    return count


def write_result(out: Path, rank: int, result: dict) -> None:
    tmp = out / f".result-{rank}.json"
    tmp.write_text(json.dumps(result))
    tmp.rename(out / f"result-{rank}.json")


# --------------------------------------------------------------------- abort
def abort_scenario(rank: int, world: int, port: int, out: Path, shape: str) -> None:
    """Train-like loop of collectives; rank world-1 stops at FAIL_STEP; survivors get
    released, re-form a smaller group under a new prefix and run an allreduce."""
    store = client(port)
    victim = world - 1
    form_group(store, "g1/", rank=rank, world_size=world, timeout_s=120)
    watcher = AbortWatcher(rank=rank)
    watcher.register(dist.group.WORLD)
    watcher.watch_store(generation_store(HOST, port, "g1/"))
    # the pipeline shape: rank 0 waits on rank 1, which waits on the victim
    tail = dist.new_group([1, 2]) if shape == "pipeline" else None
    result: dict = {"rank": rank, "pid": os.getpid()}
    try:
        for step in range(FAIL_STEP + 2):
            if rank == victim and step == FAIL_STEP:
                store.set("victim-ready", str(os.getpid()))
                time.sleep(VICTIM_HANG_S)  # killed or stopped by the test
            t = torch.ones(4)
            if shape == "pipeline" and step == FAIL_STEP:
                if rank == 0:
                    work = dist.irecv(t, src=1)
                else:
                    work = dist.all_reduce(t, group=tail, async_op=True)
            else:
                work = dist.all_reduce(t, async_op=True)
            result["blocked_at"] = time.time()
            watcher.wait(work, what=f"step {step}", timeout_s=60)
            if shape == "pipeline" and step == FAIL_STEP and rank == 1:
                dist.send(t, dst=0)
        result["error"] = "nothing failed"
    except (CommAborted, CommFailed) as exc:
        result.update(released_at=time.time(), error=type(exc).__name__, message=str(exc)[:300], step=step)
    watcher.close()
    # generation 2: the survivors only, same processes, fresh prefix
    started = time.time()
    form_group(store, "g2/", rank=rank, world_size=world - 1, timeout_s=30)
    watcher2 = AbortWatcher(rank=rank)
    t = torch.ones(4)
    watcher2.wait(dist.all_reduce(t, async_op=True), what="g2 allreduce", timeout_s=30)
    result.update(g2_sum=t.tolist(), reform_s=time.time() - started)
    # generation 1's groups, parked, are destroyed by the reaper once nothing refers to them
    # (the watcher of generation 1 and the pipeline's subgroup do); this thread computes on
    gloo_before = gloo_threads()
    del watcher, tail
    parked_at, computed = time.monotonic(), 0
    while (graveyard_size() or gloo_threads() >= gloo_before) and time.monotonic() - parked_at < 8:
        torch.ones(64, 64) @ torch.ones(64, 64)
        computed += 1
        time.sleep(0.01)
    result.update(parked_left=graveyard_size(), reaped_s=time.monotonic() - parked_at, computed_meanwhile=computed,
                  gloo_threads_before=gloo_before, gloo_threads_after=gloo_threads())
    write_result(out, rank, result)
    os._exit(0)  # the old group's stuck thread (hung victim) must not delay exit


# ------------------------------------------------------------------ transfer
# The job's true state: two flat tensors of different dtypes.
SIZES = {"w": (40, torch.float32), "m": (25, torch.float64)}


def truth(name: str) -> torch.Tensor:
    numel, dtype = SIZES[name]
    return (torch.arange(numel, dtype=dtype) * 0.5 + (100 if name == "m" else 0)).to(dtype)


def even_layout(world: int) -> dict[int, dict[str, list[tuple[int, int]]]]:
    """ZeRO-style: each name's flat range cut into ``world`` contiguous chunks."""
    layout: dict[int, dict[str, list[tuple[int, int]]]] = {r: {} for r in range(world)}
    for name, (numel, _) in SIZES.items():
        for r in range(world):
            layout[r][name] = [(numel * r // world, numel * (r + 1) // world)]
    return layout


def snapshot_of(spans: dict[str, tuple[int, int]], step: int = 7):
    from trainer.snapshot import Snapshotter
    state = {name: truth(name)[a:b].clone() for name, (a, b) in spans.items()}
    return Snapshotter().take(step, state, {"spans": {n: list(s) for n, s in spans.items()}})


def transfer_scenario(rank: int, world: int, port: int, out: Path) -> None:
    """Old layout: 4 owners (old rank 3 is dead); new layout: 3 ranks (this group).
    Old rank r's buddy copies live on the next ranks; we check every variant of
    damage on the same processes."""
    from trainer.reshard import BUDDY
    from trainer.snapshot import corrupt
    from trainer.transfer import TransferSettings, Unrecoverable, copies_from_snapshot, reshard_state

    store = client(port)
    form_group(store, "t1/", rank=rank, world_size=world, timeout_s=60)
    old, new = even_layout(4), even_layout(3)
    span = lambda layout, r: {n: s[0] for n, s in layout[r].items()}  # noqa: E731
    # buddies: old rank r's snapshot is replicated on (r + 1) % 4 and, for old rank 3, also on rank 1
    buddy_of = {0: [1], 1: [2], 2: [], 3: [0, 1]}  # old rank 2's buddy was old rank 3: gone

    def copies(damage: str):
        own = snapshot_of(span(old, rank))
        if damage == "home" and rank == 1:
            corrupt(own, "w")  # rank 1's own snapshot rotted in memory: its buddy (rank 2) serves it
        result = copies_from_snapshot(own, rank)
        for ward, holders in buddy_of.items():
            if rank in holders:
                replica = snapshot_of(span(old, ward))
                if damage == "home" and rank == 0 and ward == 3:
                    corrupt(replica, "m")  # rank 0's buddy copy of dead rank 3 is bad: rank 1's is used
                result += copies_from_snapshot(replica, rank, role=BUDDY)
        return result

    results = {}
    for damage in ("none", "home", "wire"):
        dest = {name: (a, torch.full((b - a,), float("nan"), dtype=SIZES[name][1]))
                for name, (a, b) in span(new, rank).items()}
        settings = TransferSettings(timeout_s=30)
        if damage == "wire":
            hits = []

            def flip_once(t, wire, hits=hits):
                if t.src == 1 and t.dst == 0 and not hits:  # one corrupted piece on the wire, first round
                    hits.append(t)
                    wire.view(torch.uint8)[0] ^= 0xFF
            settings.fault_hook = flip_once
        report = reshard_state(new, copies(damage), dest, rank=rank, settings=settings)
        exact = all(torch.equal(t, truth(name)[a:a + t.numel()]) for name, (a, t) in dest.items())
        results[damage] = {"exact": exact, "bad": report.bad_copies, "rounds": report.rounds,
                           "sent": report.bytes_sent, "received": report.bytes_received, "local": report.bytes_local,
                           "seconds": report.seconds}
    # every copy of old rank 2's shard is gone (its buddy was old rank 3): disk fallback
    try:
        lost = [c for c in copies("none") if not (c.holding.rank == 2 and c.holding.role != BUDDY)]
        dest = {name: (a, torch.empty(b - a, dtype=SIZES[name][1])) for name, (a, b) in span(new, rank).items()}
        reshard_state(new, lost, dest, rank=rank)
        results["lost"] = "no error"
    except Unrecoverable as exc:
        results["lost"] = str(exc)
    write_result(out, rank, results)
    dist.destroy_process_group()
    # gloo can abort ("terminate called without an active exception") when its
    # threads meet interpreter teardown; the result is written, leave now
    os._exit(0)


def state_at(step: int, spans: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    return {name: (truth(name)[a:b] + step).clone() for name, (a, b) in spans.items()}


def recovery_scenario(rank: int, world: int, port: int, out: Path) -> None:
    """The whole path on 4 ranks on two 'nodes' (0,1: a; 2,3: b): snapshots every
    step, buddy replication off-node, a rotted snapshot rejected by the buddy,
    then rank 3 is killed; survivors are released, re-form 3 ranks under a new
    prefix and reshard from their own snapshots and the buddy replicas."""
    from trainer.reshard import BUDDY
    from trainer.snapshot import Snapshotter, corrupt
    from common.layout import buddy_ring
    from trainer.transfer import (BuddyReplicator, copies_from_snapshot, gather_json,
                                  recoverable_step, reshard_state)

    store = client(port)
    form_group(store, "g1/", rank=rank, world_size=world, timeout_s=60)
    nodes = {0: "a", 1: "a", 2: "b", 3: "b"}
    ring = buddy_ring(nodes)
    spans = {n: s[0] for n, s in even_layout(world)[rank].items()}
    snapper = Snapshotter()
    # one gloo group per buddy pair: replication never sits between training collectives
    replicator = BuddyReplicator.for_ring(ring, rank)
    result: dict = {"rank": rank, "pid": os.getpid(), "buddy": ring[rank], "recoverable": []}
    for step in (1, 2, 3, 4):
        snap = snapper.take(step, state_at(step, spans), {"spans": {n: list(s) for n, s in spans.items()}})
        if step == 3 and rank == 0:
            corrupt(snap, "w")  # rots after its checksum: the copy at the buddy fails at use
        replicator.post(snap)
        replicator.complete()  # the round done and verified here (the trainer leaves it to the next boundary)
        held = gather_json(replicator.replica.step if replicator.replica else -1)  # in the service: step lines
        result["recoverable"].append(recoverable_step(held))
    result["rotten_held"] = sorted(s.step for s in replicator.replicas() if s.verify())
    result["replica_step"] = replicator.replica.step if replicator.replica else None
    replicator.close()
    watcher = AbortWatcher(rank=rank)
    watcher.watch_store(generation_store(HOST, port, "g1/"))
    if rank == 3:
        store.set("victim-ready", "1")
        time.sleep(VICTIM_HANG_S)
    try:
        watcher.wait(dist.all_reduce(torch.ones(1), async_op=True), what="step 5", timeout_s=60)
    except (CommAborted, CommFailed) as exc:
        result["released"] = type(exc).__name__
    watcher.close()
    started = time.monotonic()
    form_group(store, "g2/", rank=rank, world_size=3, timeout_s=30)
    result["reform_s"] = time.monotonic() - started
    step = min(result["recoverable"][-1], snapper.latest.step)
    copies = copies_from_snapshot(snapper.latest, rank)
    if replicator.replica is not None and replicator.replica.step == step:
        copies += copies_from_snapshot(replicator.replica, rank, role=BUDDY)
    new_spans = {n: s[0] for n, s in even_layout(3)[rank].items()}
    dest = {n: (a, torch.empty(b - a, dtype=SIZES[n][1])) for n, (a, b) in new_spans.items()}
    watcher2 = AbortWatcher(rank=rank)
    watcher2.watch_store(generation_store(HOST, port, "g2/"))
    report = reshard_state(even_layout(3), copies, dest, rank=rank, wait=watcher2.wait)
    watcher2.close()
    expected = state_at(step, new_spans)
    result.update(step=step, exact=all(torch.equal(dest[n][1], expected[n]) for n in dest),
                  transfer_s=report.seconds, bytes_sent=report.bytes_sent)
    write_result(out, rank, result)
    os._exit(0)


def replication_scenario(rank: int, world: int, port: int, out: Path) -> None:
    """Replication as the trainer drives it, on 4 ranks (0,1: node a; 2,3: node b): one
    ``post`` per step from this thread, each finishing the round before; then a layout
    change on rank 0; then a round left in flight at the end, as at a failure."""
    import threading

    from trainer.snapshot import Snapshotter, SnapshotSettings
    from common.layout import buddy_ring
    from trainer.transfer import BuddyReplicator, gather_json

    store = client(port)
    form_group(store, "g1/", rank=rank, world_size=world, timeout_s=60)
    ring = buddy_ring({0: "a", 1: "a", 2: "b", 3: "b"})
    ward = {b: r for r, b in ring.items()}[rank]
    spans = {n: s[0] for n, s in even_layout(world)[rank].items()}
    grown = {n: (a, b + 3) for n, (a, b) in spans.items()}  # rank 0's shard after a (pretend) reshard
    snapper = Snapshotter(SnapshotSettings(buffers=3))  # as the trainer: the replicator pins ``acked``
    replicator = BuddyReplicator.for_ring(ring, rank)
    threads = threading.active_count()
    result: dict = {"rank": rank, "ward": ward, "held": [], "acked": []}

    def meta(s):
        return {"spans": {n: list(v) for n, v in s.items()}}

    for step in (1, 2, 3, 4):
        replicator.post(snapper.take(step, state_at(step, spans), meta(spans)))
        result["held"].append(replicator.replica.step if replicator.replica else -1)
        result["acked"].append(replicator.acked.step if replicator.acked else -1)
    result["own_at_4"] = sorted(s.step for s in snapper.complete_snapshots())
    result["new_threads"] = threading.active_count() - threads
    for step in (5, 6):  # rank 0's layout changes at 5: an empty round asks for new terms, 6 carries them
        mine = grown if rank == 0 else spans
        replicator.post(snapper.take(step, state_at(step, mine), meta(mine)))
    replicator.complete()
    replica = replicator.replica
    ward_spans = {n: tuple(v) for n, v in replica.metadata["spans"].items()}
    result["replica"] = {"step": replica.step, "spans": {n: list(v) for n, v in ward_spans.items()},
                         "exact": all(torch.equal(replica.tensors[n], state_at(6, ward_spans)[n]) for n in ward_spans)}
    replicator.post(snapper.take(7, state_at(7, grown if rank == 0 else spans), meta(grown if rank == 0 else spans)))
    time.sleep(0.5)  # gloo's threads deliver round 7; nobody finishes it (the generation "ended")
    replicator.close()
    result["held_at_end"] = sorted(s.step for s in replicator.replicas())
    result["held_exact"] = all(
        torch.equal(s.tensors[n], state_at(s.step, {k: tuple(v) for k, v in s.metadata["spans"].items()})[n])
        for s in replicator.replicas() for n in s.tensors)
    big = "x" * 10000  # more than one gather slot: the second all_gather carries the rest
    result["gathered"] = gather_json({"rank": rank, "pad": big}) == [{"rank": r, "pad": big} for r in range(world)]
    write_result(out, rank, result)
    os._exit(0)


def big_round_scenario(rank: int, world: int, port: int, out: Path) -> None:
    """Two ranks on two 'nodes', snapshots of ~7 MB (above DIRECT_WAIT_BYTES): round 2 of
    rank 1 comes 1 s late. Rank 0's round 2 then moves in the background: ``busy`` until
    rank 1's bytes are in, and ``complete()`` after that returns at once."""
    import threading

    from trainer.snapshot import Snapshotter
    from common.layout import buddy_ring
    from trainer.transfer import DIRECT_WAIT_BYTES, BuddyReplicator

    store = client(port)
    form_group(store, "g1/", rank=rank, world_size=world, timeout_s=60)
    replicator = BuddyReplicator.for_ring(buddy_ring({0: "a", 1: "b"}), rank)
    snapper = Snapshotter()
    numel = DIRECT_WAIT_BYTES // 4 // 3 * 2  # three tensors: ~2x the direct-wait size in all

    def state(step: int) -> dict[str, torch.Tensor]:
        return {k: torch.arange(numel, dtype=torch.float32) * (i + 1) + 1000 * rank + step
                for i, k in enumerate(("param", "exp_avg", "exp_avg_sq"))}

    threads = threading.active_count()
    replicator.post(snapper.take(1, state(1)))  # round 1: terms agreed, both on time
    result: dict = {"rank": rank}
    if rank == 1:
        time.sleep(1.0)
    started = time.monotonic()
    replicator.post(snapper.take(2, state(2)))  # finishes round 1, posts round 2
    result["post_s"] = time.monotonic() - started
    result["busy_after_post"] = replicator.busy
    while replicator.busy and time.monotonic() - started < 30:
        time.sleep(0.01)
    result["moving_s"] = time.monotonic() - started
    started = time.monotonic()
    replicator.complete()
    result["complete_s"] = time.monotonic() - started
    replica, ward = replicator.replica, 1 - rank
    result["replica_step"] = replica.step
    result["replica_exact"] = all(torch.equal(replica.tensors[k], (torch.arange(numel, dtype=torch.float32) * (i + 1)
                                                                    + 1000 * ward + 2))
                                  for i, k in enumerate(("param", "exp_avg", "exp_avg_sq")))
    result["replica_verifies"] = replica.verify() == []
    time.sleep(0.1)
    result["threads_left"] = threading.active_count() - threads
    replicator.close()
    write_result(out, rank, result)
    os._exit(0)


SCENARIOS = {"recovery": recovery_scenario,
             "big-round": big_round_scenario,
             "replication": replication_scenario,
             "abort-allreduce": lambda *a: abort_scenario(*a, shape="allreduce"),
             "abort-pipeline": lambda *a: abort_scenario(*a, shape="pipeline"),
             "transfer": transfer_scenario}


def main() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # debugging a stuck test: kill -USR1
    scenario, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    SCENARIOS[scenario](rank, world, port, out)


if __name__ == "__main__":
    main()
