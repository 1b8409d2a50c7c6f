"""Tokens/s of the Tenax trainer against plain torch DDP, same model/batch/data, one run.

    .venv/bin/python bench/trainer_throughput.py                 # CPU, gloo, 2 ranks
    .venv/bin/python bench/trainer_throughput.py --device cuda   # NCCL, bf16, ~350M GPT, MFU

Both sides use the same GPT (trainer.model, full model on every rank), the same
layout-independent init, the same samples per step and micro-batching, AdamW
with the same LR schedule and global-norm clipping. The baseline is
DistributedDataParallel with ``no_sync`` on all but the last micro-batch and
torch.optim.AdamW. Throughput is the median over steps after warm-up, as
global tokens per second; the result line is the ratio tenax / ddp.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

H200_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of one H200 (SXM)

CPU_MODEL = {"layers": 4, "d_model": 128, "heads": 4, "vocab_size": 256, "seq_len": 64, "dropout": 0.1}
# ~350M parameters (GPT-2 medium shape with a 50k vocabulary); no dropout, as usual for pretraining.
CUDA_MODEL = {"layers": 24, "d_model": 1024, "heads": 16, "vocab_size": 50304, "seq_len": 1024, "dropout": 0.0}


def make_spec(args) -> dict:
    cuda = args.device == "cuda"
    return {
        "name": "bench",
        "seed": 0,
        "steps": args.steps,
        "global_batch_size": args.global_batch or (32 * args.nproc if cuda else 32),
        "micro_batch_size": args.micro_batch or (16 if cuda else 4),
        "model": CUDA_MODEL if cuda else CPU_MODEL,
        "data": {"kind": "synthetic", "num_samples": 65536},
        "optimizer": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 2, "grad_clip": 1.0},
        "parallelism": {"dp": args.nproc, "pp": 1, "zero_stage": args.zero},
        "resources": {"workers": args.nproc, "device": args.device},
    }


# --------------------------------------------------------------- baseline
def ddp_worker() -> int:
    """One rank of the plain-DDP baseline (env: BENCH_SPEC, BENCH_RANK, BENCH_WORLD, BENCH_STORE, BENCH_OUT)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from common.spec import JobSpec
    from trainer.data import StepSampler, build_dataset
    from trainer.dropout import DropoutContext
    from trainer.model import build_stage, init_parameters
    from trainer.optim import lr_at
    from common.layout import even_shares

    spec = JobSpec.from_dict(json.loads(os.environ["BENCH_SPEC"]))
    rank, world = int(os.environ["BENCH_RANK"]), int(os.environ["BENCH_WORLD"])
    host, port = os.environ["BENCH_STORE"].rsplit(":", 1)
    cuda = spec.resources.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore("ddp", store), rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    model = build_stage(spec.model, layers=range(spec.model.layers), is_first=True, is_last=True, device=device)
    init_parameters(model, seed=spec.seed, layers=spec.model.layers)
    from trainer.train import should_compile

    if should_compile(device):  # same compilation as the tenax side (TENAX_COMPILE)
        for block in model.blocks.values():
            block.compile()
    ddp = DDP(model, device_ids=[0] if cuda else None)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    o = spec.optimizer
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    sampler = StepSampler(build_dataset(spec), global_batch_size=spec.global_batch_size, seed=spec.seed)
    shares = even_shares(spec.global_batch_size, world)
    start = sum(shares[:rank])
    mb, global_tokens = spec.micro_batch_size, spec.global_batch_size * spec.model.seq_len
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (lambda: torch.autocast("cpu", enabled=False))
    out = open(os.environ["BENCH_OUT"] + f".rank{rank}", "w")
    for step in range(spec.steps):
        t0 = time.perf_counter()
        tokens = sampler.batch_tokens(step, range(start, start + shares[rank])).to(device)
        micro = list(range(0, shares[rank], mb))
        for k, lo in enumerate(micro):
            hi = min(lo + mb, shares[rank])
            model.set_dropout_context(DropoutContext(seed=spec.seed, step=step, positions=list(range(start + lo, start + hi))))
            sync_now = k == len(micro) - 1
            ctx = ddp.no_sync() if not sync_now else contextlib.nullcontext()
            with ctx:
                with autocast():
                    logits = ddp(tokens[lo:hi, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[lo:hi, 1:].reshape(-1),
                                       reduction="sum") / global_tokens * world  # DDP averages over ranks
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, o, spec.steps)
        opt.step()
        opt.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
        out.write(json.dumps({"step": step + 1, "step_time": time.perf_counter() - t0, "loss": loss.item()}) + "\n")
        out.flush()
    dist.destroy_process_group()
    return 0


