"""Normalised scores: ``100 * (return - random) / (expert - random)``.

Two reference sets, never mixed:

* ``d4rl``        D4RL's reference returns (``d4rl/infos.py`` / ``gym_mujoco/__init__.py``:
                  ``REF_MIN_SCORE`` = random policy, ``REF_MAX_SCORE`` = expert), for real D4RL data.
* ``alignreg-v5`` references measured by alignreg in the gymnasium MuJoCo **v5** environments for its
                  *generated* datasets: random = uniform random actions, expert = alignreg's expert
                  behaviour policy (deterministic), mean over episodes, stored in
                  ``alignreg/offline/reference_scores.json``. A score of 100 means "as good as
                  alignreg's expert", which is weaker than D4RL's expert.
"""
from __future__ import annotations

import json
from pathlib import Path

D4RL_REF = {  # env: (random, expert) -- D4RL's REF_MIN_SCORE / REF_MAX_SCORE for the v0-v2 locomotion sets
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}
REFERENCE_FILE = Path(__file__).parent / "reference_scores.json"


def alignreg_v5_refs() -> dict:
    if not REFERENCE_FILE.is_file():
        return {}
    return json.loads(REFERENCE_FILE.read_text())["envs"]


def reference(env: str, which: str) -> tuple[float, float]:
    """(random, expert) returns of ``env`` under reference set ``which`` (``d4rl`` | ``alignreg-v5``)."""
    from alignreg.config import ConfigError

    if which == "d4rl":
        table = {k: v for k, v in D4RL_REF.items()}
    elif which == "alignreg-v5":
        table = {k: (v["random"], v["expert"]) for k, v in alignreg_v5_refs().items()}
    else:
        raise ConfigError(f"reference: unknown reference set {which!r}; valid choices: d4rl, alignreg-v5")
    if env not in table:
        raise ConfigError(f"reference: no {which} reference scores for env {env!r}; known: {', '.join(sorted(table))}")
    return table[env]


def normalized_score(env: str, ret: float, which: str = "d4rl") -> float:
    lo, hi = reference(env, which)
    return 100.0 * (ret - lo) / (hi - lo)
