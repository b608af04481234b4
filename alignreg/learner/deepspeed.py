"""DeepSpeed ZeRO-2/3 learner backend: the same interface as :class:`TorchBackend`.

:class:`PolicyLearner` only calls ``zero_grad / backward / step / all_reduce_sum / all_gather_cat /
state_dict / load_state_dict / world_size / scheduler``, so this module is the whole DeepSpeed
integration. Choices, and why:

* **Optimizer and schedule.** ``torch.optim.AdamW`` (betas, weight decay from ``cfg.learner``) is
  handed to DeepSpeed as a client optimizer, and the same linear-warmup ``LambdaLR`` as the torch
  backend, so ZeRO-2/3 and the torch backend run the same update rule; clipping is DeepSpeed's
  ``gradient_clipping`` (global norm, pre-clip norm returned by :meth:`step`).
* **Gradient accumulation.** The learner calls ``backward`` once per micro-batch and ``step`` once
  per mini-batch, with a varying number of micro-batches. DeepSpeed runs with
  ``managed_gradient_accumulation: false`` and ``gradient_accumulation_steps: 1``: ``backward``
  accumulates (ZeRO-2/3 reduce-scatter into the gradient partitions as they go) and ``step`` is the
  boundary, so no loss is divided by a step count DeepSpeed would otherwise assume.
* **Summed, not averaged, gradients.** Losses use the mini-batch's *global* normalisers
  (:class:`AggNorm`), so the correct data-parallel gradient is the SUM over ranks. DeepSpeed averages
  over ranks, so :meth:`backward` multiplies the loss by ``world_size``. Tested against the
  single-process torch backend (tests/test_deepspeed_backend.py).
* **The lm-head weight under ZeRO-3.** The learner computes logits from the head weight directly
  (chunked statistics), outside ``lm_head.forward``, where a ZeRO-3 parameter is an empty partition.
  :class:`ZeroLMView` wraps the model for the learner: reading ``get_output_embeddings().weight``
  all-gathers the head weight (``deepspeed.zero.GatheredParameters``) and *holds* it - also across the
  decoder's own forward/backward, which would otherwise release it when the embedding is tied -
  until the backward of that micro-batch has finished (or until ``step``). The autograd graph
  therefore uses the real, full-size parameter, its gradient lands in ``param.grad`` and ZeRO-3's own
  gradient hook reduce-scatters it into the partition like any other gradient. Peak extra memory:
  one full ``[V, H]`` head weight per rank while a micro-batch is in flight.
* **Same decoder calls on every rank (ZeRO-3).** Each decoder forward gathers the layers' weight
  partitions collectively, so every rank must make the same calls whatever its rows: the learner's
  shared-prompt pass (``learner.share_prompt``: two calls, prompt then responses) is taken by all
  ranks when any rank's micro-batch repeats a prompt (:attr:`DeepSpeedBackend.collective_forward`).
* **Checkpoints.** :meth:`state_dict` returns the *full, gathered* fp32 weights, the AdamW moments in
  torch's own ``AdamW.state_dict()`` layout (indexed by ``model.parameters()`` order), and the
  scheduler state - the same format as :class:`TorchBackend`, so checkpoints move between backends,
  world sizes and ZeRO stages, and the trainer's atomic single-file checkpoint stays the only format.
  It is collective (every rank calls it; rank 0's copy is what the driver saves). Cost: one full copy
  of weights + 2 moments in host memory on each rank while saving; for models too large for that,
  DeepSpeed's sharded ``save_checkpoint`` would be the next step (not implemented).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from alignreg.config import RLConfig
from alignreg.learner.policy import DistCollectives, apply_optimizer_settings, warmup_scheduler
from alignreg.models import process_gpu

_HOLD = -7919  # a fake sub-module id that keeps ZeRO-3 from releasing the held head weight


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_dist_backend(name: str) -> str:
    if name != "auto":
        return name
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(dist_backend: str = "auto") -> None:
    """Initialise torch.distributed from RANK/WORLD_SIZE/MASTER_* (single-process defaults if unset)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"] if os.environ["WORLD_SIZE"] == "1" else "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend=resolve_dist_backend(dist_backend), auto_mpi_discovery=False)


def ds_config(cfg: RLConfig, **extra) -> dict:
    """The DeepSpeed JSON config for ``cfg`` (``extra`` keys override, e.g. for tests)."""
    dc, lc = cfg.deepspeed, cfg.learner
    zero: dict = {"stage": dc.zero_stage}
    if dc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    conf = {
        "train_micro_batch_size_per_gpu": 1,  # unused: the learner owns batching
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # backward() accumulates, step() is the boundary
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        # ... also on offloaded fp32 partitions (DeepSpeed otherwise demands its own CPU Adam there)
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bool(dc.bf16 and torch.cuda.is_available())},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(conf.get(k), dict):
            conf[k] = {**conf[k], **v}
        else:
            conf[k] = v
    return conf


