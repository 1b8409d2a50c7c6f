"""The layout math, once: how a job's global batch is split over data-parallel
ranks, how its layers are split over pipeline stages, and how a plan record is
put together. Pure and torch-free; the controller (on submit and on every
re-plan), the trainer, ``tenax train-local`` and the benchmarks all use it.

Pipeline stages are balanced by cost: the first stage also runs the embedding
and the last stage the final norm and the vocabulary head, so a count-only
split would overload the ends when the vocabulary is large. Costs are forward
FLOPs per token; backward is a constant multiple of forward for every part, so
it does not change the balance.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections import defaultdict
from fractions import Fraction
from typing import Any, Mapping, Sequence

from protos.plan import Plan, WorkerAssignment


def block_cost(d_model: int, seq_len: int) -> float:
    """FLOPs per token of one transformer block (QKV/proj/MLP matmuls + attention)."""
    return 24.0 * d_model * d_model + 4.0 * seq_len * d_model


def llama_block_cost(d_model: int, seq_len: int, *, heads: int, kv_heads: int, ffn_dim: int) -> float:
    """FLOPs per token of one Llama block: q/o, the narrower k/v of grouped-query attention,
    the three SwiGLU matmuls, and attention."""
    kv_dim = d_model // heads * kv_heads
    return 2.0 * (2 * d_model * d_model + 2 * d_model * kv_dim + 3 * d_model * ffn_dim) + 4.0 * seq_len * d_model


def head_cost(d_model: int, vocab_size: int) -> float:
    """FLOPs per token of the final projection onto the vocabulary (+ softmax)."""
    return 2.0 * d_model * vocab_size + 5.0 * vocab_size


def embedding_cost(d_model: int) -> float:
    """FLOPs per token of the token + position embedding lookup and add."""
    return 2.0 * d_model


def balance_layers(
    layer_costs: Sequence[float], pp: int, *, first_extra: float = 0.0, last_extra: float = 0.0
) -> tuple[int, ...]:
    """Contiguous split of the layers into ``pp`` non-empty stages minimising the
    most expensive stage; returns the pp+1 boundaries (stage s owns [p[s], p[s+1])).

    Exact dynamic programme over O(pp * layers^2) candidate cuts, vectorised per stage
    (numpy) so that the largest spec allowed (common/spec.py SPEC_UPPER_BOUNDS: 256
    layers, 64 stages) takes milliseconds: the controller runs this on submit and on
    every re-plan. Ties go to the split that puts layers earlier, so the result is
    deterministic.
    """
    import numpy as np  # here: only plan-making callers pay for the import

    n = len(layer_costs)
    if pp < 1:
        raise ValueError(f"pp must be >= 1, got {pp}")
    if pp > n:
        raise ValueError(f"pp={pp} stages cannot each own a layer of {n} layers")
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + float(c))
    pre = np.array(prefix, dtype=np.float64)

    # best_max[i], best_sq[i]: (max stage cost, sum of squared stage costs) of placing the
    # first i layers on the stages so far, compared lexicographically. The squared sum
    # breaks ties towards even stages when one stage (say a huge head) dominates the
    # maximum anyway.
    inf = float("inf")
    best_max = np.full(n + 1, inf)
    best_sq = np.full(n + 1, inf)
    best_max[0] = best_sq[0] = 0.0
    cuts = []
    for s in range(1, pp + 1):
        lo_i, hi_i = s, n - (pp - s)  # the stage ends at layer i in [lo_i, hi_i]
        ii = np.arange(lo_i, hi_i + 1)
        jj = np.arange(s - 1, hi_i)  # and starts at layer j < i
        cost = pre[ii][None, :] - pre[jj][:, None]
        if s == 1:
            cost = cost + first_extra
        if s == pp:
            cost = cost + last_extra
        valid = jj[:, None] < ii[None, :]
        value_max = np.where(valid, np.maximum(best_max[jj][:, None], cost), inf)
        value_sq = np.where(valid, best_sq[jj][:, None] + cost * cost, inf)
        lowest = value_max.min(axis=0)
        pick = np.where(value_max == lowest[None, :], value_sq, inf).argmin(axis=0)  # first j on ties
        new_max = np.full(n + 1, inf)
        new_sq = np.full(n + 1, inf)
        cut = np.zeros(n + 1, dtype=np.int64)
        cols = np.arange(len(ii))
        new_max[ii] = value_max[pick, cols]
        new_sq[ii] = value_sq[pick, cols]
        cut[ii] = jj[pick]
        best_max, best_sq = new_max, new_sq
        cuts.append(cut)
    bounds = [n]
    for s in range(pp, 0, -1):
        bounds.append(int(cuts[s - 1][bounds[-1]]))
    return tuple(reversed(bounds))


@functools.lru_cache(maxsize=1024)
def partition_for_model(*, layers: int, d_model: int, seq_len: int, vocab_size: int, pp: int) -> tuple[int, ...]:
    """Cost-balanced boundaries for a GPT with these dimensions (see ModelSpec); remembered,
    so the controller's reconcile loop never recomputes a partition it has made before."""
    return balance_layers(
        [block_cost(d_model, seq_len)] * layers,
        pp,
        first_extra=embedding_cost(d_model),
        last_extra=head_cost(d_model, vocab_size),
    )


