"""Contract test run over EVERY registered regularizer (``REGULARIZERS.names()``): a newly
registered term is covered without editing this file. Terms with ``Literal`` params are also run
once per choice of each such field (e.g. ``scope=global``, every KL estimator / ratio variant)."""
import dataclasses
import math
import re
import sys
import typing

import pytest
import torch

import alignreg.regularizers  # noqa: F401  (registers every term)
from alignreg.config import ConfigError, RegularizerConfig, Schedule
from alignreg.regularizers import REGULARIZERS, AggNorm, LossContext, Regularizer, StatRequest, StepView, build_regularizers
from alignreg.regularizers.base import STAT_NAMES, merge_needs

HOOKS = ("shape_rewards", "transform_log_ratio", "token_loss", "actor_penalty")
NAMES = REGULARIZERS.names()
DIFFERENTIABLE = ("entropy", "top_p_entropy", "kl_ref_full")


def literal_variants(hook=None):
    """(name, params) for the defaults and for each alternative value of each Literal field
    (only terms implementing ``hook`` when given)."""
    out = []
    for name in NAMES:
        cls = REGULARIZERS.get(name)
        if hook is not None and hook not in cls.kind:
            continue
        out.append(pytest.param(name, {}, id=f"{name}-defaults"))
        hints = typing.get_type_hints(cls.Params)
        for f in dataclasses.fields(cls.Params):
            if typing.get_origin(hints[f.name]) is typing.Literal:
                for v in typing.get_args(hints[f.name]):
                    if v != f.default:
                        out.append(pytest.param(name, {f.name: v}, id=f"{name}-{f.name}={v}"))
    return out


def build_one(name, params=None, coef=1.0):
    regs = build_regularizers([RegularizerConfig(name=name, coef=coef, params=dict(params or {}))])
    return regs


def class_doc(cls):
    return cls.__dict__.get("__doc__") or ""


# ------------------------------------------------------------------------------------------------
# declarations
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_docstring_names_paper_and_defaults(name):
    """The term's documentation (its class docstring, or its module's: one term per module)
    names a paper and lists the defaults of every parameter."""
    cls = REGULARIZERS.get(name)
    doc = class_doc(cls) + "\n" + (sys.modules[cls.__module__].__doc__ or "")
    assert re.search(r"arXiv|\b(19|20)\d\d\b", doc), f"{name}: no paper reference (arXiv id or year)"
    assert re.search(r"default", doc, re.I), f"{name}: defaults not listed"
    for f in dataclasses.fields(cls.Params):
        assert f.name in doc, f"{name}: parameter {f.name!r} not documented"


@pytest.mark.parametrize("name", NAMES)
def test_docstring_is_on_the_class(name):
    """``help(cls)`` / ``cls.__doc__`` must show the paper and defaults, not the base class text.

    Currently fails for every LLM term: the text is the module docstring and the class has none
    (``cls.__doc__`` is None; ``inspect.getdoc`` shows Regularizer's "Base class. ..." text)."""
    cls = REGULARIZERS.get(name)
    doc = class_doc(cls)
    assert doc, f"{cls.__module__}.{cls.__name__} has no class docstring (only a module docstring)"
    assert re.search(r"arXiv|\b(19|20)\d\d\b", doc), f"{name}: class docstring names no paper"
    assert re.search(r"default", doc, re.I), f"{name}: class docstring lists no defaults"


@pytest.mark.parametrize("name", NAMES)
def test_params_dataclass_with_defaults(name):
    P = REGULARIZERS.get(name).Params
    assert dataclasses.is_dataclass(P)
    for f in dataclasses.fields(P):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, \
            f"{name}.Params.{f.name} has no default"
    P()  # constructible with defaults


