"""Pipeline stage balancing: split ``layers`` blocks over ``pp`` stages by cost.

Pure and torch-free: the controller imports it to fill ``Plan.layer_partition``.
The first stage also runs the embedding and the last stage the final LayerNorm
and the vocabulary head, so a count-only split would overload the ends when the
vocabulary is large. Costs are forward FLOPs per token; backward is a constant
multiple of forward for every part, so it does not change the balance.
"""

from __future__ import annotations

from typing import Sequence


def block_cost(d_model: int, seq_len: int) -> float:
    """FLOPs per token of one transformer block (QKV/proj/MLP matmuls + attention)."""
    return 24.0 * d_model * d_model + 4.0 * seq_len * d_model


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

    Exact dynamic programme, O(pp * layers^2): layer counts are small. Ties go to
    the split that puts layers earlier, so the result is deterministic.
    """
    n = len(layer_costs)
    if pp < 1:
        raise ValueError(f"pp must be >= 1, got {pp}")
    if pp > n:
        raise ValueError(f"pp={pp} stages cannot each own a layer of {n} layers")
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + float(c))

    def stage_cost(stage: int, lo: int, hi: int) -> float:
        cost = prefix[hi] - prefix[lo]
        if stage == 0:
            cost += first_extra
        if stage == pp - 1:
            cost += last_extra
        return cost

    # best[s][i]: (max stage cost, sum of squared stage costs) of placing the
    # first i layers on stages 0..s-1. The squared sum breaks ties towards even
    # stages when one stage (say a huge head) dominates the maximum anyway.
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, pp + 1):
        for i in range(s, n - (pp - s) + 1):
            for j in range(s - 1, i):
                cost = stage_cost(s - 1, j, i)
                value = (max(best[s - 1][j][0], cost), best[s - 1][j][1] + cost * cost)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds = [n]
    for s in range(pp, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    return tuple(reversed(bounds))


def partition_for_model(*, layers: int, d_model: int, seq_len: int, vocab_size: int, pp: int) -> tuple[int, ...]:
    """Cost-balanced boundaries for a GPT with these dimensions (see ModelSpec)."""
    return balance_layers(
        [block_cost(d_model, seq_len)] * layers,
        pp,
        first_extra=embedding_cost(d_model),
        last_extra=head_cost(d_model, vocab_size),
    )


def partition_for_spec(model_spec, pp: int) -> tuple[int, ...]:
    """Convenience wrapper taking a ``trainer.config.ModelSpec``."""
    return partition_for_model(
        layers=model_spec.layers,
        d_model=model_spec.d_model,
        seq_len=model_spec.seq_len,
        vocab_size=model_spec.vocab_size,
        pp=pp,
    )
