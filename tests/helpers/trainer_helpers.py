"""Shared helpers for the trainer tests: start processes, always kill them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from trainer.telemetry import read_step_records

REPO = Path(__file__).resolve().parents[2]


def tiny_spec(**overrides) -> dict:
    """A tiny GPT (fast on 2 shared cores) with dropout on."""
    spec = {
        "name": "tiny",
        "seed": 7,
        "steps": 20,
        "global_batch_size": 12,
        "micro_batch_size": 2,
        "model": {"layers": 4, "d_model": 32, "heads": 2, "vocab_size": 64, "seq_len": 16, "dropout": 0.1},
        "data": {"kind": "synthetic", "num_samples": 256},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 3, "grad_clip": 1.0},
        "parallelism": {"dp": 1, "pp": 1, "zero_stage": 0},
        "resources": {"workers": 1},
    }
    spec.update(overrides)
    return spec


def stop_all(procs) -> None:
    """Kill every started process group (only ours: we started each in its own session)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()


def run_sweep(tmp_path: Path, spec: dict, runs: list[dict], *, nproc: int, timeout_s: float) -> dict[str, dict[int, list[dict]]]:
    """Run layouts sequentially in one launch of ``nproc`` processes.

    Returns {run name: {rank: [per-step metric records]}}.
    """
    import torch.distributed as dist

    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps({"spec": spec, "runs": runs}))
    out = tmp_path / "sweep-out"
    out.mkdir()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=120))
    env = {**os.environ, "SWEEP_FILE": str(sweep_file), "SWEEP_STORE": f"127.0.0.1:{store.port}",
           "SWEEP_OUT": str(out), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "helpers" / "trainer_sweep_worker.py")],
                env={**env, "SWEEP_RANK": str(rank)}, start_new_session=True,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"layout sweep did not finish within {timeout_s}s")
            time.sleep(0.1)
        failed = [(i, p) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            stop_all(procs)
            i, p = failed[0]
            raise AssertionError(f"sweep rank {i} exited {p.returncode}:\n{p.stdout.read()[-4000:]}")
    finally:
        stop_all(procs)
        del store
    results: dict[str, dict[int, list[dict]]] = {}
    for path in sorted(out.glob("*.jsonl")):
        name, rank_part = path.stem.rsplit(".rank", 1)
        results.setdefault(name, {})[int(rank_part)] = read_step_records(path)
    return results
