"""Peak memory and time of the chunked full-vocabulary statistics (``alignreg.losses.stats``).

Compares, side by side in one run, forward + backward at an lm-head shape (default: Qwen2.5-1.5B,
hidden 1536, vocab 151,936) over N tokens:

* ``ours``  - ``token_stats`` with ``StatsSpec(entropy=True, top_p=(0.8, 10000), kl_ref=True)``, i.e.
  what ``kl_ref`` (estimator=full) + ``entropy`` + ``siren`` request, plus ``lp_reg``'s k3 term on the
  log-probs against the min-p proxy of the old pass; loss = PG + all terms, ``.backward()``.
* ``a``     - plain chunked log-prob pass: ``token_stats`` with logprobs only, same PG + lp_reg loss.
* ``a_ref`` - (a') = (a) plus the reference model's chunked log-prob pass under no_grad
  (``token_stats(ref_hidden, ref_weight, targets, StatsSpec())``): the minimal pass that any
  KL-to-reference term needs (the k1/k2/k3 estimators read reference log-probs). The full-vocabulary
  KL of ``ours`` additionally needs the reference logits again in backward.
* ``b``     - naive: full ``[N, V]`` logits with autograd (log_softmax, entropy, strict top-p nucleus
  entropy via topk, full KL against the reference logits), same loss, ``.backward()``.
* ``old``   - Lp-Reg's old-policy pass, ``token_stats(..., StatsSpec(min_p=0.02))`` under no_grad
  (reported separately; its output is handed to the other methods as their proxy input).
* ``*_step`` (a learner's on-policy update = its no-grad pass + the loss fwd+bwd; ratios against
  ``a_step`` / ``a_ref_step``): ``a_step`` = min-p proxy pass + (a); ``a_ref_step`` = ``a_step`` + the
  reference log-prob pass; ``ours_step`` = ONE no-grad pass (``token_stats_forward``: proxy, entropy,
  nucleus, reference logits and full KL) + the backward alone (``precomputed=``), which is what the
  learner does for the first update of a step; ``a_pre_step`` = the same reuse applied to (a).
* ``only_entropy`` / ``only_top_p`` / ``only_kl_ref`` (``--breakdown``): one statistic alone, for the
  cost breakdown against ``a``.

Inputs (``--logits``):

* ``random`` (default, worst case): random hidden states and a random lm-head give near-uniform
  distributions (entropy close to log V); every SIREN nucleus hits the top-k cap of 10,000, so every
  row pays for the full ``topk(10000)``.
* ``peaked``: LM-like distributions. Each token's hidden state is a mix of the lm-head rows of a few
  "candidate" tokens (one dominant, a few alternatives with geometrically decreasing weight) plus
  the random background, so the logits have a few large entries (boost ~16 +- 20%, decaying by 0.8
  per candidate) above a N(0, 1) tail over the whole vocabulary: at the default shape (8,192 tokens, bf16)
  mean full-vocabulary entropy 2.03 nats, median nucleus 0 tokens (top-1 >= 0.8), 77% of rows resolved by
  the top-512 stage (the ``diag`` line; other shapes and seeds differ). The reference / old hidden states are
  the policy's plus small noise, as in the random mode. The driver prints the measured mean entropy
  and the fraction of rows whose nucleus crosses beyond 512 tokens (``diag``, on the first 512 rows).

Every method runs in a FRESH subprocess, so its memory numbers are its own. In the subprocess the
inputs are allocated first (hidden [N, H] and lm-head weight [V, H] with requires_grad, reference
hidden + weight without grad, targets, advantages, proxy), then the baseline RSS is read; the
forward + backward is then run ``--repeats`` times (grads reset to None before each run).

* peak extra MiB  = max RSS during the fwd+bwd runs - RSS after the inputs were allocated. Peak RSS
  comes from ``getrusage(RUSAGE_SELF).ru_maxrss`` (exact, process lifetime) when it was reached
  after the baseline, else from a /proc/self/statm sampler running at ~1 ms.
  It includes the weight/hidden gradients that backward produces (d weight alone is V*H*4 bytes).
* absolute peak MiB = the process's peak RSS (torch + inputs + grads + working set).
* time s          = wall clock of one fwd+bwd, median over the repeats. A warm-up on
  ``--warmup-tokens`` tokens (default 256) runs first in the same process (one-time init costs).

The naive method runs under ``RLIMIT_AS`` (``--mem-limit-gb``) so that it fails with an allocation
error instead of taking the machine down; a failure is recorded as OOM, never as a number.

Usage (the acceptance run; ``old`` first, so that the others read its min-p proxy):
    nice python benchmarks/bench_stats_memory.py --tokens 8192 --hidden 1536 --vocab 151936 --dtype bfloat16 \
        --repeats 1 --warmup-tokens 64 --methods old,a,ours,a_step,ours_step,a_ref,a_ref_step,a_pre_step [--logits peaked]
    nice python benchmarks/bench_stats_memory.py --tokens 512,1024,2048 --breakdown   # scaling + breakdown
    nice python benchmarks/bench_stats_memory.py --tokens 256 --vocab 32768 --check  # quick validation
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20
TOP_P, TOP_K, MIN_P = 0.8, 10000, 0.02
COEF = dict(entropy=0.01, top_p=0.005, kl=0.05, lp_reg=1.0)  # any nonzero weights cost the same

METHODS_MAIN = ("old", "ours", "a", "a_ref", "b")
# peaked mode: candidates per token, dominant logit boost, its per-token spread (+-), decay per candidate
PEAK_CAND, PEAK_SCALE, PEAK_SPREAD, PEAK_DECAY, PEAK_BG = 8, 16.0, 0.2, 0.8, 1.0
BREAKDOWN = ("only_entropy", "only_top_p", "only_kl_ref")


# ----------------------------------------------------------------------------------------- worker
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class Sampler:
    """Background thread sampling RSS every ``period`` s; torch releases the GIL in its kernels."""

    def __init__(self, period: float = 1e-3):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def __enter__(self):
        self.peak = rss_bytes()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def make_inputs(torch, n, h, v, dtype, seed=0, logits="random"):
    """Inputs without large temporaries (so setup never exceeds the measured peak)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float32)
    weight = torch.randn(v, h, generator=g, dtype=torch.float32).mul_(h ** -0.5).to(dtype)
    if logits == "peaked":  # a few candidate tokens per position with decreasing logit boosts
        hidden.mul_(PEAK_BG)
        cand = torch.randint(0, v, (n, PEAK_CAND), generator=g)
        gap = PEAK_SCALE * torch.rand(n, 1, generator=g).sub_(0.5).mul_(2 * PEAK_SPREAD).add_(1.0)  # per-token confidence
        coef = gap * torch.pow(PEAK_DECAY, torch.arange(PEAK_CAND, dtype=torch.float32))[None, :]
        coef = coef * torch.rand(n, PEAK_CAND, generator=g).mul_(0.4).add_(0.8)
        wc = weight[cand].float()  # [n, k, h]; rows have norm ~1, so w_c . w_c ~ 1
        hidden.add_((coef[:, :, None] * wc).sum(1))
        del wc
    hidden = hidden.to(dtype)
    ref_w = weight.clone()
    for s in range(0, v, 8192):  # reference head = policy head + small noise, block by block
        blk = ref_w[s:s + 8192]
        blk.add_(torch.randn(blk.shape, generator=g, dtype=torch.float32).mul_(0.01 * h ** -0.5).to(dtype))
    ref_h = hidden.clone()
    ref_h.add_(torch.randn(n, h, generator=g, dtype=torch.float32).mul_(0.05).to(dtype))
    old_h = hidden.clone()
    old_h.add_(torch.randn(n, h, generator=g, dtype=torch.float32).mul_(0.02).to(dtype))
    targets = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    return dict(hidden=hidden, weight=weight, ref_h=ref_h, ref_w=ref_w, old_h=old_h, targets=targets, adv=adv)


