"""TD3 base learner with an actor-penalty slot (Fujimoto et al. 2018; TD3+BC, Fujimoto & Gu 2021).

One iteration (``train_step``), exactly the TD3+BC order:

1. critic: ``y = r + gamma * not_done * min(Q1', Q2')(s', clip(pi'(s') + clip(N(0, sigma), +-c), +-1))``,
   ``L_Q = MSE(Q1, y) + MSE(Q2, y)``;
2. auxiliary updates of penalty terms that have one (A2PR: value net, VAE);
3. every ``policy_freq`` iterations the actor:
   ``L_pi = -lambda * mean Q1(s, pi(s)) + sum_t coef_t * penalty_t``, ``lambda = alpha / mean|Q1(s, pi(s))|``
   (detached; TD3+BC's normaliser; ``alpha`` scales the Q term and is not a regularizer
   coefficient), then Polyak averaging of both target networks.

``normalize_q=False`` gives plain online TD3 (``L_pi = -mean Q1``), used to train behaviour
policies. ``algo="bc"`` trains only the actor on the penalty (pure behaviour cloning, every step).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F

from alignreg.offline.batch import ActorPenaltyBatch, AuxUpdateBatch, OfflineSetup, TransitionBatch
from alignreg.offline.networks import Actor, TwinCritic
from alignreg.regularizers.base import RegularizerSet


class TD3Learner:
    def __init__(self, state_dim: int, action_dim: int, *, max_action: float = 1.0, actor_hidden=(256, 256),
                 critic_hidden=(256, 256), actor_lr: float = 3e-4, critic_lr: float = 3e-4,
                 discount: float = 0.99, tau: float = 0.005, policy_noise: float = 0.2, noise_clip: float = 0.5,
                 policy_freq: int = 2, alpha: float = 2.5, normalize_q: bool = True, algo: str = "td3",
                 penalties: Optional[RegularizerSet] = None, device: str = "cpu"):
        self.actor = Actor(state_dim, action_dim, list(actor_hidden), max_action).to(device)
        self.actor_target = copy.deepcopy(self.actor)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=actor_lr)
        self.algo = algo
        if algo != "bc":
            self.critic = TwinCritic(state_dim, action_dim, list(critic_hidden)).to(device)
            self.critic_target = copy.deepcopy(self.critic)
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=critic_lr)
        self.max_action = max_action
        self.discount, self.tau = discount, tau
        self.policy_noise, self.noise_clip = policy_noise * max_action, noise_clip * max_action
        self.policy_freq, self.alpha, self.normalize_q = policy_freq, alpha, normalize_q
        self.penalties = penalties if penalties is not None else RegularizerSet([])
        self.it = 0

    def setup(self, ctx: OfflineSetup) -> None:
        """Give penalty terms the whole dataset (PRDC index, A2PR networks)."""
        for t in self.penalties:
            if hasattr(t.term, "setup"):
                t.term.setup(ctx)

    @torch.no_grad()
    def act(self, state: torch.Tensor) -> torch.Tensor:
        return self.actor(state)

    def train_step(self, b: TransitionBatch) -> dict[str, float]:
        self.it += 1
        if self.algo == "bc":
            return self._actor_step(b, critic=None)
        if self.it % self.policy_freq == 0:
            self._prefetch_actor_penalties(b)
        with torch.no_grad():
            noise = (torch.randn_like(b.actions) * self.policy_noise).clamp(-self.noise_clip, self.noise_clip)
            next_a = (self.actor_target(b.next_states) + noise).clamp(-self.max_action, self.max_action)
            tq1, tq2 = self.critic_target(b.next_states, next_a)
            target_q = b.rewards + b.not_done * self.discount * torch.min(tq1, tq2)
        q1, q2 = self.critic(b.states, b.actions)
        critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        metrics = {"critic_loss": critic_loss.item(), "q1_mean": q1.mean().item()}
        aux = AuxUpdateBatch(b.states, b.actions, b.rewards, b.next_states, b.not_done, next_a, target_q,
                             self.critic, self.discount, self.it)
        for t in self.penalties:
            if hasattr(t.term, "aux_update"):
                metrics.update({f"reg/{t.term.id}/{k}": v for k, v in t.term.aux_update(aux).items()})
        if self.it % self.policy_freq == 0:
            metrics.update(self._actor_step(b, critic=self.critic))
            with torch.no_grad():
                for net, targ in ((self.critic, self.critic_target), (self.actor, self.actor_target)):
                    for p, tp in zip(net.parameters(), targ.parameters()):
                        tp.lerp_(p, self.tau)
        return metrics

    def _prefetch_actor_penalties(self, b: TransitionBatch) -> None:
        """Let penalty terms start work that needs only pi(s) (PRDC's neighbour search) before the critic
        update, which does not change the actor; they check that the actor step's pi(s) is the same."""
        terms = [t.term for t in self.penalties.with_hook("actor_penalty")
                 if getattr(t.term, "prefetch_actor_penalty", None) is not None]
        if terms:
            with torch.no_grad():
                pi = self.actor(b.states)
            for term in terms:
                term.prefetch_actor_penalty(b.states, b.indices, pi)

    def actor_loss(self, b: TransitionBatch, critic) -> tuple[torch.Tensor, dict[str, float]]:
        """``-lambda * mean Q1(s, pi(s)) + sum_t coef_t * penalty_t`` (no Q term for ``algo=bc``)."""
        pi = self.actor(b.states)
        metrics: dict[str, float] = {}
        loss = torch.zeros((), dtype=pi.dtype, device=pi.device)
        if critic is not None:
            q = critic.q1(b.states, pi)
            if self.normalize_q:
                lam = self.alpha / q.abs().mean().detach()
                loss = -lam * q.mean()
                metrics["lambda"] = lam.item()
            else:
                loss = -q.mean()
        pb = ActorPenaltyBatch(b.states, b.actions, pi, critic, b.indices, self.it)
        for t in self.penalties.with_hook("actor_penalty"):
            value, m = t.term.actor_penalty(pb)
            loss = loss + self.penalties.coef(t, self.it) * value
            metrics[f"reg/{t.term.id}/loss"] = value.item()
            metrics.update({f"reg/{t.term.id}/{k}": v for k, v in m.items()})
        return loss, metrics

    def _actor_step(self, b: TransitionBatch, critic) -> dict[str, float]:
        loss, metrics = self.actor_loss(b, critic)
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_opt.step()
        metrics["actor_loss"] = loss.item()
        return metrics

    # --- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = {"it": self.it, "actor": self.actor.state_dict(), "actor_target": self.actor_target.state_dict(),
              "actor_opt": self.actor_opt.state_dict(), "penalties": self.penalties.state_dict()}
        if self.algo != "bc":
            sd.update(critic=self.critic.state_dict(), critic_target=self.critic_target.state_dict(),
                      critic_opt=self.critic_opt.state_dict())
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.it = sd["it"]
        self.actor.load_state_dict(sd["actor"])
        self.actor_target.load_state_dict(sd["actor_target"])
        self.actor_opt.load_state_dict(sd["actor_opt"])
        if self.algo != "bc":
            self.critic.load_state_dict(sd["critic"])
            self.critic_target.load_state_dict(sd["critic_target"])
            self.critic_opt.load_state_dict(sd["critic_opt"])
        self.penalties.load_state_dict(sd["penalties"])
