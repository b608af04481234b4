"""The loss aggregator: every mode against a brute force, and invariance of values and gradients
under micro-batching / gradient accumulation and data-parallel sharding with the GLOBAL AggNorm."""
import pytest
import torch

from alignreg.losses.aggregate import AGG_MODES, aggregate, local_norm
from alignreg.regularizers import AggNorm

F64 = torch.float64


def batch(seed, B=7, T=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[2] = 0  # fully-masked row
    mask = (torch.arange(T)[None] < lengths[:, None]).to(F64)
    x = torch.randn(B, T, generator=g, dtype=F64)
    x[mask == 0] = 1e3  # garbage in padding must not leak
    return x, mask


def brute(x, mask, mode, L):
    B, T = x.shape
    per_row = []
    for b in range(B):
        toks = [x[b, t] for t in range(T) if mask[b, t] > 0]
        s = sum(toks, torch.zeros((), dtype=F64))
        if mode == "token-mean":
            per_row.append(s)
        elif mode == "seq-mean-token-mean":
            per_row.append(s / len(toks) if toks else s)
        elif mode == "seq-mean-token-sum":
            per_row.append(s)
        else:
            per_row.append(s / L)
    total = sum(per_row, torch.zeros((), dtype=F64))
    return total / (mask.sum() if mode == "token-mean" else B)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_modes_match_brute_force(seed, mode):
    x, mask = batch(seed)
    for L in (None, 10.0):
        xl = x.clone().requires_grad_()
        got = aggregate(xl, mask, mode, local_norm(mask, L))
        xb = x.clone().requires_grad_()
        want = brute(xb, mask, mode, L if L is not None else x.shape[1])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        (g1,) = torch.autograd.grad(got, xl)
        (g2,) = torch.autograd.grad(want, xb)
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
        assert torch.all(g1[mask == 0] == 0)


def test_bool_mask_and_unknown_mode():
    x, mask = batch(3)
    for mode in AGG_MODES:
        torch.testing.assert_close(aggregate(x, mask > 0, mode, local_norm(mask)), aggregate(x, mask, mode, local_norm(mask)))
    with pytest.raises(ValueError, match="valid: token-mean"):
        aggregate(x, mask, "sum", local_norm(mask))


def test_empty_batch_is_zero():
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=F64)
    for mode in AGG_MODES:
        out = aggregate(x, mask, mode, local_norm(mask))
        assert out.item() == 0.0
        assert torch.autograd.grad(out, x)[0].abs().sum() == 0


def split_rows(B, size):
    return [slice(s, min(s + size, B)) for s in range(0, B, size)]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("micro", [1, 3, 7])
def test_micro_batch_invariance(mode, micro):
    x, mask = batch(4)
    norm = local_norm(mask, 12.0)  # GLOBAL normaliser of the mini-batch
    xw = x.clone().requires_grad_()
    whole = aggregate(xw, mask, mode, norm)
    (g_whole,) = torch.autograd.grad(whole, xw)
    xm = x.clone().requires_grad_()
    parts = [aggregate(xm[r], mask[r], mode, norm) for r in split_rows(x.shape[0], micro)]
    acc = torch.zeros_like(x)
    for p in parts:  # gradient accumulation: one backward per micro-batch
        acc += torch.autograd.grad(p, xm, retain_graph=True)[0]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc, g_whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_data_parallel_shards(mode):
    """Two ranks, each with its own rows (and its own micro-batches), using the global AggNorm
    obtained by summing counts over ranks; the all-reduced (summed) gradient of shared parameters
    equals the single-process gradient."""
    g = torch.Generator().manual_seed(6)
    B, T, H = 8, 5, 3
    feats = torch.randn(B, T, H, generator=g, dtype=F64)
    lengths = torch.tensor([5, 0, 3, 1, 5, 2, 4, 0])
    mask = (torch.arange(T)[None] < lengths[:, None]).to(F64)
    w0 = torch.randn(H, generator=g, dtype=F64)

    def values(w, rows):
        return torch.tanh(feats[rows] @ w) ** 2  # per-token values from a shared parameter

    w = w0.clone().requires_grad_()
    single = aggregate(values(w, slice(0, B)), mask, mode, local_norm(mask, 9.0))
    (g_single,) = torch.autograd.grad(single, w)

    shards = [slice(0, 3), slice(3, 8)]  # uneven shards
    counts = [torch.tensor([float(mask[s].sum()), float(mask[s].shape[0])], dtype=F64) for s in shards]
    total = sum(counts)  # all_reduce_sum
    norm = AggNorm(num_tokens=float(total[0]), num_seqs=float(total[1]), norm_len=9.0)
    grads, value = [], 0.0
    for s in shards:
        wr = w0.clone().requires_grad_()  # replica
        gr = torch.zeros_like(wr)
        for r in split_rows(s.stop - s.start, 2):  # micro-batches within the rank
            rows = slice(s.start + r.start, s.start + r.stop)
            loss = aggregate(values(wr, rows), mask[rows], mode, norm)
            gr += torch.autograd.grad(loss, wr)[0]
            value = value + loss.detach()
        grads.append(gr)
    torch.testing.assert_close(value, single.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0] + grads[1], g_single, rtol=1e-12, atol=1e-12)
    # a rank-local normaliser would NOT be invariant (guards the test's own sensitivity)
    local = sum(aggregate(values(w0, s), mask[s], mode, local_norm(mask[s], 9.0)) for s in shards)
    assert not torch.allclose(local, single.detach())
