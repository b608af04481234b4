"""Generation time of alignreg's rollout engines, side by side in one invocation, on the batch of
``bench_vs_trl.py`` (the same tiny Qwen2 checkpoint, ``sort`` prompts, ``--prompts`` x ``--group``
samples, ``--max-new`` tokens, temperature 1).

Each variant runs in a fresh process (vLLM's thread binding is read once per process):

* ``hf`` - ``HFRolloutEngine`` as a Ray engine actor builds it (eager attention; a one-process run's engine
  is a copy of the learner's model, which for an HF checkpoint runs torch's sdpa attention): each prompt's
  prefill runs once for its ``--group`` samples (``_shared_prefill``);
* ``hf-no-share`` - the same engine with ``shared_prefill=False``: ``generate`` prefills every sample;
* ``vllm-<mode>-<bind>`` - ``VLLMRolloutEngine`` with ``vllm.enforce_eager`` (``eager``: true, the
  config default; ``compiled``: false, vLLM's torch.compile of the model) and ``vllm.cpu_threads_bind``
  (``auto``: vLLM's binding, one core kept for its scheduler; ``all``: every core for the model), the
  model in a worker process of its own (``vllm.executor: mp``, as in a local run) or, with the ``-uni``
  suffix, in the engine's process (``uni``, what ``auto`` picks in a Ray engine actor).

Timed: the median wall time of one ``generate`` call over ``--repeats`` calls after ``--warmup`` calls
(start-up, and compilation on the first calls, excluded; the engine's start-up is reported on its own).
The sampling seed is fixed, so every repeat generates the same tokens.

Usage:  nice .venv/bin/python benchmarks/bench_rollout.py [--variants hf,hf-no-share,vllm-eager-auto,...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_vs_trl import build_checkpoint, record, run_worker, task_records  # noqa: E402 - the same checkpoint and task

VARIANTS = ("hf", "hf-no-share", "vllm-eager-auto", "vllm-eager-all", "vllm-compiled-auto", "vllm-compiled-all",
            "vllm-eager-all-uni", "vllm-compiled-all-uni")


def prompts_of(a, ckpt: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    from alignreg.models import encode_prompts

    tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    return encode_prompts(tok, [r["prompt"] for r in task_records(a)[: a.prompts]])


def engine_of(variant: str, ckpt: str, max_len: int):
    import torch

    if variant.startswith("hf"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from alignreg.rollout.hf import HFRolloutEngine

        model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True, attn_implementation="eager",
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
        return HFRolloutEngine(model, tok, shared_prefill=variant == "hf")
    from alignreg.config import VLLMConfig
    from alignreg.rollout.vllm import VLLMRolloutEngine

    _, mode, bind, *uni = variant.split("-")
    cfg = VLLMConfig(enforce_eager=mode == "eager", cpu_threads_bind=bind, executor="uni" if uni else "mp")
    return VLLMRolloutEngine(ckpt, cfg, seed=0, max_len=max_len, own_process=bool(uni))


def run_variant(a, variant: str) -> dict:
    import torch

    from alignreg.rollout.base import SamplingParams

    if a.threads:
        torch.set_num_threads(a.threads)
    prompts = prompts_of(a, a.ckpt)
    t0 = time.perf_counter()
    engine = engine_of(variant, a.ckpt, max(map(len, prompts)) + a.max_new)
    start = time.perf_counter() - t0
    sp = SamplingParams(temperature=1.0, max_new_tokens=a.max_new, n=a.group, seed=1234)
    times, tokens = [], 0
    for _ in range(a.warmup + a.repeats):
        t = time.perf_counter()
        batch = engine.generate(prompts, sp)
        times.append(time.perf_counter() - t)
        tokens = sum(map(len, batch.response_ids))
    return dict(variant=variant, start_s=start, gen_s=times[a.warmup:], tokens=tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process (0 = torch default)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(run_variant(a, a.worker)), flush=True)
        os._exit(0)  # vLLM's engine process goes with us; no minutes-long interpreter teardown
    unknown = sorted(set(a.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    ckpt = tempfile.mkdtemp(prefix="bench_rollout_ckpt_")
    try:
        build_checkpoint(a, ckpt)
        measure(a, ckpt)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)


def measure(a, ckpt: str) -> None:
    """Each variant in a fresh process on the checkpoint ``ckpt``; prints the rows and the table."""
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} cpus={os.cpu_count()} load={os.getloadavg()} "
          f"model h={a.hidden} L={a.layers}; {a.prompts} prompts x {a.group} samples, max_new {a.max_new}; "
          f"threads {a.threads}", flush=True)
    argv = [sys.executable, os.path.abspath(__file__), "--ckpt", ckpt] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
        if k in ("prompts", "group", "max_new", "hidden", "layers", "threads", "warmup", "repeats")]
    rows = []
    for v in a.variants.split(","):
        r = run_worker(argv, v)
        if r is not None:
            r.update(gen_s_median=statistics.median(r["gen_s"]), load=os.getloadavg()[0])
            record(rows, r, a.json)
    base = {r["variant"]: r for r in rows}.get("hf")
    print("\n| variant | s / generate (median) | min - max | tokens | tokens/s | time vs hf | start-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = f"{r['gen_s_median'] / base['gen_s_median']:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['gen_s_median']:.3f} | {min(r['gen_s']):.3f} - {max(r['gen_s']):.3f} | {r['tokens']} "
              f"| {r['tokens'] / r['gen_s_median']:,.0f} | {rel} | {r['start_s']:.1f} |")


if __name__ == "__main__":
    main()
