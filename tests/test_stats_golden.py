"""Golden tests of the chunked token statistics (alignreg.losses.stats.token_stats).

Every statistic's value and gradient (w.r.t. hidden, weight and bias) is compared with an
independent float64 brute force over the full ``[N, V]`` softmax, written from the official
formulas in REGULARIZERS.md (SIREN §3.1: stable descending sort + cumsum + searchsorted-left,
+1e-12 epsilons; Lp-Reg §4.1: min-p on raw logits, -1e4 fill, then / T; KL forms of §5.6).
"""
import itertools
import math

import pytest
import torch

from alignreg.losses.stats import StatsSpec, token_stats

DIFF = ("logprobs", "entropy", "top_p_entropy", "kl_ref_full")  # differentiable outputs
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


# ------------------------------------------------------------------------------------------------
# brute force (float64, no chunking)
# ------------------------------------------------------------------------------------------------
def siren_top_p_entropy(u: torch.Tensor, p: float, k: int) -> torch.Tensor:
    """Official ``efficient_top_p_sampling`` entropy on temperature-scaled logits ``u`` [N, V]."""
    probs = torch.softmax(u, -1)
    sp = torch.sort(probs, dim=-1, descending=True, stable=True).values[:, : min(k, u.shape[-1])]
    c = torch.cumsum(sp, -1)
    n = torch.searchsorted(c.detach().contiguous(), torch.full((u.shape[0], 1), p, dtype=c.dtype), right=False)
    keep = torch.arange(sp.shape[-1])[None, :] < n
    kept = sp * keep
    q = kept / (kept.sum(-1, keepdim=True) + 1e-12)
    return -(q * torch.log(q + 1e-12)).sum(-1)


