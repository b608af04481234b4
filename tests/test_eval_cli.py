"""``alignreg eval`` on a saved checkpoint: metrics table printed and written; pass@k / maj@k."""
import json

import pytest

from alignreg.config import ConfigError, ModelConfig
from alignreg.evaluate import eval_main, majority_correct, normalise_answer
from alignreg.models import load_policy


def test_majority_vote_and_normalisation():
    assert majority_correct(["1", "2", "2", "3"], [True, False, False, False], 4) is False
    assert majority_correct(["1", "2", "1", "2"], [True, False, True, False], 4) is True  # tie: first seen
    assert majority_correct(["5", "5", "7"], [True, True, False], 1) is True
    assert normalise_answer("so \\boxed{ 1/2 }") == normalise_answer("#### 1/2") == "1/2"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model, tok = load_policy(ModelConfig(), 0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_eval_cli_on_a_file_with_self_correction(checkpoint, tmp_path, capsys):
    data = tmp_path / "sort.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"sort {s}=", "answer": "".join(sorted(s))}) for s in
                              ["321", "907", "5521", "8080", "13", "999"]) + "\n")
    out = tmp_path / "out"
    rc = eval_main([str(checkpoint), "--data", str(data), "--format", "prompt_answer", "--self-correct", "--out", str(out),
                    "task.reward=exact_match", "eval.num_samples=4", "eval.ks=[1,2,4]", "rollout.max_new_tokens=5",
                    "score.instruction=' check:'", "math_data.template=plain", "trainer.threads=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    for key in ("greedy_acc", "pass@1", "pass@4", "maj@4", "accuracy@t1", "accuracy@t2", "delta_t1_t2", "delta_i2c", "delta_c2i"):
        assert f"| {key} |" in printed
    result = json.loads((out / f"eval_{tmp_path.name}_sort.json").read_text())
    assert result["settings"]["max_new_tokens"] == 5 and result["settings"]["num_samples"] == 4
    assert result["settings"]["self_correct"] and result["settings"]["instruction"] == " check:"
    m = result["metrics"]
    assert m["num_problems"] == 6 and 0.0 <= m["pass@1"] <= m["pass@2"] <= m["pass@4"] <= 1.0
    assert m["delta_t1_t2"] == pytest.approx(m["accuracy@t2"] - m["accuracy@t1"])
    assert (out / f"eval_{tmp_path.name}_sort.md").read_text().startswith("### ")


def test_eval_cli_on_gsm8k_with_math_verify(checkpoint, tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"What is {a} plus {a}?", "answer": f"{a}+{a}={2 * a}\n#### {2 * a}"})
                              for a in range(3)) + "\n")
    args = [str(checkpoint), "--data", str(data), "--format", "gsm8k", "eval.num_samples=2", "eval.ks=[1,2]",
            "math_data.template=plain"]
    with pytest.raises(ConfigError, match=r"set the response length, e.g. rollout.max_new_tokens=1024"):
        eval_main(args)  # the default response length (8 tokens) is the tiny task's: a math file needs its own
    with pytest.raises(ConfigError, match=r"set the response length"):
        eval_main(args + ["rollout={temperature: 0.7}"])  # a rollout section without the length
    with pytest.raises(ConfigError, match=r"\+ rollout.max_new_tokens \(1024\) > 128"):
        eval_main(args + ["rollout.max_new_tokens=1024"])  # as alignreg rl: a response that cannot fit the context
    assert eval_main(args + ["rollout.max_new_tokens=4"]) == 0
    m = json.loads((checkpoint / f"eval_{tmp_path.name}_test.json").read_text())["metrics"]  # default: next to the checkpoint
    assert m["num_problems"] == 3 and "maj@2" in m and "accuracy@t1" not in m
    assert "math_verify" in capsys.readouterr().out
