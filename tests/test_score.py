"""SCoRe: two-attempt episodes, Stage I / II losses against a float64 re-implementation, metrics."""
import copy

import pytest
import torch

from alignreg.config import RegularizerConfig, RLConfig, ScoreConfig, TaskConfig
from alignreg.data import prompt_dataset
from alignreg.learner.policy import PolicyLearner, TorchBackend, make_reference
from alignreg.models import build_tokenizer, encode_prompts, load_policy
from alignreg.orchestration.score import generate_episodes, score_batch, second_prompt_ids, self_correction_metrics
from alignreg.regularizers import build_regularizers
from alignreg.rollout.base import SamplingParams
from alignreg.rollout.hf import HFRolloutEngine

ALPHA, BETA1, BETA2 = 10.0, 0.01, 0.1


class GradCapture(TorchBackend):
    """The plain torch backend, keeping a copy of the reduced gradients of each update."""

    def apply_update(self):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        return super().apply_update()


def setup(stage, seed=0):
    cfg = RLConfig()
    cfg.task = TaskConfig(name="sort", min_length=3, max_length=4, eval_size=8, train_size=64)
    cfg.rollout.group_size = 3
    cfg.rollout.max_new_tokens = 6
    cfg.algorithm.loss_agg_mode = "seq-mean-token-mean"
    cfg.learner.grad_clip = 0.0
    cfg.learner.micro_batch_size = 5  # several micro-batches: the loss must not depend on it
    cfg.score = ScoreConfig(enabled=True, stage=stage, instruction=" check:", advantage="reinforce")
    kl = RegularizerConfig(name="score_kl", coef=BETA2 if stage == 1 else BETA1,
                           params={"attempts": "first" if stage == 1 else "both"})
    cfg.regularizers = [RegularizerConfig(name="score", coef=ALPHA), kl]
    model, tok = load_policy(cfg.model, seed)
    ref = make_reference(model)
    with torch.no_grad():  # policy != reference, so the KL and its gradient are not trivially 0
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    train, _ = prompt_dataset(cfg.task)
    engine = HFRolloutEngine(model, tok)
    sp = SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=seed)
    ep = generate_episodes(engine, tok, train[:4], sp, "exact_match", cfg.score)
    g = torch.Generator().manual_seed(seed + 2)  # a random mix of right/wrong attempts: every case of eq. 5
    ep.r1 = torch.randint(0, 2, (len(ep),), generator=g).float().tolist()
    ep.r2 = torch.randint(0, 2, (len(ep),), generator=g).float().tolist()
    return cfg, model, ref, tok, ep


def token_logprobs(model, batch):
    """Per-row forward on the unpadded sequence (independent of the learner's padded batch)."""
    R = batch.response_len
    rows = []
    for i in range(len(batch)):
        ids = batch.input_ids[i][batch.attention_mask[i] == 1]
        n_resp = int(batch.mask[i].sum())
        n_prompt = len(ids) - n_resp
        lp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
        tok = ids[n_prompt:]
        rows.append(torch.cat([lp[n_prompt - 1:len(ids) - 1].gather(-1, tok[:, None]).squeeze(-1),
                               torch.zeros(R - n_resp, dtype=torch.float64)]))
    return torch.stack(rows)


