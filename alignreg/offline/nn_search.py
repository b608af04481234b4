"""Exact k-th nearest neighbour in PRDC's joint space ``[beta * s, a]``, fast for PRDC's queries.

PRDC queries the point ``q_i = (beta s_i, pi(s_i))`` where ``s_i`` is a *dataset* state (the batch
row ``i``). The official code runs a full scipy KD-tree query over all N points every actor step.
Here each dataset row ``i`` gets, once, its ``K`` nearest neighbours *in state space* ``C_i`` (int32,
with their squared state distances in float64: only the action part changes between queries). At
query time the squared joint distances to the K candidates,
``d_j = beta^2 |s_i - s_j|^2 + |pi - a_j|^2``, are computed exactly in float64 (K gathers per action
column, no tree); let ``c_k`` be the k-th smallest. Every non-candidate ``j`` has
``d_j >= beta^2 |s_i - s_j|^2 >= R_i`` (the (K+1)-th nearest squared state distance), so if ``c_k <= R_i`` then
``c_k`` *is* the k-th nearest distance over all N points (a certificate, not a heuristic). Rows without
the certificate fall back to a KD-tree query over the joint points (sliding-midpoint tree) with radius
bounded by ``sqrt(c_k)`` (any k candidates bound the k-th neighbour; for k=1 the row's own dataset pair
is a candidate, so the bound is at most ``|pi(s_i) - a_i|``). Both paths are exact; equal distances may
resolve to different indices.

Building the lists is a (K+1)-nearest query of every row: about a minute for 1M hopper rows (11-D
states) on 2 cores, 16 min to over an hour for 1M halfcheetah rows (17-D), depending on the data.
When the estimated build time exceeds ``max_build_s`` the lists are built in the top principal axes
of the state (a projection only shortens distances, so the bound stays valid; see
:func:`state_candidates`); if even 4 axes do not fit, every row takes the bounded tree search (k=1:
bounded by its own dataset pair). Lists of datasets with >= ``CACHE_MIN_ROWS`` rows are cached on disk
by content hash.

On a GPU (``search="brute"``, PRDC's ``auto`` there) no lists are built: :meth:`JointNearestNeighbour._brute`
scans all N points on the device for every query, exactly (a float64 matrix product with a
rounding-error band, rows inside the band rescanned in the difference form).
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
_CACHE_VERSION = 2
_SAFETY = 1.0 - 1e-9  # the lower bound R_i is shrunk by this factor against float64 rounding


def _pca(scaled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and principal axes (columns, by decreasing variance) of the scaled states."""
    s64 = scaled[:: max(len(scaled) // 200_000, 1)].astype(np.float64)
    mu = s64.mean(0)
    _, vecs = np.linalg.eigh(np.cov((s64 - mu).T).reshape(s64.shape[1], s64.shape[1]))
    return mu, np.ascontiguousarray(vecs[:, ::-1])


def _project(scaled: np.ndarray, mu: np.ndarray, axes: np.ndarray, m: int) -> np.ndarray:
    if m == scaled.shape[1]:
        return scaled  # no projection: the scaled states themselves
    return np.ascontiguousarray((scaled.astype(np.float64) - mu) @ axes[:, :m])


def state_candidates(scaled: np.ndarray, K: int, workers: int = -1, cache_dir: str | None = None,
                     log=None, max_build_s: float = float("inf"), dims: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Candidate lists for the certificate: ``(cand [N, K] int32, R [N] float64, m)``.

    ``cand[i]`` are row i's K nearest rows in the state space projected onto its top ``m`` principal
    axes (``m`` = the state dimension: no projection; then they are its K nearest states), and
    ``R[i]`` is the squared projected distance of its (K+1)-th, shrunk by 1e-9 against rounding. A
    projection never lengthens a distance, so every non-candidate ``j`` has
    ``|s_i - s_j|^2 >= R[i]``: the certificate stays exact for any ``m``, only weaker for small ``m``.
    ``m`` is the largest dimension whose build, estimated from 2,000 rows, fits ``max_build_s``
    (a KD-tree in 17 dimensions can come close to brute force: 1M halfcheetah rows were estimated at
    16-130 min on 2 cores unprojected, depending on the data, ~5-10 min in 8 dimensions); None if not
    even 4 dimensions fit. ``dims`` fixes ``m``.

    With ``cache_dir`` the result is stored as ``<sha256 of the points>-k<K>.npz`` (written
    atomically) and reused by later runs on the same data (other seeds, algorithms).
    """
    from scipy.spatial import cKDTree

    N, S = scaled.shape
    path = None
    if cache_dir:
        digest = hashlib.sha256(np.ascontiguousarray(scaled, np.float32).tobytes()).hexdigest()[:32]
        path = Path(cache_dir).expanduser() / f"v{_CACHE_VERSION}-{digest}-k{K}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    cand, R, m = z["cand"], z["radius2"], int(z["m"])
                if cand.shape == (N, K) and cand.dtype == np.int32 and R.shape == (N,) and (cand[:, 0] >= 0).all():
                    if log:
                        log(f"prdc: candidate lists from cache {path}")
                    return cand, R, m
            except (OSError, ValueError, KeyError):
                pass
            if log:
                log(f"prdc: ignoring unreadable cache file {path}; rebuilding it")
    if K >= N:  # every row is a candidate of every row
        d = ((scaled[:, None, :].astype(np.float64) - scaled[None].astype(np.float64)) ** 2).sum(-1)
        return np.argsort(d, axis=1, kind="stable").astype(np.int32), np.full(N, np.inf), S
    t0 = time.perf_counter()
    mu = axes = None
    for m in [S] + list(range(S - 2, 3, -2)) if dims is None else [min(dims, S)]:  # full dimension first
        if m < S and mu is None:
            mu, axes = _pca(scaled)
        pts = _project(scaled, mu, axes, m)
        tree = cKDTree(pts, balanced_tree=False)  # sliding midpoint: ~30 % faster queries here than median splits
        if N <= 20_000 or dims is not None:
            break
        sample = np.random.default_rng(0).choice(N, 2000, replace=False)
        t = time.perf_counter()
        tree.query(pts[sample], k=K + 1, workers=workers)
        estimate = (time.perf_counter() - t) * N / 2000
        if estimate <= max_build_s:
            if log:
                how = "" if m == S else f" in the top {m} of {S} principal axes of the state (the bound stays exact)"
                log(f"prdc: building candidate lists for {N} rows{how} (~{estimate:.0f} s estimated)")
            break
        if log:
            log(f"prdc: candidate lists in {m} dimensions would take ~{estimate / 60:.0f} min here "
                f"(max_index_build_s={max_build_s:g})")
    else:
        if log:
            log("prdc: no candidate lists within max_index_build_s; using the bounded KD-tree search for every row "
                "(exact, slower per step). Raise the limit to build them once (cached).")
        return None
    cand, R = np.empty((N, K), np.int32), np.empty(N, np.float64)
    chunk = max(N // 10, 50_000)
    for lo in range(0, N, chunk):
        hi = min(lo + chunk, N)
        d, c = tree.query(pts[lo:hi], k=K + 1, workers=workers)
        cand[lo:hi], R[lo:hi] = c[:, :K], d[:, K] ** 2 * _SAFETY
        if log and N > chunk:
            log(f"prdc: candidate lists {hi}/{N} rows, {time.perf_counter() - t0:.0f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, cand=cand, radius2=R, m=np.int64(m))
        os.replace(tmp, path)
    return cand, R, m


class JointNearestNeighbour:
    """The k-th nearest of ``(beta s_j, a_j)`` to ``(beta s_i, pi)``; ``search`` picks how (same answers):

    * ``"lists"``: the certified candidate lists (module docstring). On the CPU the rows without the
      certificate take the bounded KD-tree query; on a GPU (``device``) the lists live there and those
      rows take the exact scan below, so a query never leaves the learner's device.
    * ``"brute"``: an exact scan of all N points on ``device`` (:meth:`_brute`), no index to build: about
      4 ms for 256 rows x 1M points on an H200; on a CPU only for small datasets.
    """

    def __init__(self, states: np.ndarray, actions: np.ndarray, beta: float, k: int = 1,
                 num_candidates: int = 32, workers: int = -1, cache_dir: str | None = None,
                 cache_min_rows: int = CACHE_MIN_ROWS, log=None, max_build_s: float = float("inf"),
                 list_dims: int | None = None, search: str = "lists", device: str | torch.device = "cpu",
                 fallback: str | None = None):
        if k < 1 or num_candidates < k:
            raise ValueError(f"need 1 <= k <= num_candidates, got k={k}, num_candidates={num_candidates}")
        if search not in ("lists", "brute"):
            raise ValueError(f"search must be 'lists' or 'brute', got {search!r}")
        self.k, self.workers, self.search = k, workers, search
        self.device = dev = torch.device(device)
        # lists: the uncertified rows' search; "scan" on a GPU (no host copy), the KD-tree on the CPU
        self.fallback = fallback or ("tree" if dev.type == "cpu" else "scan")
        if self.fallback not in ("tree", "scan") or (self.fallback == "tree" and dev.type != "cpu"):
            raise ValueError(f"fallback must be 'scan' or, on the CPU, 'tree'; got {fallback!r} on {dev}")
        scaled = (beta * np.asarray(states, np.float32)).astype(np.float32)
        self.points = np.hstack([scaled, np.asarray(actions, np.float32)])  # the official code's data array
        self.state_dim = scaled.shape[1]
        self._joint_tree = self._official_tree = None
        self.last_certified = 1.0  # fraction of the last query's rows answered by the certificate
        self.group = 256  # fallback rows per bounded KD-tree call (one call per batch is fastest with workers=-1)
        self.threads = max(workers if workers > 0 else (os.cpu_count() or 1), 1)  # scipy's threads per call
        self.cand = self.cand_ds2 = self.radius2 = None  # None: no candidate lists
        self.list_dims = 0  # dimensions the candidate lists were built in (0: none)
        self.scaled = torch.from_numpy(scaled).to(dev, torch.float64)
        self.actions = torch.from_numpy(np.asarray(actions, np.float32)).to(dev, torch.float64)
        self.actions_t = self.actions.t().contiguous()  # [A, N]
        self.brute_rescans = 0  # rows the scan's error bound sent to the difference-form rescan (near-exact ties)
        if search == "brute" or self.fallback == "scan":  # the scan: the whole search, or the fallback
            self.points64 = torch.cat([self.scaled, self.actions], 1)  # [N, D]
            # [p, |p|^2]: one matrix product gives |p|^2 - 2 q.p = |q - p|^2 - |q|^2 for every point
            self._aug = torch.cat([self.points64, self.points64.square().sum(1, keepdim=True)], 1)
            self._pmax2 = float(self.points64.square().sum(1).max())
        if search == "brute":
            return
        K = min(num_candidates, len(scaled))
        lists = state_candidates(scaled, K, workers, cache_dir if len(scaled) >= cache_min_rows else None, log,
                                 max_build_s, list_dims)
        if lists is not None:
            cand, radius2, self.list_dims = lists
            # the candidates' squared state distances, exact in float64 (fixed: only actions vary per query)
            s64 = scaled.astype(np.float64)
            ds2 = np.empty(cand.shape, np.float64)
            for lo in range(0, len(s64), 65536):
                hi = min(lo + 65536, len(s64))
                ds2[lo:hi] = ((s64[cand[lo:hi]] - s64[lo:hi, None, :]) ** 2).sum(-1)
            self.cand = torch.from_numpy(cand).to(dev)
            self.cand_ds2 = torch.from_numpy(ds2).to(dev)  # [N, K]
            self.radius2 = torch.from_numpy(radius2).to(dev)  # R_i: every non-candidate is at least this far in state

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
        pi = policy_actions.detach().to(self.device, torch.float64)
        if self.search == "brute" or (indices is None and self.fallback == "scan"):
            s = (self.scaled.index_select(0, indices.to(self.device)) if indices is not None
                 else states_scaled.detach().to(self.device, torch.float64))
            self.last_certified = 1.0
            return self._brute(torch.cat([s, pi], 1))
        if indices is None:
            q = np.hstack([states_scaled.detach().double().cpu().numpy(), pi.numpy()])
            return self._tree_query(q, np.inf)
        indices = indices.to(self.device)
        if self.cand is None:  # tree only; for k=1 the row's own dataset pair bounds the radius
            own = ((self.actions.index_select(0, indices) - pi) ** 2).sum(1)
            kth = own if self.k == 1 else torch.full_like(own, float("inf"))
            return self._fallback(indices, pi, indices.clone(), kth, torch.ones_like(own, dtype=torch.bool))
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

    def _brute(self, q: Tensor, chunk_bytes: int | None = None) -> tuple[Tensor, Tensor]:
        """Exact k-th nearest of the float64 queries ``q`` [B, D] over all points, on ``self.device``.

        Per chunk of points one matrix product gives ``e_j = |p_j|^2 - 2 q.p_j`` (= d_j - |q|^2, d_j the
        squared distance). Its rounding error is at most ``delta = (D + 2) 2^-52 (2 |q| P + P^2)`` (``P``
        the largest point norm; twice the textbook bound), so ``e`` ranks the points exactly except within
        ``2 delta`` of each other. k = 1: the smallest ``e`` over all chunks is the answer when no other
        point is within ``2 delta`` of it (one pass for the minimum, one counting that band). k > 1: the
        ``k + 4`` smallest of each chunk are re-ranked by the difference form ``sum (q - p_j)^2``; a point
        a chunk left out is at least its largest kept ``e`` minus ``delta``, which must not undercut the
        k-th found. A row that fails its check (only near-exact ties do) is scanned again in the
        difference form over all points. The answer is exact either way; ``d`` is computed in the
        difference form (the official query's arithmetic)."""
        B, D = q.shape
        N, k = self._aug.shape[0], self.k
        budget = chunk_bytes or ((4 << 30) if q.device.type == "cuda" else (64 << 20))
        rows = max(k + 4, budget // (8 * max(B, 1)))
        qa = torch.cat([-2.0 * q, torch.ones(B, 1, dtype=q.dtype, device=q.device)], 1)  # [B, D + 1]
        q2 = q.square().sum(1)
        band = 2.0 * (D + 2) * 2.0 ** -52 * (2.0 * q2.sqrt() * self._pmax2 ** 0.5 + self._pmax2)  # 2 delta
        if k == 1:
            mins, args, near = [], [], []
            for lo in range(0, N, rows):
                e = qa @ self._aug[lo:lo + rows].t()  # [B, c]
                v, i = e.min(1)
                mins.append(v)
                args.append(i + lo)
                near.append((e <= (v + band)[:, None]).sum(1))  # points within the band of the chunk's minimum
            V = torch.stack(mins, 1)  # [B, chunks]
            best, c = V.min(1)
            idx = torch.stack(args, 1).gather(1, c[:, None]).squeeze(1)
            sure = torch.stack(near, 1).gather(1, c[:, None]).squeeze(1) == 1
            if V.shape[1] > 1:  # every other chunk's minimum is clear of the band too
                sure &= V.scatter(1, c[:, None], float("inf")).min(1).values > best + band
            kth = (self.points64[idx] - q).square().sum(1)
        else:
            keep = min(k + 4, N)
            kept_i, floor = [], None  # floor: the smallest largest-kept e over chunks that left points out
            for lo in range(0, N, rows):
                part = self._aug[lo:lo + rows]
                v, i = (qa @ part.t()).topk(min(keep, len(part)), dim=1, largest=False, sorted=True)
                kept_i.append(i + lo)
                if len(part) > keep:
                    floor = v[:, -1] if floor is None else torch.minimum(floor, v[:, -1])
            cand = torch.cat(kept_i, 1)  # [B, C]
            d2 = (self.points64[cand] - q[:, None, :]).square().sum(-1)  # difference form
            kth, pos = d2.topk(k, dim=1, largest=False, sorted=True)
            kth, idx = kth[:, -1].contiguous(), cand.gather(1, pos[:, k - 1:k]).squeeze(1)
            sure = torch.ones_like(kth, dtype=torch.bool) if floor is None else floor >= kth - q2 + band
        unsure = (~sure).nonzero().squeeze(1)  # one host sync per query
        if len(unsure):
            self.brute_rescans += len(unsure)
            for r in unsure.tolist():
                full = torch.cat([(q[r] - self.points64[lo:lo + rows]).square().sum(1) for lo in range(0, N, rows)])
                v, i = full.topk(k, largest=False, sorted=True)
                kth[r], idx[r] = v[-1], i[-1]
        return idx, kth

    def _fallback(self, indices: Tensor, pi: Tensor, idx: Tensor, kth: Tensor, bad: Tensor) -> tuple[Tensor, Tensor]:
        """Exact KD-tree answers for the rows in ``bad``, the search radius bounded by ``sqrt(kth)``."""
        self.last_certified = 1.0 - bad.double().mean().item()
        if self.fallback == "scan":  # the exact scan of those rows on the device (on a GPU: no copy to the host)
            rows = bad.nonzero().squeeze(1)
            if len(rows):
                q = torch.cat([self.scaled.index_select(0, indices[rows]), pi[rows]], 1)
                idx[rows], kth[rows] = self._brute(q)
            return idx, kth
        if bad.any():
            # fallback rows, sorted by their bound and queried in small groups (one bound per group)
            rows = bad.nonzero().squeeze(1)
            rows = rows[kth[rows].argsort()]
            for g in rows.split(self.group):
                # scipy gives each thread one contiguous block of a call's rows; dealt out by bound, the
                # costly (far) rows spread over the threads (sorted blocks were up to 1.5x slower on halfcheetah)
                g = torch.cat([g[t::self.threads] for t in range(self.threads)])
                q = torch.cat([self.scaled[indices[g]], pi[g]], 1).numpy()
                bi, bd = self._tree_query(q, float(kth[g].max().sqrt()) * (1 + 1e-6) + 1e-9, min_parallel=2)
                idx[g], kth[g] = bi, bd
        return idx, kth

    def _tree_query(self, q: np.ndarray, bound: float, min_parallel: int = 64) -> tuple[Tensor, Tensor]:
        # threads per call cost more than they save on a few near rows, not on a few far (fallback) ones
        workers = self.workers if len(q) >= min_parallel else 1
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
