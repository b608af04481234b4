"""HF rollout engine: sampling log-probs vs a teacher-forced forward, EOS cut, seeding, weight sync."""
import pytest
import torch

from alignreg.config import ModelConfig
from alignreg.models import encode_prompts, load_policy
from alignreg.rollout.base import RolloutEngine, SamplingParams, weights_checksum
from alignreg.rollout.hf import HFRolloutEngine
from alignreg.warmstart import sft_warm_start

PROMPTS = ["3+5=", "12+7=", "1+1=", "40+41="]  # different lengths -> left padding is exercised


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are op-overhead bound: one intra-op thread is as fast on an idle machine and
    avoids OpenMP spin-waiting, which made this file ~10x slower on a busy 2-core CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def policy():
    return load_policy(ModelConfig(), seed=0)


def teacher_forced_logprobs(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.9, 5)])
def test_sampling_logprobs_match_teacher_forcing(policy, temperature, top_p, top_k):
    model, tok = policy
    engine = HFRolloutEngine(model, tok)
    assert isinstance(engine, RolloutEngine)
    prompts = encode_prompts(tok, PROMPTS)
    sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, n=3, max_new_tokens=10, seed=0)
    batch = engine.generate(prompts, sp)
    assert len(batch) == 12 and batch.prompt_index == [i // 3 for i in range(12)]
    for p, r, lp, i in zip(batch.prompt_ids, batch.response_ids, batch.logprobs, batch.prompt_index):
        assert p == prompts[i] and len(lp) == len(r) > 0
        # full-distribution log-probs even when top-p/top-k truncated the sampling distribution
        ref = teacher_forced_logprobs(model, p, r, temperature)
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), ref, atol=1e-4, rtol=0)
    if top_k:  # every sampled token lies in the teacher-forced top-k
        for p, r in zip(batch.prompt_ids, batch.response_ids):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
            assert all(t in logits[j].topk(top_k).indices for j, t in enumerate(r))


def test_bf16_autocast_samples_from_the_policy_as_the_bf16_learner_computes_it(policy):
    """``learner.mixed_precision=bf16``: the engine generates under the same autocast with the lm head and
    log-softmax outside it, in float32, as the learner's loss computes them (``sequence_logprobs``: the
    body under autocast, ``token_stats``), so its sampling log-probs equal the learner's up to float32
    rounding. A bf16 lm head (the whole forward under autocast) and a float32 body are both far off."""
    from alignreg.learner.policy import sequence_logprobs

    model, tok = policy
    engine = HFRolloutEngine(model, tok, autocast=torch.bfloat16)
    for T in (1.0, 0.7):
        batch = engine.generate(encode_prompts(tok, PROMPTS), SamplingParams(n=3, max_new_tokens=10, seed=0, temperature=T))

        def gap(reference) -> float:
            return max(float((torch.tensor(lp, dtype=torch.float64) - torch.as_tensor(reference(p, r), dtype=torch.float64)).abs().max())
                       for p, r, lp in zip(batch.prompt_ids, batch.response_ids, batch.logprobs))

        def bf16_head(p, r):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return teacher_forced_logprobs(model, p, r, T)

        assert gap(lambda p, r: sequence_logprobs(model, p, r, T, torch.bfloat16)) < 2e-6
        assert gap(lambda p, r: engine.logprobs_of(p, r, T)) < 2e-6  # the parity probe's engine side
        assert gap(bf16_head) > 5e-4 and gap(lambda p, r: sequence_logprobs(model, p, r, T)) > 5e-4
    assert next(engine.model.parameters()).dtype == torch.float32
    assert "forward" not in vars(model.get_output_embeddings())  # only the engine's copy runs its head apart


