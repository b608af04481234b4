"""Golden value + gradient tests of the LLM loss terms, the PG surrogate and the advantage
estimators against float64 brute-force re-implementations of the equations in REGULARIZERS.md
(kl_ref, entropy, SIREN §3.1, Lp-Reg §4.1, GRPO-Guard §5.6) written with python loops / numpy."""
import dataclasses
import math
import statistics

import numpy as np
import pytest
import torch

from alignreg.algorithms.advantages import compute_advantages
from alignreg.losses.aggregate import AGG_MODES, local_norm
from alignreg.losses.policy import clipped_pg_loss
from alignreg.regularizers import AggNorm, LossContext, StepView
from alignreg.regularizers.entropy import Entropy, EntropyParams
from alignreg.regularizers.grpo_guard import GrpoGuard, GrpoGuardParams
from alignreg.regularizers.kl_ref import KLRef, KLRefParams
from alignreg.regularizers.lp_reg import LpReg, LpRegParams
from alignreg.regularizers.siren import Siren, SirenParams

F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# builders and brute-force helpers
# ------------------------------------------------------------------------------------------------
def rand_batch(seed, B=5, T=7, lengths=None, group_size=None):
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[B // 2] = 0  # a fully-masked row
    lengths = torch.as_tensor(lengths)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    adv_row = torch.randn(B, generator=g, dtype=F64)
    adv = adv_row[:, None].expand(B, T).clone()
    gs = group_size or B
    return dict(
        mask=mask,
        logprobs=-torch.rand(B, T, generator=g, dtype=F64) * 4 - 0.01,
        old_logprobs=-torch.rand(B, T, generator=g, dtype=F64) * 4 - 0.01,
        ref_logprobs=-torch.rand(B, T, generator=g, dtype=F64) * 4 - 0.01,
        entropy=torch.rand(B, T, generator=g, dtype=F64) * 3,
        advantages=adv,
        group_index=torch.arange(B) // gs,
        g=g,
    )


def make_ctx(logprobs, mask, stats, advantages=None, norm=None, row_index=None, group_index=None, **kw):
    B = mask.shape[0]
    return LossContext(
        logprobs=logprobs,
        old_logprobs=kw.pop("old_logprobs", logprobs.detach()),
        advantages=torch.zeros_like(mask) if advantages is None else advantages,
        mask=mask,
        stats=stats,
        norm=norm or local_norm(mask),
        row_index=torch.arange(B) if row_index is None else row_index,
        group_index=torch.arange(B) if group_index is None else group_index,
        step=0,
        **kw,
    )


def brute_agg(x, m, mode, num_seqs=None, num_tokens=None, L=None):
    """Python-loop aggregation over [B, T] (x a tensor for autograd; m a 0/1 tensor)."""
    B, T = m.shape
    num_seqs = B if num_seqs is None else num_seqs
    L = T if L is None else L
    rows = []
    for b in range(B):
        idx = [t for t in range(T) if m[b, t] > 0]
        s = sum((x[b, t] for t in idx), torch.zeros((), dtype=F64))
        if mode == "seq-mean-token-mean":
            rows.append(s / len(idx) if idx else s * 0)
        elif mode == "seq-mean-token-sum-norm":
            rows.append(s / L)
        else:
            rows.append(s)
    total = sum(rows, torch.zeros((), dtype=F64))
    if mode == "token-mean":
        n = float(m.sum()) if num_tokens is None else num_tokens
        return total / max(n, 1.0)
    return total / max(num_seqs, 1)


def close(a, b, tol=1e-10, what=""):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=tol, atol=tol,
                               msg=lambda m: f"{what}: {m}")


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x, allow_unused=True, retain_graph=True)
    return torch.zeros_like(x) if g is None else g


