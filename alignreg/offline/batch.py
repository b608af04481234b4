"""What the offline learner hands to its actor-penalty terms (the ``actor_penalty`` hook).

Offline terms (``bc_mse``, ``prdc``, ``a2pr``) implement, besides ``actor_penalty(batch)``, up to
three optional methods that :class:`alignreg.offline.td3.TD3Learner` calls when present:

* ``setup(ctx: OfflineSetup)``          once, before training: the whole (normalised) dataset, sizes,
                                         seed. PRDC builds its neighbour index here, A2PR its VAE and
                                         value network with their optimizers.
* ``aux_update(batch: AuxUpdateBatch)`` every iteration, right after the critic step and before the
                                         (delayed) actor step: A2PR's value and VAE updates.
* ``actor_penalty(batch: ActorPenaltyBatch)`` on actor steps: returns the *unweighted* scalar penalty
                                         (its config ``coef`` multiplies it) and a metrics dict.

All state tensors are normalised states (``(s - mean) / (std + 1e-3)``), the space the actor and
critic see.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from torch import Tensor, nn


@dataclass
class TransitionBatch:
    states: Tensor  # [B, S] normalised states
    actions: Tensor  # [B, A] dataset actions
    rewards: Tensor  # [B, 1]
    next_states: Tensor  # [B, S] normalised next states
    not_done: Tensor  # [B, 1] 1 - terminal
    indices: Optional[Tensor] = None  # [B] long: dataset rows of the batch (None for online replay)


@dataclass
class ActorPenaltyBatch:
    states: Tensor  # [B, S] normalised states
    actions: Tensor  # [B, A] dataset actions
    policy_actions: Tensor  # [B, A] pi(s), carries the actor's gradient
    critic: nn.Module  # online twin critic (just updated this iteration); ``critic.q1(s, a)``
    indices: Optional[Tensor]  # [B] dataset rows of ``states`` (lets PRDC bound its search), or None
    step: int  # learner iteration (1-based, counts critic steps)


@dataclass
class AuxUpdateBatch:
    states: Tensor  # [B, S]
    actions: Tensor  # [B, A]
    rewards: Tensor  # [B, 1]
    next_states: Tensor  # [B, S]
    not_done: Tensor  # [B, 1]
    next_actions: Tensor  # [B, A] target-policy-smoothed next action used by this iteration's critic target
    target_q: Tensor  # [B, 1] TD target of this iteration's critic step (target critics), no grad
    critic: nn.Module  # online twin critic after this iteration's step
    discount: float  # gamma
    step: int  # learner iteration


@dataclass
class OfflineSetup:
    states: np.ndarray  # [N, S] float32 normalised dataset states (qlearning_dataset rows)
    actions: np.ndarray  # [N, A] float32 dataset actions
    state_dim: int
    action_dim: int
    max_action: float  # actions lie in [-max_action, max_action]
    seed: int  # run seed (for terms with their own random networks)
    device: str = "cpu"  # the learner's device: terms put their networks and search structures there
