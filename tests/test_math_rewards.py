"""Math rewards: extraction, math-verify equivalence on real-style answers, bounded time."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from alignreg.rewards import REWARDS
from alignreg.rewards.math import (VerifierPool, batch_rewards, configure, extract_answer, gold_answer, gsm8k_answer,
                                   has_format, last_boxed, math_scores, pop_reward_metrics)


@pytest.mark.parametrize("text,expected", [
    ("so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("first \\boxed{3} then corrected: \\boxed{4}", "4"),
    ("\\fbox{x^{2}+1}", "x^{2}+1"),
    ("\\boxed 5", "5"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("... so he earns $1,234.\n#### 1,234", "1234"),
    ("The answer is 17.", "17"),
    ("The answer is 3.5.", "3.5"),  # a decimal point does not end the answer, a period does
    ("the answer is $2.5$.", "2.5"),
    ("So the answer is 1.5 hours.\nCheck: 3/2 = 1.5", "1.5"),  # a leading number followed by words: the number
    ("The answer is 42\nbecause 6 * 7 = 42", "42"),
    ("\\boxed 5 or rather \\boxed 7", "7"),  # the last one, as with braces
    ("no final answer here", None),
    ("\\boxed{\\text{7 days}}", "7"),  # a number with its unit in a text wrapper: the number
    ("\\boxed{\\text{7 or 8 days}}", "\\text{7 or 8 days}"),  # not a number and units: kept whole
    ("unbalanced \\boxed{3", None),
    # units, markdown emphasis and headings around a stated answer
    ("...\n#### 72 dollars", "72"),
    ("...\n#### **72**", "72"),
    ("...\n#### 72 (dollars)", "72"),
    ("#### 72 cookies.", "72"),
    ("#### $1,234.50", "1234.50"),
    ("#### -5 degrees", "-5"),
    ("#### 3/4", "3/4"),  # not a leading number followed by words: the whole line
    ("#### 72%", "72%"),
    ("#### (1, 2)", "(1, 2)"),  # commas only go inside numbers
    ("#### 1, 2", "1, 2"),
    ("#### Step 3: Total\n4 + 68 = 72. The answer is 72.", "72"),  # a markdown heading is no answer line
    ("#### Answer: 72", "72"),  # an answer label on the #### line
    ("#### Final answer: 1,234 apples", "1234"),
    ("#### 3. Total\nThe answer is 9.", "9"),
    ("#### \n(no answer)", None),
    ("The answer is 12 dollars.", "12"),
    ("The answer is **12**.", "12"),
    ("The answer is 3/4.", "3/4"),
    # words that change the value or join another number keep the answer whole
    ("#### 5 or 6", "5 or 6"),
    ("The answer is 12 and 13.", "12 and 13"),
    ("The answer is 2 pi.", "2 pi"),
    ("#### 1 million", "1 million"),
    ("#### 3 hours and 20 minutes", "3 hours and 20 minutes"),
    # answers without a digit on a #### line are answers; prose is not
    ("Area is 9\\pi.\n#### \\pi", "\\pi"),
    ("We get 3 cases.\n#### (C)", "(C)"),
    ("so x equals y.\n#### x", "x"),
    ("#### The answer is 42", "42"),
    ("#### I don't know", None),
    ("#### x - y", "x - y"),  # one-letter words: an expression, not prose
    ("#### A, C", "A, C"),
    # a heading with text below it is no answer line; units with / or ^, hedges and a closing sentence
    ("Janet sells 9 eggs.\n\n#### Conclusion\nShe makes 9*2 = 18 dollars.", None),
    ("#### Step 2\nShe makes 18.", None),
    ("#### 18\n\nExplanation: because", "18"),
    ("#### 18 km/h", "18"),
    ("#### $15/hour", "15"),
    ("#### 5 cm^2", "5"),
    ("#### 7 e-books", "7"),
    ("The answer is approximately 18.", "18"),
    ("#### 18. That is 3 more than 15.", "18"),
    ("#### 4 dozens", "4 dozens"),
    # an empty box (the instruction quoted back) is skipped
    ("Thus the result is \\boxed{5}. As instructed, the final answer goes within \\boxed{}.", "5"),
    ("\\boxed{}", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_gold_and_format_helpers():
    assert gold_answer("Thus the area is $\\boxed{12\\pi}$.") == "12\\pi"
    assert gold_answer("She has 5 + 3 = 8 apples.\n#### 8") == "8"
    assert gsm8k_answer("x #### 3.") == "3" and last_boxed("\\boxed{{a}}") == "{a}"
    assert has_format("\\boxed{1}") and has_format("#### 2") and not has_format("2")
    for text in ("\\boxed{}", "I don't know. \\boxed{ }", "#### \n(no answer)", "#### Step 3: Total"):
        assert not has_format(text), text  # no answer stated: no format bonus


def test_extraction_is_fast_on_long_whitespace_runs():
    """Extraction runs in the trainer (``has_format`` of math_verify_format, maj@k of ``alignreg eval``), outside
    the pool's deadline: a degenerate response with a long run of spaces took ~20 s (cubic backtracking)."""
    for text, expected in [("#### 18" + " " * 2500 + "!", "18 !"), ("The answer is 18" + " " * 1500 + "!", "18 !"),
                           ("#### 18 " + "\t " * 1500 + "dollars", "18")]:
        t0 = time.monotonic()
        got = extract_answer(text), has_format(text)
        assert time.monotonic() - t0 < 1.0, (text[:20], time.monotonic() - t0)
        assert got == (expected, text.startswith("####"))  # the run of spaces is one space


