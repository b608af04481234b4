"""The policy learner: loss assembly (policy loss + regularizers) over micro-batches.

One training step:
1. a no-grad pass over the whole batch with the weights at the start of the step (pi_old) computes
   what the active terms need from pi_old (old log-probs when updates are off-policy, Lp-Reg's min-p
   proxy, SIREN's anchor entropies, hidden states for GRPO-Guard's KL) and from the reference model;
2. step-level hooks run (SIREN measures its anchor on the step-1 batch);
3. for each mini-batch: an optional no-grad prepass for global-scope terms, then per micro-batch:
   hidden states -> chunked statistics -> ratio transform -> token terms -> policy loss ->
   backward; then one optimizer step.

Losses use the mini-batch's global normalisers (:class:`AggNorm`), so the gradient is the same for
any micro-batch size and, with gradients summed over ranks, any data-parallel split.
The backend (plain torch here; DeepSpeed in ``learner/deepspeed.py``) only owns parameters,
backward, optimizer step and collectives: see :class:`TorchBackend`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections import defaultdict
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from alignreg.config import RLConfig
from alignreg.losses.aggregate import aggregate
from alignreg.losses.policy import clipped_pg_loss
from alignreg.losses.stats import Precomputed, StatsSpec, auto_chunk_size, token_stats, token_stats_forward
from alignreg.learner.batch import TrainBatch, collate
from alignreg.models import AUTOCAST, autocast as autocast_ctx, lm_head_and_body, process_gpu
from alignreg.regularizers.base import AggNorm, LossContext, RegularizerSet, StepView
from alignreg.rollout.base import LEARNER_STREAM, mix_seed


lm_parts = lm_head_and_body  # (body -> final-normed hidden states, lm-head weight [V, H], bias or None)


def response_hidden(body, batch: TrainBatch, autocast: Optional[torch.dtype] = None,
                    share_prompt: bool = False, agree: Optional[Callable[[bool], bool]] = None) -> Tensor:
    """Hidden states that predict each response token: [N, R, H]. ``autocast``: run the body under
    ``torch.autocast`` in that dtype (``learner.mixed_precision``); the weights stay as they are.
    ``share_prompt`` (``learner.share_prompt``): rows with the same prompt run it once, see
    :func:`shared_prompt_hidden` (and its ``agree``); the same values up to float rounding, and the
    same gradients."""
    remote = getattr(body, "response_hidden", None)
    if remote is not None:  # a reference model in its own Ray actor
        return remote(batch, autocast, share_prompt)
    with autocast_ctx(batch.input_ids.device.type, autocast):
        if share_prompt and getattr(body, "can_cache", lambda: False)():
            h = shared_prompt_hidden(body, batch, agree)
            if h is not None:
                return h
        h = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    P, R = batch.prompt_len, batch.response_len
    return h[:, P - 1 : P - 1 + R]


@torch.no_grad()
def sequence_logprobs(model, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0,
                      autocast: Optional[torch.dtype] = None) -> list[float]:
    """Teacher-forced log-probs of ``response_ids`` after ``prompt_ids`` computed as the loss computes them:
    a one-row :func:`~alignreg.learner.batch.collate` batch, :func:`response_hidden` (the body under
    ``autocast``) and :func:`token_stats` at ``temperature`` (the lm head outside autocast, in float32
    for float32 weights). The parity probe's learner side (``PolicyLearner.sequence_logprobs``)."""
    body, w, b = lm_parts(model)
    batch = collate([list(prompt_ids)], [list(response_ids)], [[0.0] * len(response_ids)], torch.zeros(1),
                    torch.zeros(1), [0], pad_id=0).to(w.device)
    h = response_hidden(body, batch, autocast)
    return token_stats(h[0], w, batch.response_ids[0], StatsSpec(temperature=temperature), bias=b)["logprobs"].tolist()


