"""Learner -> rollout-engine weight transport, and the checks that a sync really happened.

Transports:

* :class:`SharedMemoryWeights` + :class:`ShmWeightSync` (CPU, one node): the learner copies every
  tensor into one file under ``/dev/shm`` (64-byte aligned slots) and sends only a small spec
  (path, names, dtypes, shapes, offsets, checksum) over the control channel; the engine worker maps
  the file and hands zero-copy views to ``reload_weights`` (:func:`read_shared_weights`). One buffer
  is reused across syncs; a sync must finish before the next ``write`` (the trainer loop is
  sequential). The file is removed by ``close()`` (or at interpreter exit).
* :class:`WeightGroup` (:func:`open_weight_group`, :func:`send_weights`, :func:`iter_received_weights`;
  Ray runs, ``sync.transport: collective``): learner rank 0 and one engine's workers form a process
  group of their own and the learner broadcasts the weights in buckets, NCCL between GPUs, gloo
  between CPU processes (any nodes). The protocol is the same for both backends and is tested here
  with gloo; NCCL itself has not run on this project's machines (no GPU lent).

Verification (:func:`verify_sync`): after a sync the engine's teacher-forced log-probs of a fixed
probe sequence must equal the learner's within ``sync.parity_tol``, and the engine-side checksum
(of the tensors as the worker received them, see ``rollout/vllm_worker.py``) must equal the
learner's. Every engine call runs under ``sync.timeout_s``: a hung engine raises
:class:`WeightSyncError` instead of hanging the run. A timed-out call keeps running in a daemon
thread; the engine must then be treated as dead (shut down / restart the actor).
"""
from __future__ import annotations

import atexit
import math
import os
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from alignreg.config import RayConfig, SyncConfig, WorkerError
from alignreg.rollout.base import RolloutBatch, weights_checksum

ALIGN = 64  # byte alignment of each tensor slot (any dtype view is aligned)


class WeightSyncError(WorkerError):
    """A weight sync could not be verified: parity probe, checksum or timeout."""