# ------------------------------------------------------------------------------------------------
# kl_ref / entropy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "full"])
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_ref(seed, estimator, mode):
    d0 = rand_batch(seed)
    lp = d0["logprobs"].clone().requires_grad_()
    ref = d0["ref_logprobs"].clone()
    ref[0, 0] = lp[0, 0].detach() + 15.0  # k3 = e^15 - 16 > 10: clamped value, zero gradient
    klf = d0["entropy"].clone().requires_grad_()  # stand-in for the differentiable full KL
    term = KLRef(KLRefParams(estimator=estimator, clamp=10.0, agg=mode), "kl_ref")
    ctx = make_ctx(lp, d0["mask"], {"ref_logprobs": ref, "kl_ref_full": klf})
    out = term.token_loss(ctx)
    m = d0["mask"]
    lpb = lp.detach().clone().requires_grad_()
    klb = klf.detach().clone().requires_grad_()
    B, T = m.shape
    vals = [[None] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            dd = ref[b, t] - lpb[b, t]
            if estimator == "k1":
                v = -dd
            elif estimator == "k2":
                v = dd * dd / 2
            elif estimator == "k3":
                v = torch.exp(dd) - dd - 1
                v = v if float(v.detach()) <= 10 else v * 0 + 10.0
            else:
                v = klb[b, t]
            vals[b][t] = v
    x = torch.stack([torch.stack(r) for r in vals])
    want = brute_agg(x, m, mode)
    close(out.loss, want, what="value")
    close(grad_of(out.loss, lp), grad_of(want, lpb), what="d logprobs")
    close(grad_of(out.loss, klf), grad_of(want, klb), what="d kl_ref_full")
    if estimator == "k3" and m[0, 0] > 0:
        assert grad_of(out.loss, lp)[0, 0] == 0
    assert isinstance(out.metrics["kl"], float)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_entropy(mode):
    d0 = rand_batch(3)
    h = d0["entropy"].clone().requires_grad_()
    out = Entropy(EntropyParams(agg=mode), "entropy").token_loss(make_ctx(d0["logprobs"], d0["mask"], {"entropy": h}))
    hb = h.detach().clone().requires_grad_()
    want = brute_agg(-hb, d0["mask"], mode)
    close(out.loss, want)
    close(grad_of(out.loss, h), grad_of(want, hb))
    close(out.metrics["entropy"], float((h.detach() * d0["mask"]).sum() / d0["mask"].sum()))


def test_kl_ref_k3_without_clamp():
    d0 = rand_batch(6)
    lp = d0["logprobs"].clone()
    lp[0, 0] = d0["ref_logprobs"][0, 0] - 15.0  # k3 ~ 3.3e6: kept as is with clamp = 0
    lpl = lp.clone().requires_grad_()
    out = KLRef(KLRefParams(estimator="k3", clamp=0.0), "kl_ref").token_loss(make_ctx(lpl, d0["mask"], {"ref_logprobs": d0["ref_logprobs"]}))
    lpb = lp.clone().requires_grad_()
    d = d0["ref_logprobs"] - lpb
    want = ((torch.exp(d) - d - 1) * d0["mask"]).sum() / d0["mask"].sum()
    close(out.loss, want)
    close(grad_of(out.loss, lpl), grad_of(want, lpb))


def test_kl_ref_expected_gradients_as_a_loss():
    """Exact expectation over y ~ pi on a 6-token vocabulary (the mask weighs each token by its detached
    probability: the sampling carries no gradient). As a loss k1 has zero expected gradient, k2 and
    ``full`` give grad KL(pi || ref), k3 gives grad KL(ref || pi) (the reverse KL); k1 and k3 are
    unbiased in value. The start-up warning names k1 only."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g, dtype=F64)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=F64), -1)

    def grad(fn):
        th = theta.clone().requires_grad_()
        return grad_of(fn(torch.log_softmax(th, -1)), th)

    def expected(est, lp):  # E_{y ~ pi}[loss(y)], value and gradient exact
        pi = lp.detach().exp()[None]
        stats = {"ref_logprobs": ref[None], "kl_ref_full": (lp.exp() * (lp - ref)).sum()[None, None].expand(1, 6)}
        return KLRef(KLRefParams(estimator=est, clamp=0.0), "kl_ref").token_loss(make_ctx(lp[None], pi, stats)).loss

    fwd = grad(lambda lp: (lp.exp() * (lp - ref)).sum())  # grad KL(pi || ref)
    rev = grad(lambda lp: (ref.exp() * (ref - lp)).sum())  # grad KL(ref || pi)
    assert (fwd - rev).abs().max() > 0.05  # the two directions differ here
    close(grad(lambda lp: expected("k1", lp)), torch.zeros(6, dtype=F64), what="k1")
    close(grad(lambda lp: expected("k2", lp)), fwd, what="k2")
    close(grad(lambda lp: expected("full", lp)), fwd, what="full")
    close(grad(lambda lp: expected("k3", lp)), rev, what="k3")
    lp = torch.log_softmax(theta, -1)
    kl = float((lp.exp() * (lp - ref)).sum())
    for est in ("k1", "k3", "full"):
        assert float(expected(est, lp)) == pytest.approx(kl, rel=1e-12), est
    warn = KLRef(KLRefParams(estimator="k1"), "kl1").start_up_warning()
    assert "'kl1' (kl_ref, estimator k1) has zero expected gradient" in warn and "\n" not in warn
    assert all(KLRef(KLRefParams(estimator=e), "kl_ref").start_up_warning() == "" for e in ("k2", "k3", "full"))


def test_k3_gradient_finite_when_exp_overflows():
    """The k3 value is clamped to 10, so its gradient must be 0 (not NaN) however large
    ``log pi_ref - log pi`` is. BUG (kl_ref.py / lp_reg.py): ``exp(d)`` overflows to inf for
    d > 88 (float32) and clamp's zero gradient times inf gives NaN in exp's backward."""
    lp = torch.tensor([[-100.0, -1.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    ctx = make_ctx(lp, mask, {"ref_logprobs": torch.tensor([[-1.0, -1.5]])})
    out = KLRef(KLRefParams(estimator="k3"), "kl_ref").token_loss(ctx)
    assert float(out.loss.detach()) == pytest.approx((10.0 + math.exp(-0.5) + 0.5 - 1) / 2, rel=1e-6)
    g = grad_of(out.loss, lp)
    assert torch.isfinite(g).all(), f"NaN/inf gradient from a clamped k3 value: {g}"


# ------------------------------------------------------------------------------------------------
# SIREN
# ------------------------------------------------------------------------------------------------
def brute_siren_hsel(H, m, ratio, agg="seq-mean-token-mean", L=None):
    """Steps 2-3: per-sequence numpy quantile (linear), strict >, aggregation over selected tokens."""
    Hn = H.detach().numpy()
    sel = np.zeros(Hn.shape, dtype=bool)
    for b in range(Hn.shape[0]):
        idx = np.nonzero(m[b].numpy() > 0)[0]
        if len(idx):
            q = np.quantile(Hn[b, idx], ratio, method="linear")
            sel[b, idx] = Hn[b, idx] > q
    selt = torch.from_numpy(sel).to(F64)
    n_sel = float(selt.sum())
    return brute_agg(H, selt, agg, num_tokens=n_sel, L=L), sel


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_siren_micro_scope(seed, agg):
    B, T, ratio = 6, 9, 0.8 if seed else 0.5
    d0 = rand_batch(seed, B=B, T=T)
    H = d0["entropy"].clone()
    H[1, :] = 0.7  # a sequence with all-equal entropies selects nothing
    m = d0["mask"]
    m[1, :5] = 1.0
    old_H = torch.rand(B, T, generator=d0["g"], dtype=F64) * 2
    term = Siren(SirenParams(mask_ratio=ratio, agg=agg), "siren")
    assert [r.name for r in term.needs()] == ["top_p_entropy", "old_top_p_entropy"]
    # anchor: the same quantity on the whole step-1 batch of old-policy entropies (no grad)
    metrics = term.on_step_start(StepView(m, d0["advantages"], d0["old_logprobs"], {"old_top_p_entropy": old_H}, 0))
    anchor_want, _ = brute_siren_hsel(old_H, m, ratio, agg, L=float(T))
    close(term.anchor, anchor_want, what="anchor")
    assert metrics == {"anchor": term.anchor}
    # never updated afterwards
    term.on_step_start(StepView(m, d0["advantages"], d0["old_logprobs"], {"old_top_p_entropy": old_H * 3}, 1))
    close(term.anchor, anchor_want)
    # micro-batches of a mini-batch of B rows: (H_sel_micro - anchor)^2 * len(micro) / B
    norm = AggNorm(num_tokens=float(m.sum()), num_seqs=float(B), norm_len=float(T))
    Hleaf = H.clone().requires_grad_()
    Hb = H.clone().requires_grad_()
    total, want_total = 0.0, 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        ctx = make_ctx(d0["logprobs"][rows], m[rows], {"top_p_entropy": Hleaf[rows]}, norm=norm)
        out = term.token_loss(ctx)
        hs, sel = brute_siren_hsel(Hb[rows], m[rows], ratio, agg, L=float(T))
        n_rows = rows.stop - rows.start
        want = (hs - anchor_want) ** 2 * n_rows / B
        close(out.loss, want, what=f"micro {rows}")
        close(out.metrics["h_sel"], float(hs.detach()))
        assert out.metrics["selected_frac"] == pytest.approx(sel.sum() / max(float(m[rows].sum()), 1.0))
        assert all(isinstance(v, float) for v in out.metrics.values())
        total, want_total = total + out.loss, want_total + want
    close(grad_of(total, Hleaf), grad_of(want_total, Hb), what="d top_p_entropy")
    # the all-equal row and the fully-masked row get no gradient
    assert torch.all(grad_of(total, Hleaf)[[1, B // 2]] == 0)


def test_siren_state_dict_and_fixed_anchor():
    d0 = rand_batch(4)
    view = StepView(d0["mask"], d0["advantages"], d0["old_logprobs"], {"old_top_p_entropy": d0["entropy"]}, 0)
    a = Siren(SirenParams(), "siren")
    a.on_step_start(view)
    b = Siren(SirenParams(), "siren")
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() == {"anchor": a.anchor} and a.anchor is not None
    assert b.needs() == [r for r in a.needs()]  # no old_top_p_entropy once the anchor is known
    assert [r.name for r in b.needs()] == ["top_p_entropy"]
    b.on_step_start(StepView(d0["mask"], d0["advantages"], d0["old_logprobs"], {}, 7))  # restored: not re-measured
    assert b.anchor == a.anchor
    c = Siren(SirenParams(anchor=0.25), "siren")
    assert c.on_step_start(view) == {"anchor": 0.25}
    ctx = make_ctx(d0["logprobs"], d0["mask"], {"top_p_entropy": d0["entropy"]})
    hs, _ = brute_siren_hsel(d0["entropy"], d0["mask"], 0.8)
    close(c.token_loss(ctx).loss, (hs - 0.25) ** 2)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_siren_anchor_consistent_with_h_sel(agg):
    """Step 1, first update, pi_theta == pi_old: H_sel of the whole batch equals the anchor, so the
    self-anchored loss is 0, whatever the aggregation. The learner's ``norm_len`` is
    ``algorithm.norm_len or rollout.max_new_tokens`` while the padded T is the longest response.

    BUG (siren.py ``_batch_value``): the anchor (and the global-scope prepass value) divide by
    ``view.mask.shape[-1]`` for ``seq-mean-token-sum-norm``, but ``token_loss`` uses
    ``ctx.norm.norm_len``, so the anchor is on a different scale from H_sel."""
    d0 = rand_batch(8, B=4, T=6)
    m, H = d0["mask"], d0["entropy"]
    term = Siren(SirenParams(agg=agg), "siren")
    # the step view must carry the learner's length normaliser (proposed field StepView.norm_len)
    extra = {"norm_len": 16.0} if "norm_len" in {f.name for f in dataclasses.fields(StepView)} else {}
    term.on_step_start(StepView(m, d0["advantages"], d0["old_logprobs"], {"old_top_p_entropy": H}, 0, **extra))
    norm = AggNorm(float(m.sum()), 4.0, norm_len=16.0)
    out = term.token_loss(make_ctx(d0["logprobs"], m, {"top_p_entropy": H}, norm=norm))
    assert out.metrics["h_sel"] == pytest.approx(term.anchor, rel=1e-12), "anchor and H_sel use different normalisers"
    assert float(out.loss.detach()) == pytest.approx(0.0, abs=1e-20)


def test_siren_global_scope_sums_to_whole_batch():
    B, T = 6, 8
    d0 = rand_batch(5, B=B, T=T)
    m, H = d0["mask"], d0["entropy"]
    term = Siren(SirenParams(scope="global", anchor=0.3), "siren")
    assert [r.name for r in term.prepass_needs()] == ["top_p_entropy"]
    prepared = {"siren": term.prepare_minibatch(StepView(m, d0["advantages"], d0["old_logprobs"], {"top_p_entropy": H}, 0))}
    norm = AggNorm(float(m.sum()), float(B), float(T))
    Hleaf = H.clone().requires_grad_()
    total = sum(
        term.token_loss(make_ctx(d0["logprobs"][r], m[r], {"top_p_entropy": Hleaf[r]}, norm=norm, prepared=prepared)).loss
        for r in (slice(0, 1), slice(1, 4), slice(4, 6))
    )
    Hb = H.clone().requires_grad_()
    hs, _ = brute_siren_hsel(Hb, m, 0.8)
    want = (hs - 0.3) ** 2
    close(total, want)
    close(grad_of(total, Hleaf), grad_of(want, Hb))


# ------------------------------------------------------------------------------------------------
# Lp-Reg
# ------------------------------------------------------------------------------------------------
def brute_lp_reg(lp, proxy, adv, m, rho, rho_pos=0.0, clamp=10.0):
    """Official micro-batch Lp-Reg KL block; returns (token-mean loss, R as bool numpy)."""
    B, T = m.shape
    R = np.zeros((B, T), dtype=bool)
    lpd = lp.detach()
    for sign, r in ((-1, rho), (1, rho_pos)):
        cand = [(b, t) for b in range(B) for t in range(T) if m[b, t] > 0 and (adv[b, t] < 0 if sign < 0 else adv[b, t] > 0)]
        k = max(1, int(len(cand) * r))
        if r > 0 and k > 1:
            low = sorted(cand, key=lambda bt: float(lpd[bt]))[:k]  # python sort is stable
            for bt in low:
                if float(lpd[bt]) < float(proxy[bt]):
                    R[bt] = True
    total = lp.sum() * 0  # keeps the graph when nothing is selected
    for b in range(B):
        for t in range(T):
            if R[b, t] and m[b, t] > 0:
                d = proxy[b, t] - lp[b, t]
                v = torch.exp(d) - d - 1
                fv = float(v.detach())
                total = total + (v if -clamp <= fv <= clamp else v * 0 + math.copysign(clamp, fv))
    return total / max(float(m.sum()), 1.0), R


def lp_case(seed, B=6, T=10):
    d0 = rand_batch(seed, B=B, T=T)
    g = d0["g"]
    adv = torch.randn(B, T, generator=g, dtype=F64)  # token-level signs to exercise both blocks
    proxy = d0["logprobs"] + torch.randn(B, T, generator=g, dtype=F64) * 1.5
    proxy[0, :3] = -1e4  # min-p filtered tokens: never regularised
    return d0, adv, proxy


@pytest.mark.parametrize("rho,rho_pos", [(0.3, 0.0), (0.5, 0.2), (1.0, 1.0), (0.01, 0.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lp_reg_micro(seed, rho, rho_pos):
    d0, adv, proxy = lp_case(seed)
    lp = d0["logprobs"].clone()
    lp[2, 0] = proxy[2, 0] - 12.0  # a clamped k3 (exp(12) - 11 > 10) if selected
    lpl = lp.clone().requires_grad_()
    term = LpReg(LpRegParams(rho=rho, rho_pos=rho_pos), "lp_reg")
    assert [r.name for r in term.needs()] == ["old_min_p_logprobs"] and term.prepass_needs() == []
    out = term.token_loss(make_ctx(lpl, d0["mask"], {"old_min_p_logprobs": proxy}, advantages=adv))
    lpb = lp.clone().requires_grad_()
    want, R = brute_lp_reg(lpb, proxy, adv, d0["mask"], rho, rho_pos)
    close(out.loss, want, what="value")
    close(grad_of(out.loss, lpl), grad_of(want, lpb), what="d logprobs")
    assert torch.equal(out.unclipped_mask, torch.from_numpy(R))
    if rho == 0.01:  # fewer than 200 negatives: k == 1 -> nothing regularised
        assert not R.any() and float(out.loss.detach()) == 0.0
    else:
        assert R.any()
    assert all(isinstance(v, float) for v in out.metrics.values())
    # gradient of the KL term on R is 1 - pi_proxy / pi_theta (< 0), divided by the token count
    g = grad_of(out.loss, lpl)
    n = float(d0["mask"].sum())
    for b, t in zip(*np.nonzero(R)):
        k3 = math.exp(proxy[b, t] - lp[b, t]) - (proxy[b, t] - lp[b, t]) - 1
        expect = 0.0 if k3 > 10 else (1 - math.exp(proxy[b, t] - lp[b, t])) / n
        assert float(g[b, t]) == pytest.approx(expect, rel=1e-9, abs=1e-15)


def test_lp_reg_guard_and_ties():
    # 5 negatives with rho = 0.3: k = max(1, int(1.5)) = 1 -> off; 10 negatives: k = 3
    m = torch.ones(1, 10, dtype=F64)
    lp = torch.full((1, 10), -3.0, dtype=F64)  # all tied
    proxy = torch.full((1, 10), -1.0, dtype=F64)
    adv = torch.tensor([[-1.0] * 5 + [1.0] * 5], dtype=F64)
    term = LpReg(LpRegParams(rho=0.3), "lp_reg")
    out = term.token_loss(make_ctx(lp.clone().requires_grad_(), m, {"old_min_p_logprobs": proxy}, advantages=adv))
    assert not out.unclipped_mask.any() and float(out.loss.detach()) == 0
    adv = -torch.ones(1, 10, dtype=F64)
    out = term.token_loss(make_ctx(lp.clone().requires_grad_(), m, {"old_min_p_logprobs": proxy}, advantages=adv))
    # ties broken by flattened position (stable): the first 3
    assert out.unclipped_mask.tolist() == [[True] * 3 + [False] * 7]
    # ties across rows + a strictly lower token elsewhere
    m2 = torch.ones(2, 5, dtype=F64)
    lp2 = torch.tensor([[-2.0, -3.0, -2.0, -1.0, -3.0], [-3.0, -5.0, -2.0, -3.0, -1.0]], dtype=F64)
    out = term.token_loss(make_ctx(lp2.clone().requires_grad_(), m2, {"old_min_p_logprobs": torch.zeros(2, 5, dtype=F64)},
                                   advantages=-torch.ones(2, 5, dtype=F64)))
    _, R = brute_lp_reg(lp2, torch.zeros(2, 5, dtype=F64), -torch.ones(2, 5), m2, 0.3)
    assert out.unclipped_mask.tolist() == R.tolist() == [[False, True, False, False, True], [False, True, False, False, False]]


def test_lp_reg_padding_is_never_selected():
    d0, adv, proxy = lp_case(7)
    lp = d0["logprobs"].clone()
    lp[d0["mask"] == 0] = -50.0  # padding with the lowest log-probs must not be picked
    out = LpReg(LpRegParams(rho=0.5), "lp_reg").token_loss(
        make_ctx(lp.requires_grad_(), d0["mask"], {"old_min_p_logprobs": proxy}, advantages=adv))
    assert not (out.unclipped_mask & (d0["mask"] == 0)).any()
    _, R = brute_lp_reg(lp.detach(), proxy, adv, d0["mask"], 0.5)
    assert out.unclipped_mask.tolist() == R.tolist()


def test_lp_reg_global_scope():
    """scope=global: threshold on the k-th smallest over the mini-batch (ties at it included),
    selection fixed by the prepass and indexed by row_index."""
    d0, adv, proxy = lp_case(3)
    m = d0["mask"]
    lp = d0["logprobs"].clone()
    term = LpReg(LpRegParams(rho=0.3, scope="global"), "lp_reg")
    assert [r.name for r in term.prepass_needs()] == ["old_min_p_logprobs"]
    low = term.prepare_minibatch(StepView(m, adv, d0["old_logprobs"], {"logprobs": lp, "old_min_p_logprobs": proxy}, 0))
    cand = (m > 0) & (adv < 0)
    vals = sorted(float(v) for v in lp[cand])
    k = max(1, int(len(vals) * 0.3))
    assert k > 1
    want_low = cand & (lp <= vals[k - 1])
    assert torch.equal(low, want_low)
    prepared = {"lp_reg": low}
    norm = AggNorm(float(m.sum()), float(m.shape[0]), float(m.shape[1]))
    lpl = lp.clone().requires_grad_()
    total = 0
    for r in (slice(0, 2), slice(2, 6)):
        ctx = make_ctx(lpl[r], m[r], {"old_min_p_logprobs": proxy[r]}, advantages=adv[r], norm=norm,
                       row_index=torch.arange(r.start, r.stop), prepared=prepared)
        out = term.token_loss(ctx)
        assert torch.equal(out.unclipped_mask, (want_low & (lp < proxy))[r])
        total = total + out.loss
    lpb = lp.clone().requires_grad_()
    R = want_low & (lp < proxy)
    d = proxy - lpb
    want = torch.where(R, (torch.exp(d) - d - 1).clamp(-10, 10), torch.zeros_like(d)).sum() / m.sum()
    close(total, want)
    close(grad_of(total, lpl), grad_of(want, lpb))


def test_lp_reg_gradient_finite_when_exp_overflows():
    """A selected token far below the proxy: k3 clamps to 10, so the gradient must be 0, not NaN
    (same overflow as kl_ref k3, see test_k3_gradient_finite_when_exp_overflows)."""
    lp = torch.tensor([[-100.0, -2.0, -3.0, -0.5]], requires_grad=True)
    proxy = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    out = LpReg(LpRegParams(rho=0.5), "lp_reg").token_loss(
        make_ctx(lp, torch.ones(1, 4), {"old_min_p_logprobs": proxy}, advantages=-torch.ones(1, 4)))
    assert out.unclipped_mask.tolist() == [[True, False, True, False]]
    assert float(out.loss.detach()) == pytest.approx((10 + math.exp(2) - 2 - 1) / 4, rel=1e-6)
    g = grad_of(out.loss, lp)
    assert torch.isfinite(g).all(), f"NaN/inf gradient from a clamped k3 value: {g}"


# ------------------------------------------------------------------------------------------------
# GRPO-Guard
# ------------------------------------------------------------------------------------------------
def brute_standardize(x, m, seg, target_std, eps, min_std):
    out = torch.zeros_like(x)
    B, T = x.shape
    groups: dict = {}
    for b in range(B):
        for t in range(T):
            if m[b, t] > 0:
                groups.setdefault(seg(b, t), []).append((b, t))
    for members in groups.values():
        v = [float(x.detach()[bt]) for bt in members]
        mu, sd = statistics.fmean(v), statistics.pstdev(v)
        for bt in members:
            out[bt] = target_std * (x[bt] - mu) / max(sd + eps, min_std)
    return out


@pytest.mark.parametrize("variant", ["kl_correct", "seq_standardize", "group_standardize", "position_standardize"])
@pytest.mark.parametrize("seed,min_std", [(0, None), (1, None), (0, 0.0), (1, 0.05)])
def test_grpo_guard(seed, variant, min_std):
    B, T, G = 6, 5, 3
    d0 = rand_batch(seed, B=B, T=T, group_size=G)
    m = d0["mask"]
    g = d0["g"]
    log_ratio = torch.randn(B, T, generator=g, dtype=F64) * 0.1
    kl = torch.rand(B, T, generator=g, dtype=F64) * 1e-2
    group_index = d0["group_index"] + 4  # offsets must not matter
    term = GrpoGuard(GrpoGuardParams(variant=variant, target_std=0.2, eps=1e-8, min_std=min_std), "grpo_guard")
    assert [r.name for r in term.needs()] == (["kl_old_full"] if variant == "kl_correct" else [])
    lr = log_ratio.clone().requires_grad_()
    ctx = make_ctx(d0["logprobs"], m, {"kl_old_full": kl.clone().requires_grad_()}, advantages=d0["advantages"],
                   group_index=group_index, eps_low=0.2, eps_high=0.28)
    out, metrics = term.transform_log_ratio(lr, ctx)
    lrb = log_ratio.clone().requires_grad_()
    gi = group_index.tolist()
    if variant == "kl_correct":
        want = torch.where(m > 0, lrb + kl, torch.zeros_like(lrb))
    else:
        seg = {"seq_standardize": lambda b, t: b, "group_standardize": lambda b, t: gi[b],
               "position_standardize": lambda b, t: (gi[b], t)}[variant]
        want = brute_standardize(lrb, m, seg, 0.2, 1e-8, 0.2 if min_std is None else min_std)
    close(out, want, what="value")
    assert out.shape == log_ratio.shape
    up = torch.randn(B, T, generator=g, dtype=F64)
    close(grad_of((out * up).sum(), lr), grad_of((want * up).sum(), lrb), what="d log_ratio")
    if variant == "kl_correct":  # the KL is added detached
        assert grad_of((out * up).sum(), ctx.stats["kl_old_full"]).abs().sum() == 0
    assert set(metrics) == {"pre_ratio_mean", "pre_ratio_std", "post_ratio_mean", "post_ratio_std", "clipfrac_pos", "clipfrac_neg"}
    assert all(isinstance(v, float) for v in metrics.values())
    valid = m > 0
    r_pre, r_post = torch.exp(log_ratio)[valid], torch.exp(want.detach())[valid]
    close(metrics["pre_ratio_mean"], r_pre.mean())
    close(metrics["post_ratio_std"], r_post.std(unbiased=False))
    rp = torch.exp(want.detach())
    outside = (rp < 0.8) | (rp > 1.28)
    for name, sgn in (("pos", d0["advantages"] > 0), ("neg", d0["advantages"] < 0)):
        sel = valid & sgn
        close(metrics[f"clipfrac_{name}"], float((outside & sel).sum()) / max(float(sel.sum()), 1.0))


@pytest.mark.parametrize("variant", ["kl_correct", "seq_standardize", "group_standardize", "position_standardize"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_grpo_guard_identity_at_pi_old(variant, dtype):
    """pi_theta == pi_old: log-ratio 0 and KL 0 -> transformed log-ratio exactly 0 (ratio exactly 1)."""
    d0 = rand_batch(9, B=6, T=5, group_size=2)
    m = d0["mask"].to(dtype)
    lr = torch.zeros(6, 5, dtype=dtype, requires_grad=True)
    ctx = make_ctx(d0["logprobs"].to(dtype), m, {"kl_old_full": torch.zeros(6, 5, dtype=dtype)},
                   advantages=d0["advantages"].to(dtype), group_index=d0["group_index"])
    out, metrics = GrpoGuard(GrpoGuardParams(variant=variant), "grpo_guard").transform_log_ratio(lr, ctx)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(torch.exp(out), torch.ones_like(out))
    assert metrics["post_ratio_mean"] == 1.0 and metrics["post_ratio_std"] == 0.0
    assert metrics["clipfrac_pos"] == metrics["clipfrac_neg"] == 0.0


@pytest.mark.parametrize("variant", ["seq_standardize", "group_standardize", "position_standardize"])
def test_grpo_guard_standardize_never_amplifies_the_gradient_by_default(variant):
    """On-policy every log-ratio is exactly 0 (std 0): the default floor (min_std = target_std) keeps the
    gradient of log r_hat at <= 1x that of log r; the literal form (min_std 0) scales it by target_std / eps."""
    d0 = rand_batch(3, B=6, T=5, group_size=2)
    m = d0["mask"]
    for min_std, scale in ((None, 1.0), (0.0, 0.1 / 1e-8)):
        lr = torch.zeros(6, 5, dtype=F64, requires_grad=True)
        ctx = make_ctx(d0["logprobs"], m, {}, advantages=d0["advantages"], group_index=d0["group_index"])
        term = GrpoGuard(GrpoGuardParams(variant=variant, min_std=min_std), "grpo_guard")
        out, _ = term.transform_log_ratio(lr, ctx)
        assert torch.equal(out, torch.zeros_like(out))
        g = grad_of(out.sum(), lr)
        close(g, scale * (m > 0).to(F64), tol=1e-6, what=str(min_std))  # mean and std are detached
    g = torch.Generator().manual_seed(4)
    lr = (torch.randn(6, 5, generator=g, dtype=F64) * torch.tensor([0.01, 0.05, 1.0, 3.0, 0.5, 0.02], dtype=F64)[:, None])
    ctx = make_ctx(d0["logprobs"], m, {}, advantages=d0["advantages"], group_index=d0["group_index"])
    out, _ = GrpoGuard(GrpoGuardParams(variant="seq_standardize"), "grpo_guard").transform_log_ratio(lr, ctx)
    shrunk = 0
    for b in range(6):
        v = m[b] > 0
        if int(v.sum()) > 1:
            sd = float(lr[b][v].std(unbiased=False))
            close(out[b][v].std(unbiased=False), 0.1 * sd / max(sd + 1e-8, 0.1), tol=1e-9, what=f"row {b}")
            shrunk += sd > 0.1
    assert shrunk >= 1  # wide rows are shrunk to target_std, narrow ones only centred


def test_grpo_guard_config_checks():
    from alignreg.config import ConfigError, RLConfig, from_dict

    with pytest.raises(ConfigError, match="min_std: 0 with eps 0"):
        from_dict(RLConfig, {"regularizers": [{"name": "grpo_guard", "params": {"variant": "seq_standardize", "min_std": 0, "eps": 0}}]})
    group = [{"name": "grpo_guard", "params": {"variant": "group_standardize"}}]
    base = {"rollout": {"group_size": 8, "prompts_per_step": 16}, "regularizers": group}
    with pytest.raises(ConfigError, match=r"micro_batch_size \(4\).*multiples of rollout.group_size \(8\)"):
        from_dict(RLConfig, {**base, "learner": {"micro_batch_size": 4}})
    with pytest.raises(ConfigError, match=r"mini_batch_size / ray.learner_ranks \(32 / 8\)"):
        from_dict(RLConfig, {**base, "learner": {"micro_batch_size": 8, "mini_batch_size": 32},
                             "orchestration": "ray", "ray": {"learner_ranks": 8}})
    from_dict(RLConfig, {**base, "learner": {"micro_batch_size": 16, "mini_batch_size": 64},
                         "orchestration": "ray", "ray": {"learner_ranks": 4}})
    from_dict(RLConfig, {**base, "learner": {"micro_batch_size": 4, "mini_batch_size": 32}, "regularizers": [{"name": "grpo_guard"}]})  # kl_correct: per token


@pytest.mark.parametrize("variant", ["kl_correct", "seq_standardize", "group_standardize"])
def test_grpo_guard_is_refused_when_every_update_is_on_policy(variant):
    """pi_theta = pi_old makes every r_hat exactly 1: the term would train the plain loss at extra cost."""
    from alignreg.config import ConfigError, RLConfig, from_dict

    base = {"rollout": {"group_size": 8, "prompts_per_step": 16},
            "regularizers": [{"name": "grpo_guard", "params": {"variant": variant}}]}
    for learner in ({}, {"mini_batch_size": 128}):  # 0 = the whole batch of 128 responses
        with pytest.raises(ConfigError, match=r"'grpo_guard' transforms the importance ratio .* on-policy .*"
                                              r"learner.mini_batch_size to a divisor of 128 .* or learner.ppo_epochs > 1"):
            from_dict(RLConfig, {**base, "learner": {"micro_batch_size": 8, **learner}})
    from_dict(RLConfig, {**base, "learner": {"micro_batch_size": 8, "mini_batch_size": 64}})  # two updates
    from_dict(RLConfig, {**base, "learner": {"micro_batch_size": 8, "ppo_epochs": 2}})  # second epoch off-policy
    from_dict(RLConfig, {**base, "learner": {"micro_batch_size": 8, "mini_batch_size": 32}, "regularizers": []})  # not active: no check
    from_dict(RLConfig, {**base, "learner": {"micro_batch_size": 8}, "regularizers": [{"name": "grpo_guard", "coef": 0.0}]})
    # SCoRe trains both attempts (256 rows): a 128-response mini-batch is two updates, 0 is one
    score = {**base, "score": {"enabled": True}, "regularizers": [*base["regularizers"], {"name": "score"}]}
    from_dict(RLConfig, {**score, "learner": {"micro_batch_size": 8, "mini_batch_size": 128}})
    with pytest.raises(ConfigError, match="on-policy"):
        from_dict(RLConfig, {**score, "learner": {"micro_batch_size": 8}})


# ------------------------------------------------------------------------------------------------
# clipped PG loss
# ------------------------------------------------------------------------------------------------
def test_unclipped_tokens_skip_the_dual_clip_bound():
    """Lp-Reg's regularised tokens keep the plain -A r, without the dual-clip bound -A c that the other
    negative-advantage tokens get (the official compute_policy_loss_lp_reg has no dual-clip)."""
    out = clipped_pg_loss(torch.full((1, 2), math.log(10.0), dtype=F64), -torch.ones(1, 2, dtype=F64), 0.2, 0.2,
                          dual_clip_c=3.0, unclipped_mask=torch.tensor([[False, True]]))
    close(out.loss, torch.tensor([[3.0, 10.0]], dtype=F64), what="loss")


@pytest.mark.parametrize("dual_c", [0.0, 3.0])
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28), (1.0, 9.0)])
def test_clipped_pg_loss(eps_low, eps_high, dual_c):
    g = torch.Generator().manual_seed(11)
    B, T = 4, 25
    log_ratio = torch.randn(B, T, generator=g, dtype=F64) * 0.8
    adv = torch.randn(B, T, generator=g, dtype=F64) * 2
    adv[0, :3] = 0.0
    unc = torch.rand(B, T, generator=g) < 0.2
    isw = torch.rand(B, T, generator=g, dtype=F64) * 2
    for use_unc in (False, True):
        for use_is in (False, True):
            lr = log_ratio.clone().requires_grad_()
            out = clipped_pg_loss(lr, adv, eps_low, eps_high, dual_c, unc if use_unc else None, isw if use_is else None)
            lrb = log_ratio.clone().requires_grad_()
            want = torch.zeros(B, T, dtype=F64)
            clipped = torch.zeros(B, T)
            dual = torch.zeros(B, T)
            rows = []
            for b in range(B):
                row = []
                for t in range(T):
                    r, A = torch.exp(lrb[b, t]), float(adv[b, t])
                    rc = r.clamp(1 - eps_low, 1 + eps_high)
                    pg1, pg2 = -A * r, -A * rc
                    f1, f2 = pg1.item(), pg2.item()
                    v = pg1 if f1 >= f2 else pg2
                    clipped[b, t] = float(f2 > f1)
                    if dual_c > 0 and A < 0 and max(f1, f2) > -A * dual_c:
                        v = v * 0 + (-A * dual_c)
                        dual[b, t] = 1.0
                    if use_unc and unc[b, t]:
                        v = pg1
                    if use_is:
                        v = v * float(isw[b, t])
                    row.append(v)
                rows.append(torch.stack(row))
            want = torch.stack(rows)
            close(out.loss, want, what=f"loss unc={use_unc} is={use_is}")
            up = torch.randn(B, T, generator=g, dtype=F64)
            close(grad_of((out.loss * up).sum(), lr), grad_of((want * up).sum(), lrb), what="grad")
            assert torch.equal(out.metrics["clipfrac"], clipped.to(out.metrics["clipfrac"].dtype))
            assert torch.equal(out.metrics["dual_clipfrac"], dual.to(out.metrics["dual_clipfrac"].dtype))
    if dual_c > 0:
        assert dual.sum() > 0
    # clip-higher asymmetry: r = 1.25, A > 0 is clipped at 1.2 but not at 1.28
    r = torch.tensor([[math.log(1.25)]], dtype=F64)
    a = torch.ones(1, 1, dtype=F64)
    clip_hi = clipped_pg_loss(r, a, eps_low, eps_high).loss.item()
    assert clip_hi == pytest.approx(-min(1.25, 1 + eps_high))


# ------------------------------------------------------------------------------------------------
# advantages
# ------------------------------------------------------------------------------------------------
def brute_adv(name, rewards, group, eps=1e-6):
    out = []
    for i, r in enumerate(rewards):
        same = [rewards[j] for j in range(len(rewards)) if group[j] == group[i]]
        G, mu = len(same), statistics.fmean(same)
        if G == 1:
            out.append(0.0)
        elif name == "grpo":
            out.append((r - mu) / (statistics.stdev(same) + eps))
        elif name == "drgrpo":
            out.append(r - mu)
        else:
            others = [rewards[j] for j in range(len(rewards)) if group[j] == group[i] and j != i]
            out.append(r - statistics.fmean(others))
    return out


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_advantages(name):
    g = torch.Generator().manual_seed(2)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 5])  # sizes 4, 2, 1, 3, (gap), 1
    rewards = torch.randn(len(group), generator=g, dtype=F64)
    rewards[7:10] = 0.5  # equal rewards in a group -> 0
    for dtype in (F64, torch.float32):
        adv = compute_advantages(name, rewards.to(dtype), group)
        assert adv.dtype == dtype and adv.shape == rewards.shape
        want = brute_adv(name, rewards.tolist(), group.tolist())
        tol = 1e-10 if dtype == F64 else 1e-5
        close(adv, want, tol=tol, what=name)
        assert adv[6] == 0 and adv[10] == 0 and torch.all(adv[7:10] == 0)
    # binary rewards, the common case
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    grp = torch.tensor([0, 0, 0, 0, 1, 1])
    close(compute_advantages(name, r, grp), brute_adv(name, r.tolist(), grp.tolist()), tol=1e-6)


def test_grpo_advantages_with_eps_zero_are_zero_for_equal_rewards():
    """algorithm.adv_eps: 0 is valid: a group of equal rewards (std 0) gets 0, not 0/0 = NaN; even when
    the mean of equal non-binary rewards rounds (0.1 x 3 / 3 != 0.1), which would make std tiny, not 0."""
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    grp = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # group 1: mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5
    close(compute_advantages("grpo", r, grp, 0.0), [0.0] * 4 + [-0.5, 1.5, -0.5, -0.5], tol=1e-6)
    for dtype in (F64, torch.float32):
        tied = compute_advantages("grpo", torch.tensor([0.1, 0.1, 0.1, 0.7, 0.3], dtype=dtype), torch.tensor([0, 0, 0, 1, 1]), 0.0)
        close(tied, [0.0, 0.0, 0.0, 1 / math.sqrt(2), -1 / math.sqrt(2)], tol=1e-6)
