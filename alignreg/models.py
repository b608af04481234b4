"""Policy models and tokenizers: a tiny Qwen2 + character tokenizer built in code, or a local HF dir.

Tests and CPU experiments must never touch a model hub, so ``path: tiny-qwen2`` builds both the
tokenizer and the model from code. The tiny model is a real ``Qwen2ForCausalLM`` (not a toy
module) so that the same code paths - HF ``generate``, vLLM loading from a saved directory,
DeepSpeed wrapping - are exercised on CPU as on a GPU with a real checkpoint.

The learner never calls ``model(...)`` for training: full ``[B, T, V]`` logits are what run real
vocabularies out of memory. It takes the body and the lm-head apart with :func:`lm_head_and_body`
and computes logits a chunk of tokens at a time, so a model whose logits are more than
``hidden @ W.T (+ b)`` (Gemma2's soft-capping, Cohere's logit scale) is refused up front
(:func:`check_plain_lm_head`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import transformers
from torch import Tensor

from alignreg.config import ConfigError, ModelConfig

TINY_MODEL = "tiny-qwen2"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# Characters of the synthetic tasks (digits, operators, '=', space) plus enough letters and
# punctuation for short instruction-style jsonl prompts. Anything else maps to <unk>.
CHARS = "0123456789+-*=/ .,:;?!()\n" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Chat messages are concatenated after BOS; the synthetic tasks are raw completions ("3+5="), so a
# template only has to exist for tools (vLLM chat entry points) that insist on one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
)
# Positions beyond prompt + response are never needed by the synthetic tasks; a small table keeps
# the tiny model's parameter count dominated by the layers that learn.
MAX_POSITIONS = 128


AUTOCAST = {"none": None, "bf16": torch.bfloat16}  # learner.mixed_precision -> torch.autocast dtype (None: off)


def autocast(device_type: str, dtype: Optional[torch.dtype]) -> torch.autocast:
    """``torch.autocast`` in ``dtype`` (a value of :data:`AUTOCAST`), or a disabled one for None."""
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level WordLevel tokenizer with <pad>/<bos>/<eos>; BOS is prepended on encode.

    Every character is its own token, so digits of a number are always tokenised the same way,
    wherever they appear (BPE merges would make '12' in a prompt and '12' in an answer differ).
    Decoding concatenates pieces (``Fuse``), otherwise HF would insert spaces between tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S] = any single character including newline; "isolated" keeps each one as a piece.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # generation pads on the left so every prompt ends at the same column
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(cfg: ModelConfig, vocab_size: int, seed: int,
                tokenizer: Optional[transformers.PreTrainedTokenizerBase] = None
                ) -> transformers.Qwen2ForCausalLM:
    """A randomly initialised tiny Qwen2, identical for identical (cfg, vocab_size, seed).

    Initialisation runs under a forked RNG so that building a model (e.g. the reference copy) does
    not shift the global random stream that data order and sampling depend on. Eager attention is
    used because it is deterministic on CPU and supports every mask shape ``generate`` produces.
    """
    tok = tokenizer or build_tokenizer()
    config = transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        use_sliding_window=False,
        attn_implementation=attn_kwargs(cfg)["attn_implementation"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model.to(getattr(torch, cfg.dtype))


# tokenizer_config.json classes that are the tokenizer.json as saved, nothing model-specific
_PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path):
    """The tokenizer saved in ``path``, as saved; its PAD token set to EOS when it has none.

    ``AutoTokenizer`` picks the class from ``config.json``'s ``model_type`` when the directory holds
    a model too, ignoring ``tokenizer_config.json``'s ``tokenizer_class``: next to a Qwen2 model
    :func:`build_tokenizer`'s tokenizer came back as a ``Qwen2Tokenizer`` that splits text its own
    way (spaces dropped), so evaluation and SFT -> RL runs saw other token ids than training. A
    tokenizer saved as a plain ``tokenizer.json`` is therefore loaded as exactly that.
    """
    import json

    path = Path(path)
    cls = transformers.AutoTokenizer
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()).get("tokenizer_class") in _PLAIN_TOKENIZER_CLASSES:
        cls = transformers.PreTrainedTokenizerFast
    tokenizer = cls.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:  # many base models ship without one; batching needs it
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attn_kwargs(cfg: ModelConfig) -> dict:
    """``from_pretrained`` keyword arguments for ``cfg.attn_implementation``, so every process that runs
    the model (one-process learner and HF engine, Ray learner, engine and reference actors) runs the
    same kernel: ``auto`` is eager for ``tiny-qwen2`` and transformers' default (sdpa) for a checkpoint."""
    if cfg.attn_implementation != "auto":
        return {"attn_implementation": cfg.attn_implementation}
    return {"attn_implementation": "eager"} if cfg.path == TINY_MODEL else {}