def partition_for_spec(model_spec, pp: int) -> tuple[int, ...]:
    """Cost-balanced boundaries for a ``common.spec.ModelSpec`` over ``pp`` stages."""
    m = model_spec
    if m.arch == "llama":
        block = llama_block_cost(m.d_model, m.seq_len, heads=m.heads, kv_heads=m.n_kv_heads, ffn_dim=m.mlp_dim)
        return balance_layers([block] * m.layers, pp, first_extra=embedding_cost(m.d_model) / 2,
                              last_extra=head_cost(m.d_model, m.vocab_size) + 4.0 * m.d_model)
    return partition_for_model(
        layers=model_spec.layers,
        d_model=model_spec.d_model,
        seq_len=model_spec.seq_len,
        vocab_size=model_spec.vocab_size,
        pp=pp,
    )


def even_shares(total: int, parts: int) -> tuple[int, ...]:
    """Split ``total`` into ``parts`` near-equal positive shares; the first parts take the
    remainder. The default sample shares of a plan (the global batch over dp ranks)."""
    if parts < 1 or total < parts:
        raise ValueError(f"cannot split {total} into {parts} positive shares")
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def equal_partition(layers: int, pp: int) -> tuple[int, ...]:
    """pp+1 boundaries giving each stage a contiguous, near-equal count of layers."""
    bounds = [0]
    for size in even_shares(layers, pp):
        bounds.append(bounds[-1] + size)
    return tuple(bounds)


STORE_SECRET_BYTES = 16
"""Random bytes (128 bits) in each generation's store prefix: see ``store_prefix``."""


def new_store_secret() -> str:
    """A fresh, unguessable component of one generation's store prefix (hex)."""
    return secrets.token_hex(STORE_SECRET_BYTES)


def store_prefix(job_id: str, generation: int, secret: str) -> str:
    """The rendezvous key prefix of one generation: a new generation never reads stale keys, and
    ``secret`` (``new_store_secret``) makes the keys unguessable. The agents' TCPStore has no
    authentication and no key listing, so a client that reaches its port but never read the
    plan (in etcd, or the workers' plan file) cannot name, read or overwrite the job's keys."""
    return f"{job_id}/g{generation}/{secret}/"


def public_store_prefix(prefix: str) -> str:
    """``prefix`` without its secret (``job/gN/``), for what API viewers and logs may see."""
    parts = prefix.split("/")
    return "/".join(parts[:2]) + "/" if len(parts) > 3 else prefix


