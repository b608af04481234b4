"""The learner's batch: prompts left-padded, responses right-padded, so response token ``j`` of
every row sits at column ``P + j`` and is predicted by the hidden state at column ``P + j - 1``."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class TrainBatch:
    input_ids: Tensor  # [N, P + R] long
    attention_mask: Tensor  # [N, P + R] long
    position_ids: Tensor  # [N, P + R] long (left padding aware)
    response_ids: Tensor  # [N, R] long (pad where mask is 0)
    mask: Tensor  # [N, R] float {0, 1}: valid response tokens
    advantages: Tensor  # [N, R] float
    rollout_logprobs: Tensor  # [N, R] float: log-probs reported by the rollout engine
    rewards: Tensor  # [N] float (after shaping)
    group_index: Tensor  # [N] long: prompt group of each response
    prompt_len: int  # P

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_len(self) -> int:
        return self.response_ids.shape[1]

    def to(self, device: torch.device | str) -> "TrainBatch":
        """The batch on ``device`` (the learner's: the driver builds batches on the host)."""
        if self.input_ids.device == torch.device(device):
            return self
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return TrainBatch(**{k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in kw.items()})

    def rows(self, idx: slice | Tensor) -> "TrainBatch":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return TrainBatch(**{k: (v[idx] if isinstance(v, Tensor) else v) for k, v in kw.items()})


def collate(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    rollout_logprobs: list[list[float]],
    rewards: Tensor,
    advantages: Tensor,
    group_index: list[int],
    pad_id: int,
) -> TrainBatch:
    n = len(response_ids)
    P = max(len(p) for p in prompt_ids)
    R = max(1, max(len(r) for r in response_ids))
    ids = torch.full((n, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((n, P + R), dtype=torch.long)
    resp = torch.full((n, R), pad_id, dtype=torch.long)
    mask = torch.zeros((n, R))
    lps = torch.zeros((n, R))
    for i, (p, r, lp) in enumerate(zip(prompt_ids, response_ids, rollout_logprobs)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if r:
            ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, P:P + len(r)] = 1
            resp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1.0
            lps[i, : len(r)] = torch.tensor(lp, dtype=torch.float32)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return TrainBatch(
        input_ids=ids,
        attention_mask=attn,
        position_ids=pos,
        response_ids=resp,
        mask=mask,
        advantages=advantages.float()[:, None].expand(n, R) * mask,
        rollout_logprobs=lps,
        rewards=rewards.float(),
        group_index=torch.tensor(group_index, dtype=torch.long),
        prompt_len=P,
    )