def brute_stats(h, w, b, y, spec: StatsSpec, ref=None, old=None) -> dict:
    T = spec.temperature
    raw = h @ w.t() + (b if b is not None else 0.0)
    logp = torch.log_softmax(raw / T, -1)
    pr = logp.exp()
    out = {"logprobs": logp.gather(-1, y[:, None]).squeeze(-1)}
    if spec.entropy:
        out["entropy"] = -(pr * logp).sum(-1)
    if spec.top_p is not None:
        out["top_p_entropy"] = siren_top_p_entropy(raw / T, *spec.top_p)
    if spec.kl_ref:
        rh, rw, rb = ref
        lr = torch.log_softmax((rh @ rw.t() + (rb if rb is not None else 0.0)) / T, -1)
        out["kl_ref_full"] = (pr * (logp - lr)).sum(-1)
        out["ref_logprobs"] = lr.gather(-1, y[:, None]).squeeze(-1).detach()
    if spec.kl_old:
        oh, ow, ob = old
        lo = torch.log_softmax((oh @ ow.t() + (ob if ob is not None else 0.0)) / T, -1)
        out["kl_old_full"] = (lo.exp() * (lo - logp)).sum(-1).detach()
    if spec.min_p is not None:
        with torch.no_grad():
            P = torch.softmax(raw, -1)  # BEFORE temperature
            keep = P >= spec.min_p * P.max(-1, keepdim=True).values
            zf = torch.where(keep, raw, torch.full_like(raw, -1e4)) / T
            out["min_p_logprobs"] = torch.log_softmax(zf, -1).gather(-1, y[:, None]).squeeze(-1)
    return out


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def make_inputs(seed, N=7, H=5, V=11, dtype=torch.float64, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    h, w = r(N, H) * scale, r(V, H)
    b = r(V) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    ref = (r(N, H), r(V, H), r(V) if bias else None)
    old = (h + 0.3 * r(N, H), w + 0.3 * r(V, H), (b + 0.3 * r(V)) if bias else None)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(h=h.to(dtype), w=w.to(dtype), b=cast(b), y=y,
                ref=tuple(cast(t) for t in ref), old=tuple(cast(t) for t in old))


def run_lib(inp, spec, chunk):
    h = inp["h"].clone().requires_grad_()
    w = inp["w"].clone().requires_grad_()
    b = None if inp["b"] is None else inp["b"].clone().requires_grad_()
    out = token_stats(h, w, inp["y"], spec, bias=b, ref=inp["ref"] if spec.kl_ref else None,
                      old=inp["old"] if spec.kl_old else None, chunk_size=chunk)
    return out, (h, w, b)


def run_brute(inp, spec):
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    h, w = d(inp["h"]).requires_grad_(), d(inp["w"]).requires_grad_()
    b = None if inp["b"] is None else d(inp["b"]).requires_grad_()
    ref = tuple(d(t) for t in inp["ref"]) if inp["ref"] else None
    old = tuple(d(t) for t in inp["old"]) if inp["old"] else None
    return brute_stats(h, w, b, inp["y"], spec, ref, old), (h, w, b)


def grads(outs, leaves, upstream):
    """d(sum_k <upstream_k, outs_k>)/d leaves (zeros for leaves not reached)."""
    loss = sum((outs[k] * upstream[k].to(outs[k].dtype)).sum() for k in upstream)
    live = [x for x in leaves if x is not None]
    gs = torch.autograd.grad(loss, live, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if gr is None else gr for x, gr in zip(live, gs)]


def assert_close(a, b, dtype, what):
    torch.testing.assert_close(a.double(), b.double(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


SPEC_ALL = dict(entropy=True, kl_ref=True, kl_old=True)


# ------------------------------------------------------------------------------------------------
# values and gradients on random inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 3, 7, 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_and_grads_match_brute_force(seed, chunk, temperature, dtype):
    top_p = [(0.8, 10000), (0.9, 3), (0.6, 11)][seed]  # k > V, k < nucleus, k == V
    min_p = [0.1, 0.02, 1.0][seed]
    spec = StatsSpec(top_p=top_p, min_p=min_p, temperature=temperature, **SPEC_ALL)
    inp = make_inputs(seed, dtype=dtype, bias=seed != 1, scale=1.0 + seed)
    out, leaves = run_lib(inp, spec, chunk)
    ref, rleaves = run_brute(inp, spec)
    assert list(out) == spec.names()
    for k in spec.names():
        assert out[k].shape == (7,) and out[k].dtype == dtype
        assert_close(out[k], ref[k], dtype, k)
    assert not out["min_p_logprobs"].requires_grad
    # gradients: all differentiable outputs at once, then each alone
    g = torch.Generator().manual_seed(100 + seed)
    up = {k: torch.randn(7, generator=g, dtype=torch.float64) for k in DIFF}
    for sel in [DIFF] + [(k,) for k in DIFF]:
        upstream = {k: up[k] for k in sel}
        got = grads(out, leaves, upstream)
        want = grads(ref, rleaves, upstream)
        for name, a, b_ in zip(("hidden", "weight", "bias"), got, want):
            assert a.dtype == dtype
            assert_close(a, b_, dtype, f"d{name} of {sel}")


def test_both_row_kinds_covered():
    """The random cases above contain rows with an empty nucleus and rows with a non-trivial one."""
    kinds = set()
    for seed in range(3):
        inp = make_inputs(seed, scale=1.0 + seed)
        ref, _ = run_brute(inp, StatsSpec(top_p=[(0.8, 10000), (0.9, 3), (0.6, 11)][seed]))
        kinds |= {bool(v > 0) for v in ref["top_p_entropy"]}
    assert kinds == {True, False}


def test_kl_old_and_min_p_outputs_are_non_differentiable():
    """The docstring: ``kl_old_full`` and ``min_p_logprobs`` are returned without gradient.

    BUG (stats.py ``_TokenStats.forward``): ``ctx.mark_non_differentiable`` is called once per
    output in a loop; each call *replaces* the previous set, so with both statistics requested
    only ``min_p_logprobs`` is marked and ``kl_old_full`` comes back with ``requires_grad=True``
    (its gradient is then silently dropped in backward).
    """
    inp = make_inputs(0)
    for spec in (StatsSpec(kl_old=True), StatsSpec(min_p=0.1), StatsSpec(kl_old=True, min_p=0.1), StatsSpec(kl_ref=True, min_p=0.1)):
        out, _ = run_lib(inp, spec, 3)
        for k in ("kl_old_full", "min_p_logprobs", "ref_logprobs"):
            if k in out:
                assert not out[k].requires_grad, f"{k} requires grad with {spec.names()}"


# ------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------
def eye_inputs(logits: torch.Tensor, y=None):
    """hidden = logits, weight = I: the logits are exact (ties stay exact)."""
    N, V = logits.shape
    return dict(h=logits.double(), w=torch.eye(V, dtype=torch.float64), b=None,
                y=torch.zeros(N, dtype=torch.long) if y is None else y, ref=None, old=None)


@pytest.mark.parametrize("chunk", [1, 2, 10])
def test_top1_above_p_gives_zero_entropy_and_zero_grad(chunk):
    logits = torch.tensor([[8.0, 0.0, 0.1, -1.0, 0.5], [0.3, 0.1, 0.0, -0.2, 0.2], [0.0, 0.0, 9.0, 0.0, 0.0]])
    inp = eye_inputs(logits)
    spec = StatsSpec(top_p=(0.8, 10000))
    assert float(torch.softmax(logits, -1)[0].max()) >= 0.8
    out, leaves = run_lib(inp, spec, chunk)
    ref, rleaves = run_brute(inp, spec)
    assert out["top_p_entropy"][0] == 0 and out["top_p_entropy"][2] == 0
    assert out["top_p_entropy"][1] > 0
    assert_close(out["top_p_entropy"], ref["top_p_entropy"], torch.float64, "H")
    dh, dw = grads(out, leaves, {"top_p_entropy": torch.ones(3, dtype=torch.float64)})
    assert torch.count_nonzero(dh[[0, 2]]) == 0
    assert dh[1].abs().sum() > 0
    assert_close(dh, grads(ref, rleaves, {"top_p_entropy": torch.ones(3, dtype=torch.float64)})[0], torch.float64, "dh")


def test_top_k_caps_the_nucleus():
    # uniform row: the nucleus would hold 7 of 10 tokens; top_k = 3 keeps the first 3 (stable order)
    logits = torch.zeros(2, 10)
    logits[1] = torch.linspace(1.0, 0.0, 10)
    inp = eye_inputs(logits)
    for k in (1, 3, 10, 50):
        spec = StatsSpec(top_p=(0.75, k))
        out, leaves = run_lib(inp, spec, 1)
        ref, rleaves = run_brute(inp, spec)
        n_uniform = min(k, 7)  # cumsum 0.1 * j < 0.75  <=>  j <= 7
        assert out["top_p_entropy"][0].item() == pytest.approx(math.log(n_uniform) if n_uniform > 1 else 0.0, abs=1e-9)
        assert_close(out["top_p_entropy"], ref["top_p_entropy"], torch.float64, f"H k={k}")
        up = {"top_p_entropy": torch.tensor([0.7, -1.3], dtype=torch.float64)}
        assert_close(grads(out, leaves, up)[0], grads(ref, rleaves, up)[0], torch.float64, f"dh k={k}")


def test_ties_at_the_nucleus_boundary_go_to_lower_index():
    # ties (value 1.0) at indices 0, 2, 4; the top token is index 3
    row = torch.tensor([1.0, -0.5, 1.0, 2.0, 1.0, -1.0], dtype=torch.float64)
    sp = torch.sort(torch.softmax(row, -1), descending=True).values
    c = sp.cumsum(-1)
    p_boundary = float((c[1] + c[2]) / 2)  # n = 2: the top token and ONE of the three tied tokens
    inp = eye_inputs(row[None].repeat(2, 1))
    spec = StatsSpec(top_p=(p_boundary, 10000))
    out, leaves = run_lib(inp, spec, 1)
    ref, rleaves = run_brute(inp, spec)
    assert_close(out["top_p_entropy"], ref["top_p_entropy"], torch.float64, "H")
    up = {"top_p_entropy": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    dh = grads(out, leaves, up)[0]
    assert_close(dh, grads(ref, rleaves, up)[0], torch.float64, "dh")
    # only tokens 3 and 0 are in the nucleus: non-kept tokens get no gradient from H_K
    assert torch.all(dh[:, [1, 2, 4, 5]] == 0) and torch.all(dh[:, [0, 3]] != 0)
    # two of three tied tokens kept: n = 3 -> tokens 3, 0, 2
    spec3 = StatsSpec(top_p=(float((c[2] + c[3]) / 2), 10000))
    out3, leaves3 = run_lib(inp, spec3, 2)
    dh3 = grads(out3, leaves3, up)[0]
    ref3, rleaves3 = run_brute(inp, spec3)
    assert_close(dh3, grads(ref3, rleaves3, up)[0], torch.float64, "dh n=3")
    assert torch.all(dh3[:, [1, 4, 5]] == 0)


@pytest.mark.parametrize("chunk", [1, 2, 3, 9, 50])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_ties_mixed_rows_in_a_chunk(seed, chunk):
    """Logits on a coarse grid (as bf16 logits are): ties at the nucleus boundary in some rows, none in
    others, mixed inside one chunk. Each row's nucleus must not depend on its chunk neighbours.

    BUG (stats.py ``nucleus_mask``): when any row of the chunk is "ambiguous" (more tied tokens at
    the threshold than places left), only those rows get their tied tokens added; every other row of
    the same chunk loses its threshold token(s) (``keep |= eq`` is skipped), so its nucleus is one
    token short and H / dH depend on the chunking."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.round(torch.randn(9, 11, generator=g, dtype=torch.float64) * 6) / 4
    logits[0] = torch.tensor([1.0, -0.5, 1.0, 2.0, 1.0, -1.0, -2, -2, -2, -2, -2], dtype=torch.float64)
    inp = eye_inputs(logits, torch.randint(0, 11, (9,), generator=g))
    sp = torch.sort(torch.softmax(logits[0], -1), descending=True).values
    c = sp.cumsum(-1)
    spec = StatsSpec(top_p=(float((c[1] + c[2]) / 2), 10000), entropy=True)  # row 0: ambiguous tie
    out, leaves = run_lib(inp, spec, chunk)
    ref, rleaves = run_brute(inp, spec)
    assert_close(out["top_p_entropy"], ref["top_p_entropy"], torch.float64, "H")
    up = {"top_p_entropy": torch.randn(9, generator=g, dtype=torch.float64), "logprobs": torch.randn(9, generator=g, dtype=torch.float64)}
    for a, b_, what in zip(grads(out, leaves, up), grads(ref, rleaves, up), ("dh", "dw")):
        assert_close(a, b_, torch.float64, what)


def test_min_p_ties_and_filtered_target():
    # two tied maxima, kappa = 1 keeps exactly those; a filtered target gets ~ -1e4 / T
    row = torch.tensor([[2.0, 2.0, 0.0, 1.0]], dtype=torch.float64)
    for T in (1.0, 0.7):
        for y, want in ((0, -math.log(2.0)), (2, -1e4 / T - math.log(2.0) - 2.0 / T)):
            inp = eye_inputs(row, torch.tensor([y]))
            spec = StatsSpec(min_p=1.0, temperature=T)
            out, _ = run_lib(inp, spec, 1)
            ref, _ = run_brute(inp, spec)
            assert out["min_p_logprobs"].item() == pytest.approx(want, rel=1e-12)
            assert_close(out["min_p_logprobs"], ref["min_p_logprobs"], torch.float64, "min_p")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empty_input(dtype):
    spec = StatsSpec(top_p=(0.8, 100), min_p=0.1, **SPEC_ALL)
    inp = make_inputs(0, N=0, dtype=dtype)
    for chunk in (0, 1, 4):
        out, leaves = run_lib(inp, spec, chunk)
        assert all(v.shape == (0,) for v in out.values())
        gs = grads(out, leaves, {k: torch.zeros(0) for k in DIFF})
        assert [g_.shape for g_ in gs] == [(0, 5), (11, 5), (11,)]
        assert all(torch.count_nonzero(g_) == 0 for g_ in gs)


def test_chunk_size_does_not_change_anything():
    """Exact agreement (float64) of every chunking, including the automatic one."""
    spec = StatsSpec(top_p=(0.8, 5), min_p=0.05, temperature=0.7, **SPEC_ALL)
    inp = make_inputs(3, N=13)
    up = {k: torch.randn(13, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) for k in DIFF}
    base = None
    for chunk in (0, 1, 2, 5, 13, 100):
        out, leaves = run_lib(inp, spec, chunk)
        vals = [out[k] for k in spec.names()] + grads(out, leaves, up)
        if base is None:
            base = vals
        for a, b_ in itertools.zip_longest(vals, base):
            torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# precomputed forward (the learner's first update of a step reuses its no-grad pass)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precomputed_forward_gives_identical_values_and_grads(seed, chunk):
    """``token_stats(..., precomputed=token_stats_forward(...))`` skips the forward; values and
    gradients must equal the ordinary call bit for bit, also when the no-grad pass computed a
    superset (min-p proxy, kl_old). Slicing to a subset of rows is tested with chunk 1: with other
    chunkings the row groups differ and matmul rounding may differ in the last bit (the learner
    runs both passes on the same micro-batch and chunk size)."""
    from alignreg.losses.stats import token_stats_forward

    spec = StatsSpec(top_p=[(0.8, 10000), (0.9, 3), (0.6, 11)][seed], entropy=True, kl_ref=True, temperature=0.7)
    wide = StatsSpec(top_p=spec.top_p, entropy=True, kl_ref=True, kl_old=True, min_p=0.1, temperature=0.7)
    inp = make_inputs(seed, N=9, bias=seed != 1, scale=1.0 + seed)
    full = token_stats_forward(inp["h"], inp["w"], inp["y"], wide, bias=inp["b"], ref=inp["ref"], old=inp["old"],
                               chunk_size=chunk)
    rows = torch.tensor([0, 2, 3, 5, 8]) if chunk == 1 else torch.arange(9)
    sub = dict(inp, h=inp["h"][rows], y=inp["y"][rows], ref=(inp["ref"][0][rows],) + inp["ref"][1:])
    plain, leaves = run_lib(sub, spec, chunk)
    h = sub["h"].clone().requires_grad_()
    w = sub["w"].clone().requires_grad_()
    b = None if sub["b"] is None else sub["b"].clone().requires_grad_()
    pre = token_stats(h, w, sub["y"], spec, bias=b, ref=sub["ref"], chunk_size=chunk, precomputed=full.rows(rows))
    up = {k: torch.randn(len(rows), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) for k in DIFF}
    for k in spec.names():
        assert torch.equal(pre[k], plain[k]), k
    for a, b_ in zip(grads(pre, (h, w, b), up), grads(plain, leaves, up)):
        assert torch.equal(a, b_)


def test_precomputed_must_cover_the_spec():
    from alignreg.losses.stats import token_stats_forward

    inp = make_inputs(0)
    pre = token_stats_forward(inp["h"], inp["w"], inp["y"], StatsSpec(entropy=True))
    with pytest.raises(ValueError, match="do not cover"):
        token_stats(inp["h"], inp["w"], inp["y"], StatsSpec(entropy=True, top_p=(0.8, 10)), precomputed=pre)
    with pytest.raises(ValueError, match="not for these 3 tokens"):
        token_stats(inp["h"][:3], inp["w"], inp["y"][:3], StatsSpec(entropy=True), precomputed=pre)


@pytest.mark.parametrize("first_k", [1, 3, 6, 512])
@pytest.mark.parametrize("top_k", [4, 8, 20])
def test_nucleus_stages_agree_with_the_full_sort(first_k, top_k):
    """Every path of ``nucleus_stats`` (top-1 >= p, the small sorted top-k, the unsorted full top-k
    with and without the crossing inside it) gives the full stable sort's n, threshold, mass and H."""
    from alignreg.losses.stats import nucleus_stats

    g = torch.Generator().manual_seed(first_k + top_k)
    u = torch.randn(64, 40, generator=g, dtype=torch.float64) * torch.linspace(0.05, 6, 64, dtype=torch.float64)[:, None]
    p = torch.softmax(u, -1)
    n, thr, S, H = nucleus_stats(p, 0.8, top_k, first_k=first_k)
    sp = torch.sort(p, dim=-1, descending=True, stable=True).values[:, :top_k]
    n_want = (sp.cumsum(-1) < 0.8).sum(-1)
    assert torch.equal(n, n_want)
    assert {int(x) for x in n} >= {0, top_k} and any(0 < int(x) < top_k for x in n)  # all paths taken
    keep = torch.arange(sp.shape[-1])[None] < n_want[:, None]
    S_want = torch.where(n_want > 0, (sp * keep).sum(-1), torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close(S, S_want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(H, siren_top_p_entropy(u, 0.8, top_k), rtol=1e-9, atol=1e-10)
    thr_want = torch.where(n_want > 0, sp.gather(-1, (n_want - 1).clamp(min=0)[:, None]).squeeze(-1), torch.tensor(math.inf, dtype=torch.float64))
    assert torch.equal(thr, thr_want)