def reference_loss(lp, ref, m, r1, r2, stage):
    """REGULARIZERS.md §6 reference loss in float64 (per-sample length mean, k3 KL, no baseline)."""
    n = lp.shape[0] // 2

    def seqmean(x, mask):
        return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    kl = seqmean(torch.exp(ref - lp) - (ref - lp) - 1, m)
    lp1, lp2, m1, m2 = lp[:n], lp[n:], m[:n], m[n:]
    if stage == 1:
        return (-r2 * seqmean(lp2, m2) + BETA2 * kl[:n]).mean(), BETA2 * kl[:n].mean()
    r2_sh = r2 + ALPHA * (r2 - r1)
    return (-r1 * seqmean(lp1, m1) - r2_sh * seqmean(lp2, m2) + BETA1 * (kl[:n] + kl[n:])).mean(), BETA1 * (kl[:n] + kl[n:]).mean()


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_loss_matches_float64_reference(stage):
    cfg, model, ref, tok, ep = setup(stage)
    regs = build_regularizers(cfg.regularizers)
    raw = torch.tensor(ep.r1 + ep.r2)
    shaped = raw.clone()
    for t in regs.with_hook("shape_rewards"):
        bonus, _ = t.term.shape_rewards(raw, ep)
        shaped = shaped + regs.coef(t, 0) * bonus
    batch = score_batch(ep, shaped, cfg.score, tok.pad_token_id)
    n = len(ep)
    r1, r2 = torch.tensor(ep.r1, dtype=torch.float64), torch.tensor(ep.r2, dtype=torch.float64)
    # the advantages are the rewards of eq. 3 / eq. 4-5
    expect = torch.cat([torch.zeros(n) if stage == 1 else r1.float(), (r2 + (ALPHA * (r2 - r1) if stage == 2 else 0)).float()])
    assert torch.allclose(batch.advantages[:, 0], expect)

    model64, ref64 = copy.deepcopy(model).double(), copy.deepcopy(ref).double()
    lp = token_logprobs(model64, batch)
    with torch.no_grad():
        ref_lp = token_logprobs(ref64, batch)
    loss, kl_part = reference_loss(lp, ref_lp, batch.mask.double(), r1, r2, stage)
    loss.backward()

    backend = GradCapture(model, cfg)
    learner = PolicyLearner(model, cfg, regs, ref_model=ref, backend=backend)
    metrics = learner.train_step(batch, 0)
    # value: the KL part equals the reference (the learner averages over the 2N rows: factor 1/2)
    assert 2 * metrics["reg/score_kl/loss"] * cfg.regularizers[1].coef == pytest.approx(float(kl_part.detach()), rel=1e-4, abs=1e-7)
    # gradient of the whole objective, parameter by parameter
    ref_grads = {name: p.grad for name, p in model64.named_parameters()}
    total = sum(float((ref_grads[k]) .norm() ** 2) for k in backend.grads) ** 0.5
    assert total > 1e-3
    for name, g in backend.grads.items():
        assert torch.allclose(2 * g.double(), ref_grads[name], atol=1e-6 * max(total, 1.0), rtol=1e-4), name


def test_stage_one_has_no_bonus_and_no_first_attempt_reward():
    cfg, model, ref, tok, ep = setup(1, seed=3)
    regs = build_regularizers(cfg.regularizers)
    raw = torch.tensor(ep.r1 + ep.r2)
    (score,) = regs.with_hook("shape_rewards")
    bonus, _ = score.term.shape_rewards(raw, ep)
    assert torch.count_nonzero(bonus) == 0
    batch = score_batch(ep, raw, ScoreConfig(stage=1, advantage="grpo"), tok.pad_token_id)
    assert torch.count_nonzero(batch.advantages[: len(ep)]) == 0


def test_bonus_values_and_group_normalised_advantages():
    cfg, model, ref, tok, ep = setup(2, seed=4)
    ep.r1 = [1.0, 1.0, 0.0, 0.0] * 3
    ep.r2 = [1.0, 0.0, 1.0, 0.0] * 3
    regs = build_regularizers(cfg.regularizers)
    raw = torch.tensor(ep.r1 + ep.r2)
    (score,) = regs.with_hook("shape_rewards")
    bonus, m = score.term.shape_rewards(raw, ep)
    n = len(ep)
    assert bonus[:n].tolist() == [0.0] * n and bonus[n:].tolist() == [0.0, -1.0, 1.0, 0.0] * 3
    assert m["i2c_frac"] == pytest.approx(0.25) and m["c2i_frac"] == pytest.approx(0.25)
    batch = score_batch(ep, raw + ALPHA * bonus, ScoreConfig(stage=2, advantage="grpo"), tok.pad_token_id)
    groups = batch.group_index
    assert groups[:n].tolist() == [2 * p for p in ep.first.prompt_index]
    assert groups[n:].tolist() == [2 * p + 1 for p in ep.first.prompt_index]
    adv = batch.advantages[:, 0]
    for g in groups.unique():  # zero mean within each (prompt, attempt) group
        assert abs(float(adv[groups == g].sum())) < 1e-4


def test_episode_structure():
    tok = build_tokenizer()
    cfg = RLConfig()
    model, _ = load_policy(cfg.model, 0)
    engine = HFRolloutEngine(model, tok)
    records = [{"prompt": "sort 321=", "answer": "123"}, {"prompt": "sort 54=", "answer": "45"}]
    score = ScoreConfig(enabled=True, instruction=" check:", second_max_new_tokens=3)
    ep = generate_episodes(engine, tok, records, SamplingParams(n=2, max_new_tokens=5, seed=0), "exact_match", score)
    assert len(ep) == 4 and len(ep.second) == 4 and ep.attempt == [1] * 4 + [2] * 4 and ep.pair[:4] == [4, 5, 6, 7]
    instr = tok(" check:", add_special_tokens=False)["input_ids"]
    for i in range(4):
        x1, y1 = ep.first.prompt_ids[i], ep.first.response_ids[i]
        assert x1 == encode_prompts(tok, [records[ep.first.prompt_index[i]]["prompt"]])[0]
        assert ep.second.prompt_ids[i] == x1 + [t for t in y1 if t != tok.eos_token_id] + instr
        assert len(ep.second.response_ids[i]) <= 3
    assert second_prompt_ids(tok, records[0], [1, 2], [3, tok.eos_token_id], "", " check:", None) == [1, 2, 3] + instr


