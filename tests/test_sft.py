"""``alignreg sft``: TRL SFTTrainer on the tiny model writes a checkpoint that ``alignreg rl`` starts from."""
import json

import pytest
import torch

from alignreg.config import ConfigError, ModelConfig, RLConfig, TaskConfig
from alignreg.learner.lora import load_any_policy
from alignreg.models import load_policy
from alignreg.sft import SFTRunConfig, correction_pairs, run_sft, sft_main


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_sft_full_and_lora_checkpoints_load_in_rl(tmp_path):
    task = TaskConfig(name="sort", min_length=3, max_length=4, eval_size=8, train_size=256)
    out = tmp_path / "sft"
    cfg_path = tmp_path / "sft.yaml"
    cfg_path.write_text(
        "task: {name: sort, min_length: 3, max_length: 4, eval_size: 8, train_size: 256}\n"
        f"steps: 30\nlr: 3.0e-3\nbatch_size: 32\nmax_length: 32\nthreads: 1\nlogging_steps: 10\n"
        f"correction_pairs: 0.5\noutput_dir: {out}\n")
    assert sft_main([str(cfg_path)]) == 0
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["steps"] == 30 and summary["loss_last"] < summary["loss_first"]
    # the same command again: nothing to do; other settings: refused (it overwrote the model RL runs start from)
    weights = (out / "model.safetensors").read_bytes()
    assert sft_main([str(cfg_path)]) == 0
    with pytest.raises(ConfigError, match=r"holds a finished SFT model \(30 steps\) trained with other settings \(lr "):
        sft_main([str(cfg_path), "lr=1e-2"])
    assert (out / "model.safetensors").read_bytes() == weights
    # RL starts from it: the trainer's model loader reads the directory (weights + tokenizer)
    rl = RLConfig(model=ModelConfig(path=str(out)), task=task)
    model, tok = load_policy(rl.model, 0)
    fresh, fresh_tok = load_policy(ModelConfig(), 0)
    assert tok("sort 3 21= x")["input_ids"] == fresh_tok("sort 3 21= x")["input_ids"]  # the saved tokenizer, spaces kept
    ids = torch.tensor([tok("sort 321=")["input_ids"]])
    assert not torch.allclose(_logits(model, ids), _logits(fresh, ids))
    from alignreg.orchestration.trainer import build_run

    rl.trainer.run_dir = str(tmp_path / "rl")
    rl.trainer.progress = False
    run = build_run(rl)
    try:
        assert torch.allclose(_logits(run.learner.learner.model if hasattr(run.learner, "learner") else run.learner.model, ids),
                              _logits(model, ids), atol=1e-5)
    finally:
        if hasattr(run, "close"):
            run.close()

    # LoRA: adapter in out/adapter, merged full weights in out (what alignreg rl loads)
    lout = tmp_path / "sft_lora"
    cfg = SFTRunConfig(task=task, steps=10, lr=1e-2, batch_size=32, max_length=32, threads=1, output_dir=str(lout))
    cfg.lora.enabled, cfg.lora.r = True, 4
    run_sft(cfg)
    assert (lout / "adapter" / "adapter_config.json").is_file() and (lout / "config.json").is_file()
    merged, _ = load_policy(ModelConfig(path=str(lout)), 0)
    adapter_config = json.loads((lout / "adapter" / "adapter_config.json").read_text())
    base_dir = tmp_path / "base"  # the adapter's base: the tiny model the SFT started from
    fresh.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    adapter_config["base_model_name_or_path"] = str(base_dir)
    (lout / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    adapted, _ = load_any_policy(lout / "adapter")
    assert torch.allclose(_logits(adapted, ids), _logits(merged, ids), atol=1e-4)
    assert not torch.allclose(_logits(merged, ids), _logits(fresh, ids))


def test_correction_pairs_format():
    recs = [{"prompt": "sort 321=", "answer": "123"}, {"prompt": "sort 9050=", "answer": "0059"}]
    pairs = correction_pairs(recs, 50, " check:", 0)
    assert len(pairs) == 50
    for p in pairs:
        head, y1 = p["prompt"].split("=")[0] + "=", p["prompt"].split("=")[1][: -len(" check:")]
        assert p["prompt"].endswith(" check:") and head in {r["prompt"] for r in recs}
        assert p["completion"] == next(r["answer"] for r in recs if r["prompt"] == head)
        assert len(y1) == len(p["completion"]) or len(y1) == len(p["completion"]) + 1
    assert any(p["prompt"].split("=")[1].startswith(p["completion"]) for p in pairs)  # kept right answers
    assert any(not p["prompt"].split("=")[1].startswith(p["completion"]) for p in pairs)  # wrong ones to fix


def test_sft_stops_on_sigterm_with_a_checkpoint_and_resumes_to_the_same_model(tmp_path):
    """SIGTERM / a first Ctrl-C ends the step in progress with a TRL checkpoint and no exported model; the
    same command continues from it to the weights of an uninterrupted run. A resume with other training
    settings is refused."""
    import os
    import signal

    import pytest
    from transformers import TrainerCallback

    from alignreg.config import ConfigError

    def cfg(out, **kw):
        task = TaskConfig(name="sort", min_length=3, max_length=4, eval_size=8, train_size=256)
        return SFTRunConfig(task=task, steps=8, lr=3e-3, batch_size=16, max_length=32, threads=1, logging_steps=1,
                            output_dir=str(tmp_path / out), **kw)

    class SigtermAt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:  # during step 4
                os.kill(os.getpid(), signal.SIGTERM)

    run_sft(cfg("straight"))
    before = signal.getsignal(signal.SIGTERM)
    stopped = run_sft(cfg("split"), callbacks=(SigtermAt(),))
    assert stopped["stopped"] == "SIGTERM" and stopped["steps"] == 4
    assert (tmp_path / "split" / "trl" / "checkpoint-4").is_dir()
    assert not (tmp_path / "split" / "config.json").exists()  # no model exported from an unfinished run
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(ConfigError, match=r"different settings: lr 0.003 -> 0.01\. A resume continues"):
        run_sft(SFTRunConfig(**{**cfg("split").__dict__, "lr": 1e-2}))
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):
        run_sft(cfg("split", resume=False))
    done = run_sft(cfg("split"))
    assert done["steps"] == 8 and "stopped" not in done
    a, _ = load_policy(ModelConfig(path=str(tmp_path / "straight")), 0)
    b, _ = load_policy(ModelConfig(path=str(tmp_path / "split")), 0)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6, msg=name)