# ---------------------------------------------------------------------------------------- helpers
def call_with_timeout(fn: Callable[[], Any], timeout_s: Optional[float], what: str) -> Any:
    """Run ``fn()`` in a daemon thread; raise :class:`WeightSyncError` after ``timeout_s`` (None: wait).

    A daemon thread (not a ``ThreadPoolExecutor`` worker) so that a call that never returns cannot
    block interpreter exit. Exceptions of ``fn`` are re-raised in the caller.
    """
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name=f"alignreg-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise WeightSyncError(f"{what}: the rollout engine did not answer within {timeout_s:g} s "
                              f"(sync.timeout_s); treat the engine as dead and restart it")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def make_probe(vocab_size: int, cfg: SyncConfig, seed: int = 0) -> tuple[list[int], list[int]]:
    """A fixed ``(prompt_ids, response_ids)`` of ``cfg.probe_tokens`` random token ids, split in half.

    Random ids touch many embedding rows and are the same for every sync of a run.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (max(cfg.probe_tokens, 2),), generator=g).tolist()
    half = len(ids) // 2
    return ids[:half], ids[half:]


def hf_logprobs_fn(model: torch.nn.Module, temperature: float = 1.0,
                   autocast: Optional[torch.dtype] = None) -> Callable[[list[int], list[int]], list[float]]:
    """Learner-side probe: teacher-forced ``log_softmax(logits / T)`` of an HF causal LM, computed as the
    learner's loss computes it (``learner.policy.sequence_logprobs``: the body under ``autocast``, the
    chunked lm head in float32), not by a forward of its own that could differ from the loss's."""
    from alignreg.learner.policy import sequence_logprobs

    def fn(prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        return sequence_logprobs(model, prompt_ids, response_ids, temperature, autocast)

    return fn


# ---------------------------------------------------------------------------------------- verification
def verify_sync(engine, learner_logprobs_fn: Callable[[list[int], list[int]], list[float]],
                probe: tuple[list[int], list[int]], cfg: SyncConfig, *,
                expected_checksum: Optional[float] = None, temperature: float = 1.0) -> dict[str, float]:
    """Check a finished sync; returns ``sync/*`` metrics or raises :class:`WeightSyncError`.

    ``engine`` needs ``logprobs_of(prompt_ids, response_ids, temperature=...)`` and
    ``weights_checksum()``; ``learner_logprobs_fn(prompt_ids, response_ids)`` must use the same
    temperature. ``expected_checksum`` is :func:`weights_checksum` of exactly the tensors the
    learner sent (None skips the checksum). With ``cfg.verify`` False nothing is checked.
    """
    if not cfg.verify:
        return {}
    prompt, response = probe
    engine_lp = call_with_timeout(lambda: engine.logprobs_of(prompt, response, temperature=temperature),
                                  cfg.timeout_s, "parity probe")
    learner_lp = learner_logprobs_fn(prompt, response)
    if len(engine_lp) != len(learner_lp):
        raise WeightSyncError(f"parity probe: engine returned {len(engine_lp)} log-probs, learner {len(learner_lp)}")
    diff = (torch.tensor(engine_lp, dtype=torch.float64) - torch.tensor(learner_lp, dtype=torch.float64)).abs()
    max_diff = float(diff.max()) if diff.numel() else 0.0
    metrics = {"sync/probe_max_abs_diff": max_diff}
    if not max_diff <= cfg.parity_tol:  # also catches NaN
        worst = int(diff.argmax())
        raise WeightSyncError(
            f"parity probe after weight sync: max |engine - learner| log-prob = {max_diff:.3g} > "
            f"sync.parity_tol = {cfg.parity_tol:g} (token {worst}: engine {engine_lp[worst]:.5f}, "
            f"learner {learner_lp[worst]:.5f}); the engine is not sampling from the learner's weights")
    if expected_checksum is not None:
        got = call_with_timeout(engine.weights_checksum, cfg.timeout_s, "weights checksum")
        metrics["sync/checksum"] = float(got)
        if got != expected_checksum:  # CRC values as floats: exact
            raise WeightSyncError(f"weights checksum after sync: engine {got!r} != learner {expected_checksum!r}; "
                                  f"the engine did not receive the learner's tensors")
    return metrics


def rollout_logprob_mismatch(batch: RolloutBatch, learner_logprobs: Sequence[Sequence[float]],
                             tis_cap: float = 0.0) -> dict[str, float]:
    """Rollout (engine) vs learner log-prob statistics over all response tokens of a batch.

    ``learner_logprobs[j]`` are the learner's log-probs of ``batch.response_ids[j]`` (same
    temperature). ``is_ratio = exp(learner - rollout)`` is the per-token importance weight that
    ``algorithm.tis_cap`` truncates; ``tis_clip_frac`` is the fraction of tokens it would cap.
    """
    eng = torch.tensor([x for lp in batch.logprobs for x in lp], dtype=torch.float64)
    lrn = torch.tensor([x for lp in learner_logprobs for x in lp], dtype=torch.float64)
    if eng.shape != lrn.shape:
        raise ValueError(f"rollout_logprob_mismatch: {eng.numel()} rollout tokens vs {lrn.numel()} learner tokens")
    if eng.numel() == 0:
        return {}
    d = lrn - eng
    ratio = d.exp()
    out = {
        "rollout/logprob_abs_diff_mean": float(d.abs().mean()),
        "rollout/logprob_abs_diff_max": float(d.abs().max()),
        "rollout/logprob_diff_mean": float(d.mean()),
        "rollout/is_ratio_max": float(ratio.max()),
        "rollout/is_ratio_min": float(ratio.min()),
    }
    if tis_cap > 0:
        out["rollout/tis_clip_frac"] = float((ratio > tis_cap).double().mean())
    return out


# ---------------------------------------------------------------------------------------- shared memory
def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _remove_stale_buffers(directory: str) -> None:
    """Delete buffers of dead processes (a killed Ray actor never runs its ``atexit`` hook)."""
    for f in os.listdir(directory):
        if f.startswith("alignreg-weights-") and f.endswith(".bin"):
            pid = f.split("-")[2]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                try:
                    os.unlink(os.path.join(directory, f))
                except OSError:
                    pass


class SharedMemoryWeights:
    """Learner side: one reusable file in ``/dev/shm`` holding all tensors of a sync."""

    def __init__(self, path: Optional[str] = None):
        if path is None and os.path.isdir("/proc"):
            _remove_stale_buffers(_shm_dir())
        self.path = path or os.path.join(_shm_dir(), f"alignreg-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin")
        self.capacity = 0
        self._buf: Optional[torch.Tensor] = None
        atexit.register(self.close)

    def _reserve(self, size: int) -> None:
        """Size the file and allocate its pages now: a sparse file in a full tmpfs kills the writer with
        SIGBUS at the first page it cannot back (Docker's default /dev/shm is 64 MiB), with no traceback.
        Without room in /dev/shm the buffer moves to the temporary directory's disk, with a warning."""
        self._buf = None
        for attempt in range(2):
            try:
                with open(self.path, "ab") as f:
                    os.ftruncate(f.fileno(), size)
                    os.posix_fallocate(f.fileno(), 0, size)
                return
            except OSError as e:
                where = os.path.dirname(self.path)
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
                self.capacity = 0
                fallback = tempfile.gettempdir()
                if attempt == 0 and os.path.realpath(where) != os.path.realpath(fallback):
                    print(f"warning: weight sync: no room for a {size / 2**20:.0f} MiB buffer in {where} ({e.strerror}); "
                          f"using {fallback} instead (slower; give the container a larger /dev/shm, e.g. "
                          f"docker run --shm-size=...)", flush=True)
                    self.path = os.path.join(fallback, os.path.basename(self.path))
                    continue
                raise WorkerError(f"weight sync: cannot allocate a {size / 2**20:.0f} MiB weight buffer in {where} "
                                  f"({e.strerror}); free space there (or set TMPDIR to a disk with room)") from None

    @torch.no_grad()
    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Copy tensors into the buffer; returns the spec the engine side needs (picklable dict)."""
        named = [(n, t.detach()) for n, t in named_tensors]
        entries, offset = [], 0
        for name, t in named:
            nbytes = t.numel() * t.element_size()
            entries.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        size = max(offset, ALIGN)
        if size > self.capacity or self._buf is None:
            self._reserve(max(size, self.capacity))
            self.capacity = max(size, self.capacity)
            # mapped once and kept: a fresh mapping per sync page-faults every page again (~2x the copy)
            self._buf = torch.from_file(self.path, shared=True, size=self.capacity, dtype=torch.uint8)
        written = []
        for (name, t), (_, dtype, shape, off, nbytes) in zip(named, entries):
            dst = self._buf[off : off + nbytes]
            dst.copy_(t.to("cpu").contiguous().reshape(-1).view(torch.uint8))
            written.append((name, dst.view(getattr(torch, dtype)).view(shape)))
        spec = {"path": self.path, "size": self.capacity, "tensors": entries}
        spec["checksum"] = weights_checksum(written)  # over the bytes as written
        return spec

    def close(self) -> None:
        self._buf, self.capacity = None, 0
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def read_shared_weights(spec: dict) -> list[tuple[str, torch.Tensor]]:
    """Engine side: zero-copy views ``(name, tensor)`` into the mapped buffer (private mapping:
    writes through the views never reach the learner's file)."""
    buf = torch.from_file(spec["path"], shared=False, size=spec["size"], dtype=torch.uint8)
    out = []
    for name, dtype, shape, off, nbytes in spec["tensors"]:
        out.append((name, buf[off : off + nbytes].view(getattr(torch, dtype)).view(shape)))
    return out


# ---------------------------------------------------------------------------------------- transports
class ShmWeightSync:
    """CPU transport: ``engine_rpc(method, args)`` runs a worker-extension method on the engine
    (``VLLMRolloutEngine.collective_rpc`` in-process, or a Ray actor call that returns the result)."""

    def __init__(self, engine_rpc: Callable[[str, tuple], Any], path: Optional[str] = None):
        self.engine_rpc = engine_rpc
        self.buffer = SharedMemoryWeights(path)

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], timeout_s: Optional[float] = 300.0) -> float:
        spec = self.buffer.write(named_tensors)
        call_with_timeout(lambda: self.engine_rpc("alignreg_update_weights_from_shm", (spec,)), timeout_s, "weight sync")
        return spec["checksum"]

    def close(self) -> None:
        self.buffer.close()


