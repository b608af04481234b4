"""GSM8K and MATH prompts from local files (HF ``datasets``, no hub), templates, mixtures, filtering.

Formats (``math_data.sources[i].format``), as in the public releases:

* ``gsm8k``  ``{"question": str, "answer": "<reasoning> #### 72"}`` (openai/gsm8k ``main``)
* ``math``   ``{"problem": str, "solution": "... \\boxed{\\frac{1}{2}} ...", "level", "type"}``
             (hendrycks MATH, MATH-500); a record with an ``answer`` field uses it as the gold
* ``prompt_answer``  ``{"prompt": str, "answer": str}``

Files are ``.jsonl`` / ``.json`` / ``.parquet`` (or a directory of files of one kind) read with
``datasets.load_dataset(<builder>, data_files=...)``, or a ``Dataset.save_to_disk`` directory
(``state.json`` + ``*.arrow``; of a saved ``DatasetDict``, one split's directory) read with
``datasets.load_from_disk`` (local files only; nothing is downloaded). Each record becomes ``{"prompt",
"answer", "question", "source"}`` where ``answer`` is the extracted gold answer (``72``,
``\\frac{1}{2}``) that the ``math_verify`` reward checks against.

Templates: ``boxed`` (Qwen2.5-Math style: "Please reason step by step, and put your final answer
within \\boxed{}."), ``gsm8k`` (answer after ``####``), ``plain`` (the question), or any string
with ``{question}``, which is replaced by the question (nothing else is substituted: braces such as
``\\boxed{}`` are written as they are, not escaped as ``{{}}``). With ``chat_template: true`` the templated question is one user turn
rendered by the tokenizer's chat template with the generation prompt. ``max_prompt_tokens`` drops
longer prompts (counted after templating, with the tokenizer's special tokens).

Mixtures: the training set (``task.train_size`` records, 0 = all left after the eval split) draws
``weight_i / sum(weights)`` of its records from source ``i`` (without replacement, capped at the
source's size; seeded). Tasks ``gsm8k`` / ``math`` (one file at
``task.path``) and ``math_mixture`` (``math_data.sources``) are registered in :data:`TASKS`; the
tokenizer-aware path (chat template, length filter) is :func:`math_prompt_dataset`.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

from alignreg.config import ConfigError, DataSource, MathDataConfig, RLConfig, TaskConfig
from alignreg.data.synthetic import TASKS
from alignreg.rewards.math import extract_answer
import alignreg.rewards.math  # noqa: F401  (registers the math_verify rewards)

TEMPLATES = {
    "boxed": "{question}\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "gsm8k": "{question}\nSolve step by step and give the final answer after '####'.",
    "plain": "{question}",
}
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def read_records(path: str | Path) -> list[dict]:
    """Rows of a local jsonl / json / parquet file (or a directory of them) via ``datasets``, or of a
    ``Dataset.save_to_disk`` directory (``state.json`` + ``*.arrow``) via ``datasets.load_from_disk``."""
    path = Path(path)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise ConfigError(f"math_data: {str(path)!r} is a saved DatasetDict; point to one split's directory "
                          f"({', '.join(str(path / s) for s in splits) or 'none found'})")
    if path.is_dir() and (path / "state.json").is_file() and any(path.glob("*.arrow")):
        import datasets

        return [dict(r) for r in datasets.load_from_disk(str(path))]
    files = sorted(p for p in path.iterdir() if p.suffix in _BUILDERS) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"math_data: {str(path)!r} is not a .jsonl/.json/.parquet file or a directory of them")
    kinds = {_BUILDERS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(f"math_data: {str(path)!r}: expected files ending in .jsonl, .json or .parquet (one kind)")
    import datasets

    try:
        ds = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    except Exception as e:  # noqa: BLE001 - datasets reports a broken line as "An error occurred while generating the dataset"
        raise ConfigError(f"math_data: cannot read {str(path)!r}: {_read_error(files, e)}; fix or remove it") from e
    return [dict(r) for r in ds]


def _read_error(files: list[Path], err: Exception) -> str:
    """Where a file that ``datasets`` could not load is broken: the first line of a .jsonl file that is not
    JSON (file:line), else the error under datasets' own."""
    import json

    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    try:
                        if line.strip():
                            json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"{f}:{n} is not valid JSON ({e.msg} at column {e.colno})"
    cause = err.__cause__ or err.__context__ or err
    return f"{type(cause).__name__}: {cause}"


def to_record(row: dict, fmt: str, where: str) -> dict:
    """``{"question", "answer", "solution"}`` of one row in format ``fmt``."""
    keys = {"gsm8k": ("question", "answer"), "math": ("problem", "solution"), "prompt_answer": ("prompt", "answer")}[fmt]
    bad = [f"{k!r} is missing" if k not in row else f"{k!r} is {type(row[k]).__name__} {row[k]!r:.40}"
           for k in keys if not isinstance(row.get(k), str)]
    if bad:
        raise ConfigError(f"{where}: a {fmt} record needs string fields {keys}: {', '.join(bad)} (keys {sorted(row)})")
    q, sol = row[keys[0]], row[keys[1]]
    if fmt == "prompt_answer":
        gold = sol
    elif fmt == "math" and isinstance(row.get("answer"), str) and row["answer"].strip():
        gold = row["answer"]
    else:
        gold = extract_answer(sol)  # not gold_answer: its fallback, the whole worked solution, is no gold answer
        if gold is None:
            where_ans = "a '#### <answer>' last line" if fmt == "gsm8k" else "a \\boxed{<answer>} (or a non-empty 'answer' field)"
            raise ConfigError(f"{where}: no final answer in the {keys[1]!r} field: a {fmt} record needs {where_ans}; "
                              f"got {sol[-80:]!r}. Fix or remove the record")
    if not gold.strip():
        raise ConfigError(f"{where}: the gold answer is empty; fix or remove the record")
    return {"question": q, "answer": gold, "solution": sol}


