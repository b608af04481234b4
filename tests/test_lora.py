"""LoRA: a learner step changes only adapter weights; engines generate with the merged update;
checkpoints hold the adapter and load back."""
import shutil

import pytest
import torch
import yaml

from alignreg.checkpoint import save_checkpoint
from alignreg.config import LoRAConfig, RLConfig, TaskConfig, from_dict, to_dict
from alignreg.data import prompt_dataset
from alignreg.learner.batch import collate
from alignreg.learner.lora import apply_lora, is_peft, load_any_policy, merged_weights
from alignreg.learner.policy import PolicyLearner
from alignreg.models import encode_prompts, lm_head_and_body, load_policy
from alignreg.regularizers import build_regularizers
from alignreg.rollout.base import SamplingParams
from alignreg.rollout.hf import HFRolloutEngine


def _batch(engine, tok, records, seed=0):
    prompts = encode_prompts(tok, [r["prompt"] for r in records])
    rb = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=5, seed=seed))
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(len(rb), generator=g)
    return collate(rb.prompt_ids, rb.response_ids, rb.logprobs, adv, adv, rb.prompt_index, tok.pad_token_id)


def test_lora_step_changes_only_adapters_and_engine_follows(tmp_path):
    cfg = RLConfig()
    cfg.task = TaskConfig(name="sort", min_length=3, max_length=4, eval_size=8, train_size=32)
    cfg.learner.lr = 5e-2
    cfg.lora = LoRAConfig(enabled=True, r=4, alpha=8.0)
    model, tok = load_policy(cfg.model, 0)
    engine = HFRolloutEngine(model, tok)  # engine built from the base model, as in the trainer
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = apply_lora(model, cfg.lora, base_path=tmp_path / "init")
    assert is_peft(pm)
    # B = 0 at init: merged weights are the base weights, lm_parts sees the same logits
    assert all(torch.equal(w, base[n]) for n, w in merged_weights(pm))
    body, w, b = lm_head_and_body(pm)
    ids = torch.tensor([[1, 20, 30, 40]])
    assert torch.allclose(body(ids) @ w.T, pm(input_ids=ids).logits, atol=1e-5)

    learner = PolicyLearner(pm, cfg, build_regularizers([]))
    train, _ = prompt_dataset(cfg.task)
    batch = _batch(engine, tok, train[:4])
    for step in range(2):
        learner.train_step(batch, step)
    changed = {n for n, p in pm.named_parameters() if n.replace("base_model.model.", "").replace(".base_layer", "") in base
               and not torch.equal(p, base[n.replace("base_model.model.", "").replace(".base_layer", "")])}
    assert not changed, f"frozen base weights changed: {sorted(changed)[:3]}"
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in pm.named_parameters())

    merged = dict(merged_weights(pm))
    assert set(merged) == set(base)
    assert any(not torch.equal(merged[n], base[n]) for n in base)
    prompts = encode_prompts(tok, [r["prompt"] for r in train[:4]])
    before = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=5))
    engine.load_weights(merged.items())
    after = engine.generate(prompts, SamplingParams(greedy=True, max_new_tokens=5))
    # the engine now samples from the adapted policy: its log-probs are the PEFT model's
    pm.eval()
    with torch.no_grad():
        for p, r, lps in zip(after.prompt_ids, after.response_ids, after.logprobs):
            logits = pm(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:len(p) - 1 + len(r)]
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(lps), want, atol=1e-4)
    assert before.logprobs != after.logprobs

    # checkpoint: the adapter (plus the base it points to) loads back to the same policy
    base_model, _ = load_policy(cfg.model, 0)
    base_model.save_pretrained(tmp_path / "init")
    tok.save_pretrained(tmp_path / "init")
    pm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # adapter only
    loaded, ltok = load_any_policy(tmp_path / "adapter")
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5)
    assert len(ltok) == len(tok)

    # an alignreg rl training checkpoint of a LoRA run (the run's init_policy/ + the learner state, adapters merged)
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "init", run / "init_policy")
    ck = save_checkpoint(run, 2, {"learner": learner.state_dict(), "step": 2},
                         files={"config.yaml": yaml.safe_dump(to_dict(cfg))})
    from_ckpt, ctok = load_any_policy(ck)
    assert not is_peft(from_ckpt) and len(ctok) == len(tok)
    from_ckpt.eval()
    with torch.no_grad():
        assert torch.allclose(from_ckpt(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5)
    # the attention kernel asked for, from each kind of directory (alignreg eval passes model.attn_implementation)
    for d in (tmp_path / "adapter", ck, tmp_path / "init"):
        assert load_any_policy(d, attn_implementation="sdpa")[0].config._attn_implementation == "sdpa", d
        assert load_any_policy(d)[0].config._attn_implementation == "eager", d


def test_lora_reference_is_the_base_model_without_a_copy(tmp_path):
    """With LoRA the KL reference is the policy with its adapters off: no second copy of the
    weights, and every loss term and update equals a run whose reference is a full base copy."""
    from alignreg.config import from_dict
    from alignreg.learner.lora import BaseModelView
    from alignreg.learner.policy import make_reference
    from alignreg.orchestration.workers import LearnerWorker

    terms = [{"name": "kl_ref", "coef": 0.5, "params": {"estimator": "full"}},
             {"name": "kl_ref", "id": "kl_k3", "coef": 0.2, "params": {"estimator": "k3"}}]
    cfg = from_dict(RLConfig, {"task": {"name": "sort", "min_length": 3, "max_length": 4, "eval_size": 8, "train_size": 32},
                               "learner": {"lr": 5e-2, "micro_batch_size": 5}, "regularizers": terms,
                               "lora": {"enabled": True, "r": 4, "alpha": 8.0}, "trainer": {"run_dir": str(tmp_path)}})
    base, tok = load_policy(cfg.model, 0)
    engine = HFRolloutEngine(base, tok)
    train, _ = prompt_dataset(cfg.task)
    batches = [_batch(engine, tok, train[4 * s:4 * s + 4], seed=s) for s in range(3)]

    runs = []
    for copy_ref in (False, True):
        model, _ = load_policy(cfg.model, 0)
        torch.manual_seed(0)  # the same adapter init in both runs
        worker = LearnerWorker(cfg, model=model, ref_model=make_reference(model) if copy_ref else None)
        ref = worker.learner.ref_model
        assert isinstance(ref, BaseModelView) != copy_ref
        metrics = [worker.train_step(b, s) for s, b in enumerate(batches)]
        runs.append((metrics, dict(worker.export_weights()), ref))
    (view_m, view_w, view), (copy_m, copy_w, _) = runs
    assert list(view.parameters()) == []  # no reference weights of its own
    assert view_m[-1]["reg/kl_ref/loss"] > 1e-6, "the adapters moved the policy away from the reference"
    for a, b in zip(view_m, copy_m):
        assert set(a) == set(b) and "reg/kl_k3/loss" in a
        for k in b:
            if not k.startswith("time/"):
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])), (k, a[k], b[k])
    for n, w in copy_w.items():
        torch.testing.assert_close(view_w[n], w, rtol=1e-5, atol=1e-6, msg=n)