def shared_prompt_hidden(body, batch: TrainBatch, agree: Optional[Callable[[bool], bool]] = None) -> Optional[Tensor]:
    """:func:`response_hidden` with each distinct prompt of the batch run once: a GRPO group's G
    responses share their prompt, whose hidden states and keys/values do not depend on the response
    (causal attention). The distinct prompts (equal ids and padding) run first, filling a key/value
    cache; the cache rows are then gathered per response and the responses run on top of it. Autograd
    sums each prompt's gradient over its responses through the gather, so the gradient equals the
    full pass's. Saves (G - 1) / G of the prompt tokens' forward and backward. None when no two rows
    share a prompt (then the plain pass is as cheap).

    ``agree``: whether any data-parallel rank shares a prompt (called once on every rank). Under ZeRO-3
    each decoder call gathers the partitioned weights collectively, so all ranks must make the same
    number of calls: a rank without a shared prompt then runs the two calls too (same values)."""
    P, R, n = batch.prompt_len, batch.response_len, batch.input_ids.shape[0]
    key = torch.cat([batch.input_ids[:, :P], batch.attention_mask[:, :P]], 1)
    _, inv = torch.unique(key, dim=0, return_inverse=True)
    groups = int(inv.max()) + 1
    shared = groups < n
    if agree is not None:
        shared = agree(shared)
    if not shared:
        return None
    first = torch.full((groups,), n, dtype=torch.long, device=inv.device)
    first.scatter_reduce_(0, inv, torch.arange(n, device=inv.device), reduce="amin")  # one row per prompt
    cache = body.new_cache()
    hp = body(input_ids=batch.input_ids[first, :P], attention_mask=batch.attention_mask[first, :P],
              position_ids=batch.position_ids[first, :P], cache=cache)
    last = hp[inv, P - 1 : P]  # predicts response token 0
    if R == 1:
        return last
    cache.batch_select_indices(inv)  # [groups, ...] -> [n, ...], differentiable indexing
    hr = body(input_ids=batch.input_ids[:, P : P + R - 1], attention_mask=batch.attention_mask[:, : P + R - 1],
              position_ids=batch.position_ids[:, P : P + R - 1], cache=cache)
    return torch.cat([last, hr], 1)


def fingerprint(flat: Tensor) -> Tensor:
    """Two float64 sums per token of its hidden state (plain and position-weighted): equal hidden
    states give equal fingerprints; any change of a value or its position changes them."""
    x = flat.detach().double()
    ramp = torch.arange(1, x.shape[-1] + 1, dtype=torch.float64, device=x.device)
    return torch.stack([x.sum(-1), (x * ramp).sum(-1)], -1)


def scatter_rows(flat: Tensor, valid: Tensor) -> Tensor:
    """Put per-valid-token values back into a [N, R] tensor (zeros elsewhere), keeping autograd."""
    out = flat.new_zeros(valid.shape)
    return out.masked_scatter(valid, flat)


