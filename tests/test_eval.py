"""Unbiased pass@k against brute-force enumeration, and evaluate() on a scripted engine."""
import itertools
import math

import pytest

from alignreg.config import EvalConfig
from alignreg.eval import evaluate, pass_at_k
from alignreg.models import build_tokenizer
from alignreg.rollout.base import RolloutBatch


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_pass_at_k_equals_subset_enumeration(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_large_n_and_errors():
    assert pass_at_k(1000, 10, 1) == pytest.approx(0.01)
    exact = 1 - math.comb(990, 100) / math.comb(1000, 100)
    assert pass_at_k(1000, 10, 100) == pytest.approx(exact, rel=1e-9)
    with pytest.raises(ValueError, match=r"1 <= k <= n, got n=4 c=1 k=5"):
        pass_at_k(4, 1, 5)


class ScriptedEngine:
    """Answers from a table: greedy gives ``greedy[i]``, sample j of prompt i gives ``samples[i][j]``."""

    def __init__(self, tok, greedy, samples):
        self.tok, self.greedy, self.samples = tok, greedy, samples

    def generate(self, prompts, sampling):
        batch = RolloutBatch()
        for i, p in enumerate(prompts):
            texts = [self.greedy[i]] if sampling.greedy else self.samples[i][: sampling.n]
            for t in texts:
                ids = self.tok(t, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                batch.prompt_ids.append(p)
                batch.response_ids.append(ids)
                batch.logprobs.append([0.0] * len(ids))
                batch.prompt_index.append(i)
                batch.finished.append(True)
        return batch


def test_evaluate_metrics():
    tok = build_tokenizer()
    records = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    samples = [["2", "3", "2", "5"], ["0", "0", "0", "4"]]
    engine = ScriptedEngine(tok, greedy=["2", "5"], samples=samples)
    m = evaluate(engine, tok, records, "exact_match", EvalConfig(num_samples=4, ks=[1, 2, 8]), max_new_tokens=4)
    assert set(m) == {"eval/greedy_acc", "eval/pass@1", "eval/pass@2", "eval/mean_reward"}  # 8 > num_samples
    assert m["eval/greedy_acc"] == 0.5
    assert m["eval/pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert m["eval/pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 2)
    assert m["eval/mean_reward"] == pytest.approx(3 / 8)