def load_source(src: DataSource) -> list[dict]:
    rows = read_records(src.path)
    recs = [dict(to_record(r, src.format, f"{src.path} row {i}"), source=src.format) for i, r in enumerate(rows)]
    return recs[: src.max_records] if src.max_records > 0 else recs


def apply_template(question: str, template: str) -> str:
    """``template`` (a name in :data:`TEMPLATES` or a string) with ``{question}`` replaced by the question;
    every other character, braces included (``\\boxed{}``), is kept as written."""
    text = TEMPLATES.get(template, template)
    if "{question}" not in text:
        raise ConfigError(f"math_data.template: {template!r} is neither one of {sorted(TEMPLATES)} nor a string with {{question}}")
    return text.replace("{question}", question)


def render_prompt(question: str, cfg: MathDataConfig, tokenizer=None) -> str:
    text = apply_template(question, cfg.template)
    if not cfg.chat_template:
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("math_data.chat_template: true needs a tokenizer with a chat template")
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def mix(sources: list[list[dict]], weights: list[float], total: int, seed: int) -> list[dict]:
    """``total`` records with ``weights`` shares of the sources (seeded, without replacement)."""
    rng = random.Random(seed)
    wsum = sum(weights)
    if wsum <= 0:
        raise ConfigError("math_data.sources: weights must sum to > 0")
    out = []
    for recs, w in zip(sources, weights):
        n = min(len(recs), round(total * w / wsum))
        out += rng.sample(recs, n)
    rng.shuffle(out)
    return out


def _sources(task: TaskConfig, data: MathDataConfig) -> list[DataSource]:
    if data.sources:
        return data.sources
    if task.name not in ("gsm8k", "math"):
        raise ConfigError("task.name math_mixture needs math_data.sources")
    if not task.path:
        raise ConfigError(f"task.path is empty; task {task.name!r} needs a local {task.name} file (.jsonl/.json/.parquet)")
    return [DataSource(format=task.name, path=task.path)]


def build_math_dataset(task: TaskConfig, data: MathDataConfig, tokenizer=None) -> tuple[list[dict], list[dict]]:
    """``(train, eval)`` records with rendered prompts, filtered by prompt length."""
    srcs = _sources(task, data)
    loaded = [load_source(s) for s in srcs]
    if data.eval_path:
        held = load_source(DataSource(format=srcs[0].format, path=data.eval_path))[: task.eval_size]
        pool = loaded
    else:
        rng = random.Random(task.seed)
        pool = [list(r) for r in loaded]
        for r in pool:
            rng.shuffle(r)
        n_eval = [round(task.eval_size * s.weight / sum(x.weight for x in srcs)) for s in srcs]
        held = [rec for r, n in zip(pool, n_eval) for rec in r[:n]]
        pool = [r[n:] for r, n in zip(pool, n_eval)]
    available = sum(len(r) for r in pool)
    train = mix(pool, [s.weight for s in srcs], min(task.train_size, available) if task.train_size > 0 else available, task.seed)

    def finish(recs: list[dict]) -> list[dict]:
        out = [dict(r, prompt=render_prompt(r["question"], data, tokenizer)) for r in recs]
        if data.max_prompt_tokens > 0:
            if tokenizer is None:
                raise ConfigError("math_data.max_prompt_tokens needs the policy tokenizer")
            from alignreg.models import prompt_token_ids

            out = [r for r in out if len(prompt_token_ids(tokenizer, r["prompt"])) <= data.max_prompt_tokens]  # as encoded for generation
        return out

    train, held = finish(train), finish(held)
    from alignreg.data import log_split

    where = ", ".join(s.path for s in srcs) + (f"; eval from {data.eval_path}" if data.eval_path else "")
    log_split(task, len(train), len(held), sum(len(r) for r in loaded), where, 0 < task.train_size < available)
    if not train or not held:
        raise ConfigError(f"task {task.name!r}: {len(train)} train / {len(held)} eval prompts left after loading and "
                          "filtering; check the files, task.eval_size and math_data.max_prompt_tokens")
    return train, held


def math_prompt_dataset(cfg: RLConfig, tokenizer=None) -> Optional[tuple[list[dict], list[dict]]]:
    """The trainer's entry point: ``(train, eval)`` for math tasks, ``None`` for other tasks."""
    if cfg.task.name not in MATH_TASKS:
        return None
    return build_math_dataset(cfg.task, cfg.math_data, tokenizer)


MATH_TASKS = ("gsm8k", "math", "math_mixture")


@TASKS.register("gsm8k")
def gsm8k(cfg: TaskConfig) -> tuple[list[dict], list[dict]]:
    """GSM8K from ``task.path`` with the default template (no chat template, no length filter)."""
    return build_math_dataset(cfg, MathDataConfig(template="gsm8k"))


@TASKS.register("math")
def math(cfg: TaskConfig) -> tuple[list[dict], list[dict]]:
    """MATH from ``task.path`` with the ``boxed`` template (no chat template, no length filter)."""
    return build_math_dataset(cfg, MathDataConfig())


@TASKS.register("math_mixture")
def math_mixture(cfg: TaskConfig) -> tuple[list[dict], list[dict]]:  # pragma: no cover - needs math_data
    raise ConfigError("task.name math_mixture is configured by math_data.sources; it is loaded by math_prompt_dataset")