def grid_workers(placement: Sequence[tuple[str, int]], pp: int) -> tuple[WorkerAssignment, ...]:
    """Workers of a plan from (node, slot) per rank: ranks are dp-major, rank = dp_rank*pp + pp_rank."""
    return tuple(WorkerAssignment(rank=rank, node=node, slot=slot, dp_rank=rank // pp, pp_rank=rank % pp)
                 for rank, (node, slot) in enumerate(placement))


def new_plan(*, job_id: str, generation: int, placement: Sequence[tuple[str, int]], dp: int, pp: int,
             zero_stage: int, layer_partition: Sequence[int], global_batch_size: int, store_address: str,
             sample_shares: Sequence[int] | None = None, switch_at_step: int = -1, reason: str = "",
             extra: dict[str, Any] | None = None, store_secret: str | None = None) -> Plan:
    """The one plan constructor (submit, re-plan, growth, drain, rebalance): checked before
    it is returned, so nothing writes a plan that ``Plan.check`` would refuse.

    ``placement`` is (node, slot) per new rank; ``sample_shares`` defaults to the even split
    of the global batch; ``store_secret`` to a fresh ``new_store_secret()`` (every generation
    of every job gets its own; tests pass one to compare plans).
    """
    plan = Plan(
        job_id=job_id,
        generation=generation,
        workers=grid_workers(placement, pp),
        dp=dp,
        pp=pp,
        zero_stage=zero_stage,
        layer_partition=tuple(int(b) for b in layer_partition),
        sample_shares=tuple(sample_shares) if sample_shares is not None else even_shares(global_batch_size, dp),
        store_address=store_address,
        store_prefix=store_prefix(job_id, generation, new_store_secret() if store_secret is None else store_secret),
        switch_at_step=switch_at_step,
        reason=reason,
        extra=dict(extra or {}),
    )
    plan.check()
    return plan


# ------------------------------------------------------------------ memory and throughput estimates
PARAM_BYTES = 4
"""fp32 parameters (bf16 autocast computes in bf16 but keeps fp32 weights)."""
GRAD_BYTES = 4
"""fp32 gradients."""
ADAM_BYTES = 8
"""AdamW's two fp32 moments."""


def block_params(d_model: int) -> int:
    """Parameters of one transformer block (trainer/model.py Block: two LayerNorms, QKV, output
    projection, 4x MLP, with biases)."""
    return 12 * d_model * d_model + 13 * d_model


def stage_params(model_spec, partition: Sequence[int], stage: int) -> int:
    """Parameters of pipeline stage ``stage`` of ``partition`` (the first also holds the token
    and position embeddings, the last the final LayerNorm and the untied head)."""
    m = model_spec
    n = block_params(m.d_model) * (partition[stage + 1] - partition[stage])
    if stage == 0:
        n += (m.vocab_size + m.seq_len) * m.d_model
    if stage == len(partition) - 2:
        n += 2 * m.d_model + m.vocab_size * m.d_model
    return n


def stage_memory_bytes(model_spec, partition: Sequence[int], *, zero_stage: int, dp: int) -> int:
    """Estimated bytes of model state on the fullest worker of a layout: its stage's parameters,
    gradients and AdamW moments, the moments sharded over the dp ranks from ZeRO stage 1 on and
    the gradients too from stage 2. Activations are left out (they depend on the micro-batch,
    which no layout changes). Torch-free: the controller compares layouts with it."""
    grad = GRAD_BYTES / dp if zero_stage >= 2 else GRAD_BYTES
    adam = ADAM_BYTES / dp if zero_stage >= 1 else ADAM_BYTES
    per_param = PARAM_BYTES + grad + adam
    return max(math.ceil(stage_params(model_spec, partition, s) * per_param) for s in range(len(partition) - 1))


def pipeline_bubble(*, micro_batches: float, pp: int) -> float:
    """Idle fraction of a pipeline of ``pp`` stages over ``micro_batches`` micro-batches per step:
    (pp-1) / (m+pp-1)."""
    return (pp - 1) / (micro_batches + pp - 1)


def expected_throughput(*, global_batch_size: int, micro_batch_size: int, dp: int, pp: int) -> Fraction:
    """Samples per unit of time of a dp x pp layout, the unit being one sample's forward and
    backward through the whole model on one worker (exact, so ties compare equal).

    A step takes as long as the dp rank with the largest share (``ceil(gbs/dp)`` samples,
    ``m`` = share / micro_batch micro-batches, the last one possibly short) needs to push them
    through ``pp`` stages of 1/pp of the model each: ``(m + pp - 1)`` micro-batch slots of
    ``micro_batch/pp``. Equivalently: dp*pp workers x (1 - bubble) x (mean share / largest share).
    """
    share = -(-global_batch_size // dp)
    return Fraction(global_batch_size * pp, share + (pp - 1) * micro_batch_size)


# ------------------------------------------------------------------ snapshot replication
def buddy_ring(nodes_by_rank: Mapping[int, str]) -> dict[int, int]:
    """{rank: buddy rank}: a permutation where, whenever possible, a rank's buddy
    lives on another node. Ranks are ordered by node and shifted by the size of
    the biggest node, so every rank also receives exactly one replica."""
    order = sorted(nodes_by_rank, key=lambda r: (nodes_by_rank[r], r))
    n = len(order)
    if n < 2:
        return {}
    counts: dict[str, int] = defaultdict(int)
    for r in order:
        counts[nodes_by_rank[r]] += 1
    shift = max(counts.values())
    if shift >= n:  # a single node: no off-node copy exists; still keep a copy elsewhere in memory
        shift = 1
    return {order[i]: order[(i + shift) % n] for i in range(n)}


def ranks_replicated_on_their_node(nodes_by_rank: Mapping[int, str]) -> list[int] | None:
    """Ranks whose ``buddy_ring`` replica sits on their own node (sorted); None: there is no
    ring at all (a single worker keeps no second copy). The loss of one node loses no state
    in memory exactly when this is ``[]``."""
    ring = buddy_ring(nodes_by_rank)
    if not ring:
        return None
    return sorted(r for r, buddy in ring.items() if nodes_by_rank[r] == nodes_by_rank[buddy])
