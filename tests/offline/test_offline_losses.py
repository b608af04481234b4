"""TD3+BC and A2PR actor losses, the TD3 critic target and the target-network update, against float64 re-implementations of their equations (value + grad)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignreg.config import RegularizerConfig
from alignreg.offline.batch import ActorPenaltyBatch, AuxUpdateBatch, OfflineSetup, TransitionBatch
from alignreg.offline.td3 import TD3Learner
from alignreg.regularizers import build_regularizers

B, S, A = 32, 5, 3


def linear_relu(x, layers):
    """Plain float64 MLP from a Sequential's Linear layers (independent of nn.Module forward)."""
    lin = [m for m in layers if isinstance(m, torch.nn.Linear)]
    for i, m in enumerate(lin):
        x = x @ m.weight.T + m.bias
        if i < len(lin) - 1:
            x = torch.relu(x)
    return x


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return TransitionBatch(torch.randn(B, S, generator=g, dtype=torch.float64),
                           torch.rand(B, A, generator=g, dtype=torch.float64) * 2 - 1,
                           torch.randn(B, 1, generator=g, dtype=torch.float64),
                           torch.randn(B, S, generator=g, dtype=torch.float64),
                           (torch.rand(B, 1, generator=g) > 0.1).double(), torch.arange(B))


def test_td3bc_actor_loss_float64():
    torch.manual_seed(0)
    terms = build_regularizers([RegularizerConfig(name="bc_mse", coef=1.0)], hooks=("actor_penalty",))
    L = TD3Learner(S, A, alpha=2.5, penalties=terms)
    L.actor.double(); L.critic.double()
    b = batch()
    loss, _ = L.actor_loss(b, L.critic)
    loss.backward()
    got = [p.grad.clone() for p in L.actor.parameters()]
    # reference: pi = tanh(mlp(s)); lam = alpha / mean|Q1| (constant); L = -lam mean Q1 + mean (pi - a)^2
    params = [p.detach().clone().requires_grad_(True) for p in L.actor.parameters()]
    actor = copy.deepcopy(L.actor)
    for p, q in zip(actor.parameters(), params):
        p.data = q
    x = b.states
    lin = [m for m in actor.net if isinstance(m, torch.nn.Linear)]
    for i, m in enumerate(lin):
        x = x @ params[2 * i].T + params[2 * i + 1]
        x = torch.relu(x) if i < len(lin) - 1 else x
    pi = torch.tanh(x)
    q = linear_relu(torch.cat([b.states, pi], 1), L.critic.q1_net)
    lam = 2.5 / q.abs().mean().item()
    ref = -lam * q.mean() + ((pi - b.actions) ** 2).sum() / (B * A)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


def make_a2pr(seed=0, **params):
    params = {"vae_hidden": [64, 64], "value_hidden": [32, 32, 32, 32], **params}
    terms = build_regularizers([RegularizerConfig(name="a2pr", coef=0.4, params=params)], hooks=("actor_penalty",))
    term = terms.terms[0].term
    term.setup(OfflineSetup(np.zeros((10, S), np.float32), np.zeros((10, A), np.float32), S, A, 1.0, seed))
    term.vae.double(); term.value.double()
    return term


def ref_vae(vae, s, a, eps):
    h = linear_relu(torch.cat([s, a], 1), vae.enc)
    mu, log_std = h[:, : vae.latent_dim], h[:, vae.latent_dim:]
    std = torch.exp(torch.clamp(log_std, -4, 15))
    z = mu + std * eps
    return torch.tanh(linear_relu(torch.cat([s, z], 1), vae.dec)), mu, std


