"""Behaviour-cloning MSE actor penalty: TD3+BC's BC term.

Paper: Fujimoto & Gu, "A Minimalist Approach to Offline Reinforcement Learning" (NeurIPS 2021),
eq. 3: ``pi = argmax E[ lambda Q(s, pi(s)) - (pi(s) - a)^2 ]``, ``lambda = alpha / mean|Q|``.
This term is ``(pi(s) - a)^2`` averaged over the batch *and* action dimensions (the official code's
``F.mse_loss(pi, action)``); its ``coef`` (default 1) multiplies it. ``alpha`` (2.5 in the paper)
belongs to the learner (it scales the Q term), not to this term. With the learner's ``algo: bc``
this term alone trains the actor (pure behaviour cloning). No deviation from the official code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from alignreg.regularizers.base import REGULARIZERS, Regularizer


@dataclass
class BCMSEParams:
    pass  # no hyperparameters: the weight is the term's coef


@REGULARIZERS.register("bc_mse")
class BCMSE(Regularizer):
    Params = BCMSEParams
    kind = ("actor_penalty",)

    def actor_penalty(self, batch):
        return F.mse_loss(batch.policy_actions, batch.actions), {}
