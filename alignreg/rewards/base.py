"""Reward functions: ``fn(response_text, record) -> float``, registered by name in :data:`REWARDS`.

A reward sees the decoded response (special tokens removed) and the prompt record it answers, so a
verifier can use any field of the record (``answer`` for exact match, test cases for code, ...).
Rewards are plain Python on strings: they run wherever the rollouts are decoded, with no torch.
"""
from __future__ import annotations

from typing import Callable

from alignreg.registry import Registry

RewardFn = Callable[[str, dict], float]
REWARDS: Registry[RewardFn] = Registry("reward")


@REWARDS.register("exact_match")
def exact_match(response_text: str, record: dict) -> float:
    """1.0 if the response equals ``record["answer"]`` after stripping surrounding whitespace."""
    return 1.0 if response_text.strip() == str(record["answer"]).strip() else 0.0


def compute_rewards(name: str, texts: list[str], records: list[dict]) -> list[float]:
    """Score each response text against its record with the reward registered as ``name``."""
    if len(texts) != len(records):
        raise ValueError(f"compute_rewards: {len(texts)} texts but {len(records)} records")
    fn = REWARDS.get(name)
    return [float(fn(t, r)) for t, r in zip(texts, records)]
