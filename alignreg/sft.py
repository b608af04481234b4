"""``alignreg sft CONFIG``: the supervised cold start before RLVR, with TRL's ``SFTTrainer``.

RL recipes for math (DeepSeek-R1's cold start, SCoRe's base policies) fine-tune on worked solutions
first, so that the policy already writes answers in the verifiable format (``\\boxed{}``, ``####``)
and RL has reward signal from the first step. This command trains on ``(prompt, completion)`` pairs
with the loss on completion tokens only (TRL ``completion_only_loss``) and writes an HF checkpoint
that ``alignreg rl model.path=<output_dir>`` starts from:

* full fine-tuning: ``output_dir`` holds the weights and the tokenizer;
* ``lora.enabled: true``: ``output_dir/adapter`` holds the PEFT adapter and ``output_dir`` the merged
  full weights (what ``alignreg rl`` and ``alignreg eval`` load; vLLM engines too).

Precision: full fine-tuning needs ``model.dtype: float32`` (refused otherwise: TRL's optimizer would
step bfloat16 weights with no float32 master copy, and updates of ``lr x`` a small gradient round
away); ``bf16: true`` adds bfloat16 autocast on a GPU. LoRA may load the base in bfloat16 (PEFT
keeps the adapters in float32).

Prompts and completions: any task of ``alignreg rl`` (synthetic, ``jsonl``, ``gsm8k``, ``math``,
``math_mixture`` with the same ``math_data`` templates). The completion is the record's
``solution`` (GSM8K / MATH worked solution) or, for synthetic tasks, its ``answer``; EOS is appended
by TRL. ``alignreg.warmstart`` is the built-in few-step variant used inside ``alignreg rl``.

Checkpoints and resume: TRL checkpoints (weights, optimizer, scheduler, RNG) go to ``output_dir/trl``
every ``save_steps``; SIGTERM or a first Ctrl-C writes one at the end of the current step and stops
(``alignreg.stop``). Running the same command again continues from the latest complete one (``resume: true``;
one a kill cut short while it was written is renamed ``incomplete-checkpoint-N``, with a warning);
a resume refuses changed training settings (model, data, LoRA, optimisation, seed). A finished run is
not trained again: the same command reports it, other settings are refused (RL runs start from, and
take their KL reference from, the model it wrote; train those in another ``output_dir``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from alignreg.config import (ConfigError, LoRAConfig, MathDataConfig, ModelConfig, TaskConfig, describe_diff,
                             load_config, load_yaml, save_config, stored_config_diff)
from alignreg.stop import GracefulStop, exit_code


@dataclass
class SFTRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # starting policy (tiny-qwen2 or a local HF dir)
    task: TaskConfig = field(default_factory=TaskConfig)  # prompt/answer source (same schema as alignreg rl)
    math_data: MathDataConfig = field(default_factory=MathDataConfig)  # GSM8K / MATH files and templates
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # train a LoRA adapter instead of all weights
    steps: int = 100  # optimizer steps (TRL max_steps)
    lr: float = 3e-3  # learning rate (linear decay, TRL default scheduler)
    batch_size: int = 16  # sequences per step (per device)
    grad_accum: int = 1  # gradient accumulation steps
    max_length: int = 1024  # truncate prompt + completion to this many tokens
    warmup_steps: int = 0  # steps of linear learning-rate warmup
    seed: int = 0  # model init (tiny-qwen2), data order
    threads: int = 0  # torch CPU threads (0 = default)
    bf16: bool = False  # bf16 mixed precision (GPU)
    output_dir: str = "runs/sft"  # checkpoint directory that alignreg rl model.path points to
    logging_steps: int = 10  # log the loss every N steps
    save_steps: int = 0  # TRL checkpoint in output_dir/trl every N steps (0 = none; SIGTERM / Ctrl-C still write one)
    keep_checkpoints: int = 2  # most recent TRL checkpoints kept (0 = all)
    resume: bool = True  # continue from the latest checkpoint in output_dir/trl when there is one
    correction_pairs: float = 0.0  # add this fraction (of the train set) of second-turn examples x1 + y1 + instruction -> answer (y1 right or perturbed); teaches the SCoRe episode format
    correction_instruction: str = " check:"  # instruction p_sc of those examples (= score.instruction of the RL run)

    def validate(self, path: str) -> None:
        from alignreg.config import _at_least, _check

        _check(self.lr > 0, f"{path}.lr must be > 0")
        _at_least(self, path, 1, "steps", "batch_size", "grad_accum", "max_length", "logging_steps")
        _at_least(self, path, 0, "warmup_steps", "threads", "save_steps", "keep_checkpoints", "correction_pairs")
        _check(bool(self.output_dir.strip()), f"{path}.output_dir is empty (it would write into the current directory); name a directory")
        _check(self.lora.enabled or self.model.dtype == "float32",
               f"{path}.model.dtype: {self.model.dtype} with full fine-tuning (lora.enabled: false) has TRL's optimizer "
               f"step the {self.model.dtype} weights themselves, with no float32 master copy, so most small updates "
               "round away; set model.dtype: float32 and bf16: true (autocast computes in bfloat16, the weights stay "
               "float32), or lora.enabled: true")


def sft_records(cfg: SFTRunConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` ``{"prompt", "completion"}`` pairs for ``cfg.task``."""
    from alignreg.config import RLConfig
    from alignreg.data import prompt_dataset
    from alignreg.data.math import math_prompt_dataset

    rl = RLConfig(model=cfg.model, task=cfg.task, math_data=cfg.math_data)
    train, held = math_prompt_dataset(rl, tokenizer) or prompt_dataset(cfg.task)

    def pairs(recs):
        return [{"prompt": r["prompt"], "completion": r.get("solution") or r["answer"]} for r in recs]

    out = pairs(train)
    if cfg.correction_pairs > 0:
        out += correction_pairs(train, int(cfg.correction_pairs * len(train)), cfg.correction_instruction, cfg.seed)
        random.Random(cfg.seed).shuffle(out)
    return out, pairs(held)


