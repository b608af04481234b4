"""LoRA (PEFT) on the learner: adapters train, the base stays frozen, engines get merged weights.

``apply_lora(model, cfg)`` wraps the policy in a ``peft.PeftModel`` with LoRA adapters on
``cfg.target_modules`` (Hu et al. 2021, "LoRA", arXiv 2106.09685: ``W + (alpha / r) B A``, ``B = 0``
at init, so the wrapped model starts exactly at the base policy). Only adapter parameters have
``requires_grad``; the learner's optimizer (``TorchBackend``) takes just those.

What works unchanged on the wrapped model: ``alignreg.models.lm_head_and_body`` (``get_decoder`` /
``get_output_embeddings`` are forwarded by PEFT to the base model; the decoder's linear layers are
the LoRA layers, so the chunked statistics see the adapted model), ``PolicyLearner``, HF
``generate``.

Reference model: :class:`BaseModelView`, the same model with the adapters switched off (the base
policy LoRA starts from), so a KL-to-reference term costs no second copy of the weights.

Engines: :func:`merged_weights` returns ``W + scale * B A`` under the *base* model's parameter names
(``model.layers.0.self_attn.q_proj.weight``), computed without merging in place (merge/unmerge
cycles accumulate rounding error in W), so an HF or vLLM engine loads them as a full weight
update. Checkpoints: ``model.save_pretrained(dir)`` on the wrapped model writes the adapter only
(``adapter_config.json`` + ``adapter_model.safetensors``) whose ``base_model_name_or_path`` is the
run's ``init_policy`` directory; :func:`load_adapter_policy` loads it back (base + adapter) and
:func:`save_merged` writes a full HF checkpoint for tools that want one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from alignreg.config import LoRAConfig
from alignreg.models import load_tokenizer

_PREFIX = "base_model.model."


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def check_target_modules(model, cfg: LoRAConfig, head_ok: bool = False) -> None:
    """``lora.target_modules`` must name modules of ``model``; other than the output embedding unless
    ``head_ok`` (SFT: TRL's loss runs the adapted forward)."""
    from alignreg.config import ConfigError

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    short = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}  # the names target_modules match
    names = [n for n, _ in model.named_modules()]
    linear = sorted({short[id(m)] for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head})
    unknown = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in names)]  # PEFT's matching
    if unknown:  # PEFT adapts the names it finds and ignores the rest: a typo would leave a layer untrained
        raise ConfigError(f"lora.target_modules: {unknown} name no module of this model; valid: {linear}")
    bad = [] if head_ok else [t for t in cfg.target_modules if t == short.get(id(head), "lm_head") or (tied and t == short.get(id(embed)))]
    if bad:  # the learner's loss reads the output embedding's weight directly (its chunked statistics), not the
        raise ConfigError(  # adapted forward: an adapter there would get no gradient, or (tied) split learner and engines
            f"lora.target_modules: {bad} adapt the output embedding{' (tied to the input embedding)' if tied else ''}, which "
            f"the learner's loss reads as a plain weight; adapt the transformer's linear layers instead (e.g. "
            f"{linear[:7]})")


