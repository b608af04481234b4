"""Math rewards with ``math-verify``: answer extraction, equivalence checking, bounded time.

Rewards (``task.reward``):

* ``math_verify``        1.0 when the response's final answer is mathematically equivalent to the
                         record's ``answer`` (a LaTeX / plain string, e.g. ``"\\frac{1}{2}"``, ``"72"``), else 0.
* ``math_verify_format`` same, plus ``format_score`` (default 0.1) for a wrong answer that is in the
                         expected format (a non-empty ``\\boxed{}`` or a GSM8K ``#### x`` line).

Extraction (:func:`extract_answer`): the last non-empty ``\\boxed{...}`` / ``\\fbox{...}`` (balanced
braces; an empty ``\\boxed{}`` is skipped), else the line after the last ``####`` (GSM8K; an ``Answer:``
label is dropped) unless it is a markdown heading (``#### Step 3: Total``, or a word with text below
it: ``#### Conclusion``) or plain words (``(no answer)``), else "the answer is X", else math-verify's
own extraction (last LaTeX / numeric expression), which ``math_reward.strict: true`` turns off: then
only a stated answer scores (``The numbers I tried were 3, 5 and 7.`` scores 1 against ``7`` without it).
A boxed number with its unit in a text wrapper (``\\boxed{\\text{7 days}}``) is the number. A ``####`` / "answer is" answer loses markdown
emphasis (``**72**``) and a hedge (``approximately``) and, when it opens with a number followed only
by unit words (``km/h``, ``cm^2``) or a new sentence (not ``or``, ``and``, ``to``, ``times``, ``pi``, ``million``,
``dozen`` ...) or a parenthesis without digits, everything after the number (``72 dollars``, ``72
(dollars)`` -> ``72``; ``5 or 6``, ``2 pi``, ``3 hours and 20 minutes`` stay whole); commas are removed
only inside numbers (``1,234`` -> ``1234``; ``(1, 2)`` stays). Equivalence is math-verify's
``verify`` (sympy; numbers compared after rounding to 6 decimals, sets, intervals, equations), after
LaTeX spaces between digit groups (``100\\,000``) are removed from both answers.

Why a worker pool: sympy can take unbounded time (``10^{10^{10^{10}}}``, 10^5 nested braces) and
math-verify's own timeout uses ``signal.alarm``, which only works in a main thread and cannot
interrupt C code. Every check runs in a worker *process* with a wall-clock deadline; a worker that
misses it is killed and replaced, the answer gets reward 0 and ``timeouts`` is counted. A worker that
dies (segfault, OOM) counts as ``errors`` and its answer is sent once more to a fresh worker (a second
death scores 0). Workers die with the trainer (Linux parent-death signal), even in the middle of a
check. Only the last ``max_chars`` characters of a response are parsed, so huge outputs cost bounded work. Counters are read with :func:`pop_reward_metrics`
(logged as ``reward/math_timeouts`` ...).
"""
from __future__ import annotations

import atexit
import re
import threading
import time
from multiprocessing.connection import wait
from typing import Optional

from alignreg.rewards.base import REWARDS

# ------------------------------------------------------------------------------------------------
# Extraction (pure string work, runs in the caller; linear time)
# ------------------------------------------------------------------------------------------------
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.(?!\d)|$)", re.I | re.M)  # a period ends it, a decimal point does not
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # 1,234.5: commas only as thousands separators
# words after a number that change its value or join another one: the answer is then kept whole
_NOT_UNITS = ("or", "and", "to", "times", "plus", "minus", "over", "divided", "pi", "sqrt", "root", "squared", "cubed",
              "hundred", "hundreds", "thousand", "thousands", "million", "millions", "billion", "billions", "trillion",
              "dozen", "dozens", "half", "halves", "third", "thirds", "quarter", "quarters", "tenths", "hundredths", "e")