def test_eos_cut_and_finished_flags(policy):
    model, tok = policy
    trained = load_policy(ModelConfig(), seed=0)[0]
    records = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+3=", "answer": "5"}]
    m = sft_warm_start(trained, tok, records, steps=60, lr=1e-2, batch_size=2, seed=0)
    assert m["warmstart/loss_last"] < 0.1 * m["warmstart/loss_first"]
    engine = HFRolloutEngine(trained, tok)
    # one prompt answers and stops, one is cut at max_new_tokens: rows of different lengths
    prompts = encode_prompts(tok, ["1+1=", "2+3="]) + [encode_prompts(tok, ["1+1="])[0][:-1]]
    batch = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=6))
    texts = tok.batch_decode(batch.response_ids, skip_special_tokens=True)
    assert texts[:2] == ["2", "5"] and batch.finished[:2] == [True, True]
    eos = tok.eos_token_id
    for r, lp, fin in zip(batch.response_ids, batch.logprobs, batch.finished):
        assert len(lp) == len(r) <= 6
        assert (eos in r) == fin and (not fin or r.index(eos) == len(r) - 1)  # nothing after EOS
        assert tok.pad_token_id not in r
        assert fin or len(r) == 6
    assert batch.response_ids[0] == [tok.convert_tokens_to_ids("2"), eos]


def test_stop_tokens_end_a_response_as_eos_does(policy):
    """``rollout.stop_tokens``: a response ends at (and keeps) its first stop token, finished; the
    tokens before it are what the engine samples without the stop (same seed), with their log-probs."""
    model, tok = policy
    prompts = encode_prompts(tok, PROMPTS)
    sp = SamplingParams(temperature=1.0, n=3, max_new_tokens=12, seed=5)
    base = HFRolloutEngine(model, tok).generate(prompts, sp)
    x = next(t for r in base.response_ids for t in r[1:-1] if t != tok.eos_token_id)  # emitted mid-response
    stopped = HFRolloutEngine(model, tok, stop_ids=[x]).generate(prompts, sp)
    cut = 0
    for r0, lp0, fin0, r, lp, fin in zip(base.response_ids, base.logprobs, base.finished,
                                         stopped.response_ids, stopped.logprobs, stopped.finished):
        if x in r0:
            assert r == r0[: r0.index(x) + 1] and fin, (r0, r)
            cut += 1
        else:
            assert r == r0 and fin == fin0
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(lp0[: len(r)]), atol=1e-5, rtol=0)
    assert cut >= 1


def test_greedy_is_deterministic_and_padding_invariant(policy):
    model, tok = policy
    engine = HFRolloutEngine(model, tok)
    prompts = encode_prompts(tok, PROMPTS)
    sp = SamplingParams(greedy=True, max_new_tokens=8)
    a, b = engine.generate(prompts, sp), engine.generate(prompts, sp)
    assert a.response_ids == b.response_ids
    singles = [engine.generate([p], sp).response_ids[0] for p in prompts]
    assert singles == a.response_ids
    for p, r in zip(a.prompt_ids, a.response_ids):
        logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
        assert logits.argmax(-1).tolist() == r


def test_greedy_with_n_gives_n_copies_as_the_vllm_engine(policy):
    """Greedy decoding with n > 1 (``generate`` refuses num_return_sequences > 1 without sampling): n
    identical copies of each prompt's greedy response, adjacent, as the vLLM engine returns them."""
    model, tok = policy
    prompts = encode_prompts(tok, PROMPTS)
    for shared in (True, False):
        engine = HFRolloutEngine(model, tok, shared_prefill=shared)
        one = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=8, temperature=0.7))
        three = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=8, temperature=0.7, n=3))
        assert three.prompt_index == [i // 3 for i in range(12)]
        assert three.response_ids == [r for r in one.response_ids for _ in range(3)]
        assert three.logprobs == [lp for lp in one.logprobs for _ in range(3)]
        assert three.finished == [f for f in one.finished for _ in range(3)]


def test_a_checkpoint_generation_config_does_not_change_sampling(policy, tmp_path):
    """A checkpoint's generation_config.json (penalties, top-k/top-p, temperature...) must not reach
    ``generate``: it fills every setting a call leaves unset from the model's generation_config, and a
    repetition penalty there changed the samples (their log-probs are computed without it)."""
    import json

    import transformers

    model, tok = policy
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    gc = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({
        **gc, "do_sample": True, "repetition_penalty": 5.0, "top_k": 1, "top_p": 0.5, "temperature": 0.3,
        "no_repeat_ngram_size": 1, "min_new_tokens": 3}))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, attn_implementation="eager")
    assert loaded.generation_config.repetition_penalty == 5.0 and loaded.generation_config.top_k == 1
    prompts = encode_prompts(tok, PROMPTS)
    for sp in (SamplingParams(n=3, max_new_tokens=10, seed=0), SamplingParams(temperature=0.7, top_p=0.9, n=2, max_new_tokens=10, seed=1),
               SamplingParams(greedy=True, max_new_tokens=10)):
        want = HFRolloutEngine(model, tok).generate(prompts, sp)
        got = HFRolloutEngine(loaded, tok).generate(prompts, sp)
        assert got.response_ids == want.response_ids and got.finished == want.finished
        torch.testing.assert_close(torch.tensor(sum(got.logprobs, [])), torch.tensor(sum(want.logprobs, [])), atol=1e-6, rtol=0)
    assert loaded.generation_config.repetition_penalty == 5.0  # the engine blanked its own copy's only