def apply_lora(model, cfg: LoRAConfig, base_path: Optional[str | Path] = None):
    """Wrap ``model`` with trainable LoRA adapters; all other parameters are frozen."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, cfg)
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    if base_path is not None:  # where the adapter's base weights live (the run's init_policy)
        peft_model.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    return peft_model


class _AdapterFreeDecoder:
    """Calls the PEFT model's decoder with the adapters switched off (the base model's forward)."""

    def __init__(self, peft_model, decoder):
        self._peft, self._decoder = peft_model, decoder

    def __call__(self, *args, **kwargs):
        with self._peft.disable_adapter():
            return self._decoder(*args, **kwargs)

    # what lm_head_and_body reads to run a shared prompt through a key/value cache
    config = property(lambda self: self._decoder.config)
    training = property(lambda self: self._decoder.training)
    gradient_checkpointing = property(lambda self: getattr(self._decoder, "gradient_checkpointing", False))


class BaseModelView:
    """The reference policy of a LoRA run without a second copy of the weights: the learner's own
    model with its adapters switched off (``PeftModel.disable_adapter``), i.e. the frozen base.

    Exposes what the learner reads from a reference (``get_decoder`` / ``get_output_embeddings``,
    see ``alignreg.models.lm_head_and_body``); the reference passes run under ``no_grad``. Valid
    while the lm head is not itself adapted (``lm_head`` not in ``target_modules``, checked by
    :func:`reference_view_ok`). ``learner_model`` is what the learner uses (DeepSpeed ZeRO-3: the
    view that gathers the head weight), ``peft_model`` the PeftModel behind it.
    """

    def __init__(self, peft_model, learner_model=None):
        self._peft = peft_model
        self._model = learner_model if learner_model is not None else peft_model

    def get_decoder(self):
        return _AdapterFreeDecoder(self._peft, self._model.get_decoder())

    def get_output_embeddings(self):
        return self._model.get_output_embeddings()

    def eval(self):  # the learner owns the train/eval mode of the shared modules
        return self

    def parameters(self):  # owns none: nothing to move, freeze or count twice
        return iter(())


def reference_view_ok(cfg: LoRAConfig) -> bool:
    """Whether :class:`BaseModelView` is the exact base policy: no adapter on the lm head."""
    return "lm_head" not in cfg.target_modules


def base_name(name: str) -> str:
    """PEFT parameter name -> base model name (``...q_proj.base_layer.weight`` -> ``...q_proj.weight``)."""
    if name.startswith(_PREFIX):
        name = name[len(_PREFIX):]
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def merged_weights(model) -> list[tuple[str, torch.Tensor]]:
    """Every base parameter with the active adapters folded in, under the base names."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for mname, module in model.named_modules():
        if isinstance(module, LoraLayer):
            delta = None
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    d = module.get_delta_weight(adapter)
                    delta = d if delta is None else delta + d
            if delta is not None:
                deltas[base_name(mname) + ".weight"] = delta
    out = []
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        bn = base_name(name)
        w = p.detach()
        if bn in deltas:
            w = (w + deltas[bn].to(w.dtype))
        out.append((bn, w.clone()))
    return out


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors (what a LoRA checkpoint needs besides the base)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_merged(model, tokenizer, path: str | Path) -> Path:
    """A full HF checkpoint of base + adapters (e.g. for a vLLM build without LoRA support)."""
    path = Path(path)
    merged = model.merge_and_unload() if is_peft(model) else model  # merge_and_unload mutates: caller passes a copy
    merged.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _from_pretrained(path, dtype: torch.dtype, attn_implementation: str | None):
    """An HF causal LM from a local directory in ``dtype`` with that attention kernel (None: transformers' default)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                             attn_implementation=attn_implementation)


def load_adapter_policy(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = "eager"):
    """``(PeftModel, tokenizer)`` from an adapter directory (base from ``base_model_name_or_path``);
    ``attn_implementation`` as for ``from_pretrained`` (None: transformers' default)."""
    import json

    from peft import PeftModel

    path = Path(path)
    base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = _from_pretrained(base, dtype, attn_implementation)
    tok_dir = path if (path / "tokenizer_config.json").is_file() else Path(base)
    return PeftModel.from_pretrained(model, path, is_trainable=True), load_tokenizer(tok_dir)


def load_training_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = "eager"):
    """``(model, tokenizer)`` from an ``alignreg rl`` checkpoint (``<run_dir>/checkpoints/step_N``): the
    run's ``init_policy/`` (architecture, tokenizer) with the checkpoint's learner weights; a LoRA run's
    adapters (the ``lora`` section of the checkpoint's config) are merged into the base weights."""
    from alignreg.checkpoint import checkpoint_config, load_checkpoint
    from alignreg.config import ConfigError, LoRAConfig, from_dict, load_yaml

    path = Path(path)
    run_dir = path.parent.parent
    init = run_dir / "init_policy"
    if not (init / "config.json").is_file():
        raise ConfigError(f"{str(path)!r} is an alignreg rl checkpoint, but its run's {init} (the model's architecture "
                          "and tokenizer) is missing; evaluate the run's final/ directory, or restore init_policy/")
    weights = load_checkpoint(path)["learner"]["model"]
    model = _from_pretrained(init, dtype, attn_implementation)
    if any("lora_" in k for k in weights):
        stored = checkpoint_config(path)
        model = apply_lora(model, from_dict(LoRAConfig, load_yaml(stored).get("lora", {}), path=f"{stored}: lora"))
        model.load_state_dict(weights)
        model = model.merge_and_unload()
    else:
        model.load_state_dict(weights)
    return model.to(dtype), load_tokenizer(init)


def is_training_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "COMPLETE").is_file() and (Path(path) / "state.pt").is_file()


def load_any_policy(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = "eager"):
    """``(model, tokenizer)`` from a full HF checkpoint, a LoRA adapter directory or an ``alignreg rl``
    training checkpoint (``step_N``), with attention ``attn_implementation`` (None: transformers' default;
    ``alignreg eval`` passes the config's ``model.attn_implementation``, so it runs the training kernel)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return load_adapter_policy(path, dtype, attn_implementation)
    if is_training_checkpoint(path):
        return load_training_checkpoint(path, dtype, attn_implementation)
    if not (path / "config.json").is_file():
        from alignreg.config import ConfigError

        raise ConfigError(f"{str(path)!r} is neither an HF checkpoint (config.json), a LoRA adapter (adapter_config.json) "
                          "nor an alignreg rl checkpoint (step_N with COMPLETE and state.pt)")
    model = _from_pretrained(path, dtype, attn_implementation)
    return model, load_tokenizer(path)
