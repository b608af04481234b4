"""KL penalty to a frozen reference policy, ``KL(pi_theta || pi_ref)`` in value.

Paper/eq.: the KL-regularised RLHF objective (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2) used
as a loss term as in GRPO (Shao et al. 2024, eq. 3-4). Estimators of the per-token KL at the sampled
token ``y ~ pi_theta`` (Schulman, "Approximating KL divergence", 2020), with ``d = log pi_ref(y) -
log pi_theta(y)``. As *values* k1 and k3 are unbiased estimates of ``KL(pi_theta || pi_ref)`` and k2
a biased one; as a *loss* (differentiated through ``log pi_theta(y)`` only, the sampling carries no
gradient) their expected gradients differ:

* ``k1`` = ``-d``                         expected gradient 0 (``E_pi[grad log pi] = 0``): as a
  loss it does not pull pi_theta toward pi_ref (start-up warns); a value to log, not to train on
* ``k2`` = ``d**2 / 2``                   expected gradient = ``grad KL(pi_theta || pi_ref)``
* ``k3`` = ``exp(d) - d - 1``             expected gradient = ``grad KL(pi_ref || pi_theta)`` (the
  reverse KL; >= 0; GRPO's choice and veRL's ``low_var_kl``, the default here), clamped to
  [-clamp, clamp] as in veRL (``clamp=10``; 0 = no clamp)
* ``full`` = ``sum_v pi_theta(v) (log pi_theta(v) - log pi_ref(v))`` exactly over the vocabulary,
  computed in the chunked statistics pass (no ``[B, T, V]`` tensor): value and gradient of
  ``KL(pi_theta || pi_ref)``.

``tests/test_terms_golden.py`` checks these expected gradients exactly on a small vocabulary.
Defaults: ``estimator=k3``, ``agg=token-mean`` (veRL's KL loss). The coefficient (beta) is the
term's ``coef`` in config. The estimators are the cited definitions; only k2 and ``full`` give the
gradient of the KL the objective names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from alignreg.regularizers.base import REGULARIZERS, LossContext, Regularizer, StatRequest, TermOutput, k3, masked_mean

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclass
class KLRefParams:
    estimator: Literal["k1", "k2", "k3", "full"] = "k3"  # per-token KL estimator; as a loss: k2/full = grad KL(pi||ref), k3 = grad KL(ref||pi), k1 = 0 (module docstring)
    clamp: float = 10.0  # clamp of the k3 value (veRL low_var_kl); 0 = no clamp
    agg: AggMode = "token-mean"  # aggregation of the per-token KL


@REGULARIZERS.register("kl_ref")
class KLRef(Regularizer):
    Params = KLRefParams
    kind = ("token_loss",)

    def needs(self):
        return [StatRequest("kl_ref_full" if self.params.estimator == "full" else "ref_logprobs")]

    def start_up_warning(self) -> str:
        if self.params.estimator != "k1":
            return ""
        return (f"regularizers: {self.id!r} (kl_ref, estimator k1) has zero expected gradient as a loss (E_pi[grad "
                "log pi] = 0), so it does not pull the policy toward the reference; use estimator k2 or full (gradient "
                "of KL(pi||ref)) or k3 (GRPO's, gradient of KL(ref||pi))")

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