def perturb(answer: str, rng: random.Random) -> str:
    """A plausible wrong first attempt: two characters swapped, or one digit changed."""
    chars = list(answer)
    if len(set(chars)) > 1 and rng.random() < 0.5:
        while True:
            i, j = rng.sample(range(len(chars)), 2)
            if chars[i] != chars[j]:
                chars[i], chars[j] = chars[j], chars[i]
                return "".join(chars)
    i = rng.randrange(len(chars))
    digits = [d for d in "0123456789" if d != chars[i]]
    chars[i] = rng.choice(digits) if chars[i].isdigit() else chars[i] + rng.choice(digits)
    return "".join(chars)


def correction_pairs(records: list[dict], n: int, instruction: str, seed: int) -> list[dict]:
    """Second-turn examples ``x1 + y1 + instruction -> answer``: y1 is the right answer half the
    time (keep it) and a perturbed one otherwise (fix it) - the format of a SCoRe episode's x2."""
    rng = random.Random(seed + 1)
    out = []
    for r in rng.choices(records, k=n) if records else []:
        y1 = r["answer"] if rng.random() < 0.5 else perturb(r["answer"], rng)
        out.append({"prompt": r["prompt"] + y1 + instruction, "completion": r["answer"]})
    return out


# settings a resume may change: they do not change what is trained
_FREE_ON_RESUME = ("steps", "threads", "output_dir", "logging_steps", "save_steps", "keep_checkpoints", "resume")


def _finished_run(cfg: SFTRunConfig, out: Path) -> dict | None:
    """The summary of the finished run in ``out`` when it is this config's; refuses to overwrite another one
    (RL runs start from, and take their KL reference from, the model it wrote)."""
    summary_file, stored = out / "sft_summary.json", out / "sft_config.yaml"
    if not summary_file.is_file():
        return None
    try:
        summary = json.loads(summary_file.read_text())
    except ValueError:  # written in place before: a kill could cut it off
        print(f"warning: {summary_file} is not valid JSON (cut off by a kill while it was written); the run is "
              "continued from its checkpoints and the summary written again", file=sys.stderr, flush=True)
        summary = None
    if summary is not None and summary.get("stopped"):  # an interrupted run: _resume_from continues it
        return None
    diffs = stored_config_diff(SFTRunConfig, load_yaml(stored), cfg, ignore=tuple(k for k in _FREE_ON_RESUME if k != "steps")) \
        if stored.is_file() else [("sft_config.yaml", "missing", "present")]
    if diffs:
        steps = f"{summary.get('steps')} steps" if summary is not None else "its summary cut off"
        raise ConfigError(f"{str(out)!r} holds a finished SFT model ({steps}) trained with other "
                          f"settings ({describe_diff(diffs)}); RL runs may start from it: pick another output_dir, or "
                          "delete that directory to train it again")
    return summary


_CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # TRL's checkpoint directories in output_dir/trl
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")


def _complete(ckpt: Path, step: int) -> bool:
    """Whether a resume can load ``ckpt``: the Trainer writes ``trainer_state.json`` (not atomically) after
    the weights, optimizer, scheduler and RNG state, so a checkpoint killed mid-write lacks it or holds a
    cut-off one; the files it needs are checked too (a missing optimizer.pt would resume with a fresh one)."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(state, dict) and state.get("global_step") == step
            and any((ckpt / f).is_file() for f in _WEIGHTS)
            and all((ckpt / f).is_file() for f in ("optimizer.pt", "scheduler.pt"))
            and any(ckpt.glob("rng_state*.pth")))


def _set_aside(ckpt: Path) -> Path:
    """Rename an incomplete checkpoint out of TRL's way, keeping its files: ``incomplete-checkpoint-N``
    (a ``checkpoint-N.*`` name would still be listed, and deleted, by TRL's checkpoint rotation)."""
    dest, n = ckpt.with_name(f"incomplete-{ckpt.name}"), 1
    while dest.exists():
        dest, n = ckpt.with_name(f"incomplete-{ckpt.name}.{n}"), n + 1
    ckpt.rename(dest)
    return dest


def _resume_from(cfg: SFTRunConfig, out: Path) -> tuple[str | None, int]:
    """The TRL checkpoint to continue from and its step (None, 0: a fresh run); refuses what it cannot honour.
    Newer checkpoints a kill left incomplete are renamed (see :func:`_set_aside`), with a warning."""
    trl = out / "trl"
    found = sorted((int(m.group(1)), p) for p in (trl.iterdir() if trl.is_dir() else ())
                   if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name)))
    if not found:
        return None, 0
    if not cfg.resume:
        raise ConfigError(f"resume=false: {str(trl)!r} holds checkpoints of an earlier run; pick another "
                          "output_dir for a new run (or delete that directory), or resume it with resume=true")
    while found and not _complete(found[-1][1], found[-1][0]):
        step, path = found.pop()
        kept = _set_aside(path)
        then = f"resuming from {found[-1][1]}" if found else "no complete checkpoint is left: training starts at step 0"
        print(f"warning: {path} is incomplete (no readable trainer_state.json for step {step}, or files missing: the "
              f"run was killed while writing it); renamed to {kept.name}, {then}", file=sys.stderr, flush=True)
    if not found:
        return None, 0
    done, last = found[-1][0], str(found[-1][1])
    if done > cfg.steps:
        raise ConfigError(f"steps={cfg.steps} is below the step of {last} ({done}); set steps >= {done}, or start "
                          "a new run in another output_dir")
    stored = out / "sft_config.yaml"
    if stored.is_file():
        diffs = stored_config_diff(SFTRunConfig, load_yaml(stored), cfg, ignore=_FREE_ON_RESUME)
        if diffs:
            raise ConfigError(f"{last} was trained with different settings: {describe_diff(diffs)}. A resume continues "
                              f"that run; use its values ({stored}) or start a new run in another output_dir")
    return last, done


def _stop_callback(stop):
    from transformers import TrainerCallback

    class StopCallback(TrainerCallback):
        """After the step in which a stop was requested: save a checkpoint and end training."""

        def on_step_end(self, args, state, control, **kwargs):
            if stop.requested and state.global_step < state.max_steps:
                control.should_save = True
                control.should_training_stop = True

    return StopCallback()


def run_sft(cfg: SFTRunConfig, callbacks: tuple = ()) -> dict:
    """Train (or resume) and save; returns a summary (also ``output_dir/sft_summary.json``).
    ``callbacks``: extra ``transformers.TrainerCallback``s. After SIGTERM / Ctrl-C the summary has
    ``"stopped"`` (the signal) and the checkpoint; the model is not exported until the run completes.
    One process per ``output_dir`` (:class:`~alignreg.runlock.RunLock`)."""
    from alignreg.runlock import RunLock

    with RunLock(cfg.output_dir, key="output_dir"):
        return _run_sft(cfg, callbacks)