_UNIT = r"[A-Za-z]+(?:\^\d|[²³])?(?:/[A-Za-z]+(?:\^\d|[²³])?)?"  # dollars, km/h, cm^2, e-books (with the separator)
# a number that opens the answer and is followed only by unit words (or "/unit") or a parenthesis without digits,
# then an optional period, or by a period and a new sentence: "72 dollars", "18 km/h", "$15/hour", "72 (dollars)",
# "$1,234.", "18. That is 3 more.", but not "3/4", "12\pi", "72%", "1, 2", "5 or 6", "2 pi", "1 million" or
# "3 hours and 20 minutes"
_LEADING_NUMBER = re.compile(
    rf"\\?\$?\s*({_NUMBER})\s*\$?(?=\s*\.?\s*$|\.\s+[A-Z]|/[A-Za-z]+\.?\s*$|\s+\([^\d()]*\)\s*\.?\s*$"
    rf"|\s+(?!(?:{'|'.join(_NOT_UNITS)})(?![\w-])){_UNIT}(?:[ ,'-]+{_UNIT})*\.?\s*$)", re.I)
_HEDGE = re.compile(r"^(?:approximately|approx\.?|about|around|roughly|nearly|~|≈)\s*", re.I)
_SPACES = re.compile(r"\s+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# a #### line with more text below it is a markdown heading when it opens with a word or "N. word":
# "#### Conclusion", "#### Step 2 - Total", "#### 3. Total" (a last line "#### 18. That is it." is an answer)
_HEADING = re.compile(r"[A-Za-z]{2,}|\d+\s*[.:)]\s+[A-Za-z]")
_NUMBERED_HEADING = re.compile(r"[A-Z][a-z]+\s+\d+\s*[:.)–-]")  # "#### Step 3: Total" even as the last line
_ANSWER_LABEL = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\b\s*(?:is\b)?\s*[:=]?\s*", re.I)  # "#### Answer: 72"


def last_boxed(text: str) -> Optional[str]:
    """Content of the last non-empty ``\\boxed{...}`` with balanced braces (``None`` if none).

    Empty boxes (``\\boxed{}``, as in "put your final answer within \\boxed{}") are skipped.
    One pass matches every brace pair, so the cost is linear even for ``"\\boxed{" * 10**5``.
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    if starts:
        close, stack = {}, []
        for i, c in enumerate(text):
            if c == "{":
                stack.append(i)
            elif c == "}" and stack:
                close[stack.pop()] = i
        for start in reversed(starts):  # start = index after "{"
            end = close.get(start - 1)
            if end is not None and text[start:end].strip():
                return text[start:end].strip()
    m = list(re.finditer(r"\\boxed ([^\s$]+)", text))  # "\boxed 5" (no braces): the last one, as with braces
    return m[-1].group(1) if m else None


def final_value(s: str) -> str:
    """A stated answer without markdown emphasis, units or thousands separators: ``"**1,234** dollars."``
    -> ``"1234"``. A leading number followed only by words is the answer; anything else is kept whole."""
    # runs of whitespace become one space first: against a long run (a degenerate response, "#### 1" + 4000
    # spaces + "!") the nested optional spaces of _LEADING_NUMBER backtrack in cubic time (a minute, in the trainer)
    s = _HEDGE.sub("", _SPACES.sub(" ", s.replace("*", "")).strip())  # "approximately 18" -> "18"
    n = _leading_number(s)
    return n if n is not None else _THOUSANDS.sub("", s).strip().rstrip(".").strip()


def _leading_number(s: str) -> Optional[str]:
    """The number that opens ``s`` when only unit words, a parenthesis or a new sentence follow it
    (``_LEADING_NUMBER``), without thousands commas; else None. ``s``: whitespace runs already single."""
    m = _LEADING_NUMBER.match(s)
    return m.group(1).replace(",", "") if m else None


def gsm8k_answer(text: str) -> Optional[str]:
    """The answer on the line after the last ``####`` (GSM8K), see :func:`final_value`; ``None`` when
    there is none, or the line is a markdown heading (``#### Step 3: Total``) or prose (``(no answer)``)."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip().splitlines()
    line = _ANSWER_LABEL.sub("", tail[0].replace("*", "").strip() if tail else "")
    below = any(t.strip() for t in tail[1:])
    if not line or (below and _HEADING.match(line)) or _NUMBERED_HEADING.match(line) or _is_prose(line.strip("()[]. ")):
        return None
    return final_value(line) or None


def _is_prose(s: str) -> bool:
    """Plain words and no math (``no answer``, ``I don't know``); ``x - y``, ``a, b`` or ``A, C`` are answers."""
    return bool(re.fullmatch(r"[A-Za-z]+(?:[ ,:;'-]+[A-Za-z]+)+", s)) and sum(len(w) > 1 for w in re.findall(r"[A-Za-z]+", s)) >= 2


# a whole answer in a text wrapper: \text{7 days}, \mbox{12 dollars} (math-verify parses neither as the number)
_TEXT_WRAPPED = re.compile(r"\\(?:text|textrm|textnormal|mbox|mathrm)\s*\{([^{}]*)\}")


def _unwrap_text(ans: str) -> str:
    """``\\text{7 days}`` -> ``7`` (a number followed by unit words, as :func:`final_value` reads it); any
    other answer, ``\\text{(B)}`` and ``\\text{7 or 8}`` included, unchanged."""
    m = _TEXT_WRAPPED.fullmatch(ans.strip())
    n = _leading_number(_SPACES.sub(" ", m.group(1)).strip()) if m else None
    return n if n is not None else ans


def extract_answer(text: str) -> Optional[str]:
    """The final answer string of a response, or ``None`` if it states none explicitly."""
    ans = last_boxed(text)
    if ans:
        return _unwrap_text(ans)
    ans = gsm8k_answer(text)
    if ans:
        return ans
    m = list(_ANSWER_IS.finditer(text[-2000:]))  # a stated answer sits at the end; bounded regex work
    return (final_value(m[-1].group(1)) or None) if m else None


def has_format(text: str) -> bool:
    """The response states an answer as a non-empty ``\\boxed{}`` or a GSM8K ``####`` line."""
    return bool(last_boxed(text) or gsm8k_answer(text))


def gold_answer(solution: str) -> str:
    """Gold answer of a dataset solution: the boxed part (MATH) or after ``####`` (GSM8K)."""
    return extract_answer(solution) or solution.strip()


# ------------------------------------------------------------------------------------------------
# The check that runs in a worker
# ------------------------------------------------------------------------------------------------


# a LaTeX space between digit groups: "100\,000", "1\ 000\ 000" (math-verify reads them as products: 100*0 = 0)
_SPACED_GROUPS = re.compile(r"(?<=\d)(?:\\[,;: ]|~)(?=\d{3}(?!\d))")


def check_equivalent(pred_text: str, gold: str, strict: bool = False) -> bool:
    """math-verify equivalence of the response's final answer and the gold answer (no timeout:
    call it only inside a worker, see :class:`VerifierPool`). The answer is the stated one
    (:func:`extract_answer`); without one, or when it does not parse, whatever math-verify finds in the
    whole text, unless ``strict`` (then such a response is wrong)."""
    from math_verify import parse, verify

    pred_text, gold = _SPACED_GROUPS.sub("", pred_text), _SPACED_GROUPS.sub("", gold)
    ans = extract_answer(pred_text)
    if strict and ans is None:
        return False
    target = parse(f"${ans}$", parsing_timeout=None) if ans is not None else []
    if not target and ans is not None:
        target = parse(ans, parsing_timeout=None)
    if not target and not strict:
        target = parse(pred_text, parsing_timeout=None)
    if not target:
        return False
    golds = parse(f"${gold}$", parsing_timeout=None) or parse(gold, parsing_timeout=None)
    if not golds:
        return ans is not None and ans.strip() == gold.strip()
    return bool(verify(golds, target, timeout_seconds=None))


def _serve() -> None:
    """Worker main loop (``python -m alignreg.rewards.math``): one JSON job per stdin line."""
    import json
    import signal
    import sys

    # Ctrl-C in a terminal reaches the whole process group: the trainer finishes its step (alignreg.stop),
    # which needs these answers checked; the pool ends a worker by closing stdin or SIGKILL
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(sys.argv) > 1:
        _die_with_parent(int(sys.argv[1]))
    check_equivalent("\\boxed{\\frac{1}{2}}", "0.5")  # imports and warms sympy before the first deadline
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        job, pred, gold, strict = json.loads(line)
        try:
            ok = check_equivalent(pred, gold, strict)
        except Exception:  # noqa: BLE001 - an unparsable answer is a wrong answer, not a crash
            ok = False
        sys.stdout.write(json.dumps([job, bool(ok)]) + "\n")
        sys.stdout.flush()


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this worker when the trainer dies (Linux). A worker notices a closed stdin only
    between checks: one inside a pathological check (``9^{9^{9^{9}}}``, C code that never returns) when the
    trainer is killed (SIGKILL, OOM) ran on as an orphan at 100% CPU. The signal comes when the *thread* that
    started the worker ends; a worker lost that way is found dead and replaced by the pool like any other."""
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    except (OSError, AttributeError):  # no prctl to call: the worker still works, as before
        return
    if os.getppid() != parent:  # the trainer died before the request took effect
        os._exit(0)


class _Worker:
    """One verifier subprocess with line-based JSON pipes (a fresh interpreter: no fork of a
    process that holds torch / vLLM threads, no re-import of the caller's ``__main__``)."""

    def __init__(self):
        import os
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alignreg.rewards.math", str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self.ready = False  # True once math-verify is imported (the first line is "ready")

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, job: int, pred: str, gold: str, strict: bool = False) -> None:
        import json

        self.proc.stdin.write(json.dumps([job, pred, gold, strict]) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class VerifierPool:
    """A few worker processes, each checking one answer at a time under a wall-clock deadline.

    A worker that misses its deadline is killed (SIGKILL) and a fresh one started, so one
    adversarial answer costs at most ``timeout_s`` of one worker and never hangs the run. A fresh
    worker first imports math-verify (about a second); that start-up has its own allowance
    (``startup_s``) and is not charged to the answer.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, startup_s: float = 60.0):
        self.num_workers, self.timeout_s, self.startup_s = max(1, num_workers), timeout_s, startup_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.counts = {"checks": 0, "timeouts": 0, "errors": 0}

    def _start(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker())
        deadline = time.monotonic() + self.startup_s
        for i, w in enumerate(self._workers):
            if not w.ready:
                if wait([w.proc.stdout], timeout=max(0.0, deadline - time.monotonic())) and w.proc.stdout.readline() == "ready\n":
                    w.ready = True
                else:
                    w.kill()
                    raise RuntimeError("math-verify worker failed to start; is math-verify installed? "
                                       "(pip install 'alignreg[math]')")

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker()

    def check(self, preds: list[str], golds: list[str], strict: bool = False) -> list[bool]:
        """Equivalence of each ``preds[i]`` to ``golds[i]`` (``strict``: see :func:`check_equivalent`); False on
        timeout or a second worker crash."""
        with self._lock:
            self._start()
            out = [False] * len(preds)
            todo = list(range(len(preds)))[::-1]
            resent: set[int] = set()  # jobs whose worker died during the check: sent once more to a fresh one
            busy: dict[int, tuple[int, float]] = {}  # worker index -> (job, deadline)
            while todo or busy:
                for w in range(self.num_workers):
                    if w not in busy and todo:
                        job = todo.pop()
                        try:
                            self._workers[w].send(job, preds[job], golds[job], strict)
                        except OSError:  # died while idle
                            self.counts["errors"] += 1
                            self._replace(w)
                            self._start()
                            self._workers[w].send(job, preds[job], golds[job], strict)
                        busy[w] = (job, time.monotonic() + self.timeout_s)
                files = {self._workers[w].proc.stdout: w for w in busy}
                deadline = min(d for _, d in busy.values())
                ready = wait(list(files), timeout=max(0.0, deadline - time.monotonic()))
                for f in ready:
                    w = files[f]
                    job, _ = busy.pop(w)
                    line = f.readline()
                    try:
                        import json

                        got, ok = json.loads(line)
                        assert got == job
                        out[job] = bool(ok)
                    except (ValueError, AssertionError, TypeError):  # EOF: the worker died
                        self.counts["errors"] += 1
                        self._replace(w)
                        if job not in resent:  # killed from outside (OOM killer, ...): the answer gets one more try
                            resent.add(job)
                            todo.append(job)
                now = time.monotonic()
                for w, (job, d) in list(busy.items()):
                    if now >= d:
                        busy.pop(w)
                        self.counts["timeouts"] += 1
                        self._replace(w)
                if any(not w.ready for w in self._workers):
                    self._start()
            self.counts["checks"] += len(preds)
            return out

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []


_POOL: Optional[VerifierPool] = None
_SETTINGS = {"num_workers": 2, "timeout_s": 5.0, "max_chars": 4096, "format_score": 0.1, "strict": False}


def configure(num_workers: int = 2, timeout_s: float = 5.0, max_chars: int = 4096, format_score: float = 0.1,
              strict: bool = False) -> None:
    """Set the pool limits and scoring (``math_reward`` config section); restarts the pool if its limits change."""
    global _POOL
    new = {"num_workers": num_workers, "timeout_s": timeout_s, "max_chars": max_chars, "format_score": format_score,
           "strict": strict}
    if _POOL is not None and (new["num_workers"], new["timeout_s"]) != (_SETTINGS["num_workers"], _SETTINGS["timeout_s"]):
        _POOL.close()
        _POOL = None
    _SETTINGS.update(new)


def pool() -> VerifierPool:
    global _POOL
    if _POOL is None:
        _POOL = VerifierPool(_SETTINGS["num_workers"], _SETTINGS["timeout_s"])
        atexit.register(_POOL.close)
    return _POOL


def math_scores(texts: list[str], records: list[dict], format_score: float = 0.0) -> list[float]:
    """Batched reward: 1.0 for an equivalent answer, ``format_score`` for a formatted wrong one."""
    n = _SETTINGS["max_chars"]
    tails = [t[-n:] for t in texts]
    ok = pool().check(tails, [str(r["answer"]) for r in records], _SETTINGS["strict"])
    return [1.0 if o else (format_score if format_score and has_format(t) else 0.0) for o, t in zip(ok, tails)]


def pop_reward_metrics() -> dict[str, float]:
    """Counters since the last call: checks, timeouts, crashed workers (``reward/math_*``)."""
    if _POOL is None:
        return {}
    c = dict(_POOL.counts)
    _POOL.counts = {k: 0 for k in c}
    return {f"reward/math_{k}": float(v) for k, v in c.items()}


@REWARDS.register("math_verify")
def math_verify_reward(response_text: str, record: dict) -> float:
    """1.0 when the final answer is equivalent to ``record["answer"]`` (math-verify), else 0."""
    return math_scores([response_text], [record])[0]


@REWARDS.register("math_verify_format")
def math_verify_format_reward(response_text: str, record: dict) -> float:
    """``math_verify`` plus ``format_score`` for a wrong answer in \\boxed{} / #### format."""
    return math_scores([response_text], [record], _SETTINGS["format_score"])[0]


math_verify_reward.batch = lambda texts, records: math_scores(texts, records)
math_verify_format_reward.batch = lambda texts, records: math_scores(texts, records, _SETTINGS["format_score"])


def batch_rewards(name: str, texts: list[str], records: list[dict]) -> list[float]:
    """Rewards of many responses at once: parallel over the pool for math rewards."""
    from alignreg.rewards.base import compute_rewards

    fn = REWARDS.get(name)
    if hasattr(fn, "batch"):
        return [float(v) for v in fn.batch(texts, records)]
    return compute_rewards(name, texts, records)


if __name__ == "__main__":
    _serve()