def test_a_finished_output_dir_without_its_config_is_refused(tmp_path):
    (tmp_path / "sft_summary.json").write_text(json.dumps({"steps": 5}))
    with pytest.raises(ConfigError, match=r"holds a finished SFT model \(5 steps\) trained with other settings \(sft_config.yaml"):
        run_sft(SFTRunConfig(output_dir=str(tmp_path), steps=5))


def test_full_fine_tuning_in_half_precision_is_refused():
    """TRL's optimizer steps the model's own parameters: bfloat16 weights have no float32 master copy and
    most lr-sized updates round away. Full fine-tuning must load float32 (bf16: true adds autocast)."""
    from pathlib import Path

    from alignreg.config import from_dict, load_config

    with pytest.raises(ConfigError, match=r"config.model.dtype: bfloat16 with full fine-tuning .*set model.dtype: float32 "
                                          r"and bf16: true"):
        from_dict(SFTRunConfig, {"model": {"dtype": "bfloat16"}, "bf16": True})
    from_dict(SFTRunConfig, {"model": {"dtype": "bfloat16"}, "lora": {"enabled": True}})  # PEFT keeps float32 adapters
    shipped = load_config(SFTRunConfig, Path(__file__).resolve().parents[1] / "configs/sft/qwen25_math_1.5b_math.yaml")
    assert shipped.model.dtype == "float32" and shipped.bf16 and not shipped.lora.enabled


def _tiny(out, **kw):
    task = TaskConfig(name="sort", min_length=3, max_length=4, eval_size=8, train_size=64)
    return SFTRunConfig(task=task, steps=4, lr=3e-3, batch_size=8, max_length=32, threads=1, logging_steps=1,
                        output_dir=str(out), **kw)


def _same_weights(a_dir, b_dir):
    a, _ = load_policy(ModelConfig(path=str(a_dir)), 0)
    b, _ = load_policy(ModelConfig(path=str(b_dir)), 0)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6, msg=name)