def _run_sft(cfg: SFTRunConfig, callbacks: tuple) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from alignreg.models import load_policy

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    done = _finished_run(cfg, out)
    if done is not None:
        print(f"sft: {out} already holds this run, finished ({done['steps']} steps); nothing to do", flush=True)
        return done
    last, step = _resume_from(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "sft_config.yaml")
    if last is not None and step == cfg.steps:
        return _export_final_checkpoint(cfg, out, last)
    model, tokenizer = load_policy(cfg.model, cfg.seed)
    train, held = sft_records(cfg, tokenizer)
    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig

        from alignreg.learner.lora import check_target_modules

        lc = cfg.lora
        check_target_modules(model, lc, head_ok=True)
        peft_config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                                 bias="none", task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(out / "trl"), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps,
        logging_steps=cfg.logging_steps, report_to=[], seed=cfg.seed, data_seed=cfg.seed,
        save_strategy="steps" if cfg.save_steps > 0 else "no", save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.keep_checkpoints or None,
        use_cpu=not torch.cuda.is_available(), bf16=cfg.bf16, completion_only_loss=True, max_length=cfg.max_length,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    with GracefulStop() as stop:
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train), processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[_stop_callback(stop), *callbacks])
        if last is not None:
            print(f"sft: resuming from {last}", flush=True)
        result = trainer.train(resume_from_checkpoint=last)
    if stop.requested and trainer.state.global_step < cfg.steps:
        step = int(trainer.state.global_step)
        summary = {"output_dir": str(out), "steps": step, "stopped": stop.name,
                   "checkpoint": str(out / "trl" / f"checkpoint-{step}")}
        _write_summary(out, summary)
        return summary
    return _export(cfg, out, trainer.model, tokenizer, int(result.global_step), float(result.training_loss),
                   trainer.state.log_history, len(train))


def _export(cfg: SFTRunConfig, out: Path, trained, tokenizer, steps: int, train_loss: float | None,
            log_history: list[dict], train_records: int) -> dict:
    """Write the trained model (LoRA: the adapter, then the merged weights) and the summary, last."""
    if cfg.lora.enabled:
        trained.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        trained = trained.merge_and_unload()
    trained.save_pretrained(out)
    tokenizer.save_pretrained(out)
    losses = [h["loss"] for h in log_history if "loss" in h]
    summary = {"output_dir": str(out), "steps": steps, "train_loss": train_loss,
               "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "train_records": train_records, "lora": cfg.lora.enabled}
    _write_summary(out, summary)
    return summary


def _write_summary(out: Path, summary: dict) -> None:
    """``sft_summary.json``, replaced whole: a kill mid-write leaves the previous one, never a cut-off one."""
    tmp = out / "sft_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "sft_summary.json")


def _export_final_checkpoint(cfg: SFTRunConfig, out: Path, last: str) -> dict:
    """A run killed after its final checkpoint (while exporting): export that checkpoint. Handing it to
    ``trainer.train`` would train one step past ``steps``. ``train_loss`` is None: the mean over the
    run's steps is not in the checkpoint (its logged losses are)."""
    from alignreg.models import load_policy

    print(f"sft: {last} is the final step ({cfg.steps}); exporting it, nothing to train", flush=True)
    if cfg.lora.enabled:
        from peft import PeftModel

        base, tokenizer = load_policy(cfg.model, cfg.seed)
        trained = PeftModel.from_pretrained(base, last)
    else:
        trained, tokenizer = load_policy(cfg.model, cfg.seed, saved=last)
    state = json.loads((Path(last) / "trainer_state.json").read_text())  # read by _complete already
    train, _ = sft_records(cfg, tokenizer)
    return _export(cfg, out, trained, tokenizer, cfg.steps, None, state.get("log_history", []), len(train))


def sft_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignreg sft", description="supervised warm start (TRL SFTTrainer) before RL")
    p.add_argument("config", help="YAML file (configs/sft/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=200")
    args = p.parse_args(argv)
    cfg = load_config(SFTRunConfig, args.config, args.overrides)
    summary = run_sft(cfg)
    if summary.get("stopped"):
        print(f"sft: {summary['stopped']}: checkpoint written at step {summary['steps']} of {cfg.steps} "
              f"({summary['checkpoint']}); run the same command again to resume")
        return exit_code(summary["stopped"])
    print(f"sft: {summary['steps']} steps, loss {summary['loss_first']} -> {summary['loss_last']} (logged every "
          f"{cfg.logging_steps} steps; mean {summary.get('train_loss')}); "
          f"checkpoint: {summary['output_dir']} (alignreg rl CONFIG model.path={summary['output_dir']})")
    return 0
