"""Llama on one CUDA GPU: Hugging Face parity on the device, then a preset's training steps.

    python bench/llama_gpu.py [--preset llama-1b] [--seq-len 2048] [--micro 4] [--batch 16] [--steps 6]
    python bench/llama_gpu.py --device cpu --preset tinyllama-1.1b --layers 1 --seq-len 64 --batch 2   # smoke

1. A tiny random ``LlamaForCausalLM`` (transformers, made here) loaded with ``init_from``
   gives the same fp32 logits on CUDA (tied and untied, grouped-query attention).
2. The preset trains ``--steps`` steps (dp1·pp1, bf16 autocast, torch.compile per block as
   ``TENAX_COMPILE=auto`` does on CUDA), then evaluates one held-out batch. Prints one JSON
   line: step times, tokens/s, model FLOP utilisation estimate, peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from common.layout import partition_for_spec  # noqa: E402
from common.spec import JobSpec  # noqa: E402


def parity(tmp: Path, device: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer import hf
    from trainer.model import build_stage

    out = {}
    for tie in (False, True):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=8, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5,
                             tie_word_embeddings=tie, max_position_embeddings=64)
        model = LlamaForCausalLM(config).eval()
        d = tmp / f"hf{int(tie)}"
        model.save_pretrained(str(d))
        spec = JobSpec.from_dict({"model": {"arch": "llama", "layers": 3, "d_model": 64, "heads": 8, "kv_heads": 2,
                                            "ffn_dim": 96, "vocab_size": 96, "seq_len": 32, "dropout": 0.0,
                                            "rope_base": 5000.0, "tie_embeddings": tie, "init_from": str(d)}})
        stage = build_stage(spec.model, layers=range(3), is_first=True, is_last=True)
        hf.load_stage(stage, spec.model, str(d))
        tokens = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            expected = model.to(device)(tokens).logits
            got = stage.to(device).eval()(tokens)
        out[f"max_abs_logit_diff_{'tied' if tie else 'untied'}"] = (got - expected).abs().max().item()
    return out


def train(args, tmp: Path) -> dict:
    from trainer.data import write_token_file
    from trainer.parallel import ParallelLayout
    from trainer.train import Trainer, init_process_group

    spec = JobSpec.from_dict({
        "name": "bench", "seed": 1, "steps": args.steps, "global_batch_size": args.batch,
        "micro_batch_size": args.micro,
        "model": {"preset": args.preset, "seq_len": args.seq_len, "dropout": 0.0,
                  **({"layers": args.layers} if args.layers else {})},
        "data": {"kind": "synthetic", "num_samples": 4 * args.batch},
        "optimizer": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 2},
        "parallelism": {"dp": 1, "pp": 1, "zero_stage": 0}, "resources": {"workers": 1, "device": args.device},
    })
    held = tmp / "held.tokens"
    write_token_file(torch.randint(0, min(spec.model.vocab_size, 60000), (args.batch * (args.seq_len + 1),)).tolist(),
                     held, dtype="uint32")
    spec.data.eval_path, spec.data.eval_every = str(held), 10**6
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    init_process_group(store=store, rank=0, world_size=1, device=device, timeout_s=300)
    layout = ParallelLayout(dp=1, pp=1, zero_stage=0, layer_partition=partition_for_spec(spec.model, 1),
                            sample_shares=(args.batch,), micro_batch_size=args.micro)
    trainer = Trainer(spec, layout, 0, device=device)
    records = [trainer.train_step() for _ in range(args.steps)]
    t0 = time.perf_counter()
    evaluation = trainer.evaluate_held_out()
    dist.destroy_process_group()
    m = spec.model
    params = trainer.flat.numel - (m.vocab_size * m.d_model if m.tie_embeddings else 0)
    tokens = args.batch * args.seq_len
    # 6 N per token (matmuls, forward + backward) + attention 12 * layers * d * seq_len
    flops = tokens * (6 * params + 12 * m.layers * m.d_model * args.seq_len)
    steady = [r["step_time"] for r in records[2:]] or [records[-1]["step_time"]]
    step_s = sorted(steady)[len(steady) // 2]
    peak = {"nvidia h100": 989e12, "nvidia h200": 989e12}
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    bf16_peak = next((v for k, v in peak.items() if k in name.lower()), None)
    return {
        "device": name, "preset": args.preset, "params": params, "seq_len": args.seq_len, "batch": args.batch,
        "micro": args.micro, "losses": [round(r["loss"], 4) for r in records],
        "step_times_s": [round(r["step_time"], 3) for r in records], "median_steady_step_s": round(step_s, 3),
        "tokens_per_s": round(tokens / step_s), "mfu": round(flops / step_s / bf16_peak, 3) if bf16_peak else None,
        "peak_memory_gib": round(records[-1]["peak_memory_bytes"] / 2**30, 1),
        "eval_loss": round(evaluation["eval_loss"], 4), "eval_s": round(time.perf_counter() - t0, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=0, help="override the preset's layers (0: keep)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of this script")
    parser.add_argument("--skip-parity", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TENAX_COMPILE", "auto")
    with tempfile.TemporaryDirectory() as tmp:
        result = {} if args.skip_parity else parity(Path(tmp), args.device)
        result.update(train(args, Path(tmp)))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
