"""PRDC / TD3+BC / A2PR gradient-step throughput on one 1M-transition dataset, side by side.

    .venv/bin/python benchmarks/bench_prdc.py [--data FILE.hdf5] [--size 1000000] [--steps 300] [--phases 0,1000,5000]
        [--device cpu|cuda] [--search auto|lists|brute]

* ``prdc (alignreg)``   PRDC with alignreg's search (nn_search.py; ``--search``, default PRDC's ``auto``: the
                        certified candidate lists on a CPU, the exact all-points scan on a GPU), overlapped
                        with the critic update (``overlap_search``); ``prdc_serial``: the same search in the
                        actor step
* ``prdc (official)``   the same learner, but the neighbour comes from ``scipy.spatial.KDTree(data)``
                        queried over all points every actor step (PRDC's official code, ``workers=-1``)
* ``td3+bc``            the same learner with the bc_mse penalty (no search)
* ``a2pr``              official network sizes (actor 3x256, critics 4x256, V 4x256, VAE 2x750)

With ``--device cuda`` every learner runs on the GPU; the official query stays what the official code
does on a GPU machine: the key is copied to the host, the KD-tree (all CPU cores) answers, the
neighbours' actions go back to the GPU. With ``--device cuda --search lists`` (the lists on the GPU,
their uncertified rows scanned there) a fifth learner, ``prdc (scan)``, times the all-points scan beside
them.

Both PRDC variants and TD3+BC are timed side by side from the same snapshots of one PRDC training run,
after each ``--phases`` count of its steps, in turn for ``--repeats`` rounds (the best round of each).
Before timing, and on every timing window's queries, both searches answer the same queries (states of
real batches, actions of the actor being trained) and their k-th-neighbour distances are asserted
identical (indices may differ only on exact ties).
Data: a D4RL-format file (``--data``; qlearning_dataset rows, tiled with tiny
jitter up to ``--size`` when smaller) or, without one, a synthetic trajectory-like cloud.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from alignreg.config import RegularizerConfig
from alignreg.offline.batch import OfflineSetup
from alignreg.offline.datasets import OfflineData, qlearning_dataset, read_d4rl_hdf5
from alignreg.offline.td3 import TD3Learner
from alignreg.regularizers import build_regularizers
from alignreg.regularizers.prdc import PRDC


class OfficialPRDC(PRDC):
    """PRDC whose neighbour is a full KD-tree query per actor step (the official code's approach: in the actor
    step, after the critic update, no overlap)."""

    prefetch_actor_penalty = None

    def actor_penalty(self, batch):
        pi = batch.policy_actions
        key_s = (self.params.beta * batch.states).detach().cpu().numpy()
        idx = self.index.official_query(key_s, pi.detach().cpu().numpy())
        a_nn = torch.from_numpy(self.index.points[idx, -pi.shape[1]:]).to(pi.device, pi.dtype)
        return torch.nn.functional.mse_loss(pi, a_nn), {}


def sqdist_gap(index, states: torch.Tensor, pi: torch.Tensor, idx_a: np.ndarray, idx_b: np.ndarray) -> float:
    """Largest |d2(a) - d2(b)| over the rows: the two searches' neighbours at the same squared joint
    distance (float64) from the query ``(2 s, pi)``; 0 means identical neighbours up to ties."""
    q = np.hstack([2.0 * states.cpu().numpy(), pi.cpu().numpy()]).astype(np.float64)
    d = [((index.points[i].astype(np.float64) - q) ** 2).sum(1) for i in (idx_a, idx_b)]
    return float(np.abs(d[0] - d[1]).max())


def brute_force_gap(index, states: torch.Tensor, pi: torch.Tensor, idx: np.ndarray, rows: np.ndarray, points64) -> float:
    """Largest |d2 of ``idx`` - the exact k-th smallest d2| over ``rows``, by a float64 scan of every point
    (independent of both trees: the uncertified rows of both searches go through scipy's one C++ query)."""
    q = np.hstack([2.0 * states.cpu().numpy(), pi.cpu().numpy()]).astype(np.float64)
    gap = 0.0
    for r in rows:
        d = ((points64 - q[r]) ** 2).sum(1)
        kth = np.partition(d, index.k - 1)[index.k - 1]
        gap = max(gap, abs(float(d[idx[r]]) - float(kth)))
    return gap


def check(ok: bool, what: str) -> None:
    if not ok:  # not an assert: it must also hold under python -O
        raise SystemExit(f"bench_prdc: {what}")


def load(args) -> dict:
    rng = np.random.default_rng(0)
    if args.data:
        t = qlearning_dataset(read_d4rl_hdf5(args.data))
        reps = -(-args.size // len(t["rewards"]))
        out = {}
        for k, v in t.items():
            tiled = np.concatenate([v] * reps)[: args.size]
            if k in ("observations", "next_observations"):
                tiled = tiled + rng.normal(0, 1e-3, tiled.shape).astype(np.float32) * (np.arange(len(tiled)) >= len(v))[:, None]
            out[k] = tiled
        return out
    S, A, n = 11, 3, args.size
    s = np.cumsum(rng.normal(0, 0.05, (n, S)), 0).astype(np.float32)
    s -= np.repeat(s[::1000], 1000, 0)[:n]  # 1000-step "episodes" starting near the origin
    a = np.tanh(s[:, :A] + rng.normal(0, 0.3, (n, A))).astype(np.float32)
    return {"observations": s, "actions": a, "next_observations": np.roll(s, -1, 0),
            "rewards": rng.normal(size=n).astype(np.float32), "terminals": np.zeros(n, bool)}


def learner(kind: str, data: OfflineData, seed: int = 0, candidates: int = 32, search: str = "auto") -> TD3Learner:
    """On ``data.device``; PRDC's ``search`` (auto: lists on a CPU, the exact scan on a GPU)."""
    torch.manual_seed(seed)
    hid, chid = [256, 256], [256, 256]
    if kind == "td3bc":
        regs = [RegularizerConfig(name="bc_mse")]
    elif kind == "a2pr":
        regs, hid, chid = [RegularizerConfig(name="a2pr", coef=0.4)], [256] * 3, [256] * 4
    else:
        regs = [RegularizerConfig(name="prdc", params={"beta": 2.0, "k": 1, "num_candidates": candidates,
                                                       "overlap_search": kind != "prdc_serial",
                                                       "search": "brute" if kind == "prdc_brute" else search})]
    terms = build_regularizers(regs, hooks=("actor_penalty",))
    if kind == "prdc_official":
        terms.terms[0].term.__class__ = OfficialPRDC
    L = TD3Learner(data.state_dim, data.action_dim, actor_hidden=hid, critic_hidden=chid, penalties=terms,
                   device=data.device)
    return L


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(L: TD3Learner, data: OfflineData, warmup: int, steps: int) -> float:
    gen = torch.Generator().manual_seed(1)
    for _ in range(warmup):
        L.train_step(data.sample(256, gen))
    sync(data.device)
    t = time.perf_counter()
    for _ in range(steps):
        L.train_step(data.sample(256, gen))
    sync(data.device)
    return steps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="")
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--verify-batches", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="timing rounds per phase (best of each learner)")
    p.add_argument("--candidates", type=int, default=32, help="PRDC num_candidates (search only)")
    p.add_argument("--phases", default="0,1000,5000",
                   help="time both PRDC variants and TD3+BC after this many steps of one PRDC training run (comma list)")
    p.add_argument("--device", default="cpu", help="learners' device (cuda: PRDC searches on the GPU)")
    p.add_argument("--search", default="auto", choices=["auto", "lists", "brute"], help="alignreg PRDC's search")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1 (got {args.repeats})")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = OfflineData(load(args))
    print(f"data: {data.size} transitions, S={data.state_dim}, A={data.action_dim}")
    setup = OfflineSetup(data.states_np, data.actions_np, data.state_dim, data.action_dim, 1.0, 0, str(device))
    data.to(device)

    res: dict = {"size": data.size, "state_dim": data.state_dim, "action_dim": data.action_dim,
                 "threads": args.threads, "cpu": platform.processor() or platform.machine(), "steps": args.steps,
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "cpu_count": os.cpu_count()}
    fast = learner("prdc", data, candidates=args.candidates, search=args.search)
    t = time.perf_counter()
    fast.setup(setup)
    res["prdc_index_build_s"] = time.perf_counter() - t
    index = fast.penalties.terms[0].term.index
    res["search"] = index.search
    t = time.perf_counter()
    if index.search == "lists" and index.fallback == "tree":  # the fallback's tree (a scan needs none)
        index.joint_tree()
    res["kdtree_build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    index.official_tree()
    res["official_kdtree_build_s"] = time.perf_counter() - t
    scan = None  # on a GPU: the all-points scan as a learner of its own
    if device.type == "cuda" and index.search != "brute":
        from alignreg.offline.nn_search import JointNearestNeighbour

        scan = JointNearestNeighbour(data.states_np, data.actions_np, 2.0, 1, search="brute", device=device)

    # identical neighbours on real training queries (fresh and partly trained actor)
    gen = torch.Generator().manual_seed(2)
    max_err, brute_err, certified, ties = 0.0, 0.0, [], 0
    points64 = np.asarray(index.points, dtype=np.float64)
    sub = np.random.default_rng(4)
    for i in range(args.verify_batches):
        b = data.sample(256, gen)
        with torch.no_grad():
            pi = fast.actor(b.states)
        idx, d2 = index.query(b.indices, pi)
        idx = idx.cpu().numpy()
        certified.append(index.last_certified)
        off = index.official_query(2.0 * b.states.cpu().numpy(), pi.cpu().numpy())
        max_err = max(max_err, sqdist_gap(index, b.states, pi, off, idx))
        brute_err = max(brute_err, brute_force_gap(index, b.states, pi, idx, sub.choice(256, 8, replace=False), points64))
        ties += int((off != idx).sum())
        for _ in range(25):  # move the actor between verification batches
            fast.train_step(data.sample(256, gen))
    del points64
    check(max_err < 1e-6, f"neighbour distances differ from the official query's by {max_err}")
    check(brute_err < 1e-6, f"neighbour distances differ from a float64 brute-force scan by {brute_err}")
    res.update(verify_batches=args.verify_batches, verify_max_sqdist_diff=max_err, verify_index_ties=ties,
               verify_brute_force_rows=8 * args.verify_batches, verify_brute_force_max_sqdist_diff=brute_err,
               verify_certified_frac=float(np.mean(certified)))
    print(f"identical neighbours on {args.verify_batches} batches (max |d2 diff| {max_err:.1e}, {ties} tie indices; "
          f"{8 * args.verify_batches} rows against a brute-force scan: max |d2 diff| {brute_err:.1e})")

    # timing windows at several points of one PRDC training run: both PRDC variants start each window
    # from the same snapshot of that run (the run itself goes on from its own state)
    run = learner("prdc", data, candidates=args.candidates, search=args.search)
    run.penalties.terms[0].term.index = index
    gen, done, res["phases"] = torch.Generator().manual_seed(3), 0, []
    for phase in sorted(int(p) for p in args.phases.split(",")):
        t = time.perf_counter()
        for _ in range(phase - done):
            run.train_step(data.sample(256, gen))
        done, snap = phase, run.state_dict()
        row = {"trained_steps": phase, "train_s": time.perf_counter() - t}
        # the search alone, on the same 10 actor queries
        qs = [data.sample(256, gen) for _ in range(10)]
        with torch.no_grad():
            pis = [run.actor(b.states) for b in qs]
        sync(device)
        t = time.perf_counter()
        cert, mine = [], []
        for b, pi in zip(qs, pis):
            mine.append(index.query(b.indices, pi)[0])
            cert.append(index.last_certified)
        sync(device)
        row["search_alignreg_ms"] = (time.perf_counter() - t) * 100
        mine = [i.cpu().numpy() for i in mine]
        t = time.perf_counter()
        theirs = [index.official_query(2.0 * b.states.cpu().numpy(), pi.cpu().numpy()) for b, pi in zip(qs, pis)]
        row["search_official_ms"] = (time.perf_counter() - t) * 100
        if scan is not None:
            sync(device)
            t = time.perf_counter()
            for b, pi in zip(qs, pis):
                scan.query(b.indices, pi)
            sync(device)
            row["search_scan_ms"] = (time.perf_counter() - t) * 100
        row["certified_frac"] = float(np.mean(cert))
        for b, pi, i1, i2 in zip(qs, pis, mine, theirs):  # identical neighbours on these queries too
            check(sqdist_gap(index, b.states, pi, i1, i2) < 1e-6, f"neighbour distances differ after {phase} steps")
        # the three learners from the same snapshot, timed in turn, --repeats rounds; the best round of each
        # (this machine's speed drifts by 10-20 % between minutes, so one window each would compare drifts)
        kinds = (("prdc", "prdc_alignreg_steps_s"), ("prdc_serial", "prdc_serial_steps_s"),
                 ("prdc_official", "prdc_official_steps_s"), ("td3bc", "td3bc_steps_s"))
        if scan is not None:
            kinds += (("prdc_brute", "prdc_scan_steps_s"),)
        for _ in range(args.repeats):
            for kind, key in kinds:
                L = learner(kind, data, candidates=args.candidates, search=args.search)
                if kind != "td3bc":
                    L.penalties.terms[0].term.index = scan if kind == "prdc_brute" else index  # same points, trees, lists
                L.load_state_dict(snap)
                row[key] = max(row.get(key, 0.0), timed(L, data, args.warmup, args.steps))
        row["speedup_vs_official"] = row["prdc_alignreg_steps_s"] / row["prdc_official_steps_s"]
        row["prdc_step_time_vs_td3bc"] = row["td3bc_steps_s"] / row["prdc_alignreg_steps_s"]
        res["phases"].append(row)
        print(f"after {phase} steps: PRDC {1000 / row['prdc_alignreg_steps_s']:.1f} ms/step (alignreg) vs "
              f"{1000 / row['prdc_official_steps_s']:.1f} (official): {row['speedup_vs_official']:.2f}x; search "
              f"{row['search_alignreg_ms']:.1f} vs {row['search_official_ms']:.1f} ms/query, "
              f"{row['certified_frac']:.0%} certified; TD3+BC {1000 / row['td3bc_steps_s']:.1f} ms/step; "
              f"alignreg without the overlap {1000 / row['prdc_serial_steps_s']:.1f} ms/step"
              + (f"; all-points scan {1000 / row['prdc_scan_steps_s']:.1f} ms/step, search {row['search_scan_ms']:.1f} ms"
                 if scan is not None else ""), flush=True)
    for ix in (index, scan):  # rows the scan's error bound sent to the difference-form rescan (near-exact ties)
        if ix is not None and (ix.search == "brute" or ix.fallback == "scan"):
            res[f"{ix.search}_scan_rescans"] = ix.brute_rescans
    a2 = learner("a2pr", data)
    a2.setup(setup)
    res["a2pr_official_sizes_steps_s"] = timed(a2, data, args.warmup // 2, max(args.steps // 2, 20))
    print(f"A2PR (official sizes) "
          f"{1000 / res['a2pr_official_sizes_steps_s']:.1f} ms/step; index build {res['prdc_index_build_s']:.1f} s, "
          f"KD-tree build {res['kdtree_build_s']:.1f} s")
    print("| PRDC trained steps | alignreg ms/step | official ms/step | speed-up | TD3+BC ms/step | PRDC / TD3+BC step time | "
          "alignreg without overlap ms/step | search ms (alignreg / official) | certified |\n|---|---|---|---|---|---|---|---|---|")
    for r in res["phases"]:
        print(f"| {r['trained_steps']} | {1000 / r['prdc_alignreg_steps_s']:.1f} | {1000 / r['prdc_official_steps_s']:.1f} "
              f"| {r['speedup_vs_official']:.2f}x | {1000 / r['td3bc_steps_s']:.1f} | {r['prdc_step_time_vs_td3bc']:.2f} | "
              f"{1000 / r['prdc_serial_steps_s']:.1f} | {r['search_alignreg_ms']:.1f} / {r['search_official_ms']:.1f} | {r['certified_frac']:.0%} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
