"""Rule and verifier rewards: plain Python functions over texts, run with a timeout and validated per row.

A rule reward is a function ``fn(prompts: list[str], responses: list[str], **fields) -> list[float]`` (the
signature of the built-in tasks' rewards, e.g. ``alignflow.tasks.arithmetic:accuracy_reward``). Name your own
with a dotted path, ``"my_pkg.rewards:accuracy"`` or ``"path/to/rewards.py:accuracy"``, and
:func:`load_callable` imports it.

:class:`CallableReward` turns such a function into a :class:`~alignflow.rewards.base.RewardFn`:

* **fields**: every meta field of the batch other than ``prompt`` / ``response`` (e.g. the prompt row's
  ``answer``) is passed as a keyword argument: under its own name when ``fn`` has that parameter, under the
  plural (``answers``) when ``fn`` has that one instead, and under its own name when ``fn`` takes ``**kwargs``;
  fields ``fn`` cannot take are not passed.
* **timeout**: each call runs in a worker and is abandoned after ``timeout_s`` seconds. ``executor="thread"``
  (default: no pickling, no start-up cost) cannot stop a stuck function -- its daemon thread runs on in the
  background; ``executor="process"`` runs calls in a spawned worker process that is terminated on a timeout
  (the function must then be importable by name in a fresh interpreter -- defined at module level in an
  importable module, not loaded from a ``file.py:`` path -- and its inputs picklable).
* **failures**: an exception, a timeout, or a value that is NaN, infinite or not a number is a *failure of a
  row*. ``on_error="fail"`` (default) raises :class:`RewardError` naming the function, the row index, the start
  of that row's prompt and the cause. ``on_error="score"`` gives that row ``error_score``, logs it (the first
  few per function) and counts it by kind (:data:`FAILURE_KINDS`: ``errors``, ``timeouts``, ``nonfinite``;
  :meth:`CallableReward.with_failures` returns the counts per row, the trainers log them as ``reward/errors``
  ...). When the whole-batch call raises, the rows are retried one at a time to find the failing ones; a batch
  that times out fails as a whole (every row, with ``score``) unless ``per_row`` calls each row on its own.
  A result of the wrong length is a bug in the function and always raises.
* **user code**: ``"file.py:fn"`` and ``"pkg.module:fn"`` import and run that code with the permissions of
  the training process; :func:`user_code_files` names the files a set of functions comes from (the trainers
  log them).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import multiprocessing
import numbers
import os
import pickle
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path

import torch

import alignflow
from alignflow.batch import Batch
from alignflow.config import ConfigError
from alignflow.rewards.base import FAILURE_KINDS, output_device

EXECUTORS = ("thread", "process")
ON_ERROR = ("fail", "score")
TEXT_FIELDS = ("prompt", "response")
LOGGED_FAILURES = 5  # failures logged one by one per function (on_error="score"); later ones are only counted
log = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A reward function failed; ``fn_name``, ``row`` (None when no single row is to blame), ``prompt`` and
    ``kind``: one of :data:`FAILURE_KINDS`."""

    def __init__(
        self, message: str, fn_name: str = "", row: int | None = None, prompt: str | None = None, kind: str = "errors"
    ):
        super().__init__(message)
        self.fn_name, self.row, self.prompt, self.kind = fn_name, row, prompt, kind


class RewardLoadError(ValueError):
    """A dotted path ``module:function`` does not lead to a callable; the message names the path."""


