"""Every real-run and demo config of the math / SCoRe work loads, validates and is consistent with
the GPU count its header states."""
import re
from pathlib import Path

import pytest

from alignreg.config import RLConfig, load_config
from alignreg.regularizers import build_regularizers
from alignreg.sft import SFTRunConfig

ROOT = Path(__file__).resolve().parents[1]
REAL = sorted((ROOT / "configs" / "rl").glob("qwen25_math_*.yaml"))


def test_real_run_matrix_is_complete():
    names = {p.stem for p in REAL}
    for size in ("1.5b", "7b"):
        for var in ("grpo", "siren", "lp_reg", "grpo_guard", "score"):
            assert f"qwen25_math_{size}_math_{var}" in names
        assert f"qwen25_math_{size}_gsm8k_grpo" in names


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_run_config(path):
    cfg = load_config(RLConfig, path)
    text = path.read_text()
    gpus = int(re.search(r"Hardware: (\d+) GPUs", text).group(1))
    r = cfg.ray
    assert cfg.orchestration == "ray" and cfg.rollout.engine == "vllm" and cfg.learner.backend == "deepspeed"
    assert r.num_engines * r.num_gpus_per_engine + r.learner_ranks * r.num_gpus_per_learner == gpus
    assert r.num_gpus_per_engine == cfg.vllm.tensor_parallel_size
    assert cfg.task.name in ("gsm8k", "math") and cfg.task.reward == "math_verify"
    assert cfg.math_data.max_prompt_tokens > 0
    new = cfg.rollout.max_new_tokens
    if cfg.score.enabled:  # x2 = x1 + y1 + instruction, then y2
        new += (cfg.score.second_max_new_tokens or cfg.rollout.max_new_tokens) + 64
        assert {t.term.id for t in build_regularizers(cfg.regularizers)} == {"score", "score_kl"}
    assert cfg.math_data.max_prompt_tokens + new <= cfg.vllm.max_model_len <= 4096  # Qwen2.5-Math context
    lc = cfg.learner  # learner.warmup_steps counts optimizer updates: 5 training steps in every recipe
    assert lc.warmup_steps == 5 * cfg.batch_rows // (lc.mini_batch_size or cfg.batch_rows) * lc.ppo_epochs
    variant = path.stem.split("_", 4)[-1]
    if variant not in ("grpo", "score"):
        assert [t.term.id for t in build_regularizers(cfg.regularizers)] == [variant]


@pytest.mark.parametrize("path", [ROOT / "configs/rl/tiny_score.yaml"], ids=["tiny_score"])
def test_demo_config(path):
    cfg = load_config(RLConfig, path)
    assert cfg.score.enabled and cfg.model.path == "runs/sft_tiny_sort"


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sft").glob("*.yaml")), ids=lambda p: p.stem)
def test_sft_configs(path):
    cfg = load_config(SFTRunConfig, path)
    assert cfg.steps > 0 and cfg.output_dir


@pytest.mark.parametrize("path", [p for p in REAL if p.stem.endswith("_siren")], ids=lambda p: p.stem)
def test_siren_configs_use_the_official_script_values(path):
    """siren.sh (REGULARIZERS.md §3.1-3.2): advantages without std normalisation, clip 0.28 / dual-clip 3,
    seq-mean-token-sum-norm, wd 0.1, 8-prompt mini-batches (16 updates per 128-prompt step), a 5-step warm-up."""
    cfg = load_config(RLConfig, path)
    a, lc = cfg.algorithm, cfg.learner
    assert a.advantage == "drgrpo" and a.eps_low == a.eps_high == 0.28 and a.dual_clip_c == 3.0
    assert a.loss_agg_mode == "seq-mean-token-sum-norm" and lc.lr == 1e-6 and lc.weight_decay == 0.1
    assert lc.mini_batch_size == 8 * cfg.rollout.group_size
    assert cfg.rollout.prompts_per_step * cfg.rollout.group_size // lc.mini_batch_size == 16
    assert lc.warmup_steps == 5 * 16  # siren.sh: 5 warm-up training steps (veRL steps its scheduler once per step)


@pytest.mark.parametrize("path", [p for p in REAL if p.stem.endswith("_grpo_guard")], ids=lambda p: p.stem)
def test_grpo_guard_configs_update_off_policy(path):
    """GRPO-Guard rescales pi_theta / pi_old, which is exactly 1 on-policy: the shipped configs make several
    updates per step (mini-batches), each rank's share a whole number of micro-batches."""
    cfg = load_config(RLConfig, path)
    lc, bs = cfg.learner, cfg.rollout.prompts_per_step * cfg.rollout.group_size
    assert lc.ppo_epochs * bs // (lc.mini_batch_size or bs) > 1
    share = lc.mini_batch_size // cfg.ray.learner_ranks
    assert lc.mini_batch_size % cfg.ray.learner_ranks == 0 and share % lc.micro_batch_size == 0


# ChatML as Qwen2.5-Math's tokenizer renders it (with no system turn given it writes the CoT instruction itself)
QWEN_MATH_COT = "Please reason step by step, and put your final answer within \\boxed{}."
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + QWEN_MATH_COT.replace("\\", "\\\\")
          + "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("path", REAL + sorted((ROOT / "configs" / "sft").glob("qwen25_math_*.yaml")), ids=lambda p: p.stem)
def test_real_run_prompts_are_qwen25_math_cot(path):
    """The prompt Qwen2.5-Math was tuned and evaluated with (its evaluation's ``qwen25-math-cot``, the RLVR papers'
    Qwen-Math template): the instruction as the system turn, the bare question as the user turn. The configs
    appended the instruction to the user turn, under the template's own system turn: the instruction twice."""
    from alignreg.data.math import render_prompt
    from alignreg.models import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = CHATML
    cfg = load_config(SFTRunConfig if path.parent.name == "sft" else RLConfig, path)  # a cold start sees the RL prompt
    assert render_prompt("What is $1+1$?", cfg.math_data, tok) == (
        f"<|im_start|>system\n{QWEN_MATH_COT}<|im_end|>\n<|im_start|>user\nWhat is $1+1$?<|im_end|>\n<|im_start|>assistant\n")
