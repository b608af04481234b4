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

Per chunk the softmax is formed from the row max and one shifted ``exp`` (``torch.logsumexp`` is
several times slower on CPU); forward saves each row's log-sum-exp (policy and reference) and the
nucleus (n, threshold, mass), so backward forms log-probs with one subtraction and the nucleus mask
with one comparison. SIREN's nucleus comes from the sorted prefix of a small ``topk`` (no ``[C, V]``
mask in forward); only rows whose nucleus reaches beyond it pay for the full ``topk(k)``.

:func:`token_stats_forward` runs the forward alone (no graph) and keeps that per-token state;
``token_stats(..., precomputed=...)`` at the same inputs then runs only the backward. The learner's
no-grad pass (old log-probs, Lp-Reg's proxy, reference log-probs) uses it to serve the first update
of each step too, where pi_theta = pi_old, so that update's loss costs no lm-head forward.

Analytic gradients w.r.t. the temperature-scaled logits ``u = z / T`` (``p = softmax(u)``):

* log-prob of token y:            ``onehot(y) - p``
* entropy ``H = -sum p log p``:   ``-p (log p + H)``
* nucleus entropy over kept set K with ``q = p / sum_K p``: ``-q (log q + H_K)`` on K, 0 elsewhere
  (the kept set is piecewise constant, as in SIREN's official code)
* ``KL(p || r) = sum p (log p - log r)``: ``p (log p - log r - KL)``

and ``d/dz = d/du / T``. ``kl_old_full``, ``min_p_logprobs`` and ``ref_logprobs`` (the reference's
log-prob of the sampled token, a by-product of ``kl_ref``) are returned without gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Default working-set budget for the [chunk, V] float32 buffers of one chunk: on CPU, and on a CUDA
# device, where 256 MiB chunks (176 tokens at V = 151,936) left the GPU underused: on an H200 (bf16,
# 8,192 tokens) the log-prob pass took 0.168 s with 256 MiB, 0.135 s with 1 GiB, against 0.138 s for
# full logits, and the full statistics 0.478 / 0.325 s (benchmarks/bench_stats_cuda.py, docs/benchmarks.md)
DEFAULT_CHUNK_BYTES = 256 * 2**20
CUDA_CHUNK_BYTES = 2**30
MIN_P_FILL = -1e4  # Lp-Reg's official code fills filtered logits with -1e4 (finite), then divides by T


@dataclass(frozen=True)
class StatsSpec:
    """Which statistics to compute. ``logprobs`` is always computed."""

    entropy: bool = False  # full-vocabulary entropy (differentiable)
    top_p: Optional[tuple[float, int]] = None  # (p, k): strict top-p nucleus entropy within the top-k (differentiable)
    kl_ref: bool = False  # KL(pi || ref) over the full vocabulary (differentiable), and the reference's log-prob of the sampled token (no grad); needs ``ref``
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
            out += ["kl_ref_full", "ref_logprobs"]
        if self.kl_old:
            out.append("kl_old_full")
        if self.min_p is not None:
            out.append("min_p_logprobs")
        return out

    def full_vocab(self) -> bool:
        return self.entropy or self.top_p is not None or self.kl_ref or self.kl_old

    def bytes_per_element(self, low_precision: bool = False) -> int:
        """Bytes per [chunk, V] element of the workspace at the peak of one chunk (forward or backward)."""
        n = 8  # logits / log-probs (backward: the gradient, in place) and probabilities
        if self.full_vocab() or self.min_p is not None:
            n += 4  # scratch: the reference's logits, the nucleus / min-p mask
        if self.kl_old:
            n += 4  # the old policy's probabilities (forward only)
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


def _softmax_(u: Tensor, p: Tensor, want_p: bool = True, m: Optional[Tensor] = None) -> Tensor:
    """In place on a [C, V] buffer: ``u <- log_softmax(u)``, ``p <- exp(u)``; returns the per-row
    log-sum-exp. Cheap passes (max, shifted exp, sum, shift, exp) instead of ``torch.logsumexp``
    (several times slower on CPU). ``p`` is formed as ``exp(log p)`` exactly as backward recomputes
    it from the saved log-sum-exp, so the nucleus threshold compares equal values in both passes.
    ``want_p=False``: ``p`` is only scratch. ``m``: the row max ``[C, 1]`` if already known."""
    m = u.amax(-1, keepdim=True) if m is None else m
    lse = torch.sub(u, m, out=p).exp_().sum(-1, keepdim=True).log_().add_(m)
    u.sub_(lse)
    if want_p:
        torch.exp(u, out=p)
    return lse.squeeze(-1)


def _log_softmax_(u: Tensor) -> Tensor:
    """In-place log-softmax of a [C, V] buffer."""
    return u.sub_(torch.logsumexp(u, dim=-1, keepdim=True))


def nucleus_size(p: Tensor, top_p: float, top_k: int, first_k: int = 512) -> tuple[Tensor, Tensor]:
    """SIREN's strict nucleus: n = #{j : cumsum(sorted top-k probs)_j < p} and the n-th largest prob
    (+inf when n = 0). See :func:`nucleus_stats`."""
    n, thr, _, _ = nucleus_stats(p, top_p, top_k, first_k)
    return n, thr


def nucleus_stats(p: Tensor, top_p: float, top_k: int, first_k: int = 512,
                  top1: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SIREN's strict top-p nucleus of each row of ``p`` [C, V], from its sorted prefix.

    Returns ``n`` (#{j : cumsum(sorted top-k probs)_j < p}: the token whose cumulative probability
    crosses p is excluded, standard top-p includes it), ``thr`` (the n-th largest prob, +inf when
    n = 0), ``S`` (the nucleus mass, 1 when n = 0) and ``H`` (the entropy of the renormalised
    nucleus ``-sum_K q log q``, q = p / S; 0 when n = 0).

    Cost: rows whose top-1 probability is already >= p (``top1``, the row max, given or computed)
    have an empty nucleus and no sort at all; the others get a sorted ``topk(first_k)``, and only rows
    whose crossing lies beyond it pay for the full ``topk(top_k)``, unsorted: when its k values sum to
    less than p (a flat row: the nucleus is the whole top-k) no order is needed, otherwise only those
    k values are sorted. The kept set, and so every result, is the same either way (up to float
    summation order). Ties at the boundary do not change S or H (equal values).
    """
    C = p.shape[0]
    k = min(top_k, p.shape[-1])
    n = torch.zeros(C, dtype=torch.long, device=p.device)
    thr = torch.full((C,), math.inf, dtype=p.dtype, device=p.device)
    S = torch.ones(C, dtype=p.dtype, device=p.device)
    H = torch.zeros(C, dtype=p.dtype, device=p.device)
    if C == 0 or k == 0:
        return n, thr, S, H
    if top1 is None:
        top1 = p.amax(-1)
    rows = (top1 < top_p).nonzero().squeeze(-1)

    def settle(r, sp, c, nr, kk):  # rows r: sorted prefix sp [R, kk], its cumsum c, n
        last = (nr - 1).clamp(min=0).unsqueeze(-1)
        s_r = c.gather(-1, last).squeeze(-1)
        kept = sp * (torch.arange(kk, device=p.device) < nr.unsqueeze(-1))
        n[r], thr[r], S[r] = nr, sp.gather(-1, last).squeeze(-1), s_r
        H[r] = s_r.log() - _plogp(kept).sum(-1) / s_r  # -sum q log q = log S - sum p log p / S

    if rows.numel() and first_k < k:  # stage 1: a small sorted top-k resolves most rows of an LM
        sp = p.index_select(0, rows).topk(first_k, dim=-1, sorted=True).values
        c = sp.cumsum(-1)
        nr = (c < top_p).sum(-1)
        done = nr < first_k
        settle(rows[done], sp[done], c[done], nr[done], first_k)
        rows = rows[~done]
    if rows.numel():  # stage 2: the full top-k, unsorted; sorted only where the crossing is inside it
        v = p.index_select(0, rows).topk(k, dim=-1, sorted=False).values
        total = v.sum(-1)
        cap = total < top_p  # every one of the k tokens is kept: no order needed
        r = rows[cap]
        n[r], thr[r], S[r] = k, v[cap].amin(-1), total[cap]
        H[r] = total[cap].log() - _plogp(v[cap]).sum(-1) / total[cap]
        if (~cap).any():
            sp = v[~cap].sort(dim=-1, descending=True).values
            c = sp.cumsum(-1)
            settle(rows[~cap], sp, c, (c < top_p).sum(-1), k)
    return n, thr, S, H


def _plogp(x: Tensor) -> Tensor:
    """``x log x`` with ``0 log 0 = 0``."""
    return torch.where(x > 0, x * x.log(), torch.zeros((), dtype=x.dtype, device=x.device))


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


def _nucleus_keep_float(p: Tensor, n: Tensor, thr: Tensor, out: Tensor) -> Tensor:
    """The nucleus of :func:`nucleus_mask` as a float 0/1 mask written into ``out``. Fast path: ``p >=
    thr`` holds exactly the n kept tokens unless a row has more ties at ``thr`` than places left;
    only such rows go through the exact (bool) :func:`nucleus_mask`."""
    torch.ge(p, thr.unsqueeze(-1), out=out)
    bad = (out.sum(-1) != n.to(out.dtype)).nonzero().squeeze(-1)
    if bad.numel():
        out[bad] = nucleus_mask(p[bad], n[bad], thr[bad]).to(out.dtype)
    return out


def _chunk_forward(spec: StatsSpec, ws: _Workspace, h, w, b, y, ref, old):
    """No-grad statistics of one chunk. Returns (outputs dict, saved per-token tensors).

    ``saved`` holds what backward needs besides the outputs: the policy's (and the reference's)
    log-sum-exp, so backward forms log-probs with one subtraction, and the nucleus (n, thr, S)."""
    T, C = spec.temperature, h.shape[0]
    out, saved = {}, {}
    p = ws.get("p", C)
    if spec.min_p is not None:  # the filter applies to the raw logits, before temperature
        raw = ws.logits("z", h, w, b, 1.0)
        m = raw.amax(-1, keepdim=True)
        kf = torch.ge(raw, m + math.log(spec.min_p), out=ws.get("tmp", C))
        y_kept = kf.gather(-1, y[:, None]).squeeze(-1) > 0
        logp = raw.div_(T) if T != 1.0 else raw
        m = m / T  # division by T > 0 is monotone: max(raw / T) == max(raw) / T exactly
    else:
        logp = ws.logits("z", h, w, b, T)
        m = logp.amax(-1, keepdim=True)
    lse = _softmax_(logp, p, m=m)
    saved["lse"] = lse
    out["logprobs"] = logp.gather(-1, y[:, None]).squeeze(-1)
    if spec.min_p is not None:
        # the official fills filtered logits with -1e4 and divides by T: exp((-1e4) / T) is 0 next to
        # the kept mass, so log Z_filtered = lse + log(sum of kept p)
        log_kept = kf.mul_(p).sum(-1).log()
        filled = torch.full_like(lse, MIN_P_FILL / T) - lse
        out["min_p_logprobs"] = torch.where(y_kept, out["logprobs"], filled) - log_kept
    if not spec.full_vocab():
        return out, saved
    tmp = ws.get("tmp", C)
    plogp = None
    if spec.entropy or spec.kl_ref:
        plogp = torch.mul(p, logp, out=tmp).sum(-1)  # sum p log p = -H
    if spec.entropy:
        out["entropy"] = -plogp
    if spec.top_p is not None:
        n, thr, S, H = nucleus_stats(p, *spec.top_p)
        out["top_p_entropy"] = H
        saved.update(n=n, thr=thr, log_s=S.log())
    if spec.kl_old:  # sum o (log o - log p)
        lo = ws.logits("tmp", *old, T)
        po = ws.get("gz", C)
        _softmax_(lo, po)
        out["kl_old_full"] = lo.sub_(logp).mul_(po).sum(-1)
    if spec.kl_ref:  # sum p log p - sum p log r, log r = u_r - lse_r and sum p = 1; log p is no longer needed
        ur = ws.logits("tmp", *ref, T)
        mr = ur.amax(-1, keepdim=True)
        p_ur = torch.mul(p, ur, out=logp).sum(-1)
        lse_r = torch.sub(ur, mr, out=logp).exp_().sum(-1).log_().add_(mr.squeeze(-1))
        saved["lse_ref"] = lse_r
        out["ref_logprobs"] = ur.gather(-1, y[:, None]).squeeze(-1) - lse_r
        out["kl_ref_full"] = plogp - p_ur + lse_r
    return out, saved


def _forward_all(spec, chunk, hidden, weight, bias, targets, ref_h, ref_w, ref_b, old_h, old_w, old_b):
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
    if hidden.shape[0] == 0:  # empty input: empty per-token tensors of every kind backward reads
        saved = {k: hidden.new_empty(0, dtype=torch.long if k == "n" else dt) for k in _saved_keys(spec)}
    return outs, saved


def _saved_keys(spec: StatsSpec) -> list[str]:
    keys = ["lse"]
    if spec.top_p is not None:
        keys += ["log_s", "n", "thr"]
    if spec.kl_ref:
        keys.append("lse_ref")
    return sorted(keys)


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, chunk, pre, hidden, weight, bias, targets, ref_h, ref_w, ref_b, old_h, old_w, old_b):
        names = spec.names()
        if pre is None:
            outs, saved = _forward_all(spec, chunk, hidden, weight, bias, targets, ref_h, ref_w, ref_b, old_h, old_w, old_b)
        else:  # values computed earlier by token_stats_forward at these very inputs
            outs = {k: pre.values[k].clone() for k in names}
            saved = pre.saved
        ctx.spec, ctx.chunk, ctx.has_bias = spec, chunk, bias is not None
        ctx.saved_keys = _saved_keys(spec)
        ctx.save_for_backward(
            hidden, weight, bias, targets, ref_h, ref_w, ref_b,
            outs.get("entropy"), outs.get("top_p_entropy"), outs.get("kl_ref_full"),
            *[saved[k] for k in ctx.saved_keys],
        )
        nondiff = [outs[k] for k in ("ref_logprobs", "kl_old_full", "min_p_logprobs") if k in outs]
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
        need_h, need_w, need_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        dh = torch.zeros_like(hidden) if need_h else None
        dt = torch.promote_types(weight.dtype, torch.float32)
        dw = torch.zeros(weight.shape, dtype=dt, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=dt, device=weight.device) if need_b else None

        def up(name, s, e):  # upstream gradient of a statistic, with d/dz = d/du / T folded in
            v = g.get(name)
            return None if v is None else v[s:e].to(dt) / T

        ws = _Workspace(min(chunk, hidden.shape[0]), weight.shape[0], dt, hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            g_lp, g_h, g_tp, g_kl = (up(n, s, e) for n in ("logprobs", "entropy", "top_p_entropy", "kl_ref_full"))
            if all(x is None for x in (g_lp, g_h, g_tp, g_kl)):
                continue
            h, C = hidden[s:e], e - s
            logp = ws.logits("z", h, weight, bias, T).sub_(saved["lse"][s:e, None])
            p = torch.exp(logp, out=ws.get("p", C))
            # d/du of sum_stats g * stat = p * (a log p + c + [-g_kl log r] + [mask-term]) + g_lp onehot:
            #   log-prob  g (onehot - p);  entropy -g p (log p + H);  KL(p||r)  g p (log p - log r - KL)
            #   nucleus entropy  -(g / S) p (log p - log S + H_K) on the kept set
            #   (log r = u_r - lse_r: the reference logits enter directly, lse_r goes into c)
            # The bracket is formed in place in the log-prob buffer: 3 [C, V] float32 buffers in all.
            a = torch.zeros(C, dtype=dt, device=h.device)
            c = torch.zeros(C, dtype=dt, device=h.device)
            if g_h is not None:
                a -= g_h
                c -= g_h * ent[s:e]
            if g_kl is not None:
                a += g_kl
                c += g_kl * (saved["lse_ref"][s:e] - klr[s:e])
            if g_lp is not None:
                c -= g_lp
            gz = logp
            if g_tp is not None:  # + kf ct (log p + d), ct = -g / S, d = H_K - log S
                log_s = saved["log_s"][s:e]
                d = tpe[s:e] - log_s
                kf = _nucleus_keep_float(p, saved["n"][s:e], saved["thr"][s:e], ws.get("tmp", C))
                w_ = kf.mul_((-g_tp * (-log_s).exp())[:, None]).add_(a[:, None])  # a + kf ct
                gz.add_(d[:, None]).mul_(w_).add_((c - a * d)[:, None])  # (log p + d)(a + kf ct) + c - a d
            else:
                gz.mul_(a[:, None]).add_(c[:, None])
            if g_kl is not None:
                ur = ws.logits("tmp", ref_h[s:e], ref_w, ref_b, T)
                gz.addcmul_(ur, g_kl[:, None], value=-1.0)
            gz.mul_(p)
            if g_lp is not None:
                gz.scatter_add_(-1, targets[s:e, None], g_lp[:, None])
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
            None, None, None, dh,
            dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None,
            None, None, None, None, None, None, None,
        )


@dataclass
class Precomputed:
    """Statistics computed ahead by :func:`token_stats_forward` (values + what backward reads)."""

    spec: StatsSpec
    values: dict[str, Tensor]
    saved: dict[str, Tensor]

    def rows(self, index) -> "Precomputed":
        """The same statistics for a subset of the tokens (``index``: a slice, bool mask or ids)."""
        return Precomputed(self.spec, {k: v[index] for k, v in self.values.items()},
                           {k: v[index] for k, v in self.saved.items()})


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
    budget_bytes: Optional[int] = None,
    precomputed: Optional[Precomputed] = None,
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
        budget_bytes: working-set budget of one chunk (None: ``CUDA_CHUNK_BYTES`` for inputs on a CUDA
            device, else ``DEFAULT_CHUNK_BYTES``).
        precomputed: :func:`token_stats_forward` at these same inputs (values and the per-token
            state backward reads); the forward pass is then skipped. Covering ``spec`` is checked,
            equality of the inputs is the caller's contract.
    Returns a dict ``name -> [N] float32`` with the names of ``spec.names()``.
    """
    _check_inputs(spec, ref, old)
    chunk = _resolve_chunk(hidden, weight, spec, chunk_size, budget_bytes)
    rh, rw, rb = (t.detach() if t is not None else None for t in (ref or (None, None, None)))
    oh, ow, ob = (t.detach() if t is not None else None for t in (old or (None, None, None)))
    if precomputed is not None:
        _check_precomputed(precomputed, spec, hidden.shape[0])
    outs = _TokenStats.apply(spec, chunk, precomputed, hidden, weight, bias, targets, rh, rw, rb, oh, ow, ob)
    return dict(zip(spec.names(), outs))


def _resolve_chunk(hidden, weight, spec, chunk_size, budget_bytes) -> int:
    low = hidden.dtype in (torch.float16, torch.bfloat16)
    if budget_bytes is None:
        budget_bytes = CUDA_CHUNK_BYTES if hidden.is_cuda else DEFAULT_CHUNK_BYTES
    return chunk_size or auto_chunk_size(weight.shape[0], spec, budget_bytes, low)


def _check_precomputed(pre: "Precomputed", spec: StatsSpec, n: int) -> None:
    missing = [k for k in spec.names() if k not in pre.values] + [k for k in _saved_keys(spec) if k not in pre.saved]
    if missing or pre.spec.temperature != spec.temperature or pre.spec.top_p != spec.top_p:
        raise ValueError(f"precomputed statistics do not cover {spec} (missing {missing}, computed with {pre.spec})")
    bad = [k for k, v in {**pre.values, **pre.saved}.items() if v.shape[0] != n]
    if bad:
        raise ValueError(f"precomputed statistics {bad} are not for these {n} tokens")


@torch.no_grad()
def token_stats_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    spec: StatsSpec = StatsSpec(),
    *,
    bias: Optional[Tensor] = None,
    ref: Other = None,
    old: Other = None,
    chunk_size: int = 0,
    budget_bytes: Optional[int] = None,
) -> Precomputed:
    """:func:`token_stats`'s forward alone (no graph), keeping what its backward needs.

    ``token_stats(..., precomputed=token_stats_forward(...))`` at the *same* inputs then skips the
    forward pass (no lm-head matmul) and runs only the backward. The learner uses it for the first
    optimizer update of a step: the no-grad pass it runs anyway (old log-probs, Lp-Reg's proxy,
    reference log-probs) computes the training statistics too, since pi_theta = pi_old until the
    first update."""
    _check_inputs(spec, ref, old)
    chunk = _resolve_chunk(hidden, weight, spec, chunk_size, budget_bytes)
    rh, rw, rb = ref or (None, None, None)
    oh, ow, ob = old or (None, None, None)
    outs, saved = _forward_all(spec, chunk, hidden, weight, bias, targets, rh, rw, rb, oh, ow, ob)
    return Precomputed(spec, outs, saved)


def _check_inputs(spec: StatsSpec, ref, old) -> None:
    if spec.kl_ref and ref is None:
        raise ValueError("kl_ref requires ref=(hidden, weight, bias) of the reference model")
    if spec.kl_old and old is None:
        raise ValueError("kl_old requires old=(hidden, weight, bias) of the old policy")
