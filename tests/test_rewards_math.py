"""Math answer extraction and equivalence (sympy), and the math accuracy reward."""

import os
import sys
import time

import pytest

from alignflow.rewards import math as rmath
from alignflow.rewards.math import extract_answer, math_accuracy_reward, math_equal

EQUAL = [
    ("0.5", "1/2"),
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac12", "1/2"),
    ("\\tfrac{3}{4}", "0.75"),
    ("2.0", "2"),
    ("\\boxed{3}", "3"),
    ("$\\frac{3}{4}$", "0.75"),
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("50\\%", "50"),
    ("50%", "0.5"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\sqrt[3]{8}", "2"),
    ("2^{10}", "1024"),
    ("x+1", "1+x"),
    ("x^{2}-1", "(x-1)(x+1)"),
    ("\\left(1, 2\\right)", "(1,2)"),
    ("x = 5", "5"),
    ("5\\text{ cm}", "5"),
    ("90^\\circ", "90"),
    ("-\\frac{1}{2}", "-0.5"),
    ("2\\pi", "\\pi \\cdot 2"),
    ("\\frac{\\sqrt{3}}{2}", "\\sin(\\pi/3)"),
    ("\\text{(B)}", "(B)"),
    ("\\infty", "\\infty"),
    ("3x", "x*3"),
]
NOT_EQUAL = [
    ("0.51", "1/2"),
    ("0.33", "\\frac13"),
    ("2", "-2"),
    ("1/2", "2"),
    ("x+1", "x+2"),
    ("(1,2)", "(2,1)"),
    ("(1,2)", "[1,2]"),
    ("1,000", "100"),
    ("10^{30}+1", "10^{30}"),
    ("\\pi", "3.14159"),
    ("abc", "abd"),
    ("", "0"),
    ("9^{9^{9}}", "1"),
    ("__import__('os').getcwd()", "1"),
    ("(1).real", "1"),
    ("open(1)", "1"),
]


@pytest.mark.parametrize("pred, ref", EQUAL)
def test_equivalent_forms_are_equal(pred, ref):
    assert math_equal(pred, ref) and math_equal(ref, pred)


@pytest.mark.parametrize("pred, ref", NOT_EQUAL)
def test_different_answers_are_not_equal(pred, ref):
    assert not math_equal(pred, ref) and not math_equal(ref, pred)


def test_none_is_never_equal():
    assert not math_equal(None, "1") and not math_equal("1", None)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}"),
        ("<think>2 or 3?</think><answer>3</answer>", "3"),
        ("<answer>it is \\boxed{7}</answer>", "7"),
        ("I count 1,234 apples in total.", "1,234"),
        ("x = 3, then y = -4.5.", "-4.5"),
        ("the ratio is 3/4", "3/4"),
        ("a rise of 12%", "12%"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_math_accuracy_reward():
    responses = ["... \\boxed{0.5}", "<answer>1/3</answer>", "I think 7", "no idea"]
    assert math_accuracy_reward(["q"] * 4, responses, ["\\frac{1}{2}", "0.33", "7", "1"]) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="2 prompts, 1 responses, 2 answers"):
        math_accuracy_reward(["a", "b"], ["1"], ["1", "2"])


PATHOLOGICAL = "(a+b+c+d+e)^{999}"  # simplify((a+...+e)^999 - 1) expands: about 150 MB more every second


def _rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_runaway_check_is_stopped_at_its_timeout_and_its_memory_is_freed():
    """Before: the abandoned thread kept expanding the polynomial, the process grew by ~150 MB/s. Now the worker is
    killed at the timeout: the call returns in ~1 s and neither this process nor the pool grows afterwards."""
    os_pid = os.getpid()
    assert math_equal("1/2", "0.5")  # the workers exist
    before = rmath._pool().replaced
    t0 = time.perf_counter()
    assert not math_equal(PATHOLOGICAL, "1", timeout_s=1.0)
    assert time.perf_counter() - t0 < 4.0  # 1 s, plus a busy machine's delays
    assert rmath._pool().replaced == before + 1
    total = lambda: _rss_mb(os_pid) + sum(_rss_mb(p) for p in rmath._pool().pids())  # noqa: E731
    first = total()
    time.sleep(1.5)
    assert total() - first < 50, (first, total())
    assert math_equal("\\frac{1}{2}", "0.5")  # the replacement worker answers


