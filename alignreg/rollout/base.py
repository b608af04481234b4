"""The rollout-engine seam: sampling parameters, the batch an engine returns, and its protocol.

Engines (HF ``generate`` here, vLLM elsewhere) take prompts as token ids and return responses as
token ids with the *sampling* log-probability of every response token. Those log-probs are
``log_softmax(logits / temperature)`` over the FULL vocabulary at the sampled token, even when
top-p / top-k truncated the distribution that the token was actually drawn from. That is the
quantity the learner recomputes (it applies the same temperature, never the truncation), so the
rollout/learner mismatch that truncated importance sampling corrects (``algorithm.tis_cap``) is only
numerical and policy-lag drift, not a systematic bias from truncation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol, runtime_checkable

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # logits are divided by this before sampling and before log-probs
    top_p: float = 1.0  # nucleus sampling threshold (1.0 = off)
    top_k: int = 0  # sample among the k most likely tokens (0 = off)
    max_new_tokens: int = 16  # response length cap; an unfinished response has finished=False
    n: int = 1  # responses per prompt (the GRPO group); they are adjacent in the batch
    greedy: bool = False  # argmax decoding (temperature/top-p/top-k do not affect the choice)
    seed: Optional[int] = None  # seed for this call's sampling; None = the global torch RNG


@dataclass
class RolloutBatch:
    """Per-response lists; response ``j`` answers ``prompts[prompt_index[j]]``."""

    prompt_ids: list[list[int]] = field(default_factory=list)  # prompt tokens, no padding
    response_ids: list[list[int]] = field(default_factory=list)  # up to and including EOS if generated
    logprobs: list[list[float]] = field(default_factory=list)  # log_softmax(logits/T)[token], one per response token
    prompt_index: list[int] = field(default_factory=list)  # index into the prompts passed to generate
    finished: list[bool] = field(default_factory=list)  # True when the response ended with EOS

    def __len__(self) -> int:
        return len(self.response_ids)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        """Sample ``sampling.n`` responses per prompt (grouped: prompt 0's n, then prompt 1's...)."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights in place; names are the learner's ``named_parameters``."""
        ...

    def weights_checksum(self) -> float:
        """A cheap fingerprint of the current weights, to verify a weight sync end to end."""
        ...


def weights_checksum(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
    """Sum over tensors of ``sum(w * (1 + position-weight))`` in float64.

    A plain sum would not notice two swapped or permuted tensors; weighting by each tensor's
    name-sorted index and by element position makes such sync bugs visible while staying one pass.
    Learner and engine compute it on the same names, so the values match up to float64 rounding.
    """
    total = 0.0
    for i, (_, t) in enumerate(sorted(named_tensors, key=lambda kv: kv[0])):
        flat = t.detach().reshape(-1).to(torch.float64)
        pos = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device) / max(flat.numel(), 1)
        total += float((flat * (1.0 + pos)).sum()) * (i + 1)
    return total
