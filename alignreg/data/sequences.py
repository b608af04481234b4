"""Synthetic sequence tasks with exact verifiers: ``reverse`` and ``sort`` a string of digits.

Unlike single-digit arithmetic, whose 100 problems a tiny model can only memorise, these tasks
have an algorithm that transfers to unseen prompts, so held-out accuracy measures a skill that RL
can sharpen. Prompts look like ``"rev 3852="`` (answer ``"2583"``) and ``"sort 3852="`` (``"2358"``).
"""
from __future__ import annotations

from alignreg.config import ConfigError, TaskConfig
from alignreg.data.synthetic import TASKS, split_problem_space


def _digit_strings(cfg: TaskConfig) -> tuple[list[str], list[str]]:
    if not 1 <= cfg.min_length <= cfg.max_length:
        raise ConfigError("task: need 1 <= min_length <= max_length")
    sizes = [10**n for n in range(cfg.min_length, cfg.max_length + 1)]

    def decode(i: int) -> str:
        for n, size in zip(range(cfg.min_length, cfg.max_length + 1), sizes):
            if i < size:
                return str(i).zfill(n)
            i -= size
        raise IndexError(i)

    train_idx, eval_idx = split_problem_space(sum(sizes), cfg.eval_size, cfg.generated_train_size(), cfg.seed)
    return [decode(i) for i in train_idx], [decode(i) for i in eval_idx]


def _records(strings: list[str], name: str, fn) -> list[dict]:
    return [{"prompt": f"{name} {s}=", "answer": fn(s)} for s in strings]


@TASKS.register("reverse")
def reverse(cfg: TaskConfig) -> tuple[list[dict], list[dict]]:
    """Reverse the digits: ``"rev 3852="`` -> ``"2583"``."""
    train, held = _digit_strings(cfg)
    return _records(train, "rev", lambda s: s[::-1]), _records(held, "rev", lambda s: s[::-1])


@TASKS.register("sort")
def sort(cfg: TaskConfig) -> tuple[list[dict], list[dict]]:
    """Sort the digits ascending: ``"sort 3852="`` -> ``"2358"``."""
    train, held = _digit_strings(cfg)
    key = lambda s: "".join(sorted(s))  # noqa: E731
    return _records(train, "sort", key), _records(held, "sort", key)
