"""Verifiable rewards. ``REWARDS`` maps a name (``task.reward`` in config) to ``fn(text, record)``."""
from alignreg.rewards.base import REWARDS, RewardFn, compute_rewards, exact_match

__all__ = ["REWARDS", "RewardFn", "compute_rewards", "exact_match"]