def test_lora_refuses_adapters_on_the_output_embedding():
    """The learner's chunked statistics read the output embedding's weight, not the adapted forward: an
    lm_head adapter would get no gradient, and on a tied model an embed_tokens adapter would train one
    policy while the engines (merged weights) sample another."""
    import pytest

    from alignreg.config import ConfigError

    cfg = RLConfig()
    model, _ = load_policy(cfg.model, seed=0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tiny-qwen2 is tied
    for bad in (["q_proj", "lm_head"], ["embed_tokens"]):
        with pytest.raises(ConfigError, match=r"lora.target_modules: \['(lm_head|embed_tokens)'\] adapt the output embedding"):
            apply_lora(load_policy(cfg.model, seed=0)[0], LoRAConfig(enabled=True, target_modules=bad))
    # a misspelt name left that layer untrained (PEFT adapts what it finds); all misspelt: a PEFT traceback
    with pytest.raises(ConfigError, match=r"\['o_prj'\] name no module of this model; valid: \[.*'o_proj'"):
        apply_lora(load_policy(cfg.model, seed=0)[0], LoRAConfig(enabled=True, target_modules=["q_proj", "o_prj"]))
    with pytest.raises(ConfigError, match=r"lora.dropout must be in \[0, 1\)"):
        from_dict(RLConfig, {"lora": {"dropout": 1.5}})
    assert is_peft(apply_lora(model, LoRAConfig(enabled=True, target_modules=["q_proj", "self_attn.v_proj"])))


def test_warm_start_leaves_no_gradients_and_clipping_sees_only_trained_parameters():
    """A LoRA run's warm start trains the whole model; gradients it left on the frozen base weights
    inflated the learner's clipping norm (and broke exact resume: a resumed run has none)."""
    from alignreg.learner.policy import TorchBackend
    from alignreg.warmstart import sft_warm_start

    cfg = RLConfig()
    cfg.task = TaskConfig(name="sort", min_length=3, max_length=4, eval_size=8, train_size=32)
    cfg.lora = LoRAConfig(enabled=True, r=4, alpha=8.0)
    model, tok = load_policy(cfg.model, 0)
    train, _ = prompt_dataset(cfg.task)
    sft_warm_start(model, tok, train[:8], steps=2, lr=1e-3, batch_size=4, seed=0)
    assert all(p.grad is None for p in model.parameters())
    pm = apply_lora(model, cfg.lora)
    backend = TorchBackend(pm, cfg)
    for n, p in pm.named_parameters():
        p.grad = torch.full_like(p, 100.0 if not p.requires_grad else 0.01)  # frozen: huge; adapters: small
    trained = [p for p in pm.parameters() if p.requires_grad]
    want = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in trained])))
    assert backend.apply_update() == pytest.approx(want, rel=1e-5)
