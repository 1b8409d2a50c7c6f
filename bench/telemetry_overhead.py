"""Step time with the detection telemetry on vs off, as a ratio, in one run.

    .venv/bin/python bench/telemetry_overhead.py                  # CPU (gloo), a small GPT
    .venv/bin/python bench/telemetry_overhead.py --device cuda    # one GPU (NCCL, bf16), ~350M GPT

One process trains one model (a world of one rank: the telemetry's cost is per
rank and per step, whatever the world size). Steps alternate between blocks
with ``trainer.telemetry`` on (phases, data time, CUDA events read lazily, the
heartbeat thread, the chaos-file check) and off, so both sides see the same
model, data, allocator and machine state; drift cancels out. Both sides write
the per-step metrics line, as every worker does. Reported: the median step
time of each side and on/off - 1 (goal: <= 1%), and, because on a shared host
the difference of two noisy medians is itself noisy by a few percent, the
hooks' own cost per step timed alone, as a fraction of the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CPU_MODEL = {"layers": 4, "d_model": 128, "heads": 4, "vocab_size": 256, "seq_len": 64, "dropout": 0.1}
CUDA_MODEL = {"layers": 24, "d_model": 1024, "heads": 16, "vocab_size": 50304, "seq_len": 1024, "dropout": 0.0}


def build_trainer(device_name: str, tmp: Path):
    import torch
    import torch.distributed as dist

    from common.spec import JobSpec
    from trainer.parallel import ParallelLayout
    from trainer.train import MetricsWriter, Trainer, init_process_group, pick_device

    cuda = device_name == "cuda"
    spec = JobSpec.from_dict({
        "name": "bench-telemetry", "seed": 0, "steps": 100000,
        "global_batch_size": 16, "micro_batch_size": 8 if cuda else 4,
        "model": CUDA_MODEL if cuda else CPU_MODEL, "data": {"kind": "synthetic", "num_samples": 65536},
        "optimizer": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 2, "grad_clip": 1.0},
        "parallelism": {"dp": 1, "pp": 1, "zero_stage": 1}, "resources": {"workers": 1, "device": device_name},
    })
    device = pick_device(spec)
    store = dist.HashStore()
    init_process_group(store=store, rank=0, world_size=1, device=device, timeout_s=120)
    layout = ParallelLayout(dp=1, pp=1, zero_stage=1, layer_partition=(0, spec.model.layers),
                            sample_shares=(spec.global_batch_size,), micro_batch_size=spec.micro_batch_size)
    metrics = MetricsWriter(str(tmp / "metrics.jsonl"))
    trainer = Trainer(spec, layout, 0, device=device, metrics=metrics)
    if cuda:
        torch.cuda.synchronize()
    return trainer, metrics


def timed_steps(trainer, n: int) -> list[float]:
    """Wall time of each step, measured as the trainer's caller sees it (the step already
    syncs on the loss; a final device sync would only add the same constant to both sides)."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        trainer.train_step()
        out.append(time.perf_counter() - start)
    return out


def hook_seconds_per_step(device_type: str, control_dir: str, repeats: int = 5000) -> float:
    """What the telemetry adds to one step, timed alone (no model): the step context, the phase
    marks, the data timer, the chaos-file stat and the extra fields (on CUDA: the events).
    On a busy host this is far steadier than the difference of two noisy step times."""
    from trainer.telemetry import StepTelemetry, TelemetrySettings

    telemetry = StepTelemetry(device_type=device_type, rank=0, write=lambda record: None,
                              settings=TelemetrySettings(enabled=True, control_dir=control_dir))
    record: dict = {}
    start = time.perf_counter()
    for step in range(repeats):
        with telemetry.step(step):
            telemetry.data_started()
            telemetry.data_done()
            telemetry.apply_slowdown(0.1)
            telemetry.mark("collective")
            telemetry.mark("optimizer")
            telemetry.mark("collective")
            record.update(telemetry.fields(forward_s=0.1, backward_s=0.2))
    elapsed = time.perf_counter() - start
    telemetry.close()
    return elapsed / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--blocks", type=int, default=20, help="on/off block pairs (default 20)")
    parser.add_argument("--block-steps", type=int, default=3, help="steps per block (default 3)")
    parser.add_argument("--warmup", type=int, default=10, help="steps before measuring (default 10)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if min(args.blocks, args.block_steps) < 1 or args.warmup < 0:
        parser.error("--blocks and --block-steps must be >= 1, --warmup >= 0")

    import torch.distributed as dist

    from trainer.telemetry import StepTelemetry, TelemetrySettings

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trainer, metrics = build_trainer(args.device, tmp)
        on = StepTelemetry(device_type=trainer.device.type, rank=0, write=metrics.write,
                           settings=TelemetrySettings(enabled=True, control_dir=str(tmp)))
        off = StepTelemetry(device_type=trainer.device.type, rank=0, write=metrics.write,
                            settings=TelemetrySettings(enabled=False))
        trainer.telemetry.close()  # the trainer's own (from the environment); the bench swaps its two in
        trainer.telemetry = on
        timed_steps(trainer, args.warmup)
        times = {"on": [], "off": []}
        for block in range(args.blocks):
            # alternate which side goes first, so neither always follows the other
            for side in (("on", "off") if block % 2 == 0 else ("off", "on")):
                trainer.telemetry = on if side == "on" else off
                times[side] += timed_steps(trainer, args.block_steps)
        on.close()
        metrics.close()
        dist.destroy_process_group()

        hook_s = hook_seconds_per_step(trainer.device.type, str(tmp))

    median = {side: statistics.median(t) for side, t in times.items()}
    mean = {side: statistics.fmean(t) for side, t in times.items()}
    result = {
        "device": args.device, "steps_per_side": len(times["on"]),
        "median_step_s": median, "mean_step_s": mean,
        "overhead_median": median["on"] / median["off"] - 1, "overhead_mean": mean["on"] / mean["off"] - 1,
        "hook_s_per_step": hook_s, "hook_overhead": hook_s / median["off"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.device}: {result['steps_per_side']} steps per side; median step "
              f"on {median['on'] * 1000:.2f} ms, off {median['off'] * 1000:.2f} ms -> overhead "
              f"{result['overhead_median']:+.2%} (mean: {result['overhead_mean']:+.2%}); the hooks alone "
              f"{hook_s * 1e6:.1f} us per step = {result['hook_overhead']:.3%} of a step; goal <= 1%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
