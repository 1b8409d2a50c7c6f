"""The per-rank trainer: one pipeline stage, one ZeRO shard, one step at a time.

``Trainer`` is built from a JobSpec, a ParallelLayout and this rank, inside an
initialised default process group whose ranks are the layout's ranks. The
model is parallelised by small ``apply_*`` steps in a fixed order (see
``__init__``). A step is:

  1. 1F1B over this dp rank's micro-batches (loss already divided by the
     GLOBAL token count, so summing gradients over dp ranks gives the global
     mean gradient however the samples were split);
  2. gradient sync in the stage's dp group: all-reduce (zero 0/1) or
     reduce-scatter (zero 2);
  3. one world all-reduce of [squared norm of the owned chunk, loss]: the true
     global gradient norm over all stages and shards, and the global loss;
  4. clip, AdamW on the owned range, all-gather the parameters (zero 1/2).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import resource
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer import comm
from trainer.checkpointing import apply_activation_checkpointing
from trainer.data import StepSampler, TokenFile, build_dataset
from trainer.dropout import DropoutContext
from trainer.model import build_stage, init_parameters
from trainer.optim import FlatStage, ShardedAdamW, lr_at
from trainer.parallel import ParallelLayout
from trainer.schedule import PipelineStageRunner, StageTimes
from trainer.settings import WorkerSettings
from trainer.sharding import update_range
from trainer.telemetry import StepTelemetry, TelemetrySettings
from trainer.zero2 import ShardedGradReducer


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm in fp32, one read of ``t`` (``pow(2).sum()`` writes and re-reads a
    temporary as large as the gradient: ~2 ms a step at 1.35B parameters on an H100)."""
    return torch.linalg.vector_norm(t, dtype=torch.float32).square()


def _all_gather_into(output: torch.Tensor, chunk: torch.Tensor, group) -> None:
    # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    comm.wait(gather(output, chunk, group=group, async_op=True), "parameter all-gather")


RECENT_STEP_LINES = 256
"""Step lines a MetricsWriter keeps in memory (``recent``): the metrics rank's go with each disk
checkpoint, so a restore from it can re-send the ones its agent may never have relayed."""
STEP_LINE_FIELDS = ("step", "loss", "tokens", "step_time", "generation", "rank", "dp_rank", "pp_rank", "layout",
                    "time", "eval_loss", "eval_perplexity")
"""What of a step line is kept in ``recent`` (what the job's metrics take, agent/progress.py)."""


class MetricsWriter:
    """Appends one flushed JSON line per step (one write() on an O_APPEND fd,
    so ranks sharing a file never interleave within a line)."""

    def __init__(self, path: str | None):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if path else None
        self.recent: collections.deque[dict] = collections.deque(maxlen=RECENT_STEP_LINES)
        """The newest step lines written (``STEP_LINE_FIELDS`` of each), oldest first."""

    def write(self, record: dict) -> None:
        if "step" in record and "loss" in record and "event" not in record and not record.get("replayed"):
            self.recent.append({k: record[k] for k in STEP_LINE_FIELDS if k in record})
        if self.fd is not None:
            os.write(self.fd, (json.dumps(record, sort_keys=True) + "\n").encode())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def should_compile(device: torch.device, mode: str | None = None) -> bool:
    """``mode`` (``TENAX_COMPILE``: auto, 0 or 1; None: from the environment): compile on CUDA
    only (auto), always (1) or never (0)."""
    mode = WorkerSettings.from_env().compile if mode is None else mode
    return mode == "1" or (mode == "auto" and device.type == "cuda")


def pick_device(spec) -> torch.device:
    if spec.resources.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("resources.device is 'cuda' but no CUDA device is visible")
        torch.cuda.set_device(0)  # the agent sets CUDA_VISIBLE_DEVICES to this worker's slot
        return torch.device("cuda", 0)
    return torch.device("cpu")


CUDA_BACKEND = "cpu:gloo,cuda:nccl"
"""The default group of a CUDA job: one backend per device type."""


