"""The benchmark scripts measure what docs/benchmarks.md says: cheap checks of their set-up (no benchmark runs)."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def vs_trl_args(*argv: str):
    """bench_vs_trl's parsed arguments, as main() would build them."""
    import argparse

    mod = bench("bench_vs_trl")
    a = argparse.Namespace(steps=8, warmup=2, prompts=16, group=8, max_new=16, micro=64, hidden=256, layers=4,
                           lr=3e-4, threads=2, bf16=False, bf16_parity_tol=0.1, set=list(argv) or None)
    return mod, a


@pytest.mark.parametrize("overrides", [(), ("model.gradient_checkpointing=true", "learner.lr=1e-4",
                                              "model.attn_implementation=eager")])
def test_trl_peer_runs_the_same_work_as_alignreg(tmp_path, overrides):
    """TRL's GRPOConfig turns gradient checkpointing on by default (a recomputed forward in every backward);
    the peer must match alignreg's learner there, in the attention kernel, batch, lengths and optimizer settings."""
    mod, a = vs_trl_args(*overrides)
    cfg = mod.alignreg_config(a, str(tmp_path), str(tmp_path / "run"), ray=False)
    t = mod.trl_config(a, str(tmp_path), str(tmp_path / "trl"), use_vllm=False)
    assert t.gradient_checkpointing is cfg.model.gradient_checkpointing is bool(overrides)
    # the attention kernel: transformers' default on both sides under auto, else alignreg's choice
    assert (t.model_init_kwargs or {}).get("attn_implementation", "auto") == cfg.model.attn_implementation
    rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps == t.generation_batch_size == rows == 128
    assert t.per_device_train_batch_size == cfg.learner.micro_batch_size
    assert t.num_generations == cfg.rollout.group_size and t.num_iterations == cfg.learner.ppo_epochs == 1
    assert t.max_completion_length == cfg.rollout.max_new_tokens and t.temperature == cfg.rollout.temperature
    assert t.learning_rate == cfg.learner.lr and t.max_grad_norm == cfg.learner.grad_clip
    assert (t.epsilon, t.epsilon_high) == (cfg.algorithm.eps_low, cfg.algorithm.eps_high)
    assert t.max_steps == cfg.trainer.steps and t.beta == 0.0 and not cfg.regularizers


def test_weight_sync_timing_leaves_first_calls_out():
    """bench_weight_sync's ``timed``: the untimed warm-up calls take the first call's set-up (the parity
    probe's first call cost ~1.8 s against ~0.02 s after it), so ``--repeats 1`` reports a steady call."""
    import time

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.3 if len(calls) == 1 else 0.0)

    assert bench("bench_weight_sync").timed(fn, 1, warmup=1) < 0.1
    assert len(calls) == 2


def test_vs_trl_refuses_an_unknown_variant_before_running_any():
    import subprocess

    p = subprocess.run([sys.executable, str(BENCH / "bench_vs_trl.py"), "--variants", "trl,alignreg-locl"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown variants ['alignreg-locl']" in p.stderr and "alignreg-local" in p.stderr
    assert "RESULT" not in p.stdout


@pytest.mark.parametrize("search", ["lists", "brute"])
def test_prdc_bench_official_arm_penalises_the_same_neighbours(search):
    """bench_prdc's official learner (a full KD-tree query per actor step) and alignreg's PRDC give the same
    penalty on the same batch: the benchmark times the same work done two ways."""
    import numpy as np
    import torch

    from alignreg.offline.batch import ActorPenaltyBatch, OfflineSetup
    from alignreg.offline.datasets import OfflineData

    mod = bench("bench_prdc")
    args = type("A", (), {"data": "", "size": 3000})()
    data = OfflineData(mod.load(args))
    setup = OfflineSetup(data.states_np, data.actions_np, data.state_dim, data.action_dim, 1.0, 0)
    ours, theirs = mod.learner("prdc", data, search=search), mod.learner("prdc_official", data)
    ours.setup(setup)
    term = ours.penalties.terms[0].term
    assert term.index.search == search
    official = theirs.penalties.terms[0].term
    official.index = term.index
    b = data.sample(256, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pi = ours.actor(b.states) + 0.3 * torch.randn(256, data.action_dim, generator=torch.Generator().manual_seed(1))
    pb = ActorPenaltyBatch(b.states, b.actions, pi, None, b.indices, 2)
    mine, _ = term.actor_penalty(pb)
    ref, _ = official.actor_penalty(pb)
    assert float(ref) > 0 and np.isclose(float(mine), float(ref), rtol=1e-6)