class _HeldHead:
    """What ``ZeroLMView.get_output_embeddings()`` returns: ``.weight`` gathers and holds."""

    def __init__(self, backend: "DeepSpeedBackend"):
        self._backend = backend

    @property
    def weight(self) -> Tensor:
        return self._backend.hold_head()

    @property
    def bias(self) -> Optional[Tensor]:
        b = getattr(self._backend.module.get_output_embeddings(), "bias", None)
        return None if b is None else self._backend.hold_head(bias=True)


class ZeroLMView:
    """The model as the learner sees it: everything delegates to the DeepSpeed-wrapped module,
    except the lm head, whose weight is gathered and held while the learner uses it (ZeRO-3)."""

    def __init__(self, backend: "DeepSpeedBackend"):
        self._backend = backend

    def get_output_embeddings(self):
        return _HeldHead(self._backend)

    def __getattr__(self, name):
        return getattr(self._backend.module, name)


class DeepSpeedBackend(DistCollectives):
    """ZeRO-2/3 parameter owner with :class:`TorchBackend`'s interface (see module docstring).

    ``model`` is the plain HF model (full weights, same on every rank); give :attr:`learner_model`
    (not ``model``) to :class:`PolicyLearner`.
    """

    def __init__(self, model: torch.nn.Module, cfg: RLConfig, ds_overrides: Optional[dict] = None):
        import deepspeed

        lc = cfg.learner
        init_distributed(cfg.deepspeed.dist_backend)
        if (gpu := process_gpu()) is not None:
            model = model.to(gpu)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lc.lr, betas=tuple(lc.betas), weight_decay=lc.weight_decay)
        scheduler = warmup_scheduler(optimizer, lc.warmup_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config(cfg, **(ds_overrides or {})), dist_init_required=False,
        )
        self.module = self.engine.module
        self.stage, self.lc = cfg.deepspeed.zero_stage, lc
        self._held = None  # the GatheredParameters context holding the head weight (ZeRO-3)
        self.learner_model = ZeroLMView(self) if self.stage == 3 else self.module

    @property
    def collective_forward(self) -> bool:
        """ZeRO-3 gathers each layer's weight partitions in its forward: every rank must run the same
        decoder calls (a rank that made fewer would pair its gathers with another rank's next ones)."""
        return self.stage == 3 and self.world_size > 1

    # ------------------------------------------------------------------ ZeRO-3 head weight
    def hold_head(self, bias: bool = False) -> Tensor:
        """Gather the lm-head weight (and bias) and keep it gathered until :meth:`release_head`."""
        head = self.module.get_output_embeddings()
        if self._held is None:
            import deepspeed

            params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            ctx.__enter__()
            for p in params:  # the decoder's hooks must not release it (tied input embedding)
                p.ds_active_sub_modules.add(_HOLD)
            self._held = (ctx, params)
        return head.bias if bias else head.weight

    def release_head(self) -> None:
        if self._held is not None:
            ctx, params = self._held
            self._held = None
            for p in params:
                p.ds_active_sub_modules.discard(_HOLD)
            ctx.__exit__(None, None, None)

    # ------------------------------------------------------------------ optimisation
    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: Tensor) -> None:
        # x world_size: DeepSpeed averages gradients over ranks, the global-normalised losses need a sum
        self.engine.backward(loss * self.world_size)
        self.release_head()
        # What engine.forward() does before the next micro-batch: the learner calls the decoder
        # directly, and without this ZeRO-3 overwrites (instead of accumulating) partitioned grads.
        if hasattr(self.engine.optimizer, "clear_backward_seen_flag"):
            self.engine.optimizer.clear_backward_seen_flag()

    def step(self) -> float:
        """Reduce (sum) over ranks, clip, update, advance the schedule; returns the pre-clip norm."""
        self.release_head()
        before = getattr(self.engine, "skipped_steps", None)
        self.engine.step()
        # DeepSpeed skips an update whose gradients overflow (weights, Adam state and schedule unchanged)
        self.skips_nonfinite = before is not None and self.engine.skipped_steps > before
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    # whether the last update was skipped by DeepSpeed (``PolicyLearner`` counts skipped non-finite
    # updates like the torch backend's and stops the run if DeepSpeed applied one)
    skips_nonfinite = False

    # ------------------------------------------------------------------ weights and checkpoints
    def _full_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.module.named_parameters())

    @torch.no_grad()
    def _gathered(self, named: list[tuple[str, torch.nn.Parameter]], merge_lora: bool = False) -> list[tuple[str, Tensor]]:
        """CPU copies of ``named`` (gathered under ZeRO-3; collective there). ``merge_lora``: the
        whole PEFT model's base weights with the adapters folded in, under the base names."""
        import deepspeed

        self.release_head()  # nested gathers of the same parameter are an error
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None, enabled=self.stage == 3):
            if merge_lora:
                from alignreg.learner.lora import merged_weights

                return [(n, w.cpu()) for n, w in merged_weights(self.module)]
            return [(n, p.detach().to("cpu", copy=True)) for n, p in named]

    def export_weights(self) -> list[tuple[str, Tensor]]:
        """Full weights on CPU (gathered under ZeRO-3), names as ``model.named_parameters()``; for a
        LoRA (PEFT) model the merged weights ``W + scale B A`` under the base model's names (what
        the engines load).

        Collective under ZeRO-3: every rank must call it. Tensors are in the training dtype.
        """
        from alignreg.learner.lora import is_peft

        return self._gathered(self._full_params(), merge_lora=is_peft(self.module))

    def save_hf(self, path: str | Path) -> None:
        """Write an HF checkpoint (``config.json`` + safetensors) of the full weights; rank 0 writes.
        A LoRA (PEFT) model writes its adapter only, like ``PeftModel.save_pretrained``."""
        named = dict(self._gathered(self._full_params()))
        if self.rank == 0:
            state = {k: v for k, v in self.module.state_dict().items() if k not in named and v.numel() > 0}
            state.update(named)
            self.module.save_pretrained(path, state_dict=state)

    def state_dict(self) -> dict:
        """Full fp32 weights + AdamW moments in ``torch.optim.AdamW`` layout + schedule (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self.release_head()
        model, opt_state = {}, {}
        steps = int(self.scheduler.last_epoch)
        named = self._full_params()
        trainable = [(n, p) for n, p in named if p.requires_grad]
        frozen = [(n, p) for n, p in named if not p.requires_grad]  # LoRA's base: no fp32 master
        model.update(self._gathered(frozen))
        for i, (name, p) in enumerate(trainable):  # optimizer indices as TorchBackend's (trainable only)
            model[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
            if steps > 0:
                opt_state[i] = {
                    "step": torch.tensor(float(steps)),
                    "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu().clone(),
                    "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu().clone(),
                }
        first: dict[int, str] = {}
        for n, p in self.module.named_parameters(remove_duplicate=False):  # tied aliases (lm_head = embedding):
            if id(p) in first and n not in model:  # under every name, as the torch backend's state_dict has them
                model[n] = model[first[id(p)]]  # (under ZeRO-3 the alias is an empty partition; under bf16, a copy)
            first.setdefault(id(p), n)
        for k, v in self.module.state_dict().items():  # buffers (e.g. rotary inv_freq) if persistent
            if k not in model and v.numel() > 0:
                model[k] = v.detach().cpu().clone()
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(trainable)))
        return {"model": model, "optimizer": {"state": opt_state, "param_groups": [group]},
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`; also accepts a :class:`TorchBackend` checkpoint (collective)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        weights, opt = state["model"], state["optimizer"]["state"]
        base = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        # the flat fp32 partitions AdamW steps on (ZeRO-3 empties base.param_groups outside step())
        flat = getattr(self.optimizer, "fp32_partitioned_groups_flat", None) or [p for g in base.param_groups for p in g["params"]]
        fresh = [p for p in flat if "exp_avg" not in base.state.get(p, {})]
        if opt and fresh:  # fresh engine: AdamW creates its state lazily at the first step
            for p in fresh:
                base.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            if hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-2: link the views
                self.optimizer._lazy_init_hp_params_optimizer_state()
        import deepspeed

        self.release_head()
        named = self._full_params()
        # the training-dtype module weights (ZeRO-3: their partitions) ...
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0, enabled=self.stage == 3):
            with torch.no_grad():
                for name, p in named:
                    p.data.copy_(weights[name].to(p.dtype))
        step = None
        trainable = [(n, p) for n, p in named if p.requires_grad]
        for i, (name, p) in enumerate(trainable):  # ... and the fp32 master partitions + AdamW moments
            safe_set_full_fp32_param(p, weights[name].to(torch.float32))
            s = opt.get(i)
            if s is not None:
                safe_set_full_optimizer_state(p, s["exp_avg"].float(), "exp_avg")
                safe_set_full_optimizer_state(p, s["exp_avg_sq"].float(), "exp_avg_sq")
                step = s["step"]
        if step is not None:  # the client AdamW's per-(flat)param step counters
            for st in base.state.values():
                if "step" in st:
                    st["step"] = torch.as_tensor(step, dtype=st["step"].dtype).clone()
        self.scheduler.load_state_dict(state["scheduler"])
        apply_optimizer_settings(self.optimizer.param_groups, self.scheduler, self.lc)