# ---------------------------------------------------------------------------------------- collective group
@dataclass
class WeightGroup:
    """One process's end of a learner -> engine weight group: learner rank 0 is group rank 0, the engine's
    workers are ranks 1..n. A process group of its own (a ``TCPStore`` hosted by the learner + torch's
    ``ProcessGroupGloo`` / ``ProcessGroupNCCL``), so neither side's ``torch.distributed`` world (the learner
    ranks' DeepSpeed group, vLLM's own tensor-parallel group) is touched."""

    backend: str  # "gloo" (CPU tensors) or "nccl" (CUDA tensors)
    rank: int
    world: int
    pg: Any
    store: Any

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


def open_weight_group(backend: str, host: str, port: int, rank: int, world: int, timeout_s: float) -> WeightGroup:
    """Join (rank 0: host) the group at ``host:port``; blocks until all ``world`` members joined."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout)
    prefixed = dist.PrefixStore("alignreg-weights", store)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world, timeout)
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, world, opts)
    else:
        raise ValueError(f"weight group backend must be 'gloo' or 'nccl', got {backend!r}")
    return WeightGroup(backend, rank, world, pg, store)


def tensor_meta(named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of each tensor, in send order: all a receiver needs to lay out the buckets."""
    return [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in named]


def bucket_plan(meta: Sequence[tuple[str, str, tuple[int, ...]]], bucket_bytes: int) -> list[list[tuple[int, int, int]]]:
    """Split tensors (in order) into buckets of at most ``bucket_bytes`` (a larger tensor gets a bucket of
    its own): per bucket ``[(tensor index, byte offset, nbytes)]``, offsets ``ALIGN``-aligned so that every
    dtype view of a slice is aligned. Sender and receiver derive the same plan from the same meta."""
    buckets: list[list[tuple[int, int, int]]] = []
    cur: list[tuple[int, int, int]] = []
    used = 0
    for i, (_, dtype, shape) in enumerate(meta):
        nbytes = math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        if cur and used + nbytes > bucket_bytes:
            buckets.append(cur)
            cur, used = [], 0
        cur.append((i, used, nbytes))
        used += -(-nbytes // ALIGN) * ALIGN
    if cur:
        buckets.append(cur)
    return buckets


def _bucket_size(bucket: list[tuple[int, int, int]]) -> int:
    return max(ALIGN, bucket[-1][1] + bucket[-1][2])


@torch.no_grad()
def send_weights(group: WeightGroup, named: Sequence[tuple[str, torch.Tensor]], bucket_bytes: int) -> None:
    """Group rank 0: broadcast ``named`` bucket by bucket (one collective per bucket, not per tensor:
    a per-call cost times hundreds of small tensors would dominate on gloo)."""
    for bucket in bucket_plan(tensor_meta(named), bucket_bytes):
        buf = torch.empty(_bucket_size(bucket), dtype=torch.uint8, device=group.device)
        for i, off, nbytes in bucket:
            buf[off : off + nbytes].copy_(named[i][1].detach().contiguous().reshape(-1).view(torch.uint8))
        group.pg.broadcast(buf, 0).wait()


class BucketLedger:
    """Bytes of received buckets that are still alive, and their peak over one receive.

    A bucket counts as alive while any ``(name, tensor)`` view yielded from it is referenced (by the
    loader that buffers a layer's weights until the layer is complete, or by the checksum thread). This
    measures what the streamed receive is for: the engine holds a few buckets at a time, not a second
    copy of the model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.live = 0  # bytes of buckets alive now
        self.peak = 0  # most bytes alive at once
        self.total = 0  # bytes received

    def opened(self, key: int, nbytes: int, views: Sequence[torch.Tensor]) -> None:
        with self._lock:
            self._refs[key], self._sizes[key] = len(views), nbytes
            self.live += nbytes
            self.total += nbytes
            self.peak = max(self.peak, self.live)
        for v in views:
            weakref.finalize(v, self._dropped, key)

    def _dropped(self, key: int) -> None:
        with self._lock:
            self._refs[key] -= 1
            if self._refs[key] == 0:
                self.live -= self._sizes.pop(key)
                del self._refs[key]


@torch.no_grad()
def iter_received_weights(group: WeightGroup, meta: Sequence[tuple[str, str, tuple[int, ...]]], bucket_bytes: int,
                          ledger: Optional[BucketLedger] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Group ranks >= 1: receive what :func:`send_weights` sends, one bucket at a time, yielding
    ``(name, view)`` into the current bucket. The next bucket is received only when the consumer asks for
    its first tensor, and a bucket is freed once the consumer has dropped its views, so a consumer that
    loads as it goes (vLLM's layer-wise ``reload_weights``) never holds a second full copy of the weights."""
    for k, bucket in enumerate(bucket_plan(meta, bucket_bytes)):
        buf = torch.empty(_bucket_size(bucket), dtype=torch.uint8, device=group.device)
        group.pg.broadcast(buf, 0).wait()
        views = [(meta[i][0], buf[off : off + nbytes].view(getattr(torch, meta[i][1])).view(meta[i][2]))
                 for i, off, nbytes in bucket]
        if ledger is not None:
            ledger.opened(k, buf.numel(), [v for _, v in views])
        del buf
        while views:
            yield views.pop(0)  # hold no reference to what was handed out


def receive_weights(group: WeightGroup, meta: Sequence[tuple[str, str, tuple[int, ...]]],
                    bucket_bytes: int) -> list[tuple[str, torch.Tensor]]:
    """:func:`iter_received_weights` collected: every tensor at once (a full copy of the weights)."""
    return list(iter_received_weights(group, meta, bucket_bytes))


def collective_backend(sync: SyncConfig, ray_cfg: RayConfig) -> str:
    """``sync.collective_backend`` resolved: ``auto`` is NCCL when learners and engines each hold whole GPUs
    (``RayConfig.whole_gpus``), else gloo."""
    if sync.collective_backend != "auto":
        return sync.collective_backend
    return "nccl" if ray_cfg.whole_gpus else "gloo"