def pg_lpreg_loss(torch, lp, adv, proxy):
    """PG term + Lp-Reg's k3 term (on tokens with A < 0 whose log-prob is below the proxy's)."""
    loss = -(lp * adv).mean()
    d = proxy - lp
    k3 = (torch.exp(d) - d - 1.0).clamp(-10, 10)
    sel = ((adv < 0) & (lp.detach() < proxy)).float()
    return loss + COEF["lp_reg"] * (k3 * sel).sum() / lp.numel()


def run_chunked(torch, x, spec, budget, proxy, precomputed=None):
    from alignreg.losses.stats import token_stats

    kw = dict(ref=(x["ref_h"], x["ref_w"], None)) if spec.kl_ref else {}
    out = token_stats(x["hidden"], x["weight"], x["targets"], spec, budget_bytes=budget, precomputed=precomputed, **kw)
    loss = pg_lpreg_loss(torch, out["logprobs"], x["adv"], proxy)
    if "entropy" in out:
        loss = loss - COEF["entropy"] * out["entropy"].mean()
    if "top_p_entropy" in out:
        loss = loss + COEF["top_p"] * out["top_p_entropy"].mean()
    if "kl_ref_full" in out:
        loss = loss + COEF["kl"] * out["kl_ref_full"].mean()
    loss.backward()
    return out


