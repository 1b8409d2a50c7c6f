"""A 3-rank gloo process for tests/trainer/test_flight.py: rank 2 stops itself (SIGSTOP) before its
collectives; rank 0 then waits in an all-reduce of the group [0, 2], rank 1 in a pipeline receive
from rank 2 (through trainer.comm.wait, as the trainer does). Ranks 0 and 1 answer dump requests.

argv: rank port run_dir"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta

from trainer import comm, flight


def pipeline_receive(buf, src: int) -> None:
    import torch.distributed as dist

    comm.wait(dist.irecv(buf, src=src), "pipeline receive")


def main() -> None:
    rank, port, run_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    flight.start(run_dir, rank)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                            timeout=timedelta(seconds=60))
    group = dist.new_group([0, 2])
    t = torch.ones(8)
    for _ in range(3):
        dist.all_reduce(t)
    print("ready", flush=True)
    if rank == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
    if rank == 0:
        dist.all_reduce(t, group=group)
    if rank == 1:
        pipeline_receive(t, 2)


if __name__ == "__main__":
    main()