def test_seeded_sampling_reproducible_and_leaves_global_rng(policy):
    model, tok = policy
    engine = HFRolloutEngine(model, tok)
    prompts = encode_prompts(tok, PROMPTS)
    state = torch.get_rng_state()
    a = engine.generate(prompts, SamplingParams(n=4, seed=5, max_new_tokens=8))
    assert torch.equal(torch.get_rng_state(), state)
    assert engine.generate(prompts, SamplingParams(n=4, seed=5, max_new_tokens=8)).response_ids == a.response_ids
    assert engine.generate(prompts, SamplingParams(n=4, seed=6, max_new_tokens=8)).response_ids != a.response_ids


def test_load_weights_syncs_and_is_strict(policy):
    model, tok = policy
    other = load_policy(ModelConfig(), seed=1)[0]
    engine = HFRolloutEngine(model, tok)
    prompts = encode_prompts(tok, PROMPTS)
    sp = SamplingParams(greedy=True, max_new_tokens=8)  # random tied models repeat the last
    # prompt token greedily, so compare log-probs (which see every weight), not only token ids
    before = engine.generate(prompts, sp)
    original = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():  # the engine owns a copy: learner updates are invisible until a sync
        model.model.embed_tokens.weight.add_(1.0)
    assert engine.generate(prompts, sp).logprobs == before.logprobs
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(original)

    assert engine.weights_checksum() != pytest.approx(weights_checksum(other.named_parameters()))
    engine.load_weights(other.named_parameters())
    assert engine.weights_checksum() == pytest.approx(weights_checksum(other.named_parameters()), rel=1e-12)
    after = engine.generate(prompts, sp)
    assert after.logprobs != before.logprobs
    assert after.logprobs == HFRolloutEngine(other, tok).generate(prompts, sp).logprobs

    named = dict(model.named_parameters())
    with pytest.raises(KeyError, match="unknown"):
        engine.load_weights({**named, "model.layers.9.foo": torch.zeros(1)}.items())
    with pytest.raises(KeyError, match="missing"):
        engine.load_weights([(k, v) for k, v in named.items() if "layers.1." not in k])
    bad = {**named, "model.norm.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights(bad.items())
    # strict checks happen before any copy: the failed loads left the synced weights untouched
    assert engine.generate(prompts, sp).logprobs == after.logprobs
    # the tied alias name is accepted in place of the embedding name
    alias = {("lm_head.weight" if k == "model.embed_tokens.weight" else k): v for k, v in named.items()}
    engine.load_weights(alias.items())
    assert engine.generate(prompts, sp).logprobs == before.logprobs


def test_shared_prefill_gives_the_same_samples_on_fewer_positions(policy):
    """Each prompt's prefill runs once for its n samples (cache repeated in generate's order): the same
    seeded samples and log-probs as generate's own prefill of every repeated row, on fewer positions."""
    model, tok = policy
    engine = HFRolloutEngine(model, tok)
    seen = []
    engine.model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].numel()))
    prompts = encode_prompts(tok, PROMPTS)
    sp = SamplingParams(temperature=1.0, max_new_tokens=6, n=4, seed=7)
    shared = engine.generate(prompts, sp)
    shared_positions, seen[:] = sum(seen), []
    engine.shared_prefill = False  # generate's own prefill of every repeated row
    plain = engine.generate(prompts, sp)
    plain_positions = sum(seen)
    assert shared.response_ids == plain.response_ids and shared.prompt_index == plain.prompt_index
    for a, b in zip(shared.logprobs, plain.logprobs):
        assert a == pytest.approx(b, abs=1e-5)
    width = max(len(p) for p in prompts)
    assert plain_positions - shared_positions == (4 - 1) * len(prompts) * (width - 1)
