"""Networks of the offline learners: MLP actor, twin critic, state-value net, conditional VAE.

Sizes are arguments (lists of hidden widths) so one module serves TD3+BC / PRDC (actor 2x256,
critic 2x256), A2PR's official sizes (actor 3x256, critic 4x256, value 4x256, VAE 2x750) and the
behaviour policies trained online by :mod:`alignreg.offline.generate`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def mlp(inp: int, hidden: list[int], out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(inp, h), nn.ReLU()]
        inp = h
    layers.append(nn.Linear(inp, out))
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Deterministic policy ``max_action * tanh(mlp(s))``."""

    def __init__(self, state_dim: int, action_dim: int, hidden: list[int], max_action: float = 1.0):
        super().__init__()
        self.net = mlp(state_dim, hidden, action_dim)
        self.max_action = max_action

    def forward(self, s: Tensor) -> Tensor:
        return self.max_action * torch.tanh(self.net(s))


class TwinCritic(nn.Module):
    """Two independent Q networks ``Q1, Q2 : (s, a) -> R`` (TD3's clipped double Q)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: list[int]):
        super().__init__()
        self.q1_net = mlp(state_dim + action_dim, hidden, 1)
        self.q2_net = mlp(state_dim + action_dim, hidden, 1)

    def forward(self, s: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        sa = torch.cat([s, a], 1)
        return self.q1_net(sa), self.q2_net(sa)

    def q1(self, s: Tensor, a: Tensor) -> Tensor:
        return self.q1_net(torch.cat([s, a], 1))


class ValueNet(nn.Module):
    """State value ``V(s)`` (A2PR)."""

    def __init__(self, state_dim: int, hidden: list[int]):
        super().__init__()
        self.net = mlp(state_dim, hidden, 1)

    def forward(self, s: Tensor) -> Tensor:
        return self.net(s)


class VAE(nn.Module):
    """Conditional VAE over actions given states (BCQ-style, as used by A2PR).

    Encoder ``(s, a) -> (mu, log_std)`` with ``log_std`` clamped to [-4, 15]; decoder
    ``(s, z) -> max_action * tanh(.)``. ``forward`` returns a reparameterised reconstruction.
    """

    def __init__(self, state_dim: int, action_dim: int, latent_dim: int, hidden: list[int], max_action: float = 1.0):
        super().__init__()
        self.enc = mlp(state_dim + action_dim, hidden, 2 * latent_dim)
        self.dec = mlp(state_dim + latent_dim, hidden, action_dim)
        self.latent_dim = latent_dim
        self.max_action = max_action

    def forward(self, s: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, log_std = self.enc(torch.cat([s, a], 1)).chunk(2, dim=1)
        std = log_std.clamp(-4, 15).exp()
        z = mu + std * torch.randn_like(std)
        return self.decode(s, z), mu, std

    def decode(self, s: Tensor, z: Tensor) -> Tensor:
        return self.max_action * torch.tanh(self.dec(torch.cat([s, z], 1)))
