"""Tiny Qwen2 + char tokenizer built in code: round trips, save/load, and the body/lm-head split."""
import pytest
import torch

from alignreg.config import ConfigError, ModelConfig
from alignreg.models import build_model, build_tokenizer, encode_prompts, lm_head_and_body, load_policy, load_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are op-overhead bound: one intra-op thread is as fast on an idle machine and
    avoids OpenMP spin-waiting, which made this file ~10x slower on a busy 2-core CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tokenizer_round_trip_and_specials():
    tok = build_tokenizer()
    text = "12+7=19 what is 3*4? (Answer: 12.)"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[1:]) == text  # Fuse decoder: no spaces inserted between tokens
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert tok.decode([tok.convert_tokens_to_ids("5"), tok.eos_token_id], skip_special_tokens=True) == "5"
    assert tok("~")["input_ids"][1] == tok.unk_token_id


def test_tokenizer_save_load_and_chat_template(tmp_path):
    tok = build_tokenizer()
    # saved next to its model, as init_policy/, final/ and SFT outputs are: AutoTokenizer would take the
    # class from config.json (a Qwen2Tokenizer, which drops the spaces) instead of the saved tokenizer
    build_model(ModelConfig(hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1, num_layers=1),
                len(tok), 0, tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in ["3+5=", "99-12= x\nY"]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert (loaded.pad_token, loaded.eos_token, loaded.bos_token) == ("<pad>", "<eos>", "<bos>")
    chat = loaded.apply_chat_template([{"role": "user", "content": "3+5="}], tokenize=False)
    assert chat == "<bos>3+5="
    ids = loaded.apply_chat_template([{"role": "user", "content": "3+5="}], tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert list(ids) == tok("3+5=")["input_ids"]


def test_build_model_is_seeded_and_leaves_global_rng():
    tok = build_tokenizer()
    cfg = ModelConfig(tie_word_embeddings=False)
    state = torch.get_rng_state()
    a, b, c = (build_model(cfg, len(tok), s, tok) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["model.embed_tokens.weight"], pc["model.embed_tokens.weight"])
    assert a.config.eos_token_id == tok.eos_token_id and a.config.pad_token_id == tok.pad_token_id
    assert a.lm_head.weight is not a.model.embed_tokens.weight


@pytest.mark.parametrize("tie", [True, False])
def test_lm_head_and_body_reproduce_logits_and_grads(tie):
    model, tok = load_policy(ModelConfig(tie_word_embeddings=tie), seed=0)
    ids = torch.tensor(encode_prompts(tok, ["12+34=", "5+6=77"]))
    mask = torch.ones_like(ids)
    body, weight, bias = lm_head_and_body(model)
    assert bias is None and weight.shape == (len(tok), 64)
    assert (weight is model.model.embed_tokens.weight) == tie
    logits = body(ids, mask) @ weight.T
    torch.testing.assert_close(logits, model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    logits.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_load_policy_local_dir_and_missing_path(tmp_path):
    model, tok = load_policy(ModelConfig(), seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_policy(ModelConfig(path=str(tmp_path)), seed=0)  # seed unused for a checkpoint
    ids = torch.tensor(encode_prompts(ltok, ["1+2="]))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ConfigError, match="not a local Hugging Face checkpoint"):
        load_policy(ModelConfig(path=str(tmp_path / "nope")), seed=0)


def _tiny(cls_name: str, vocab: int, **extra):
    import transformers

    cfg = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, cls_name)(cfg)


def test_a_model_with_a_final_logit_transform_is_refused_when_the_run_is_built(tmp_path):
    """The learner computes hidden @ lm_head.weight.T itself (lm_head_and_body): Gemma2's soft-capped
    logits (and any other final transform) would give it wrong log-probs, so build_run refuses the model."""
    from alignreg.config import RLConfig, load_config
    from alignreg.models import check_plain_lm_head
    from alignreg.orchestration.trainer import build_run
    from tests.test_trainer import DEMO

    tok = build_tokenizer()
    gemma = _tiny("Gemma2ForCausalLM", len(tok), final_logit_softcapping=30.0)
    gemma.save_pretrained(tmp_path / "gemma2")
    tok.save_pretrained(tmp_path / "gemma2")
    cfg = load_config(RLConfig, DEMO, [f"model.path={tmp_path / 'gemma2'}", f"trainer.run_dir={tmp_path / 'run'}",
                                       "warm_start.steps=0", "trainer.progress=false"])
    with pytest.raises(ConfigError, match=r"Gemma2ForCausalLM transforms its logits \(final_logit_softcapping=30.0"):
        build_run(cfg)
    assert not (tmp_path / "run" / "init_policy").exists()  # refused before anything was written

    cohere = _tiny("CohereForCausalLM", len(tok))  # logit_scale=0.0625 by default
    with pytest.raises(ConfigError, match=r"logit_scale=0.0625"):
        check_plain_lm_head(cohere)
    cohere.config.logit_scale = 1.0  # the module still scales: the forward check finds it
    with pytest.raises(ConfigError, match=r"logits differ from hidden @ lm_head.weight.T"):
        check_plain_lm_head(cohere)
    gemma.config.final_logit_softcapping = None  # a plain head: accepted, as tiny-qwen2 (tied or not)
    check_plain_lm_head(gemma)
    for tie in (True, False):
        check_plain_lm_head(build_model(ModelConfig(tie_word_embeddings=tie), len(tok), seed=0, tokenizer=tok))


def test_a_bf16_model_with_an_lm_head_bias_is_accepted():
    """Phi (lm head with a bias) in bf16 with logits of ~40: its head adds the bias inside the matmul, a
    separate add rounds once more (an ulp, 0.25 there); the check refused such a plain model."""
    import transformers

    from alignreg.models import check_plain_lm_head

    torch.manual_seed(0)
    phi = transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4))
    with torch.no_grad():
        phi.lm_head.weight.mul_(30)
        phi.lm_head.bias.normal_(0, 3)
    phi = phi.to(torch.bfloat16)
    assert float(phi(input_ids=torch.arange(8)[None]).logits.abs().max()) > 30
    check_plain_lm_head(phi)
    # a forward that scales its logits is still found in bf16
    phi.forward = (lambda f: lambda **kw: type(f(**kw))(logits=f(**kw).logits * 0.9))(phi.forward)
    with pytest.raises(ConfigError, match=r"logits differ from hidden @ lm_head.weight.T"):
        check_plain_lm_head(phi)


