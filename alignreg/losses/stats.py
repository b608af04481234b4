"""Per-token statistics from final hidden states, a chunk of tokens at a time.

Every loss term in alignreg reads per-token quantities: the sampled token's log-prob and, for some
regularizers, a full-vocabulary statistic (entropy, SIREN's strict top-p nucleus entropy, KL to the
reference model, Lp-Reg's min-p proxy log-prob, GRPO-Guard's KL to the old policy). Materialising
``[B, T, V]`` float32 logits (V = 151,936 for Qwen) is what runs other trainers out of memory.

:func:`token_stats` computes every requested statistic in ONE pass over ``hidden [N, H]``:
lm-head matmul + reductions per chunk of tokens. Nothing of size ``V`` survives a chunk. In backward
the chunk's logits are recomputed and the gradient w.r.t. the logits is formed analytically for each
statistic, then contracted into ``d hidden`` and ``d weight``. Peak extra memory is therefore a few
``[chunk, V]`` buffers, independent of the sequence length, and the chunk size is picked from a byte
budget that accounts for how many buffers the requested statistics need.

Analytic gradients w.r.t. the temperature-scaled logits ``u = z / T`` (``p = softmax(u)``):

* log-prob of token y:            ``onehot(y) - p``
* entropy ``H = -sum p log p``:   ``-p (log p + H)``
* nucleus entropy over kept set K with ``q = p / sum_K p``: ``-q (log q + H_K)`` on K, 0 elsewhere
  (the kept set is piecewise constant, as in SIREN's official code)
* ``KL(p || r) = sum p (log p - log r)``: ``p (log p - log r - KL)``

and ``d/dz = d/du / T``. ``kl_old_full`` and ``min_p_logprobs`` are returned without gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Default working-set budget for the [chunk, V] float32 buffers of one chunk.
DEFAULT_CHUNK_BYTES = 256 * 2**20
MIN_P_FILL = -1e4  # Lp-Reg's official code fills filtered logits with -1e4 (finite), then divides by T


@dataclass(frozen=True)
class StatsSpec:
    """Which statistics to compute. ``logprobs`` is always computed."""

    entropy: bool = False  # full-vocabulary entropy (differentiable)
    top_p: Optional[tuple[float, int]] = None  # (p, k): strict top-p nucleus entropy within the top-k (differentiable)
    kl_ref: bool = False  # KL(pi || ref) over the full vocabulary (differentiable); needs ``ref``
    kl_old: bool = False  # KL(old || pi) over the full vocabulary (detached); needs ``old``
    min_p: Optional[float] = None  # kappa: log-prob of the sampled token under the min-p proxy (no grad)
    temperature: float = 1.0  # logits are divided by this before every statistic (not before min-p's filter)

    def names(self) -> list[str]:
        out = ["logprobs"]
        if self.entropy:
            out.append("entropy")
        if self.top_p is not None:
            out.append("top_p_entropy")
        if self.kl_ref:
            out.append("kl_ref_full")
        if self.kl_old:
            out.append("kl_old_full")
        if self.min_p is not None:
            out.append("min_p_logprobs")
        return out

    def full_vocab(self) -> bool:
        return self.entropy or self.top_p is not None or self.kl_ref or self.kl_old

    def num_buffers(self) -> int:
        """[chunk, V] float32 buffers alive at the peak of the backward of one chunk."""
        n = 2  # logits / log-probs and probabilities (or the logits gradient)
        if self.full_vocab():
            n += 1  # gradient accumulator
        if self.entropy or self.top_p is not None or self.kl_ref:
            n += 1  # scratch
        if self.kl_ref or self.kl_old:
            n += 1  # the other model's log-probs
        return n


def auto_chunk_size(vocab: int, spec: StatsSpec, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    return max(16, budget_bytes // (vocab * 4 * spec.num_buffers()))


Other = Optional[tuple[Tensor, Tensor, Optional[Tensor]]]  # (hidden [N, H], weight [V, H], bias [V] | None)


def _logits(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    z = h @ w.t()
    if b is not None:
        z = z + b
    # half-precision logits are upcast; float64 inputs (golden tests) stay float64
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _log_softmax_(u: Tensor) -> Tensor:
    """In-place log-softmax of a [C, V] float32 buffer."""
    return u.sub_(torch.logsumexp(u, dim=-1, keepdim=True))


def nucleus_size(p: Tensor, top_p: float, top_k: int) -> tuple[Tensor, Tensor]:
    """SIREN's strict nucleus: n = #{j : cumsum(sorted top-k probs)_j < p} and the n-th largest prob.

    The token whose cumulative probability crosses p is excluded (standard top-p includes it). If
    the top-1 probability is already >= p, n = 0 and the threshold is +inf (empty nucleus).
    """
    k = min(top_k, p.shape[-1])
    sp = p.topk(k, dim=-1, sorted=True).values
    n = (sp.cumsum(-1) < top_p).sum(-1)
    thr = sp.gather(-1, (n - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    thr = torch.where(n > 0, thr, torch.full_like(thr, math.inf))
    return n, thr


def nucleus_mask(p: Tensor, n: Tensor, thr: Tensor) -> Tensor:
    """Boolean [C, V] mask of the n most probable tokens; ties at the boundary go to the lower token
    index (the order of a stable descending sort), so the set is deterministic."""
    keep = p > thr.unsqueeze(-1)
    need = n - keep.sum(-1)
    eq = p == thr.unsqueeze(-1)
    ambiguous = eq.sum(-1) > need
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(-1)
        e = eq[rows]
        eq[rows] = e & (e.cumsum(-1) <= need[rows].unsqueeze(-1))
    keep |= eq
    return keep


def _chunk_forward(spec: StatsSpec, h, w, b, y, ref, old):
    """No-grad statistics of one chunk. Returns (outputs dict, saved per-token tensors)."""
    T = spec.temperature
    raw = _logits(h, w, b)
    out, saved = {}, {}
    if spec.min_p is not None:
        keep = raw >= raw.max(-1, keepdim=True).values + math.log(spec.min_p)
        zf = torch.where(keep, raw, torch.full_like(raw, MIN_P_FILL)).div_(T)
        out["min_p_logprobs"] = zf.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(zf, -1)
        del keep, zf
    logp = _log_softmax_(raw.div_(T))
    out["logprobs"] = logp.gather(-1, y[:, None]).squeeze(-1)
    if not spec.full_vocab():
        return out, saved
    p = logp.exp()
    if spec.entropy:
        out["entropy"] = -(p * logp).sum(-1)
    if spec.top_p is not None:
        n, thr = nucleus_size(p, *spec.top_p)
        keep = nucleus_mask(p, n, thr)
        s = (p * keep).sum(-1)
        s = torch.where(n > 0, s, 1.0)  # empty nucleus: H_K = 0, avoid log 0
        log_s = s.log()
        # H_K = -sum_K q log q = -(1/S) sum_K p (log p - log S)
        out["top_p_entropy"] = -(logp.sub(log_s[:, None]).mul_(p).mul_(keep)).sum(-1) / s
        saved.update(n=n, thr=thr, log_s=log_s)
        del keep
    if spec.kl_ref:  # sum p (log p - log r)
        lr = _log_softmax_(_logits(*ref).div_(T))
        out["kl_ref_full"] = lr.neg_().add_(logp).mul_(p).sum(-1)
        del lr
    if spec.kl_old:  # sum o (log o - log p)
        lo = _log_softmax_(_logits(*old).div_(T))
        po = lo.exp()
        out["kl_old_full"] = lo.sub_(logp).mul_(po).sum(-1)
        del lo, po
    return out, saved


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, chunk, hidden, weight, bias, targets, ref_h, ref_w, ref_b, old_h, old_w, old_b):
        names = spec.names()
        dt = torch.promote_types(hidden.dtype, torch.float32)
        outs = {k: hidden.new_empty(hidden.shape[0], dtype=dt) for k in names}
        saved_parts: dict[str, list] = {}
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            ref = (ref_h[s:e], ref_w, ref_b) if spec.kl_ref else None
            old = (old_h[s:e], old_w, old_b) if spec.kl_old else None
            o, sv = _chunk_forward(spec, hidden[s:e], weight, bias, targets[s:e], ref, old)
            for k, v in o.items():
                outs[k][s:e] = v
            for k, v in sv.items():
                saved_parts.setdefault(k, []).append(v)
        saved = {k: torch.cat(v) for k, v in saved_parts.items()}
        ctx.spec, ctx.chunk, ctx.has_bias = spec, chunk, bias is not None
        ctx.saved_keys = sorted(saved)
        ctx.save_for_backward(
            hidden, weight, bias, targets, ref_h, ref_w, ref_b,
            outs.get("entropy"), outs.get("top_p_entropy"), outs.get("kl_ref_full"),
            *[saved[k] for k in ctx.saved_keys],
        )
        nondiff = [outs[k] for k in ("kl_old_full", "min_p_logprobs") if k in outs]
        if nondiff:  # one call: each call replaces the previous set
            ctx.mark_non_differentiable(*nondiff)
        return tuple(outs[k] for k in names)

    @staticmethod
    def backward(ctx, *grads):
        spec, chunk = ctx.spec, ctx.chunk
        hidden, weight, bias, targets, ref_h, ref_w, ref_b, ent, tpe, klr, *rest = ctx.saved_tensors
        saved = dict(zip(ctx.saved_keys, rest))
        g = dict(zip(spec.names(), grads))
        T = spec.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dh = torch.zeros_like(hidden) if need_h else None
        dt = torch.promote_types(weight.dtype, torch.float32)
        dw = torch.zeros(weight.shape, dtype=dt, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=dt, device=weight.device) if need_b else None

        def gz_of(name, s, e):
            v = g.get(name)
            return None if v is None else v[s:e].to(dt)

        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            g_lp, g_h, g_tp, g_kl = (gz_of(n, s, e) for n in ("logprobs", "entropy", "top_p_entropy", "kl_ref_full"))
            if all(x is None for x in (g_lp, g_h, g_tp, g_kl)):
                continue
            h = hidden[s:e]
            logp = _log_softmax_(_logits(h, weight, bias).div_(T))
            p = logp.exp()
            # gz accumulates d(sum_stats g * stat)/du; start from the log-prob term: g (onehot - p)
            gz = p * (-g_lp[:, None]) if g_lp is not None else torch.zeros_like(p)
            if g_lp is not None:
                gz.scatter_add_(-1, targets[s:e, None], g_lp[:, None])
            if g_h is not None:  # -p (log p + H)
                tmp = logp.add(ent[s:e, None]).mul_(p).mul_(g_h[:, None])
                gz.sub_(tmp)
                del tmp
            if g_tp is not None:  # -q (log q + H_K) on the kept set, q = p / S, log q = log p - log S
                keep = nucleus_mask(p, saved["n"][s:e], saved["thr"][s:e])
                log_s = saved["log_s"][s:e]
                tmp = logp.sub((log_s - tpe[s:e])[:, None]).mul_(p).mul_(keep)
                gz.sub_(tmp.mul_((g_tp * (-log_s).exp())[:, None]))
                del keep, tmp
            if g_kl is not None:
                lr = _log_softmax_(_logits(ref_h[s:e], ref_w, ref_b).div_(T))
                lr.neg_().add_(logp).sub_(klr[s:e, None]).mul_(p).mul_(g_kl[:, None])
                gz += lr
                del lr
            del logp, p
            gz.div_(T)
            if need_h:
                dh[s:e] = (gz.to(weight.dtype) @ weight).to(dh.dtype)
            if need_w:
                dw.addmm_(gz.t(), h.to(dt))
            if need_b:
                db += gz.sum(0)
        return (
            None, None, dh,
            dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None,
            None, None, None, None, None, None, None,
        )


def token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    spec: StatsSpec = StatsSpec(),
    *,
    bias: Optional[Tensor] = None,
    ref: Other = None,
    old: Other = None,
    chunk_size: int = 0,
    budget_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, Tensor]:
    """Statistics of ``softmax((hidden @ weight.T + bias) / T)`` at each of ``N`` tokens.

    Args:
        hidden: ``[N, H]`` final hidden states of the tokens to score (flatten valid tokens first:
            padding costs a full row of the vocabulary).
        weight, bias: lm-head ``[V, H]`` and ``[V]`` (or None).
        targets: ``[N]`` sampled token ids.
        ref: ``(hidden, weight, bias)`` of the reference model for ``kl_ref`` (no grad).
        old: ``(hidden, weight, bias)`` of the old policy for ``kl_old`` (no grad).
        chunk_size: tokens per chunk (0: from ``budget_bytes``).
    Returns a dict ``name -> [N] float32`` with the names of ``spec.names()``.
    """
    if spec.kl_ref and ref is None:
        raise ValueError("kl_ref requires ref=(hidden, weight, bias) of the reference model")
    if spec.kl_old and old is None:
        raise ValueError("kl_old requires old=(hidden, weight, bias) of the old policy")
    chunk = chunk_size or auto_chunk_size(weight.shape[0], spec, budget_bytes)
    rh, rw, rb = (t.detach() if t is not None else None for t in (ref or (None, None, None)))
    oh, ow, ob = (t.detach() if t is not None else None for t in (old or (None, None, None)))
    outs = _TokenStats.apply(spec, chunk, hidden, weight, bias, targets, rh, rw, rb, oh, ow, ob)
    return dict(zip(spec.names(), outs))