# ----------------------------------------------------------------------------------------------- loading
def _import_module(module: str, spec: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise RewardLoadError(f"reward function {spec!r}: the file {module!r} does not exist (cwd: {os.getcwd()})")
        mod_spec = importlib.util.spec_from_file_location(f"alignflow_user_{path.stem}", path)
        mod = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = mod  # so that process workers and pickling find it
        mod_spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise RewardLoadError(
                f"reward function {spec!r}: no module named {e.name!r} (is it installed or on "
                f"PYTHONPATH? cwd: {os.getcwd()})"
            ) from e
        raise RewardLoadError(
            f"reward function {spec!r}: importing {module!r} failed because it imports the missing module {e.name!r}"
        ) from e


def load_callable(spec: str) -> Callable:
    """Import ``"package.module:function"`` (or ``"file.py:function"``; ``function`` may be ``Class.method``)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise RewardLoadError(
            f"reward function {spec!r}: expected 'module:function' (e.g. "
            "'my_pkg.rewards:accuracy' or 'rewards.py:accuracy')"
        )
    module, attr = spec.split(":")
    try:
        obj = _import_module(module, spec)
    except RewardLoadError:
        raise
    except Exception as e:  # an error inside the user's module while importing it
        raise RewardLoadError(f"reward function {spec!r}: importing {module!r} raised {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            raise RewardLoadError(
                f"reward function {spec!r}: {getattr(obj, '__name__', module)!r} has no attribute "
                f"{part!r}; its callables are: {', '.join(names[:20]) or '(none)'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardLoadError(f"reward function {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def user_code_files(fns) -> list[str]:
    """The source files of the functions in ``fns`` that are not part of alignflow (user code), deduplicated."""

    own = Path(alignflow.__file__).resolve().parent
    out: list[str] = []
    for fn in fns:
        fn = getattr(fn, "fn", fn)  # a CallableReward: the function it wraps
        try:
            path = Path(inspect.getsourcefile(fn) or inspect.getfile(fn)).resolve()
        except (TypeError, OSError):  # builtins and callables without a file
            path = None
        name = str(path) if path is not None else callable_name(fn)
        if (path is None or own not in path.parents) and name not in out:
            out.append(name)
    return out


def reward_options(section, key: str = "reward") -> dict:
    """:class:`CallableReward` keyword arguments from a config's ``reward`` section (timeout, executor, per_row,
    on_error, error_score); a ConfigError names a bad key."""

    score = getattr(section, "error_score", 0.0)
    if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score):
        raise ConfigError(f"{key}.error_score: must be a finite number (the reward of a failed row), got {score!r}")
    on_error = getattr(section, "on_error", "fail")
    if on_error not in ON_ERROR:
        raise ConfigError(f"{key}.on_error: {on_error!r} is not one of {', '.join(ON_ERROR)}")
    return dict(
        timeout_s=section.timeout_s,
        executor=section.executor,
        per_row=bool(getattr(section, "per_row", False)),
        on_error=on_error,
        error_score=float(score),
    )


def callable_name(fn: Callable) -> str:
    """``module:qualname`` of a function (its repr for other callables)."""
    qual = getattr(fn, "__qualname__", None)
    return f"{getattr(fn, '__module__', '?')}:{qual}" if qual else repr(fn)


def keyword_map(fn: Callable, fields) -> dict[str, str]:
    """Which keyword each batch field is passed as (see the module docstring); fields ``fn`` cannot take are
    left out."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return {f: f for f in fields}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {n for n, p in list(params.items())[2:] if p.kind in kinds}  # after (prompts, responses)
    var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    out = {}
    for f in fields:
        if f in named:
            out[f] = f
        elif f + "s" in named:
            out[f] = f + "s"
        elif var_kw:
            out[f] = f
    return out


# ----------------------------------------------------------------------------------------------- running
class CallTimeout(Exception):
    """Raised by :func:`run_with_timeout` (distinct from a ``TimeoutError`` the called function raises itself)."""


def run_with_timeout(fn: Callable, args: tuple = (), kwargs: dict | None = None, timeout: float | None = None):
    """Call ``fn`` in a daemon thread and wait at most ``timeout`` s; :class:`CallTimeout` after that.

    A Python thread cannot be stopped: a call that times out runs on in the background (as a daemon thread it
    does not keep the interpreter alive). On a timeout the thread's ``alignflow_cancel`` event is set, so code
    that checks it (:class:`~alignflow.rewards.workers.WorkerPool`) can give up early. The function's own
    exceptions are re-raised here.
    """
    kwargs = kwargs or {}
    fut: Future = Future()

    def target():
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # delivered to the caller through the future
                fut.set_exception(e)

    thread = threading.Thread(target=target, daemon=True, name="alignflow-reward")
    thread.alignflow_cancel = threading.Event()  # type: ignore[attr-defined]
    thread.start()
    try:
        return fut.result(timeout)
    except FuturesTimeout:
        if not fut.done():
            thread.alignflow_cancel.set()  # type: ignore[attr-defined]
            raise CallTimeout(f"no result after {timeout} s") from None
    return fut.result()  # finished: its result, or the TimeoutError the function raised itself


def _snippet(text, n: int = 80) -> str:
    text = str(text)
    return repr(text if len(text) <= n else text[:n] + "...")


