"""``alignreg eval CHECKPOINT``: greedy accuracy, unbiased pass@k, maj@k, self-correction metrics.

CHECKPOINT is an HF directory (``runs/x/final``, an ``alignreg sft`` output) or a LoRA adapter
directory. The problems are either a GSM8K / MATH / prompt-answer file (``--data FILE --format F``;
every record is evaluated) or the held-out split of an experiment config (``--config YAML``: task,
``math_data`` templates, reward, ``eval`` and ``rollout`` settings; ``key=value`` overrides apply).

Metrics (a response is correct when its reward is >= 1):

* ``greedy_acc``   accuracy of the greedy response;
* ``pass@k``       unbiased estimator from n = ``eval.num_samples`` samples (Chen et al. 2021, eq. 1);
* ``maj@k``        accuracy of the majority answer of the first k samples. The correct answers are one
                   answer (each is equivalent to the gold, so ``0.5`` and ``\\frac12`` are one vote each
                   for the same answer); wrong ones are compared after extraction (``\\boxed{}`` /
                   ``####`` / the stripped text, spaces removed), so two spellings of one wrong value
                   count apart, which can only favour a correct majority; ties go to the answer seen first;
* ``accuracy@t1``, ``accuracy@t2``, ``delta_t1_t2``, ``delta_i2c``, ``delta_c2i``: greedy two-attempt
  self-correction (SCoRe episodes with ``score.instruction``) with ``--self-correct`` or when the
  config has ``score.enabled``.

The table is printed and written to ``<out>/eval.md`` and ``<out>/eval.json``.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Optional

from alignreg.config import ConfigError, DataSource, RLConfig, load_config


def majority_correct(answers: list[str], correct: list[bool], k: int) -> bool:
    """Is the most frequent of the first k answers a correct one? All correct answers count as one answer
    (each equals the gold); wrong ones are grouped by their normalised text. Ties: first seen wins."""
    keys = [None if c else a for a, c in zip(answers[:k], correct[:k])]  # None: the correct answer
    counts = Counter(keys)
    best = max(counts.values())
    return next(key for key in keys if counts[key] == best) is None


def normalise_answer(text: str) -> str:
    from alignreg.rewards.math import extract_answer

    ans = extract_answer(text)
    return (ans if ans is not None else text).strip().replace(" ", "")


def evaluate_checkpoint(engine, tokenizer, records: list[dict], cfg: RLConfig, self_correct: bool = False,
                        seed: int = 0) -> dict[str, float]:
    from alignreg.eval import pass_at_k
    from alignreg.models import encode_prompts
    from alignreg.rewards.math import batch_rewards
    from alignreg.rollout.base import SamplingParams

    reward, ec, T = cfg.task.reward, cfg.eval, cfg.rollout.max_new_tokens
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in records])

    def scored(batch):
        texts = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
        return texts, batch_rewards(reward, texts, [records[i] for i in batch.prompt_index])

    n_rec = len(records)
    greedy = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=T))
    _, gr = scored(greedy)
    metrics = {"num_problems": float(n_rec), "greedy_acc": sum(r >= 1.0 for r in gr) / n_rec}
    n = ec.num_samples
    sampled = engine.generate(prompts, SamplingParams(temperature=ec.temperature, n=n, max_new_tokens=T, seed=seed))
    texts, sr = scored(sampled)
    answers: list[list[str]] = [[] for _ in records]
    correct: list[list[bool]] = [[] for _ in records]
    for i, t, r in zip(sampled.prompt_index, texts, sr):
        answers[i].append(normalise_answer(t))
        correct[i].append(r >= 1.0)
    for k in ec.ks:
        if k <= n:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, sum(c), k) for c in correct) / n_rec
            metrics[f"maj@{k}"] = sum(majority_correct(a, c, k) for a, c in zip(answers, correct)) / n_rec
    metrics["mean_reward"] = sum(sr) / len(sr)
    if self_correct or cfg.score.enabled:
        from alignreg.orchestration.score import score_evaluate

        metrics.update(score_evaluate(engine, tokenizer, records, reward, cfg.score, T, cfg.math_data, prefix=""))
    return metrics


def format_table(metrics: dict[str, float], title: str) -> str:
    lines = [f"### {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if k != "num_problems" else f"| {k} | {int(v)} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def eval_records(cfg: RLConfig, tokenizer, data: Optional[str], fmt: str, limit: int) -> list[dict]:
    from alignreg.data import prompt_dataset
    from alignreg.data.math import load_source, math_prompt_dataset, render_prompt

    if data:
        recs = load_source(DataSource(format=fmt, path=data))
        recs = [dict(r, prompt=render_prompt(r["question"], cfg.math_data, tokenizer)) for r in recs]
    else:
        recs = (math_prompt_dataset(cfg, tokenizer) or prompt_dataset(cfg.task))[1]
    if limit > 0:
        recs = recs[:limit]
    if not recs:
        raise ConfigError("eval: no problems to evaluate")
    return recs


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignreg eval", description="evaluate a checkpoint: greedy, pass@k, maj@k, self-correction")
    p.add_argument("checkpoint", help="HF checkpoint, LoRA adapter, or alignreg rl checkpoint (<run_dir>/checkpoints/step_N)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config (eval.num_samples=16 ...)")
    p.add_argument("--config", default=None, help="experiment YAML (task, math_data, reward, eval, rollout)")
    p.add_argument("--data", default="", help="GSM8K / MATH / prompt-answer file (.jsonl/.json/.parquet): evaluate every record")
    p.add_argument("--format", default="gsm8k", choices=["gsm8k", "math", "prompt_answer"], help="record format of --data")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N problems (0 = all)")
    p.add_argument("--self-correct", action="store_true", help="also run greedy two-attempt (SCoRe) episodes")
    p.add_argument("--out", default="", help="output directory for eval_<data>.json / .md (default: the checkpoint dir; "
                   "for <run_dir>/checkpoints/step_N, which the run rotates away, <run_dir>/eval/step_N)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled responses")
    args = p.parse_intermixed_args(argv)

    import torch

    from alignreg.learner.lora import is_training_checkpoint, load_any_policy
    from alignreg.data.math import math_prompt_dataset  # noqa: F401  (registers math rewards and tasks)
    from alignreg.orchestration.workers import RolloutWorker

    cfg = load_config(RLConfig, args.config, args.overrides)
    if args.data and not args.config:
        from alignreg.config import _parsed, apply_overrides

        rollout = _parsed(apply_overrides({}, list(args.overrides)).get("rollout"))
        if not (isinstance(rollout, dict) and "max_new_tokens" in rollout):
            raise ConfigError(f"eval --data without --config: set the response length, e.g. rollout.max_new_tokens=1024 "
                              f"(the default, {cfg.rollout.max_new_tokens}, is the tiny sort task's), or pass the run's "
                              "--config")
        if not any(o.startswith("task.reward=") for o in args.overrides):
            cfg.task.reward = "math_verify"  # a GSM8K / MATH file without a config: math-verify
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    ckpt = Path(args.checkpoint)
    from alignreg.models import attn_kwargs

    # the training run's attention kernel (model.attn_implementation; auto: eager for the tiny model, else
    # transformers' default), not a fixed one: eval scores the model the run trained
    attn = attn_kwargs(cfg.model).get("attn_implementation")
    model, tokenizer = load_any_policy(ckpt, getattr(torch, cfg.model.dtype), attn)
    if cfg.rollout.engine == "vllm" and (ckpt / "adapter_config.json").is_file():
        raise ConfigError("eval: rollout.engine=vllm needs a full checkpoint; merge the adapter (alignreg.learner.lora.save_merged)")
    model_dir = str(ckpt)
    if cfg.rollout.engine == "vllm" and is_training_checkpoint(ckpt):  # vLLM loads an HF directory
        import tempfile

        model_dir = tempfile.mkdtemp(prefix="alignreg-eval-")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    engine = RolloutWorker(cfg, model_dir, args.seed, model=None if cfg.rollout.engine == "vllm" else model, tokenizer=tokenizer)
    records = eval_records(cfg, tokenizer, args.data, args.format, args.limit)
    from alignreg.data import check_context

    check_context(cfg, records, tokenizer, model.config, two_attempts=args.self_correct or cfg.score.enabled)
    metrics = evaluate_checkpoint(engine, tokenizer, records, cfg, args.self_correct, args.seed)
    title = f"{ckpt} on {args.data or cfg.task.name} ({len(records)} problems, reward {cfg.task.reward})"
    table = format_table(metrics, title)
    print(table)
    # a training checkpoint's directory is rotated away by the run: its results go to <run_dir>/eval/step_N
    in_run = is_training_checkpoint(ckpt) and ckpt.resolve().parent.name == "checkpoints"
    out = Path(args.out) if args.out else (ckpt.resolve().parent.parent / "eval" / ckpt.name if in_run else ckpt)
    out.mkdir(parents=True, exist_ok=True)
    if args.data:  # one pair of files per evaluated data set: the file's folder and stem (gsm8k_test, math500_test)
        data = Path(args.data).resolve()
        tag = f"{data.parent.name}_{data.stem}" if data.parent.name else data.stem
    else:
        tag = cfg.task.name
    settings = {"max_new_tokens": cfg.rollout.max_new_tokens, "temperature": cfg.eval.temperature,
                "num_samples": cfg.eval.num_samples, "reward": cfg.task.reward, "seed": args.seed, "limit": args.limit,
                "self_correct": bool(args.self_correct or cfg.score.enabled)}
    if args.data or cfg.task.name in ("gsm8k", "math", "math_mixture"):  # the prompts a math template rendered
        settings["template"] = cfg.math_data.template
    if settings["self_correct"]:
        settings["instruction"] = cfg.score.instruction
    (out / f"eval_{tag}.md").write_text(table)
    (out / f"eval_{tag}.json").write_text(json.dumps({"checkpoint": str(ckpt), "data": args.data or cfg.task.name,
                                                      "settings": settings, "metrics": metrics}, indent=2))
    print(f"written: {out / f'eval_{tag}.md'}, {out / f'eval_{tag}.json'}")
    if hasattr(engine, "shutdown"):
        engine.shutdown()
    if model_dir != str(ckpt):
        import shutil

        shutil.rmtree(model_dir, ignore_errors=True)
    return 0
