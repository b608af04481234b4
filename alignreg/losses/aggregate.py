"""The one loss aggregator. Every term returns per-token values; this reduces them.

All modes are linear sums over rows divided by *global* normalisers of the mini-batch
(:class:`~alignreg.regularizers.base.AggNorm`): the sum of micro-batch contributions equals the
mini-batch loss, so results are invariant to micro-batching, gradient accumulation and
data-parallel sharding (tested in ``tests/test_aggregate.py``).

Modes (veRL's names):
* ``token-mean``               sum_{b,t} m x / sum_{b,t} m
* ``seq-mean-token-mean``      mean_b [ sum_t m x / sum_t m ]   (rows without tokens contribute 0)
* ``seq-mean-token-sum``       mean_b [ sum_t m x ]
* ``seq-mean-token-sum-norm``  mean_b [ sum_t m x / L ]          (L = norm_len: Dr.GRPO's constant)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class AggNorm:
    """Global normalisers of one mini-batch (all micro-batches and data-parallel ranks together).

    Using these (not micro-batch-local counts) makes every linear aggregate invariant to
    micro-batching, gradient accumulation and data-parallel sharding.
    """

    num_tokens: float  # valid response tokens in the mini-batch
    num_seqs: float  # responses in the mini-batch
    norm_len: float  # length divisor for seq-mean-token-sum-norm


AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def local_norm(mask: Tensor, norm_len: Optional[float] = None) -> AggNorm:
    """Normalisers of a single batch (used when the batch *is* the mini-batch)."""
    return AggNorm(
        num_tokens=float(mask.sum()),
        num_seqs=float(mask.shape[0]),
        norm_len=float(norm_len if norm_len is not None else mask.shape[-1]),
    )


def aggregate(values: Tensor, mask: Tensor, mode: str, norm: AggNorm) -> Tensor:
    m = mask.to(values.dtype)
    x = values * m
    if mode == "token-mean":
        return x.sum() / max(norm.num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = x.sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(norm.num_seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return x.sum() / max(norm.num_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return x.sum() / norm.norm_len / max(norm.num_seqs, 1.0)
    raise ValueError(f"unknown aggregation mode {mode!r}; valid: {', '.join(AGG_MODES)}")
