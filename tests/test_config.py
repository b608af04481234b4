"""Config schema: overrides, schedules, round trip, and the light-import promise."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from alignreg.config import (
    ConfigError,
    RLConfig,
    Schedule,
    apply_overrides,
    coef_always_zero,
    from_dict,
    load_config,
    save_config,
)


def test_overrides_reach_nested_keys_and_list_items():
    data = {"regularizers": [{"name": "siren", "coef": 0.1}]}
    apply_overrides(data, ["learner.lr=3e-4", "regularizers.0.params.top_p=0.9", "eval.ks=[1,2]"])
    cfg = from_dict(RLConfig, data)
    assert cfg.learner.lr == 3e-4 and cfg.regularizers[0].params == {"top_p": 0.9} and cfg.eval.ks == [1, 2]
    with pytest.raises(ConfigError, match="index out of range"):
        apply_overrides({"regularizers": []}, ["regularizers.0.coef=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["learner.lr"])


def test_schedules():
    lin = Schedule(kind="linear", start=1.0, end=0.0, steps=10)
    assert lin.value(0) == 1.0 and lin.value(5) == 0.5 and lin.value(20) == 0.0
    cos = Schedule(kind="cosine", start=1.0, end=0.0, steps=10)
    assert math.isclose(cos.value(5), 0.5) and cos.value(10) == 0.0
    step = Schedule(kind="step", start=1.0, end=0.2, steps=3)
    assert [step.value(i) for i in range(5)] == [1.0, 1.0, 1.0, 0.2, 0.2]
    warm = Schedule(kind="constant", start=2.0, warmup_steps=4)
    assert [warm.value(i) for i in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert coef_always_zero(0.0) and coef_always_zero(Schedule(start=0.0))
    assert not coef_always_zero(Schedule(kind="linear", start=0.0, end=1.0))
    cfg = from_dict(RLConfig, {"regularizers": [{"name": "entropy", "coef": {"kind": "linear", "start": 0.1, "end": 0.0, "steps": 5}}]})
    assert isinstance(cfg.regularizers[0].coef, Schedule)


def test_resolved_config_round_trips(tmp_path):
    cfg = from_dict(RLConfig, {"regularizers": [{"name": "lp_reg", "coef": 1.0, "params": {"rho": 0.02}}], "deepspeed": {"zero_stage": 3}})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(RLConfig, tmp_path / "c.yaml") == cfg


def test_wrong_types_and_choices_name_the_key():
    with pytest.raises(ConfigError, match=r"config.rollout.group_size: expected an integer, got 'x'"):
        from_dict(RLConfig, {"rollout": {"group_size": "x"}})


@pytest.mark.parametrize("section, values, needle", [
    ("rollout", {"group_size": 1}, "config.rollout.group_size must be >= 2: the advantages"),  # silently all-zero advantages
    ("rollout", {"prompts_per_step": 0}, "config.rollout.prompts_per_step must be >= 1, got 0"),  # was ZeroDivisionError
    ("rollout", {"max_new_tokens": 0}, "config.rollout.max_new_tokens must be >= 1, got 0"),  # was a transformers traceback
    ("model", {"num_heads": 0}, "config.model.num_heads must be >= 1, got 0"),
    ("task", {"min_length": 5, "max_length": 3}, r"config.task.max_length \(3\) must be >= min_length \(5\)"),
    ("learner", {"betas": [0.9, 1.0]}, r"config.learner.betas must be two numbers in \[0, 1\)"),
    ("learner", {"grad_clip": -1.0}, "config.learner.grad_clip must be >= 0, got -1.0"),
    ("eval", {"ks": [0, 4]}, r"config.eval.ks must be >= 1 \(k of pass@k\), got \[0, 4\]"),
    ("trainer", {"steps": -1}, "config.trainer.steps must be >= 0, got -1"),  # was a silent run of nothing
    ("trainer", {"log_every": -2}, "config.trainer.log_every must be >= 0, got -2"),
    ("ray", {"num_engines": 0}, "config.ray.num_engines must be >= 1, got 0"),
    ("ray", {"num_cpus_per_actor": 0, "num_gpus_per_engine": 1}, r"config.ray.num_cpus_per_actor must be > 0 unless every "
                                                                  r"actor holds GPUs"),  # was Ray's "Bundles cannot be an empty"
    ("vllm", {"gpu_memory_utilization": 1.5}, r"config.vllm.gpu_memory_utilization must be in \(0, 1\]"),
    ("sync", {"timeout_s": 0}, "config.sync.timeout_s must be > 0"),
])
def test_out_of_range_values_name_the_key(section, values, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(RLConfig, {section: values})
    with pytest.raises(ConfigError, match=r"config.trainer.progress: expected true/false"):
        from_dict(RLConfig, {"trainer": {"progress": "yes"}})
    with pytest.raises(ConfigError, match=r"config.deepspeed.zero_stage: 1 is not a valid choice; valid choices: 2, 3"):
        from_dict(RLConfig, {"deepspeed": {"zero_stage": 1}})
    with pytest.raises(ConfigError, match=r"duplicate regularizer id 'siren'"):
        from_dict(RLConfig, {"regularizers": [{"name": "siren"}, {"name": "siren"}]})
    with pytest.raises(ConfigError, match="at most one ratio-transform"):
        from_dict(RLConfig, {"regularizers": [{"name": "grpo_guard"}, {"name": "grpo_guard", "id": "g2"}]})


def test_a_half_precision_vllm_engine_needs_a_half_precision_parity_tolerance():
    # vllm.dtype auto serves a bfloat16 checkpoint (model.dtype) in bfloat16
    with pytest.raises(ConfigError, match=r"vllm.dtype=auto \(a bfloat16 checkpoint, or a GPU: bfloat16\) serves in half"):
        from_dict(RLConfig, {"rollout": {"engine": "vllm"}, "model": {"dtype": "bfloat16"}})
    from_dict(RLConfig, {"rollout": {"engine": "vllm"}, "model": {"dtype": "bfloat16"}, "sync": {"parity_tol": 0.05}})
    from_dict(RLConfig, {"rollout": {"engine": "vllm"}})  # float32 checkpoint, CPU: float32 engine
    with pytest.raises(ConfigError, match=r"config.sync.parity_tol: 0.001 is a float32 tolerance, but vllm.dtype=bfloat16 "
                                          r"serves in half precision.*set sync.parity_tol to at least 0.01"):
        from_dict(RLConfig, {"rollout": {"engine": "vllm"}, "vllm": {"dtype": "bfloat16"}})
    for ok in ({"sync": {"parity_tol": 0.1}}, {"sync": {"verify": False}}, {"vllm": {"dtype": "float32"}},
               {"rollout": {"engine": "hf"}}):
        cfg = {"rollout": {"engine": "vllm"}, "vllm": {"dtype": "bfloat16"}}
        for k, v in ok.items():
            cfg[k] = {**cfg.get(k, {}), **v}
        from_dict(RLConfig, cfg)


def test_vllm_cpu_threads_bind_values():
    with pytest.raises(ConfigError, match=r"vllm.cpu_threads_bind must be 'auto', 'all', 'nobind' or CPU ids like '0-3'.*got 'every'"):
        from_dict(RLConfig, {"vllm": {"cpu_threads_bind": "every"}})
    for ok in ("auto", "all", "nobind", "0-3", "0,2,4-7", "1"):
        assert from_dict(RLConfig, {"vllm": {"cpu_threads_bind": ok}}).vllm.cpu_threads_bind == ok


def test_vllm_executor_values_and_layout():
    from alignreg.config import VLLMConfig
    from alignreg.rollout.vllm import executor_for

    with pytest.raises(ConfigError, match=r"vllm.executor must be 'auto', 'mp' or 'uni'; got 'ray'"):
        from_dict(RLConfig, {"vllm": {"executor": "ray"}})
    with pytest.raises(ConfigError, match=r"vllm.executor=uni runs one worker.*tensor_parallel_size must be 1 \(got 2\)"):
        from_dict(RLConfig, {"vllm": {"executor": "uni", "tensor_parallel_size": 2}})
    with pytest.raises(ConfigError, match=r"config.vllm.executor: 'uni' runs the model in the engine's process, which in a "
                                          r"local run is the learner's"):
        from_dict(RLConfig, {"rollout": {"engine": "vllm"}, "vllm": {"executor": "uni"}})
    assert from_dict(RLConfig, {"orchestration": "ray", "rollout": {"engine": "vllm"}, "vllm": {"executor": "uni"}})
    # auto: in the engine's own process (a Ray engine actor) with one worker, else a worker process
    assert executor_for(VLLMConfig(), own_process=True) == "uni"
    assert executor_for(VLLMConfig(), own_process=False) == "mp"
    assert executor_for(VLLMConfig(tensor_parallel_size=2), own_process=True) == "mp"
    assert executor_for(VLLMConfig(executor="mp"), own_process=True) == "mp"


def test_weight_sync_transport_choices_are_checked_against_the_layout():
    with pytest.raises(ConfigError, match=r"config.sync.transport: 'collective' needs orchestration: ray"):
        from_dict(RLConfig, {"sync": {"transport": "collective"}})
    for gpus in ({"num_gpus_per_learner": 1}, {"num_gpus_per_learner": 1, "num_gpus_per_engine": 0.5}):
        with pytest.raises(ConfigError, match=r"config.sync.collective_backend: 'nccl' needs whole GPUs on both sides"):
            from_dict(RLConfig, {"orchestration": "ray", "sync": {"transport": "collective", "collective_backend": "nccl"},
                                 "ray": gpus})
    with pytest.raises(ConfigError, match=r"config.sync.transport: 'nccl' is not a valid choice; valid choices: 'auto', "
                                          r"'shm', 'object_store', 'collective'"):
        from_dict(RLConfig, {"sync": {"transport": "nccl"}})
    with pytest.raises(ConfigError, match=r"config.sync.bucket_mb must be > 0"):
        from_dict(RLConfig, {"sync": {"bucket_mb": 0}})
    ok = from_dict(RLConfig, {"orchestration": "ray", "sync": {"transport": "collective", "collective_backend": "nccl"},
                              "ray": {"num_gpus_per_learner": 1, "num_gpus_per_engine": 1}})
    assert ok.sync.transport == "collective"
    from alignreg.orchestration.weight_sync import collective_backend

    from alignreg.config import RayConfig, SyncConfig

    assert [collective_backend(SyncConfig(), RayConfig(num_gpus_per_learner=lg, num_gpus_per_engine=eg))
            for lg, eg in ((1, 1), (0.5, 0.5), (0, 0), (2, 1))] == ["nccl", "gloo", "gloo", "nccl"]


def test_import_alignreg_stays_light():
    code = (
        "import sys, alignreg, alignreg.cli, alignreg.config, alignreg.regularizers, alignreg.losses.stats\n"
        "heavy = [m for m in ('ray', 'vllm', 'deepspeed', 'gymnasium', 'mujoco') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_stored_config_diff_shows_real_changes_only():
    """A resume compares the run's stored config with the new one: keys added to the schema since the
    run was written take their defaults, keys the schema no longer has are left out (no false changes)."""
    from alignreg.config import RLConfig, describe_diff, stored_config_diff, to_dict

    cfg = load_config(RLConfig, None, ["learner.lr=0.01", "regularizers=[{name: kl_ref, coef: 0.1}]"])
    stored = to_dict(cfg)
    assert stored_config_diff(RLConfig, stored, cfg) == []
    del stored["learner"]["weight_decay"]  # written before the key existed: its default then and now
    assert stored_config_diff(RLConfig, stored, cfg) == []
    stored["learner"]["lr"] = 0.02
    stored["regularizers"][0]["coef"] = {"kind": "linear", "start": 0.1, "end": 0.0, "steps": 10}
    diffs = stored_config_diff(RLConfig, stored, cfg)
    assert [d[0] for d in diffs] == ["regularizers.0.coef", "learner.lr"]  # schema order
    assert describe_diff(diffs) == ("regularizers.0.coef {end: 0.0, kind: linear, start: 0.1, steps: 10, "
                                    "warmup_steps: 0} -> 0.1, learner.lr 0.02 -> 0.01")
    stored["model"]["removed_key"] = 1  # a key this schema no longer has: compared where both have keys
    assert [d[0] for d in stored_config_diff(RLConfig, stored, cfg)] == ["regularizers.0.coef", "learner.lr"]


def test_sft_out_of_range_values_name_the_key():
    from alignreg.sft import SFTRunConfig

    with pytest.raises(ConfigError, match="config.batch_size must be >= 1, got 0"):
        from_dict(SFTRunConfig, {"batch_size": 0})
    with pytest.raises(ConfigError, match="config.correction_pairs must be >= 0, got -0.5"):
        from_dict(SFTRunConfig, {"correction_pairs": -0.5})


def test_regularizers_listing_shows_every_default(capsys):
    from alignreg.cli import main

    assert main(["regularizers"]) == 0
    out = capsys.readouterr().out
    assert "vae_hidden=[750, 750]" in out and "value_hidden=[256, 256, 256, 256]" in out  # list defaults (factories)
    assert "MISSING" not in out and "siren" in out and "top_p=0.8" in out


@pytest.mark.parametrize("name", ["score", "score_kl"])
def test_score_terms_need_two_attempt_episodes(name):
    """Outside SCoRe there is no attempt structure: score_kl would penalise every other prompt group."""
    with pytest.raises(ConfigError, match=f"'{name}' \\({name}\\) needs SCoRe's two-attempt episodes; set score.enabled: true"):
        from_dict(RLConfig, {"regularizers": [{"name": name, "coef": 0.1}]})
    from_dict(RLConfig, {"regularizers": [{"name": name, "coef": 0.1}], "score": {"enabled": True}})


def test_score_batch_holds_both_attempts():
    """A SCoRe batch has 2 x prompts_per_step x group_size rows: the mini-batch divides that."""
    base = {"rollout": {"prompts_per_step": 2, "group_size": 4}, "score": {"enabled": True}}
    assert from_dict(RLConfig, base).batch_rows == 16
    from_dict(RLConfig, {**base, "learner": {"mini_batch_size": 16, "micro_batch_size": 8}})
    with pytest.raises(ConfigError, match="mini_batch_size \\(12\\) must divide the batch size 16"):
        from_dict(RLConfig, {**base, "learner": {"mini_batch_size": 12}})
    assert from_dict(RLConfig, {**base, "score": {"enabled": False}}).batch_rows == 8


def test_drgrpo_policy_loss_refuses_another_aggregation():
    """policy_loss: drgrpo aggregates with seq-mean-token-sum-norm: a different loss_agg_mode was silently ignored."""
    with pytest.raises(ConfigError, match="algorithm.policy_loss: drgrpo aggregates with seq-mean-token-sum-norm, which "
                                          "overrides loss_agg_mode: seq-mean-token-mean; drop loss_agg_mode"):
        from_dict(RLConfig, {"algorithm": {"policy_loss": "drgrpo", "loss_agg_mode": "seq-mean-token-mean"}})
    for mode in ("token-mean", "seq-mean-token-sum-norm"):  # the default, or the one drgrpo uses
        from_dict(RLConfig, {"algorithm": {"policy_loss": "drgrpo", "loss_agg_mode": mode}})


def test_async_rollout_in_one_process_refuses_lora_dropout():
    base = {"trainer": {"async_rollout": True}, "lora": {"enabled": True, "dropout": 0.05}}
    with pytest.raises(ConfigError, match="lora.dropout: 0.05 with trainer.async_rollout in one process"):
        from_dict(RLConfig, base)
    from_dict(RLConfig, {**base, "orchestration": "ray"})
    from_dict(RLConfig, {**base, "lora": {"enabled": True, "dropout": 0.0}})


def test_override_and_value_edge_cases_are_one_line_errors_or_accepted():
    # strings YAML reads as numbers are strings where the schema wants one
    cfg = load_config(RLConfig, None, ["trainer.run_dir=2024", "vllm.cpu_threads_bind=0"])
    assert cfg.trainer.run_dir == "2024" and cfg.vllm.cpu_threads_bind == "0"
    # a path through a value is a config error, not a TypeError
    for bad in ("trainer.steps.x.y=1", "trainer.run_dir.a.b=1"):
        with pytest.raises(ConfigError, match=r"trainer.(steps|run_dir) is not a mapping"):
            apply_overrides({"trainer": {"steps": 3, "run_dir": "runs/x"}}, [bad])
    # a typo inside a coefficient schedule lists the schedule's keys
    with pytest.raises(ConfigError, match=r"coef.strt: unknown key; valid keys: end, kind, start, steps"):
        from_dict(RLConfig, {"regularizers": [{"name": "entropy", "coef": {"kind": "linear", "strt": 1}}]})
    for key, value in (("norm_len", -5), ("adv_eps", -1.0), ("tis_cap", -2.0)):
        with pytest.raises(ConfigError, match=f"algorithm.{key} must be >= 0"):
            from_dict(RLConfig, {"algorithm": {key: value}})


def test_string_overrides_keep_their_text_and_yaml_files_refuse_duplicate_keys(tmp_path):
    """YAML read run_dir=0755 as 493, template={question} as a mapping and 'x #1' as 'x'; a key given twice
    in a file silently lost its first value."""
    cfg = load_config(RLConfig, None, ["trainer.run_dir=runs/x #1", "math_data.template={question}",
                                       "math_data.system_prompt=Note: be brief", "score.instruction=' check:'",
                                       "learner.lr=1e-4", "learner.betas=[0.5,0.9]", "eval.ks=[1,4]"])
    assert (cfg.trainer.run_dir, cfg.math_data.template) == ("runs/x #1", "{question}")
    assert (cfg.math_data.system_prompt, cfg.score.instruction) == ("Note: be brief", " check:")  # quoted: YAML's reading
    assert (cfg.learner.lr, list(cfg.learner.betas), cfg.eval.ks) == (1e-4, [0.5, 0.9], [1, 4])
    for raw in ("0755", "2024_01", "12:30", "1.50"):
        assert load_config(RLConfig, None, [f"trainer.run_dir={raw}"]).trainer.run_dir == raw
    with pytest.raises(ConfigError, match=r"learner.lr: expected a number, got 'abc'"):
        load_config(RLConfig, None, ["learner.lr=abc"])
    f = tmp_path / "dup.yaml"
    f.write_text("learner:\n  lr: 5.0e-3\ntrainer:\n  steps: 3\nlearner:\n  micro_batch_size: 32\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: invalid YAML at line 5, column 1: duplicate key 'learner'"):
        load_config(RLConfig, f)
    f.write_text("learner:\n  betas: [0.9, 0.99\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 3, column 1: expected ',' or ']'"):
        load_config(RLConfig, f)


def test_empty_output_directories_and_bad_lora_or_score_values_are_refused():
    for key in ("trainer.run_dir=", "lora.alpha=-1", "lora.dropout=1.0", "score.second_max_new_tokens=-5"):
        with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
            load_config(RLConfig, None, [key])
    with pytest.raises(ConfigError, match=r"learner.betas: indexed override of a list .* learner.betas=\[...\]"):
        load_config(RLConfig, None, ["learner.betas.0=0.5"])


def test_actors_without_cpus_need_gpus_for_every_role():
    cfg = from_dict(RLConfig, {"ray": {"num_cpus_per_actor": 0, "num_gpus_per_engine": 1, "num_gpus_per_learner": 0.5}})
    assert cfg.ray.num_cpus_per_actor == 0
    with pytest.raises(ConfigError, match=r"config.ray.num_cpus_per_actor must be > 0"):
        from_dict(RLConfig, {"ray": {"num_cpus_per_actor": 0}})


def test_overrides_into_an_overridden_section_yaml_merge_keys_and_old_template_escapes(tmp_path):
    assert load_config(RLConfig, None, ["trainer={steps: 5}", "trainer.steps=3"]).trainer.steps == 3
    assert load_config(RLConfig, None, ["lora.target_modules=[q_proj, v_proj]", "lora.target_modules.0=k_proj"]
                       ).lora.target_modules == ["k_proj", "v_proj"]
    f = tmp_path / "merge.yaml"  # YAML merge keys are not duplicate keys
    f.write_text("regularizers:\n  - name: entropy\n    coef: &s {kind: linear, start: 0.1, end: 0.0, steps: 10}\n"
                 "  - name: kl_ref\n    coef: {<<: *s, start: 0.01}\n")
    assert load_config(RLConfig, f).regularizers[1].coef == Schedule(kind="linear", start=0.01, end=0.0, steps=10)
    with pytest.raises(ConfigError, match=r"are no longer escapes .* write \\boxed\{\} instead of \\boxed\{\{\}\}"):
        load_config(RLConfig, None, ["math_data.template={question} Put it in \\boxed{{}}."])