def run_step(torch, x, method, spec, budget):
    """A learner's on-policy update: its no-grad pass (pi_old = pi_theta: Lp-Reg's min-p proxy, and
    for ``*_ref`` / ours the reference model) followed by the loss fwd+bwd. ``ours_step`` and
    ``a_pre_step`` compute the training statistics in that no-grad pass (``token_stats_forward``)
    and run only the backward (``precomputed=``); ``a_step`` / ``a_ref_step`` run (a)'s full fwd+bwd."""
    from alignreg.losses.stats import StatsSpec, auto_chunk_size, token_stats, token_stats_forward

    low = x["hidden"].dtype != torch.float32
    chunk = auto_chunk_size(x["weight"].shape[0], spec, budget, low)
    h, w, y = x["hidden"].detach(), x["weight"].detach(), x["targets"]
    ref = (x["ref_h"], x["ref_w"], None)
    if method in ("ours_step", "a_pre_step"):
        wide = StatsSpec(entropy=spec.entropy, top_p=spec.top_p, kl_ref=spec.kl_ref, min_p=MIN_P)
        pre = token_stats_forward(h, w, y, wide, ref=ref if spec.kl_ref else None, chunk_size=chunk)
        return run_chunked(torch, x, spec, budget, pre.values["min_p_logprobs"], precomputed=pre)
    with torch.no_grad():
        proxy = token_stats(h, w, y, StatsSpec(min_p=MIN_P), chunk_size=chunk)["min_p_logprobs"]
        if method == "a_ref_step":
            token_stats(x["ref_h"], x["ref_w"], y, StatsSpec(), chunk_size=chunk)
    return run_chunked(torch, x, spec, budget, proxy)


def run_naive(torch, x, proxy):
    """Everything materialised as [N, V] tensors, gradients by autograd."""
    F = torch.nn.functional
    hd, w, y = x["hidden"], x["weight"], x["targets"]
    z = (hd @ w.t()).float()
    logp = F.log_softmax(z, -1)
    del z
    lp = logp.gather(-1, y[:, None]).squeeze(-1)
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    k = min(TOP_K, p.shape[-1])
    sp, idx = p.topk(k, -1, sorted=True)  # differentiable values
    keep = (sp.detach().cumsum(-1) < TOP_P)  # SIREN's strict nucleus (piecewise-constant set)
    n = keep.sum(-1)
    s = torch.where(n > 0, (sp * keep).sum(-1), torch.ones_like(sp[:, 0]))
    log_s = s.log()
    lk = logp.gather(-1, idx)
    tpe = -((lk - log_s[:, None]) * sp * keep).sum(-1) / s
    with torch.no_grad():
        lr = F.log_softmax((x["ref_h"] @ x["ref_w"].t()).float(), -1)
    kl = (p * (logp - lr)).sum(-1)
    del lr
    loss = pg_lpreg_loss(torch, lp, x["adv"], proxy)
    loss = loss - COEF["entropy"] * ent.mean() + COEF["top_p"] * tpe.mean() + COEF["kl"] * kl.mean()
    loss.backward()
    return dict(logprobs=lp, entropy=ent, top_p_entropy=tpe, kl_ref_full=kl)


def diag(torch, x, rows=512):
    """Mean full-vocabulary entropy and nucleus statistics of the policy on the first ``rows`` tokens."""
    from alignreg.losses.stats import nucleus_size

    with torch.no_grad():
        hs = x["hidden"][:rows].detach()
        ents, ns, opens = [], [], []
        for s in range(0, hs.shape[0], 64):
            z = (hs[s:s + 64] @ x["weight"].detach().t()).float()
            logp = torch.log_softmax(z, -1)
            p = logp.exp()
            ents.append(-(p * logp).sum(-1))
            n, _ = nucleus_size(p, TOP_P, TOP_K)
            ns.append(n)
            n0, _ = nucleus_size(p, TOP_P, 512, first_k=512)
            opens.append(n0 == 512)
        e, n, o = torch.cat(ents), torch.cat(ns).float(), torch.cat(opens).float()
    return dict(rows=int(e.numel()), mean_entropy=e.mean().item(), median_entropy=e.median().item(),
                mean_nucleus=n.mean().item(), median_nucleus=n.median().item(),
                frac_nucleus_at_cap=(n >= TOP_K).float().mean().item(), frac_full_topk=o.mean().item())