def run_ddp(spec: dict, nproc: int, tmp: Path, timeout_s: float) -> list[float]:
    import torch.distributed as dist

    from cli.train_local import _stop

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    env = {**os.environ, "BENCH_SPEC": json.dumps(spec), "BENCH_WORLD": str(nproc),
           "BENCH_STORE": f"127.0.0.1:{store.port}", "BENCH_OUT": str(tmp / "ddp"), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, __file__, "--role", "ddp-worker"],
                              env={**env, "BENCH_RANK": str(r), **_slot_env(spec, r)}, start_new_session=True)
             for r in range(nproc)]
    try:
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("DDP baseline failed or timed out")
            time.sleep(0.1)
        if any(p.returncode for p in procs):
            raise RuntimeError("DDP baseline failed")
    finally:
        _stop(procs)
    return [json.loads(l)["step_time"] for l in (tmp / "ddp.rank0").read_text().splitlines()]


def _slot_env(spec: dict, rank: int) -> dict:
    return {"CUDA_VISIBLE_DEVICES": str(rank)} if spec["resources"]["device"] == "cuda" else {}


def run_tenax(spec: dict, nproc: int, tmp: Path, timeout_s: float) -> list[dict]:
    from cli.train_local import launch_workers
    from common.layout import new_plan
    from common.spec import JobSpec
    from trainer.telemetry import read_step_records

    job = JobSpec.from_dict(spec)
    plan = new_plan(job_id="bench", generation=1, placement=[("local", r) for r in range(nproc)], dp=nproc, pp=1,
                    zero_stage=job.parallelism.zero_stage, layer_partition=(0, job.model.layers),
                    global_batch_size=job.global_batch_size, store_address="")
    metrics = tmp / "tenax.jsonl"
    # launch_workers pins rank r to GPU r on CUDA, like the DDP side (_slot_env).
    code = launch_workers(job, plan, metrics=str(metrics), run_dir=str(tmp), timeout_s=timeout_s)
    if code:
        raise RuntimeError(f"tenax run failed with exit code {code}")
    # Heartbeats and events share the file and carry a rank too: keep rank 0's step lines only.
    return [r for r in read_step_records(metrics) if r.get("rank") == 0]


def model_flops_per_token(m: dict) -> float:
    """Training FLOPs per token: 6 * matmul params + attention (12 * layers * seq * d)."""
    n_matmul = m["layers"] * 12 * m["d_model"] ** 2 + m["d_model"] * m["vocab_size"]
    return 6 * n_matmul + 12 * m["layers"] * m["seq_len"] * m["d_model"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", default="bench", choices=["bench", "ddp-worker"], help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--nproc", type=int, default=None, help="ranks (default: 2 on CPU, 1 on CUDA)")
    parser.add_argument("--zero", type=int, default=0, help="ZeRO stage of the tenax side (default 0 = DDP-equivalent)")
    parser.add_argument("--steps", type=int, default=None, help="steps per side (default 30 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    parser.add_argument("--global-batch", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=580)
    args = parser.parse_args()
    if args.role == "ddp-worker":
        return ddp_worker()
    args.nproc = args.nproc or (1 if args.device == "cuda" else 2)
    args.steps = args.steps or (20 if args.device == "cuda" else 30)
    if args.device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.nproc)))
    spec = make_spec(args)
    tokens_per_step = spec["global_batch_size"] * spec["model"]["seq_len"]
    with tempfile.TemporaryDirectory(prefix="tenax-bench-") as tmp:
        tmp = Path(tmp)
        tenax_steps = run_tenax(spec, args.nproc, tmp, args.timeout / 2)
        ddp_times = run_ddp(spec, args.nproc, tmp, args.timeout / 2)
    tenax_time = statistics.median(r["step_time"] for r in tenax_steps[args.warmup:])
    ddp_time = statistics.median(ddp_times[args.warmup:])
    result = {
        "device": args.device, "nproc": args.nproc, "layout": f"dp{args.nproc} zero{args.zero}",
        "model": spec["model"], "global_batch": spec["global_batch_size"], "micro_batch": spec["micro_batch_size"],
        "tenax_tokens_per_s": tokens_per_step / tenax_time, "ddp_tokens_per_s": tokens_per_step / ddp_time,
        "ratio_tenax_over_ddp": ddp_time / tenax_time,
        "tenax_final_loss": tenax_steps[-1]["loss"],
    }
    if args.device == "cuda":
        flops = model_flops_per_token(spec["model"])
        result["tenax_mfu"] = flops * result["tenax_tokens_per_s"] / (args.nproc * H200_BF16_PEAK_FLOPS)
        result["ddp_mfu"] = flops * result["ddp_tokens_per_s"] / (args.nproc * H200_BF16_PEAK_FLOPS)
    print(json.dumps(result, indent=2))
    print(f"tokens/s tenax {result['tenax_tokens_per_s']:.0f}  ddp {result['ddp_tokens_per_s']:.0f}  "
          f"ratio {result['ratio_tenax_over_ddp']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
