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

    def bytes_per_element(self, low_precision: bool = False) -> int:
        """Bytes per [chunk, V] element of the workspace at the peak of one chunk's backward."""
        n = 8  # logits / log-probs and probabilities (the log-prob gradient is formed in place)
        if self.entropy or self.top_p is not None or self.kl_ref:
            n += 8  # gradient accumulator and scratch
        if self.top_p is not None:
            n += 2  # nucleus masks (bool)
        if self.kl_old:
            n += 8  # the old policy's log-probs and probabilities (forward only)
        return n + (2 if low_precision else 0)  # half-precision matmul output


def auto_chunk_size(vocab: int, spec: StatsSpec, budget_bytes: int = DEFAULT_CHUNK_BYTES, low_precision: bool = False) -> int:
    return max(16, budget_bytes // (vocab * spec.bytes_per_element(low_precision)))


Other = Optional[tuple[Tensor, Tensor, Optional[Tensor]]]  # (hidden [N, H], weight [V, H], bias [V] | None)


class _Workspace:
    """[chunk, V] buffers allocated once per call and reused by every chunk: no allocator churn
    (which otherwise fragments the heap over thousands of chunks) and a predictable peak."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device):
        self.rows, self.vocab, self.dtype, self.device = rows, vocab, dtype, device
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, rows: int, dtype: Optional[torch.dtype] = None) -> Tensor:
        buf = self._bufs.get(name)
        if buf is None:
            buf = torch.empty(self.rows, self.vocab, dtype=dtype or self.dtype, device=self.device)
            self._bufs[name] = buf
        return buf[:rows]

    def logits(self, name: str, h: Tensor, w: Tensor, b: Optional[Tensor], T: float) -> Tensor:
        """``(h @ w.T + b) / T`` in the workspace dtype (half-precision matmuls are upcast)."""
        out = self.get(name, h.shape[0])
        if h.dtype == out.dtype:
            torch.matmul(h, w.t(), out=out)
        else:
            low = self.get("lowp", h.shape[0], h.dtype)
            torch.matmul(h, w.t(), out=low)
            out.copy_(low)
        if b is not None:
            out.add_(b)
        return out.div_(T) if T != 1.0 else out


def _log_softmax_(u: Tensor) -> Tensor:
    """In-place log-softmax of a [C, V] buffer."""
    return u.sub_(torch.logsumexp(u, dim=-1, keepdim=True))


def nucleus_size(p: Tensor, top_p: float, top_k: int, first_k: int = 512) -> tuple[Tensor, Tensor]:
    """SIREN's strict nucleus: n = #{j : cumsum(sorted top-k probs)_j < p} and the n-th largest prob.

    The token whose cumulative probability crosses p is excluded (standard top-p includes it). If
    the top-1 probability is already >= p, n = 0 and the threshold is +inf (empty nucleus).
    Rows whose crossing lies within the ``first_k`` largest probabilities (most rows of a trained
    LM) are resolved by a small top-k; only the others pay for the full top-``top_k`` selection.
    The sorted prefix, and so the result, is the same either way.
    """
    k = min(top_k, p.shape[-1])
    k0 = min(first_k, k)
    sp = p.topk(k0, dim=-1, sorted=True).values
    c = sp.cumsum(-1)
    n = (c < top_p).sum(-1)
    thr = sp.gather(-1, (n - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    open_rows = (n == k0).nonzero().squeeze(-1) if k0 < k else n.new_empty(0)
    if open_rows.numel():  # the crossing lies beyond the first k0 tokens
        sp2 = p[open_rows].topk(k, dim=-1, sorted=True).values
        n2 = (sp2.cumsum(-1) < top_p).sum(-1)
        n[open_rows] = n2
        thr[open_rows] = sp2.gather(-1, (n2 - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    thr = torch.where(n > 0, thr, torch.full_like(thr, math.inf))
    return n, thr


def nucleus_mask(p: Tensor, n: Tensor, thr: Tensor, keep: Optional[Tensor] = None, eq: Optional[Tensor] = None) -> Tensor:
    """Boolean [C, V] mask of the n most probable tokens; ties at the boundary go to the lower token
    index (the order of a stable descending sort), so the set is deterministic. ``keep``/``eq``:
    optional bool buffers to write into."""
    keep = torch.gt(p, thr.unsqueeze(-1), out=keep) if keep is not None else p > thr.unsqueeze(-1)
    need = n - keep.sum(-1)
    eq = torch.eq(p, thr.unsqueeze(-1), out=eq) if eq is not None else p == thr.unsqueeze(-1)
    ambiguous = eq.sum(-1) > need
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(-1)
        e = eq[rows]
        eq[rows] = e & (e.cumsum(-1) <= need[rows].unsqueeze(-1))
    keep |= eq
    return keep


def _chunk_forward(spec: StatsSpec, ws: _Workspace, h, w, b, y, ref, old):
    """No-grad statistics of one chunk. Returns (outputs dict, saved per-token tensors)."""
    T, C = spec.temperature, h.shape[0]
    out, saved = {}, {}
    if spec.min_p is not None:  # the filter applies to the raw logits, before temperature
        raw = ws.logits("z", h, w, b, 1.0)
        keep = torch.ge(raw, raw.max(-1, keepdim=True).values + math.log(spec.min_p), out=ws.get("keep", C, torch.bool))
        zf = torch.where(keep, raw, torch.tensor(MIN_P_FILL, dtype=raw.dtype), out=ws.get("tmp", C)).div_(T)
        out["min_p_logprobs"] = zf.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(zf, -1)
        logp = _log_softmax_(raw.div_(T))
    else:
        logp = _log_softmax_(ws.logits("z", h, w, b, T))
    out["logprobs"] = logp.gather(-1, y[:, None]).squeeze(-1)
    if not spec.full_vocab():
        return out, saved
    p = torch.exp(logp, out=ws.get("p", C))
    tmp = ws.get("tmp", C)
    if spec.entropy:
        out["entropy"] = -torch.mul(p, logp, out=tmp).sum(-1)
    if spec.top_p is not None:
        n, thr = nucleus_size(p, *spec.top_p)
        keep = nucleus_mask(p, n, thr, ws.get("keep", C, torch.bool), ws.get("eq", C, torch.bool))
        s = torch.mul(p, keep, out=tmp).sum(-1)
        s = torch.where(n > 0, s, 1.0)  # empty nucleus: H_K = 0, avoid log 0
        log_s = s.log()
        # H_K = -sum_K q log q = -(1/S) sum_K p (log p - log S)
        out["top_p_entropy"] = -torch.sub(logp, log_s[:, None], out=tmp).mul_(p).mul_(keep).sum(-1) / s
        saved.update(n=n, thr=thr, log_s=log_s)
    if spec.kl_ref:  # sum p (log p - log r)
        lr = _log_softmax_(ws.logits("tmp", *ref, T))
        out["kl_ref_full"] = lr.neg_().add_(logp).mul_(p).sum(-1)
    if spec.kl_old:  # sum o (log o - log p)
        lo = _log_softmax_(ws.logits("tmp", *old, T))
        po = torch.exp(lo, out=ws.get("tmp2", C))
        out["kl_old_full"] = lo.sub_(logp).mul_(po).sum(-1)
    return out, saved


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, chunk, hidden, weight, bias, targets, ref_h, ref_w, ref_b, old_h, old_w, old_b):
        names = spec.names()
        dt = torch.promote_types(hidden.dtype, torch.float32)
        outs = {k: hidden.new_empty(hidden.shape[0], dtype=dt) for k in names}
        saved_parts: dict[str, list] = {}
        ws = _Workspace(min(chunk, hidden.shape[0]), weight.shape[0], dt, hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            ref = (ref_h[s:e], ref_w, ref_b) if spec.kl_ref else None
            old = (old_h[s:e], old_w, old_b) if spec.kl_old else None
            o, sv = _chunk_forward(spec, ws, hidden[s:e], weight, bias, targets[s:e], ref, old)
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

        ws = _Workspace(min(chunk, hidden.shape[0]), weight.shape[0], dt, hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            g_lp, g_h, g_tp, g_kl = (gz_of(n, s, e) for n in ("logprobs", "entropy", "top_p_entropy", "kl_ref_full"))
            if all(x is None for x in (g_lp, g_h, g_tp, g_kl)):
                continue
            h, C = hidden[s:e], e - s
            logp = _log_softmax_(ws.logits("z", h, weight, bias, T))
            p = torch.exp(logp, out=ws.get("p", C))
            # gz accumulates d(sum_stats g * stat)/du, u = z / T
            gz = ws.get("gz", C).zero_() if any(x is not None for x in (g_h, g_tp, g_kl)) else None
            tmp = ws.get("tmp", C) if gz is not None else None
            if g_h is not None:  # -p (log p + H)
                gz.sub_(torch.add(logp, ent[s:e, None], out=tmp).mul_(p).mul_(g_h[:, None]))
            if g_tp is not None:  # -q (log q + H_K) on the kept set, q = p / S, log q = log p - log S
                keep = nucleus_mask(p, saved["n"][s:e], saved["thr"][s:e], ws.get("keep", C, torch.bool), ws.get("eq", C, torch.bool))
                log_s = saved["log_s"][s:e]
                torch.sub(logp, (log_s - tpe[s:e])[:, None], out=tmp).mul_(p).mul_(keep)
                gz.sub_(tmp.mul_((g_tp * (-log_s).exp())[:, None]))
            if g_kl is not None:  # p (log p - log r - KL)
                lr = _log_softmax_(ws.logits("tmp", ref_h[s:e], ref_w, ref_b, T))
                gz.add_(lr.neg_().add_(logp).sub_(klr[s:e, None]).mul_(p).mul_(g_kl[:, None]))
            if g_lp is not None:  # g (onehot - p), formed in place in p's buffer (last use of p)
                p.mul_(-g_lp[:, None]).scatter_add_(-1, targets[s:e, None], g_lp[:, None])
                gz = p if gz is None else gz.add_(p)
            gz.div_(T)
            if need_h:
                if weight.dtype == gz.dtype:
                    dh[s:e] = (gz @ weight).to(dh.dtype)
                else:
                    low = ws.get("lowp", C, weight.dtype)
                    low.copy_(gz)
                    dh[s:e] = (low @ weight).to(dh.dtype)
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
    low = hidden.dtype in (torch.float16, torch.bfloat16)
    chunk = chunk_size or auto_chunk_size(weight.shape[0], spec, budget_bytes, low)
    rh, rw, rb = (t.detach() if t is not None else None for t in (ref or (None, None, None)))
    oh, ow, ob = (t.detach() if t is not None else None for t in (old or (None, None, None)))
    outs = _TokenStats.apply(spec, chunk, hidden, weight, bias, targets, rh, rw, rb, oh, ow, ob)
    return dict(zip(spec.names(), outs))
