"""Test helper: run several layouts one after another inside ONE set of N processes.

Launching processes dominates the cost of a tiny run, so the layout tests start
N processes once and, for each layout, form a fresh default process group of
that layout's size under its own store prefix (as an elastic re-plan would),
train, record every rank's metrics, and tear the group down. Ranks outside a
layout's world sit it out.

Env: SWEEP_FILE (JSON {"spec": JobSpec dict, "runs": [{"name", "dp", "pp",
"zero", "shares"}]}), SWEEP_RANK, SWEEP_STORE (host:port), SWEEP_OUT (dir).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from datetime import timedelta

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from common.spec import JobSpec  # noqa: E402
from trainer.parallel import ParallelLayout  # noqa: E402
from common.layout import partition_for_spec  # noqa: E402
from trainer.train import MetricsWriter, Trainer, init_process_group  # noqa: E402


def main() -> int:
    sweep = json.load(open(os.environ["SWEEP_FILE"]))
    rank = int(os.environ["SWEEP_RANK"])
    host, port = os.environ["SWEEP_STORE"].rsplit(":", 1)
    out_dir = os.environ["SWEEP_OUT"]
    spec = JobSpec.from_dict(sweep["spec"])
    base = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=120))
    for index, run in enumerate(sweep["runs"]):
        layout = ParallelLayout(
            dp=run["dp"], pp=run["pp"], zero_stage=run["zero"],
            layer_partition=partition_for_spec(spec.model, run["pp"]),
            sample_shares=tuple(run["shares"]), micro_batch_size=spec.micro_batch_size,
        )
        layout.validate(layers=spec.model.layers, global_batch_size=spec.global_batch_size)
        if rank >= layout.world_size:
            continue
        store = dist.PrefixStore(f"sweep/{index}", base)
        init_process_group(store=store, rank=rank, world_size=layout.world_size,
                           device=torch.device("cpu"), timeout_s=120)
        writer = MetricsWriter(os.path.join(out_dir, f"{run['name']}.rank{rank}.jsonl"))
        try:
            Trainer(spec, layout, rank, device=torch.device("cpu"), metrics=writer).train(spec.steps)
        finally:
            writer.close()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # as trainer/worker.py: skip interpreter finalisation, where torch's communication threads
    # can abort a process that ran cleanly (exit -6, "terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
