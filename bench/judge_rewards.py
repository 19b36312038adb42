"""Pairwise rewards for the judge comparison (``bench/judge_comparison.py``): each sample's win rate against the
other samples of its prompt's group, read by a pairwise preference model or by a generative judge.

The reward functions are named in ``reward.functions`` by file path (``bench/judge_rewards.py:pm_win_rate``), so
they find their model through an environment variable set by the bench: ``JC_PM`` (an ``alignflow pm``
directory), ``JC_GENRM`` / ``JC_JUDGE`` (causal-LM judges that end their answer with ``overall this|that .``).
Within a group of G samples every unordered pair is compared; a judge reads it in both orders and the two
readings are averaged (position bias cancels), a missing verdict counting as 1/2; the preference model is
symmetric by construction (configs/pm.yaml). Row i's reward is its mean win over the G - 1
others.
"""

from __future__ import annotations

import os

import torch

from alignflow.config import ModelConfig
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.rewards.preference_model import PreferenceModel
from alignflow.rewards.verdict import FIRST, parse_position
from alignflow.rollout import HFEngine, SamplingParams
from alignflow.tasks.reviews_judge import judge_prompt

_CACHE: dict = {}
JUDGE_TOKENS = {"JC_GENRM": 96, "JC_JUDGE": 4}  # a rationale then the verdict; the verdict alone


def _pairs(group: list) -> list[tuple[int, int]]:
    rows: dict = {}
    for i, g in enumerate(group):
        rows.setdefault(g, []).append(i)
    return [(a, b) for idx in rows.values() for k, a in enumerate(idx) for b in idx[k + 1 :]]


def _win_rates(n: int, pairs: list[tuple[int, int]], p_first: list[float]) -> list[float]:
    wins, counts = [0.0] * n, [0] * n
    for (a, b), p in zip(pairs, p_first, strict=True):
        wins[a] += p
        wins[b] += 1.0 - p
        counts[a] += 1
        counts[b] += 1
    return [w / c if c else 0.5 for w, c in zip(wins, counts, strict=True)]


def pm_win_rate(prompts: list, responses: list, group: list) -> list[float]:
    """Win rate of each sample in its group under the preference model ``$JC_PM``."""
    if "pm" not in _CACHE:
        _CACHE["pm"] = PreferenceModel(os.environ["JC_PM"])
    pairs = _pairs(group)
    if not pairs:
        return [0.5] * len(responses)
    p = _CACHE["pm"].win_prob(
        [prompts[a] for a, _ in pairs],
        [_spaced(responses[a]) for a, _ in pairs],
        [_spaced(responses[b]) for _, b in pairs],
    )
    return _win_rates(len(responses), pairs, [float(x) for x in p])


def _spaced(response: str) -> str:
    """A decoded response with the leading space the task's completions carry (the review reads prompt + it)."""
    return response if response[:1].isspace() else " " + response


def _judge(env: str, prompts: list, responses: list, group: list) -> list[float]:
    if env not in _CACHE:
        path = os.environ[env]
        tok = load_tokenizer(path)
        _CACHE[env] = (HFEngine(load_causal_lm(ModelConfig(name_or_path=path), "cpu").eval(), tok), tok)
    engine, tok = _CACHE[env]
    pairs = _pairs(group)
    if not pairs:
        return [0.5] * len(responses)
    ordered = pairs + [(b, a) for a, b in pairs]  # both orders: a judge's position bias cancels
    questions = [
        tok(judge_prompt(prompts[a], _spaced(responses[a]), _spaced(responses[b])))["input_ids"] for a, b in ordered
    ]
    with torch.no_grad():
        out = engine.generate(questions, SamplingParams(n=1, temperature=0.0, max_new_tokens=JUDGE_TOKENS[env]))
    texts = tok.batch_decode(
        [r[m.bool()].tolist() for r, m in zip(out["response_ids"], out["response_mask"], strict=True)],
        skip_special_tokens=True,
    )
    first = [0.5 if v is None else float(v == FIRST) for v in (parse_position(t) for t in texts)]
    n = len(pairs)
    p_first = [(first[k] + 1.0 - first[n + k]) / 2 for k in range(n)]  # P(a beats b), both orders averaged
    return _win_rates(len(responses), pairs, p_first)


def genrm_win_rate(prompts: list, responses: list, group: list) -> list[float]:
    """Win rate of each sample in its group under the generative reward model ``$JC_GENRM``."""
    return _judge("JC_GENRM", prompts, responses, group)


def judge_win_rate(prompts: list, responses: list, group: list) -> list[float]:
    """Win rate of each sample in its group under the verdict-only judge ``$JC_JUDGE``."""
    return _judge("JC_JUDGE", prompts, responses, group)