def load_policy(cfg: ModelConfig, seed: int, saved: Optional[str | Path] = None):
    """Return ``(model, tokenizer)``: built in code for ``tiny-qwen2``, else from a local HF dir.
    ``saved``: a directory this ``cfg``'s model was saved to (a run's ``init_policy/``), loaded instead,
    with the kernels the model of ``cfg`` runs (:func:`attn_kwargs`), so a resumed run
    computes as the uninterrupted one."""
    if cfg.path == TINY_MODEL and saved is None:
        tokenizer = build_tokenizer()
        model = build_model(cfg, len(tokenizer), seed, tokenizer)
    else:
        path = Path(saved if saved is not None else cfg.path)
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise ConfigError(
                f"model.path: {cfg.path!r} is not a local Hugging Face checkpoint directory "
                f"(no config.json); use {TINY_MODEL!r} or a directory saved with save_pretrained"
            )
        tokenizer = load_tokenizer(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=getattr(torch, cfg.dtype), **attn_kwargs(cfg)
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


def process_gpu() -> Optional[torch.device]:
    """The GPU this process works on (``LOCAL_RANK``; 0 for a Ray actor, which sees only its own), or None
    without CUDA: learner backends and the HF engine put their model there."""
    if not torch.cuda.is_available():
        return None
    import os

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def stop_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """The ids of ``tokens`` (``rollout.stop_tokens``), which end a response as EOS does in both engines
    (each engine adds its EOS). Each entry must be exactly one token of ``tokenizer``."""
    ids = []
    for t in tokens:
        enc = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ConfigError(
                f"rollout.stop_tokens: {t!r} is {len(enc)} tokens of this tokenizer ({enc}), not one; list only "
                "single tokens (a special token such as '<|im_end|>' as the tokenizer writes it), or remove it")
        ids.append(int(enc[0]))
    return ids


def prompt_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of one prompt text, with the tokenizer's own special tokens (BOS for tiny-qwen2),
    except a BOS the text already starts with (a rendered chat template writes its own)."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """:func:`prompt_token_ids` of each prompt text."""
    return [prompt_token_ids(tokenizer, p) for p in prompts]


def lm_head_and_body(model) -> tuple[Callable[..., Tensor], Tensor, Optional[Tensor]]:
    """Split a causal LM into ``(body, lm_head_weight [V, H], lm_head_bias or None)``.

    ``body(input_ids, attention_mask=None, position_ids=None)`` returns the final hidden states
    ``[B, T, H]`` after the final norm (``model.model(...).last_hidden_state``), so that
    ``hidden @ weight.T (+ bias)`` equals the model's logits. ``cache`` (from ``body.new_cache()``)
    is an HF ``DynamicCache`` the call appends its keys/values to, with autograd intact: a second
    call continues the sequences of the first (``alignreg.learner.policy.response_hidden`` runs a
    group's shared prompt once this way). With tied embeddings the weight *is*
    the input embedding, so gradients through it reach the embedding as in ``model(...)``.
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()

    def body(input_ids: Tensor, attention_mask: Optional[Tensor] = None,
             position_ids: Optional[Tensor] = None, cache=None) -> Tensor:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state

    body.new_cache = lambda: transformers.DynamicCache(config=decoder.config)
    # A remote reference (``orchestration.ray_groups.RemoteReference``) runs response_hidden itself.
    body.response_hidden = getattr(decoder, "response_hidden", None)
    # HF drops the cache in training mode under gradient checkpointing (its layers recompute
    # without it), so a prompt pass cannot hand its keys/values on then.
    body.can_cache = lambda: getattr(decoder, "config", None) is not None and not (
        getattr(decoder, "gradient_checkpointing", False) and decoder.training)
    return body, head.weight, getattr(head, "bias", None)


# config attributes of HF models that transform the lm-head output, and their no-op values
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None, 0, 0.0),  # Gemma2/Gemma3: cap * tanh(logits / cap)
    "logit_scale": (None, 1, 1.0),  # Cohere, Cohere2: logits * scale
    "logits_scaling": (None, 1, 1.0),  # Granite: logits / scaling
    "lm_head_multiplier": (None, 1, 1.0),  # FalconH1: logits * multiplier
    "output_multiplier_scale": (None, 1, 1.0),
}


@torch.no_grad()
def check_plain_lm_head(model, tokens: int = 8) -> None:
    """Raise ConfigError unless the model's logits are exactly ``hidden @ W.T (+ b)`` of
    :func:`lm_head_and_body`, the only form the learner (and the parity probe) computes: a final
    transform it did not reproduce would make every learner log-prob wrong while the engine samples
    from the transformed ones. Checked from the config (known attributes, see
    :data:`LOGIT_TRANSFORMS`) and by one forward of ``tokens`` tokens against the split computation
    (a transform no attribute names, e.g. in remote code)."""
    cfgs = [model.config]
    if hasattr(model.config, "get_text_config"):  # a multimodal model's language part
        cfgs.append(model.config.get_text_config(decoder=True))
    name = type(model).__name__
    for c in cfgs:
        for attr, off in LOGIT_TRANSFORMS.items():
            v = getattr(c, attr, None)
            if v not in off:
                raise ConfigError(
                    f"model: {name} transforms its logits ({attr}={v!r} in its config), which the learner does "
                    f"not reproduce (it computes hidden @ lm_head.weight.T itself): its log-probs, ratios and KL "
                    f"terms would be wrong. alignreg trains only models whose logits are the plain lm-head output "
                    f"(e.g. Qwen2, Llama); use such a model")
    was_training = model.training
    model.eval()
    try:
        body, w, b = lm_head_and_body(model)
        ids = torch.arange(min(tokens, w.shape[0]), device=w.device)[None]
        logits = model(input_ids=ids).logits.float()
        h = body(ids)
        # the head's own op (nn.Linear: bias added in the matmul), and a tolerance of a few roundings of the
        # model's dtype: a bf16 matmul then a bias add differ from it by an ulp (0.25 at logits of 40)
        mine = torch.nn.functional.linear(h, w.to(h.dtype), None if b is None else b.to(h.dtype)).float()
    finally:
        model.train(was_training)
    diff = float((logits - mine).abs().max())
    rel = max(1e-3, 4 * torch.finfo(h.dtype).eps)
    if not diff <= rel * (1.0 + float(logits.abs().max())):
        raise ConfigError(
            f"model: {name}'s logits differ from hidden @ lm_head.weight.T (+ bias) by up to {diff:.3g}: its forward "
            f"applies a final transform the learner does not reproduce (it computes the lm head itself), so its "
            f"log-probs would be wrong. alignreg trains only models whose logits are the plain lm-head output "
            f"(e.g. Qwen2, Llama); use such a model")
