"""Outcome-reward advantage estimators: one scalar per response, broadcast over its tokens.

* ``grpo``   (Shao et al. 2024, DeepSeekMath): ``(r - mean_g) / (std_g + eps)``, std unbiased as in
  veRL; a group of one response, or of equal rewards (std 0), gets advantage 0 (so ``eps`` may be 0).
* ``drgrpo`` (Liu et al. 2025, Dr.GRPO): ``r - mean_g`` (no std division: removes the
  question-difficulty bias).
* ``rloo``   (Ahmadian et al. 2024): ``r - mean of the other G-1 rewards = G/(G-1) (r - mean_g)``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from alignreg.registry import Registry

ADVANTAGES: Registry[Callable[..., Tensor]] = Registry("advantage estimator")


def _group_stats(rewards: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, torch.ones_like(rewards))
    mean = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, rewards) / count.clamp(min=1)
    dev = rewards - mean[group]
    var = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, dev**2) / (count - 1).clamp(min=1)
    return mean[group], var.sqrt()[group], count[group]


def _group_spread(rewards: Tensor, group: Tensor) -> Tensor:
    """max - min of each row's group (0 exactly when its rewards are all equal, whatever the rounding
    of the mean)."""
    n_groups = int(group.max()) + 1 if group.numel() else 0
    hi = torch.full((n_groups,), -math.inf, dtype=rewards.dtype).scatter_reduce(0, group, rewards, "amax")
    lo = torch.full((n_groups,), math.inf, dtype=rewards.dtype).scatter_reduce(0, group, rewards, "amin")
    return (hi - lo)[group]


@ADVANTAGES.register("grpo")
def grpo_advantages(rewards: Tensor, group: Tensor, eps: float = 1e-6) -> Tensor:
    mean, std, count = _group_stats(rewards, group)
    adv = (rewards - mean) / (std + eps)
    return torch.where((count > 1) & (_group_spread(rewards, group) > 0), adv, torch.zeros_like(adv))


@ADVANTAGES.register("drgrpo")
def drgrpo_advantages(rewards: Tensor, group: Tensor, eps: float = 1e-6) -> Tensor:
    mean, _, _ = _group_stats(rewards, group)
    return rewards - mean


@ADVANTAGES.register("rloo")
def rloo_advantages(rewards: Tensor, group: Tensor, eps: float = 1e-6) -> Tensor:
    mean, _, count = _group_stats(rewards, group)
    adv = (rewards - mean) * count / (count - 1).clamp(min=1)
    return torch.where(count > 1, adv, torch.zeros_like(adv))


def compute_advantages(name: str, rewards: Tensor, group: Tensor, eps: float = 1e-6) -> Tensor:
    return ADVANTAGES.get(name)(rewards.double(), group, eps).to(rewards.dtype)
