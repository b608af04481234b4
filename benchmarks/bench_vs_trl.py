"""Samples/s of alignreg (Ray, vLLM rollout engine, torch learner) against TRL's ``GRPOTrainer``.

Side by side in one invocation, each in a fresh process, on the SAME tiny Qwen2 checkpoint (built in
code and saved once; char tokenizer, no download), the same synthetic task (``sort``: sort 4-7 digits,
exact-match reward), the same batch (``--prompts`` prompts x ``--group`` responses per step), the same
response length cap, temperature 1, one on-policy optimizer step per batch with the same micro-batch
(TRL: ``per_device_train_batch_size=micro``, ``gradient_accumulation_steps=batch/micro``), learning rate,
clip range and no KL term (TRL ``beta=0``; alignreg: no regularizer), no gradient checkpointing on either
side (GRPOConfig's default turns it on; TRL follows alignreg's ``model.gradient_checkpointing``: TRL's settings
are read from alignreg's resolved config, ``--set`` included), the same precision (float32, or
with ``--bf16`` bfloat16 mixed precision on both sides: TRL ``bf16=True``, alignreg
``learner.mixed_precision=bf16`` and a bfloat16 vLLM engine). The model is not warm-started, so
both policies emit EOS only now and then: responses are close to ``--max-new`` tokens but not equal
between the two sides (e.g. 14.1-16.0 vs 15.0 at 16; 48-50 at 64). The table reports completion
tokens/s beside samples/s for that reason; TRL logs one mean length for its whole run (warm-up steps
included), alignreg one per step.

Timed: the steady-state seconds per training step after ``--warmup`` steps (start-up, model load,
engine start, first-step compilation excluded on both sides). alignreg: ``time/rollout_s +
time/train_s + time/sync_s`` of each step row (rollout incl. rewards, learner step (``time/learner_s``: the
part inside the learner, without the call and the batch's transfer), weight sync WITH
its verification: checksum + parity probe). TRL: the wall time between consecutive ``on_step_end``
callbacks (generation, reward, loss, optimizer step), split into its rollout (its
``_generate_and_score_completions`` call, timed by wrapping it) and the rest (loss, backward, optimizer
step). samples/s = responses per step / s per step. The table's "vs TRL with free rollout + sync" column
is TRL's step time over the variant's train time: the most any rollout engine and sync could give that
variant when nothing overlaps.

Variants: ``alignreg`` (vLLM engine actor + learner actor on a local Ray cluster; the engine compiled by
vLLM and given every core: ``VLLM_SERVING``), ``alignreg-eager`` (the same with the config defaults:
eager engine, vLLM's own thread binding), ``alignreg-mp`` (as ``alignreg`` with ``vllm.executor=mp``: the
model in a worker process of its own instead of the engine actor's, as before ``vllm.executor``), ``alignreg-local``
(the same loop in one process with the HF engine), ``alignreg-local-two-pass`` (as ``alignreg-local``
with ``learner.single_pass=false``: the learner's separate no-grad pass before each update),
``alignreg-no-share`` / ``alignreg-local-no-share`` (as ``alignreg`` / ``alignreg-local`` with
``learner.share_prompt=false``: every response row runs its group's prompt tokens again),
``alignreg-async`` / ``alignreg-local-async`` (as ``alignreg`` / ``alignreg-local`` with
``trainer.async_rollout=true``: the next batch is generated while the learner trains; one-step
off-policy), ``trl`` (TRL with ``transformers.generate``) and,
with ``--trl-vllm``, TRL's colocated vLLM mode (``use_vllm=True, vllm_mode="colocate"``).

Usage:  nice .venv/bin/python benchmarks/bench_vs_trl.py [--steps 8] [--warmup 2] [--json out.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_checkpoint(a, out_dir: str) -> None:
    from alignreg.config import ModelConfig
    from alignreg.models import load_policy

    cfg = ModelConfig(hidden_size=a.hidden, num_layers=a.layers, num_heads=a.hidden // 64, num_kv_heads=1,
                      intermediate_size=3 * a.hidden)
    model, tok = load_policy(cfg, seed=0)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def task_records(a):
    from alignreg.config import TaskConfig
    from alignreg.data.synthetic import TASKS

    train, _ = TASKS.get("sort")(TaskConfig(name="sort", min_length=4, max_length=7, eval_size=4))
    return train


# ----------------------------------------------------------------------------------------- alignreg
# The vLLM engine as one serves with it (the shipped GPU configs set enforce_eager: false too): the model
# compiled by vLLM (torch.compile, start-up excluded from the timing like TRL's) and, on this 2-core box,
# both cores for the model instead of one kept for vLLM's scheduler. ``alignreg-eager`` runs the config
# defaults (eager, vLLM's own binding) for comparison.
VLLM_SERVING = ("vllm.enforce_eager=false", "vllm.cpu_threads_bind=all")
EAGER = ("vllm.enforce_eager=true", "vllm.cpu_threads_bind=auto")


def alignreg_config(a, ckpt: str, run_dir: str, ray: bool, engine: str = "vllm", extra: tuple[str, ...] = ()):
    """The resolved alignreg config of a variant; TRL's peer reads the settings it must match from it."""
    from alignreg.config import RLConfig, load_config

    over = [
        f"model.path={ckpt}", "warm_start.steps=0", "task.name=sort", "task.min_length=4", "task.max_length=7",
        "task.eval_size=4", "eval.every=0", "eval.num_samples=2", "eval.ks=[1]", "regularizers=[]",
        f"rollout.group_size={a.group}", f"rollout.prompts_per_step={a.prompts}", f"rollout.max_new_tokens={a.max_new}",
        "rollout.temperature=1.0", f"learner.lr={a.lr}", f"learner.micro_batch_size={a.micro}",
        "algorithm.eps_low=0.2", "algorithm.eps_high=0.2", f"trainer.steps={a.steps}", "trainer.save_every=0",
        "trainer.progress=false", "trainer.tensorboard=false", f"trainer.run_dir={run_dir}", f"trainer.threads={a.threads}",
    ]
    if ray and engine == "vllm":  # vLLM's serving mode (compiled, every core); alignreg-eager overrides it
        over += list(VLLM_SERVING)
    over += list(extra) + (a.set or [])
    if a.bf16:  # bfloat16 autocast in the learner; the vLLM engine serves in bfloat16 (its log-probs differ
        # from the float32 learner's by bf16 rounding, so the parity probe gets a bf16-sized tolerance)
        over += ["learner.mixed_precision=bf16", "vllm.dtype=bfloat16", f"sync.parity_tol={a.bf16_parity_tol}"]
    if ray:
        over += ["orchestration=ray", f"rollout.engine={engine}", "ray.num_cpus_per_actor=0.5"]
    return load_config(RLConfig, os.path.join(ROOT, "configs/rl/tiny_grpo_siren.yaml"), over)


