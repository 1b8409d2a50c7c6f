"""What an in-memory snapshot costs: copy and checksum throughput, and the stall
it adds to a training-like step (compute, fence, in-place update, begin).

    .venv/bin/python bench/snapshot_cost.py --mb 64 --steps 20            # CPU
    python bench/snapshot_cost.py --device cuda --mb 1024 --steps 20      # GPU (pinned + side stream)

Prints one JSON object. The "step" is a matmul loop (the state is not read by it) standing in for forward +
backward; ``overhead`` is median step time with a snapshot every step over the median without, minus 1
(alternating blocks of 5 steps, so load from other processes hits both alike).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trainer.snapshot import Snapshotter, checksum  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def consistency_check(dev: str, a: torch.Tensor, rounds: int = 5) -> bool:
    """The snapshot holds the state as of begin(): the update right before it is
    included (stream order) and the update right after fence() is not."""
    state = {"w": torch.zeros(1 << 22, device=dev)}
    snapper = Snapshotter()
    ok = True
    for i in range(rounds):
        state["w"].add_(1.0)  # step i's update, queued on the main stream
        expected = float(i + 1)
        snapper.begin(i, state)
        x = a
        for _ in range(4):
            x = x @ a  # keep the main stream busy while the copy runs
        snapper.fence()
        state["w"].add_(100.0)  # the next optimizer step must not leak into snapshot i
        state["w"].sub_(100.0)
        snap = snapper.wait()
        ok = ok and snap.step == i and bool((snap.tensors["w"] == expected).all()) and snap.verify() == []
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mb", type=float, default=64.0, help="state size per rank (MiB, fp32)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compute", type=int, default=512, help="matmul size of the stand-in step")
    ap.add_argument("--matmuls", type=int, default=8, help="matmuls per stand-in step")
    args = ap.parse_args()
    dev = args.device
    numel = int(args.mb * 2**20 / 4)
    state = {"params": torch.randn(numel // 2, device=dev), "exp_avg": torch.randn(numel - numel // 2, device=dev)}
    a = torch.randn(args.compute, args.compute, device=dev)
    nbytes = numel * 4

    # raw costs, measured alone
    host = torch.empty(numel // 2, pin_memory=(dev == "cuda"))
    sync(dev)
    t0 = time.perf_counter()
    host.copy_(state["params"])
    sync(dev)
    copy_gbs = host.numel() * 4 / (time.perf_counter() - t0) / 1e9
    t0 = time.perf_counter()
    checksum(host)
    crc_gbs = host.numel() * 4 / (time.perf_counter() - t0) / 1e9

    def step(snapper: Snapshotter | None, i: int) -> None:
        x = a
        for _ in range(args.matmuls):  # forward + backward stand-in: reads nothing of the state
            x = torch.tanh(x @ a)
        float(x[0, 0])  # the trainer reads the loss after backward: the host keeps pace with the device
        if snapper is not None:
            snapper.fence()  # the optimizer is about to write the state
        for t in state.values():
            t.mul_(0.999).add_(x[0, 0])  # optimizer step stand-in: in place
        if snapper is not None:
            snapper.begin(i, state)

    def block(snapper: Snapshotter | None, first: int, n: int) -> float:
        sync(dev)
        t0 = time.perf_counter()
        for i in range(first, first + n):
            step(snapper, i)
        sync(dev)
        return (time.perf_counter() - t0) / n

    consistent = consistency_check(dev, a)
    snapper = Snapshotter()
    snapper.reserve(state)  # at startup: pinned allocation is slow
    block(None, 0, 3)
    block(snapper, 0, 3)
    snapper.wait()
    # alternate short blocks (ABAB...) and take medians: the host may be shared
    plain_times, snap_times, block_len = [], [], 5
    for b in range(max(1, args.steps // block_len)):
        plain_times.append(block(None, 0, block_len))
        snap_times.append(block(snapper, 1000 + b * block_len, block_len))
    snapper.wait()
    plain, with_snap = statistics.median(plain_times), statistics.median(snap_times)
    latest = snapper.latest
    print(json.dumps({
        "device": dev if dev == "cpu" else torch.cuda.get_device_name(),
        "state_mib": args.mb,
        "copy_gb_s": round(copy_gbs, 2),
        "checksum_gb_s": round(crc_gbs, 2),
        "snapshot_copy_s": round(snapper.stats.last_copy_s, 4),
        "snapshot_checksum_s": round(snapper.stats.last_checksum_s, 4),
        "last_fence_wait_s": round(snapper.stats.last_fence_wait_s, 5),
        "step_s_plain": round(plain, 4),
        "step_s_with_snapshot": round(with_snap, 4),
        "overhead": round(with_snap / plain - 1, 4),
        "snapshots_taken": snapper.stats.taken,
        "snapshots_skipped": snapper.stats.skipped,
        "latest_step": latest.step if latest else None,
        "latest_verifies": latest is not None and latest.verify() == [],
        "bytes": nbytes,
        "snapshot_equals_state_at_begin": consistent,
    }))


if __name__ == "__main__":
    main()