def backend_for(device: torch.device, forced: str | None = None) -> str:
    """NCCL on CUDA, gloo on CPU. ``forced`` (``TENAX_BACKEND``; None: from the environment,
    '' = by device) ``gloo`` forces gloo with CUDA tensors: several ranks on one GPU (benchmarks
    on a single-GPU machine; NCCL refuses a duplicate GPU)."""
    forced = WorkerSettings.from_env().backend if forced is None else forced
    if forced == "gloo" or device.type != "cuda":
        return "gloo"
    # NCCL carries the CUDA tensors; gloo the few small CPU collectives of the elastic runtime
    # (JSON gathers of inventories and measured times): a pure NCCL group refuses CPU tensors.
    return CUDA_BACKEND


def stages_p2p_through_host(mode: str, device: torch.device) -> bool:
    """Pipeline sends through host buffers? ``1``/``0`` force it; ``auto``: gloo with CUDA tensors
    (gloo has no CUDA send/recv: several pipeline ranks on one GPU)."""
    if mode in ("0", "1"):
        return mode == "1"
    return device.type == "cuda" and dist.is_initialized() and dist.get_backend() == "gloo"


def init_process_group(*, store, rank: int, world_size: int, device: torch.device, timeout_s: float,
                       backend: str | None = None) -> None:
    """Join the default group of a layout over ``store`` (already prefixed per generation);
    ``backend``: see ``backend_for``."""
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(
        backend_for(device, backend), store=store, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s), **kwargs,
    )