def run_alignreg(a, ckpt: str, ray: bool, engine: str = "vllm", extra: tuple[str, ...] = ()) -> dict:
    from alignreg.logging import read_metrics
    from alignreg.orchestration.trainer import train

    run_dir = tempfile.mkdtemp(prefix="alignreg_", dir=os.path.dirname(ckpt))  # the driver removes it
    cfg = alignreg_config(a, ckpt, run_dir, ray, engine, extra)
    t0 = time.perf_counter()
    train(cfg)
    total = time.perf_counter() - t0
    rows = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["step"] >= 1]
    steps = [r["time/rollout_s"] + r["time/train_s"] + r["time/sync_s"] for r in rows]
    sync = [r["time/sync_s"] for r in rows]
    lens = [r.get("rollout/response_len", float("nan")) for r in rows]
    return dict(step_s=steps, sync_s=sync, response_len=lens, total_s=total,
                rollout_s=[r["time/rollout_s"] for r in rows], train_s=[r["time/train_s"] for r in rows],
                learner_s=[r["time/learner_s"] for r in rows])


# ----------------------------------------------------------------------------------------- TRL
def trl_config(a, ckpt: str, out_dir: str, use_vllm: bool):
    """TRL's ``GRPOConfig`` for the same work as alignreg's run, read from alignreg's resolved config (so
    ``--set`` overrides reach both sides). Gradient checkpointing follows ``model.gradient_checkpointing``
    (off by default): GRPOConfig turns it on by default, which would add a forward recomputation to every
    TRL backward that alignreg's learner does not run."""
    from trl import GRPOConfig

    cfg = alignreg_config(a, ckpt, out_dir, ray=False)
    lc, rc = cfg.learner, cfg.rollout
    batch = rc.prompts_per_step * rc.group_size
    return GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=a.bf16, seed=0, report_to="none", save_strategy="no", logging_steps=10**6,
        max_steps=cfg.trainer.steps, learning_rate=lc.lr, warmup_steps=lc.warmup_steps,
        lr_scheduler_type="constant_with_warmup" if lc.warmup_steps else "constant",
        weight_decay=lc.weight_decay, max_grad_norm=lc.grad_clip, per_device_train_batch_size=lc.micro_batch_size,
        gradient_accumulation_steps=batch // lc.micro_batch_size, num_generations=rc.group_size,
        generation_batch_size=batch, max_completion_length=rc.max_new_tokens, temperature=rc.temperature,
        num_iterations=1, beta=0.0, epsilon=cfg.algorithm.eps_low, epsilon_high=cfg.algorithm.eps_high, loss_type="dapo",
        disable_dropout=True, gradient_checkpointing=cfg.model.gradient_checkpointing,
        dataloader_num_workers=0, use_vllm=use_vllm, vllm_mode="colocate",
        # the attention kernel alignreg runs (model.attn_implementation; auto = transformers' default, as TRL's)
        **({"model_init_kwargs": {"attn_implementation": cfg.model.attn_implementation}}
           if cfg.model.attn_implementation != "auto" else {}),
        **({"vllm_gpu_memory_utilization": 0.3, "vllm_enable_sleep_mode": False} if use_vllm else {}),
    )