@pytest.mark.parametrize("name", NAMES)
def test_build_validate_and_drop(name):
    cls = REGULARIZERS.get(name)
    regs = build_one(name)
    assert len(regs) == 1
    (t,) = list(regs)
    assert type(t.term) is cls and t.term.id == name and isinstance(t.term.params, cls.Params)
    assert t.term.params == cls.Params()
    with pytest.raises(ConfigError) as e:
        build_one(name, {"no_such_key": 1})
    msg = str(e.value)
    assert "no_such_key" in msg and ("valid keys" in msg if dataclasses.fields(cls.Params) else "takes no keys" in msg)
    for f in dataclasses.fields(cls.Params):
        assert f.name in msg, f"valid key {f.name!r} not listed in: {msg}"
    # a constant-zero coefficient drops the term (and its needs)
    assert len(build_one(name, coef=0.0)) == 0
    assert len(build_one(name, coef=Schedule(kind="constant", start=0.0, end=5.0))) == 0
    assert build_one(name, coef=0.0).needs() == {}
    assert len(build_one(name, coef=Schedule(kind="linear", start=0.0, end=1.0, steps=10))) == 1


@pytest.mark.parametrize("name", NAMES)
def test_kind_and_hooks(name):
    cls = REGULARIZERS.get(name)
    assert isinstance(cls.kind, tuple) and cls.kind, f"{name}: empty kind"
    assert set(cls.kind) <= set(HOOKS), f"{name}: unknown hooks {set(cls.kind) - set(HOOKS)}"
    for hook in cls.kind:
        assert getattr(cls, hook) is not getattr(Regularizer, hook), f"{name} declares {hook} but does not override it"


@pytest.mark.parametrize("name,params", literal_variants())
def test_needs_are_known(name, params):
    (t,) = list(build_one(name, params))
    for reqs in (t.term.needs(), t.term.prepass_needs()):
        assert isinstance(reqs, list)
        for r in reqs:
            assert isinstance(r, StatRequest) and r.name in STAT_NAMES, r
            assert isinstance(r.params, tuple)
        merge_needs(reqs)


# ------------------------------------------------------------------------------------------------
# behaviour on a random batch
# ------------------------------------------------------------------------------------------------
B, T, G = 32, 64, 4


def random_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = 0  # a fully-masked row
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    lp = -torch.rand(B, T, generator=g) * 5 - 0.05
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous() * mask
    stats = {
        "entropy": torch.rand(B, T, generator=g) * 3,
        "top_p_entropy": torch.rand(B, T, generator=g) * 2,
        "kl_ref_full": torch.rand(B, T, generator=g) * 0.1,
        "kl_old_full": torch.rand(B, T, generator=g) * 1e-3,
        "ref_logprobs": lp + 0.2 * torch.randn(B, T, generator=g),
        "old_min_p_logprobs": lp + 0.5,
        "old_top_p_entropy": torch.rand(B, T, generator=g) * 2,
    }
    assert set(stats) == set(STAT_NAMES)
    return mask, lp, adv, stats, torch.arange(B) // G


def view(mask, lp, adv, stats, step=0):
    return StepView(mask=mask, advantages=adv, old_logprobs=lp.detach(), stats={**stats, "logprobs": lp.detach()}, step=step)


def needed(term):
    return {r.name for r in term.needs()}


def state_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name,params", literal_variants())
def test_step_hooks_and_state_round_trip(name, params):
    (t,) = list(build_one(name, params))
    term = t.term
    mask, lp, adv, stats, _ = random_batch(1)
    m = term.on_step_start(view(mask, lp, adv, {k: v for k, v in stats.items() if k in needed(term)}))
    assert isinstance(m, dict) and all(isinstance(v, float) for v in m.values())
    state = term.state_dict()
    assert isinstance(state, dict)
    (fresh,) = list(build_one(name, params))
    fresh.term.load_state_dict(state)
    assert state_equal(fresh.term.state_dict(), state)
    assert fresh.term.needs() == term.needs()


