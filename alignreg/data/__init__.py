"""Prompt datasets (synthetic tasks or a jsonl file) and a resumable, seeded prompt iterator.

``prompt_dataset(cfg)`` returns ``(train_records, eval_records)`` of ``{"prompt", "answer"}``
dicts. :class:`PromptIterator` walks the train records in a seeded shuffled order, one batch at a
time, and its ``state_dict`` is the exact position (epoch, offset), so a run resumed from a
checkpoint sees the very prompts the uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from alignreg.config import ConfigError, TaskConfig
from alignreg.data.synthetic import TASKS
import alignreg.data.sequences  # noqa: F401,E402  (registers reverse, sort)

__all__ = ["TASKS", "PromptIterator", "load_jsonl", "prompt_dataset"]


def load_jsonl(path: str | Path) -> list[dict]:
    """Read ``{"prompt": str, "answer": str}`` lines; errors name the file and line."""
    if not str(path):
        raise ConfigError("task.path is empty; the jsonl task needs task.path pointing to "
                          "a file of {\"prompt\", \"answer\"} lines")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task.path: {str(path)!r} is not a file; the jsonl task needs "
                          "task.path pointing to {\"prompt\", \"answer\"} lines")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "answer")):
            raise ConfigError(f"{path}:{lineno}: expected an object with string fields "
                              "\"prompt\" and \"answer\"")
        records.append(rec)
    return records


def _jsonl_dataset(cfg: TaskConfig) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle of the file; the first ``eval_size`` records are held out, and the rest
    (all, or at most ``train_size`` when it is > 0) train. Duplicate prompts in the file are the file's business."""
    records = load_jsonl(cfg.path)
    if len(records) <= cfg.eval_size:
        raise ConfigError(f"task.path: {cfg.path} has {len(records)} records, not more than "
                          f"task.eval_size={cfg.eval_size}; lower eval_size or add records")
    random.Random(cfg.seed).shuffle(records)
    train, held = records[cfg.eval_size:][: cfg.train_size or None], records[: cfg.eval_size]
    log_split(cfg, len(train), len(held), len(records), cfg.path, 0 < cfg.train_size < len(records) - cfg.eval_size)
    return train, held


def log_split(cfg: TaskConfig, n_train: int, n_eval: int, n_records: int, where: str, capped: bool) -> None:
    """One start-up line (stderr) for a file task: how many of the file's records train and evaluate."""
    import sys

    cap = f"; task.train_size={cfg.train_size} caps the train set (0: all)" if capped else ""
    print(f"task {cfg.name}: {n_train} train / {n_eval} eval prompts (of {n_records} records in {where}){cap}",
          file=sys.stderr, flush=True)


def check_prompt_lengths(records: list[dict], tokenizer, max_new_tokens: int, limit: int, where: str,
                         added: str = "rollout.max_new_tokens") -> None:
    """Refuse a prompt that cannot fit ``max_new_tokens`` more tokens (``added`` says which) in the
    model's context ``limit`` (vLLM would fail mid-run, and HF would run past the position table)."""
    from alignreg.models import prompt_token_ids

    longest = max((len(prompt_token_ids(tokenizer, r["prompt"])) for r in records), default=0)
    if longest + max_new_tokens > limit:
        raise ConfigError(f"task: the longest prompt has {longest} tokens, and {longest} + {added} "
                          f"({max_new_tokens}) > {limit} ({where}); use shorter prompts, drop long ones "
                          "(math_data.max_prompt_tokens for math tasks), or lower rollout.max_new_tokens")


def check_context(cfg, records: list[dict], tokenizer, model_config, two_attempts: bool = False) -> None:
    """:func:`check_prompt_lengths` with the run's context limit (``vllm.max_model_len``, else the model's
    ``max_position_embeddings``) and response budget (SCoRe: x2 = x1 + y1 + p_sc, then attempt 2; a chat
    template adds a few tokens more)."""
    if cfg.rollout.engine == "vllm" and cfg.vllm.max_model_len > 0:
        limit, where = cfg.vllm.max_model_len, "vllm.max_model_len"
    else:
        limit, where = getattr(model_config, "max_position_embeddings", None), "the model's max_position_embeddings"
    if not limit:
        return
    new, added = cfg.rollout.max_new_tokens, "rollout.max_new_tokens"
    if two_attempts:
        new += len(tokenizer(cfg.score.instruction, add_special_tokens=False)["input_ids"]) + (
            cfg.score.second_max_new_tokens or cfg.rollout.max_new_tokens)
        added = "both attempts and score.instruction"
    check_prompt_lengths(records, tokenizer, new, limit, where, added)


def prompt_dataset(cfg: TaskConfig) -> tuple[list[dict], list[dict]]:
    """``(train_records, eval_records)`` for ``cfg.name``: ``jsonl`` or a registered synthetic task."""
    if cfg.name == "jsonl":
        return _jsonl_dataset(cfg)
    if cfg.name not in TASKS:  # same message as TASKS.get, with jsonl among the choices
        raise ConfigError(f"task.name: unknown task {cfg.name!r}; valid choices: "
                          + ", ".join(sorted([*TASKS.names(), "jsonl"])))
    return TASKS.get(cfg.name)(cfg)


class PromptIterator:
    """Endless seeded stream of prompt batches with an exact, resumable position.

    Epoch ``e`` visits the records in the permutation drawn from ``SeedSequence([seed, e])``, so
    the order depends only on (seed, epoch), never on how many batches were drawn before a restart.
    A batch that crosses an epoch boundary continues into the next epoch's order.
    """

    def __init__(self, records: list[dict], batch_size: int, seed: int):
        if not records:
            raise ValueError("PromptIterator needs at least one record")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.records, self.batch_size, self.seed = records, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def next_batch(self) -> list[dict]:
        batch = []
        while len(batch) < self.batch_size:
            if self.offset == len(self.records):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), len(self.records) - self.offset)
            batch += [self.records[i] for i in self._order[self.offset : self.offset + take]]
            self.offset += take
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def fingerprint(self) -> str:
        """SHA-256 of the records in order (a data file edited in place changes it); computed once."""
        if getattr(self, "_fingerprint", None) is None:
            import hashlib
            import json

            h = hashlib.sha256()
            for r in self.records:
                h.update(json.dumps(r, sort_keys=True, default=str).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "num_records": len(self.records), "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; refuses a checkpoint taken over a different dataset or seed."""
        from alignreg.config import ConfigError

        fix = ("restore the prompt data the run was started with, or start a new run in another trainer.run_dir")
        if state["num_records"] != len(self.records) or state["seed"] != self.seed:
            raise ConfigError(f"the checkpoint's prompt stream is over {state['num_records']} records / seed "
                              f"{state['seed']}, this run's over {len(self.records)} records / seed {self.seed}; {fix}")
        if state.get("fingerprint", self.fingerprint()) != self.fingerprint():  # older checkpoints: count only
            raise ConfigError(f"the training prompts changed since the checkpoint (same {len(self.records)} records, "
                              f"other content: a data file edited in place?); {fix}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)
