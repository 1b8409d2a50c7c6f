"""The Flight Recorder path on a NCCL process group (issue 20; world size 1 on one GPU).

Enables the recorder as a worker does (trainer.flight.enable), runs collectives of three
kinds on a NCCL group, takes the worker's dump (trainer.flight.take_dump), feeds it to the
controller's analysis (controller.flight.analyse) and checks the entries the recorder kept:
the kinds, sequence ids and states of the NCCL work. Prints one JSON object.

    PYTHONPATH=$PWD python3 bench/flight_nccl.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from trainer import flight

    entries = flight.enable()
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA device (a NCCL group)"}))
        return 2
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=60))
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0),
                            timeout=timedelta(seconds=60))
    x = torch.ones(1 << 20, device="cuda")
    out = torch.empty(1 << 20, device="cuda")
    for _ in range(3):
        dist.all_reduce(x)
        dist.reduce_scatter_tensor(out, x)
        dist.all_gather_into_tensor(x, out)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dump = flight.take_dump(0)
    dump_s = time.perf_counter() - t0
    from controller.flight import analyse

    _finding, reason = analyse({0: dump}, missing=[])
    kept = dump.get("entries", [])
    result = {
        "torch": torch.__version__, "recorder_entries_configured": entries, "dump_s": round(dump_s, 4),
        "dump_version": dump.get("version"), "entries": len(kept),
        "kinds": sorted({e.get("profiling_name", "") for e in kept}),
        "seq_ids": [e.get("collective_seq_id") for e in kept],
        "states": sorted({str(e.get("state")) for e in kept}),
        "pg_config": dump.get("pg_config"), "error": dump.get("error"),
        "analysis_reason": reason,
    }
    out_path = os.environ.get("OUT")
    if out_path:
        Path(out_path, "flight_nccl_dump.json").write_text(json.dumps(dump, default=str))
    print(json.dumps(result, default=str, indent=1))
    dist.destroy_process_group()
    ok = len(kept) >= 9 and any("all_reduce" in k for k in result["kinds"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