class CallableReward:
    """A rule reward ``fn(prompts, responses, **fields) -> list[float]`` as a ``RewardFn`` with a timeout.

    fn: the function or its dotted path. name: the metric name (default: the function's name).
    timeout_s: seconds per call (None: no timeout, called inline). executor: ``"thread"`` | ``"process"``.
    per_row: call once per row (each row with its own timeout) instead of once per batch.
    on_error: ``"fail"`` (raise :class:`RewardError`) or ``"score"`` (the row gets ``error_score`` and is
    counted in ``failures``, by kind); see the module docstring.
    """

    def __init__(
        self,
        fn: Callable | str,
        name: str | None = None,
        timeout_s: float | None = 10.0,
        executor: str = "thread",
        per_row: bool = False,
        on_error: str = "fail",
        error_score: float = 0.0,
    ):
        self.fn = load_callable(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise TypeError(f"CallableReward: {fn!r:.80} is not callable")
        if executor not in EXECUTORS:
            raise ValueError(f"CallableReward: executor={executor!r} is not one of {', '.join(EXECUTORS)}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"CallableReward: timeout_s must be > 0 (or None for no timeout), got {timeout_s}")
        if on_error not in ON_ERROR:
            raise ValueError(f"CallableReward: on_error={on_error!r} is not one of {', '.join(ON_ERROR)}")
        if isinstance(error_score, bool) or not isinstance(error_score, numbers.Real) or not math.isfinite(error_score):
            raise ValueError(f"CallableReward: error_score must be a finite number, got {error_score!r}")
        self.fn_name = callable_name(self.fn)
        self.name = name or getattr(self.fn, "__name__", None) or type(self.fn).__name__
        self.timeout_s, self.executor, self.per_row = timeout_s, executor, per_row
        self.on_error, self.error_score = on_error, float(error_score)
        self.failures = dict.fromkeys(FAILURE_KINDS, 0)  # rows scored with error_score since construction
        self._pool = None
        if executor == "process":
            try:
                pickle.dumps(self.fn)
            except Exception as e:
                raise ValueError(
                    f"CallableReward({self.fn_name}, executor='process'): the function cannot be sent to "
                    f"a worker process ({type(e).__name__}: {e}); define it at module level or use "
                    "executor='thread'"
                ) from e

    # ------------------------------------------------------------------------- executor
    def _call(self, prompts: list, responses: list, kwargs: dict):
        args = (prompts, responses)
        if self.timeout_s is None:
            return self.fn(*args, **kwargs)
        if self.executor == "thread":
            return run_with_timeout(self.fn, args, kwargs, self.timeout_s)
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(1)
        try:
            return self._pool.apply_async(self.fn, args, kwargs).get(self.timeout_s)
        except multiprocessing.TimeoutError:
            self.close()  # terminate the stuck worker; the next call starts a fresh one
            raise CallTimeout(f"no result after {self.timeout_s} s") from None

    def close(self) -> None:
        """Stop the worker process (executor="process"); a later call starts a new one."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to clean
            pass

    # ------------------------------------------------------------------------- failures
    def _error(
        self, what: str, row: int | None = None, prompt=None, cause: BaseException | None = None, kind: str = "errors"
    ):
        where = f" at row {row} (prompt {_snippet(prompt)})" if row is not None else ""
        why = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        return RewardError(
            f"reward function {self.fn_name} {what}{where}{why}",
            self.fn_name,
            row,
            None if row is None else str(prompt),
            kind,
        )

    def _failed(self, err: RewardError, rows: int = 1) -> tuple[float, str]:
        """``on_error``: raise ``err``, or count ``rows`` failed rows and return (error_score, kind)."""
        if self.on_error == "fail":
            raise err
        self.failures[err.kind] += rows
        seen = sum(self.failures.values())
        if seen - rows < LOGGED_FAILURES:
            log.warning(
                "%s; scored %s (reward.on_error=score)%s",
                err,
                self.error_score,
                "; further failures of this function are only counted" if seen >= LOGGED_FAILURES else "",
            )
        return self.error_score, err.kind

    # ------------------------------------------------------------------------- validation
    def _as_list(self, values, prompts: list, start: int) -> list:
        """``values`` as a list of one entry per prompt; RewardError (always raised) otherwise."""
        one = len(prompts) == 1  # a per-row call: errors name that row
        try:
            values = list(values)
        except TypeError:
            raise self._error(
                f"returned {type(values).__name__}, expected a list of {len(prompts)} numbers",
                start if one else None,
                prompts[0] if one else None,
            ) from None
        if len(values) != len(prompts):
            raise self._error(
                f"returned {len(values)} values for {len(prompts)} rows (one value per row is needed)",
                start if one else None,
                prompts[0] if one else None,
            )
        return values

    def _validate(self, values, prompts: list, start: int = 0) -> list[tuple[float, str | None]]:
        """``(value, failure kind or None)`` of every row of ``values`` returned for ``prompts`` (rows ``start ..``
        of the batch); a non-number or a non-finite value is a failure of its row (see ``on_error``)."""
        out = []
        for i, v in enumerate(self._as_list(values, prompts, start)):
            if (torch.is_tensor(v) and v.numel() == 1) or type(v).__module__ == "numpy" and hasattr(v, "item"):
                v = v.item()  # 0-d tensors and numpy scalars (np.float32, np.bool_) as Python numbers
            if isinstance(v, numbers.Real) and math.isfinite(float(v)):
                out.append((float(v), None))
                continue
            kind = "nonfinite" if isinstance(v, numbers.Real) else "errors"
            out.append(
                self._failed(self._error(f"returned {v!r:.60} (not a finite number)", start + i, prompts[i], kind=kind))
            )
        return out

    # ------------------------------------------------------------------------- calls
    def _row(self, i: int, prompts: list, responses: list, kw: dict) -> tuple[float, str | None]:
        """Call on row ``i`` alone; failures name row ``i``."""
        try:
            result = self._call(prompts[i : i + 1], responses[i : i + 1], {k: v[i : i + 1] for k, v in kw.items()})
        except CallTimeout:
            return self._failed(self._error(f"timed out after {self.timeout_s} s", i, prompts[i], kind="timeouts"))
        except Exception as e:
            return self._failed(self._error("raised", i, prompts[i], e))
        return self._validate(result, prompts[i : i + 1], start=i)[0]

    def _batch(self, prompts: list, responses: list, kw: dict) -> list[tuple[float, str | None]]:
        n = len(prompts)
        try:
            result = self._call(prompts, responses, kw)
        except CallTimeout:
            err = self._error(
                f"timed out after {self.timeout_s} s on a batch of {n} rows (first prompt "
                f"{_snippet(prompts[0]) if prompts else ''}); per_row=True (config: reward.per_row="
                "true) gives every row its own call and timeout and names the slow row; or raise "
                "timeout_s (reward.timeout_s)",
                kind="timeouts",
            )
            return [self._failed(err, rows=n)] * n if n else []
        except Exception as e:
            rows = [self._row(i, prompts, responses, kw) for i in range(n)]  # the rows that fail on their own
            err = self._error(f"raised on the batch of {n} rows but on no single row", cause=e)
            if self.on_error == "fail" and not any(kind for _, kind in rows):
                raise err from e
            if not any(kind for _, kind in rows):
                log.warning("%s; using the rows' values from one call per row", err)
            return rows
        return self._validate(result, prompts)

    def score_rows(
        self, prompts: list, responses: list, fields: dict | None = None
    ) -> tuple[list[float], list[str | None]]:
        """The rewards of ``len(prompts)`` rows as floats, and each row's failure kind (None: no failure);
        ``fields``: extra per-row lists by name."""
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"reward {self.name!r}: {len(prompts)} prompts but {len(responses)} responses")
        names = keyword_map(self.fn, list(fields or {}))
        kw = {names[f]: list(v) for f, v in (fields or {}).items() if f in names}
        if self.per_row:
            rows = [self._row(i, prompts, responses, kw) for i in range(len(prompts))]
        else:
            rows = self._batch(prompts, responses, kw)
        return [v for v, _ in rows], [k for _, k in rows]

    def scores(self, prompts: list, responses: list, fields: dict | None = None) -> list[float]:
        """The rewards of ``len(prompts)`` rows as floats (see :meth:`score_rows`)."""
        return self.score_rows(prompts, responses, fields)[0]

    def with_failures(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The (B,) rewards and, per kind of :data:`FAILURE_KINDS`, a (B,) 0/1 tensor of the rows that failed so."""
        for key in TEXT_FIELDS:
            if key not in batch.meta:
                raise KeyError(
                    f"reward {self.name!r} needs the text field {key!r} in the batch's meta; the batch "
                    f"has {sorted(batch.keys())}"
                )
        fields = {k: v for k, v in batch.meta.items() if k not in TEXT_FIELDS}
        values, kinds = self.score_rows(batch.meta["prompt"], batch.meta["response"], fields)
        device = output_device(batch)
        flags = {k: torch.tensor([float(x == k) for x in kinds], device=device) for k in FAILURE_KINDS}
        return torch.tensor(values, dtype=torch.float32, device=device), flags

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.with_failures(batch)[0]
