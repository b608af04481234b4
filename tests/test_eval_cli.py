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
    # two spellings of the correct answer are one answer: 2 votes against the wrong "0.25"'s 2, seen first
    assert majority_correct(["0.5", "0.25", "\\frac12", "0.25"], [True, False, True, False], 4) is True
    assert majority_correct(["0.25", "0.5", "0.25", "\\frac12"], [False, True, False, True], 4) is False  # tie, wrong first
    assert majority_correct(["1/2", "0.5", "0.5", "3", "3", "3"], [True, True, True, False, False, False], 6) is True
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


class _TableEngine:
    """Answers by prompt text: greedy first attempts ``greedy[p]``, samples ``samples[p][:n]``, and a second
    attempt (the prompt holds ``score.instruction``) ``second[p]``, for the record prompt ``p`` it starts with."""

    def __init__(self, tok, greedy, samples, second, instruction):
        self.tok, self.greedy, self.samples, self.second, self.instruction = tok, greedy, samples, second, instruction

    def generate(self, prompts, sampling):
        from alignreg.rollout.base import RolloutBatch

        batch = RolloutBatch()
        for i, p in enumerate(prompts):
            text = self.tok.decode(p, skip_special_tokens=True)
            key = next(k for k in self.greedy if text.startswith(k))
            if self.instruction.strip() in text[len(key):]:
                assert sampling.greedy and sampling.n == 1
                answers = [self.second[key]]
            else:
                answers = [self.greedy[key]] if sampling.greedy else self.samples[key][: sampling.n]
            for a in answers:
                ids = self.tok(a, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                batch.prompt_ids.append(p)
                batch.response_ids.append(ids)
                batch.logprobs.append([0.0] * len(ids))
                batch.prompt_index.append(i)
                batch.finished.append(True)
        return batch


def test_eval_metric_values_on_scripted_answers():
    """evaluate_checkpoint's numbers from answers of known correctness (4 problems, 4 samples each):
    greedy 2/4 right; samples right 2, 3, 4, 1 times; majority of the 4 samples right for all, of the first
    1-2 for 3; second attempts fix 2 wrong first attempts and break 1 right one."""
    import math

    from alignreg.config import RLConfig, load_config
    from alignreg.evaluate import evaluate_checkpoint
    from alignreg.models import build_tokenizer
    from alignreg.orchestration.score import score_evaluate

    tok = build_tokenizer()
    records = [{"prompt": "sort 21=", "answer": "12"}, {"prompt": "sort 43=", "answer": "34"},
               {"prompt": "sort 5=", "answer": "5"}, {"prompt": "sort 87=", "answer": "78"}]
    engine = _TableEngine(
        tok, greedy={"sort 21=": "12", "sort 43=": "43", "sort 5=": "5", "sort 87=": "87"},
        samples={"sort 21=": ["12", "13", "13", "12"], "sort 43=": ["43", "34", "34", "34"],
                 "sort 5=": ["5", "5", "5", "5"], "sort 87=": ["78", "1", "2", "3"]},
        second={"sort 21=": "21", "sort 43=": "34", "sort 5=": "5", "sort 87=": "78"}, instruction=" check:")
    cfg = load_config(RLConfig, None, ["task.reward=exact_match", "eval.num_samples=4", "eval.ks=[1,2,4,8]",
                                       "score.instruction=' check:'"])
    m = evaluate_checkpoint(engine, tok, records, cfg, self_correct=True)
    right = [2, 3, 4, 1]  # correct samples per problem, out of n = 4

    def pass_k(c, k):  # 1 - P(k samples drawn without replacement are all wrong)
        return 1 - math.comb(4 - c, k) / math.comb(4, k)

    expected = {
        "num_problems": 4.0, "greedy_acc": 0.5,
        "pass@1": sum(pass_k(c, 1) for c in right) / 4, "pass@2": sum(pass_k(c, 2) for c in right) / 4,
        "pass@4": 1.0, "maj@1": 0.75, "maj@2": 0.75, "maj@4": 1.0, "mean_reward": 10 / 16,
        "accuracy@t1": 0.5, "accuracy@t2": 0.75, "delta_t1_t2": 0.25, "delta_i2c": 0.5, "delta_c2i": 0.25,
    }  # no pass@8 / maj@8: k > eval.num_samples
    assert m.keys() == expected.keys()
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
    assert m["pass@2"] == pytest.approx((5 / 6 + 1 + 1 + 1 / 2) / 4)
    # the trainer's held-out self-correction metrics: the same episodes, under eval/
    sc = score_evaluate(engine, tok, records, cfg.task.reward, cfg.score, cfg.rollout.max_new_tokens)
    assert sc == {f"eval/{k}": v for k, v in m.items() if k in ("accuracy@t1", "accuracy@t2", "delta_t1_t2",
                                                                 "delta_i2c", "delta_c2i")}
