"""Synthetic tasks, jsonl prompts, the exact-match verifier and the resumable prompt iterator."""
import json

import pytest

from alignreg.config import ConfigError, TaskConfig
from alignreg.data import PromptIterator, prompt_dataset
from alignreg.rewards import REWARDS, compute_rewards


def test_arithmetic_deterministic_and_disjoint():
    cfg = TaskConfig(max_operand=99, num_operands=2, operators="+-*", train_size=500, eval_size=50, seed=7)
    train, evals = prompt_dataset(cfg)
    assert (train, evals) == prompt_dataset(cfg)
    assert len(train) == 500 and len(evals) == 50
    assert prompt_dataset(TaskConfig(**{**cfg.__dict__, "seed": 8}))[1] != evals
    prompts_train = {r["prompt"] for r in train}
    assert len(prompts_train) == 500  # drawn without replacement
    assert not prompts_train & {r["prompt"] for r in evals}
    # eval split does not depend on train_size (it comes first in the draw)
    assert prompt_dataset(TaskConfig(**{**cfg.__dict__, "train_size": 10}))[1] == evals


def test_arithmetic_answers_are_correct():
    train, evals = prompt_dataset(TaskConfig(max_operand=12, num_operands=3, operators="+-*", eval_size=20))
    for r in train + evals:
        assert r["prompt"].endswith("=")
        assert r["answer"] == str(eval(r["prompt"][:-1]))  # python precedence matches ours
    assert any("*" in r["prompt"] and "+" in r["prompt"] for r in train)


def test_small_problem_space_is_capped_and_validated():
    train, evals = prompt_dataset(TaskConfig(max_operand=9, train_size=4096, eval_size=64))
    assert len(train) == 36 and len({r["prompt"] for r in train + evals}) == 100
    with pytest.raises(ConfigError, match="eval_size"):
        prompt_dataset(TaskConfig(max_operand=2, eval_size=9))
    with pytest.raises(ConfigError, match="operators"):
        prompt_dataset(TaskConfig(operators="+/"))
    with pytest.raises(ConfigError, match=r"unknown task .arith.; valid choices: arithmetic, .*jsonl"):
        prompt_dataset(TaskConfig(name="arith"))


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(10)) + "\n")
    cfg = TaskConfig(name="jsonl", path=str(path), eval_size=3, seed=0)
    train, evals = prompt_dataset(cfg)
    assert len(evals) == 3 and len(train) == 7
    assert sorted(r["prompt"] for r in train + evals) == sorted(f"q{i}" for i in range(10))
    assert (train, evals) == prompt_dataset(cfg)
    path.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ConfigError, match=r"p.jsonl:2"):
        prompt_dataset(cfg)
    path.write_text("not json\n")
    with pytest.raises(ConfigError, match="invalid JSON"):
        prompt_dataset(cfg)
    with pytest.raises(ConfigError, match="task.path is empty"):
        prompt_dataset(TaskConfig(name="jsonl"))
    with pytest.raises(ConfigError, match="is not a file"):
        prompt_dataset(TaskConfig(name="jsonl", path=str(tmp_path / "missing.jsonl")))


def test_exact_match_verifier():
    rec = {"prompt": "3+5=", "answer": "8"}
    assert compute_rewards("exact_match", ["8", " 8\n", "08", "8 8", ""], [rec] * 5) == [1, 1, 0, 0, 0]
    with pytest.raises(ConfigError, match="valid choices: .*exact_match"):
        REWARDS.get("exact")
    with pytest.raises(ValueError, match=r"compute_rewards: 1 texts but 0 records"):
        compute_rewards("exact_match", ["8"], [])


def test_prompt_iterator_resume_equals_uninterrupted():
    records = [{"prompt": str(i), "answer": ""} for i in range(10)]
    full = PromptIterator(records, batch_size=4, seed=3)
    reference = [[r["prompt"] for r in full.next_batch()] for _ in range(8)]  # crosses 3 epochs
    epoch0 = [p for b in reference for p in b][:10]
    assert sorted(epoch0) == sorted(r["prompt"] for r in records)  # each epoch is a permutation
    assert epoch0 != [r["prompt"] for r in records]
    for cut in (1, 2, 3, 5):
        it = PromptIterator(records, batch_size=4, seed=3)
        head = [[r["prompt"] for r in it.next_batch()] for _ in range(cut)]
        state = it.state_dict()
        resumed = PromptIterator(records, batch_size=4, seed=3)
        resumed.load_state_dict(state)
        tail = [[r["prompt"] for r in resumed.next_batch()] for _ in range(8 - cut)]
        assert head + tail == reference
    assert PromptIterator(records, 4, seed=4).next_batch() != PromptIterator(records, 4, seed=3).next_batch()
    with pytest.raises(ValueError, match="records"):
        PromptIterator(records[:5], 4, seed=3).load_state_dict(state)
    edited = [dict(r) for r in records]
    edited[7]["answer"] = "42"  # same count, a record edited in place
    with pytest.raises(ValueError, match=r"the training prompts changed since the checkpoint \(same 10 records"):
        PromptIterator(edited, 4, seed=3).load_state_dict(state)


@pytest.mark.parametrize("n", [300, 5_000, 10**12])
def test_the_eval_split_does_not_depend_on_train_size(n):
    """An SFT cold start or an eval run with another train_size holds out the same problems (random.sample
    switched algorithm with the total drawn, which moved 103 of 200 eval problems between train sizes)."""
    from alignreg.data.synthetic import split_problem_space

    evals = set()
    for train_size in (1, 10, 100, 140, 249, 250, 4096):
        train, held_out = split_problem_space(n, 50, train_size, seed=7)
        assert len(train) == min(train_size, n - 50) and len(set(train)) == len(train)
        assert not set(train) & set(held_out) and all(0 <= i < n for i in train + held_out)
        evals.add(tuple(held_out))
    assert len(evals) == 1 and len(set(next(iter(evals)))) == 50
    assert split_problem_space(n, 50, 100, seed=8)[1] != split_problem_space(n, 50, 100, seed=7)[1]
