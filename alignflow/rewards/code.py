"""Code rewards: run the response's program against the row's unit tests in the sandbox; reward = share passed.

    reward:
      functions: {"alignflow.rewards.code:unit_test_reward": 1.0}
      timeout_s: 60          # the whole batch's call; raise it with the batch size

A prompt row carries ``tests``: a list of Python snippets (usually ``assert`` statements) that run after the
program, in its namespace; a single string is one test. The program is the last fenced code block of the
response (```` ```python ... ``` ````), else the whole response.

Each response is one :func:`alignflow.sandbox.run_python` run (``docs/sandbox.md``): a harness loads the program
with a time limit, then runs each test with its own limit (``per_test_s``, enforced by ``SIGALRM`` inside the
sandbox; the run's wall clock is the backstop). A test passes when it runs to the end without an exception.
Reward = passed / number of tests; a program that does not load, or a run that ends early (a crash, a limit,
``os._exit``), fails every test it did not report. The harness reports each result with a token it reads from
stdin before the program starts, so a program that prints "pass" lines or exits early cannot fake a pass;
a program written to search the interpreter's memory for that token could (the sandbox contains what code
does, not what it claims).

:meth:`UnitTestReward.metrics` returns counts since the last call: ``sandbox/runs``, ``sandbox/failures_<cause>``
(runs that did not end with status 0, by :data:`alignflow.sandbox.CAUSES`, plus single tests stopped by their
time limit (``timeout``) or by the memory limit (``memory``): the harness catches these so that the next test
still runs) and ``code/tests_passed_frac`` (of all tests run).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from alignflow.sandbox import SandboxLimits, run_python

HARNESS = r"""
import json, signal, sys
TOKEN = sys.stdin.readline().strip()
OUT = sys.stdout
class _Limit(BaseException):
    pass
def _alarm(signum, frame):
    raise _Limit()
def _say(i, status):
    OUT.write(f"\n{TOKEN} {i} {status}\n")
    OUT.flush()
def _timed(code, name, ns, seconds):
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        exec(compile(code, name, "exec"), ns)
        return "pass"
    except _Limit:
        return "timeout"
    except MemoryError:
        return "memory"
    except BaseException:
        return "fail"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
cfg = json.load(open("tests.json"))
ns = {"__name__": "solution"}
loaded = _timed(open("solution.py").read(), "solution.py", ns, cfg["load_s"])
_say("load", loaded)
if loaded == "pass":
    for i, test in enumerate(cfg["tests"]):
        _say(i, _timed(test, f"test_{i}", dict(ns), cfg["per_test_s"]))
"""


def extract_program(response: str) -> str:
    """The last fenced code block of ``response`` (a block cut off by the token limit counts), without its
    ``python`` / ``py`` / ``python3`` tag; the whole response when it has no fence."""
    parts = str(response).split("```")
    if len(parts) < 2:
        return str(response)
    block = parts[-2] if len(parts) % 2 == 1 else parts[-1]  # an even count: the last fence is still open
    first, _, rest = block.partition("\n")
    return rest if first.strip().lower() in ("python", "py", "python3") else block


def _tests_of(row_tests, row: int) -> list[str]:
    if isinstance(row_tests, str):
        row_tests = [row_tests]
    if not isinstance(row_tests, (list, tuple)) or not row_tests or not all(isinstance(t, str) for t in row_tests):
        raise ValueError(f"row {row}: field 'tests' must be a non-empty list of Python snippets, got {row_tests!r:.80}")
    return list(row_tests)


@dataclasses.dataclass
class UnitTestReward:
    """Share of the row's ``tests`` that pass against the response's program, run in the sandbox.

    per_test_s: each test's time limit (and the program's own load limit). limits: the sandbox's limits; its
    wall clock defaults to ``load + per test x number of tests + 5 s``. workers: sandbox runs at a time.
    """

    per_test_s: float = 2.0
    limits: SandboxLimits = dataclasses.field(default_factory=lambda: SandboxLimits(cpu_s=30, memory_mb=512))
    workers: int = 2
    name = "unit_test_reward"

    def __post_init__(self):
        self._counts: Counter = Counter()
        self._lock = threading.Lock()

    def __getstate__(self):  # picklable for CallableReward(executor="process"); counts stay in each process
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    def run_one(self, program: str, tests: list[str]) -> tuple[list[str], str]:
        """(status of each test: pass / fail / timeout / memory / not_run, the sandbox run's cause)."""
        token = secrets.token_hex(16)
        cfg = {"tests": tests, "per_test_s": self.per_test_s, "load_s": self.per_test_s}
        wall = self.per_test_s * (len(tests) + 1) + 5.0
        limits = dataclasses.replace(self.limits, wall_s=max(self.limits.wall_s, wall))
        res = run_python(
            HARNESS, limits, files={"solution.py": program, "tests.json": json.dumps(cfg)}, stdin=token + "\n"
        )
        status = {}
        for line in res.stdout.splitlines():
            parts = line.split(" ")
            if len(parts) == 3 and parts[0] == token:
                status[parts[1]] = parts[2]
        return [status.get(str(i), "not_run") for i in range(len(tests))], res.cause

    def __call__(self, prompts: list, responses: list, tests: list) -> list[float]:
        jobs = [(extract_program(r), _tests_of(t, i)) for i, (r, t) in enumerate(zip(responses, tests, strict=True))]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(lambda job: self.run_one(*job), jobs))
        rewards = [sum(s == "pass" for s in statuses) / len(statuses) for statuses, _ in results]
        with self._lock:
            self._counts["runs"] += len(results)
            self._counts.update(f"failures_{cause}" for _, cause in results if cause != "ok")
            self._counts["tests"] += sum(len(s) for s, _ in results)
            self._counts["passed"] += sum(s.count("pass") for s, _ in results)
            self._counts.update(f"failures_{x}" for s, _ in results for x in s if x in ("timeout", "memory"))
        return rewards

    def metrics(self) -> dict[str, float]:
        """Counts since the last call (see the module docstring), then reset."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        out = {f"sandbox/{k}": float(v) for k, v in counts.items() if k not in ("tests", "passed")}
        if counts["tests"]:
            out["code/tests_passed_frac"] = counts["passed"] / counts["tests"]
        return out


unit_test_reward = UnitTestReward()