def worker(a) -> dict:
    if a.method == "b" and a.mem_limit_gb > 0:
        lim = int(a.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import torch
    from alignreg.losses.stats import StatsSpec, auto_chunk_size

    torch.manual_seed(0)
    dtype = dict(float32=torch.float32, bfloat16=torch.bfloat16)[a.dtype]
    if a.method == "diag":
        x = make_inputs(torch, a.tokens, a.hidden, a.vocab, dtype, logits=a.logits)
        return dict(method="diag", tokens=a.tokens, logits=a.logits, status="ok", **diag(torch, x))
    res = dict(method=a.method, tokens=a.tokens, hidden=a.hidden, vocab=a.vocab, dtype=a.dtype, logits=a.logits,
               budget_mib=a.budget_mib, threads=torch.get_num_threads(), load_before=os.getloadavg()[0])
    budget = int(a.budget_mib * MB)
    specs = dict(
        ours=StatsSpec(entropy=True, top_p=(TOP_P, TOP_K), kl_ref=True),
        a=StatsSpec(),
        a_ref=StatsSpec(),
        old=StatsSpec(min_p=MIN_P),
        only_entropy=StatsSpec(entropy=True),
        only_top_p=StatsSpec(top_p=(TOP_P, TOP_K)),
        only_kl_ref=StatsSpec(kl_ref=True),
        ours_step=StatsSpec(entropy=True, top_p=(TOP_P, TOP_K), kl_ref=True),
        a_step=StatsSpec(),
        a_ref_step=StatsSpec(),
        a_pre_step=StatsSpec(),
    )
    spec = specs.get(a.method)
    if spec is not None:
        res["chunk"] = min(auto_chunk_size(a.vocab, spec, budget, dtype != torch.float32), a.tokens)

    def one(x, proxy):
        if a.method.endswith("_step"):
            return run_step(torch, x, a.method, spec, budget)
        if a.method == "old":
            from alignreg.losses.stats import token_stats
            with torch.no_grad():
                return token_stats(x["old_h"], x["weight"].detach(), x["targets"], spec, budget_bytes=budget)
        if a.method == "b":
            return run_naive(torch, x, proxy)
        if a.method == "a_ref":  # the reference model's log-prob pass (no grad), then (a)
            from alignreg.losses.stats import token_stats
            with torch.no_grad():
                token_stats(x["ref_h"], x["ref_w"], x["targets"], spec, budget_bytes=budget)
        return run_chunked(torch, x, spec, budget, proxy)

    def load_proxy(n):
        if a.proxy and os.path.exists(a.proxy) and n == a.tokens:
            return torch.load(a.proxy)
        return torch.full((n,), -5.0)  # warm-up / standalone: the value does not change the cost

    base = None
    try:
        if a.warmup_tokens > 0:  # small warm-up: thread pools, allocator, kernels
            xw = make_inputs(torch, min(a.warmup_tokens, a.tokens), a.hidden, a.vocab, dtype, seed=1, logits=a.logits)
            one(xw, load_proxy(xw["targets"].numel()))
            del xw
        x = make_inputs(torch, a.tokens, a.hidden, a.vocab, dtype, logits=a.logits)
        proxy = load_proxy(a.tokens)
        import gc
        gc.collect()
        base = rss_bytes()
        maxrss_at_base = maxrss_bytes()
        times, cpu_times, peak_sampled = [], [], 0
        out = None
        for _ in range(a.repeats):
            x["hidden"].grad = None
            x["weight"].grad = None
            out = None
            gc.collect()
            with Sampler() as smp:
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                out = one(x, proxy)
                times.append(time.perf_counter() - t0)
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu_times.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            peak_sampled = max(peak_sampled, smp.peak)
        maxrss = maxrss_bytes()
        peak = max(peak_sampled, maxrss) if maxrss > maxrss_at_base else peak_sampled
        res.update(status="ok", base_mb=base / MB, peak_extra_mb=(peak - base) / MB, abs_peak_mb=maxrss / MB,
                   peak_sampled_extra_mb=(peak_sampled - base) / MB, times=times,
                   time_s=statistics.median(times), cpu_times=cpu_times, cpu_s=statistics.median(cpu_times),
                   proxy_src="old pass" if a.proxy and os.path.exists(a.proxy) else "constant", load_after=os.getloadavg()[0])
        if a.method == "old" and a.proxy:
            torch.save(out["min_p_logprobs"].clone(), a.proxy)
        if a.dump:  # small-shape validation: statistics and gradients for comparison across methods
            d = {k: v.detach().clone() for k, v in out.items()}
            if a.method != "old":
                d["grad_hidden"] = x["hidden"].grad.clone()
                d["grad_weight"] = x["weight"].grad.clone()
            torch.save(d, a.dump)
    except (MemoryError, RuntimeError) as e:  # allocation failure under RLIMIT_AS
        msg = str(e).splitlines()[0][:200]
        res.update(status="oom" if ("alloc" in msg.lower() or isinstance(e, MemoryError)) else "error",
                   error=msg, abs_peak_mb=maxrss_bytes() / MB, load_after=os.getloadavg()[0],
                   base_mb=None if base is None else base / MB,
                   peak_extra_lower_bound_mb=None if base is None else (maxrss_bytes() - base) / MB)
    return res


# ----------------------------------------------------------------------------------------- driver
def spawn(args, method, tokens, budget_mib, proxy, dump=None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method,
           "--tokens", str(tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--budget-mib", str(budget_mib),
           "--warmup-tokens", str(args.warmup_tokens), "--mem-limit-gb", str(args.mem_limit_gb),
           "--proxy", proxy, "--logits", args.logits]
    if dump:
        cmd += ["--dump", dump]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if line:
        res = json.loads(line[-1][7:])
    else:  # killed (e.g. the kernel OOM killer: rc -9) or crashed
        res = dict(method=method, tokens=tokens, budget_mib=budget_mib, dtype=args.dtype,
                   status="oom-killed" if p.returncode == -9 else "error",
                   error=f"rc={p.returncode}: {p.stderr.strip().splitlines()[-1:] }")
    res["wall_total_s"] = time.time() - t0
    res.setdefault("logits", args.logits)
    print(json.dumps(res), flush=True)
    return res


def fmt(v, nd=0):
    return "-" if v is None else f"{v:,.{nd}f}"


def table(results) -> str:
    rows = ["| logits | tokens | budget MiB | method | chunk | status | peak extra MiB | abs peak MiB | time s "
            "| CPU s | extra / (a) | extra / (a') | extra / (b) | time / (a) | time / (a') | CPU / (a) | CPU / (a') "
            "| load 1m (before/after) |",
            "|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    results = [r for r in results if r.get("method") != "diag"]
    by = {(r["tokens"], r["budget_mib"], r["method"]): r for r in results}
    for r in results:
        ok = r.get("status") == "ok"
        step = "_step" if r["method"].endswith("_step") else ""  # step rows: ratios against a_step / a_ref_step
        rr = by.get((r["tokens"], r["budget_mib"], "a_ref" + step))
        rr = rr if ok and rr and rr.get("status") == "ok" else None
        ra = by.get((r["tokens"], r["budget_mib"], "a" + step))
        rb = next((q for q in results if q["tokens"] == r["tokens"] and q["method"] == "b"), None)
        ext = r.get("peak_extra_mb") if ok else None
        x_a = ext / ra["peak_extra_mb"] if ok and ra and ra.get("status") == "ok" else None
        x_b = ext / rb["peak_extra_mb"] if ok and rb and rb.get("status") == "ok" else None
        t_a = r["time_s"] / ra["time_s"] if ok and ra and ra.get("status") == "ok" else None
        c_a = r["cpu_s"] / ra["cpu_s"] if ok and ra and ra.get("status") == "ok" else None
        status = r.get("status") + ("" if ok else f" ({r.get('error', '')[:60]})")
        times = r.get("times") or []
        tcell = fmt(r.get("time_s"), 2) + (f" (n={len(times)})" if times else "")
        x_r = ext / rr["peak_extra_mb"] if rr else None
        t_r = r["time_s"] / rr["time_s"] if rr else None
        c_r = r["cpu_s"] / rr["cpu_s"] if rr else None
        rows.append(f"| {r.get('logits', 'random')} | {r['tokens']} | {r['budget_mib']:g} | {r['method']} | {r.get('chunk', '-')} | {status} "
                    f"| {fmt(ext)} | {fmt(r.get('abs_peak_mb'))} | {tcell} | {fmt(r.get('cpu_s'), 1)} | {fmt(x_a, 2)} "
                    f"| {fmt(x_r, 2)} | {fmt(x_b, 3)} | {fmt(t_a, 2)} | {fmt(t_r, 2)} | {fmt(c_a, 2)} | {fmt(c_r, 2)} | {fmt(r.get('load_before'), 2)} / {fmt(r.get('load_after'), 2)} |")
    return "\n".join(rows)


def check(args, dumps):
    """Compare ours / a against the naive autograd reference (small shapes only)."""
    import torch

    d = {m: torch.load(p) for m, p in dumps.items() if os.path.exists(p)}
    if "b" not in d:
        print("check: naive result missing")
        return
    for m in ("ours", "a"):
        if m not in d:
            continue
        keys = [k for k in d[m] if k in d["b"] and (m == "ours" or k not in ("grad_hidden", "grad_weight"))]
        for k in keys:
            err = (d[m][k].double() - d["b"][k].double()).abs().max().item()
            scale = d["b"][k].double().abs().max().item()
            print(f"check {m:4s} {k:14s} max|diff| = {err:.3e} (max|ref| = {scale:.3e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="8192", help="token count(s), comma-separated")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--logits", choices=("random", "peaked"), default="random",
                    help="input mode: random (near-uniform, worst case for top-p) or peaked (LM-like)")
    ap.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd runs per method (median reported)")
    ap.add_argument("--warmup-tokens", type=int, default=256, help="warm-up run size (0: none)")
    ap.add_argument("--budget-mib", default="", help="chunk budget(s) in MiB, comma-separated "
                    "(default: DEFAULT_CHUNK_BYTES)")
    ap.add_argument("--methods", default=",".join(METHODS_MAIN))
    ap.add_argument("--breakdown", action="store_true", help="also time each statistic alone")
    ap.add_argument("--naive-max-tokens", type=int, default=1 << 30, help="skip (b) above this token count")
    ap.add_argument("--mem-limit-gb", type=float, default=20.0, help="RLIMIT_AS for the naive method")
    ap.add_argument("--check", action="store_true", help="compare outputs/grads with the naive reference")
    ap.add_argument("--no-diag", action="store_true", help="skip the entropy / nucleus-size diagnostic")
    ap.add_argument("--json", default="", help="append results (JSON lines) to this file")
    # worker-only
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="", help=argparse.SUPPRESS)
    ap.add_argument("--proxy", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dump", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        a.tokens = int(a.tokens)
        a.budget_mib = float(a.budget_mib)
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from alignreg.losses.stats import DEFAULT_CHUNK_BYTES

    budgets = [float(b) for b in a.budget_mib.split(",")] if a.budget_mib else [DEFAULT_CHUNK_BYTES / MB]
    methods = [m for m in a.methods.split(",") if m]
    if a.breakdown:
        methods += [m for m in BREAKDOWN if m not in methods]
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} host={os.uname().nodename} "
          f"cpus={os.cpu_count()} load={os.getloadavg()} args={vars(a)}", flush=True)
    results = []
    tmp = tempfile.mkdtemp(prefix="bench_stats_")
    for n in [int(t) for t in a.tokens.split(",")]:
        proxy = os.path.join(tmp, f"proxy_{n}.pt")
        dumps = {}
        if not a.no_diag:  # what the inputs look like: mean entropy, nucleus sizes (first 512 rows)
            d = spawn(a, "diag", n, budgets[0], proxy)
            print(f"# inputs ({a.logits}): mean entropy {d.get('mean_entropy', float('nan')):.2f} nats "
                  f"(median {d.get('median_entropy', float('nan')):.2f}), mean nucleus {d.get('mean_nucleus', float('nan')):.0f} "
                  f"tokens, rows needing the full top-{TOP_K}: {100 * d.get('frac_full_topk', float('nan')):.1f}% "
                  f"(nucleus at the {TOP_K} cap: {100 * d.get('frac_nucleus_at_cap', float('nan')):.1f}%)", flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(d) + "\n")
        for bi, bmib in enumerate(budgets):
            for m in methods:
                if m == "b" and (bi > 0 or n > a.naive_max_tokens):
                    continue  # the naive method has no chunk budget
                if m == "old" and bi > 0:
                    continue
                dump = os.path.join(tmp, f"dump_{n}_{m}.pt") if a.check and bi == 0 else None
                if dump:
                    dumps[m] = dump
                results.append(spawn(a, m, n, bmib, proxy, dump))
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(results[-1]) + "\n")
        if a.check:
            check(a, dumps)
    shutil.rmtree(tmp, ignore_errors=True)  # proxies and --check dumps
    print()
    print(table(results))


if __name__ == "__main__":
    main()
