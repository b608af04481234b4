"""PRDC: Policy Regularization with Dataset Constraint (Ran et al., ICML 2023, arXiv 2306.06569).

Equation (official ``PRDC.train``): with ``P = {(beta s_j, a_j)}`` over the whole dataset (normalised
states, std + 1e-3) and ``j*`` the index of the k-th nearest point of ``P`` to the query
``(beta s, pi(s))`` (Euclidean; the *policy* action is the query, detached),

    penalty = mean_{B x A} (pi(s) - a_{j*})^2,    actor loss = -alpha/mean|Q| * mean Q(s, pi) + coef * penalty

Defaults: ``beta=2.0`` (README locomotion; the class default is 2 but the official argparse default
is 1.0 -- alignreg uses 2.0), ``k=1`` (official ``k=[k]``: only the k-th neighbour, not an average),
``coef=1`` (the DC weight; PRDC's alpha is the learner's ``alpha``: 2.5 hopper/walker2d, 40
halfcheetah). Only the action part of the distance is penalised (as in the code, not the paper's
joint distance).

Deviation (speed only, identical neighbours up to ties): instead of a full scipy KD-tree query every
actor step, :class:`alignreg.offline.nn_search.JointNearestNeighbour` answers on the CPU most rows from
precomputed state-space candidate lists with an exactness certificate and falls back to a
radius-bounded KD-tree query otherwise; on a GPU it scans all points exactly on the learner's device
(about 4 ms per 256-row query of 1M points on an H200, no index to build). Search settings that never
change the result: ``search="auto"`` (``brute``, the scan, when the learner runs on CUDA; ``lists``
otherwise; ``lists`` on a GPU keeps the lists there and scans only the uncertified rows, measured no
faster on an H200), ``num_candidates=32`` candidates per row, ``index_cache`` (lists of datasets >= 100k rows are cached by
content hash), ``max_index_build_s=900`` (a list build estimated to take longer is done in fewer
principal axes of the state, which keeps the certificate exact but weaker; if even 4 axes do not fit,
every row takes the tree search), ``overlap_search=true`` (the learner computes pi(s) without grad
before its critic update and this term searches on a side thread while the critic trains: the actor
is not changed by the critic update, so the query is the same; the actor step checks that its pi(s) equals
the prefetched one bit for bit and searches again otherwise). Needs ``setup`` (the dataset) before the
first actor step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignreg.config import ConfigError
from alignreg.regularizers.base import REGULARIZERS, Regularizer


SEARCHES = ("auto", "lists", "brute")


@dataclass
class PRDCParams:
    beta: float = 2.0  # scale of the normalised state in the joint [beta*s, a] space (locomotion 2.0, antmaze 7.5)
    k: int = 1  # use the k-th nearest neighbour (official semantics: k-th only, not the k nearest)
    num_candidates: int = 32  # search only: state-space candidates per row for the exactness certificate (>= k)
    index_cache: str = "~/.cache/alignreg/prdc_index"  # candidate lists of datasets >= 100k rows are reused ("": off)
    overlap_search: bool = True  # search on a side thread while the critic update runs (same neighbours; checked)
    max_index_build_s: float = 900.0  # build-time budget of the lists: fewer principal axes of the state if needed, none if 4 do not fit
    search: str = "auto"  # search only: lists (CPU candidate lists + KD-tree), brute (exact scan on the learner's device), auto (brute on CUDA, else lists)

    def validate(self, path: str) -> None:
        if self.search not in SEARCHES:
            raise ConfigError(f"{path}.search: unknown search {self.search!r}; valid choices: {', '.join(SEARCHES)}")
        if self.beta <= 0:
            raise ConfigError(f"{path}.beta must be > 0")
        if self.max_index_build_s < 0:
            raise ConfigError(f"{path}.max_index_build_s must be >= 0 (0: no candidate lists for datasets over 20,000 rows, whose build time is estimated)")
        if not 1 <= self.k <= self.num_candidates:
            raise ConfigError(f"{path}.k must satisfy 1 <= k <= num_candidates ({self.num_candidates})")


@REGULARIZERS.register("prdc")
class PRDC(Regularizer):
    Params = PRDCParams
    kind = ("actor_penalty",)

    def __init__(self, params, term_id):
        super().__init__(params, term_id)
        self.index = None
        self._side = None  # one search thread (overlap_search)
        self._pending = None  # (pi(s) the search was started for, its future)
        self.prefetch_used = 0  # actor steps that took the overlapped search's answer
        if not self.params.overlap_search:  # the learner then skips its no-grad pi(s) pass (offline.td3)
            self.prefetch_actor_penalty = None

    def setup(self, ctx) -> None:
        from alignreg.offline.nn_search import JointNearestNeighbour

        # messages (build estimate, progress, PCA fallback) appear only above 20,000 rows, where a build
        # is estimated; lists are cached from nn_search.CACHE_MIN_ROWS rows
        device = torch.device(ctx.device)
        search = self.params.search
        if search == "auto":
            search = "brute" if device.type == "cuda" else "lists"
        self.index = JointNearestNeighbour(ctx.states, ctx.actions, self.params.beta, self.params.k,
                                           self.params.num_candidates, cache_dir=self.params.index_cache or None,
                                           log=print, max_build_s=self.params.max_index_build_s, search=search,
                                           device=device)

    def prefetch_actor_penalty(self, states, indices, pi) -> None:
        """Start the neighbour search for the coming actor step (``pi``: pi(s) without grad) on a side thread."""
        if self.index is None:  # actor_penalty raises the error
            return
        if self._side is None:
            from concurrent.futures import ThreadPoolExecutor

            self._side = ThreadPoolExecutor(1, thread_name_prefix="alignreg-prdc-search")
        self._pending = (pi, self._side.submit(self._search, indices, states, pi))

    def _search(self, indices, states, pi):
        """``(index, squared distance)`` of each row's k-th neighbour of ``(beta * s, pi)``."""
        scaled = None if indices is not None else states.detach() * self.params.beta
        return self.index.query(indices, pi, scaled)

    def actor_penalty(self, batch):
        if self.index is None:
            raise RuntimeError("prdc: setup(dataset) must run before the first actor step")
        pi = batch.policy_actions
        pending, self._pending = self._pending, None
        if pending is not None and torch.equal(pending[0], pi.detach()):
            idx, d2 = pending[1].result()
            self.prefetch_used += 1
        else:  # no prefetch, or pi(s) changed since (then the prefetched answer is discarded)
            if pending is not None:
                pending[1].result()
            idx, d2 = self._search(batch.indices, batch.states, pi)
        a_nn = self.index.actions[idx].to(pi.dtype).to(pi.device)  # constant target (no grad)
        metrics = {"nn_dist": d2.sqrt().mean().item(), "certified": self.index.last_certified}
        return F.mse_loss(pi, a_nn), metrics
