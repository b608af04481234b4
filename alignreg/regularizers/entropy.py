"""Entropy bonus: minimise ``-H(pi_theta(.|s_t))`` (full vocabulary).

Paper/eq.: the entropy regulariser of A3C / PPO (Mnih et al. 2016; Schulman et al. 2017, eq. 9,
``+ c2 S[pi](s_t)``), as veRL's ``entropy_coeff``: ``loss = pg_loss - coef * H``. The per-token value
returned is ``-H`` so a positive ``coef`` raises entropy. Defaults: ``agg=token-mean``. The entropy
is exact over the vocabulary, computed in the chunked statistics pass. No deviation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from alignreg.regularizers.base import REGULARIZERS, LossContext, Regularizer, StatRequest, TermOutput, masked_mean


@dataclass
class EntropyParams:
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"  # aggregation of -H


@REGULARIZERS.register("entropy")
class Entropy(Regularizer):
    Params = EntropyParams
    kind = ("token_loss",)

    def needs(self):
        return [StatRequest("entropy")]

    def token_loss(self, ctx: LossContext) -> TermOutput:
        h = ctx.stats["entropy"]
        return TermOutput(loss=ctx.aggregate(-h, self.params.agg), metrics={"entropy": masked_mean(h, ctx.mask)})
