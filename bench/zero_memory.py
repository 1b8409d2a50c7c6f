"""Peak memory per rank for dp4 with ZeRO 0, 1 and 2 (the ZeRO saving, measured).

    .venv/bin/python bench/zero_memory.py                 # CPU, gloo: peak RSS per rank
    .venv/bin/python bench/zero_memory.py --device cuda   # 4 GPUs: torch.cuda.max_memory_allocated

Each zero stage runs the same ~25M-parameter GPT for a few steps as 4 ranks
(train-local's launcher). Reported per rank: the training state it keeps
between steps (params + gradients + AdamW state, exact bytes) and the measured
peak (on CPU the process's peak RSS, which includes the ~0.3 GB of the Python +
torch runtime, so the baseline of a 1-parameter run is printed for reference).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = {"layers": 8, "d_model": 512, "heads": 8, "vocab_size": 256, "seq_len": 32, "dropout": 0.0}


def run(zero: int, device: str, steps: int, model: dict) -> list[dict]:
    from protos.plan import Plan, WorkerAssignment
    from common.spec import JobSpec
    from cli.train_local import launch_workers

    dp = 4
    spec = JobSpec.from_dict({
        "name": "zero-mem", "steps": steps, "global_batch_size": 4, "micro_batch_size": 1, "model": model,
        "data": {"kind": "synthetic", "num_samples": 64},
        "parallelism": {"dp": dp, "pp": 1, "zero_stage": zero}, "resources": {"workers": dp, "device": device},
    })
    workers = tuple(WorkerAssignment(rank=r, node="local", slot=r, dp_rank=r, pp_rank=0) for r in range(dp))
    plan = Plan(job_id="zero-mem", generation=1, workers=workers, dp=dp, pp=1, zero_stage=zero,
                layer_partition=(0, model["layers"]), sample_shares=(1,) * dp, store_address="", store_prefix="zm")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.jsonl"
        env = {"OMP_NUM_THREADS": "1"}
        code = launch_workers(spec, plan, metrics=str(metrics), run_dir=tmp, timeout_s=540, env_extra=env)
        if code:
            raise SystemExit(f"zero {zero} run failed ({code})")
        records = [json.loads(l) for l in metrics.read_text().splitlines()]
    return [max((r for r in records if r["rank"] == rank), key=lambda r: r["step"]) for rank in range(dp)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda needs 4 GPUs (one per rank)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    tiny = {**MODEL, "layers": 1, "d_model": 8, "heads": 1, "vocab_size": 16}
    base = max(r["peak_memory_bytes"] for r in run(0, args.device, 1, tiny))
    params = None
    rows = []
    for zero in (0, 1, 2):
        last = run(zero, args.device, args.steps, MODEL)
        params = last[0]["params_held"]
        rows.append({
            "zero": zero,
            "state_bytes_per_rank": [r["state_bytes_held"] for r in last],
            "optimizer_state_bytes_per_rank": [r["optimizer_state_bytes"] for r in last],
            "peak_memory_bytes_per_rank": [r["peak_memory_bytes"] for r in last],
        })
    print(json.dumps({"params": params, "runtime_baseline_peak_bytes": base, "dp": 4, "runs": rows}, indent=1))
    mib = 1 << 20
    print(f"model: {params / 1e6:.1f}M params; runtime-only peak RSS {base / mib:.0f} MiB")
    for row in rows:
        state = max(row["state_bytes_per_rank"]) / mib
        peak = max(row["peak_memory_bytes_per_rank"]) / mib
        print(f"dp4 zero{row['zero']}: state held/rank {state:7.1f} MiB   peak/rank {peak:7.1f} MiB   "
              f"peak above runtime {peak - base / mib:7.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