@pytest.mark.parametrize("name,params", literal_variants("token_loss"))
def test_token_loss_contract(name, params):
    (t,) = list(build_one(name, params))
    term = t.term
    mask, lp0, adv, stats0, groups = random_batch(2)
    need = needed(term)
    assert need <= set(STAT_NAMES)
    term.on_step_start(view(mask, lp0, adv, {k: v for k, v in stats0.items() if k in need}))
    lp = lp0.clone().requires_grad_()
    stats = {k: (v.clone().requires_grad_() if k in DIFFERENTIABLE else v.clone()) for k, v in stats0.items() if k in need}
    prepared = {}
    pre = {r.name for r in term.prepass_needs()}
    if pre:
        prepared[term.id] = term.prepare_minibatch(view(mask, lp0, adv, {k: v for k, v in stats0.items() if k in pre | need}))
    norm = AggNorm(num_tokens=float(mask.sum()), num_seqs=float(B), norm_len=float(T))
    total = 0.0
    outs = []
    for rows in (slice(0, 16), slice(16, B)):  # two micro-batches of one mini-batch
        ctx = LossContext(
            logprobs=lp[rows], old_logprobs=lp0[rows], advantages=adv[rows], mask=mask[rows],
            stats={k: v[rows] for k, v in stats.items()}, norm=norm, row_index=torch.arange(rows.start, rows.stop),
            group_index=groups[rows], step=0, prepared=prepared,
        )
        out = term.token_loss(ctx)
        assert out.loss.dim() == 0 and torch.isfinite(out.loss), f"{name}: loss {out.loss}"
        assert all(isinstance(v, float) and math.isfinite(v) for v in out.metrics.values()), out.metrics
        if out.unclipped_mask is not None:
            assert out.unclipped_mask.dtype == torch.bool and out.unclipped_mask.shape == mask[rows].shape
            assert not (out.unclipped_mask & (mask[rows] == 0)).any()
        outs.append(out)
        total = total + out.loss
    leaves = [lp] + [v for v in stats.values() if v.requires_grad]
    assert total.requires_grad, f"{name}: loss has no gradient path to logprobs or the statistics"
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    got = [g for g in grads if g is not None]
    assert got, f"{name}: no gradient w.r.t. logprobs or the statistics"
    assert all(torch.isfinite(g).all() for g in got)
    assert sum(float(g.abs().sum()) for g in got) > 0, f"{name}: gradient is identically zero"
    for g, x in zip(grads, leaves):
        if g is not None:
            assert torch.all(g[mask == 0] == 0), f"{name}: gradient leaks into padding"


@pytest.mark.parametrize("name,params", literal_variants("transform_log_ratio"))
def test_transform_log_ratio_contract(name, params):
    (t,) = list(build_one(name, params))
    term = t.term
    mask, lp, adv, stats, groups = random_batch(3)
    need = needed(term)

    def ctx_of(st):
        return LossContext(logprobs=lp, old_logprobs=lp, advantages=adv, mask=mask, stats=st,
                           norm=AggNorm(float(mask.sum()), float(B), float(T)), row_index=torch.arange(B),
                           group_index=groups, step=0)

    g = torch.Generator().manual_seed(4)
    lr = (torch.randn(B, T, generator=g) * 0.05 * mask).requires_grad_()
    out, metrics = term.transform_log_ratio(lr, ctx_of({k: v for k, v in stats.items() if k in need}))
    assert out.shape == lr.shape and torch.isfinite(out).all()
    assert all(isinstance(v, float) for v in metrics.values())
    (grad,) = torch.autograd.grad((out * torch.randn(B, T, generator=g)).sum(), lr)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # pi_theta == pi_old: zero log-ratio (and zero KL statistics) in -> exactly zero out
    zero_stats = {k: (torch.zeros_like(v) if k.startswith("kl_") else v) for k, v in stats.items() if k in need}
    out0, _ = term.transform_log_ratio(torch.zeros(B, T), ctx_of(zero_stats))
    assert out0.shape == (B, T) and torch.equal(out0, torch.zeros(B, T))
