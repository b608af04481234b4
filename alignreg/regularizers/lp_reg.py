"""Lp-Reg: Low-probability Regularization.

Paper: "Low-probability Tokens Sustain Exploration in Reinforcement Learning with Verifiable
Reward" (arXiv 2510.03222); official code CarlanLark/Lp-Reg-dev (``compute_policy_loss_lp_reg``,
``apply_min_p``). Equations as in REGULARIZERS.md §4.1:

* proxy (once per step, from pi_old, no grad): ``keep = P_old >= kappa * max P_old`` on the raw
  logits *before* temperature, filtered logits set to -1e4, then ``/ T`` and log-softmax;
  ``log pi_proxy(y_t)`` of the sampled token.
* among the valid tokens with ``A_t < 0`` (per micro-batch, flattened over B, T):
  ``k = max(1, int(|Neg| * rho))``; only if ``k > 1`` the k tokens with the smallest detached
  ``log pi_theta`` form L, and ``R = {t in L : log pi_theta(t) < log pi_proxy(t)}``.
* on R the PG term is the *unclipped* ``-A r`` and ``beta * KL3_t`` is added, with
  ``KL3 = clamp(exp(lp_proxy - lp) - (lp_proxy - lp) - 1, -10, 10)``; aggregation token-mean over
  all valid tokens.
* the same block with ``rho_pos`` for ``A_t > 0`` (default 0: off, as in the recipes).

Defaults (official recipes, Qwen3-14B): ``min_p=0.02`` (code default 0.1), ``rho=0.01``,
``rho_pos=0``, ``clamp=10``, ``agg=token-mean``; ``beta`` is the term's ``coef`` (recipes: 1).
The recipes also set ``eps_low=1.0, eps_high=9.0`` (``algorithm.*``) and no dual-clip.

Choices / deviations:
* ``scope=micro`` (default) = official: selection within each micro-batch (so it depends on the
  micro-batch size; note the ``k > 1`` guard switches the term off for micro-batches with fewer than
  ``2 / rho`` negative tokens). ``scope=global`` selects over the whole mini-batch (all ranks) with a
  no-grad prepass: tokens whose log-prob is <= the k-th smallest are selected (ties at the
  threshold all included), which makes the term invariant to micro-batching.
* Ties inside a micro-batch are broken by flattened position (stable sort); the official
  ``torch.topk`` leaves the order of equal values unspecified.
* ``algorithm.dual_clip_c > 0`` (not in the recipes): the official ``compute_policy_loss_lp_reg`` has
  no dual-clip at all. Here the other negative-advantage tokens get it, while the regularised tokens
  R keep the official plain ``-A r``, so R also loses the dual-clip bound ``-A c``: with ``c = 3``,
  ``A = -1`` and ``r = 10`` a token outside R costs 3, one in R costs 10 (and its gradient is not
  cut). ``policy/dual_clipfrac`` still counts R's tokens that the bound would have hit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from alignreg.regularizers.base import (
    REGULARIZERS,
    LossContext,
    Regularizer,
    StatRequest,
    StepView,
    TermOutput,
    as_bool,
    k3,
)


@dataclass
class LpRegParams:
    min_p: float = 0.02  # kappa: min-p threshold of the proxy (relative to the top probability)
    rho: float = 0.01  # fraction of negative-advantage tokens (lowest probability) considered
    rho_pos: float = 0.0  # same for positive-advantage tokens (0 = off)
    clamp: float = 10.0  # clamp of the k3 KL value
    scope: Literal["micro", "global"] = "micro"  # selection scope (see docstring)
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"  # aggregation of the KL term

    def validate(self, path: str) -> None:
        from alignreg.config import ConfigError

        if not 0 < self.min_p <= 1 or not 0 <= self.rho <= 1 or not 0 <= self.rho_pos <= 1:
            raise ConfigError(f"{path}: need 0 < min_p <= 1 and 0 <= rho, rho_pos <= 1")


def lowest_k(values: Tensor, cand: Tensor, rho: float) -> Tensor:
    """Official micro-batch selection: the k = max(1, int(n * rho)) candidates with the smallest
    values, but only when k > 1 (k == 1 selects nothing). Stable order breaks ties."""
    sel = torch.zeros_like(cand)
    n = int(cand.sum())
    k = max(1, int(n * rho))
    if rho <= 0 or k <= 1:
        return sel
    flat_idx = cand.reshape(-1).nonzero().squeeze(-1)
    order = torch.sort(values.reshape(-1)[flat_idx], stable=True).indices[:k]
    sel.view(-1)[flat_idx[order]] = True
    return sel


def lowest_k_threshold(values: Tensor, rho: float, all_gather_cat) -> float | None:
    """Global selection: value of the k-th smallest over all ranks (None if k <= 1)."""
    allv = all_gather_cat(values.reshape(-1))
    k = max(1, int(allv.numel() * rho))
    if rho <= 0 or k <= 1:
        return None
    return float(torch.sort(allv).values[k - 1])


@REGULARIZERS.register("lp_reg")
class LpReg(Regularizer):
    Params = LpRegParams
    kind = ("token_loss",)

    def needs(self):
        return [StatRequest("old_min_p_logprobs", (("kappa", self.params.min_p),))]

    def prepass_needs(self):
        return [StatRequest("old_min_p_logprobs", (("kappa", self.params.min_p),))] if self.params.scope == "global" else []

    def _blocks(self, adv: Tensor, valid: Tensor):
        yield valid & (adv < 0), self.params.rho
        yield valid & (adv > 0), self.params.rho_pos

    def prepare_minibatch(self, view: StepView) -> Tensor:
        lp = view.stats["logprobs"]
        valid = as_bool(view.mask)
        low = torch.zeros_like(valid)
        for cand, rho in self._blocks(view.advantages, valid):
            thr = lowest_k_threshold(lp[cand], rho, view.all_gather_cat)
            if thr is not None:
                low |= cand & (lp <= thr)
        return low

    def token_loss(self, ctx: LossContext) -> TermOutput:
        lp_d = ctx.logprobs.detach()
        proxy = ctx.stats["old_min_p_logprobs"]
        valid = as_bool(ctx.mask)
        if self.params.scope == "global":
            low = ctx.prepared[self.id][ctx.row_index]
        else:
            low = torch.zeros_like(valid)
            for cand, rho in self._blocks(ctx.advantages, valid):
                low |= lowest_k(lp_d, cand, rho)
        reg = low & (lp_d < proxy)
        d = proxy - ctx.logprobs
        kl3 = k3(d, self.params.clamp)
        values = torch.where(reg, kl3, torch.zeros_like(kl3))
        n = max(float(valid.sum()), 1.0)
        return TermOutput(
            loss=ctx.aggregate(values, self.params.agg),
            metrics={
                "reg_frac": float(reg.sum()) / n,
                "low_frac": float(low.sum()) / n,
                "kl3": float((kl3.detach() * reg).sum() / reg.sum().clamp(min=1)),
            },
            unclipped_mask=reg,
        )
