"""The regularizer interface: four hooks, declared needs, state, and composition.

A regularizer is a small class registered by name in :data:`REGULARIZERS`. It may implement any of
four hooks (see DESIGN.md "Regularizers"):

* ``shape_rewards(rewards, episodes)``            reward shaping (SCoRe bonus)
* ``transform_log_ratio(log_ratio, ctx)``         ratio transform (GRPO-Guard)
* ``token_loss(ctx)``                             token loss term (KL, entropy, SIREN, Lp-Reg)
* ``actor_penalty(batch)``                        offline actor penalty (TD3+BC BC, PRDC, A2PR)

Terms return *unweighted* values. The coefficient lives in config (a constant or a schedule) and is
applied by :class:`RegularizerSet`; a constant-zero coefficient drops the term entirely, together
with whatever statistics only it needed. Each term declares the statistics it needs
(:meth:`Regularizer.needs`), so the learner computes exactly the union of what the active terms use.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from alignreg.config import ConfigError, Schedule, coef_always_zero, coef_value, from_dict
from alignreg.losses.aggregate import AggNorm, aggregate
from alignreg.registry import Registry

REGULARIZERS: Registry[type["Regularizer"]] = Registry("regularizer")


# ------------------------------------------------------------------------------------------------
# Statistic requests
# ------------------------------------------------------------------------------------------------
# Names of per-token statistics a term can ask for. "old_*" come from the no-grad pass with the
# weights at the start of the step (pi_old); "ref_*" from the frozen reference model; the rest are
# computed on the current policy inside the chunked forward/backward pass (with gradients).
STAT_NAMES = (
    "entropy",  # full-vocabulary entropy of pi_theta (differentiable)
    "top_p_entropy",  # entropy of pi_theta's renormalised strict top-p nucleus (differentiable); params p, k
    "kl_ref_full",  # full-vocabulary KL(pi_theta || pi_ref) (differentiable)
    "kl_old_full",  # full-vocabulary KL(pi_old || pi_theta) (detached)
    "ref_logprobs",  # log pi_ref of the sampled token
    "old_min_p_logprobs",  # log pi_proxy of the sampled token, min-p proxy of pi_old (before temperature); param kappa
    "old_top_p_entropy",  # top-p nucleus entropy of pi_old (no grad); params p, k
)


@dataclass(frozen=True)
class StatRequest:
    name: str
    params: tuple = ()  # sorted (key, value) pairs; two terms asking for different params conflict


def merge_needs(requests: list[StatRequest]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in requests:
        if r.name not in STAT_NAMES:
            raise ValueError(f"unknown statistic {r.name!r}")
        params = dict(r.params)
        if r.name in out and out[r.name] != params:
            raise ConfigError(
                f"two regularizers request statistic {r.name!r} with different parameters "
                f"({out[r.name]} vs {params}); use the same values in both"
            )
        out[r.name] = params
    return out


# ------------------------------------------------------------------------------------------------
# What a token term sees
# ------------------------------------------------------------------------------------------------


@dataclass
class LossContext:
    """Per-micro-batch view handed to ratio transforms and token terms ([B, T] tensors)."""

    logprobs: Tensor  # log pi_theta(y_t) at rollout temperature (grad)
    old_logprobs: Tensor  # log pi_old(y_t) (no grad)
    advantages: Tensor  # per-token advantages
    mask: Tensor  # float {0,1}: valid response tokens
    stats: dict[str, Tensor]  # requested statistics by name, [B, T]
    norm: AggNorm  # global normalisers of the mini-batch
    row_index: Tensor  # [B] long: rows of this micro-batch inside the mini-batch
    group_index: Tensor  # [B] long: prompt group of each row
    step: int  # training step (0-based)
    eps_low: float = 0.2  # policy-loss clip range (for ratio-transform diagnostics)
    eps_high: float = 0.2
    prepared: dict[str, Any] = field(default_factory=dict)  # term id -> value from prepare_minibatch
    all_reduce_sum: Callable[[Tensor], Tensor] = lambda t: t  # sum over data-parallel ranks
    all_gather_cat: Callable[[Tensor], Tensor] = lambda t: t  # concatenate over data-parallel ranks

    def aggregate(self, values: Tensor, mode: str, mask: Optional[Tensor] = None) -> Tensor:
        return aggregate(values, self.mask if mask is None else mask, mode, self.norm)


@dataclass
class TermOutput:
    loss: Tensor  # this micro-batch's contribution to the unweighted term (sums to the term over micro-batches)
    metrics: dict[str, float] = field(default_factory=dict)  # logged as reg/<id>/<key>
    unclipped_mask: Optional[Tensor] = None  # [B, T] bool: tokens whose PG term must use the unclipped ratio


@dataclass
class StepView:
    """The whole step's batch after the no-grad pass, for step-level hooks (SIREN's anchor)."""

    mask: Tensor  # [N, T]
    advantages: Tensor  # [N, T]
    old_logprobs: Optional[Tensor]  # [N, T]; None in a single-pass step (no no-grad pass ran)
    stats: dict[str, Tensor]  # old_* / ref_* statistics, [N, T] (empty in a single-pass step)
    step: int
    norm_len: Optional[float] = None  # length divisor of seq-mean-token-sum-norm (None: T)
    all_reduce_sum: Callable[[Tensor], Tensor] = lambda t: t
    all_gather_cat: Callable[[Tensor], Tensor] = lambda t: t


# ------------------------------------------------------------------------------------------------
# Base class
# ------------------------------------------------------------------------------------------------


@dataclass
class NoParams:
    pass


class Regularizer:
    """Base class. Subclasses set ``Params`` (a dataclass with a comment per field) and hooks."""

    Params: type = NoParams
    # Which hooks the term implements; the learner only calls those.
    kind: tuple[str, ...] = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if not cls.__dict__.get("__doc__"):  # the module docstring (paper, equation, defaults) documents the term
            cls.__doc__ = sys.modules[cls.__module__].__doc__

    def __init__(self, params: Any, term_id: str):
        self.params = params
        self.id = term_id

    # --- declarations ---------------------------------------------------------------------
    def needs(self) -> list[StatRequest]:
        """Statistics this term reads from ``ctx.stats`` / ``StepView.stats``."""
        return []

    def start_up_warning(self) -> str:
        """One line the run prints at start-up about these settings ("" = none)."""
        return ""

    def needs_whole_groups(self) -> bool:
        """Whether the term reads statistics over a prompt group's rows, so every micro-batch (and
        every rank's share of a mini-batch) must hold whole groups; the config checks it."""
        return False

    def prepass_needs(self) -> list[StatRequest]:
        """Current-policy statistics needed over the whole mini-batch before its micro-batches
        (no grad); non-empty only for terms whose selection scope is global. ``"logprobs"`` is
        always available in a prepass."""
        return []

    # --- hooks (override the ones listed in ``kind``) -------------------------------------
    def shape_rewards(self, rewards: Tensor, episodes: Any) -> tuple[Tensor, dict[str, float]]:
        """Unweighted per-response bonus; the shaped reward is ``rewards + coef * bonus``."""
        raise NotImplementedError

    def transform_log_ratio(self, log_ratio: Tensor, ctx: LossContext) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def token_loss(self, ctx: LossContext) -> TermOutput:
        raise NotImplementedError

    def actor_penalty(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    # --- step-level hooks ------------------------------------------------------------------
    def on_step_start(self, view: StepView) -> dict[str, float]:
        """Called once per training step after the no-grad pass over the whole batch."""
        return {}

    def step_start_reads_batch(self) -> bool:
        """Whether this step's :meth:`on_step_start` reads ``view.old_logprobs`` / ``view.stats``
        (then the learner runs its no-grad pass even where ``learner.single_pass`` could skip it)."""
        return type(self).on_step_start is not Regularizer.on_step_start

    def prepare_minibatch(self, view: StepView) -> Any:
        """Called before each mini-batch when ``prepass_needs`` is non-empty; ``view`` holds the
        current policy's no-grad statistics (and ``logprobs``) for the whole mini-batch. The return
        value reaches ``token_loss`` as ``ctx.prepared[self.id]``."""
        return None

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------------


@dataclass
class ActiveTerm:
    term: Regularizer
    coef: float | Schedule


class RegularizerSet:
    """The active terms of one run, with their coefficients; the only place coefficients apply."""

    def __init__(self, terms: list[ActiveTerm]):
        self.terms = terms

    def __iter__(self):
        return iter(self.terms)

    def __len__(self) -> int:
        return len(self.terms)

    def with_hook(self, hook: str) -> list[ActiveTerm]:
        return [t for t in self.terms if hook in t.term.kind]

    def coef(self, t: ActiveTerm, step: int) -> float:
        return coef_value(t.coef, step)

    def needs(self) -> dict[str, dict]:
        return merge_needs([r for t in self.terms for r in t.term.needs()])

    def needs_reference(self) -> bool:
        """Whether some term reads the reference model (its log-probs or the full-vocabulary KL)."""
        return bool(self.needs().keys() & {"ref_logprobs", "kl_ref_full"})

    def prepass_needs(self) -> dict[str, dict]:
        return merge_needs([r for t in self.terms for r in t.term.prepass_needs()])

    def state_dict(self) -> dict:
        return {t.term.id: t.term.state_dict() for t in self.terms}

    def load_state_dict(self, state: dict) -> None:
        for t in self.terms:
            if t.term.id in state:
                t.term.load_state_dict(state[t.term.id])


def build_regularizers(configs: list, path: str = "regularizers", hooks: tuple[str, ...] | None = None) -> RegularizerSet:
    """Instantiate terms from config; drop constant-zero ones; validate names, params and ids.

    ``hooks`` restricts the allowed hook kinds (e.g. offline training accepts only actor penalties).
    """
    import alignreg.regularizers  # noqa: F401  (registers the built-in terms)

    terms: list[ActiveTerm] = []
    seen: set[str] = set()
    for i, cfg in enumerate(configs):
        p = f"{path}.{i}"
        cls = REGULARIZERS.get(cfg.name) if cfg.name in REGULARIZERS else None
        if cls is None:
            raise ConfigError(
                f"{p}.name: unknown regularizer {cfg.name!r}; valid choices: {', '.join(REGULARIZERS.names())}"
            )
        if hooks is not None and not set(cls.kind) & set(hooks):
            valid = [n for n in REGULARIZERS.names() if set(REGULARIZERS.get(n).kind) & set(hooks)]
            raise ConfigError(
                f"{p}.name: regularizer {cfg.name!r} does not apply here; valid choices: {', '.join(valid)}"
            )
        params = from_dict(cls.Params, cfg.params, f"{p}.params")
        term_id = cfg.id or cfg.name
        if term_id in seen:
            raise ConfigError(f"{p}.id: duplicate regularizer id {term_id!r}; give each term a distinct id")
        seen.add(term_id)
        if coef_always_zero(cfg.coef):
            continue
        terms.append(ActiveTerm(cls(params, term_id), cfg.coef))
    if len([t for t in terms if "transform_log_ratio" in t.term.kind]) > 1:
        raise ConfigError(f"{path}: at most one ratio-transform regularizer (grpo_guard) may be active")
    return RegularizerSet(terms)


def params_doc(cls: type) -> str:
    """Field list of a term's Params dataclass (name = default), for docs and error messages."""
    def default(f):
        return f.default_factory() if f.default is dataclasses.MISSING else f.default  # lists: their factory's value

    return ", ".join(f"{f.name}={default(f)!r}" for f in dataclasses.fields(cls.Params))


def k3(d: Tensor, clamp: float = 0.0) -> Tensor:
    """Schulman's k3 estimator ``exp(d) - d - 1`` with ``d = log q - log p`` at a sample of p.

    With ``clamp > 0`` the value is clamped to [-clamp, clamp] (veRL ``low_var_kl``); ``exp`` is
    evaluated on ``min(d, 80)`` so a clamped (zero-gradient) overflow cannot turn into NaN.
    """
    if clamp > 0:
        return (torch.exp(d.clamp(max=80.0)) - d - 1.0).clamp(-clamp, clamp)
    return torch.exp(d) - d - 1.0


def masked_mean(x: Tensor, mask: Tensor) -> float:
    """Detached mean of ``x`` over ``mask`` (for metrics)."""
    n = mask.sum()
    return float((x.detach() * mask).sum() / n) if n > 0 else 0.0


def as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask > 0
