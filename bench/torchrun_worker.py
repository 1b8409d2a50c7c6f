"""The torchrun baseline's worker (bench/mttr.py --torchrun): restart-everything recovery.

Same trainer and job as the elastic runs, launched by ``torchrun --max-restarts``:
every rank saves its state to disk every ``CHECKPOINT_EVERY`` steps; after a
restart every rank reloads the newest complete checkpoint and redoes the steps
since. Rank 3 of the first attempt kills itself (SIGKILL) at step KILL_STEP, noting
the time first. Env: BENCH_SPEC (job spec JSON file), BENCH_OUT (directory).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

CHECKPOINT_EVERY = 10


def newest_complete(ckpt: Path, world: int) -> int:
    steps = [int(p.name.split("-")[1]) for p in ckpt.glob("step-*") if len(list(p.glob("rank-*.pt"))) == world]
    return max(steps, default=0)


def main() -> int:
    from common.spec import JobSpec
    from trainer.parallel import ParallelLayout
    from common.layout import even_shares, partition_for_spec
    from trainer.train import MetricsWriter, Trainer

    spec = JobSpec.from_dict(json.loads(Path(os.environ["BENCH_SPEC"]).read_text()))
    out = Path(os.environ["BENCH_OUT"])
    kill_step = int(os.environ["BENCH_KILL_STEP"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dist.init_process_group("gloo")
    p = spec.parallelism
    layout = ParallelLayout(dp=p.dp, pp=p.pp, zero_stage=p.zero_stage,
                            layer_partition=tuple(partition_for_spec(spec.model, p.pp)),
                            sample_shares=even_shares(spec.global_batch_size, p.dp),
                            micro_batch_size=spec.micro_batch_size)
    metrics = MetricsWriter(str(out / f"metrics-{rank}.jsonl"))
    trainer = Trainer(spec, layout, rank, device=torch.device("cpu"), metrics=metrics)
    ckpt = out / "ckpt"
    step = newest_complete(ckpt, world)
    if step:
        trainer.import_state(torch.load(ckpt / f"step-{step:06d}" / f"rank-{rank}.pt"))
        metrics.write({"event": "restored", "attempt": attempt, "resumed_step": step, "time": time.time()})
    while trainer.step < spec.steps:
        if attempt == 0 and rank == 3 and trainer.step == kill_step:
            (out / "killed").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        trainer.train_step()
        if trainer.step % CHECKPOINT_EVERY == 0:
            path = ckpt / f"step-{trainer.step:06d}"
            path.mkdir(parents=True, exist_ok=True)
            tmp = path / f".rank-{rank}.pt"
            torch.save(trainer.export_state(), tmp)
            tmp.rename(path / f"rank-{rank}.pt")
    dist.barrier()
    metrics.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
