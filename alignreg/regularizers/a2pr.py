"""A2PR: Adaptive Advantage-Guided Policy Regularization (Liu et al., ICML 2024, arXiv 2405.19909).

The term owns a conditional VAE and a state-value net ``V`` and trains them in ``aux_update``
(called by the TD3 learner every iteration, after the critic step, before the delayed actor step):

* value:  ``t_Q = min(r + gamma nd min(Q1,Q2)(s', a~'), y)`` with the *just-updated online* critic
  and ``y`` this iteration's target-critic TD target; ``L_V = MSE(V(s), t_Q)`` (no expectile).
  ``V(s)`` computed *before* this step is kept (stale) for the VAE and actor steps.
* VAE:    ``w = vae_weight * 1[Q1(s,a) > V(s)]``;
  ``L_VAE = mean(w (recon - a)^2) + kl_weight * mean(-0.5 (1 + log sigma^2 - mu^2 - sigma^2))``.

Actor penalty (``coef`` = the paper's BC weight, official ``--mask``):

    a_vae  = VAE(s, pi(s))                    (reparameterised sample; gradient flows to pi and the VAE)
    A_data = Q1(s, a) - V(s),   A_vae = Q1(s, a_vae) - V(s)
    target = a_vae if A_vae >= A_data else a   (per row, NOT detached)
    w      = 1[Q1(s, a_vae) >= V(s)] OR 1[Q1(s, a) > V(s)]
    penalty = mean_{B x A} w * (pi - target)^2

Defaults (official argparse): ``vae_weight=1.0``, ``kl_weight=0.5`` (hard-coded), latent ``2A``,
VAE 2x750 (``vae_hidden``) with Adam lr 1e-3 (``vae_lr``), latent 2A (``latent_dim=0`` means 2A), value 4x256 (``value_hidden``) with lr 3e-4 (``value_lr``); the official per-dataset values live in
``configs/offline/a2pr_*.yaml`` (hopper: coef 0.4, discount 0.995; walker2d: vae_weight 1.5).
Deviations: none intended. The VAE's gradients from the actor backward are discarded (its optimizer
zeroes them before its own step, as in the official code).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alignreg.regularizers.base import REGULARIZERS, Regularizer


@dataclass
class A2PRParams:
    vae_weight: float = 1.0  # weight of the advantage-filtered VAE reconstruction (official --vae_weight)
    kl_weight: float = 0.5  # weight of the VAE's KL term (hard-coded 0.5 in the official code)
    vae_lr: float = 1e-3  # Adam learning rate of the VAE
    value_lr: float = 3e-4  # Adam learning rate of V
    vae_hidden: list[int] = field(default_factory=lambda: [750, 750])  # encoder and decoder widths
    value_hidden: list[int] = field(default_factory=lambda: [256, 256, 256, 256])  # V's widths
    latent_dim: int = 0  # VAE latent size (0 = 2 * action_dim, the official choice)


@REGULARIZERS.register("a2pr")
class A2PR(Regularizer):
    Params = A2PRParams
    kind = ("actor_penalty",)

    def __init__(self, params, term_id):
        super().__init__(params, term_id)
        self.vae = None
        self._stale_v = None  # (step, V(s) before this step's value update)

    def setup(self, ctx) -> None:
        from alignreg.offline.networks import VAE, ValueNet

        p = self.params
        with torch.random.fork_rng():
            torch.manual_seed(ctx.seed + 7919)
            self.vae = VAE(ctx.state_dim, ctx.action_dim, p.latent_dim or 2 * ctx.action_dim, p.vae_hidden,
                           ctx.max_action)
            self.value = ValueNet(ctx.state_dim, p.value_hidden)
        self.vae.to(ctx.device)
        self.value.to(ctx.device)
        self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=p.vae_lr)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=p.value_lr)

    def aux_update(self, b) -> dict[str, float]:
        with torch.no_grad():
            q1n, q2n = b.critic(b.next_states, b.next_actions)
            t_q = torch.min(b.rewards + b.not_done * b.discount * torch.min(q1n, q2n), b.target_q)
        value = self.value(b.states)
        value_loss = F.mse_loss(value, t_q)
        self.value_opt.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_opt.step()
        v = value.detach()
        self._stale_v = (b.step, v)

        recon, mu, std = self.vae(b.states, b.actions)
        with torch.no_grad():
            w = self.params.vae_weight * (b.critic.q1(b.states, b.actions) > v).float()
        kl = (-0.5 * (1 + torch.log(std.pow(2)) - mu.pow(2) - std.pow(2))).mean()
        vae_loss = (w * (recon - b.actions) ** 2).mean() + self.params.kl_weight * kl
        self.vae_opt.zero_grad(set_to_none=True)
        vae_loss.backward()
        self.vae_opt.step()
        return {"value_loss": value_loss.item(), "vae_loss": vae_loss.item(), "vae_weight_frac": (w > 0).float().mean().item()}

    def actor_penalty(self, batch):
        if self.vae is None:
            raise RuntimeError("a2pr: setup(dataset) must run before the first actor step")
        s, a, pi = batch.states, batch.actions, batch.policy_actions
        if self._stale_v is not None and self._stale_v[0] == batch.step:
            v = self._stale_v[1]
        else:  # no aux update this iteration (direct use): V(s) with the current value net
            with torch.no_grad():
                v = self.value(s)
        a_vae, _, _ = self.vae(s, pi)
        with torch.no_grad():
            q_data = batch.critic.q1(s, a)
            q_vae = batch.critic.q1(s, a_vae)
        use_vae = (q_vae - v) >= (q_data - v)  # [B, 1]; ties -> VAE action
        target = torch.where(use_vae, a_vae, a)  # not detached
        w = ((q_vae >= v) | (q_data > v)).to(pi.dtype)  # [B, 1]
        penalty = (w * (pi - target) ** 2).mean()
        return penalty, {"vae_target_frac": use_vae.float().mean().item(), "weight_frac": w.mean().item()}

    def state_dict(self) -> dict:
        if self.vae is None:
            return {}
        return {"vae": self.vae.state_dict(), "value": self.value.state_dict(),
                "vae_opt": self.vae_opt.state_dict(), "value_opt": self.value_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.vae.load_state_dict(state["vae"])
            self.value.load_state_dict(state["value"])
            self.vae_opt.load_state_dict(state["vae_opt"])
            self.value_opt.load_state_dict(state["value_opt"])
