"""Rollout engine on Hugging Face ``generate``: the fallback when vLLM is not installed, and the
reference the vLLM engine is tested against.

The engine owns a deep copy of the policy in eval mode, exactly as a vLLM engine owns its own
weights: the learner's optimizer step never changes what the engine samples from until
``load_weights`` is called, so the weight-sync path is exercised even in-process.

RNG choice: with ``SamplingParams.seed`` set, sampling runs under ``torch.random.fork_rng`` seeded
with it, so the call is reproducible on its own and leaves the global RNG untouched. With
``seed=None`` it draws from the global torch RNG; that is also reproducible because the trainer
seeds it and saves/restores it in checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Optional, Sequence

import torch
import transformers

from alignreg.models import autocast
from alignreg.rollout.base import RolloutBatch, SamplingParams, response_end, weights_checksum


def head_outside_autocast(head: torch.nn.Module) -> None:
    """Run ``head`` (the lm head) outside autocast, in its weights' dtype, as the learner's ``token_stats``
    computes logits from the autocast body's hidden states (float32 for float32 weights). Under bf16
    autocast ``generate`` computed bf16 logits, and the sampling log-probs differed from the learner's by
    their rounding. Parameters and their names are unchanged (``load_weights``)."""
    forward = head.forward

    def plain(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return forward(hidden.to(head.weight.dtype))

    head.forward = plain


class HFRolloutEngine:
    """``autocast``: run ``generate`` under ``torch.autocast`` in that dtype (the trainer passes the learner's
    ``learner.mixed_precision``, so rollouts sample from the policy as the learner computes it: the body
    under autocast, the lm head and log-softmax outside it, :func:`head_outside_autocast`); the weights
    stay as loaded. :meth:`logprobs_of` (the parity probe) computes the same way.
    ``shared_prefill``: each prompt's prefill runs once for its ``n`` samples (``_shared_prefill``); False
    lets ``generate`` prefill every sample (``benchmarks/bench_rollout.py`` times both). ``device``: where
    the engine's copy runs (default: where ``model`` is)."""

    def __init__(self, model: torch.nn.Module, tokenizer, autocast: Optional[torch.dtype] = None,
                 shared_prefill: bool = True, stop_ids: Sequence[int] = (), device: Optional[torch.device] = None):
        self.model = copy.deepcopy(model).eval()  # deepcopy keeps tied embeddings tied
        if device is not None:  # the engine's own device (a GPU); weights arriving elsewhere are copied in
            self.model.to(device)
        self.autocast = autocast
        self.shared_prefill = shared_prefill
        self.model.requires_grad_(False)
        if autocast is not None:
            head_outside_autocast(self.model.get_output_embeddings())
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        # what ends a response: EOS and ``rollout.stop_tokens`` (models.stop_token_ids)
        self.stop_ids = list(dict.fromkeys([self.eos_id, *stop_ids]))
        # ``generate`` fills every setting a call leaves unset from the model's ``generation_config`` (a
        # checkpoint's generation_config.json: repetition_penalty, no_repeat_ngram_size, min_new_tokens,
        # bad_words_ids, ...): the engine's copy gets a blank one, so sampling is SamplingParams and nothing else
        self.model.generation_config = transformers.GenerationConfig(
            eos_token_id=self.eos_id, pad_token_id=self.pad_id, bos_token_id=tokenizer.bos_token_id)

    # ------------------------------------------------------------------ generation
    def _generation_config(self, s: SamplingParams) -> transformers.GenerationConfig:
        """Built from ``s`` alone. Every knob is explicit (top_k=0, top_p=1.0, no penalties), and the model's
        own ``generation_config`` is blank (``__init__``): a checkpoint's defaults (often top_k=50, a
        repetition penalty) cannot change what is sampled. Greedy decoding runs one sequence per prompt
        (``generate`` refuses ``num_return_sequences > 1`` without sampling); ``generate`` repeats it."""
        sample = {} if s.greedy else dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)  # greedy: no warper runs
        return transformers.GenerationConfig(
            do_sample=not s.greedy, **sample, repetition_penalty=1.0, no_repeat_ngram_size=0,
            max_new_tokens=s.max_new_tokens, num_return_sequences=1 if s.greedy else s.n,
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            return_dict_in_generate=True, output_logits=True,  # raw logits, before any warper
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        """Sample ``sampling.n`` responses per prompt in one left-padded batch.

        Log-probs are ``log_softmax(raw_logits / temperature)`` at the chosen token (see
        ``rollout/base.py``), also for greedy decoding, where they use ``sampling.temperature``.
        Greedy decoding with ``n > 1`` returns ``n`` identical copies of each prompt's one response, as
        the vLLM engine does.
        """
        if not prompts:
            return RolloutBatch()
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        rng = contextlib.nullcontext()
        if sampling.seed is not None:
            rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with rng:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with autocast(device.type, self.autocast):
                gc = self._generation_config(sampling)
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gc,
                                          **self._shared_prefill(input_ids, attention_mask, gc.num_return_sequences))
        new_tokens = out.sequences[:, width:]  # [B*n, T_new]; finished rows padded with pad_id
        if new_tokens.shape[1] == 0:
            raise RuntimeError("generate produced no tokens; max_new_tokens must be >= 1")
        logits = torch.stack(out.logits, dim=1).float()  # [B*n, T_new, V]
        logp = torch.log_softmax(logits / sampling.temperature, dim=-1)
        token_logp = logp.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        if gc.num_return_sequences != sampling.n:  # greedy: each prompt's one response, n times
            new_tokens = new_tokens.repeat_interleave(sampling.n, 0)
            token_logp = token_logp.repeat_interleave(sampling.n, 0)
        return self._to_batch(prompts, sampling.n, new_tokens.tolist(), token_logp.tolist())

    @torch.no_grad()
    def logprobs_of(self, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0) -> list[float]:
        """Teacher-forced ``log_softmax(logits / T)`` of ``response_ids`` after ``prompt_ids``, computed as
        :meth:`generate` computes its log-probs (the same autocast and float32 head): the parity probe's engine side."""
        device = next(self.model.parameters()).device
        ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=device)
        with autocast(device.type, self.autocast):
            logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        return logp.gather(-1, ids[0, len(prompt_ids):, None])[:, 0].tolist()

    def _shared_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> dict:
        """The prompts' key/value cache, computed once per prompt and repeated for its ``n`` samples.

        ``generate`` repeats each prompt ``n`` times before its prefill; here all but the last prompt
        token run once per prompt (positions as ``generate`` numbers them), the cache rows are repeated
        in ``generate``'s order, and ``generate`` runs only the last prompt token and the new ones on
        top. Same logits up to float rounding, (n - 1) / n less prefill work."""
        if not self.shared_prefill or n < 2 or input_ids.shape[1] < 2:
            return {}
        pos = attention_mask.long().cumsum(-1) - 1
        pos.masked_fill_(attention_mask == 0, 1)
        cache = transformers.DynamicCache(config=self.model.config)
        self.model.get_decoder()(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                                 position_ids=pos[:, :-1], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(n)
        return {"past_key_values": cache}

    def _to_batch(self, prompts, n, tokens, logps) -> RolloutBatch:
        """Cut each response after its first stop token (generate pads finished rows with pad_id)."""
        batch = RolloutBatch()
        for row, (toks, lps) in enumerate(zip(tokens, logps)):
            end, finished = response_end(toks, self.stop_ids)
            batch.prompt_index.append(row // n)  # generate expands prompts with repeat_interleave
            batch.prompt_ids.append(list(prompts[row // n]))
            batch.response_ids.append(toks[:end])
            batch.logprobs.append(lps[:end])
            batch.finished.append(finished)
        return batch

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors in place by name; strict, and checked in full before anything is copied.

        Accepted names are the model's parameter names including aliases of tied weights
        (``lm_head.weight`` when tied to ``model.embed_tokens.weight``); every parameter must be
        covered once. Tensors are only referenced until the copy, so no second model is held.
        """
        params = dict(self.model.named_parameters(remove_duplicate=False))
        incoming = dict(named_tensors)
        unknown = sorted(set(incoming) - set(params))
        if unknown:
            raise KeyError(f"load_weights: unknown parameter names {unknown[:5]}"
                           f"{' ...' if len(unknown) > 5 else ''}")
        covered = {id(params[name]) for name in incoming}
        missing = [name for name, p in self.model.named_parameters() if id(p) not in covered]
        if missing:
            raise KeyError(f"load_weights: missing parameters {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")
        for name, tensor in incoming.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"load_weights: {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(params[name].shape)}")
        for name, tensor in incoming.items():
            params[name].copy_(tensor)  # casts dtype/device (e.g. bf16 learner -> fp32 engine)

    def weights_checksum(self) -> float:
        return weights_checksum(self.model.named_parameters())