class Trainer:
    """One rank of a layout: its stage, its ZeRO shard, and ``train_step``.

    Call inside an initialised default process group whose ranks are exactly the
    layout's (``init_process_group``). ``step`` counts committed steps;
    ``state_views``/``export_state``/``import_state`` hand the owned state over.
    """

    def __init__(self, spec, layout: ParallelLayout, rank: int, *, device: torch.device,
                 generation: int = 1, metrics: MetricsWriter | None = None,
                 settings: WorkerSettings | None = None, init: bool = True):
        self.spec, self.layout, self.rank, self.device = spec, layout, rank, device
        self.settings = WorkerSettings.from_env() if settings is None else settings
        """The launch environment (compile, telemetry); None: this process's environment."""
        self.generation, self.metrics = generation, metrics or MetricsWriter(None)
        self.dp_rank, self.pp_rank = layout.coords(rank)
        self.is_first, self.is_last = self.pp_rank == 0, self.pp_rank == layout.pp - 1
        self.global_tokens = spec.global_batch_size * spec.model.seq_len
        self.sampler = StepSampler(build_dataset(spec), global_batch_size=spec.global_batch_size, seed=spec.seed)
        self.eval_set = self.build_eval_set()
        # Parallelisation, in this order (each step relies on the previous):
        self.stage = self.apply_pipeline_split()  # 1. this stage's blocks only, global names, on meta (no memory)
        self.flat = self.apply_flat_buffers()     # 2. materialise params (and grads) as views of flat padded buffers
        if init:  # a recovering rank skips it: its state is restored over it (seconds at 1B+)
            self.apply_init()                     # 3. layout-independent init keyed by (seed, name), in place
        self.dp_group = self.apply_dp_groups()    # 4. one group per stage's replicas (ZeRO group)
        self.tied = self.apply_tied_embeddings()  # 4b. llama tie_embeddings: head/embedding gradient sum
        self.optimizer = self.apply_zero()        # 5. optimizer state on this rank's range only
        self.reducer = self.apply_zero2_grads()   # 6. zero 2: gradients reduced to their owners in buckets
        self.autocast = self.apply_autocast()     # 7. bf16 autocast on CUDA (fp32 master/state)
        apply_activation_checkpointing(self.stage, spec.model.activation_checkpointing)  # 8. before compiling
        self.apply_compile()                      # 9. last: compile the blocks as they will run
        self.runner = PipelineStageRunner(
            prev_rank=None if self.is_first else layout.rank_of(self.dp_rank, self.pp_rank - 1),
            next_rank=None if self.is_last else layout.rank_of(self.dp_rank, self.pp_rank + 1),
            hidden_shape=self._hidden_shape,
            device=device,
            stage_through_host=stages_p2p_through_host(self.settings.p2p_staging, device),
        )
        self.step = 0  # steps completed (committed)
        self.telemetry = StepTelemetry(device_type=device.type, rank=rank, write=self.metrics.write,
                                       settings=TelemetrySettings.from_worker(self.settings))
        comm.set_device_timing(device.type == "cuda")  # communication times from CUDA events (trainer/comm.py)
        self.before_update = None
        """Called right before the optimizer mutates the owned state (an in-flight
        snapshot copy must be fenced off first: trainer.elastic)."""
        self.vote = None
        """Optional () -> number each rank adds to the step's totals all-reduce; ``votes`` is
        then the sum over all ranks, the same on every rank (trainer.elastic: is any rank's
        replication round still moving, so every rank skips the same boundary)."""
        self.votes = 0.0

    bucket_numel = 1 << 20
    """Gradient reduction piece (fp32 elements) of ZeRO-2, and of ZeRO-1 over gloo:
    bounds the transient memory of the reduction."""

    # ------------------------------------------------------------ apply_*
    def apply_pipeline_split(self):
        stage = build_stage(
            self.spec.model, layers=self.layout.stage_layers(self.pp_rank),
            is_first=self.is_first, is_last=self.is_last, device="meta",
        )
        return stage.train()

    def apply_init(self) -> None:
        if self.spec.model.init_from:  # this stage's tensors of a Hugging Face checkpoint (trainer.hf)
            from trainer.hf import load_stage

            load_stage(self.stage, self.spec.model, self.spec.model.init_from)
            return
        init_parameters(self.stage, seed=self.spec.seed, layers=self.spec.model.layers)

    def apply_tied_embeddings(self):
        if not self.spec.model.tie_embeddings:
            return None
        from trainer.llama import TiedEmbeddings

        group = TiedEmbeddings.new_groups(self.layout, self.dp_rank)  # collective: every rank, same order
        return TiedEmbeddings(self.flat, is_first=self.is_first, is_last=self.is_last, group=group)

    @property
    def shards_gradients(self) -> bool:
        return self.layout.zero_stage == 2 and self.layout.dp > 1

    def apply_flat_buffers(self) -> FlatStage:
        # to_empty only reserves memory; FlatStage then moves every parameter into
        # one flat buffer, so the weights are never held twice.
        self.stage.to_empty(device=self.device)
        return FlatStage(self.stage, dp=self.layout.dp, device=self.device, grad_buffer=not self.shards_gradients)

    def apply_dp_groups(self):
        # new_group is collective over the whole world: every rank creates every
        # stage's group, in the same order, and keeps its own.
        mine = None
        for pp_rank in range(self.layout.pp):
            ranks = self.layout.dp_group_ranks(pp_rank)
            group = dist.new_group(ranks) if self.layout.dp > 1 else None
            if pp_rank == self.pp_rank:
                mine = group
        return mine

    def apply_zero(self) -> ShardedAdamW:
        lo, hi = update_range(self.flat.numel, self.layout, self.dp_rank)
        return ShardedAdamW(self.flat, lo, hi, self.spec.optimizer)

    def apply_zero2_grads(self) -> ShardedGradReducer | None:
        if not self.shards_gradients:
            return None
        return ShardedGradReducer(
            self.flat, self.stage, lo=self.optimizer.lo, hi=self.optimizer.hi,
            dp_ranks=self.layout.dp_group_ranks(self.pp_rank), chunk=self.flat.padded // self.layout.dp,
            group=self.dp_group, bucket_numel=self.bucket_numel,
        )

    def apply_autocast(self):
        if self.device.type == "cuda":
            return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext

    def apply_compile(self) -> None:
        """torch.compile each block (fuses LayerNorm/GELU/residual kernels) when TENAX_COMPILE
        says so: ``auto`` (default) compiles on CUDA only, ``1`` always, ``0`` never."""
        if should_compile(self.device, self.settings.compile):
            for block in self.stage.blocks.values():
                block.compile()

    # ------------------------------------------------------------ the step
    def _hidden_shape(self, i: int) -> tuple[int, int, int]:
        lo, hi = self._micro[i]
        return (hi - lo, self.spec.model.seq_len, self.spec.model.d_model)

    def _forward(self, step: int, i: int, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._micro[i]
        self.stage.set_dropout_context(DropoutContext(seed=self.spec.seed, step=step, positions=list(range(lo, hi))))
        with self.autocast():
            out = self.stage(x)
        if not self.is_last:
            return out
        targets = self._tokens[lo - self._start : hi - self._start, 1:].to(self.device)
        loss = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), targets.reshape(-1), reduction="sum")
        return loss / self.global_tokens

    def _first_input(self, i: int) -> torch.Tensor:
        lo, hi = self._micro[i]
        return self._tokens[lo - self._start : hi - self._start, :-1].to(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self) -> dict:
        with self.telemetry.step(self.step):  # heartbeat phases, CUDA events, error events
            return self._train_step()

    def _train_step(self) -> dict:
        step, layout, spec = self.step, self.layout, self.spec
        t_start = time.perf_counter()
        times = StageTimes()
        self._micro = layout.micro_batches(self.dp_rank)
        self._start, end = layout.sample_range(self.dp_rank)
        self.telemetry.data_started()
        self._tokens = (
            self.sampler.batch_tokens(step, range(self._start, end)) if (self.is_first or self.is_last) else None
        )
        self.telemetry.data_done()
        if self.reducer is not None:
            self.reducer.zero_grad()
        else:
            self.flat.zero_grad()
        loss_sum = self.runner.run(
            len(self._micro), layout.pp, self.pp_rank,
            first_input=self._first_input, forward_fn=lambda i, x: self._forward(step, i, x), times=times,
        )

        chaos_extra = self.telemetry.apply_slowdown(times.forward + times.backward)  # chaos slow
        times.backward += chaos_extra
        self.telemetry.mark("collective")
        t0 = time.perf_counter()
        if self.reducer is not None:  # reductions ran inside backward: book them as collective time
            times.backward -= self.reducer.comm_seconds
            t0 -= self.reducer.comm_seconds
        if self.tied is not None:
            self.tied.sum_gradients()
        grad = self._sync_gradients()
        chunk_lo, chunk_hi = layout.shard_range(self.flat.numel, self.dp_rank)
        norm_part = self._norm_part(grad, chunk_lo, chunk_hi)
        parts = [norm_part, loss_sum.float() if self.is_last else torch.zeros((), device=self.device)]
        if self.vote is not None:  # rides on this all-reduce: no collective of its own
            parts.append(torch.full((), float(self.vote()), device=self.device))  # a fill, no host copy
        totals = torch.stack(parts)
        comm.wait(dist.all_reduce(totals, async_op=True), "step totals all-reduce")
        # one device-to-host copy for all of them (the norm's sqrt stays on the device, as before)
        sums = torch.cat([totals[:1].sqrt(), totals[1:]]).tolist()
        grad_norm, loss = sums[0], sums[1]
        self.votes = sums[2] if self.vote is not None else 0.0
        collective = time.perf_counter() - t0

        self.telemetry.mark("optimizer")
        t0 = time.perf_counter()
        clip = spec.optimizer.grad_clip
        scale = min(1.0, clip / (grad_norm + 1e-6)) if clip > 0 else 1.0
        if scale < 1.0:
            grad.mul_(scale)
        lr = lr_at(step, spec.optimizer, spec.steps)
        if self.before_update is not None:
            self.before_update()
        self.optimizer.step(grad, lr)
        self._sync()
        optimizer_time = time.perf_counter() - t0

        self.telemetry.mark("collective")
        t0 = time.perf_counter()
        self._gather_params()
        collective += time.perf_counter() - t0
        evaluation = self.evaluate_held_out() if self.eval_due(step + 1) else {}

        self.step += 1
        record = {
            "step": self.step, "loss": loss, "tokens": self.global_tokens,
            "rank_tokens": (end - self._start) * spec.model.seq_len,
            "step_time": time.perf_counter() - t_start, "forward_time": times.forward,
            "backward_time": times.backward, "pipeline_wait_time": times.pipeline_wait,
            "collective_time": collective, "optimizer_time": optimizer_time,
            "grad_norm": grad_norm, "lr": lr, "generation": self.generation,
            "rank": self.rank, "dp_rank": self.dp_rank, "pp_rank": self.pp_rank, "layout": layout.describe(),
            "params_held": self.flat.numel, "optimizer_state_bytes": self.optimizer.state_bytes,
            "state_bytes_held": self.state_bytes_held(), "peak_memory_bytes": peak_memory_bytes(self.device),
            "time": time.time(),
        }
        if self.runner.stage_through_host:
            record["p2p_staging"] = True
        record.update(self.telemetry.fields(forward_s=times.forward, backward_s=times.backward))
        record["comm"] = comm.drain()  # per-kind and per-peer wait seconds of this step (issue #20)
        record.update(evaluation)
        if self.device.type == "cpu" and "compute_time" in record:
            # CPU: the time the OS ran the compute, plus the chaos slowdown; a host busy with
            # other work is not a slow rank (on CUDA, the events measure the device already)
            record["compute_time"] = times.compute_cpu + chaos_extra
        self.metrics.write(record)
        return record

    # ------------------------------------------------------------ evaluation
    def build_eval_set(self) -> TokenFile | None:
        d, m = self.spec.data, self.spec.model
        if not d.eval_every:
            return None
        return TokenFile(d.eval_path, dtype=d.dtype, seq_len=m.seq_len, vocab_size=m.vocab_size)

    def eval_due(self, step: int) -> bool:
        """Evaluate after committed step ``step`` (every ``data.eval_every``, and after the last)."""
        every = self.spec.data.eval_every
        return bool(every) and (step % every == 0 or step == self.spec.steps)

    def eval_tokens(self, batch: int) -> torch.Tensor:
        """[B, seq_len+1] tokens of held-out global batch ``batch``: the file's windows in order."""
        n, size = len(self.eval_set), self.spec.global_batch_size
        return torch.stack([self.eval_set.sample((batch * size + p) % n) for p in range(size)])

    def evaluate_held_out(self) -> dict:
        """{"eval_loss", "eval_perplexity", "eval_time"} over ``data.eval_batches`` held-out batches."""
        t0 = time.perf_counter()
        ends = self.is_first or self.is_last
        losses = [self.evaluate_batch(self.eval_tokens(j) if ends else None) for j in range(self.spec.data.eval_batches)]
        loss = sum(losses) / len(losses)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)),
                "eval_time": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate_batch(self, tokens: torch.Tensor | None) -> float:
        """Mean next-token loss of a global batch [B, seq_len+1] under the current weights, no
        dropout, in this layout (forward-only pipeline; tokens are needed on the first and last
        stage only). Collective: every rank calls it and gets the same value."""
        was_training = self.stage.training
        self.stage.eval()
        loss = torch.zeros((), device=self.device)
        pending = []
        prev = None if self.is_first else self.layout.rank_of(self.dp_rank, self.pp_rank - 1)
        nxt = None if self.is_last else self.layout.rank_of(self.dp_rank, self.pp_rank + 1)
        try:
            for lo, hi in self.layout.micro_batches(self.dp_rank):
                if prev is None:
                    x = tokens[lo:hi, :-1].to(self.device)
                else:
                    x = torch.empty((hi - lo, self.spec.model.seq_len, self.spec.model.d_model), device=self.device)
                    comm.wait(comm.post(lambda: dist.irecv(x, src=prev), "evaluation pipeline receive"),
                              "evaluation pipeline receive")
                with self.autocast():
                    out = self.stage(x)
                if nxt is None:
                    targets = tokens[lo:hi, 1:].to(self.device)
                    loss += F.cross_entropy(out.float().reshape(-1, out.shape[-1]), targets.reshape(-1), reduction="sum")
                else:
                    sent = out.float().contiguous()
                    pending.append((comm.post(lambda: dist.isend(sent, dst=nxt), "evaluation pipeline send"), sent))
            comm.wait([work for work, _ in pending], "evaluation pipeline send")
        finally:
            self.stage.train(was_training)
        comm.wait(dist.all_reduce(loss, async_op=True), "evaluation loss all-reduce")
        return loss.item() / self.global_tokens

    def state_bytes_held(self) -> int:
        """Training state this rank keeps between steps: params, gradients, optimizer (bytes)."""
        grads = self.flat.grads.numel() + (self.reducer.shard.numel() if self.reducer is not None else 0)
        return 4 * (self.flat.params.numel() + grads) + self.optimizer.state_bytes

    def _sync_gradients(self) -> torch.Tensor:
        """Sum gradients over the dp group; return the gradient of the update range."""
        lo, hi = self.optimizer.lo, self.optimizer.hi
        if self.layout.dp == 1:
            return self.flat.grads[lo:hi]
        if self.reducer is not None:
            most = max(len(self.layout.micro_batches(d)) for d in range(self.layout.dp))
            return self.reducer.finish(most - len(self._micro))
        if self.layout.zero_stage == 1:
            # Only the owned chunk is needed: reduce-scatter + the later all-gather of
            # parameters move as many bytes as one all-reduce.
            if self.device.type == "cuda":
                shard = torch.empty(self.flat.padded // self.layout.dp, device=self.device)
                comm.wait(dist.reduce_scatter_tensor(shard, self.flat.grads, group=self.dp_group, async_op=True),
                          "gradient reduce-scatter")
                return shard[: hi - lo]
            # gloo's reduce-scatter stages the whole input in a scratch copy; reducing
            # bucket-sized pieces to their owners in place keeps memory flat.
            chunk = self.flat.padded // self.layout.dp
            ranks = self.layout.dp_group_ranks(self.pp_rank)
            for start in range(0, self.flat.padded, self.bucket_numel):
                end = min(start + self.bucket_numel, self.flat.padded)
                for owner in range(start // chunk, (end - 1) // chunk + 1):
                    a, b = max(start, owner * chunk), min(end, (owner + 1) * chunk)
                    comm.wait(dist.reduce(self.flat.grads[a:b], dst=ranks[owner], group=self.dp_group, async_op=True),
                              "gradient reduce")
            return self.flat.grads[lo:hi]
        comm.wait(dist.all_reduce(self.flat.grads, group=self.dp_group, async_op=True), "gradient all-reduce")
        return self.flat.grads[lo:hi]

    def _norm_part(self, grad: torch.Tensor, chunk_lo: int, chunk_hi: int) -> torch.Tensor:
        """Squared norm of this rank's dp chunk only, so the world sum counts every element once."""
        base = self.optimizer.lo
        if self.layout.zero_stage == 0 and self.layout.dp > 1:
            grad, base = grad[chunk_lo:chunk_hi], base + chunk_lo
        span = self.tied.norm_exclusion(base, base + grad.numel()) if self.tied is not None else None
        if span is not None:  # a tied head's gradient is the embedding's: count it once
            return _sq_norm(grad[: span[0]]) + _sq_norm(grad[span[1] :])
        return _sq_norm(grad)

    def _gather_params(self) -> None:
        if self.layout.zero_stage == 0 or self.layout.dp == 1:
            return
        chunk = self.flat.padded // self.layout.dp
        mine = self.flat.params[self.dp_rank * chunk : (self.dp_rank + 1) * chunk].clone()
        _all_gather_into(self.flat.params, mine, self.dp_group)

    # ---------------------------------------------------- elastic hand-over
    def state_views(self) -> dict[str, torch.Tensor]:
        """Live views of the state this rank owns ({"kind/name": flat slice}); see trainer.sharding."""
        return self.optimizer.state_views()

    def export_state(self) -> dict:
        """A copy of this rank's owned state + the committed step (the step to resume at)."""
        state = self.optimizer.export_state()
        state["committed_step"] = self.step
        return state

    def import_state(self, state: dict) -> None:
        """Load owned state exported (or resharded) for this rank, then re-gather the stage's params."""
        self.optimizer.import_state(state)
        self.step = int(state["committed_step"])
        self._gather_params()

    def resume_at(self, step: int) -> None:
        """The owned state was restored in place (into ``state_views()``): resume after ``step``."""
        self.optimizer.steps_taken = self.step = int(step)
        self._gather_params()

    def train(self, steps: int) -> list[dict]:
        return [self.train_step() for _ in range(steps - self.step)]
