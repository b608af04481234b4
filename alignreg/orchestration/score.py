"""SCoRe two-attempt episodes (Kumar et al., arXiv 2409.12917): generation, batches, metrics.

An episode is ``x1 -> y1 -> x2 = [x1, y1, p_sc] -> y2`` with the self-correction instruction
``p_sc`` (``score.instruction``). Both attempts come from the same :class:`RolloutEngine` (HF or
vLLM), so nothing here depends on the engine: ``group_size`` first attempts per prompt, then one
second attempt per first attempt.

Training batch (:func:`score_batch`): the N first-attempt rows, then the N second-attempt rows, in
one :class:`TrainBatch` (prompts of different lengths are left-padded as usual). Groups are numbered
``2 * prompt + (attempt - 1)``: group-normalised advantages (``score.advantage: grpo|rloo|drgrpo``)
compare the G attempts-1 (or attempts-2) of one prompt, and the ``score_kl`` term reads the attempt
from the parity. Rewards per stage (REGULARIZERS.md §6):

* Stage I  (eq. 3): attempt 1 gets advantage 0 (its tokens only see the KL term, beta2 via
  ``score_kl`` with ``attempts: first``); attempt 2 gets ``r2``.
* Stage II (eq. 4/5): attempt 1 gets ``r1``, attempt 2 the shaped ``r2 + alpha * (r2 - r1)``
  (regularizer ``score``, coef alpha), KL beta1 on both (``score_kl`` ``attempts: both``).

``score.advantage: reinforce`` uses the (shaped) reward itself as the advantage (the paper's
REINFORCE without baseline, "instantaneous reward", γ = 0): on-policy the learner's clipped loss
then has the gradient of ``-mean_rows(A * seqmean(log pi))``.

Metrics (paper §5): Accuracy@t1, Accuracy@t2, Δ(t1,t2) = Acc@t2 - Acc@t1, Δ^{i→c} (fraction of
problems wrong at t1 and right at t2), Δ^{c→i} (right at t1, wrong at t2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from alignreg.algorithms.advantages import compute_advantages
from alignreg.config import MathDataConfig, ScoreConfig
from alignreg.learner.batch import TrainBatch, collate
from alignreg.rewards.math import batch_rewards, pop_reward_metrics
from alignreg.rollout.base import SECOND_ATTEMPT_STREAM, RolloutBatch, SamplingParams, mix_seed


@dataclass
class TwoAttemptEpisodes:
    """N first attempts and their N second attempts; row ``i`` of each belongs to one episode."""

    records: list[dict]  # one per prompt
    first: RolloutBatch  # N rows (``group_size`` per prompt)
    second: RolloutBatch  # N rows; second.prompt_ids[i] = x2 of episode i
    texts1: list[str]
    texts2: list[str]
    r1: list[float]
    r2: list[float]
    stage: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.r1)

    @property
    def attempt(self) -> list[int]:
        """Attempt (1 or 2) of each row of the stacked batch [first rows; second rows]."""
        return [1] * len(self) + [2] * len(self)

    @property
    def pair(self) -> list[int]:
        """Row of the other attempt of the same episode, in the stacked batch."""
        n = len(self)
        return [n + i for i in range(n)] + list(range(n))

    @property
    def prompt_index(self) -> list[int]:
        return list(self.first.prompt_index) * 2


def second_prompt_ids(tokenizer, record: dict, x1_ids: list[int], y1_ids: list[int], y1_text: str,
                      instruction: str, data: Optional[MathDataConfig] = None) -> list[int]:
    """Token ids of ``x2 = [x1, y1, p_sc]``.

    Raw prompts: ``x1 + y1 (EOS removed) + tokens(instruction)`` at the token level, so attempt 1
    appears exactly as sampled. Chat prompts (``math_data.chat_template``): the conversation
    ``user: x1, assistant: y1, user: p_sc`` rendered by the tokenizer's chat template.
    """
    if data is not None and data.chat_template and "question" in record:
        from alignreg.data.math import apply_template

        q = apply_template(record["question"], data.template)
        msgs = ([{"role": "system", "content": data.system_prompt}] if data.system_prompt else []) + [
            {"role": "user", "content": q}, {"role": "assistant", "content": y1_text},
            {"role": "user", "content": instruction}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    y1 = [t for t in y1_ids if t != tokenizer.eos_token_id]
    return list(x1_ids) + y1 + tokenizer(instruction, add_special_tokens=False)["input_ids"]


def generate_episodes(engine, tokenizer, records: list[dict], sampling: SamplingParams, reward: str,
                      score: ScoreConfig, data: Optional[MathDataConfig] = None,
                      second_sampling: Optional[SamplingParams] = None) -> TwoAttemptEpisodes:
    """Sample ``sampling.n`` first attempts per record, then one second attempt for each."""
    from alignreg.models import encode_prompts

    x1 = encode_prompts(tokenizer, [r["prompt"] for r in records])
    first = engine.generate(x1, sampling)
    texts1 = tokenizer.batch_decode(first.response_ids, skip_special_tokens=True)
    # a finished attempt's last token is its EOS or rollout.stop_tokens entry: not part of y1 in x2
    y1 = [r[:-1] if done else r for r, done in zip(first.response_ids, first.finished)]
    x2 = [second_prompt_ids(tokenizer, records[p], first.prompt_ids[i], y1[i], texts1[i], score.instruction, data)
          for i, p in enumerate(first.prompt_index)]
    sp2 = second_sampling or SamplingParams(
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, greedy=sampling.greedy,
        max_new_tokens=score.second_max_new_tokens or sampling.max_new_tokens, n=1,
        seed=None if sampling.seed is None else mix_seed(sampling.seed, SECOND_ATTEMPT_STREAM))  # not the next step's seed
    second = engine.generate(x2, sp2)
    texts2 = tokenizer.batch_decode(second.response_ids, skip_special_tokens=True)
    recs = [records[p] for p in first.prompt_index]
    scores = batch_rewards(reward, texts1 + texts2, recs + recs)
    n = len(texts1)
    return TwoAttemptEpisodes(records, first, second, texts1, texts2, scores[:n], scores[n:], score.stage)


def self_correction_metrics(r1: list[float], r2: list[float], prefix: str = "") -> dict[str, float]:
    """Accuracy@t1/@t2, Δ(t1,t2), Δ^{i→c}, Δ^{c→i} (a response is correct when its reward >= 1)."""
    n = max(len(r1), 1)
    c1 = [a >= 1.0 for a in r1]
    c2 = [b >= 1.0 for b in r2]
    acc1, acc2 = sum(c1) / n, sum(c2) / n
    return {
        f"{prefix}accuracy@t1": acc1,
        f"{prefix}accuracy@t2": acc2,
        f"{prefix}delta_t1_t2": acc2 - acc1,
        f"{prefix}delta_i2c": sum((not a) and b for a, b in zip(c1, c2)) / n,
        f"{prefix}delta_c2i": sum(a and (not b) for a, b in zip(c1, c2)) / n,
    }


def stage_rewards(ep: TwoAttemptEpisodes, shaped: torch.Tensor) -> torch.Tensor:
    """Rewards the policy gradient sees per stacked row: Stage I zeroes attempt 1."""
    out = shaped.clone()
    if ep.stage == 1:
        out[: len(ep)] = 0.0
    return out


def score_batch(ep: TwoAttemptEpisodes, shaped: torch.Tensor, score: ScoreConfig, pad_id: int, adv_eps: float = 1e-6) -> TrainBatch:
    """The learner batch of both attempts (see the module docstring for rows, groups, advantages)."""
    n = len(ep)
    group = torch.tensor([2 * p for p in ep.first.prompt_index] + [2 * p + 1 for p in ep.first.prompt_index], dtype=torch.long)
    rewards = stage_rewards(ep, shaped)
    if score.advantage == "reinforce":
        adv = rewards
    else:
        adv = compute_advantages(score.advantage, rewards, group, adv_eps)
    if ep.stage == 1:
        adv = adv.clone()
        adv[:n] = 0.0
    return collate(ep.first.prompt_ids + ep.second.prompt_ids, ep.first.response_ids + ep.second.response_ids,
                   ep.first.logprobs + ep.second.logprobs, rewards, adv, group.tolist(), pad_id)


def score_rollout_step(run, records: list[dict], step: int) -> tuple[TrainBatch, dict[str, float]]:
    """The trainer's ``rollout_step`` for ``score.enabled``: episodes -> shaping -> batch."""
    cfg, tok = run.cfg, run.tokenizer
    rc = cfg.rollout
    sp = SamplingParams(temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k, max_new_tokens=rc.max_new_tokens,
                        n=rc.group_size, seed=cfg.trainer.seed * 1_000_003 + step)  # as the trainer's rollout_step
    ep = generate_episodes(run.rollout, tok, records, sp, cfg.task.reward, cfg.score, cfg.math_data)
    raw = torch.tensor(ep.r1 + ep.r2, dtype=torch.float32)
    shaped, metrics = raw, {}
    for t in run.regs.with_hook("shape_rewards"):  # reward shaping: r + coef * bonus (SCoRe eq. 5)
        bonus, m = t.term.shape_rewards(raw, ep)
        shaped = shaped + run.regs.coef(t, step) * bonus
        metrics.update({f"reg/{t.term.id}/{k}": v for k, v in m.items()})
    batch = score_batch(ep, shaped, cfg.score, tok.pad_token_id, cfg.algorithm.adv_eps)
    lengths = torch.tensor([len(r) for r in ep.first.response_ids + ep.second.response_ids], dtype=torch.float32)
    metrics.update(self_correction_metrics(ep.r1, ep.r2, "rollout/"))
    metrics.update({
        "rollout/reward_mean": float(raw.mean()),
        "rollout/shaped_reward_mean": float(stage_rewards(ep, shaped).mean()),
        "rollout/response_len": float(lengths.mean()),
        "rollout/adv_abs_mean": float(batch.advantages[:, 0].abs().mean()),
        # only for a math reward: the verifier pool is process-wide and may hold another run's counts
        **(pop_reward_metrics() if cfg.task.reward.startswith("math_verify") else {}),
    })
    return batch, metrics


def score_evaluate(engine, tokenizer, records: list[dict], reward: str, score: ScoreConfig, max_new_tokens: int,
                   data: Optional[MathDataConfig] = None, prefix: str = "eval/") -> dict[str, float]:
    """Greedy two-attempt self-correction metrics on held-out records."""
    sp = SamplingParams(greedy=True, max_new_tokens=max_new_tokens, n=1)
    ep = generate_episodes(engine, tokenizer, records, sp, reward, score, data)
    return self_correction_metrics(ep.r1, ep.r2, prefix)