def run_trl(a, ckpt: str, use_vllm: bool) -> dict:
    import datasets
    import torch
    import transformers
    from trl import GRPOTrainer

    if a.threads:
        torch.set_num_threads(a.threads)
    recs = task_records(a)
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in recs])

    def exact(completions, answer, **_):
        return [1.0 if c.strip() == y else 0.0 for c, y in zip(completions, answer)]

    args = trl_config(a, ckpt, tempfile.mkdtemp(prefix="trl_", dir=os.path.dirname(ckpt)), use_vllm)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ends, lens = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lens.append(logs["completions/mean_length"])

    trainer = GRPOTrainer(model=ckpt, reward_funcs=exact, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    # TRL's rollout time: its generation + reward scoring call (one per optimizer step here: the generation
    # batch is the optimizer batch); the rest of a step is its loss, backward and optimizer step
    gen_s, generate = [], trainer._generate_and_score_completions

    def timed_generate(*args_, **kw):
        t = time.perf_counter()
        out = generate(*args_, **kw)
        gen_s.append(time.perf_counter() - t)
        return out

    trainer._generate_and_score_completions = timed_generate
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    steps = [t1 - t0_ for t0_, t1 in zip([t0] + ends[:-1], ends)]
    out = dict(step_s=steps, sync_s=[], response_len=lens, total_s=total)
    if len(gen_s) == len(steps):
        out.update(rollout_s=gen_s, train_s=[s - g for s, g in zip(steps, gen_s)])
    return out


# ----------------------------------------------------------------------------------------- driver
def run_worker(argv: list[str], variant: str) -> Optional[dict]:
    """Run one variant in a fresh process (``argv + --worker variant``); its ``RESULT`` line, or None
    after printing why it failed."""
    p = subprocess.run(argv + ["--worker", variant], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"})
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        print(f"{variant}: failed rc={p.returncode}\n" + "\n".join(p.stderr.strip().splitlines()[-15:]), flush=True)
        return None
    return json.loads(line[-1][7:])


def record(rows: list[dict], row: dict, json_path: str) -> None:
    """Keep ``row``, print it, and append it to ``json_path`` (if given) as it comes."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="alignreg,alignreg-local,trl")
    ap.add_argument("--trl-vllm", action="store_true", help="also run TRL with its colocated vLLM engine")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--micro", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = torch default)")
    ap.add_argument("--bf16", action="store_true",
                    help="both sides in bfloat16 mixed precision: TRL bf16=True (autocast), alignreg "
                         "learner.mixed_precision=bf16 and vllm.dtype=bfloat16")
    ap.add_argument("--bf16-parity-tol", type=float, default=0.1, help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", help="extra alignreg config override key=value (repeatable)")
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    runs = {"alignreg": lambda: run_alignreg(a, a.ckpt, ray=True),
            "alignreg-eager": lambda: run_alignreg(a, a.ckpt, ray=True, extra=EAGER),
            "alignreg-mp": lambda: run_alignreg(a, a.ckpt, ray=True, extra=("vllm.executor=mp",)),
            "alignreg-local": lambda: run_alignreg(a, a.ckpt, ray=False),
            "alignreg-ray-hf": lambda: run_alignreg(a, a.ckpt, ray=True, engine="hf"),
            "alignreg-local-two-pass": lambda: run_alignreg(a, a.ckpt, ray=False, extra=("learner.single_pass=false",)),
            "alignreg-no-share": lambda: run_alignreg(a, a.ckpt, ray=True, extra=("learner.share_prompt=false",)),
            "alignreg-local-no-share": lambda: run_alignreg(a, a.ckpt, ray=False, extra=("learner.share_prompt=false",)),
            "alignreg-async": lambda: run_alignreg(a, a.ckpt, ray=True, extra=("trainer.async_rollout=true",)),
            "alignreg-local-async": lambda: run_alignreg(a, a.ckpt, ray=False, extra=("trainer.async_rollout=true",)),
            "trl": lambda: run_trl(a, a.ckpt, use_vllm=False),
            "trl-vllm": lambda: run_trl(a, a.ckpt, use_vllm=True)}
    if a.worker:
        print("RESULT " + json.dumps(runs[a.worker]()), flush=True)
        return
    unknown = sorted(set(a.variants.split(",")) - set(runs))
    if unknown:  # before the checkpoint is built and the other variants have run
        ap.error(f"unknown variants {unknown}; valid: {', '.join(runs)}")
    work = tempfile.mkdtemp(prefix="bench_trl_")  # the checkpoint and every variant's run directory
    try:
        ckpt = os.path.join(work, "ckpt")
        build_checkpoint(a, ckpt)
        measure(a, ckpt)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(a, ckpt: str) -> None:
    """Each variant in a fresh process on the checkpoint ``ckpt``; prints the rows and the table."""
    variants = a.variants.split(",") + (["trl-vllm"] if a.trl_vllm else [])
    batch = a.prompts * a.group
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} cpus={os.cpu_count()} load={os.getloadavg()} "
          f"model h={a.hidden} L={a.layers}; batch {a.prompts}x{a.group}, max_new {a.max_new}, micro {a.micro}; "
          f"{'bfloat16 mixed precision' if a.bf16 else 'float32'}", flush=True)
    rows = []
    argv = [sys.executable, os.path.abspath(__file__), "--ckpt", ckpt] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
        if k in ("steps", "prompts", "group", "max_new", "micro", "hidden", "layers", "lr", "threads", "bf16_parity_tol")] + [
        "--bf16"] * a.bf16 + [
        f"--set={kv}" for kv in a.set or []]
    for v in variants:
        t0 = time.perf_counter()
        r = run_worker(argv, v)
        if r is None:
            continue
        steady = r["step_s"][a.warmup:]
        s = statistics.median(steady)
        lens = r["response_len"]  # per step (alignreg) or one run-level mean (TRL logs once)
        lens = (lens[a.warmup:] if len(lens) == len(r["step_s"]) else lens) or [a.max_new]
        row = dict(variant=v, steps=len(r["step_s"]), step_s_median=s, step_s_mean=statistics.fmean(steady),
                   samples_per_s=batch / s, tokens_per_s=batch * statistics.fmean(lens) / s,
                   sync_s_median=statistics.median(r["sync_s"][a.warmup:]) if r["sync_s"] else 0.0,
                   rollout_s_median=statistics.median(r["rollout_s"][a.warmup:]) if r.get("rollout_s") else float("nan"),
                   train_s_median=statistics.median(r["train_s"][a.warmup:]) if r.get("train_s") else float("nan"),
                   learner_s_median=statistics.median(r["learner_s"][a.warmup:]) if r.get("learner_s") else float("nan"),
                   response_len=r["response_len"], step_s=r["step_s"], rollout_s=r.get("rollout_s"),
                   train_s=r.get("train_s"), sync_s=r["sync_s"], process_s=time.perf_counter() - t0,
                   load=os.getloadavg()[0])
        record(rows, row, a.json)
    base = {r["variant"]: r for r in rows}.get("trl")
    # the ceiling: samples/s vs TRL if this variant's rollout and sync took no time (its train step alone)
    print("\n| variant | s / step (median) | samples/s | samples/s vs TRL | tokens/s | tokens/s vs TRL | rollout s | train s "
          "| of it in the learner s | sync s | vs TRL with free rollout + sync | process wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = f"**{r['samples_per_s'] / base['samples_per_s']:.2f}x**" if base else "-"
        trel = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        ceil = f"{base['step_s_median'] / r['train_s_median']:.2f}x" if base and r["train_s_median"] > 0 else "-"
        print(f"| {r['variant']} | {r['step_s_median']:.3f} | {r['samples_per_s']:.1f} | {rel} | {r['tokens_per_s']:.0f} | {trel} "
              f"| {r['rollout_s_median']:.3f} | {r['train_s_median']:.3f} | {r['learner_s_median']:.3f} | {r['sync_s_median']:.3f} "
              f"| {ceil} | {r['process_s']:.0f} |")


if __name__ == "__main__":
    main()
