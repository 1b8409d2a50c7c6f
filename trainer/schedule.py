"""The 1F1B pipeline schedule and its executor for one stage.

Stage s of P with M micro-batches runs min(P-s-1, M) warm-up forwards, then
alternates one forward / one backward, then drains the remaining backwards.
This bounds live activations per stage at P-s micro-batches (GPipe keeps M).
With P == 1 it degenerates to plain gradient accumulation (F0 B0 F1 B1 ...).

Activations go forward and gradients backward with asynchronous sends (kept
alive until the end of the step) and blocking receives, so a slow peer shows up
as pipeline wait, never as a deadlock.

Host staging (``stage_through_host``): gloo has no CUDA send/recv, so when the
backend is gloo and the tensors live on a GPU (several ranks of a pipeline on
one GPU), a send first copies the tensor into a pinned host buffer (a
non-blocking copy on the current stream, then that stream is synchronised:
gloo reads the host bytes at once) and a receive lands in a pinned host buffer
that one non-blocking copy moves to the GPU (the caching host allocator keeps
the buffer until that copy is done). On CPU the same path runs with plain host
buffers, which is how CI exercises it.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from trainer import comm


def one_f_one_b(num_micro: int, pp: int, stage: int) -> list[tuple[str, int]]:
    """The ordered actions ("F"|"B", micro-batch index) of ``stage``."""
    warmup = min(pp - stage - 1, num_micro)
    actions = [("F", i) for i in range(warmup)]
    forward, backward = warmup, 0
    while forward < num_micro:
        actions += [("F", forward), ("B", backward)]
        forward, backward = forward + 1, backward + 1
    actions += [("B", i) for i in range(backward, num_micro)]
    return actions


class StageTimes:
    """Seconds spent per phase during one step (metrics)."""

    def __init__(self):
        self.forward = self.backward = self.pipeline_wait = 0.0
        self.compute_cpu = 0.0
        """CPU seconds this thread used in forward + backward (time the OS ran it)."""


class PipelineStageRunner:
    """Runs one step of 1F1B for this stage; returns the summed (already normalised) loss.

    ``prev_rank``/``next_rank`` are global ranks of the neighbouring stages (None at the ends).
    ``forward_fn(i, x)`` runs the stage on micro-batch i (input tokens or hidden)
    and returns the output (hidden, or the normalised loss on the last stage).
    """

    def __init__(self, *, prev_rank: int | None, next_rank: int | None, hidden_shape: Callable[[int], tuple],
                 device: torch.device, sync: Callable[[], None] = lambda: None, stage_through_host: bool = False):
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.hidden_shape, self.device, self.sync = hidden_shape, device, sync
        self.stage_through_host = stage_through_host
        """Point-to-point through host buffers (see the module docstring)."""
        self._pin = stage_through_host and device.type == "cuda" and torch.cuda.is_available()

    def _host_buffer(self, shape) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32, pin_memory=self._pin)

    def _recv(self, shape, src: int, times: StageTimes) -> torch.Tensor:
        start = time.perf_counter()
        if not self.stage_through_host:
            buf = torch.empty(shape, device=self.device, dtype=torch.float32)
            comm.wait(comm.post(lambda: dist.irecv(buf, src=src), "pipeline receive"), "pipeline receive", peer=src)
        else:
            host = self._host_buffer(shape)
            comm.wait(comm.post(lambda: dist.irecv(host, src=src), "pipeline receive"), "pipeline receive", peer=src)
            buf = host if self.device.type == "cpu" else host.to(self.device, non_blocking=self._pin)
        times.pipeline_wait += time.perf_counter() - start
        return buf

    def _send(self, tensor: torch.Tensor, dst: int) -> tuple[object, torch.Tensor]:
        """Post a send of ``tensor`` (fp32, contiguous); (work, what must stay alive until it is sent)."""
        comm.before_send(dst)
        if not self.stage_through_host:
            return comm.post(lambda: dist.isend(tensor, dst=dst), "pipeline send"), tensor
        host = self._host_buffer(tensor.shape)
        host.copy_(tensor, non_blocking=self._pin)
        if self._pin:  # gloo reads the host bytes as soon as the send is posted
            torch.cuda.current_stream(self.device).synchronize()
        return comm.post(lambda: dist.isend(host, dst=dst), "pipeline send"), host

    def run(self, num_micro: int, pp: int, stage: int, *, first_input: Callable[[int], torch.Tensor],
            forward_fn: Callable[[int, torch.Tensor], torch.Tensor], times: StageTimes) -> torch.Tensor:
        saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        pending: list[tuple[object, torch.Tensor]] = []  # (work, tensor kept alive until sent)
        loss_sum = torch.zeros((), device=self.device)
        for kind, i in one_f_one_b(num_micro, pp, stage):
            if kind == "F":
                if self.prev_rank is None:
                    x = first_input(i)
                else:
                    x = self._recv(self.hidden_shape(i), self.prev_rank, times).requires_grad_()
                start, cpu = time.perf_counter(), time.thread_time()
                out = forward_fn(i, x)
                self.sync()
                times.forward += time.perf_counter() - start
                times.compute_cpu += time.thread_time() - cpu
                if self.next_rank is None:
                    loss_sum += out.detach()
                else:
                    pending.append(self._send(out.detach().float().contiguous(), self.next_rank))
                saved[i] = (x, out)
            else:
                x, out = saved.pop(i)
                grad = None if self.next_rank is None else self._recv(self.hidden_shape(i), self.next_rank, times)
                start, cpu = time.perf_counter(), time.thread_time()
                out.backward(grad)
                self.sync()
                times.backward += time.perf_counter() - start
                times.compute_cpu += time.thread_time() - cpu
                if self.prev_rank is not None:
                    pending.append(self._send(x.grad.float().contiguous(), self.prev_rank))
        start = time.perf_counter()
        comm.wait([work for work, _ in pending], "pipeline send")
        times.pipeline_wait += time.perf_counter() - start
        return loss_sum