def test_a2pr_actor_penalty_float64_value_and_gradient():
    torch.manual_seed(1)
    from alignreg.offline.networks import TwinCritic

    term = make_a2pr()
    critic = TwinCritic(S, A, [16, 16]).double()
    b = batch(2)
    pi = (torch.rand(B, A, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    torch.manual_seed(123)
    loss, m = term.actor_penalty(ActorPenaltyBatch(b.states, b.actions, pi, critic, b.indices, 2))
    loss.backward()
    got_grad = pi.grad.clone()

    pi2 = pi.detach().clone().requires_grad_(True)
    torch.manual_seed(123)
    eps = torch.randn(B, 2 * A, dtype=torch.float64)
    a_vae, _, _ = ref_vae(term.vae, b.states, pi2, eps)
    v = linear_relu(b.states, term.value.net).detach()
    q1 = lambda act: linear_relu(torch.cat([b.states, act], 1), critic.q1_net).detach()
    q_data, q_vae = q1(b.actions), q1(a_vae.detach())
    adv_data, adv_vae = q_data - v, q_vae - v
    target = torch.where(adv_vae >= adv_data, a_vae, b.actions)  # not detached
    w = ((q_vae >= v) | (q_data > v)).double()
    ref = (w * (pi2 - target) ** 2).sum() / (B * A)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(got_grad, pi2.grad, rtol=1e-10, atol=1e-13)


def test_a2pr_target_not_detached():
    """With every row on the VAE target (Q constant: tie -> VAE) the gradient includes d a_vae / d pi."""
    term = make_a2pr()
    b = batch(5)
    pi = (torch.rand(B, A, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    torch.manual_seed(9)
    loss, m = term.actor_penalty(ActorPenaltyBatch(b.states, b.actions, pi, ConstCritic(1e6), None, 3))
    loss.backward()
    torch.manual_seed(9)
    a_vae, _, _ = term.vae(b.states, pi.detach())
    detached_grad = 2 * (pi.detach() - a_vae.detach()) / (B * A)
    assert m["vae_target_frac"] == 1.0 and m["weight_frac"] == 1.0
    assert (pi.grad - detached_grad).abs().max() > 1e-6


class ConstCritic(torch.nn.Module):
    """Q1 = c everywhere: makes A_vae == A_data (tie) and Q vs V comparisons controllable."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def q1(self, s, a):
        return torch.full((s.shape[0], 1), self.c, dtype=s.dtype)


def test_a2pr_tie_rules():
    term = make_a2pr()
    b = batch(3)
    v = term.value(b.states).detach()
    pi = torch.zeros(B, A, dtype=torch.float64, requires_grad=True)
    # Q == V exactly at every row: A_vae == A_data -> VAE action (>=); weight via Q(s,a_vae) >= V -> 1
    term._stale_v = (5, torch.zeros(B, 1, dtype=torch.float64))
    _, m = term.actor_penalty(ActorPenaltyBatch(b.states, b.actions, pi, ConstCritic(0.0), None, 5))
    assert m["vae_target_frac"] == 1.0 and m["weight_frac"] == 1.0
    # Q < V: both advantages negative -> weight 0, penalty 0
    loss, m = term.actor_penalty(ActorPenaltyBatch(b.states, b.actions, pi, ConstCritic(-1.0), None, 5))
    assert m["weight_frac"] == 0.0 and loss.item() == 0.0
    assert v.shape == (B, 1)


def test_a2pr_aux_update_order_and_targets():
    """Value target = min(r + g nd min(Q1,Q2)(s', a'), y) with the online critic; V before its step
    is the one reused (stale) in the VAE weight and the actor step."""
    torch.manual_seed(4)
    from alignreg.offline.networks import TwinCritic

    term = make_a2pr()
    critic = TwinCritic(S, A, [16, 16]).double()
    b = batch(4)
    next_a = torch.rand(B, A, dtype=torch.float64) * 2 - 1
    y = torch.randn(B, 1, dtype=torch.float64)
    v_before = term.value(b.states).detach()
    value_ref = copy.deepcopy(term.value)
    with torch.no_grad():
        q1n, q2n = critic(b.next_states, next_a)
        t_q = torch.min(b.rewards + b.not_done * 0.99 * torch.min(q1n, q2n), y)
    opt = torch.optim.Adam(value_ref.parameters(), lr=3e-4)
    F.mse_loss(value_ref(b.states), t_q).backward()
    opt.step()
    m = term.aux_update(AuxUpdateBatch(b.states, b.actions, b.rewards, b.next_states, b.not_done, next_a, y, critic, 0.99, 7))
    for p, q in zip(term.value.parameters(), value_ref.parameters()):
        torch.testing.assert_close(p, q)
    assert term._stale_v[0] == 7
    torch.testing.assert_close(term._stale_v[1], v_before)
    frac = (critic.q1(b.states, b.actions) > v_before).double().mean().item()
    assert m["vae_weight_frac"] == pytest.approx(frac)


def test_td3_critic_target_and_polyak_update_float64():
    """One TD3 iteration without target noise, on a batch with terminal rows: the critic's gradient is that of
    MSE(Q1, y) + MSE(Q2, y), y = r + gamma * not_done * min(Q1', Q2')(s', pi'(s')) from the target networks;
    after the actor step (iteration policy_freq) each target parameter is (1 - tau) old target + tau online."""
    torch.manual_seed(0)
    gamma, tau = 0.9, 0.3
    L = TD3Learner(S, A, discount=gamma, tau=tau, policy_noise=0.0, policy_freq=2, critic_hidden=(16, 16),
                   actor_hidden=(16, 16))
    for net in (L.actor, L.actor_target, L.critic, L.critic_target):
        net.double()
    with torch.no_grad():  # targets that lag the online networks, as after some training
        for p in list(L.critic_target.parameters()) + list(L.actor_target.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    grads = []
    critic_step = L.critic_opt.step

    def record_and_step(*args, **kwargs):
        grads.append([p.grad.clone() for p in L.critic.parameters()])
        return critic_step(*args, **kwargs)

    L.critic_opt.step = record_and_step
    for it in (1, 2):
        b = batch(seed=it)
        b.not_done[::4] = 0.0  # terminal rows: no bootstrap
        critic = [p.detach().clone().requires_grad_(True) for p in L.critic.parameters()]
        targets = {n: [p.detach().clone() for p in net.parameters()] for n, net in
                   (("critic", L.critic_target), ("actor", L.actor_target))}
        L.train_step(b)
        # reference: the same networks written out as plain float64 matrix products
        with torch.no_grad():
            next_a = torch.tanh(_mlp(b.next_states, targets["actor"])).clamp(-1, 1)
            ta = torch.cat([b.next_states, next_a], 1)
            n1 = len(targets["critic"]) // 2
            tq = torch.min(_mlp(ta, targets["critic"][:n1]), _mlp(ta, targets["critic"][n1:]))
            y = b.rewards + gamma * b.not_done * tq
        sa = torch.cat([b.states, b.actions], 1)
        q1, q2 = _mlp(sa, critic[:n1]), _mlp(sa, critic[n1:])
        (((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()).backward()
        assert len(grads) == it
        for got, p in zip(grads[-1], critic):
            torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12)
        for name, net, online in (("critic", L.critic_target, L.critic), ("actor", L.actor_target, L.actor)):
            for old, new, p in zip(targets[name], net.parameters(), online.parameters()):
                expect = old if it == 1 else (1 - tau) * old + tau * p.detach()  # only after the actor step
                torch.testing.assert_close(new.detach(), expect, rtol=1e-12, atol=1e-14)


def _mlp(x, params):
    """``[w0, b0, w1, b1, ...]`` as a ReLU MLP (no activation after the last layer)."""
    for i in range(0, len(params), 2):
        x = x @ params[i].T + params[i + 1]
        x = torch.relu(x) if i < len(params) - 2 else x
    return x