# (response, gold, correct?) in the styles of MATH / GSM8K solutions and Qwen2.5-Math outputs
CASES = [
    ("The answer is $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "\\frac12", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{(1,2)}", "(1, 2)", True),
    ("\\boxed{[0, 1)}", "[0,1)", True),
    ("\\boxed{12\\pi}", "12\\pi", True),
    ("\\boxed{3}", "4", False),
    ("\\boxed{-3}", "3", False),
    ("Total: 18 * 2 = 36\n#### 36", "36", True),
    ("#### 1,000", "1000", True),
    ("#### 35", "36", False),
    ("So she has 8 apples. The answer is 8.", "8", True),
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{x = 5}", "5", True),
    ("", "5", False),
    ("Natalia sold 24 clips in May.\n#### 72 dollars", "72", True),
    ("#### **72**", "72", True),
    ("#### 72 (dollars)", "72", True),
    ("#### 72 cookies", "72", True),
    ("#### Step 3: Total\n4 + 68 = 72. The answer is 72.", "72", True),
    ("The answer is 12 dollars.", "12", True),
    ("The answer is **12**.", "12", True),
    ("#### 1, 2", "12", False),
    ("#### (1, 2)", "(1, 2)", True),
    ("Thus the result is \\boxed{5}. As instructed, the final answer goes within \\boxed{}.", "5", True),
    # LaTeX spaces between digit groups (math-verify alone reads 100\,000 as the product 100*0 = 0)
    ("\\boxed{100\\,000}", "100000", True),
    ("\\boxed{1\\,000\\,000}", "1000000", True),
    ("The total is \\boxed{12\\ 345}", "12345", True),
    ("\\boxed{100\\,000}", "0", False),
    ("\\boxed{2500}", "2\\,500", True),  # the same on the gold's side
    ("\\boxed{2\\,\\sqrt{2}}", "2\\sqrt2", True),  # a space that is not between digit groups stays
    # a number with its unit in a text wrapper (math-verify alone parses no number out of these)
    ("The trip takes \\boxed{\\text{7 days}}.", "7", True),
    ("\\boxed{\\mbox{1,250 dollars}}", "1250", True),
    ("\\boxed{\\text{7 days}}", "8", False),
    ("\\boxed{\\text{(B)}}", "\\text{(B)}", True),  # not a number: left as it was
]


