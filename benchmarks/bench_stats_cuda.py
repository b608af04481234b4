"""GPU peak memory and time of the chunked full-vocabulary statistics (``alignreg.losses.stats``).

The CUDA counterpart of ``bench_stats_memory.py`` (same inputs, methods and loss: see that module's
docstring), side by side in one process on one device: each method's peak is
``torch.cuda.max_memory_allocated`` during its forward + backward minus what was allocated before it
(inputs, no gradients), i.e. the working set plus the gradients it produces; time is the median of
``--repeats`` runs after one warm-up run, with ``torch.cuda.synchronize`` around each. Methods:

* ``a``         plain chunked log-prob pass (PG + Lp-Reg loss), fwd + bwd;
* ``ours``      ``token_stats`` with entropy, SIREN's strict nucleus (top-p 0.8, cap 10,000) and the
  full-vocabulary KL to the reference, same loss + those terms, fwd + bwd;
* ``a_step`` / ``ours_step``: a learner's on-policy update (its no-grad pass + the loss), see
  ``bench_stats_memory.run_step``;
* ``b``         naive: full ``[N, V]`` logits with autograd; an out-of-memory error is recorded as OOM.

``--check N``: on N tokens, the chunked outputs and gradients against the naive ones (max abs diff).

Usage (on a CUDA machine):
    python benchmarks/bench_stats_cuda.py --tokens 8192,32768 --dtype bfloat16 --check 1024 --json out.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_stats_memory as M  # noqa: E402  (inputs, methods and loss shared with the CPU benchmark)

MiB = 2**20
SPECS = ("a", "ours", "a_step", "ours_step", "b")


def on_device(torch, x: dict, dev) -> dict:
    """``make_inputs`` moved to ``dev``, the trainable leaves (hidden, weight) kept leaves."""
    out = {k: v.detach().to(dev) for k, v in x.items()}
    out["hidden"].requires_grad_(True)
    out["weight"].requires_grad_(True)
    return out


def spec_of(method: str):
    from alignreg.losses.stats import StatsSpec

    full = StatsSpec(entropy=True, top_p=(M.TOP_P, M.TOP_K), kl_ref=True)
    return full if method.startswith("ours") else StatsSpec()


def run(torch, method: str, x: dict, proxy, budget: int):
    if method == "b":
        return M.run_naive(torch, x, proxy)
    if method.endswith("_step"):
        return M.run_step(torch, x, method, spec_of(method), budget)
    return M.run_chunked(torch, x, spec_of(method), budget, proxy)


def measure(torch, a, method: str, tokens: int, dev) -> dict:
    from alignreg.losses.stats import CUDA_CHUNK_BYTES, DEFAULT_CHUNK_BYTES, auto_chunk_size

    dtype = getattr(torch, a.dtype)
    cuda = dev.type == "cuda"
    default = CUDA_CHUNK_BYTES if cuda else DEFAULT_CHUNK_BYTES  # token_stats' own default on that device
    budget = int(a.budget_mib * MiB) if a.budget_mib else default
    res = dict(method=method, tokens=tokens, hidden=a.hidden, vocab=a.vocab, dtype=a.dtype,
               device=torch.cuda.get_device_name(dev) if cuda else "cpu")
    if method != "b":
        res["chunk"] = min(auto_chunk_size(a.vocab, spec_of(method), budget, dtype != torch.float32), tokens)
    x = on_device(torch, M.make_inputs(torch, tokens, a.hidden, a.vocab, dtype, logits=a.logits), dev)
    proxy = torch.full((tokens,), -5.0, device=dev)  # the value does not change the cost
    times, peaks = [], []
    try:
        for i in range(a.repeats + 1):  # the first run warms up kernels and the allocator
            x["hidden"].grad = x["weight"].grad = None
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            out = run(torch, method, x, proxy, budget)
            if cuda:
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            del out
            if i:
                times.append(dt)
                peaks.append(torch.cuda.max_memory_allocated(dev) - base if cuda else float("nan"))
        res.update(status="ok", time_s=statistics.median(times), times=times, peak_extra_mib=max(peaks) / MiB)
    except torch.cuda.OutOfMemoryError as e:
        res.update(status="OOM", error=str(e).splitlines()[0][:200])
    finally:
        del x
        if cuda:
            torch.cuda.empty_cache()
    return res


def check(torch, a, tokens: int, dev) -> dict:
    """Chunked (``ours``) against naive outputs and gradients on the same inputs: max abs differences."""
    from alignreg.losses.stats import DEFAULT_CHUNK_BYTES

    dtype = getattr(torch, a.dtype)
    x0 = M.make_inputs(torch, tokens, a.hidden, a.vocab, dtype, logits=a.logits)
    proxy = torch.full((tokens,), -5.0, device=dev)
    got = {}
    for method in ("ours", "b"):
        x = on_device(torch, x0, dev)
        out = run(torch, method, x, proxy, DEFAULT_CHUNK_BYTES)
        got[method] = ({k: v.detach().float() for k, v in out.items() if k in ("logprobs", "entropy", "top_p_entropy", "kl_ref_full")},
                       x["hidden"].grad.float(), x["weight"].grad.float())
    (o, gh, gw), (n, nh, nw) = got["ours"], got["b"]
    diff = {f"max_abs_{k}": float((o[k] - n[k]).abs().max()) for k in o}
    diff.update(max_abs_grad_hidden=float((gh - nh).abs().max()), max_abs_grad_weight=float((gw - nw).abs().max()),
                grad_hidden_scale=float(nh.abs().max()), grad_weight_scale=float(nw.abs().max()))
    return dict(method="check", tokens=tokens, dtype=a.dtype, **diff)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="8192", help="token count(s), comma-separated")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--logits", choices=("random", "peaked"), default="random")
    ap.add_argument("--methods", default=",".join(SPECS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-mib", type=float, default=0, help="chunk budget in MiB (0: token_stats' default on the device)")
    ap.add_argument("--check", type=int, default=0, help="compare ours with naive on this many tokens (0: no)")
    ap.add_argument("--json", default="", help="append results (JSON lines) to this file")
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test of the script, no memory numbers)")
    a = ap.parse_args()
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_stats_cuda: no CUDA device (use bench_stats_memory.py on CPU)", file=sys.stderr)
        return 2
    unknown = set(a.methods.split(",")) - set(SPECS)
    if unknown:
        print(f"bench_stats_cuda: unknown method(s) {sorted(unknown)}; valid: {', '.join(SPECS)}", file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    rows = []
    if a.check:
        rows.append(check(torch, a, a.check, dev))
        print(json.dumps(rows[-1]), flush=True)
    for tokens in (int(t) for t in a.tokens.split(",")):
        for method in a.methods.split(","):
            rows.append(measure(torch, a, method, tokens, dev))
            print(json.dumps(rows[-1]), flush=True)
    if a.json:
        with open(a.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"\n{rows[-1].get('device', a.device)}, {a.dtype}, hidden {a.hidden}, vocab {a.vocab}, {a.logits} logits")
    print("| tokens | method | time s (median) | peak extra MiB | chunk |\n|---:|---|---:|---:|---:|")
    for r in rows:
        if r["method"] != "check":
            t = f"{r['time_s']:.4f}" if r["status"] == "ok" else r["status"]
            m = f"{r['peak_extra_mib']:,.0f}" if r["status"] == "ok" else "-"
            print(f"| {r['tokens']} | {r['method']} | {t} | {m} | {r.get('chunk', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
