"""Math answer checking: extract a final answer and decide whether it equals the reference (via sympy).

``math_equal(pred, ref)`` is True when the two strings denote the same value. Both sides go through:

1. ``\\boxed{...}`` / ``\\fbox{...}`` extraction (the last one), surrounding ``$``, ``\\( \\)``, ``\\[ \\]``;
2. clean-up: ``\\left``/``\\right``, spacing commands, degrees (``^\\circ``), units written as ``\\text{...}``
   after a value (``5\\text{ cm}`` -> ``5``), a leading ``x =`` (a short variable name), thousands separators
   when the whole answer is one number (``1,000`` and ``1{,}000`` -> ``1000``), a trailing full stop;
3. a string match of what is left (whitespace ignored) -- this is also how non-numeric answers compare;
4. otherwise a small LaTeX-to-sympy translation (``\\frac``/``\\dfrac``/``\\tfrac`` including ``\\frac12``,
   ``\\sqrt``, ``\\sqrt[n]``, ``^``, ``\\cdot``, ``\\times``, ``\\div``, ``\\pi``, ``\\infty``, ``\\sin``...,
   braces), parsed with :func:`sympy.parsing.sympy_parser.parse_expr` in a restricted namespace (no
   builtins, no attribute access) and compared: integers and fractions exactly; values involving a decimal
   or an irrational with relative tolerance 1e-9 (``2.0`` == ``2``, ``0.5`` == ``1/2``, ``\\sqrt{8}`` ==
   ``2\\sqrt{2}``, but ``0.33`` != ``1/3`` and ``0.51`` != ``1/2``); expressions with symbols by
   ``simplify(a - b) == 0``. Tuples ``(1, 2)`` compare element-wise (same brackets, same length).

**Percent**: a trailing ``%`` (or ``\\%``) marks a percentage. ``50%`` equals ``50%``; against a plain number
it matches either the number itself or the number / 100, so ``50%`` == ``50`` == ``0.5`` (graders of
competition math accept both). Use the same form on both sides if that is too lenient for you.

sympy's own ``parse_latex`` is not used: it needs a specific antlr4 runtime (4.11; 4.13 fails) or lark.
sympy is an optional dependency (``pip install 'alignflow[math]'``), imported on first use.

**Bounds.** :func:`extract_answer` reads the last ``MAX_TEXT_CHARS`` (100,000) characters of a response, in
one linear pass; an answer (either side) longer than ``MAX_ANSWER_CHARS`` (1,000) is never equal; one longer
than ``MAX_CHARS`` (300) is compared as a string only. Powers with exponents beyond 1000 or results beyond
10**10000 are refused before evaluation.

**Where the checks run.** Every check -- extraction included -- runs in a small pool of forked worker
processes (:mod:`alignflow.rewards.workers`, :data:`SETTINGS`: 2 workers, 5 s per answer, 1 GiB of extra
memory each; :func:`configure` changes them). A check that overruns its timeout has its worker killed and
replaced, so it stops computing and allocating; so is one that takes more memory than its limit. A timeout,
an error or a worker killed by its memory limit counts as *not equal* and is logged. A batch of rows is spread
over the workers (one pipe round trip per row, no process start-up).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re

from alignflow.rewards.workers import WorkerPool

log = logging.getLogger(__name__)

MAX_CHARS = 300  # longer answers are compared as strings only
MAX_ANSWER_CHARS = 1000  # longer answers (either side) are never equal
MAX_TEXT_CHARS = 100_000  # extract_answer reads only the end of a longer response
MAX_EXPONENT = 1000  # |exponent| of any power
MAX_DIGITS = 10000  # log10 of the magnitude of any power
REL_TOL = 1e-9

_FRACS = {"frac", "dfrac", "tfrac", "cfrac"}
_SYMBOLS = {
    "cdot": "*",
    "times": "*",
    "ast": "*",
    "div": "/",
    "pi": " pi ",
    "infty": " oo ",
    "sin": " sin ",
    "cos": " cos ",
    "tan": " tan ",
    "ln": " log ",
    "log": " log ",
    "exp": " exp ",
}
_DROP = {"left", "right", "displaystyle", "big", "Big", "bigg", "Bigg", "quad", "qquad", ",", ";", ":", "!", " "}
_CONTENT = {"mathrm", "mathbf", "operatorname", "text", "textbf", "textit", "mbox"}
_UNITS = re.compile(r"\\(?:text|textbf|textit|mbox)\s*\{[^{}]*\}")
_UNICODE = {"\u2212": "-", "\u00d7": "*", "\u00f7": "/", "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u00b0": ""}


class LatexError(ValueError):
    """The answer is not in the small LaTeX subset this module translates."""


def _sympy():
    try:
        import sympy
    except ImportError:
        raise ImportError(
            "math answer checking needs sympy: pip install 'alignflow[math]' (or pip install 'sympy>=1.12')"
        ) from None
    return sympy


# ------------------------------------------------------------------------------------------------ extraction
def _matching_brace(s: str, i: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``s[i]``; LatexError when unbalanced."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return j
    raise LatexError(f"unbalanced braces in {s!r:.80}")


def _brace_pairs(text: str) -> dict[int, int]:
    """``{open index: close index}`` of every balanced brace pair in ``text``, in one pass (an unmatched ``}``
    is ignored, an unmatched ``{`` gets no entry)."""
    stack, pairs = [], {}
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            pairs[stack.pop()] = m.start()
    return pairs


_BRACE = re.compile(r"[{}]")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_TOKEN = re.compile(r"[^\s$]+")


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``; None if absent.
    Linear in ``len(text)``: the braces are matched once for the whole text."""
    starts = [m.end() for m in _BOX.finditer(text)]
    pairs = _brace_pairs(text) if starts else {}
    for i in reversed(starts):
        if i < len(text) and text[i] == "{":
            if i in pairs:
                return text[i + 1 : pairs[i]].strip()
            continue
        token = _TOKEN.match(text, i)
        if token:
            return token.group(0)
    return None


