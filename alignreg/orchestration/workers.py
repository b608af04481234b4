"""The two workers behind the loop's seams, used in-process (local groups) and as Ray actor bodies.

* :class:`RolloutWorker` - one rollout engine (HF or vLLM) and its tokenizer: ``generate``,
  ``generate_scored`` (rewards are computed next to the engine, so with Ray they never reach the
  driver), ``load_weights``, ``weights_checksum``, ``logprobs_of`` (the parity probe).
* :class:`LearnerWorker` - one data-parallel rank: model, optional reference model, regularizers,
  backend (``TorchBackend`` or ``DeepSpeedBackend``) and :class:`PolicyLearner`; ``train_step``,
  ``export_weights``, ``state_dict``, ``load_state_dict``, ``save_hf``, ``probe_logprobs``.

In a local run the trainer holds one of each; ``orchestration: ray`` wraps N of each in actors
(``ray_groups.py``) with the same typed methods. Ray is never imported here.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from alignreg.config import ConfigError, RLConfig
from alignreg.rollout.base import RolloutBatch, SamplingParams, weights_checksum


def score_rollouts(tokenizer, reward: str, rb: RolloutBatch, records: list[dict]) -> list[float]:
    """Raw verifiable rewards of a rollout batch (``records[i]`` belongs to prompt ``i``)."""
    from alignreg.rewards.math import batch_rewards  # any registered reward; math ones run in the verifier pool

    texts = tokenizer.batch_decode(rb.response_ids, skip_special_tokens=True)
    return batch_rewards(reward, texts, [records[i] for i in rb.prompt_index])


def _threads(cfg: RLConfig) -> None:
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)


class RolloutWorker:
    """One engine. ``model``/``tokenizer`` given: an HF engine on a copy of that model (local runs);
    otherwise the engine loads ``model_dir`` (an HF ``save_pretrained`` directory). ``own_process``: this
    process holds nothing else (a Ray engine actor; see ``vllm.executor``)."""

    def __init__(self, cfg: RLConfig, model_dir: str, seed: int, model=None, tokenizer=None, own_process: bool = False):
        _threads(cfg)
        if tokenizer is None:
            from alignreg.models import load_tokenizer

            tokenizer = load_tokenizer(model_dir)
        self.tokenizer = tokenizer
        self.math_reward = cfg.task.reward.startswith("math_verify")  # reward_metrics: the verifier's counters
        from alignreg.rewards.math import configure as configure_math_rewards

        configure_math_rewards(**vars(cfg.math_reward))  # rewards are computed next to the engine
        from alignreg.models import stop_token_ids

        stops = stop_token_ids(tokenizer, cfg.rollout.stop_tokens)
        if cfg.rollout.engine == "vllm":
            from alignreg.rollout.vllm import VLLMRolloutEngine

            self.engine = VLLMRolloutEngine(model_dir, cfg.vllm, seed, _max_len(model_dir), own_process=own_process,
                                            stop_ids=stops)
        else:
            from alignreg.models import AUTOCAST, process_gpu
            from alignreg.rollout.hf import HFRolloutEngine

            if model is None:
                from transformers import AutoModelForCausalLM

                from alignreg.models import attn_kwargs

                model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **attn_kwargs(cfg.model),
                                                             dtype=getattr(torch, cfg.model.dtype))  # the learner's dtype and kernel, as in one process
            # on the GPU this process sees (a local run's learner's, an engine actor's own), as vLLM would be
            self.engine = HFRolloutEngine(model, tokenizer, autocast=AUTOCAST[cfg.learner.mixed_precision], stop_ids=stops,
                                          device=process_gpu())
        self.temperature = cfg.rollout.temperature

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        return self.engine.generate(prompts, sampling)

    def generate_scored(self, prompts: list[list[int]], sampling: SamplingParams, records: list[dict],
                        reward: str) -> tuple[RolloutBatch, list[float]]:
        rb = self.engine.generate(prompts, sampling)
        return rb, score_rollouts(self.tokenizer, reward, rb, records)

    def reward_metrics(self) -> dict[str, float]:
        """The math verifier's counters since the last call (``reward/math_*``; {} for other rewards):
        the rewards of ``generate_scored`` are computed here, so the counters live here too."""
        from alignreg.rewards.math import pop_reward_metrics

        # only for a math reward: the pool is process-wide and may be left over from another run here
        return pop_reward_metrics() if self.math_reward else {}

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.engine.load_weights(named_tensors)

    def load_weights_from_spec(self, spec: dict) -> None:
        """Load a shared-memory buffer written by the learner (``weight_sync.SharedMemoryWeights``)."""
        if hasattr(self.engine, "load_weights_from_spec"):
            self.engine.load_weights_from_spec(spec)
        else:
            from alignreg.orchestration.weight_sync import read_shared_weights

            self.engine.load_weights(read_shared_weights(spec))

    # ------------------------------------------------------------------ collective weight group
    def weight_receivers(self) -> int:
        """Processes of this engine that join a collective weight sync (vLLM: its workers; HF: this one)."""
        return int(getattr(self.engine, "weight_receivers", 1))

    def init_weight_group(self, backend: str, host: str, port: int, rank_offset: int, world: int, timeout_s: float) -> None:
        """Join the learner's weight group at ``host:port`` (this engine's processes: ranks ``rank_offset..``)."""
        self._group_id = None
        if hasattr(self.engine, "init_weight_group"):
            self.engine.init_weight_group(backend, host, port, rank_offset, world, timeout_s)
        else:
            from alignreg.orchestration.weight_sync import open_weight_group

            self._group = None
            self._group = open_weight_group(backend, host, port, rank_offset, world, timeout_s)
        self._group_id = (host, port)

    def weight_group_id(self) -> Optional[tuple]:
        """``(host, port)`` of the weight group this instance joined (None: none, e.g. after a restart)."""
        return getattr(self, "_group_id", None)

    def load_weights_from_group(self, meta: list, bucket_bytes: int, checksum: float) -> None:
        """Receive learner rank 0's broadcast (``weight_sync.send_weights``) and load it."""
        if hasattr(self.engine, "load_weights_from_group"):
            self.engine.load_weights_from_group(meta, bucket_bytes, checksum)
            return
        from alignreg.orchestration.weight_sync import receive_weights

        named = receive_weights(self._group, meta, bucket_bytes)
        got = weights_checksum(named)
        if got != checksum:
            raise RuntimeError(f"weight transport corrupted the tensors: checksum {got!r} received, {checksum!r} sent")
        self.engine.load_weights(named)

    def weights_checksum(self) -> float:
        return self.engine.weights_checksum()

    def logprobs_of(self, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0) -> list[float]:
        if hasattr(self.engine, "logprobs_of"):
            return self.engine.logprobs_of(prompt_ids, response_ids, temperature=temperature)
        from alignreg.orchestration.weight_sync import hf_logprobs_fn

        return hf_logprobs_fn(self.engine.model, temperature)(prompt_ids, response_ids)

    def shutdown(self) -> None:
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()


