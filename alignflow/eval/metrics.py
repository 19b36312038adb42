"""Text metrics of policy samples: diversity (distinct-n, self-BLEU), verifiable accuracy, response length.

Pure functions over strings (and token counts); no model. Texts are split on whitespace for the n-gram metrics
(the built-in tasks' words; for a subword model this is a word-level measure, which is what a reader of the
samples sees). The formulas are on ``docs/eval.md``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from alignflow.rewards.math import extract_answer

BLEU_MAX_N = 4


# ----------------------------------------------------------------------------------------------- diversity
def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams (tuples) of ``tokens``."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / total n-grams over whitespace tokens of ``texts`` (Li et al. 2016); 0 with no n-gram."""
    grams = Counter()
    for t in texts:
        grams.update(ngrams(t.split(), n))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def sentence_bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = BLEU_MAX_N) -> float:
    """Smoothed sentence BLEU-``max_n`` of one tokenised hypothesis against tokenised references.

    BLEU (Papineni et al. 2002) = BP · exp(Σ_{n=1..N} (1/N) log p_n), with

    * p_n the clipped n-gram precision: Σ_g min(c_hyp(g), max_ref c_ref(g)) / Σ_g c_hyp(g);
    * add-one smoothing for n >= 2 (Lin & Och 2004, "smoothed BLEU"): p_n = (matches + 1) / (total + 1). The
      unigram precision is not smoothed, so a hypothesis sharing no word with any reference scores exactly 0,
      and one equal to a reference scores exactly 1. An order the hypothesis is too short to have gives
      (0 + 1) / (0 + 1) = 1: shortness is charged by the brevity penalty only;
    * BP = 1 if c > r else exp(1 − r / c), with c the hypothesis length and r the length of the reference
      closest to it (the shorter one on a tie), as in the paper.

    An empty hypothesis (or no reference) scores 0.
    """
    if not hypothesis or not references:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp = ngrams(hypothesis, n)
        best: Counter = Counter()
        for ref in references:
            best |= ngrams(ref, n)  # element-wise max over references
        matches = sum(min(c, best[g]) for g, c in hyp.items())
        total = sum(hyp.values())
        if n > 1:
            matches, total = matches + 1, total + 1
        if matches == 0:
            return 0.0
        log_p += math.log(matches / total) / max_n
    c = len(hypothesis)
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length))
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(log_p)


def self_bleu(texts: list[str], max_n: int = BLEU_MAX_N) -> float | None:
    """Self-BLEU of the samples of ONE prompt (Zhu et al. 2018, Texygen): the mean over samples i of
    ``sentence_bleu(sample_i, references = the other samples)``. Higher = less diverse (1 when all samples are
    the same). None with fewer than two samples (nothing to compare against)."""
    if len(texts) < 2:
        return None
    tokens = [t.split() for t in texts]
    scores = [sentence_bleu(tokens[i], tokens[:i] + tokens[i + 1 :], max_n) for i in range(len(tokens))]
    return sum(scores) / len(scores)


def diversity_metrics(samples: list[list[str]]) -> dict:
    """``eval/distinct_1``, ``eval/distinct_2`` (within each prompt's samples) and ``eval/self_bleu``, each
    averaged over prompts; self-BLEU is left out when every prompt has a single sample."""
    out = {
        "eval/distinct_1": sum(distinct_n(s, 1) for s in samples) / len(samples),
        "eval/distinct_2": sum(distinct_n(s, 2) for s in samples) / len(samples),
    }
    bleus = [b for b in (self_bleu(s) for s in samples) if b is not None]
    if bleus:
        out["eval/self_bleu"] = sum(bleus) / len(bleus)
    return out


# ----------------------------------------------------------------------------------------------- accuracy
_SEPARATORS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def _normal_answer(text: str) -> str:
    """Whitespace and thousands separators removed; a number in canonical form (``095``, ``95.0`` -> ``95``)."""
    s = _SEPARATORS.sub("", str(text).strip()).replace(" ", "")
    try:
        value = float(s)
    except ValueError:
        return s
    if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def extracted_answer(response: str) -> str | None:
    """The final answer of a response (:func:`alignflow.rewards.math.extract_answer`: the last ``\\boxed{}``,
    ``<answer>`` tag or number), normalised for comparison; None when there is none."""

    found = extract_answer(response)
    return None if found is None else _normal_answer(found)


def answer_correct(response: str, answer) -> bool:
    """Exact match of the extracted answer with the reference after normalisation (numbers compare by value:
    ``95`` == ``95.0`` == ``095``; other strings exactly). No symbolic comparison: use
    :func:`alignflow.rewards.math.math_equal` (sympy) as a reward for LaTeX answers."""
    pred = extracted_answer(response)
    return pred is not None and pred == _normal_answer(answer)


def accuracy_metrics(samples: list[list[str]], answers: list) -> dict:
    """Verifiable-task accuracy over prompts x k samples.

    ``eval/accuracy`` = pass@1 = mean over all samples of ``answer_correct``; ``eval/pass_at_k`` = share of
    prompts with at least one correct sample; ``eval/maj_at_k`` = share of prompts whose most frequent extracted
    answer (ties: the one reached first in sample order; samples without an answer do not vote) is correct.
    """
    if len(samples) != len(answers):
        raise ValueError(f"accuracy_metrics: {len(samples)} prompts but {len(answers)} answers")
    hits, any_hit, maj_hit = 0, 0, 0
    for ss, ref in zip(samples, answers, strict=False):
        correct = [answer_correct(s, ref) for s in ss]
        hits += sum(correct)
        any_hit += any(correct)
        votes = Counter(a for a in (extracted_answer(s) for s in ss) if a is not None)
        if votes:
            top = max(votes.values())
            winner = next(a for a in (extracted_answer(s) for s in ss) if votes.get(a) == top)
            maj_hit += winner == _normal_answer(ref)
    total = sum(len(ss) for ss in samples)
    return {
        "eval/accuracy": hits / total,
        "eval/pass_at_k": any_hit / len(samples),
        "eval/maj_at_k": maj_hit / len(samples),
    }


# ----------------------------------------------------------------------------------------------- length
def length_metrics(lengths: list[int], finish_reasons: list[str]) -> dict:
    """``eval/response_len``: mean generated tokens (the ending EOS included); ``eval/truncated``: share of samples
    that hit max_new_tokens without ending (finish reason ``length``)."""
    return {
        "eval/response_len": sum(lengths) / len(lengths),
        "eval/truncated": sum(r == "length" for r in finish_reasons) / len(finish_reasons),
    }
