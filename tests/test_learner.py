"""Learner invariance: micro-batching, gradient accumulation and data-parallel sharding give the
same loss and gradients; on-policy ratio is exactly 1; zero coefficients drop their needs."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alignreg.config import RLConfig, RegularizerConfig, from_dict
from alignreg.learner.batch import collate
from alignreg.learner.policy import PolicyLearner, TorchBackend, make_reference
from alignreg.models import build_model, build_tokenizer
from alignreg.regularizers import build_regularizers

ALL_TERMS = [
    {"name": "kl_ref", "coef": 0.1, "params": {"estimator": "full"}},
    {"name": "kl_ref", "id": "kl_k3", "coef": 0.05, "params": {"estimator": "k3"}},
    {"name": "entropy", "coef": 0.01},
    {"name": "siren", "coef": 0.5, "params": {"top_p": 0.9, "top_k": 8, "scope": "global"}},
    {"name": "lp_reg", "coef": 1.0, "params": {"min_p": 0.05, "rho": 0.3, "scope": "global"}},
]


def _cfg(micro: int, terms=ALL_TERMS, learner=None, **alg) -> RLConfig:
    return from_dict(RLConfig, {
        "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 6, "temperature": 0.9},
        "algorithm": {"loss_agg_mode": "seq-mean-token-mean", **alg},
        "learner": {"micro_batch_size": micro, "lr": 1e-2, "grad_clip": 0.0, **(learner or {})},
        "regularizers": terms,
    })


def _batch(tok, seed=0, n=16, shared=False):
    """Random rows in groups of 4; ``shared``: a group's rows share one prompt (as in GRPO)."""
    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    prompts, responses, lps = [], [], []
    for i in range(n):
        p = torch.randint(3, V, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
        p = prompts[i - i % 4] if shared and i % 4 else p
        r = torch.randint(3, V, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        prompts.append(p)
        responses.append(r)
        lps.append([-1.0] * len(r))
    rewards = torch.randint(0, 2, (n,), generator=g).float()
    adv = torch.randn(n, generator=g)
    return collate(prompts, responses, lps, rewards, adv, [i // 4 for i in range(n)], tok.pad_token_id)


def _model(tok, seed=0):
    return build_model(RLConfig().model, len(tok), seed, tok)


def _grads_after_step(micro: int, terms=ALL_TERMS, learner=None, shared=False, tokens=None, **alg):
    """Gradients and metrics of one step; ``tokens``: a list that gets the number of token
    positions each policy forward pass embedded."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = _model(tok)
    if tokens is not None:
        model.get_input_embeddings().register_forward_pre_hook(lambda m, a: tokens.append(a[0].numel()))
    cfg = _cfg(micro, terms, learner, **alg)
    regs = build_regularizers(cfg.regularizers)
    backend = _GradCapture(model, cfg)
    learner = PolicyLearner(model, cfg, regs, ref_model=_perturbed_ref(model), backend=backend)
    metrics = learner.train_step(_batch(tok, shared=shared), step=0)
    return backend.grads, metrics


class _GradCapture(TorchBackend):
    """The real torch backend, keeping a copy of the rank-reduced gradients of the last update."""

    def apply_update(self) -> float:
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        return super().apply_update()


def _perturbed_ref(model):
    ref = make_reference(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


@pytest.mark.parametrize("micro", [1, 3, 7])
def test_micro_batching_gives_same_gradients(micro):
    whole, m_whole = _grads_after_step(16)
    split, m_split = _grads_after_step(micro)
    assert whole.keys() == split.keys() and len(whole) > 0
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m_split["loss/total"], m_whole["loss/total"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("learner", [{"single_pass": False}, {"single_pass": False, "reuse_forward": False}],
                         ids=["reused", "recomputed"])
def test_on_policy_ratio_is_exactly_one(learner):
    """One update per batch, with the no-grad pass for pi_old run (not skipped by single_pass): its
    log-probs and the loss pass's agree exactly, whether the loss pass reuses its forward or not."""
    _, m = _grads_after_step(5, terms=[], learner=learner)
    assert "learner/single_pass" not in m
    assert m["policy/ratio"] == 1.0
    assert m["policy/clipfrac"] == 0.0


def test_bf16_mixed_precision_runs_the_body_in_bf16_and_keeps_float32_state():
    """learner.mixed_precision=bf16: the transformer body (policy and reference) runs under bf16 autocast;
    weights, gradients and Adam state stay float32, and the update differs from the float32 one only by
    bf16 rounding. On-policy, the ratio is still exactly 1 (the no-grad and loss passes use the same kernels)."""
    g32, m32 = _grads_after_step(4)
    g16, m16 = _grads_after_step(4, learner={"mixed_precision": "bf16"})
    assert g16.keys() == g32.keys()
    num = sum(float((g16[n] - g32[n]).norm() ** 2) for n in g32) ** 0.5
    den = sum(float(g32[n].norm() ** 2) for n in g32) ** 0.5
    assert all(g.dtype == torch.float32 for g in g16.values())
    assert 1e-4 < num / den < 0.05, num / den  # bf16 rounding: not zero (autocast is on), not large
    assert m16["policy/ratio"] == 1.0 and m16["policy/clipfrac"] == 0.0
    assert abs(m16["policy/entropy"] - m32["policy/entropy"]) < 1e-2 * abs(m32["policy/entropy"])
    _, m = _grads_after_step(5, terms=[], learner={"mixed_precision": "bf16", "single_pass": False, "reuse_forward": False})
    assert "learner/single_pass" not in m and m["policy/ratio"] == 1.0


@pytest.mark.parametrize("micro", [16, 3])
def test_shared_prompt_pass_gives_the_full_pass_gradients(micro):
    """learner.share_prompt: a group's prompt runs once and its responses continue from the cached
    keys/values. Same gradients and metrics as the full pass (every term, reference included; with
    micro-batches of 3, groups are split across micro-batches), on fewer embedded positions."""
    t_on, t_off = [], []
    g_on, m_on = _grads_after_step(micro, shared=True, tokens=t_on)
    g_off, m_off = _grads_after_step(micro, shared=True, learner={"share_prompt": False}, tokens=t_off)
    assert g_on.keys() == g_off.keys() and len(g_on) > 0
    for n in g_on:
        torch.testing.assert_close(g_on[n], g_off[n], rtol=1e-4, atol=1e-6, msg=n)
    # Lp-Reg regularises a low token when log pi < its min-p proxy; where the filter keeps every
    # token the proxy *is* log pi and float rounding decides the comparison (with a ~0 penalty), so
    # its counters may differ by such ties.
    ties = {"reg/lp_reg/reg_frac", "reg/lp_reg/kl3"}
    for k, v in m_off.items():
        if k not in ties:
            assert m_on[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert len(t_on) > len(t_off) and sum(t_on) < 0.9 * sum(t_off), (t_on, t_off)


def test_shared_prompt_hidden_states_equal_the_full_pass():
    """response_hidden with share_prompt: the same values and parameter gradients up to float32
    rounding (left-padded prompts of different lengths, right-padded responses, a one-token response); without
    shared prompts, and in training under gradient checkpointing (HF keeps no cache there), the plain
    pass runs."""
    from alignreg.learner.policy import lm_parts, response_hidden

    tok = build_tokenizer()
    model = _model(tok)
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    body, _, _ = lm_parts(model)
    batch = _batch(tok, seed=3, shared=True)
    w = torch.randn(batch.response_ids.shape + (model.config.hidden_size,), generator=torch.Generator().manual_seed(0))

    def run(share):
        model.zero_grad()
        seen.clear()
        h = response_hidden(body, batch, share_prompt=share)
        (h * w).sum().backward()
        return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, list(seen)

    h0, g0, s0 = run(False)
    h1, g1, s1 = run(True)
    P, R = batch.prompt_len, batch.response_len
    assert s0 == [(16, P + R)] and s1 == [(4, P), (16, R - 1)]
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-5)
    for n in g0:  # per tensor: float32 rounding of sums in a different order
        assert float((g1[n] - g0[n]).norm()) <= 1e-5 * float(g0[n].norm()) + 1e-7, n
    assert run(True)[2] == s1  # deterministic path choice
    seen.clear()
    response_hidden(body, _batch(tok, seed=3), share_prompt=True)  # distinct prompts: one plain pass
    assert seen == [(16, _batch(tok, seed=3).input_ids.shape[1])]
    model.gradient_checkpointing_enable()
    model.train()
    h2, g2, s2 = run(True)
    assert s2 == s0
    torch.testing.assert_close(h2, h0, rtol=1e-5, atol=1e-5)


def test_zero_coefficient_drops_term_and_reference():
    tok = build_tokenizer()
    model = _model(tok)
    cfg = _cfg(16, terms=[{"name": "kl_ref", "coef": 0.0, "params": {"estimator": "full"}}])
    regs = build_regularizers(cfg.regularizers)
    assert len(regs) == 0 and regs.needs() == {}
    learner = PolicyLearner(model, cfg, regs, ref_model=make_reference(model))
    assert learner.ref_model is None
    m = learner.train_step(_batch(tok), 0)
    assert not any(k.startswith("reg/") for k in m)


def test_off_policy_epochs_and_guard_variants_run():
    for variant in ("kl_correct", "seq_standardize", "group_standardize", "position_standardize"):
        terms = [{"name": "grpo_guard", "coef": 1.0, "params": {"variant": variant}}]
        tok = build_tokenizer()
        model = _model(tok)
        cfg = from_dict(RLConfig, {
            "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 6},
            "learner": {"micro_batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 2, "lr": 1e-2},
            "regularizers": terms,
        })
        learner = PolicyLearner(model, cfg, build_regularizers(cfg.regularizers))
        m = learner.train_step(_batch(tok), 0)
        assert torch.isfinite(torch.tensor(m["loss/total"]))
        # later mini-batches are off-policy: the raw ratio moves away from 1
        assert m["reg/grpo_guard/pre_ratio_std"] > 0


# ------------------------------------------------------------------------------------------------
# Two data-parallel ranks (real torch.distributed with gloo) == one process
# ------------------------------------------------------------------------------------------------


def _dp_worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = _model(tok)
    ref = _perturbed_ref(model)
    cfg = _cfg(3)
    backend = _GradCapture(model, cfg)
    learner = PolicyLearner(model, cfg, build_regularizers(cfg.regularizers), ref_model=ref, backend=backend)
    batch = _batch(tok)
    half = len(batch) // world
    shard = batch.rows(slice(rank * half, (rank + 1) * half))
    metrics = learner.train_step(shard, 0)
    if rank == 0:
        torch.save((backend.grads, metrics), os.path.join(out_dir, "grads.pt"))
    dist.destroy_process_group()


def test_two_data_parallel_ranks_match_single_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_dp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    dp, dp_metrics = torch.load(tmp_path / "grads.pt")
    single, metrics = _grads_after_step(16)
    for k in single:
        torch.testing.assert_close(dp[k], single[k], rtol=1e-4, atol=1e-6)
    # the logged losses are the whole batch's, not rank 0's share of it
    losses = [k for k in metrics if k.endswith("loss") or k.startswith("loss/")] + [
        "optim/grad_norm", "policy/entropy", "policy/rollout_logprob_diff"]
    assert len(losses) > 5
    for k in losses:
        assert dp_metrics[k] == pytest.approx(metrics[k], rel=1e-4, abs=1e-6), k


MICRO_TERMS = [
    {"name": "kl_ref", "coef": 0.1, "params": {"estimator": "full"}},
    {"name": "entropy", "coef": 0.01},
    {"name": "siren", "coef": 0.5, "params": {"top_p": 0.9, "top_k": 8}},
    {"name": "lp_reg", "coef": 1.0, "params": {"min_p": 0.05, "rho": 0.3}},
]


@pytest.mark.parametrize("terms", [ALL_TERMS, MICRO_TERMS], ids=["global-scopes+k3", "micro-scopes"])
def test_first_update_reuses_the_no_grad_pass_exactly(terms):
    """learner.reuse_forward: the on-policy update takes its statistics from the no-grad pass
    (pi_theta = pi_old) and runs only their backward. Same gradients and metrics as recomputing."""
    g_on, m_on = _grads_after_step(4, terms, {"reuse_forward": True})
    g_off, m_off = _grads_after_step(4, terms, {"reuse_forward": False})
    assert m_on["learner/forward_reused"] == 1.0 and "learner/forward_reused" not in m_off
    assert g_on.keys() == g_off.keys()
    for n in g_on:
        torch.testing.assert_close(g_on[n], g_off[n], rtol=1e-5, atol=1e-7, msg=n)
    for k, v in m_off.items():
        assert m_on[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


SINGLE_PASS_TERMS = [  # nothing that needs the no-grad pass after SIREN's anchor step: no reference, micro scopes
    {"name": "entropy", "coef": 0.01},
    {"name": "siren", "coef": 0.5, "params": {"top_p": 0.9, "top_k": 8}},
]


def _two_steps(terms, learner, **alg):
    """Grads of the second of two steps, and both steps' metrics."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = _model(tok)
    cfg = _cfg(4, terms, learner, **alg)
    backend = _GradCapture(model, cfg)
    pl = PolicyLearner(model, cfg, build_regularizers(cfg.regularizers), backend=backend)
    metrics = [pl.train_step(_batch(tok, seed=s), step=s) for s in range(2)]
    return backend.grads, metrics


@pytest.mark.parametrize("terms", [[], SINGLE_PASS_TERMS], ids=["no-terms", "entropy+siren"])
@pytest.mark.parametrize("tis_cap", [0.0, 2.0])
def test_on_policy_single_pass_equals_the_two_pass_step(terms, tis_cap, monkeypatch):
    """learner.single_pass: on-policy with nothing that reads the no-grad pass, the step skips it
    (old log-probs = the loss pass's detached values). Same gradients and metrics as with it.
    SIREN measures its anchor on the first step's no-grad pass, so only its second step is single."""
    calls = []
    orig = PolicyLearner._old_pass
    monkeypatch.setattr(PolicyLearner, "_old_pass", lambda self, *a: calls.append(1) or orig(self, *a))
    g_on, m_on = _two_steps(terms, {"single_pass": True}, tis_cap=tis_cap)
    assert len(calls) == (1 if terms else 0) and m_on[1]["learner/single_pass"] == 1.0
    assert ("learner/single_pass" in m_on[0]) == (not terms)
    calls.clear()
    g_off, m_off = _two_steps(terms, {"single_pass": False}, tis_cap=tis_cap)
    assert len(calls) == 2 and not any("learner/single_pass" in m for m in m_off)
    assert g_on.keys() == g_off.keys()
    for n in g_on:
        torch.testing.assert_close(g_on[n], g_off[n], rtol=1e-5, atol=1e-6, msg=n)
    for on, off in zip(m_on, m_off):
        assert off["policy/rollout_logprob_diff"] > 0.1 and "policy/entropy" in off
        assert not terms or off["reg/siren/anchor"] == on["reg/siren/anchor"]
        for k, v in off.items():
            if k != "learner/forward_reused":
                assert on[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("terms,learner", [
    (MICRO_TERMS, {}),  # a reference model
    ([{"name": "siren", "coef": 0.5, "params": {"top_p": 0.9, "top_k": 8, "scope": "global"}}], {}),  # whole-batch prepass
    ([{"name": "lp_reg", "coef": 1.0, "params": {"min_p": 0.05, "rho": 0.3}}], {}),  # pi_old min-p statistics
    ([{"name": "grpo_guard", "coef": 1.0}], {}),  # pi_old's full distribution (kl_old)
    ([], {"mini_batch_size": 8}),  # several updates per batch
], ids=["reference", "global-scope", "old-min-p", "kl-old", "two-updates"])
def test_single_pass_falls_back_when_the_no_grad_pass_is_needed(terms, learner, monkeypatch):
    if terms and terms[0]["name"] == "grpo_guard":  # refused on-policy by RLConfig.validate; the learner must still run pi_old's pass
        monkeypatch.setattr(RLConfig, "validate", lambda self, path: None)
    _, m = _grads_after_step(4, terms, {"single_pass": True, **learner})
    assert "learner/single_pass" not in m


def test_later_updates_recompute_the_forward():
    """After the first optimizer step the no-grad pass is stale: two mini-batches -> half reused."""
    _, m = _grads_after_step(4, MICRO_TERMS, {"reuse_forward": True, "mini_batch_size": 8})
    assert m["learner/forward_reused"] == 0.5


def test_nonfinite_gradients_skip_the_update_and_then_stop():
    """An inf/NaN gradient norm (here: one NaN advantage) skips the update, weights and Adam state stay
    as they were; more than ``learner.max_nonfinite_updates`` in a row raise instead of training on."""
    tok = build_tokenizer()
    model = _model(tok)
    cfg = _cfg(16, terms=[], learner={"max_nonfinite_updates": 1})
    learner = PolicyLearner(model, cfg, build_regularizers(cfg.regularizers))
    bad = _batch(tok)
    bad.advantages[3] = float("nan")

    def weights():
        return {k: v.clone() for k, v in model.state_dict().items()}

    w0 = weights()
    m = learner.train_step(bad, 0)
    assert m["optim/nonfinite_skipped"] == 1.0 and not torch.isfinite(torch.tensor(m["optim/grad_norm"]))
    assert all(torch.equal(w0[k], v) for k, v in weights().items()) and not learner.backend.optimizer.state
    m = learner.train_step(_batch(tok), 1)  # a finite update is applied and resets the count
    assert m["optim/nonfinite_skipped"] == 0.0
    w1 = weights()
    assert any(not torch.equal(w0[k], v) for k, v in w1.items())
    learner.train_step(bad, 2)  # one in a row is allowed
    assert all(torch.equal(w1[k], v) for k, v in weights().items())
    # the count is part of the checkpoint: a resumed learner stops at the same update
    resumed = PolicyLearner(_model(tok), cfg, build_regularizers(cfg.regularizers))
    resumed.load_state_dict(copy.deepcopy(learner.state_dict()))
    with pytest.raises(FloatingPointError, match=r"step 4 \(2 updates in a row, more than learner.max_nonfinite_updates=1\)"):
        resumed.train_step(bad, 3)


def test_batches_move_to_the_learners_device():
    """The driver builds batches on the host; the learner moves every tensor to its model's device (a
    GPU in real runs; checked here with the meta device, which keeps shapes and dtypes), and a batch
    already there is passed through as it is."""
    from dataclasses import fields

    tok = build_tokenizer()
    b = _batch(tok)
    assert b.to("cpu") is b
    m = b.to("meta")
    for f in fields(b):
        v, w = getattr(b, f.name), getattr(m, f.name)
        if isinstance(v, torch.Tensor):
            assert w.device.type == "meta" and w.shape == v.shape and w.dtype == v.dtype, f.name
        else:
            assert w == v
    model = _model(tok)
    learner = PolicyLearner(model, from_dict(RLConfig, {}), build_regularizers([]))
    assert learner.device == next(model.parameters()).device


def test_dropout_draws_depend_on_seed_step_and_rank_only():
    """With dropout in the model, a step's update is a function of (weights, batch, trainer.seed, step): not
    of the process's RNG state (a Ray actor's, or the one a resume restores), which the step leaves as it
    was; another step number draws other masks."""
    tok = build_tokenizer()
    cfg = from_dict(RLConfig, {"learner": {"micro_batch_size": 16, "lr": 1e-2}, "trainer": {"seed": 3}})

    def step(step_no, global_seed):
        model = _model(tok)
        for m in model.modules():  # Qwen2's eager attention applies dropout to its weights in train mode
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = 0.5
        learner = PolicyLearner(model, cfg, build_regularizers([]))
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        metrics = learner.train_step(_batch(tok), step_no)
        assert torch.equal(torch.get_rng_state(), before)
        return metrics["policy/pg_loss"], [p.detach().clone() for p in model.parameters()]

    (l1, w1), (l2, w2), (l3, w3) = step(5, 0), step(5, 123), step(6, 0)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert any(not torch.equal(a, b) for a, b in zip(w1, w3))  # other masks at another step
    # async rollout in one process: the HF engine's thread samples from the process's generator, which the
    # learner must not reseed mid-step (that moved the rollout's draws); it draws from the stream as it is
    cfg = from_dict(RLConfig, {"learner": {"micro_batch_size": 16, "lr": 1e-2}, "trainer": {"seed": 3, "async_rollout": True}})
    model = _model(tok)
    learner = PolicyLearner(model, cfg, build_regularizers([]))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    calls = []
    real = torch.manual_seed
    torch.manual_seed = lambda s: (calls.append(s), real(s))[1]
    try:
        learner.train_step(_batch(tok), 5)
    finally:
        torch.manual_seed = real
    assert calls == [] and torch.equal(torch.get_rng_state(), before)  # no dropout in the default model: no draws


def test_resume_applies_the_configs_optimizer_settings_not_the_checkpoints():
    """The README: a changed learning rate (betas, weight decay) applies from the resumed step on;
    the checkpoint's param_groups and scheduler base_lrs held the old values and won."""
    tok = build_tokenizer()
    model = _model(tok)
    old = TorchBackend(model, _cfg(16, learner={"lr": 1e-3, "warmup_steps": 4}))
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        old.apply_update()
    state = copy.deepcopy(old.state_dict())
    new = TorchBackend(_model(tok), _cfg(16, learner={"lr": 1e-2, "warmup_steps": 4, "weight_decay": 0.1,
                                                      "betas": [0.8, 0.9]}))
    new.load_state_dict(state)
    g = new.optimizer.param_groups[0]
    assert g["lr"] == pytest.approx(1e-2 * 3 / 4)  # two updates done: warmup factor (2 + 1) / 4
    assert (g["weight_decay"], tuple(g["betas"])) == (0.1, (0.8, 0.9))
    assert new.scheduler.get_last_lr() == [pytest.approx(1e-2 * 3 / 4)]
    for p in new.model.parameters():
        p.grad = torch.ones_like(p)
    new.apply_update()
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_logged_learning_rate_is_the_one_the_update_used():
    _, metrics = _grads_after_step(16, learner={"warmup_steps": 3})
    assert metrics["optim/lr"] == pytest.approx(1e-2 / 3)  # the first warmup update, not the next one's rate


@pytest.mark.parametrize("single_pass", [True, False])
def test_learner_log_probs_use_the_rollout_temperature(single_pass):
    """The engine reports log_softmax(logits / T) at rollout.temperature; the learner's pi_old statistics
    (the no-grad pass, or the single pass's loss pass) divide by the same T, so their gap to the engine's
    log-probs on the learner's own weights is float noise. At T = 1 the same batch would be far off."""
    from alignreg.models import encode_prompts
    from alignreg.rollout.base import SamplingParams
    from alignreg.rollout.hf import HFRolloutEngine

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = _model(tok)
    engine = HFRolloutEngine(model, tok)
    prompts = encode_prompts(tok, ["3142=", "97=", "5511=", "80="])
    rb = engine.generate(prompts, SamplingParams(temperature=0.7, n=4, max_new_tokens=6, seed=0))
    adv = torch.randn(len(rb), generator=torch.Generator().manual_seed(1))
    batch = collate(rb.prompt_ids, rb.response_ids, rb.logprobs, torch.zeros(len(rb)), adv, rb.prompt_index,
                    tok.pad_token_id)

    def diff(temperature):
        cfg = from_dict(RLConfig, {"rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 6,
                                               "temperature": temperature},
                                   "learner": {"micro_batch_size": 16, "single_pass": single_pass}})
        learner = PolicyLearner(copy.deepcopy(model), cfg, build_regularizers([]))
        m = learner.train_step(batch, step=0)
        assert m.get("learner/single_pass", 0.0) == float(single_pass)
        return m["policy/rollout_logprob_diff"]

    assert diff(0.7) < 1e-4
    assert diff(1.0) > 1e-2  # the check can tell: the same batch scored at T = 1


class _UpdateCapture(TorchBackend):
    """The torch backend, keeping (weights before the update, gradients) of every update of a step."""

    updates: list

    def apply_update(self) -> float:
        self.updates = getattr(self, "updates", [])
        self.updates.append(({n: p.detach().clone() for n, p in self.model.named_parameters()},
                             {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}))
        return super().apply_update()


def _teacher_forced_logprobs(model, batch, temperature):
    """Per-row float64 forward on the unpadded sequence: log_softmax(logits / T) at each response token."""
    rows = []
    for i in range(len(batch)):
        ids = batch.input_ids[i][batch.attention_mask[i] == 1]
        n = int(batch.mask[i].sum())
        logits = model(input_ids=ids[None]).logits[0].double() / temperature
        lp = torch.log_softmax(logits[len(ids) - n - 1 : len(ids) - 1], -1).gather(-1, ids[len(ids) - n :, None])[:, 0]
        rows.append(torch.cat([lp, lp.new_zeros(batch.response_len - n)]))
    return torch.stack(rows)


@pytest.mark.parametrize("policy_loss", ["ppo", "drgrpo"])
def test_off_policy_updates_match_a_float64_clipped_pg_loss(policy_loss):
    """Two PPO epochs of two mini-batches each (updates 2-4 are off-policy), eps_low != eps_high, dual clip,
    truncated importance weights from rollout log-probs != pi_old's: each update's gradient equals the
    gradient of a float64 re-implementation of the clipped objective, written out here token by token,
    at the weights that update saw (pi_old: the weights at step start)."""
    eps_low, eps_high, c, cap, T = 0.1, 0.3, 3.0, 2.0, 0.8
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = _model(tok)
    cfg = from_dict(RLConfig, {
        "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 6, "temperature": T},
        "algorithm": {"policy_loss": policy_loss, "loss_agg_mode": "token-mean", "eps_low": eps_low,
                      "eps_high": eps_high, "dual_clip_c": c, "tis_cap": cap},
        "learner": {"micro_batch_size": 3, "mini_batch_size": 8, "ppo_epochs": 2, "lr": 0.1, "grad_clip": 0.0},
    })
    batch = _batch(tok, shared=True)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        old = _teacher_forced_logprobs(model64, batch, T)
    # the engine's log-probs: pi_old's, off by up to +-1.2 nats (importance weights from 0.3 to 3.3, capped at 2)
    noise = 2.4 * torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 1.2
    batch.rollout_logprobs = ((old + noise) * batch.mask).float()
    backend = _UpdateCapture(model, cfg)
    PolicyLearner(model, cfg, build_regularizers([]), backend=backend).train_step(batch, step=0)
    assert len(backend.updates) == 4
    m = batch.mask.double()
    adv = batch.advantages.double()
    is_w = torch.exp(old - batch.rollout_logprobs.double()).clamp(max=cap)
    seen = {"low": 0, "high": 0, "dual": 0, "capped": 0}
    for k, (weights, grads) in enumerate(backend.updates):
        rows = slice(0, 8) if k % 2 == 0 else slice(8, 16)
        with torch.no_grad():
            for n, p in model64.named_parameters():
                p.copy_(weights[n].double())
        model64.zero_grad()
        mb = batch.rows(rows)
        lp = _teacher_forced_logprobs(model64, mb, T)
        ratio = torch.exp(lp - old[rows])
        a, mm = adv[rows], m[rows]
        loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high))
        dual = (a < 0) & (loss > -a * c)
        loss = torch.where(dual, -a * c, loss) * is_w[rows]
        if policy_loss == "drgrpo":  # seq-mean-token-sum-norm over rollout.max_new_tokens
            total = (loss * mm).sum() / cfg.rollout.max_new_tokens / mm.shape[0]
        else:
            total = (loss * mm).sum() / mm.sum()
        total.backward()
        on = mm > 0
        seen["low"] += int(((ratio < 1 - eps_low) & on).sum())
        seen["high"] += int(((ratio > 1 + eps_high) & on).sum())
        seen["dual"] += int((dual & on).sum())
        seen["capped"] += int(((is_w[rows] == cap) & on).sum())
        ref = {n: p.grad for n, p in model64.named_parameters() if p.grad is not None}
        norm = sum(float(g.norm() ** 2) for g in ref.values()) ** 0.5
        assert norm > 1e-3 and grads.keys() == ref.keys()
        for n, g in grads.items():
            assert torch.allclose(g.double(), ref[n], atol=1e-5 * norm, rtol=1e-3), (k, n)
    assert all(v > 0 for v in seen.values()), seen  # every branch of the objective was taken


def test_bf16_engine_and_learner_log_probs_agree():
    """learner.mixed_precision=bf16 with the HF engine under the same autocast: the engine computes its lm
    head and log-softmax in float32 outside autocast, as the learner's loss does, so the rollout log-probs
    equal the learner's (no-grad pass and loss pass) and the parity probe's learner side up to float32
    rounding; with a bf16 head (the engine's whole forward under autocast) they differed by ~2e-3."""
    from alignreg.models import encode_prompts
    from alignreg.rollout.base import SamplingParams
    from alignreg.rollout.hf import HFRolloutEngine

    tok = build_tokenizer()
    model = _model(tok)
    engine = HFRolloutEngine(model, tok, autocast=torch.bfloat16)
    prompts = encode_prompts(tok, ["3142=", "97=", "5511=", "80="])
    rb = engine.generate(prompts, SamplingParams(temperature=0.7, n=4, max_new_tokens=6, seed=0))
    batch = collate(rb.prompt_ids, rb.response_ids, rb.logprobs, torch.zeros(len(rb)), torch.randn(len(rb)),
                    rb.prompt_index, tok.pad_token_id)
    cfg = from_dict(RLConfig, {"rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 6, "temperature": 0.7},
                               "learner": {"micro_batch_size": 16, "mixed_precision": "bf16", "single_pass": False}})
    learner = PolicyLearner(copy.deepcopy(model), cfg, build_regularizers([]))
    probe = [learner.sequence_logprobs(p, r, 0.7) for p, r in zip(rb.prompt_ids, rb.response_ids)]
    assert max(abs(a - b) for lp, pr in zip(rb.logprobs, probe) for a, b in zip(lp, pr)) < 2e-6
    assert max(abs(a - b) for p, r, pr in zip(rb.prompt_ids, rb.response_ids, probe)
               for a, b in zip(engine.logprobs_of(p, r, 0.7), pr)) < 2e-6  # the parity probe, both sides
    m = learner.train_step(batch, step=0)
    assert m["policy/rollout_logprob_diff"] < 1e-6  # the no-grad pass's old log-probs vs the rollout's


def test_the_parity_probes_learner_side_is_the_losss_computation():
    """The parity probe's learner side (``LearnerWorker.probe_logprobs``) computes log-probs as the loss
    does (``learner.mixed_precision``, the chunked lm head, the rollout temperature): equal to the loss
    path's on the same sequence, and to the bf16 HF engine's probe within 1e-5. A float32 forward of its own
    (as before) was off by bf16 rounding, ~1e-3, so no tight ``sync.parity_tol`` could hold."""
    from alignreg.config import SyncConfig
    from alignreg.losses.stats import StatsSpec
    from alignreg.orchestration.weight_sync import make_probe, verify_sync
    from alignreg.orchestration.workers import LearnerWorker
    from alignreg.rollout.hf import HFRolloutEngine

    tok = build_tokenizer()
    model = _model(tok)
    cfg = from_dict(RLConfig, {"rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 6, "temperature": 0.7},
                               "learner": {"micro_batch_size": 16, "mixed_precision": "bf16"}, "regularizers": []})
    worker = LearnerWorker(cfg, model=copy.deepcopy(model))
    engine = HFRolloutEngine(model, tok, autocast=torch.bfloat16)
    sync = SyncConfig(parity_tol=1e-5, probe_tokens=16)
    probe = make_probe(len(tok), sync)
    m = verify_sync(engine, lambda p, r: worker.probe_logprobs(p, r, 0.7), probe, sync, temperature=0.7)
    assert m["sync/probe_max_abs_diff"] <= 1e-5
    learner = worker.learner
    batch = collate([probe[0]], [probe[1]], [[0.0] * len(probe[1])], torch.zeros(1), torch.zeros(1), [0], tok.pad_token_id)
    spec = StatsSpec(temperature=0.7)
    with torch.no_grad():
        loss_lp = learner._stats(learner.model, batch, spec, learner._chunk(spec))[0]["logprobs"]
    assert torch.equal(torch.tensor(worker.probe_logprobs(*probe, 0.7)), loss_lp[0])
    assert learner.model.training  # the probe's eval mode does not leak into training
