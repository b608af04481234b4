"""Synthetic verifiable tasks: prompts with exactly checkable answers, generated from a seed.

A task is a function ``fn(cfg: TaskConfig) -> (train_records, eval_records)`` registered in
:data:`TASKS`; each record is ``{"prompt": str, "answer": str}`` and the response is correct when
it equals ``answer`` (see ``rewards.exact_match``). The prompt is a bare completion such as
``"3+5="``: the policy's answer is everything it generates up to EOS.

Held-out evaluation is only meaningful if no eval problem is seen in training, so problems are
drawn *without replacement* from the whole problem space and the first ``eval_size`` of the draw
are the eval split. Problem spaces can be small (single-digit addition has only 100 problems), so
the train split is capped at the problems that remain.
"""
from __future__ import annotations

import random
import sys

from alignreg.config import ConfigError, TaskConfig
from alignreg.registry import Registry

TASKS: Registry = Registry("task")
OPERATORS = "+-*"


def _evaluate(operands: list[int], ops: list[str]) -> int:
    """Value of ``a0 op0 a1 op1 ...`` with the usual precedence (* before + and -)."""
    terms, signs, cur = [], [1], operands[0]
    for op, b in zip(ops, operands[1:]):
        if op == "*":
            cur *= b
        else:
            terms.append(cur)
            signs.append(1 if op == "+" else -1)
            cur = b
    terms.append(cur)
    return sum(s * t for s, t in zip(signs, terms))


def split_problem_space(num_problems: int, eval_size: int, train_size: int, seed: int
                        ) -> tuple[list[int], list[int]]:
    """Disjoint (train, eval) problem indices drawn without replacement from ``range(num_problems)``.

    Indices are drawn one at a time (``randrange``, a repeat drawn again), eval first, so the eval
    split depends only on ``(num_problems, eval_size, seed)``: an SFT cold start or an ``eval`` run with
    another ``train_size`` holds out the same problems and never trains on them. (``random.sample``
    switches algorithm with the total drawn, which changed the eval split with ``train_size``; on
    large spaces the draws here are the ones it made.) When training takes more than half of what
    the eval split leaves, the rest of the space is listed and shuffled instead (the space is then
    at most about twice ``train_size``). Huge spaces are never materialised.
    """
    if num_problems > sys.maxsize:
        raise ConfigError(f"task: problem space of {num_problems} problems is too large to index")
    if eval_size >= num_problems:
        raise ConfigError(
            f"task.eval_size ({eval_size}) must be smaller than the number of distinct problems "
            f"({num_problems}); raise max_operand/num_operands or lower eval_size"
        )
    n_train = min(train_size, num_problems - eval_size)
    rng, taken = random.Random(seed), set()

    def draw(k: int) -> list[int]:
        out = []
        while len(out) < k:
            j = rng.randrange(num_problems)
            if j not in taken:
                taken.add(j)
                out.append(j)
        return out

    held_out = draw(eval_size)
    if n_train <= (num_problems - eval_size) // 2:  # repeats stay rare
        return draw(n_train), held_out
    rest = [i for i in range(num_problems) if i not in taken]
    random.Random(seed + 1).shuffle(rest)
    return rest[:n_train], held_out


@TASKS.register("arithmetic")
def arithmetic(cfg: TaskConfig) -> tuple[list[dict], list[dict]]:
    """Integer expressions ``a0 op a1 op ... =`` over operands 0..max_operand, e.g. ``"3+5="``.

    Problem ``i`` is decoded in mixed radix (operands base ``max_operand + 1``, operators base
    ``len(operators)``), so every distinct problem has one index and the split is exact.
    """
    bad = [c for c in cfg.operators if c not in OPERATORS]
    if not cfg.operators or bad or len(set(cfg.operators)) != len(cfg.operators):
        raise ConfigError(
            f"task.operators: {cfg.operators!r} must be distinct characters from {OPERATORS!r}"
        )
    if cfg.max_operand < 0:
        raise ConfigError("task.max_operand must be >= 0")
    base, k, ops = cfg.max_operand + 1, cfg.num_operands, cfg.operators
    num_problems = base**k * len(ops) ** (k - 1)

    def record(i: int) -> dict:
        operands = []
        for _ in range(k):
            i, r = divmod(i, base)
            operands.append(r)
        chosen = []
        for _ in range(k - 1):
            i, r = divmod(i, len(ops))
            chosen.append(ops[r])
        text = "".join(f"{a}{op}" for a, op in zip(operands, chosen)) + f"{operands[-1]}="
        return {"prompt": text, "answer": str(_evaluate(operands, chosen))}

    train_idx, eval_idx = split_problem_space(num_problems, cfg.eval_size, cfg.generated_train_size(), cfg.seed)
    return [record(i) for i in train_idx], [record(i) for i in eval_idx]