def test_verify_real_style_answers():
    configure(num_workers=2, timeout_s=5.0)
    got = math_scores([c[0] for c in CASES], [{"answer": c[1]} for c in CASES])
    assert got == [1.0 if c[2] else 0.0 for c in CASES], [(c, g) for c, g in zip(CASES, got) if (g == 1.0) != c[2]]
    # the registered per-answer reward and the batched path agree
    fn = REWARDS.get("math_verify")
    assert fn(CASES[0][0], {"answer": CASES[0][1]}) == 1.0 and fn("\\boxed{3}", {"answer": "4"}) == 0.0
    assert batch_rewards("math_verify_format", ["\\boxed{3}", "3", "\\boxed{4}"], [{"answer": "4"}] * 3) == [0.1, 0.0, 1.0]
    assert batch_rewards("math_verify_format", ["\\boxed{}", "I don't know. \\boxed{}", "#### \n(no answer)"],
                         [{"answer": "4"}] * 3) == [0.0, 0.0, 0.0]
    assert batch_rewards("exact_match", ["4"], [{"answer": "4"}]) == [1.0]  # non-math rewards pass through


ADVERSARIAL = [
    "\\boxed{10^{10^{10^{10^{10^{10}}}}}}",  # sympy would try to evaluate a tower of powers
    "\\boxed{" + "{" * 50000 + "1" + "}" * 50000 + "}",  # deep nesting
    "\\boxed{" * 30000,  # unbalanced, huge
    "9" * 300000,  # huge number
    "\\boxed{\\frac{" * 2000 + "1" + "}{2}}" * 2000,
]


def test_adversarial_outputs_finish_within_time_limit():
    pool = VerifierPool(num_workers=2, timeout_s=1.0)
    try:
        pool.check(["\\boxed{1}"], ["1"])  # workers started (import of math-verify is not charged)
        t0 = time.monotonic()
        out = pool.check(ADVERSARIAL + ["\\boxed{2}"], ["1"] * len(ADVERSARIAL) + ["2"])
        elapsed = time.monotonic() - t0
        assert out[:-1] == [False] * len(ADVERSARIAL) and out[-1] is True
        # each answer is bounded by timeout_s on one of 2 workers, plus restarts of killed workers
        assert elapsed < len(ADVERSARIAL) * (1.0 + 8.0), elapsed
        assert pool.counts["checks"] == len(ADVERSARIAL) + 2
    finally:
        pool.close()


def test_timeout_is_counted_and_pool_recovers():
    configure(num_workers=1, timeout_s=2.0)
    try:
        pop_reward_metrics()
        t0 = time.monotonic()
        assert math_scores(["\\boxed{10^{10^{10^{10^{10^{10}}}}}}", "\\boxed{7}"], [{"answer": "1"}, {"answer": "7"}]) == [0.0, 1.0]
        m = pop_reward_metrics()
        assert m["reward/math_timeouts"] >= 1 and m["reward/math_checks"] == 2
        assert time.monotonic() - t0 < 30
    finally:
        configure(num_workers=2, timeout_s=5.0)


def test_crashed_worker_counts_as_error_and_is_replaced():
    pool = VerifierPool(num_workers=1, timeout_s=5.0)
    try:
        assert pool.check(["\\boxed{1}"], ["1"]) == [True]
        pool._workers[0].proc.kill()  # the worker dies (as on a segfault / OOM kill)
        pool._workers[0].proc.wait()
        assert pool.check(["\\boxed{2}"], ["2"]) == [True]  # detected, replaced, the answer re-sent
        assert pool.counts["errors"] == 1
        assert pool.check(["\\boxed{3}"], ["4"]) == [False]  # the fresh worker still judges
    finally:
        pool.close()


def test_worker_killed_during_a_check_gets_the_answer_once_more():
    """A worker killed from outside mid-check (OOM killer): the answer is sent once more to a fresh worker; a
    second death of its worker scores it 0 (an answer that crashes sympy must not crash workers forever)."""
    pool = VerifierPool(num_workers=1, timeout_s=60.0)
    killed: list[int] = []

    def killer(times: int) -> None:
        for _ in range(times):
            while not (pool._workers and pool._workers[0].ready and pool._workers[0].proc.pid not in killed):
                time.sleep(0.05)
            time.sleep(0.3)  # inside the check
            killed.append(pool._workers[0].proc.pid)
            pool._workers[0].proc.kill()

    try:
        assert pool.check(["\\boxed{1}"], ["1"]) == [True]
        t = threading.Thread(target=killer, args=(1,))
        t.start()
        slow_right = "\\boxed{7" + "+1-1" * 10000 + "}"  # 7, after seconds of parsing
        assert pool.check([slow_right], ["7"]) == [True] and pool.counts["errors"] == 1
        t.join()
        t = threading.Thread(target=killer, args=(2,))
        t.start()
        t0 = time.monotonic()
        assert pool.check(["\\boxed{9^{9^{9^{9}}}}", "\\boxed{2}"], ["1", "2"]) == [False, True]
        t.join()
        assert pool.counts["errors"] == 3 and pool.counts["timeouts"] == 0 and time.monotonic() - t0 < 30
    finally:
        pool.close()