_OPEN_TAG = re.compile(r"<answer>", re.I)
_CLOSE_TAG = re.compile(r"</answer>", re.I)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?%?")


def _last_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` (the last closing tag and the nearest opening tag before it)."""
    close = None
    for m in _CLOSE_TAG.finditer(text):
        close = m
    if close is None:
        return None
    opening = None
    for m in _OPEN_TAG.finditer(text, 0, close.start()):
        opening = m
    return None if opening is None else text[opening.end() : close.start()]


def extract_answer(text: str) -> str | None:
    """The final answer in a response: the last ``\\boxed{}``, else the last ``<answer>...</answer>`` (its boxed
    content when it has one), else the last number (``1,234``, ``-3.5``, ``3/4``, ``12%``); None when none.

    Only the last :data:`MAX_TEXT_CHARS` characters of ``text`` are read, and the work is linear in their number.
    """
    if text is None:
        return None
    text = str(text)[-MAX_TEXT_CHARS:]
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    tag = _last_tag(text)
    if tag is not None:
        return extract_boxed(tag) or tag.strip()
    last = None
    for m in _NUMBER.finditer(text):
        last = m
    return last.group(0).replace(" ", "") if last else None


# ------------------------------------------------------------------------------------------------ normalising
def normalise(text: str) -> tuple[str, bool]:
    """Cleaned answer string (see the module docstring, step 2) and whether it was a percentage."""
    s = str(text).strip()
    boxed = extract_boxed(s)
    s = boxed if boxed is not None else s
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = re.sub(r"^\$+|\$+$", "", s.strip()).strip()
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s).strip()
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\\circ", "")
    if _UNITS.sub("", s).strip():  # units after a value; a bare \text{...} keeps its content
        s = _UNITS.sub("", s)
    percent = bool(re.search(r"\\?%\s*$", s))
    s = re.sub(r"\\?%\s*$", "", s).strip()
    m = re.match(r"^\s*[a-zA-Z]\w{0,2}\s*=(?!=)\s*(.+)$", s)
    s = m.group(1) if m else s
    s = s.replace("{,}", ",").rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    return s, percent


def _command(s: str, i: int) -> tuple[str, int]:
    """The command starting with the backslash at ``s[i]``: its name and the index after it."""
    j = i + 1
    if j < len(s) and s[j].isalpha():
        while j < len(s) and s[j].isalpha():
            j += 1
        return s[i + 1 : j], j
    return s[i + 1 : j + 1], j + 1


def _argument(s: str, i: int) -> tuple[str, int]:
    """One macro argument at ``s[i]`` (a braced group, a command or one character) and the index after it."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise LatexError(f"a command is missing its argument in {s!r:.80}")
    if s[i] == "{":
        j = _matching_brace(s, i)
        return s[i + 1 : j], j + 1
    if s[i] == "\\":
        _, j = _command(s, i)
        return s[i:j], j
    return s[i], i + 1


def latex_to_expr(s: str) -> str:
    """Translate the supported LaTeX subset into a sympy expression string (LatexError otherwise)."""
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            name, i = _command(s, i)
            if name in _FRACS:
                num, i = _argument(s, i)
                den, i = _argument(s, i)
                out.append(f"(({latex_to_expr(num)})/({latex_to_expr(den)}))")
            elif name == "sqrt":
                degree = None
                if i < len(s) and s[i] == "[":
                    j = s.index("]", i) if "]" in s[i:] else -1
                    if j < 0:
                        raise LatexError(f"unclosed \\sqrt[ in {s!r:.80}")
                    degree, i = s[i + 1 : j], j + 1
                arg, i = _argument(s, i)
                out.append(
                    f"sqrt({latex_to_expr(arg)})"
                    if degree is None
                    else f"root({latex_to_expr(arg)},{latex_to_expr(degree)})"
                )
            elif name in _CONTENT:
                arg, i = _argument(s, i)
                out.append(latex_to_expr(arg))
            elif name in _SYMBOLS:
                out.append(_SYMBOLS[name])
            elif name in ("{", "}"):
                out.append("(" if name == "{" else ")")
            elif name not in _DROP:
                raise LatexError(f"unsupported LaTeX command \\{name}")
        elif c == "{":
            j = _matching_brace(s, i)
            out.append("(" + latex_to_expr(s[i + 1 : j]) + ")")
            i = j + 1
        elif c == "}":
            raise LatexError(f"unbalanced braces in {s!r:.80}")
        else:
            out.append("**" if c == "^" else c)
            i += 1
    return "".join(out)


_SAFE_CHARS = re.compile(r"^[0-9a-zA-Z+\-*/(),\s]*$")


def _split_tuple(expr: str) -> tuple[str, list[str]]:
    """``("()", ["1", "2"])`` for ``(1, 2)``; ``("", [expr])`` when ``expr`` is not a tuple."""
    e = expr.strip()
    if len(e) >= 2 and e[0] in "([" and e[-1] in ")]" and "," in e:
        depth, parts, cur = 0, [], []
        for ch in e[1:-1]:
            depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                parts.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        if depth == 0:
            return e[0] + e[-1], parts + ["".join(cur)]
    return "", [e]


# ------------------------------------------------------------------------------------------------ sympy
@functools.lru_cache(maxsize=4096)
def parse(expr: str):
    """A sympy expression (unevaluated) from the safe infix string ``expr``; ValueError when not parsable."""
    sp = _sympy()
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_application,
        implicit_multiplication,
        standard_transformations,
    )

    no_numbers = re.sub(r"\d*\.\d+|\d+\.?", "0", expr)
    if len(expr) > MAX_CHARS or not _SAFE_CHARS.match(no_numbers):  # only digits may surround a '.'
        raise ValueError(f"not a plain expression: {expr!r:.80}")
    names = {
        n: getattr(sp, n)
        for n in (
            "Integer",
            "Float",
            "Rational",
            "Symbol",
            "Function",
            "Add",
            "Mul",
            "Pow",
            "sqrt",
            "root",
            "pi",
            "E",
            "oo",
            "sin",
            "cos",
            "tan",
            "log",
            "exp",
            "Abs",
        )
    }
    names["__builtins__"] = {}
    tr = standard_transformations + (implicit_multiplication, implicit_application, convert_xor)
    try:
        out = sp.parsing.sympy_parser.parse_expr(
            expr, local_dict={}, global_dict=names, transformations=tr, evaluate=False
        )
    except Exception as e:  # SyntaxError, TokenError, TypeError from odd input: not an expression
        raise ValueError(f"cannot parse {expr!r:.80}: {type(e).__name__}") from None
    if not isinstance(out, sp.Basic):
        raise ValueError(f"{expr!r:.80} is not a single expression")
    _check_size(out)
    return out


def _check_size(expr) -> None:
    """Refuse powers whose evaluation could run for long (see MAX_EXPONENT, MAX_DIGITS)."""
    sp = _sympy()
    for p in expr.atoms(sp.Pow):
        exp = p.exp.evalf(15)
        if exp.is_number and exp.is_finite and abs(exp) > MAX_EXPONENT:
            raise ValueError(f"exponent {exp} is too large to check")
        base = p.base.evalf(15)
        if exp.is_number and base.is_number and base.is_finite and base != 0:
            digits = sp.log(abs(base), 10).evalf(15) * exp
            if digits.is_real and abs(digits) > MAX_DIGITS:
                raise ValueError(f"a power of about 10**{digits:.0f} is too large to check")


def _close(a, b) -> bool:
    """Equal values: exact for integers / fractions and expressions with symbols, within REL_TOL otherwise."""
    sp = _sympy()
    a, b = a.doit(), b.doit()
    if a == b:
        return True
    if a.is_Rational and b.is_Rational:  # exact numbers: no tolerance (10**30 + 1 != 10**30)
        return False
    if a.free_symbols or b.free_symbols:
        return sp.simplify(a - b) == 0
    va, vb = sp.N(a, 30), sp.N(b, 30)
    if not (va.is_finite and vb.is_finite):
        return False
    return bool(abs(va - vb) <= REL_TOL * max(1, abs(va), abs(vb)))


def _values_equal(pred: str, ref: str, pred_pct: bool, ref_pct: bool) -> bool:
    kind_p, parts_p = _split_tuple(latex_to_expr(pred))
    kind_r, parts_r = _split_tuple(latex_to_expr(ref))
    if kind_p != kind_r or len(parts_p) != len(parts_r):
        return False
    for p, r in zip(parts_p, parts_r, strict=True):
        a, b = parse(p.strip()), parse(r.strip())
        if pred_pct != ref_pct:  # the percentage side may also be read as a fraction
            pct, other = (a, b) if pred_pct else (b, a)
            if not (_close(pct, other) or _close(pct / 100, other)):
                return False
        elif not _close(a, b):
            return False
    return True


def _equal_here(pred, ref) -> bool:
    """:func:`math_equal`'s verdict computed in this process, without a timeout (run inside a worker)."""
    if pred is None or ref is None or len(str(pred)) > MAX_ANSWER_CHARS or len(str(ref)) > MAX_ANSWER_CHARS:
        return False
    (p, p_pct), (r, r_pct) = normalise(pred), normalise(ref)
    if re.sub(r"\s+", "", p) == re.sub(r"\s+", "", r) and p_pct == r_pct:
        return True
    if not p or not r:
        return False
    try:
        return bool(_values_equal(p, r, p_pct, r_pct))
    except (LatexError, ValueError, TypeError, AttributeError, RecursionError):
        return False  # not something we can evaluate, and the strings differ


def _work(task: str, a, b) -> bool:
    """What a worker runs: ``("equal", pred, ref)`` or ``("reward", response, answer)``."""
    return _equal_here(extract_answer(a) if task == "reward" else a, b)


@dataclasses.dataclass
class Settings:
    """How the checks run (change with :func:`configure`): ``workers`` forked processes, ``timeout_s`` seconds
    per answer, ``memory_mb`` MiB of extra resident memory per worker."""

    workers: int = min(2, os.cpu_count() or 1)
    timeout_s: float = 5.0
    memory_mb: int = 1024


SETTINGS = Settings()
_POOL: WorkerPool | None = None


def configure(workers: int | None = None, timeout_s: float | None = None, memory_mb: int | None = None) -> Settings:
    """Change the worker settings (the running workers are stopped; the next check forks new ones)."""
    global _POOL
    for name, value in (("workers", workers), ("timeout_s", timeout_s), ("memory_mb", memory_mb)):
        if value is not None:
            if isinstance(value, bool) or not value > 0:
                raise ValueError(f"alignflow.rewards.math.configure: {name} must be > 0, got {value!r}")
            setattr(SETTINGS, name, type(getattr(SETTINGS, name))(value))
    if _POOL is not None:
        _POOL.close()
        _POOL = None
    return SETTINGS


def _pool() -> WorkerPool:
    """The shared worker pool, forked on first use after sympy is imported here (the workers inherit it)."""
    global _POOL
    if _POOL is None:
        _sympy()
        import sympy.parsing.sympy_parser  # noqa: F401  (imported once, before the fork)

        _POOL = WorkerPool(_work, SETTINGS.workers, SETTINGS.timeout_s, SETTINGS.memory_mb)
    return _POOL


def check_many(task: str, pairs: list, timeout_s: float | None = None) -> list[bool]:
    """Verdicts for ``pairs`` on the workers: a timeout, an error or a worker that died counts as not equal
    (logged)."""
    _sympy()  # a clear ImportError here, not inside a worker
    timeout_s = timeout_s or SETTINGS.timeout_s
    outcomes = _pool().map([(task, a, b) for a, b in pairs], timeout_s=timeout_s)
    verdicts = []
    for (a, b), (status, value) in zip(pairs, outcomes, strict=True):
        if status not in ("ok", "cancelled"):
            why = {
                "timeout": f"gave no verdict within {timeout_s} s",
                "memory": f"took more than its {SETTINGS.memory_mb} MiB of memory (its worker was killed)",
                "crash": "killed its worker (an allocation past the memory limit?)",
                "error": f"raised {value}",
            }[status]
            log.warning("math check of %r against %r %s; counted as not equal", str(a)[-80:], str(b)[:80], why)
        verdicts.append(status == "ok" and bool(value))
    cancelled = sum(status == "cancelled" for status, _ in outcomes)
    if cancelled:
        log.warning("%d math checks cancelled: their caller timed out and no longer waits for them", cancelled)
    return verdicts


def math_equal(pred: str, ref: str, timeout_s: float | None = None) -> bool:
    """True when ``pred`` and ``ref`` denote the same answer (module docstring). Runs in a worker process that is
    killed after ``timeout_s`` seconds (default ``SETTINGS.timeout_s``); a timeout counts as not equal."""
    if pred is None or ref is None:
        return False
    return check_many("equal", [(pred, ref)], timeout_s)[0]


def math_accuracy_reward(prompts: list, responses: list, answers: list, **_) -> list:
    """1.0 where the response's final answer (:func:`extract_answer`) equals the row's answer, else 0.0. The rows
    are checked in parallel on the workers, each answer with its own timeout (extraction included)."""
    if not (len(prompts) == len(responses) == len(answers)):
        raise ValueError(
            f"math_accuracy_reward: {len(prompts)} prompts, {len(responses)} responses, {len(answers)} answers"
        )
    return [float(v) for v in check_many("reward", [(r, str(a)) for r, a in zip(responses, answers, strict=True)])]
