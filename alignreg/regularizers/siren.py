"""SIREN: SelectIve entRopy rEgularizatioN.

Paper: "Rethinking Entropy Regularization in Large Reasoning Models" (arXiv 2509.25133); official
code Linn3a/siren (``dp_actor.py``, ``ray_trainer.py``). Equations as in REGULARIZERS.md §3.1:

1. top-p mask: ``H_t`` = entropy of pi_theta's *strict* top-p nucleus within the top-k, renormalised
   (the token whose cumulative probability crosses p is excluded; top-1 >= p gives ``H_t = 0``).
2. peak-entropy mask, per sequence: ``sel = H_t > nanquantile(H_b, mask_ratio)`` (linear
   interpolation over the response tokens, strict ``>``; selection on detached values).
3. ``H_sel = seq-mean-token-mean(H, sel)``: per-sequence mean over selected tokens, sequences with
   no selected token contribute 0 and still count in the mean.
4. self-anchored loss ``(H_sel - H_anchor)**2``; ``H_anchor`` is the same quantity (steps 1-3) of the
   old policy on the whole step-1 batch, a constant saved with the checkpoint.

Defaults (official ``exp_scripts/siren.sh``): ``top_p=0.8``, ``top_k=10000`` (capped at V),
``mask_ratio=0.8``, ``agg=seq-mean-token-mean``, coef 0.005 (set ``coef`` in config).

Deviations / choices:
* ``scope=micro`` (default) reproduces the official code: the square is taken per micro-batch and
  scaled by ``len(micro) / mini_batch_size``. ``scope=global`` squares the mini-batch value (a no-grad
  prepass computes ``H_sel`` over the mini-batch; each micro-batch contributes the exact gradient
  ``2 (H_sel - anchor) dH_sel``), which is invariant to micro-batching.
* The selection mask is ANDed with the response mask explicitly (the official code relies on
  padding entropy being 0); the official non-rmpad path uses full entropy - we always use top-p.
* ``anchor`` may be set in params (as the official ``algorithm.entropy_anchor`` on resume); when
  resuming from an alignreg checkpoint the anchor is restored from the checkpoint instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from alignreg.losses.aggregate import aggregate, local_norm
from alignreg.regularizers.base import (
    REGULARIZERS,
    AggNorm,
    LossContext,
    Regularizer,
    StatRequest,
    StepView,
    TermOutput,
    as_bool,
)


@dataclass
class SirenParams:
    top_p: float = 0.8  # nucleus threshold p (strict)
    top_k: int = 10000  # nucleus cap: only the top-k tokens are considered
    mask_ratio: float = 0.8  # per-sequence quantile; tokens strictly above it are selected (top ~20%)
    agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"  # aggregation of H over selected tokens
    scope: Literal["micro", "global"] = "micro"  # where the square is taken (see docstring)
    anchor: Optional[float] = None  # fixed anchor; None = measured on the step-1 batch

    def validate(self, path: str) -> None:
        from alignreg.config import ConfigError

        if not 0 < self.top_p <= 1 or self.top_k < 1 or not 0 <= self.mask_ratio < 1:
            raise ConfigError(f"{path}: need 0 < top_p <= 1, top_k >= 1, 0 <= mask_ratio < 1")


def peak_entropy_mask(h: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """Per-row ``h > nanquantile(h over valid tokens, ratio)`` AND valid (detached)."""
    valid = as_bool(mask)
    x = torch.where(valid, h.detach(), torch.full_like(h, float("nan")))
    has = valid.any(-1)
    lb = torch.nanquantile(x[has].double(), ratio, dim=-1, keepdim=True) if has.any() else None
    sel = torch.zeros_like(valid)
    if lb is not None:
        sel[has] = (x[has].double() > lb) & valid[has]
    return sel


@REGULARIZERS.register("siren")
class Siren(Regularizer):
    Params = SirenParams
    kind = ("token_loss",)

    def __init__(self, params: SirenParams, term_id: str):
        super().__init__(params, term_id)
        self.anchor: Optional[float] = params.anchor

    def _topp(self) -> tuple:
        return (("k", self.params.top_k), ("p", self.params.top_p))

    def needs(self):
        out = [StatRequest("top_p_entropy", self._topp())]
        if self.anchor is None:
            out.append(StatRequest("old_top_p_entropy", self._topp()))
        return out

    def prepass_needs(self):
        return [StatRequest("top_p_entropy", self._topp())] if self.params.scope == "global" else []

    def _batch_value(self, h: Tensor, view: StepView) -> tuple[float, float]:
        """``H_sel`` of a whole batch spread over data-parallel ranks, and its selected-token count."""
        sel = peak_entropy_mask(h, view.mask, self.params.mask_ratio)
        unit = AggNorm(1.0, 1.0, float(view.norm_len or view.mask.shape[-1]))  # sums; divided by global counts below
        total = view.all_reduce_sum(aggregate(h, sel, self.params.agg, unit).detach().double().reshape(1))
        n_sel = view.all_reduce_sum(sel.sum().double().reshape(1))
        n_seq = view.all_reduce_sum(torch.tensor([float(view.mask.shape[0])], dtype=torch.float64, device=h.device))
        denom = n_sel if self.params.agg == "token-mean" else n_seq
        return float(total / denom.clamp(min=1)), float(n_sel)

    def step_start_reads_batch(self) -> bool:
        return self.anchor is None  # only the step that measures the anchor

    def on_step_start(self, view: StepView) -> dict[str, float]:
        if self.anchor is None:
            self.anchor, _ = self._batch_value(view.stats["old_top_p_entropy"], view)
        return {"anchor": self.anchor}

    def prepare_minibatch(self, view: StepView) -> tuple[float, float]:
        return self._batch_value(view.stats["top_p_entropy"], view)

    def token_loss(self, ctx: LossContext) -> TermOutput:
        h = ctx.stats["top_p_entropy"]
        anchor = float(self.anchor) if self.anchor is not None else 0.0
        share = ctx.mask.shape[0] / max(ctx.norm.num_seqs, 1.0)  # len(micro) / mini_batch_size
        sel = peak_entropy_mask(h, ctx.mask, self.params.mask_ratio)
        if self.params.scope == "micro":
            h_sel = aggregate(h, sel, self.params.agg, local_norm(sel, ctx.norm.norm_len))
            loss = (h_sel - anchor) ** 2 * share
            value = float(h_sel.detach())
        else:
            h_glob, n_sel = ctx.prepared[self.id]
            norm = AggNorm(num_tokens=n_sel, num_seqs=ctx.norm.num_seqs, norm_len=ctx.norm.norm_len)
            contrib = aggregate(h, sel, self.params.agg, norm)  # sums to H_sel over micro-batches
            loss = (h_glob - anchor) ** 2 * share + 2.0 * (h_glob - anchor) * (contrib - contrib.detach())
            value = h_glob
        n_valid = float(ctx.mask.sum())
        return TermOutput(
            loss=loss,
            metrics={"h_sel": value, "anchor": anchor, "selected_frac": float(sel.sum()) / max(n_valid, 1.0)},
        )

    def state_dict(self) -> dict:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self.anchor = state.get("anchor", self.anchor)
