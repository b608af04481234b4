"""SCoRe's per-attempt KL penalty to the base model (Kumar et al., arXiv 2409.12917, eq. 3 / eq. 4).

Stage I (eq. 3): ``max E[r(y2)] - beta2 * KL(pi(.|x1) || pi_ref(.|x1))`` - a strong KL on the *first*
attempt only, so attempt 1 stays at the base model while attempt 2 learns to correct it.
Stage II (eq. 4): ``max E[sum_i r(y_i)] - beta1 * sum_i KL(pi(.|x_i) || pi_ref(.|x_i))`` - KL on *both*
attempts. Per row ``KL_i = seqmean_t k3(log pi_ref - log pi)`` on the sampled tokens
(REGULARIZERS.md §6 reference loss, Schulman's k3), aggregated with ``agg`` over the episode batch.

The attempt of a row is read from ``ctx.group_index``: the SCoRe batch
(``orchestration/score.py::score_batch``) numbers groups ``2 * prompt + (attempt - 1)``, so
``group_index % 2 == 0`` is attempt 1. The coefficient is beta: ``coef: 0.1`` with
``attempts: first`` for Stage I (beta2), ``coef: 0.01`` with ``attempts: both`` for Stage II (beta1).

Defaults: ``attempts=first``, ``clamp=0.0`` (no clamp, as in the reference loss), ``agg=seq-mean-token-mean``
(per-sample length mean). beta1 = 0.01, beta2 = 0.1 [UNVERIFIED; BY571/SCoRe configs/math.yaml].
Deviation: the learner averages over the 2N rows of the episode batch, not the N episodes, so the
whole objective (PG and KL alike) is the paper's loss divided by 2; AdamW is invariant to that scale.
That holds for the per-sequence aggregations; with ``agg: token-mean`` the divisor is the token count of
*both* attempts (the other attempt's tokens count as zero KL), so with ``attempts: first|second`` the
effective beta is scaled by that attempt's share of the tokens, which changes from step to step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from alignreg.regularizers.base import REGULARIZERS, LossContext, Regularizer, StatRequest, TermOutput, k3, masked_mean


@dataclass
class ScoreKLParams:
    attempts: Literal["first", "second", "both"] = "first"  # which attempts' tokens are penalised
    clamp: float = 0.0  # clamp of the k3 value (0 = none, as in the paper's reference loss)
    agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"] = "seq-mean-token-mean"  # aggregation


@REGULARIZERS.register("score_kl")
class ScoreKL(Regularizer):
    __doc__ = __doc__
    Params = ScoreKLParams
    kind = ("token_loss",)

    def needs(self):
        return [StatRequest("ref_logprobs")]

    def token_loss(self, ctx: LossContext) -> TermOutput:
        kl = k3(ctx.stats["ref_logprobs"] - ctx.logprobs, self.params.clamp)
        first = (ctx.group_index % 2 == 0).to(ctx.mask.dtype)[:, None]
        sel = {"first": first, "second": 1.0 - first, "both": 1.0}[self.params.attempts]
        mask = ctx.mask * sel
        return TermOutput(loss=ctx.aggregate(kl, self.params.agg, mask=mask), metrics={"kl": masked_mean(kl, mask)})
