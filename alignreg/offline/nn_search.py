"""Exact k-th nearest neighbour in PRDC's joint space ``[beta * s, a]``, fast for PRDC's queries.

PRDC queries the point ``q_i = (beta s_i, pi(s_i))`` where ``s_i`` is a *dataset* state (the batch
row ``i``). The official code runs a full scipy KD-tree query over all N points every actor step.
Here each dataset row ``i`` gets, once, its ``K`` nearest neighbours *in state space* ``C_i`` (int32,
with their squared state distances in float64: only the action part changes between queries). At
query time the squared joint distances to the K candidates,
``d_j = beta^2 |s_i - s_j|^2 + |pi - a_j|^2``, are computed exactly in float64 (K gathers per action
column, no tree); let ``c_k`` be the k-th smallest. Every non-candidate ``j`` has
``d_j >= beta^2 |s_i - s_j|^2 >= R_i = max_{C_i} beta^2 |s_i - s_j|^2``, so if ``c_k <= R_i`` then
``c_k`` *is* the k-th nearest distance over all N points (a certificate, not a heuristic). Rows without
the certificate fall back to a KD-tree query over the joint points (sliding-midpoint tree) with radius
bounded by ``sqrt(c_k)`` (any k candidates bound the k-th neighbour; for k=1 the row's own dataset pair
is a candidate, so the bound is at most ``|pi(s_i) - a_i|``). Both paths are exact; equal distances may
resolve to different indices.

Building the lists is a K-nearest query of every row: about a minute for 1M hopper rows (11-D states)
on 2 cores, over an hour for 1M halfcheetah rows (17-D). Lists of datasets with >= ``CACHE_MIN_ROWS``
rows are cached on disk by content hash; when the estimated build time exceeds ``max_build_s`` no lists
are built and every row takes the bounded tree search (k=1: bounded by its own dataset pair).
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


CACHE_MIN_ROWS = 100_000  # smaller datasets build their candidate lists in seconds: not cached
_CACHE_VERSION = 1


def state_candidates(scaled: np.ndarray, K: int, workers: int = -1, cache_dir: str | None = None,
                     log=None, max_build_s: float = float("inf")) -> np.ndarray | None:
    """``[N, K]`` int32: each row's K nearest rows in (scaled) state space, itself included, nearest first.

    With ``cache_dir`` the lists are stored as ``<sha256 of the points>-k<K>.npy`` (written atomically)
    and reused by later runs on the same data (e.g. other seeds): on 1M rows the build takes minutes
    (hopper, 11-D states) to more than an hour (halfcheetah, 17-D, 2 cores). Before building, the time is
    estimated from 2,000 rows; above ``max_build_s`` nothing is built and None is returned.
    """
    from scipy.spatial import cKDTree

    path = None
    if cache_dir:
        digest = hashlib.sha256(np.ascontiguousarray(scaled, np.float32).tobytes()).hexdigest()[:32]
        path = Path(cache_dir).expanduser() / f"v{_CACHE_VERSION}-{digest}-k{K}.npy"
        if path.is_file():
            try:
                cand = np.load(path)
                if cand.shape == (len(scaled), K) and cand.dtype == np.int32 and (cand[:, 0] >= 0).all():
                    if log:
                        log(f"prdc: candidate lists from cache {path}")
                    return cand
            except (OSError, ValueError):
                pass
            if log:
                log(f"prdc: ignoring unreadable cache file {path}; rebuilding it")
    t0 = time.perf_counter()
    tree = cKDTree(scaled, balanced_tree=False)  # sliding midpoint: ~30 % faster queries here than median splits
    if len(scaled) > 20_000:
        sample = np.random.default_rng(0).choice(len(scaled), 2000, replace=False)
        t = time.perf_counter()
        tree.query(scaled[sample], k=K, workers=workers)
        estimate = (time.perf_counter() - t) * len(scaled) / 2000
        if estimate > max_build_s:
            if log:
                log(f"prdc: building the candidate lists would take ~{estimate / 60:.0f} min here (estimated from "
                    f"2000 rows; limit max_index_build_s={max_build_s:g}); using the bounded KD-tree search for "
                    "every row instead (exact, slower per step). Raise the limit to build them once (cached).")
            return None
        if log:
            log(f"prdc: building candidate lists for {len(scaled)} rows (~{estimate:.0f} s estimated)")
    cand = np.empty((len(scaled), K), np.int32)
    chunk = max(len(scaled) // 10, 50_000)
    for lo in range(0, len(scaled), chunk):
        hi = min(lo + chunk, len(scaled))
        cand[lo:hi] = np.asarray(tree.query(scaled[lo:hi], k=K, workers=workers)[1]).reshape(hi - lo, K)
        if log and len(scaled) > chunk:
            log(f"prdc: candidate lists {hi}/{len(scaled)} rows, {time.perf_counter() - t0:.0f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, cand)
        os.replace(tmp, path)
    return cand


class JointNearestNeighbour:
    def __init__(self, states: np.ndarray, actions: np.ndarray, beta: float, k: int = 1,
                 num_candidates: int = 32, workers: int = -1, cache_dir: str | None = None,
                 cache_min_rows: int = CACHE_MIN_ROWS, log=None, max_build_s: float = float("inf")):
        if k < 1 or num_candidates < k:
            raise ValueError(f"need 1 <= k <= num_candidates, got k={k}, num_candidates={num_candidates}")
        self.k, self.workers = k, workers
        scaled = (beta * np.asarray(states, np.float32)).astype(np.float32)
        self.points = np.hstack([scaled, np.asarray(actions, np.float32)])  # the official code's data array
        self.state_dim = scaled.shape[1]
        K = min(num_candidates, len(scaled))
        cand = state_candidates(scaled, K, workers, cache_dir if len(scaled) >= cache_min_rows else None, log,
                                max_build_s)
        self.cand = self.cand_ds2 = self.radius2 = None  # None: no candidate lists, every row searches the tree
        if cand is not None:
            # the candidates' squared state distances, exact in float64 (fixed: only actions vary per query)
            s64 = scaled.astype(np.float64)
            ds2 = np.empty(cand.shape, np.float64)
            for lo in range(0, len(s64), 65536):
                hi = min(lo + 65536, len(s64))
                ds2[lo:hi] = ((s64[cand[lo:hi]] - s64[lo:hi, None, :]) ** 2).sum(-1)
            self.cand = torch.from_numpy(cand)
            self.cand_ds2 = torch.from_numpy(ds2)  # [N, K]
            self.radius2 = self.cand_ds2.max(1).values  # R_i: every non-candidate is at least this far in state
        self.scaled = torch.from_numpy(scaled).double()
        self.actions = torch.from_numpy(np.asarray(actions, np.float32)).double()
        self.actions_t = self.actions.t().contiguous()  # [A, N]
        self._joint_tree = self._official_tree = None
        self.last_certified = 1.0  # fraction of the last query's rows answered by the certificate
        self.group = 256  # fallback rows per bounded KD-tree call (one call per batch is fastest with workers=-1)

    def joint_tree(self):
        if self._joint_tree is None:
            from scipy.spatial import cKDTree

            self._joint_tree = cKDTree(self.points, balanced_tree=False)
        return self._joint_tree

    def official_tree(self):
        """The official code's tree: ``scipy.spatial.KDTree(data)`` with its defaults."""
        if self._official_tree is None:
            from scipy.spatial import KDTree

            self._official_tree = KDTree(self.points)
        return self._official_tree

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
        if self.cand is None:  # tree only; for k=1 the row's own dataset pair bounds the radius
            own = ((self.actions.index_select(0, indices) - pi) ** 2).sum(1)
            kth = own if self.k == 1 else torch.full_like(own, float("inf"))
            return self._fallback(indices, pi, indices.clone(), kth, torch.ones(len(indices), dtype=torch.bool))
        c = self.cand.index_select(0, indices)  # [B, K]
        B, K = c.shape
        flat, d2 = c.reshape(-1), self.cand_ds2.index_select(0, indices)  # [B, K] state part
        for j, col in enumerate(self.actions_t):  # + |pi - a_c|^2, one action column at a time (fast gathers)
            x = col.index_select(0, flat).view(B, K) - pi[:, j:j + 1]
            d2.addcmul_(x, x)
        if self.k == 1:
            kth, pos = d2.min(1)
        else:
            kth, pos = d2.topk(self.k, dim=1, largest=False)
            kth, pos = kth[:, -1].contiguous(), pos[:, -1]
        idx = c.gather(1, pos[:, None]).squeeze(1).long()
        bad = kth > self.radius2.index_select(0, indices)
        return self._fallback(indices, pi, idx, kth, bad)

    def _fallback(self, indices: Tensor, pi: Tensor, idx: Tensor, kth: Tensor, bad: Tensor) -> tuple[Tensor, Tensor]:
        """Exact KD-tree answers for the rows in ``bad``, the search radius bounded by ``sqrt(kth)``."""
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
        """The official approach (``KDTree(data).query(key, k=[k], workers=-1)`` over all points, no bound),
        for benchmarks and tests."""
        key = np.hstack([states_scaled, policy_actions])
        _, i = self.official_tree().query(key, k=[self.k], workers=self.workers)
        return i[:, 0]
