"""Evaluation of a deterministic policy in the gymnasium MuJoCo v5 environment."""
from __future__ import annotations

import numpy as np
import torch

from alignreg.offline.scores import normalized_score


def evaluate(actor: torch.nn.Module, env, episodes: int, seed: int, mean: np.ndarray, std: np.ndarray,
             env_name: str, reference: str) -> dict[str, float]:
    """Mean/std undiscounted return and normalised score over ``episodes`` (env seeds seed..seed+episodes-1).

    States are normalised with the dataset's ``mean``/``std`` exactly as in training.
    """
    returns = []
    was_training = actor.training
    actor.eval()
    device = next(actor.parameters()).device
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        total, done = 0.0, False
        while not done:
            s = torch.as_tensor(((obs[None] - mean) / std).astype(np.float32), device=device)
            with torch.no_grad():
                a = actor(s)[0].cpu().numpy()
            obs, r, term, trunc, _ = env.step(a)
            total += float(r)
            done = term or trunc
        returns.append(total)
    actor.train(was_training)
    scores = [normalized_score(env_name, r, reference) for r in returns]
    return {"return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "score_mean": float(np.mean(scores)), "score_std": float(np.std(scores))}
