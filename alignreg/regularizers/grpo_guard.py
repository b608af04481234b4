"""GRPO-Guard: regulated clipping by ratio normalisation, adapted to token-level LLM GRPO.

Paper: "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated Clipping"
(arXiv 2510.22319). The paper works on flow-matching denoising steps: the importance ratio of a
Gaussian step is left-shifted (``E[log r] = -KL(pi_old || pi_theta) < 0``) and its spread varies by
step, so PPO clipping fires unevenly; *RatioNorm* adds the KL back and rescales by the step's noise
scale so the normalised ratio has mean 1 and a step-independent spread, then a ``1/dt`` gradient
reweighting equalises timesteps (REGULARIZERS.md §5.2).

Everything below is an **[adaptation]** for categorical token policies (REGULARIZERS.md §5.6); none
of it is in the paper. ``variant``:

* ``kl_correct`` (default) - per-token analytic bias removal:
  ``log r_hat_t = log r_t + KL(pi_old(.|s_t) || pi_theta(.|s_t))`` with the exact full-vocabulary KL
  (detached). This is the literal token analogue of RatioNorm's bias term (the categorical
  ``E_{a~pi_old}[log r] = -KL``), so ``E_old[log r_hat] = 0`` per token. It keeps PPO's clip range
  meaning unchanged, which is why it is the default; ``r_hat = r * e^KL`` with the KL detached, so it
  scales an unclipped token's gradient by ``e^KL >= 1`` (slightly, for the small KL between a step's
  mini-batch updates; the standardize variants' floor does not apply to it). Costs one extra
  lm-head matmul per chunk against the lm-head weights saved at the start of the step.
* ``seq_standardize`` / ``group_standardize`` - standardise all valid log-ratios of a response / of
  a prompt group with detached mean and std:
  ``log r_hat = target_std * (log r - mean) / max(std + eps, min_std)`` (the closest reading of
  "balanced ratio distribution", but it changes clip semantics and scales gradients by
  ``target_std / max(std + eps, min_std)``).
  **[deviation from the literal standardisation]** ``min_std`` (default: ``target_std``) floors the
  divisor, so the scale never exceeds 1: spreads wider than ``target_std`` are shrunk to it, narrower
  ones are only centred. Without the floor an on-policy update (every log-ratio exactly 0, std 0)
  would multiply the policy gradient by ``target_std / eps`` (1e7 with the defaults), as would any
  one-token segment off-policy. ``min_std: 0`` restores the literal form.
* ``position_standardize`` - standardise across the G responses of a group at each position
  (semantically weak alignment; not recommended except for fixed-format outputs).

The ``1/dt`` reweighting has no token analogue and is not ported. Statistics are detached (only
``log r`` carries gradient), and with ``pi_theta = pi_old`` every variant returns ``r_hat = 1``
exactly (the log-ratios and the KL are exactly 0; standardising zeros gives zeros); not with
``lora.dropout > 0``, where the loss pass samples dropout masks and the no-grad pass for pi_old does
not, so the ratios scatter around 1 by the dropout noise (TRL disables dropout for this). The term only
acts on off-policy updates, so the config refuses it when every update is on-policy
(``learner.ppo_epochs: 1`` with ``learner.mini_batch_size`` the whole batch): set a smaller
``mini_batch_size`` (several updates per step) or ``ppo_epochs > 1``. Group variants
need whole groups inside each micro-batch: the config is refused unless the micro-batch and each
rank's share of the mini-batch are multiples of ``rollout.group_size``.

Metrics: pre/post ratio mean and std, and the fraction of tokens outside the clip range, split by
advantage sign - the diagnostic the paper uses. The term has no coefficient in the loss (``coef``
must be non-zero to activate it; its value is not used).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from alignreg.regularizers.base import REGULARIZERS, LossContext, Regularizer, StatRequest, as_bool


@dataclass
class GrpoGuardParams:
    variant: Literal["kl_correct", "seq_standardize", "group_standardize", "position_standardize"] = "kl_correct"  # see docstring
    target_std: float = 0.1  # standardize variants: std of the normalised log-ratio
    eps: float = 1e-8  # standardize variants: added to the std
    min_std: Optional[float] = None  # standardize variants: floor of the divisor (None = target_std: the gradient is never amplified)

    def validate(self, path: str) -> None:
        from alignreg.config import ConfigError

        if self.target_std <= 0 or self.eps < 0 or (self.min_std is not None and self.min_std < 0):
            raise ConfigError(f"{path}: target_std must be > 0, eps and min_std >= 0")
        if self.min_std == 0 and self.eps == 0:
            raise ConfigError(f"{path}.min_std: 0 with eps 0 divides by a zero std (every on-policy update); set eps > 0 or min_std > 0")


def _standardize(x: Tensor, valid: Tensor, index: Tensor, n: int, target_std: float, eps: float, min_std: float) -> Tensor:
    """Detached mean/std of ``x`` over ``valid`` entries sharing ``index`` (segments 0..n-1); the
    divisor ``std + eps`` is floored at ``min_std``."""
    xv = torch.where(valid, x.detach(), torch.zeros_like(x)).double()
    w = valid.double()
    zeros = torch.zeros(n, dtype=torch.float64, device=x.device)
    cnt = zeros.index_add(0, index.reshape(-1), w.reshape(-1))
    mean = zeros.index_add(0, index.reshape(-1), xv.reshape(-1)) / cnt.clamp(min=1)
    dev = (xv - mean[index]) * w
    var = zeros.index_add(0, index.reshape(-1), (dev**2).reshape(-1)) / cnt.clamp(min=1)
    mean_t = mean[index].to(x.dtype)
    div = (var.sqrt() + eps).clamp(min=min_std)[index].to(x.dtype)
    out = target_std * (x - mean_t) / div
    return torch.where(valid, out, torch.zeros_like(out))


def _ratio_stats(prefix: str, log_r: Tensor, valid: Tensor) -> dict[str, float]:
    r = torch.exp(log_r.detach())[valid]
    if r.numel() == 0:
        return {}
    return {f"{prefix}_ratio_mean": float(r.mean()), f"{prefix}_ratio_std": float(r.std(unbiased=False))}


@REGULARIZERS.register("grpo_guard")
class GrpoGuard(Regularizer):
    Params = GrpoGuardParams
    kind = ("transform_log_ratio",)

    def needs(self):
        return [StatRequest("kl_old_full")] if self.params.variant == "kl_correct" else []

    def needs_whole_groups(self) -> bool:
        return self.params.variant in ("group_standardize", "position_standardize")

    def transform_log_ratio(self, log_ratio: Tensor, ctx: LossContext) -> tuple[Tensor, dict[str, float]]:
        valid = as_bool(ctx.mask)
        v, p = self.params.variant, self.params
        floor = p.target_std if p.min_std is None else p.min_std
        if v == "kl_correct":
            out = log_ratio + ctx.stats["kl_old_full"].detach()
        elif v == "seq_standardize":
            rows = torch.arange(log_ratio.shape[0], device=log_ratio.device)[:, None].expand_as(log_ratio)
            out = _standardize(log_ratio, valid, rows, log_ratio.shape[0], p.target_std, p.eps, floor)
        elif v == "group_standardize":
            g = ctx.group_index - ctx.group_index.min()
            seg = g[:, None].expand_as(log_ratio)
            out = _standardize(log_ratio, valid, seg, int(g.max()) + 1, p.target_std, p.eps, floor)
        else:
            g = ctx.group_index - ctx.group_index.min()
            T = log_ratio.shape[1]
            seg = g[:, None] * T + torch.arange(T, device=log_ratio.device)[None, :]
            out = _standardize(log_ratio, valid, seg, (int(g.max()) + 1) * T, p.target_std, p.eps, floor)
        out = torch.where(valid, out, torch.zeros_like(out))
        metrics = {**_ratio_stats("pre", log_ratio, valid), **_ratio_stats("post", out, valid)}
        r = torch.exp(out.detach())
        outside = (r < 1 - ctx.eps_low) | (r > 1 + ctx.eps_high)
        for name, sign in (("pos", ctx.advantages > 0), ("neg", ctx.advantages < 0)):
            m = valid & sign
            metrics[f"clipfrac_{name}"] = float((outside & m).sum()) / max(float(m.sum()), 1.0)
        return out, metrics