def test_a_check_past_the_memory_limit_is_not_equal(caplog):
    """The expansion grows ~150 MB/s: its worker is killed when it holds 100 MiB more than the parent did, long
    before the 60 s timeout (a CI run once saw this check run on to its timeout under the address-space limit
    alone)."""
    rmath.configure(memory_mb=100)
    try:
        with caplog.at_level("WARNING", logger="alignflow.rewards.math"):
            assert not math_equal(PATHOLOGICAL, "1", timeout_s=60)
        assert "took more than its 100 MiB of memory" in caplog.text
        assert math_equal("2^{10}", "1024")  # the replacement worker answers
    finally:
        rmath.configure(memory_mb=1024)


LONG_TEXTS = {
    "boxed_open": "\\boxed{" * 9400,  # 64 KB: was 37 s (each \boxed{ scanned to the end)
    "boxed_dollar": "\\boxed$" * 9000,  # \boxed without a brace: no copy of the rest of the text per match
    "open_tags": "<answer>" * 8000 + "1",  # unclosed tags: was a non-greedy scan to the end per tag
    "tags": "<answer>1</answer>" * 4000,
    "braces": "{" * 60000 + "\\boxed{1}",
    "numbers": "1," * 30000 + "5 / " * 5000,
}


@pytest.mark.parametrize("name", list(LONG_TEXTS))
def test_extraction_is_linear(name):
    """CPU time of this process (robust to a busy machine): extraction well under a second; the reward call
    (extraction and check in a worker) returns within a few seconds of wall time."""
    text = LONG_TEXTS[name]
    t0 = time.process_time()
    extract_answer(text)
    assert time.process_time() - t0 < 1.0
    t0 = time.perf_counter()
    assert math_accuracy_reward(["q"], [text], ["7"]) == [0.0]
    assert time.perf_counter() - t0 < 4.0


def test_extraction_bounds():
    assert extract_answer("\\boxed{3}" + " " * rmath.MAX_TEXT_CHARS) is None  # only the end is read
    assert extract_answer("x" * 200_000 + "\\boxed{3}") == "3"
    long = "1" * (rmath.MAX_ANSWER_CHARS + 1)
    assert not math_equal(long, long)
    assert extract_answer("<answer>a<answer>b</answer>") == "b"


def test_rows_are_checked_in_parallel_batches():
    """One pathological row costs its own timeout and spoils no other row."""
    rows = [f"\\boxed{{{i}}}" for i in range(50)] + [f"\\boxed{{{PATHOLOGICAL}}}"]
    before = rmath._pool().replaced
    out = rmath.check_many("reward", [(r, str(i)) for i, r in enumerate(rows)], timeout_s=1.0)
    assert out == [True] * 50 + [False]
    assert rmath._pool().replaced == before + 1


def test_a_timed_out_batch_frees_the_workers_for_the_next_call():
    """reward.timeout_s = 1 s on 6 answers that each take the full 5 s on 2 workers (15 s of work): the abandoned
    call gives up within a fraction of a second, so the next batch is scored at once instead of ~14 s later."""
    from alignflow.batch import Batch
    from alignflow.rewards import CallableReward, RewardError

    def batch(responses, answers):
        return Batch(meta={"prompt": ["q"] * len(responses), "response": responses, "answer": answers})

    with pytest.raises(RewardError, match="timed out"):
        CallableReward(math_accuracy_reward, timeout_s=1.0)(batch([f"\\boxed{{{PATHOLOGICAL}}}"] * 6, ["1"] * 6))
    t0 = time.perf_counter()
    out = CallableReward(math_accuracy_reward, timeout_s=60)(batch(["\\boxed{0.5}", "7"], ["1/2", "8"]))
    assert out.tolist() == [1.0, 0.0]
    assert time.perf_counter() - t0 < 6.0


def test_missing_sympy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sympy", None)  # makes `import sympy` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'alignflow\[math\]'"):
        math_equal("1/2", "0.5")
