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

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol, runtime_checkable

import torch


def mix_seed(seed: int, key: int) -> int:
    """A seed for stream ``key`` of ``seed``: splitmix64's finaliser over ``(seed, key)``, in [0, 2**62).
    Streams derived this way never line up with nearby seeds (the trainer's per-step seeds are
    consecutive), as ``seed + key`` would: engine 1 at step s would replay engine 0's draws of step s + 1."""
    mask = 2**64 - 1
    z = (seed * 0x9E3779B97F4A7C15 + key * 0xD1B54A32D192ED03) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 2


ENGINE_STREAM = 1 << 40  # mix_seed keys: engine i >= 1 of a Ray rollout group samples its shard from ENGINE_STREAM + i
SECOND_ATTEMPT_STREAM = 1 << 41  # SCoRe's second attempts
LEARNER_STREAM = 1 << 42  # the learner step's dropout, rank r: LEARNER_STREAM + r


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


def response_end(tokens: list[int], stop_ids: Iterable[int]) -> tuple[int, bool]:
    """``(length, finished)`` of a generated row cut after its first stop token (EOS or a
    ``rollout.stop_tokens`` id): the engines keep the stop token and mark the response finished."""
    stops = set(stop_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return i + 1, True
    return len(tokens), False


def tensor_crc(item: tuple[str, torch.Tensor]) -> int:
    """CRC-32 of one tensor's name, dtype, shape and raw bytes (the per-tensor part of :func:`weights_checksum`)."""
    name, t = item
    head = f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}".encode()
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data, zlib.crc32(head))  # zlib releases the GIL on large buffers


def weights_checksum(named_tensors: Iterable[tuple[str, torch.Tensor]], threads: Optional[int] = None) -> float:
    """Byte-exact fingerprint of named tensors: CRC-32 of each tensor's name, dtype, shape and raw
    bytes, then CRC-32 of those per-tensor values in name order (returned as a float, exactly).

    Any changed byte, swapped or renamed tensor, changed dtype or shape changes it (up to the 2^-32
    collision odds of CRC-32). Per-tensor CRCs run on a thread pool (``threads``: default
    ``min(8, cpu_count)``), so it costs about one read of the weights; on this 2-core machine
    ~3.5x a memcpy of the same bytes, vs ~16x for the float64 position-weighted sum it replaced.
    Learner and engine compute it over the same names and dtypes; CUDA tensors are read through a
    host copy (the GPU path's cost: one device->host transfer).
    """
    items = sorted(((n, t) for n, t in named_tensors), key=lambda kv: kv[0])
    workers = threads if threads is not None else min(8, os.cpu_count() or 1)
    if workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(workers) as pool:
            crcs = list(pool.map(tensor_crc, items))
    else:
        crcs = [tensor_crc(kv) for kv in items]
    return checksum_of_crcs(zip((n for n, _ in items), crcs))


def checksum_of_crcs(named_crcs: Iterable[tuple[str, int]]) -> float:
    """:func:`weights_checksum` from per-tensor CRCs (``tensor_crc``) computed in any order, e.g. as the
    tensors of a streamed sync arrive."""
    crcs = [c for _, c in sorted(named_crcs, key=lambda nc: nc[0])]
    return float(zlib.crc32(struct.pack(f"<{len(crcs)}I", *crcs)))

