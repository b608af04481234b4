"""KL penalty to a frozen reference policy, ``KL(pi_theta || pi_ref)``.

Paper/eq.: the KL-regularised RLHF objective (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2) used
as a loss term as in GRPO (Shao et al. 2024, eq. 3-4). Estimators of the per-token KL at the sampled
token ``y ~ pi_theta`` (Schulman, "Approximating KL divergence", 2020), with ``d = log pi_ref(y) -
log pi_theta(y)``:

* ``k1`` = ``-d``                         (unbiased, high variance)
* ``k2`` = ``d**2 / 2``                   (low variance, biased)
* ``k3`` = ``exp(d) - d - 1``             (unbiased, >= 0; GRPO's choice; veRL's ``low_var_kl``),
  clamped to [-clamp, clamp] as in veRL (``clamp=10``; 0 = no clamp)
* ``full`` = ``sum_v pi_theta(v) (log pi_theta(v) - log pi_ref(v))`` exactly over the vocabulary,
  computed in the chunked statistics pass (no ``[B, T, V]`` tensor).

Defaults: ``estimator=k3``, ``agg=token-mean`` (veRL's KL loss). The coefficient (beta) is the
term's ``coef`` in config. No deviation from the cited definitions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from alignreg.regularizers.base import REGULARIZERS, LossContext, Regularizer, StatRequest, TermOutput, k3, masked_mean

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclass
class KLRefParams:
    estimator: Literal["k1", "k2", "k3", "full"] = "k3"  # per-token KL estimator (see module docstring)
    clamp: float = 10.0  # clamp of the k3 value (veRL low_var_kl); 0 = no clamp
    agg: AggMode = "token-mean"  # aggregation of the per-token KL


@REGULARIZERS.register("kl_ref")
class KLRef(Regularizer):
    Params = KLRefParams
    kind = ("token_loss",)

    def needs(self):
        return [StatRequest("kl_ref_full" if self.params.estimator == "full" else "ref_logprobs")]

    def token_loss(self, ctx: LossContext) -> TermOutput:
        est = self.params.estimator
        if est == "full":
            kl = ctx.stats["kl_ref_full"]
        else:
            d = ctx.stats["ref_logprobs"] - ctx.logprobs
            if est == "k1":
                kl = -d
            elif est == "k2":
                kl = 0.5 * d**2
            else:
                kl = k3(d, self.params.clamp)
        return TermOutput(loss=ctx.aggregate(kl, self.params.agg), metrics={"kl": masked_mean(kl, ctx.mask)})