def test_self_correction_metrics():
    m = self_correction_metrics([1, 1, 0, 0, 0], [1, 0, 1, 1, 0])
    assert m == pytest.approx({"accuracy@t1": 0.4, "accuracy@t2": 0.6, "delta_t1_t2": 0.2, "delta_i2c": 0.4, "delta_c2i": 0.2})


def test_score_rollout_step_and_train_step(monkeypatch):
    """The trainer's SCoRe step (episodes -> shaping -> batch) feeds the learner; metrics are logged, the
    self-correction ones from attempt 1 -> attempt 2 of the episodes (not the other way round)."""
    from types import SimpleNamespace

    from alignreg.orchestration import score
    from alignreg.orchestration.score import score_evaluate, score_rollout_step

    cfg, model, ref, tok, _ = setup(2, seed=5)
    cfg.score.advantage = "grpo"
    regs = build_regularizers(cfg.regularizers)
    engine = HFRolloutEngine(model, tok)
    run = SimpleNamespace(cfg=cfg, tokenizer=tok, rollout=engine, regs=regs)
    train, held = prompt_dataset(cfg.task)
    episodes = []

    def scripted_rewards(*args, **kwargs):  # the tiny model's attempts: a known mix of right and wrong
        ep = generate_episodes(*args, **kwargs)
        n = len(ep)
        ep.r1 = [float(i % 4 == 0) for i in range(n)]  # right in 1 of 4 first attempts
        ep.r2 = [float(i % 2 == 0) for i in range(n)]  # right in 1 of 2 second attempts
        episodes.append(ep)
        return ep

    from alignreg.rewards.math import math_scores

    assert math_scores(["so \\boxed{7}"], [{"answer": "7"}]) == [1.0]  # another run's check in this process
    monkeypatch.setattr(score, "generate_episodes", scripted_rewards)
    batch, m = score_rollout_step(run, train[:4], 0)
    monkeypatch.undo()
    assert not [k for k in m if k.startswith("reward/math_")]  # exact_match: no verifier counters, none leaked
    assert len(batch) == 2 * 4 * cfg.rollout.group_size and len(episodes) == 1
    assert {k: m[f"rollout/{k}"] for k in ("accuracy@t1", "accuracy@t2", "delta_t1_t2", "delta_i2c", "delta_c2i")} == \
        pytest.approx({"accuracy@t1": 0.25, "accuracy@t2": 0.5, "delta_t1_t2": 0.25, "delta_i2c": 0.25, "delta_c2i": 0.0})
    assert "reg/score/bonus_mean" in m
    learner = PolicyLearner(model, cfg, regs, ref_model=ref)
    out = learner.train_step(batch, 0)
    assert "reg/score_kl/kl" in out and torch.isfinite(torch.tensor(out["loss/total"]))
    ev = score_evaluate(engine, tok, held[:4], "exact_match", cfg.score, 6)
    assert set(ev) == {f"eval/{k}" for k in ("accuracy@t1", "accuracy@t2", "delta_t1_t2", "delta_i2c", "delta_c2i")}


def test_algorithm_advantage_is_refused_in_score_runs():
    """SCoRe batches take their advantages from score.advantage: another algorithm.advantage would be ignored."""
    from alignreg.config import ConfigError, from_dict

    base = {"score": {"enabled": True, "advantage": "reinforce"}, "regularizers": [{"name": "score"}]}
    with pytest.raises(ConfigError, match=r"config.algorithm.advantage: 'rloo' is not used with score.enabled .*now "
                                          r"'reinforce'\); set score.advantage: rloo"):
        from_dict(RLConfig, {**base, "algorithm": {"advantage": "rloo"}})
    from_dict(RLConfig, {**base, "algorithm": {"advantage": "grpo"}})  # the default: nothing is ignored
    from_dict(RLConfig, {"algorithm": {"advantage": "rloo"}})  # single-response runs use it
