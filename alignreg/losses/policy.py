"""Policy-gradient surrogate losses (per token, before aggregation).

PPO / GRPO clipped objective with decoupled clip range (``eps_low``, ``eps_high``: DAPO's
clip-higher when ``eps_high > eps_low``) and optional dual-clip (Ye et al. 2020, "Mastering Complex
Control in MOBA Games"): for negative advantages the loss is bounded by ``-A * c``. Dr.GRPO (Liu et
al. 2025, "Understanding R1-Zero-Like Training") uses the same per-token objective; its changes are
in the advantage (no std division: ``algorithm.advantage: drgrpo``) and the aggregation
(``seq-mean-token-sum-norm``: ``algorithm.policy_loss: drgrpo``, which changes only the aggregation).
Dr.GRPO is both settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class PGOutput:
    loss: Tensor  # [B, T] per-token loss (not aggregated)
    metrics: dict[str, Tensor]  # [B, T] float indicators / values to average over the mask


def clipped_pg_loss(
    log_ratio: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float = 0.0,
    unclipped_mask: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
) -> PGOutput:
    """Per-token ``max(-A r, -A clip(r, 1-eps_low, 1+eps_high))`` (+ dual clip for A < 0).

    ``unclipped_mask`` marks tokens whose loss is the plain ``-A r`` (Lp-Reg's regularised tokens),
    with neither clip nor dual-clip (the official Lp-Reg loss has no dual-clip);
    ``is_weights`` multiplies the loss by a detached truncated importance weight (rollout/learner
    mismatch correction).
    """
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).float()
    dual = torch.zeros_like(loss)
    if dual_clip_c > 0:
        bound = -advantages * dual_clip_c
        use_dual = (advantages < 0) & (loss > bound)
        loss = torch.where(use_dual, bound, loss)
        dual = use_dual.float()
    if unclipped_mask is not None:
        loss = torch.where(unclipped_mask, pg1, loss)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    return PGOutput(loss=loss, metrics={"clipfrac": clipped, "dual_clipfrac": dual, "ratio": ratio.detach()})