def test_ctrl_c_does_not_reach_the_workers():
    """A terminal's Ctrl-C goes to the whole process group; the trainer finishes its step before it stops
    (alignreg.stop), and that step's answers still need checking."""
    pool = VerifierPool(num_workers=1, timeout_s=5.0)
    try:
        assert pool.check(["\\boxed{1}"], ["1"]) == [True]  # the worker is up
        proc = pool._workers[0].proc
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None
        assert pool.check(["\\boxed{2}"], ["2"]) == [True] and pool._workers[0].proc is proc
        assert pool.counts["errors"] == 0
    finally:
        pool.close()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a killed, not yet reaped process is a zombie
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_workers_die_with_a_killed_trainer():
    """A trainer killed (SIGKILL, OOM) while a worker is inside a pathological check left that worker running
    as an orphan at 100% CPU: it only notices the closed stdin between checks."""
    script = ("from alignreg.rewards.math import VerifierPool\n"
              "pool = VerifierPool(num_workers=1, timeout_s=600.0)\n"
              "pool.check(['\\\\boxed{1}'], ['1'])\n"
              "print(pool._workers[0].proc.pid, flush=True)\n"
              "pool.check(['\\\\boxed{9^{9^{9^{9}}}}'], ['1'])\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(trainer.stdout.readline())
    try:
        time.sleep(1.0)  # inside the check
        assert _running(worker)
        trainer.kill()
        trainer.wait()
        t0 = time.monotonic()
        while _running(worker) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert not _running(worker)
    finally:
        if _running(worker):
            os.kill(worker, signal.SIGKILL)
    # the signal follows the thread that started a worker: one started by a thread that has ended is replaced
    pool = VerifierPool(num_workers=1, timeout_s=5.0)
    try:
        t = threading.Thread(target=lambda: pool.check(["\\boxed{1}"], ["1"]))
        t.start()
        t.join()
        assert pool.check(["\\boxed{2}"], ["2"]) == [True] and pool.check(["\\boxed{3}"], ["4"]) == [False]
    finally:
        pool.close()


def test_strict_scores_only_a_stated_answer():
    texts = ["The numbers I tried were 3, 5 and 7.", "so we get 7", "\\boxed{7}", "#### 7", "The answer is 7.",
             "\\boxed{8} but really 7"]
    records = [{"answer": "7"}] * len(texts)
    assert math_scores(texts, records) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # lenient: math-verify reads the last number
    configure(strict=True)
    try:
        assert math_scores(texts, records) == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
        assert batch_rewards("math_verify_format", ["so we get 7", "\\boxed{8}"], records[:2]) == [0.0, 0.1]
    finally:
        configure()


def test_huge_output_is_truncated_to_max_chars():
    configure(max_chars=200)
    try:
        text = "blah " * 100000 + "\\boxed{42}"
        t0 = time.monotonic()
        assert math_scores([text], [{"answer": "42"}]) == [1.0]
        assert time.monotonic() - t0 < 10
    finally:
        configure(max_chars=4096)


@pytest.mark.parametrize("override,msg", [
    ("math_reward.timeout_s=0", "timeout_s must be > 0"),
    ("math_reward.num_workers=0", "num_workers must be >= 1"),
    ("math_reward.max_chars=0", "max_chars must be >= 1"),
    ("math_reward.max_chars=-5", "max_chars must be >= 1"),
    ("math_reward.format_score=1.0", "format_score must be in"),
    ("math_reward.format_score=-0.1", "format_score must be in"),
])
def test_math_reward_settings_are_validated(override, msg):
    from alignreg.config import ConfigError, RLConfig, load_config

    with pytest.raises(ConfigError, match=f"math_reward.{msg}"):
        load_config(RLConfig, None, [override])