def test_every_process_loads_a_checkpoint_with_the_same_attention_kernel(tmp_path):
    """The one-process learner (load_policy) and the Ray learner / HF engine / reference actors
    (workers._load_hf) run a checkpoint with one kernel: transformers' default (sdpa) under ``auto``
    (the Ray side used to force eager), the configured one otherwise; tiny-qwen2 keeps eager."""
    from alignreg.config import RLConfig, from_dict
    from alignreg.orchestration.workers import _load_hf

    model, tok = load_policy(ModelConfig(), seed=3)
    assert model.config._attn_implementation == "eager"
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    for attn, want in (("auto", "sdpa"), ("eager", "eager"), ("sdpa", "sdpa")):
        cfg = from_dict(RLConfig, {"model": {"path": str(tmp_path), "attn_implementation": attn}})
        one_process, _ = load_policy(cfg.model, seed=0)
        in_actor = _load_hf(str(tmp_path), cfg)
        assert one_process.config._attn_implementation == in_actor.config._attn_implementation == want
    assert build_model(ModelConfig(attn_implementation="sdpa"), len(tok), 0, tok).config._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="attn_implementation: 'flash_attn' is not one of auto, eager, sdpa"):
        from_dict(RLConfig, {"model": {"attn_implementation": "flash_attn"}})
