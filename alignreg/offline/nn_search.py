"""Exact k-th nearest neighbour in PRDC's joint space ``[beta * s, a]``, fast for PRDC's queries.

PRDC queries the point ``q_i = (beta s_i, pi(s_i))`` where ``s_i`` is a *dataset* state (the batch
row ``i``). The official code runs a full scipy KD-tree query over all N points every actor step.
Here each dataset row ``i`` gets, once, its ``K`` nearest neighbours *in state space*
``C_i`` (sorted, includes ``i``). At query time the squared joint distances to the K candidates,
``d_j = beta^2 |s_i - s_j|^2 + |pi - a_j|^2``, are computed exactly in float64; let ``c_k`` be the
k-th smallest. Every non-candidate ``j`` has ``d_j >= beta^2 |s_i - s_j|^2 >= R_i = max_{C_i}
beta^2 |s_i - s_j|^2``, so if ``c_k <= R_i`` then ``c_k`` *is* the k-th nearest distance over all N
points (a certificate, not a heuristic). Rows without the certificate fall back to a KD-tree query
over the joint points with radius bounded by ``sqrt(c_k)`` (any k candidates bound the k-th
neighbour; for k=1 the row's own dataset pair is a candidate, so the bound is at most
``|pi(s_i) - a_i|``). Both paths are exact; equal distances may resolve to different indices.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class JointNearestNeighbour:
    def __init__(self, states: np.ndarray, actions: np.ndarray, beta: float, k: int = 1,
                 num_candidates: int = 32, workers: int = -1):
        from scipy.spatial import cKDTree

        if k < 1 or num_candidates < k:
            raise ValueError(f"need 1 <= k <= num_candidates, got k={k}, num_candidates={num_candidates}")
        self.k, self.workers = k, workers
        scaled = (beta * np.asarray(states, np.float32)).astype(np.float32)
        self.points = np.hstack([scaled, np.asarray(actions, np.float32)])  # the official code's data array
        self.state_dim = scaled.shape[1]
        K = min(num_candidates, len(scaled))
        _, cand = cKDTree(scaled).query(scaled, k=K, workers=workers)
        self.cand = torch.from_numpy(np.asarray(cand, np.int64).reshape(len(scaled), K))
        self.scaled = torch.from_numpy(scaled).double()
        self.actions = torch.from_numpy(np.asarray(actions, np.float32)).double()
        self.joint = torch.cat([self.scaled, self.actions], 1)  # [N, S+A] float64: one gather per query
        self._joint_tree = None
        self.last_certified = 1.0  # fraction of the last query's rows answered by the certificate
        self.group = 256  # fallback rows per bounded KD-tree call (one call per batch is fastest with workers=-1)

    def joint_tree(self):
        if self._joint_tree is None:
            from scipy.spatial import cKDTree

            self._joint_tree = cKDTree(self.points)
        return self._joint_tree

    def query(self, indices: Tensor | None, policy_actions: Tensor, states_scaled: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
        """k-th nearest dataset row and its squared joint distance for each query row.

        ``indices``: dataset rows of the query states (None: use ``states_scaled``, full KD-tree search).
        """
        pi = policy_actions.detach().double().cpu()
        if indices is None:
            q = np.hstack([states_scaled.detach().double().cpu().numpy(), pi.numpy()])
            return self._tree_query(q, np.inf)
        indices = indices.cpu()
        c = self.cand.index_select(0, indices)  # [B, K]
        B, K = c.shape
        S = self.state_dim
        g = self.joint.index_select(0, c.reshape(-1)).view(B, K, -1)  # candidates' (beta s_j, a_j)
        ds2 = ((g[:, :, :S] - self.scaled.index_select(0, indices)[:, None, :]) ** 2).sum(-1)  # [B, K]
        d2 = ds2 + ((g[:, :, S:] - pi[:, None, :]) ** 2).sum(-1)
        vals, pos = d2.topk(self.k, dim=1, largest=False)
        kth, idx = vals[:, -1], c.gather(1, pos[:, -1:]).squeeze(1)
        bad = kth > ds2.max(1).values
        self.last_certified = 1.0 - bad.double().mean().item()
        if bad.any():
            # fallback rows, sorted by their bound and queried in small groups (one bound per group)
            rows = bad.nonzero().squeeze(1)
            rows = rows[kth[rows].argsort()]
            for g in rows.split(self.group):
                q = torch.cat([self.scaled[indices[g]], pi[g]], 1).numpy()
                bi, bd = self._tree_query(q, float(kth[g].max().sqrt()) * (1 + 1e-6) + 1e-9)
                idx[g], kth[g] = bi, bd
        return idx, kth

    def _tree_query(self, q: np.ndarray, bound: float) -> tuple[Tensor, Tensor]:
        workers = self.workers if len(q) >= 64 else 1  # a thread pool per call costs more than it saves on few rows
        d, i = self.joint_tree().query(q, k=[self.k], distance_upper_bound=bound, workers=workers)
        if np.any(~np.isfinite(d)):  # pragma: no cover - impossible: k candidates lie within the bound
            raise RuntimeError("PRDC neighbour search missed a neighbour inside its bound")
        return torch.from_numpy(i[:, 0].astype(np.int64)), torch.from_numpy(d[:, 0] ** 2)

    def official_query(self, states_scaled: np.ndarray, policy_actions: np.ndarray) -> np.ndarray:
        """The official approach (a KD-tree query over all points, no bound), for benchmarks and tests."""
        key = np.hstack([states_scaled, policy_actions])
        _, i = self.joint_tree().query(key, k=[self.k], workers=self.workers)
        return i[:, 0]