def _max_len(model_dir: str) -> int:
    """Context length for vLLM when ``vllm.max_model_len`` is 0: the checkpoint's position table."""
    import json

    return int(json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 2048))


class LearnerWorker:
    """One learner rank. ``model`` given (local runs) or loaded from ``model_dir`` (Ray actors).

    With ``world_size > 1`` the caller has set ``MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE``; the
    process group is plain torch.distributed (gloo on CPU, nccl on GPU), initialised here for the
    torch backend and by DeepSpeed for the deepspeed backend.
    """

    def __init__(self, cfg: RLConfig, model=None, model_dir: Optional[str] = None, ref_model=None, regs=None):
        from alignreg.learner.policy import PolicyLearner, TorchBackend, make_reference
        from alignreg.regularizers import build_regularizers

        _threads(cfg)
        self.cfg = cfg
        if model is None:
            model = _load_hf(model_dir, cfg)
        regs = regs if regs is not None else build_regularizers(cfg.regularizers)
        needs_ref = regs.needs_reference()
        ref_view = False  # LoRA: the reference is the policy with its adapters off (no copy)
        if cfg.lora.enabled:
            from alignreg.learner.lora import apply_lora, reference_view_ok

            ref_view = needs_ref and ref_model is None and reference_view_ok(cfg.lora)
        if needs_ref and ref_model is None and not ref_view:
            ref_model = make_reference(model)  # before DeepSpeed partitions the policy
        if cfg.lora.enabled:  # after any reference copy: the reference is the base model
            model = apply_lora(model, cfg.lora, base_path=model_dir or Path(cfg.trainer.run_dir) / "init_policy")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.learner.backend == "deepspeed":
            try:
                from alignreg.learner.deepspeed import DeepSpeedBackend
                import deepspeed  # noqa: F401
            except ImportError as e:
                raise ConfigError(f"learner.backend: 'deepspeed' needs DeepSpeed ({e}); pip install 'alignreg[deepspeed]'") from None
            backend = DeepSpeedBackend(model, cfg)
            learner_model = backend.learner_model
        else:
            if world > 1:
                import torch.distributed as dist

                if not dist.is_initialized():
                    from alignreg.learner.deepspeed import resolve_dist_backend

                    dist.init_process_group(resolve_dist_backend(cfg.deepspeed.dist_backend))
            backend = TorchBackend(model, cfg)
            learner_model = model
        self.backend = backend
        self.model = model
        if ref_view:
            from alignreg.learner.lora import BaseModelView

            ref_model = BaseModelView(getattr(backend, "module", model), learner_model)
        self.learner = PolicyLearner(learner_model, cfg, regs, ref_model=ref_model if needs_ref else None, backend=backend)

    @property
    def rank(self) -> int:
        return self.backend.rank

    def train_step(self, batch, step: int) -> dict[str, float]:
        """The learner's step; ``time/learner_s`` is its time inside this worker (with Ray, the driver's
        ``time/train_s`` adds the batch's transfer and the call)."""
        t0 = time.perf_counter()
        metrics = self.learner.train_step(batch, step)
        metrics["time/learner_s"] = time.perf_counter() - t0
        return metrics

    def export_weights(self, keep: bool = True) -> list[tuple[str, torch.Tensor]]:
        """Full weights (collective under ZeRO-3: every rank calls; ``keep=False`` returns [])."""
        if hasattr(self.backend, "export_weights"):
            out = self.backend.export_weights()
        elif hasattr(self.model, "peft_config"):  # LoRA: engines get W + (alpha/r) B A under the base names
            from alignreg.learner.lora import merged_weights

            out = merged_weights(self.model)
        else:
            out = [(n, p.detach().clone()) for n, p in self.model.named_parameters()]
        return out if keep else []

    def export_to_shm(self, path: Optional[str] = None) -> Optional[dict]:
        """Write the full weights into a reusable ``/dev/shm`` buffer; returns its spec (rank 0)."""
        named = self.export_weights()
        if self.rank != 0:
            return None
        from alignreg.orchestration.weight_sync import SharedMemoryWeights

        if getattr(self, "_shm", None) is None:
            self._shm = SharedMemoryWeights(path)
        return self._shm.write(named)

    # ------------------------------------------------------------------ collective weight groups (rank 0)
    def stage_weights(self) -> Optional[dict]:
        """Gather the full weights (every rank: ZeRO-3 gathers) and keep them on rank 0 for
        :meth:`send_staged`; rank 0 returns ``{"meta", "checksum"}``, the others None."""
        named = self.export_weights(keep=self.rank == 0)
        if self.rank != 0:
            return None
        from alignreg.orchestration.weight_sync import tensor_meta

        self._staged = named
        return {"meta": tensor_meta(named), "checksum": weights_checksum(named)}

    def release_staged(self, keep_on_cpu: bool) -> None:
        """After a sync: drop the staged weights, or keep a host copy (async rollout re-syncs a
        restarted engine from it while the learner has moved on)."""
        staged = getattr(self, "_staged", None)
        self._staged = [(n, t.to("cpu")) for n, t in staged] if keep_on_cpu and staged is not None else None

    def has_staged(self) -> bool:
        return getattr(self, "_staged", None) is not None

    def staged_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Host copies of the staged weights (``RemoteWeights`` iterated outside a sync)."""
        if getattr(self, "_staged", None) is None:
            raise RuntimeError("staged_weights: nothing is staged (a sync releases them unless trainer.async_rollout "
                               "keeps a host copy); export the weights again")
        return [(n, t.to("cpu")) for n, t in self._staged]

    def init_weight_group(self, key: int, backend: str, host: str, port: int, world: int, timeout_s: float) -> None:
        """Host (group rank 0) weight group ``key`` (one per engine); replaces an earlier group ``key``."""
        from alignreg.orchestration.weight_sync import open_weight_group

        groups = self.__dict__.setdefault("_groups", {})
        groups.pop(key, None)
        groups[key] = open_weight_group(backend, host, port, 0, world, timeout_s)

    def send_staged(self, key: int, bucket_bytes: int) -> None:
        """Broadcast the staged weights to the engine of group ``key``."""
        from alignreg.orchestration.weight_sync import send_weights

        if getattr(self, "_staged", None) is None:
            raise RuntimeError("send_staged: nothing staged (stage_weights first)")
        send_weights(self._groups[key], self._staged, bucket_bytes)

    def weights_checksum(self) -> float:
        return weights_checksum(self.export_weights())

    def probe_logprobs(self, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0) -> list[float]:
        """Teacher-forced log-probs of the current weights as the loss computes them (``learner.mixed_precision``,
        the chunked lm head: ``PolicyLearner.sequence_logprobs``); collective under ZeRO-3."""
        return self.learner.sequence_logprobs(prompt_ids, response_ids, temperature)

    def state_dict(self) -> dict:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state)

    def save_hf(self, path: str) -> None:
        """HF checkpoint of the current weights (written by rank 0)."""
        if hasattr(self.backend, "save_hf"):
            self.backend.save_hf(path)
        elif self.rank == 0:
            self.model.save_pretrained(path)

    def close(self) -> None:
        shm = getattr(self, "_shm", None)
        if shm is not None:
            shm.close()


def _load_hf(model_dir: str, cfg: RLConfig):
    from transformers import AutoModelForCausalLM

    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"learner: {model_dir!r} is not an HF checkpoint directory")
    from alignreg.models import attn_kwargs

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **attn_kwargs(cfg.model),
                                                 dtype=getattr(torch, cfg.model.dtype))
    return model