def test_a_checkpoint_killed_mid_write_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path, capsys):
    """A kill while TRL writes checkpoint-N (trainer_state.json, written last, missing or cut off) left the
    run unresumable: the newest checkpoint-N was always taken. It is renamed, kept, and the run continues
    from the newest complete checkpoint to the weights of an uninterrupted run."""
    run_sft(_tiny(tmp_path / "straight"))
    split = tmp_path / "split"
    run_sft(_tiny(split, save_steps=2, keep_checkpoints=0))
    trl = split / "trl"
    state = (trl / "checkpoint-4" / "trainer_state.json").read_text()
    (trl / "checkpoint-4" / "trainer_state.json").write_text(state[: len(state) // 2])  # killed while writing it
    for f in ("sft_summary.json", "config.json", "model.safetensors"):  # before the export
        (split / f).unlink()
    capsys.readouterr()
    done = run_sft(_tiny(split, save_steps=2, keep_checkpoints=0))
    err = capsys.readouterr().err
    assert f"warning: {trl / 'checkpoint-4'} is incomplete" in err and "renamed to incomplete-checkpoint-4" in err
    assert f"resuming from {trl / 'checkpoint-2'}" in err
    assert done["steps"] == 4 and "stopped" not in done
    assert (trl / "incomplete-checkpoint-4" / "trainer_state.json").read_text() == state[: len(state) // 2]  # kept
    assert (trl / "checkpoint-4" / "trainer_state.json").is_file()  # written again by the resumed run
    _same_weights(tmp_path / "straight", split)


def test_only_incomplete_checkpoints_start_over_and_resume_false_renames_nothing(tmp_path, capsys):
    from alignreg.sft import _resume_from

    part = tmp_path / "trl" / "checkpoint-3"
    part.mkdir(parents=True)
    (part / "model.safetensors").write_bytes(b"partial")  # killed before the optimizer state
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):
        _resume_from(_tiny(tmp_path, resume=False), tmp_path)
    assert part.is_dir()
    assert _resume_from(_tiny(tmp_path), tmp_path) == (None, 0)
    assert "no complete checkpoint is left: training starts at step 0" in capsys.readouterr().err
    assert not part.exists() and (tmp_path / "trl" / "incomplete-checkpoint-3" / "model.safetensors").read_bytes() == b"partial"
    part.mkdir()  # the same step killed again: the earlier copy is kept too
    assert _resume_from(_tiny(tmp_path), tmp_path) == (None, 0)
    assert (tmp_path / "trl" / "incomplete-checkpoint-3.1").is_dir()


@pytest.mark.parametrize("lora", [False, True])
def test_a_run_killed_after_its_final_checkpoint_exports_it_without_training(tmp_path, lora):
    """A kill during the export (after checkpoint-N of the final step N): the same command used to hand
    that checkpoint to the Trainer, which trained step N + 1. It now exports it as it is."""
    from transformers import TrainerCallback

    class CountSteps(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    cfg = _tiny(tmp_path, save_steps=4)
    cfg.lora.enabled, cfg.lora.r = lora, 4
    first = run_sft(cfg)
    before, _ = load_policy(ModelConfig(path=str(tmp_path)), 0)
    for f in ("sft_summary.json", "config.json", "model.safetensors"):  # killed while exporting
        (tmp_path / f).unlink()
    if lora:
        import shutil

        shutil.rmtree(tmp_path / "adapter")
    count = CountSteps()
    again = run_sft(cfg, callbacks=(count,))
    assert count.steps == 0 and again["steps"] == 4 and "stopped" not in again
    assert again["loss_first"] == first["loss_first"] and again["loss_last"] == first["loss_last"]
    assert json.loads((tmp_path / "sft_summary.json").read_text()) == again
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() == lora
    after, _ = load_policy(ModelConfig(path=str(tmp_path)), 0)
    for (name, x), (_, y) in zip(before.state_dict().items(), after.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6, msg=name)
    assert run_sft(cfg) == again  # finished: nothing to do


def test_a_summary_cut_off_by_a_kill_is_written_again(tmp_path, capsys):
    """sft_summary.json was written in place, last: a kill mid-write left invalid JSON that every later run
    failed to parse. The run continues from its checkpoints (here: the final one, exported again)."""
    cfg = _tiny(tmp_path, save_steps=4)
    first = run_sft(cfg)
    text = (tmp_path / "sft_summary.json").read_text()
    (tmp_path / "sft_summary.json").write_text(text[: len(text) // 2])
    capsys.readouterr()
    again = run_sft(cfg)
    assert "sft_summary.json is not valid JSON (cut off by a kill" in capsys.readouterr().err
    assert json.loads((tmp_path / "sft_summary.json").read_text()) == again
    assert again["steps"] == 4 and again["loss_last"] == first["loss_last"]
    assert not (tmp_path / "sft_summary.json.tmp").exists()
