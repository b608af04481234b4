"""Held-out evaluation: greedy accuracy, unbiased pass@k, and mean reward of sampled responses.

pass@k is the probability that at least one of k samples is correct. Estimating it from exactly k
samples is high-variance, so (Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
eq. 1) we draw n >= k samples, count the c correct ones, and average over prompts
``1 - C(n-c, k) / C(n, k)``, which is unbiased for every k <= n at once.
"""
from __future__ import annotations

from typing import Optional

from alignreg.config import EvalConfig
from alignreg.models import encode_prompts
from alignreg.rewards import compute_rewards
from alignreg.rollout.base import RolloutEngine, SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (Chen et al.'s numerically stable form):
    the binomials themselves overflow floats for n in the hundreds.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def evaluate(engine: RolloutEngine, tokenizer, records: list[dict], reward_name: str,
             cfg: EvalConfig, max_new_tokens: int, seed: Optional[int] = None) -> dict:
    """Greedy accuracy and sampled pass@k / mean reward over ``records``.

    A response counts as correct when its reward is >= 1.0 (a verified answer; partial credit from a
    shaped reward does not count). ``eval/pass@k`` is reported for each ``k in cfg.ks`` with
    ``k <= cfg.num_samples``. ``seed`` makes the sampled part reproducible without touching the
    global RNG (see ``rollout/hf.py``).
    """
    if not records:
        raise ValueError("evaluate: no eval records")
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in records])

    def rewards(batch) -> list[float]:
        texts = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
        return compute_rewards(reward_name, texts, [records[i] for i in batch.prompt_index])

    greedy = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=max_new_tokens))
    greedy_r = rewards(greedy)
    metrics = {"eval/greedy_acc": sum(r >= 1.0 for r in greedy_r) / len(records)}

    n = cfg.num_samples
    sampled = engine.generate(prompts, SamplingParams(temperature=cfg.temperature, n=n,
                                                      max_new_tokens=max_new_tokens, seed=seed))
    sampled_r = rewards(sampled)
    correct = [0] * len(records)
    for i, r in zip(sampled.prompt_index, sampled_r):
        correct[i] += r >= 1.0
    for k in cfg.ks:
        if k <= n:
            metrics[f"eval/pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(records)
    metrics["eval/mean_reward"] = sum(sampled_r) / len(sampled_r)
    return metrics