def warmup_scheduler(optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear learning-rate warmup over ``warmup_steps`` optimizer steps, then constant."""
    warm = max(warmup_steps, 0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)


def apply_optimizer_settings(param_groups, scheduler, lc) -> None:
    """After a resume: the config's lr, betas and weight decay, not the checkpoint's (its
    ``param_groups`` and the scheduler's ``base_lrs`` hold the settings of the run that wrote it);
    the warmup continues from the restored step count with the config's ``warmup_steps``."""
    scheduler.base_lrs = [lc.lr] * len(scheduler.base_lrs)
    lrs = [lc.lr * f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for g, lr in zip(param_groups, lrs):
        g.update(lr=lr, initial_lr=lc.lr, betas=tuple(lc.betas), weight_decay=lc.weight_decay)
    scheduler._last_lr = lrs


class DistCollectives:
    # Collectives: identity in one process; plain torch.distributed (gloo on CPU, nccl on GPU) when
    # a process group is initialised (Ray learner actors set MASTER_ADDR/RANK/WORLD_SIZE). Results
    # come back on the input's device; NCCL only takes CUDA tensors, so host tensors (counts the
    # learner builds from floats) travel through the current CUDA device there.
    @property
    def world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    # whether a forward pass is itself collective (ZeRO-3 gathers weights in it): every rank must then
    # make the same decoder calls, whatever its rows (``PolicyLearner`` agrees on the shared-prompt pass)
    collective_forward = False

    @staticmethod
    def _comm_device(t: Tensor) -> torch.device:
        import torch.distributed as dist

        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return t.device

    def gather_objects(self, obj) -> list:
        """``obj`` of every rank, in rank order (picklable Python objects; once per step)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        x = t.to(self._comm_device(t), copy=True)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.to(t.device)

    def all_gather_cat(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        dev = self._comm_device(t)
        n = torch.tensor([t.shape[0]], dtype=torch.long, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        sizes = [int(s.item()) for s in sizes]
        x = t.to(dev)
        padded = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)



class TorchBackend(DistCollectives):
    """Single-process (or plain torch.distributed) parameter owner: AdamW, clipping, collectives."""

    def __init__(self, model: torch.nn.Module, cfg: RLConfig):
        lc = cfg.learner
        if (gpu := process_gpu()) is not None:  # as DeepSpeedBackend: one GPU per rank (Ray: the actor's only visible one)
            model = model.to(gpu)
        self.model = model
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lc.lr, betas=tuple(lc.betas), weight_decay=lc.weight_decay
        )
        self.scheduler = warmup_scheduler(self.optimizer, lc.warmup_steps)
        self.grad_clip, self.lc = lc.grad_clip, lc

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Reduce gradients over ranks, clip, update; returns the pre-clip gradient norm."""
        self.reduce_gradients()
        return self.apply_update()

    def reduce_gradients(self) -> None:
        if self.world_size > 1:  # losses use global normalisers, so rank gradients are summed
            import torch.distributed as dist

            for p in self.model.parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    # an update with a non-finite gradient norm is skipped, not applied (``PolicyLearner`` counts them)
    skips_nonfinite = True

    def apply_update(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]  # the trained ones
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf")))
        if math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()  # the schedule counts applied updates
        else:  # inf/NaN gradients: weights and Adam's moments stay as they are (as veRL's actor does)
            self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        apply_optimizer_settings(self.optimizer.param_groups, self.scheduler, self.lc)


class PolicyLearner:
    def __init__(self, model, cfg: RLConfig, regs: RegularizerSet, ref_model=None, backend=None):
        self.cfg = cfg
        self.model = model
        self.regs = regs
        self.backend = backend or TorchBackend(model, cfg)
        self.device = next(model.parameters()).device  # batches arrive built on the host and move here
        self.needs_ref = regs.needs_reference()
        if self.needs_ref and ref_model is None:
            raise ValueError("the active regularizers need a reference model")
        if self.needs_ref and isinstance(ref_model, torch.nn.Module):  # copied from the policy before it moved to its device
            ref_model = ref_model.to(self.device)
        self.ref_model = ref_model if self.needs_ref else None  # dropped when no term needs it
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        _, w, _ = lm_parts(model)
        self.vocab = w.shape[0]
        self.autocast = AUTOCAST[cfg.learner.mixed_precision]
        self.share_prompt = cfg.learner.share_prompt
        self._pre: dict[tuple[int, int], tuple[Precomputed, Tensor]] = {}  # micro-batch rows -> no-grad pass stats
        self._reuse_counts = {True: 0, False: 0}
        self._nonfinite_run = 0  # consecutive optimizer updates with an inf/NaN gradient norm
        self._agree = self._any_rank if getattr(self.backend, "collective_forward", False) else None

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` of any data-parallel rank (collective: every rank calls it at the same point)."""
        return bool(self.backend.all_reduce_sum(torch.tensor([float(flag)]))[0] > 0)

    # ------------------------------------------------------------------------------------------
    def _specs(self) -> tuple[StatsSpec, StatsSpec, StatsSpec]:
        needs, pre = self.regs.needs(), self.regs.prepass_needs()
        T = self.cfg.rollout.temperature

        def top_p(d, key):
            return (d[key]["p"], d[key]["k"]) if key in d else None

        train = StatsSpec(
            entropy="entropy" in needs,
            top_p=top_p(needs, "top_p_entropy"),
            kl_ref="kl_ref_full" in needs,
            kl_old="kl_old_full" in needs,
            temperature=T,
        )
        old = StatsSpec(
            entropy=self.cfg.learner.log_entropy,  # logged as the policy entropy metric
            top_p=top_p(needs, "old_top_p_entropy"),
            min_p=needs["old_min_p_logprobs"]["kappa"] if "old_min_p_logprobs" in needs else None,
            temperature=T,
        )
        prepass = StatsSpec(top_p=top_p(pre, "top_p_entropy"), temperature=T)
        return train, old, prepass

    def _chunk(self, spec: StatsSpec) -> int:
        return self.cfg.learner.chunk_size or auto_chunk_size(self.vocab, spec)

    def _stats(self, model, batch: TrainBatch, spec: StatsSpec, chunk: int, ref_h=None, old_h=None, ref_model=None,
               pre: Optional[tuple[Precomputed, Tensor]] = None):
        body, w, b = lm_parts(model)
        h = response_hidden(body, batch, self.autocast, self.share_prompt, self._agree)
        valid = batch.mask > 0
        flat = h[valid]
        kw = {}
        if pre is not None and torch.equal(pre[1], fingerprint(flat)):  # valid only for identical hidden states
            kw["precomputed"] = pre[0]
        self._last_reused = "precomputed" in kw
        if spec.kl_ref:
            _, rw, rb = lm_parts(ref_model or self.ref_model)
            kw["ref"] = (ref_h[valid], rw, rb)
        if spec.kl_old:
            kw["old"] = (old_h[valid], self._old_head[0], self._old_head[1])
        out = token_stats(flat, w, batch.response_ids[valid], spec, bias=b, chunk_size=chunk, **kw)
        return {k: scatter_rows(v, valid) for k, v in out.items()}, h

    def _on_policy(self) -> bool:
        lc = self.cfg.learner
        return lc.ppo_epochs == 1 and lc.mini_batch_size in (0, self._batch_rows)

    def _single_pass(self, train: StatsSpec, old: StatsSpec) -> bool:
        """``learner.single_pass``: nothing needs the no-grad pass. On-policy, pi_old = pi_theta,
        so the old log-probs are the loss pass's own (detached) values; this holds unless a term
        reads the reference, pi_old-only statistics (kl_old, min-p, old top-p), a whole-batch
        prepass, or the whole batch at step start (``step_start_reads_batch``: SIREN's anchor step)."""
        return (self.cfg.learner.single_pass and self._on_policy() and not self.needs_ref and not train.kl_old
                and old.top_p is None and old.min_p is None and not self.regs.prepass_needs()
                and not any(t.term.step_start_reads_batch() for t in self.regs))

    def _micro_batches(self, rows: range) -> Iterable[range]:
        mb = self.cfg.learner.micro_batch_size
        for s in range(rows.start, rows.stop, mb):
            yield range(s, min(s + mb, rows.stop))

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _old_pass(self, batch: TrainBatch, train: StatsSpec, old: StatsSpec) -> dict[str, Tensor]:
        """pi_old and reference statistics for the whole batch (no grad)."""
        needs = self.regs.needs()
        out: dict[str, list] = defaultdict(list)
        chunk = self._chunk(train)
        keep_old_h = train.kl_old
        if keep_old_h:
            _, w, b = lm_parts(self.model)
            self._old_head = (w.detach().clone(), None if b is None else b.detach().clone())
        wide = self._reuse_spec(train, old)
        self._pre: dict[tuple[int, int], tuple[Precomputed, Tensor]] = {}
        self.model.eval()
        for r in self._micro_batches(range(len(batch))):
            mb = batch.rows(slice(r.start, r.stop))
            if wide is not None:
                st, h, rh = self._wide_pass(mb, wide, chunk, r)
                out["old_logprobs"].append(st["logprobs"])
                for k, on in (("entropy", old.entropy), ("top_p_entropy", old.top_p is not None), ("min_p_logprobs", old.min_p is not None)):
                    if on:
                        out["old_" + k].append(st[k])
                if keep_old_h:  # pragma: no cover - _reuse_spec excludes kl_old
                    out["old_hidden"].append(h.detach())
                if self.needs_ref:
                    out["ref_logprobs"].append(st["ref_logprobs"])
                    out["ref_hidden"].append(rh.detach())
                continue
            st, h = self._stats(self.model, mb, old, chunk)
            out["old_logprobs"].append(st["logprobs"])
            if old.entropy:
                out["old_entropy"].append(st["entropy"])
            if old.top_p is not None:
                out["old_top_p_entropy"].append(st["top_p_entropy"])
            if old.min_p is not None:
                out["old_min_p_logprobs"].append(st["min_p_logprobs"])
            if keep_old_h:
                out["old_hidden"].append(h.detach())
            if self.needs_ref:
                rst, rh = self._stats(self.ref_model, mb, StatsSpec(temperature=old.temperature), chunk, ref_model=self.ref_model)
                out["ref_logprobs"].append(rst["logprobs"])
                if "kl_ref_full" in needs:
                    out["ref_hidden"].append(rh.detach())
        self.model.train()
        return {k: torch.cat(v) for k, v in out.items()}

    def _reuse_spec(self, train: StatsSpec, old: StatsSpec) -> Optional[StatsSpec]:
        """The no-grad pass's spec when it can also serve the first update's loss (pi_theta = pi_old
        until the first optimizer step), else None. Only with the full-vocabulary KL if a reference
        is needed at all (then the reference logits of the same pass give its log-probs)."""
        if not self.cfg.learner.reuse_forward or train.kl_old or (self.needs_ref and not train.kl_ref):
            return None
        if old.top_p is not None and train.top_p is not None and old.top_p != train.top_p:
            return None
        return StatsSpec(entropy=train.entropy or old.entropy, top_p=train.top_p or old.top_p, kl_ref=train.kl_ref,
                         min_p=old.min_p, temperature=train.temperature)

    def _wide_pass(self, mb: TrainBatch, spec: StatsSpec, chunk: int, r: range):
        """One no-grad pass for pi_old's and the first update's statistics (and the reference's)."""
        body, w, b = lm_parts(self.model)
        h = response_hidden(body, mb, self.autocast, self.share_prompt, self._agree)
        valid = mb.mask > 0
        flat = h[valid]
        kw, rh = {}, None
        if spec.kl_ref:
            rbody, rw, rb = lm_parts(self.ref_model)
            rh = response_hidden(rbody, mb, self.autocast, self.share_prompt, self._agree)
            kw["ref"] = (rh[valid], rw, rb)
        pre = token_stats_forward(flat, w, mb.response_ids[valid], spec, bias=b, chunk_size=chunk, **kw)
        self._pre[(r.start, r.stop)] = (pre, fingerprint(flat))
        return {k: scatter_rows(v, valid) for k, v in pre.values.items()}, h, rh

    @torch.no_grad()
    def _prepass(self, batch: TrainBatch, rows: range, spec: StatsSpec, chunk: int) -> dict[str, Tensor]:
        out: dict[str, list] = defaultdict(list)
        for r in self._micro_batches(rows):
            st, _ = self._stats(self.model, batch.rows(slice(r.start, r.stop)), spec, chunk)
            for k, v in st.items():
                out[k].append(v)
        return {k: torch.cat(v) for k, v in out.items()}

    def _norm(self, mask: Tensor) -> AggNorm:
        be = self.backend
        counts = be.all_reduce_sum(torch.tensor([float(mask.sum()), float(mask.shape[0])], dtype=torch.float64))
        L = self.cfg.algorithm.norm_len or self.cfg.rollout.max_new_tokens
        return AggNorm(num_tokens=float(counts[0]), num_seqs=float(counts[1]), norm_len=float(L))

    # ------------------------------------------------------------------------------------------
    def train_step(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """One learner step. Its random draws (dropout: ``lora.dropout``, a model's own) come from a
        generator seeded by ``(trainer.seed, step, rank)`` and leave the process's generator as it was:
        the same draws in one process, in a Ray actor and after a resume (no RNG state to checkpoint).
        Not with ``trainer.async_rollout`` in one process: the HF engine samples on its thread from the
        same process-wide generator (``transformers.generate`` takes none of its own), so reseeding it
        here would move that thread's draws; there the learner draws from the stream as it is (and the
        config refuses LoRA dropout)."""
        if self.cfg.trainer.async_rollout and self.cfg.orchestration == "local":
            return self._train_step(batch, step)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(mix_seed(self.cfg.trainer.seed * 1_000_003 + step, LEARNER_STREAM + self.backend.rank))
            return self._train_step(batch, step)

    def _train_step(self, batch: TrainBatch, step: int) -> dict[str, float]:
        cfg, be = self.cfg, self.backend
        batch = batch.to(self.device)
        self._batch_rows = len(batch)
        train_spec, old_spec, pre_spec = self._specs()
        metrics: dict[str, float] = {}
        L = float(cfg.algorithm.norm_len or cfg.rollout.max_new_tokens)
        single = self._single_pass(train_spec, old_spec)
        if single:  # no no-grad pass: the loss pass logs the entropy and the rollout log-prob gap
            old, view_stats = {}, {}
            train_spec = dataclasses.replace(train_spec, entropy=train_spec.entropy or old_spec.entropy)
            chunk = self._chunk(train_spec)
            metrics["learner/single_pass"] = 1.0
            view = StepView(batch.mask, batch.advantages, None, {}, step, L, be.all_reduce_sum, be.all_gather_cat)
            for t in self.regs:  # none reads the batch this step (checked above); e.g. SIREN logs its anchor
                for k, v in t.term.on_step_start(view).items():
                    metrics[f"reg/{t.term.id}/{k}"] = v
        else:
            chunk = self._chunk(train_spec)
            old = self._old_pass(batch, train_spec, old_spec)
            view_stats = {k: v for k, v in old.items() if k not in ("old_hidden", "ref_hidden")}
            full_view = StepView(batch.mask, batch.advantages, old["old_logprobs"], view_stats, step, L, be.all_reduce_sum, be.all_gather_cat)
            for t in self.regs:
                for k, v in t.term.on_step_start(full_view).items():
                    metrics[f"reg/{t.term.id}/{k}"] = v
        on_policy = self._on_policy()
        self._reuse_counts = {True: 0, False: 0}
        sums: dict[str, float] = defaultdict(float)  # token-weighted metrics: sum of value x tokens, and tokens
        weights: dict[str, float] = defaultdict(float)
        totals: dict[str, float] = defaultdict(float)
        lrs: list[float] = []
        if not single:  # the no-grad pass's statistics of this rank's rows (summed over ranks below)
            n_tokens = float(batch.mask.sum())
            if "old_entropy" in old:
                sums["policy/entropy"], weights["policy/entropy"] = float((old["old_entropy"] * batch.mask).sum()), n_tokens
            sums["policy/rollout_logprob_diff"] = float(((old["old_logprobs"] - batch.rollout_logprobs).abs() * batch.mask).sum())
            weights["policy/rollout_logprob_diff"] = n_tokens
        updates = skipped = 0

        mb_size = cfg.learner.mini_batch_size or len(batch)
        for epoch in range(cfg.learner.ppo_epochs):
            for start in range(0, len(batch), mb_size):
                rows = range(start, min(start + mb_size, len(batch)))
                norm = self._norm(batch.mask[rows.start : rows.stop])
                prepared = {}
                if self.regs.prepass_needs():
                    cur = self._prepass(batch, rows, pre_spec, chunk)
                    sl = slice(rows.start, rows.stop)
                    view = StepView(batch.mask[sl], batch.advantages[sl], old["old_logprobs"][sl],
                                    {**{k: v[sl] for k, v in view_stats.items()}, **cur}, step, L, be.all_reduce_sum, be.all_gather_cat)
                    prepared = {t.term.id: t.term.prepare_minibatch(view) for t in self.regs if t.term.prepass_needs()}
                be.zero_grad()
                for r in self._micro_batches(rows):
                    loss, m, parts = self._micro_loss(batch, r, rows.start, old, norm, prepared, step, train_spec, chunk, on_policy,
                                                      single_pass_metrics=single)
                    be.backward(loss)
                    w = float(batch.mask[r.start : r.stop].sum())
                    for k, v in m.items():  # token-weighted averages
                        sums[k] += v * w
                        weights[k] += w
                    for k, v in parts.items():  # loss contributions: sum within a mini-batch
                        totals[k] += v
                if hasattr(be, "scheduler"):  # the rate this update uses (the scheduler steps after it)
                    lrs.append(be.scheduler.get_last_lr()[0])
                grad_norm = be.step()
                totals["optim/grad_norm"] += grad_norm
                updates += 1
                skipped += self._nonfinite_update(grad_norm, step)
                self._pre = {}  # the weights changed: the no-grad pass's statistics are stale
        if be.world_size > 1:  # each rank holds its own micro-batches' parts of the losses and averages
            norm_total = totals.pop("optim/grad_norm")  # the same on every rank (reduced gradients)
            gathered = be.gather_objects((dict(sums), dict(weights), dict(totals)))
            sums, weights, totals = defaultdict(float), defaultdict(float), defaultdict(float, {"optim/grad_norm": norm_total})
            for rank_parts in gathered:
                for acc, part in zip((sums, weights, totals), rank_parts):
                    for k, v in part.items():
                        acc[k] += v
        for k in sums:
            metrics[k] = sums[k] / max(weights[k], 1e-12)
        for k in totals:  # mean over optimizer updates
            metrics[k] = totals[k] / updates
        metrics["optim/nonfinite_skipped"] = float(skipped)  # updates of this step skipped for inf/NaN gradients
        metrics["optim/lr"] = sum(lrs) / len(lrs) if lrs else cfg.learner.lr  # mean over this step's updates
        if cfg.learner.reuse_forward and not single:  # fraction of micro-batches whose loss forward came from the no-grad pass
            metrics["learner/forward_reused"] = self._reuse_counts[True] / max(sum(self._reuse_counts.values()), 1)
        return metrics

    def _nonfinite_update(self, grad_norm: float, step: int) -> int:
        """1 when the update just made had an inf/NaN gradient norm (the torch backend skipped it), else 0.
        Raises FloatingPointError when the run cannot go on: more than ``learner.max_nonfinite_updates``
        in a row, or a backend that applied it (DeepSpeed). The trainer then stops before anything is saved."""
        if math.isfinite(grad_norm):
            self._nonfinite_run = 0
            return 0
        self._nonfinite_run += 1
        limit = self.cfg.learner.max_nonfinite_updates
        if not getattr(self.backend, "skips_nonfinite", False):
            why = "the DeepSpeed optimizer applied it instead of skipping it"
        elif self._nonfinite_run > limit:
            why = f"{self._nonfinite_run} updates in a row, more than learner.max_nonfinite_updates={limit}"
        else:
            return 1
        raise FloatingPointError(f"gradient norm {grad_norm} in step {step + 1} ({why}); lower learner.lr, or check "
                                 "the rewards and advantages for inf / NaN")

    def _micro_loss(self, batch, r, mini_start, old, norm, prepared, step, spec, chunk, on_policy, single_pass_metrics=False):
        cfg, alg = self.cfg, self.cfg.algorithm
        sl = slice(r.start, r.stop)
        mb = batch.rows(sl)
        stats, _ = self._stats(
            self.model, mb, spec, chunk,
            ref_h=old["ref_hidden"][sl] if "ref_hidden" in old else None,
            old_h=old["old_hidden"][sl] if "old_hidden" in old else None,
            pre=self._pre.get((r.start, r.stop)),
        )
        self._reuse_counts[self._last_reused] += 1
        logprobs = stats.pop("logprobs")
        for k in ("ref_logprobs", "old_min_p_logprobs", "old_top_p_entropy"):
            if k in old:
                stats[k] = old[k][sl]
        old_lp = logprobs.detach() if on_policy else old["old_logprobs"][sl]
        log_ratio = (logprobs - old_lp) * mb.mask
        ctx = LossContext(
            logprobs=logprobs, old_logprobs=old_lp, advantages=mb.advantages, mask=mb.mask, stats=stats, norm=norm,
            row_index=torch.arange(r.start, r.stop, device=mb.mask.device) - mini_start, group_index=mb.group_index, step=step,
            eps_low=alg.eps_low, eps_high=alg.eps_high, prepared=prepared,
            all_reduce_sum=self.backend.all_reduce_sum, all_gather_cat=self.backend.all_gather_cat,
        )
        m: dict[str, float] = {}
        parts: dict[str, float] = {}
        if single_pass_metrics:  # what the no-grad pass logs otherwise (token-weighted over micro-batches)
            n = max(float(mb.mask.sum()), 1.0)
            m["policy/rollout_logprob_diff"] = float(((old_lp - mb.rollout_logprobs).abs() * mb.mask).sum()) / n
            if self.cfg.learner.log_entropy:
                m["policy/entropy"] = float((stats["entropy"].detach() * mb.mask).sum()) / n
        for t in self.regs.with_hook("transform_log_ratio"):
            log_ratio, tm = t.term.transform_log_ratio(log_ratio, ctx)
            m.update({f"reg/{t.term.id}/{k}": v for k, v in tm.items()})
        total = logprobs.new_zeros(())
        unclipped = None
        for t in self.regs.with_hook("token_loss"):
            out = t.term.token_loss(ctx)
            coef = self.regs.coef(t, step)
            total = total + coef * out.loss
            parts[f"reg/{t.term.id}/loss"] = float(out.loss.detach())
            m[f"reg/{t.term.id}/coef"] = coef
            m.update({f"reg/{t.term.id}/{k}": v for k, v in out.metrics.items()})
            if out.unclipped_mask is not None:
                unclipped = out.unclipped_mask if unclipped is None else unclipped | out.unclipped_mask
        is_w = None
        if alg.tis_cap > 0:
            is_w = torch.exp(old_lp.detach() - mb.rollout_logprobs).clamp(max=alg.tis_cap)
        pg = clipped_pg_loss(log_ratio, mb.advantages, alg.eps_low, alg.eps_high, alg.dual_clip_c, unclipped, is_w)
        mode = "seq-mean-token-sum-norm" if alg.policy_loss == "drgrpo" else alg.loss_agg_mode
        pg_loss = aggregate(pg.loss, mb.mask, mode, norm)
        total = total + pg_loss
        denom = max(float(mb.mask.sum()), 1.0)
        parts["policy/pg_loss"] = float(pg_loss.detach())
        parts["loss/total"] = float(total.detach())
        for k, v in pg.metrics.items():
            m[f"policy/{k}"] = float((v * mb.mask).sum()) / denom
        m["policy/approx_kl"] = float((0.5 * (logprobs.detach() - old_lp) ** 2 * mb.mask).sum()) / denom
        return total, m, parts

    @torch.no_grad()
    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int], temperature: float) -> list[float]:
        """:func:`sequence_logprobs` of the current weights in eval mode, with ``learner.mixed_precision``
        (the parity probe's learner side; collective under ZeRO-3, whose held head weight is released)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return sequence_logprobs(self.model, prompt_ids, response_ids, temperature, self.autocast)
        finally:
            self.model.train(was_training)
            if hasattr(self.backend, "release_head"):
                self.backend.release_head()

    # ------------------------------------------------------------------------------------------
    def export_weights(self) -> list[tuple[str, Tensor]]:
        return [(k, v.detach()) for k, v in self.model.state_dict().items()]

    def state_dict(self) -> dict:
        # the run of skipped updates continues across a resume (a stop between two bad steps does not reset it)
        return {**self.backend.state_dict(), "regularizers": self.regs.state_dict(), "nonfinite_run": self._nonfinite_run}

    def load_state_dict(self, state: dict) -> None:
        self.backend.load_state_dict(state)
        self.regs.load_state_dict(state.get("regularizers", {}))
        self._nonfinite_run = int(state.get("nonfinite_run", 0))


def make_reference(model) -> torch.nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
