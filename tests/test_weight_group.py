"""The collective weight transport (``sync.transport: collective``): bucket layout, and a real gloo group
between two processes (learner rank 0 broadcasting, an engine receiving) with mixed dtypes and
bucket boundaries. The Ray runs that use it are in test_ray_runtime.py."""
from __future__ import annotations

import io
import multiprocessing as mp

import pytest
import torch

from alignreg.learner.deepspeed import _free_port
from alignreg.orchestration.weight_sync import ALIGN, bucket_plan, tensor_meta
from alignreg.rollout.base import weights_checksum


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(7, 5, generator=g)),
        ("b.bias", torch.randn(3, generator=g).to(torch.bfloat16)),
        ("c.big", torch.randn(64, 64, generator=g)),  # 16 KiB: larger than the test bucket, a bucket of its own
        ("d.idx", torch.arange(11, dtype=torch.int64)),
        ("e.half", torch.randn(2, 3, 4, generator=g).to(torch.float16)),
        ("f.scalar", torch.tensor(2.5)),
    ]


def test_bucket_plan_covers_every_tensor_once_aligned_and_within_the_budget():
    meta = tensor_meta(_tensors())
    plan = bucket_plan(meta, bucket_bytes=4096)
    assert sorted(i for b in plan for i, _, _ in b) == list(range(len(meta)))
    assert [i for b in plan for i, _, _ in b] == list(range(len(meta)))  # send order kept
    for b in plan:
        assert all(off % ALIGN == 0 for _, off, _ in b)
        ends = [off + n for _, off, n in b]
        assert all(e <= o for e, (_, o, _) in zip(ends, b[1:]))  # no overlap
        assert len(b) == 1 or ends[-1] <= 4096  # only a lone tensor may exceed the budget
    assert [len(b) for b in plan if any(meta[i][0] == "c.big" for i, _, _ in b)] == [1]
    assert len(bucket_plan(meta, bucket_bytes=1 << 30)) == 1


def _member(rank: int, port: int, bucket: int, out) -> None:
    from alignreg.orchestration.weight_sync import open_weight_group, receive_weights, send_weights

    group = open_weight_group("gloo", "127.0.0.1", port, rank, 3, timeout_s=60)
    named = _tensors()
    for _ in range(2):  # the group is reused across syncs
        if rank == 0:
            send_weights(group, named, bucket)
        else:
            got = receive_weights(group, tensor_meta(named), bucket)
    if rank:  # as bytes: a tensor put on the queue is shared through this process, which may exit before it is read
        buf = io.BytesIO()
        torch.save([(n, t.clone()) for n, t in got], buf)
        out.put((rank, buf.getvalue()))


@pytest.mark.parametrize("bucket", [4096, 1 << 20])
def test_gloo_group_delivers_every_byte_to_every_receiver(bucket):
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_member, args=(r, port, bucket, out)) for r in range(3)]
    for p in procs:
        p.start()
    got = {rank: torch.load(io.BytesIO(raw)) for rank, raw in (out.get(timeout=120) for _ in range(2))}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    sent = _tensors()
    for rank in (1, 2):
        assert [n for n, _ in got[rank]] == [n for n, _ in sent]
        for (_, a), (_, b) in zip(got[rank], sent):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert weights_checksum(got[rank]) == weights_checksum(sent)


def test_a_weight_buffer_without_room_is_a_clear_error_not_a_bus_error(tmp_path):
    """The shared-memory buffer's pages are allocated before it is mapped: a file system without room
    gives an error naming the size and the fix (a sparse file in a full tmpfs killed the writer with
    SIGBUS). Here the room is limited with RLIMIT_FSIZE (4 MiB) for a 16 MiB buffer, in a child process."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import resource, signal, torch
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit then raises EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 2**20, 4 * 2**20))
        from alignreg.config import WorkerError
        from alignreg.orchestration.weight_sync import SharedMemoryWeights
        w = SharedMemoryWeights({str(tmp_path / "alignreg-weights-t.bin")!r})
        try:
            w.write([("a", torch.zeros(4 * 2**20))])
        except WorkerError as e:
            print("ERROR:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no room for a 16 MiB buffer" in out.stdout  # first the temporary directory is tried
    assert "ERROR: weight sync: cannot allocate a 16 MiB weight buffer" in out.stdout and "free space there" in out.stdout
