"""Supervised warm start: a few next-token steps on (prompt, answer) pairs before RL.

GRPO learns only from groups whose rewards differ; a random-init policy never emits a correct
answer followed by EOS, so every group has reward 0 and there is no signal. A short SFT on the
answer tokens gives a *partly* skilled policy (it knows the format and some answers), which is the
regime where RL and its regularizers are interesting. The loss covers answer tokens and EOS only:
prompts are given, not something the policy has to produce.
"""
from __future__ import annotations

import time

import torch

from alignreg.data import PromptIterator
from alignreg.models import encode_prompts


def _encode(tokenizer, records: list[dict]) -> list[tuple[list[int], int]]:
    """``(prompt + answer + EOS ids, prompt length)`` per record."""
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in records])
    out = []
    for p, r in zip(prompts, records):
        answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        out.append((p + answer + [tokenizer.eos_token_id], len(p)))
    return out


def sft_warm_start(model, tokenizer, records: list[dict], steps: int, lr: float, batch_size: int,
                   seed: int, progress: bool = False) -> dict:
    """Train ``model`` in place for ``steps`` AdamW steps; returns loss and timing metrics.

    Batches come from a :class:`PromptIterator` (seeded epochs), so the result depends only on the
    arguments. Sequences are right-padded; padding and prompt positions get no loss.
    """
    if steps <= 0:
        return {"warmstart/steps": 0}
    encoded = _encode(tokenizer, records)
    index = PromptIterator([{"i": i} for i in range(len(encoded))], batch_size, seed)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    losses, t0 = [], time.perf_counter()
    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="sft warm start")
    for _ in bar:
        batch = [encoded[rec["i"]] for rec in index.next_batch()]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (seq, plen) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, plen : len(seq)] = torch.tensor(seq[plen:])
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    opt.zero_grad(set_to_none=True)  # no gradients left behind (a LoRA run's learner would clip them with its own)
    model.train(was_training)
    tail = losses[-max(1, steps // 10):]
    return {"warmstart/steps": steps, "warmstart/loss_first": losses[0],
            "warmstart/loss_last": sum(tail) / len(tail),
            "warmstart/seconds": time.perf_counter() - t0}
