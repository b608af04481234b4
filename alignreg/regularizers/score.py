"""SCoRe self-correction reward bonus (Kumar et al., "Training Language Models to Self-Correct via
Reinforcement Learning", arXiv 2409.12917, ICLR 2025), eq. 5.

Stage II of SCoRe replaces the second attempt's reward by ``r(y2) + b``, with the progress bonus
``b(y2 | y1, y*) = alpha * (r(y2, y*) - r(y1, y*))`` (alpha > 1): flipping a wrong first attempt to a
right second one earns ``1 + alpha``, breaking a right first attempt costs ``-alpha``, so the policy
cannot get the bonus by simply repeating attempt 1. This term returns the *unweighted* bonus
``r2 - r1`` on attempt-2 rows (0 on attempt-1 rows and in Stage I); the trainer adds
``coef * bonus``, so ``coef`` is alpha.

Defaults: ``coef`` (alpha) 10 in configs/rl/*score*.yaml (BY571/SCoRe ``configs/math.yaml``
[UNVERIFIED against the paper appendix]); the term has no other parameters. The KL parts of the
objective (beta2 on attempt 1 in Stage I, beta1 on both attempts in Stage II) are the ``score_kl``
term; the two-attempt episodes come from ``alignreg/orchestration/score.py`` (``score.enabled``).

Deviations: none in the bonus. Rewards and the bonus are constants (no gradient). With alpha = 10
the shaped reward lies in {-10, 0, 1, 11}: use ``score.advantage: grpo`` (group-normalised per
prompt and attempt) or expect large gradient scales (REGULARIZERS.md §6.4).
"""
from __future__ import annotations

import torch
from torch import Tensor

from alignreg.config import ConfigError
from alignreg.regularizers.base import REGULARIZERS, Regularizer


@REGULARIZERS.register("score")
class ScoreBonus(Regularizer):
    __doc__ = __doc__
    kind = ("shape_rewards",)

    def shape_rewards(self, rewards: Tensor, episodes) -> tuple[Tensor, dict[str, float]]:
        """``bonus[i] = r[i] - r[pair[i]]`` for attempt-2 rows in Stage II, else 0."""
        attempt = getattr(episodes, "attempt", None)
        if attempt is None:
            raise ConfigError("regularizer score needs two-attempt episodes; set score.enabled: true")
        attempt = torch.as_tensor(attempt)
        pair = torch.as_tensor(episodes.pair)
        second = attempt == 2
        bonus = torch.zeros_like(rewards)
        if episodes.stage == 2:
            bonus[second] = rewards[second] - rewards[pair[second]]
        b2 = bonus[second]
        return bonus, {
            "bonus_mean": float(b2.mean()) if b2.numel() else 0.0,
            "i2c_frac": float((b2 > 0).float().mean()) if b2.numel() else 0.0,
            "c2i_frac": float((b2 < 0).float().mean()) if b2.numel() else 0.0,
        }
