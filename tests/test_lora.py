"""LoRA: a learner step changes only adapter weights; engines generate with the merged update;
checkpoints hold the adapter and load back."""
import torch

from alignreg.config import LoRAConfig, RLConfig, TaskConfig
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
