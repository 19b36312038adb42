"""User types with different tastes on the ``reviews`` task, for personalised preference learning (P-DPO, VPL).

Each user scores a review with its own weights on the four terms of the task's gold reward
(``reviews.attribute_ratings``; weights (1, 1, 1, 1) give the task's gold reward)::

    user       sentiment  fluency  variety  length     taste
    fan           1.0       1.0      1.0     1.0       the task's gold: likes positive, fluent reviews
    critic       -1.0       1.0      1.0     1.0       likes negative reviews, as fluent
    stickler      0.2       2.0      2.0     1.0       cares little about sentiment, much about form

``fan`` and ``critic`` disagree on every pair that differs only in sentiment: no single reward model or policy can
please both, which is what personalisation is for. User ids are 1, 2, 3 in this order; 0 is the generic (unknown)
user.

Files ``build_task("reviews", ...)`` writes (next to the task's others):

* ``user_pairs.jsonl``: ``{"prompt", "chosen", "rejected", "user"}`` on training openings; ``user`` is the user's
  name; the label is a Bradley-Terry draw on that user's gold at temperature ``USER_NOISE * task.label_noise``
  (a quarter of the task pairs' noise: with the task's noise most pairs that differ only in sentiment are
  coin flips, and there would be little taste to learn);
* ``user_eval.jsonl``: the same on held-out openings, ordered by the noise-free user gold (ties left out);
* ``p_dpo_pairs.jsonl``: the user pairs as P-DPO trains on them (:func:`p_dpo_rows`, alpha = 0.5): each pair twice,
  once after its user's tag and once after the generic tag;
* ``p_dpo_eval.jsonl``: the held-out user pairs after their user's tag (what a personalised policy is scored on);
* ``user_prompts.jsonl`` / ``user_eval_prompts.jsonl``: the task's training / held-out prompts, each after its user's
  tag, with a ``user`` field (users take turns): the prompts of online RL with a personalised reward (``reward.vpl``,
  docs/vpl.md), scored for the row's user by :func:`row_user_gold` (``reward.functions``).

User tags: P-DPO conditions the policy on a user by words before the prompt, all in the task's vocabulary: the
generic tag ``we`` for everyone, then the user's own tag (``happily``, ``sadly``, ``clearly``):
``"we sadly Review : the plot"`` is the critic's prompt, ``"we Review : the plot"`` the generic user's.
"""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

from alignflow.config import TaskConfig
from alignflow.data.formats import DataError
from alignflow.tasks import reviews
from alignflow.tasks.common import make_pair, read_jsonl, task_rng, write_jsonl

TERMS = ("sentiment", "fluency", "variety", "length")
USERS = {  # name -> weights on TERMS
    "fan": (1.0, 1.0, 1.0, 1.0),
    "critic": (-1.0, 1.0, 1.0, 1.0),
    "stickler": (0.2, 2.0, 2.0, 1.0),
}
USER_IDS = {name: i for i, name in enumerate(USERS, 1)}  # 0 = the generic user
GENERIC_TAG = "we"
USER_TAGS = {"fan": "happily", "critic": "sadly", "stickler": "clearly"}
FILES = {
    "user_pairs": "user_pairs.jsonl",
    "user_eval": "user_eval.jsonl",
    "p_dpo_pairs": "p_dpo_pairs.jsonl",
    "p_dpo_eval": "p_dpo_eval.jsonl",
    "user_prompts": "user_prompts.jsonl",
    "user_eval_prompts": "user_eval_prompts.jsonl",
}
P_DPO_ALPHA = 0.5
USER_NOISE = 0.25  # the users' Bradley-Terry temperature, as a fraction of task.label_noise


def check_user(user: str, where: str = "user") -> str:
    if user not in USERS:
        raise DataError(f"{where}: {user!r} is not one of {', '.join(USERS)}")
    return user


def user_gold(user: str, prompts: list, responses: list) -> list[float]:
    """Each (prompt, response)'s gold reward for ``user``: its weights times the task's attribute ratings. Prompts
    may carry user tags (they are not part of the review)."""
    w = USERS[check_user(user)]
    return [sum(wk * f for wk, f in zip(w, feats, strict=True)) for feats in rating_features(prompts, responses)]


def row_user_gold(prompts: list, responses: list, user: list) -> list[float]:
    """Each row's gold reward for the row's own user (a ``reward.functions`` entry reading the ``user`` field)."""
    out = []
    for i, (p, r, u) in enumerate(zip(prompts, responses, user, strict=True)):
        out += user_gold(check_user(u, f"row {i}: field 'user'"), [p], [r])
    return out


def rating_features(prompts: list, responses: list) -> list[list[float]]:
    """The task's four attribute ratings of each review, in ``TERMS`` order (what every user's gold weighs)."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        ratings = reviews.attribute_ratings(strip_tags(p), r)
        out.append([float(ratings[t]) for t in TERMS])
    return out


def tag_prompt(prompt: str, user: str | None) -> str:
    """``prompt`` after the generic tag and, for a user (not None), the user's own tag."""
    tags = [GENERIC_TAG] + ([USER_TAGS[check_user(user)]] if user is not None else [])
    return " ".join([*tags, prompt])


def strip_tags(prompt: str) -> str:
    """The task prompt without user tags (everything before ``Review``)."""
    i = prompt.find(reviews.PROMPT_PREFIX)
    return prompt[i:] if i > 0 else prompt


def p_dpo_copies(alpha: float) -> tuple[int, int]:
    """(copies with the user's tag, copies with the generic tag) of each pair so that the mean DPO loss over the
    rows is ``alpha * DPO(user) + (1 - alpha) * DPO(generic)``: alpha must be a multiple of 1/8 in [0, 1]."""
    frac = Fraction(alpha).limit_denominator(8)
    if not 0 <= alpha <= 1 or abs(float(frac) - alpha) > 1e-9:
        raise ValueError(f"P-DPO alpha={alpha} must be a multiple of 1/8 in [0, 1]")
    return frac.numerator, frac.denominator - frac.numerator


def p_dpo_rows(rows: list[dict], alpha: float = P_DPO_ALPHA) -> list[dict]:
    """User pairs (``user`` field) as P-DPO rows for ``alignflow po`` (docs/p_dpo.md): each pair with its user's
    tag and with the generic tag, in the proportion alpha : 1 - alpha (:func:`p_dpo_copies`)."""
    k_user, k_generic = p_dpo_copies(alpha)
    out = []
    for i, r in enumerate(rows):
        user = check_user(r.get("user"), f"row {i}: field 'user'")
        base = {"chosen": r["chosen"], "rejected": r["rejected"]}
        out += [{"prompt": tag_prompt(r["prompt"], user)} | base] * k_user
        out += [{"prompt": tag_prompt(r["prompt"], None)} | base] * k_generic
    return out


def _user_pair(rng: random.Random, split: str, cfg: TaskConfig, user: str, noise: float) -> dict | None:
    opening = reviews._opening(rng, split, cfg.seed, full=False)[0]
    prompt, a = reviews.as_prompt(opening), reviews._pair_response(rng, opening)
    b = a
    while b == a:
        b = reviews._pair_response(rng, opening)
    ga, gb = user_gold(user, [prompt, prompt], [a, b])
    if noise == 0 and ga == gb:
        return None
    return make_pair(rng, prompt, a, b, ga, gb, noise) | {"user": user}


def make_user_rows(cfg: TaskConfig) -> dict[str, list[dict]]:
    """The files' rows, keyed like :data:`FILES` (module docstring). Users take turns, so each has a third."""
    rng, names, noise = task_rng(reviews.NAME, cfg.seed, "users"), list(USERS), USER_NOISE * cfg.label_noise
    train = [_user_pair(rng, "train", cfg, names[i % len(names)], noise) for i in range(cfg.num_pairs)]
    train = [r for r in train if r]  # with task.label_noise 0, ties are left out as in the held-out file
    rng = task_rng(reviews.NAME, cfg.seed, "users_eval")
    held = [_user_pair(rng, "eval", cfg, names[i % len(names)], 0.0) for i in range(max(300, cfg.num_pairs // 2))]
    held = [r for r in held if r]
    return {
        "user_pairs": train,
        "user_eval": held,
        "p_dpo_pairs": p_dpo_rows(train),
        "p_dpo_eval": p_dpo_rows(held, 1.0),
    }


def user_prompt_rows(prompts: list[str]) -> list[dict]:
    """Prompts after their user's tag with a ``user`` field; users take turns."""
    names = list(USERS)
    return [
        {"prompt": tag_prompt(p, names[i % len(names)]), "user": names[i % len(names)]} for i, p in enumerate(prompts)
    ]


def write_files(cfg: TaskConfig, task_dir: Path) -> None:
    """The user files (module docstring); the prompt files read the task's prompt files, written before."""
    rows = make_user_rows(cfg)
    for key, src in (("user_prompts", "prompts.jsonl"), ("user_eval_prompts", "eval_prompts.jsonl")):
        rows[key] = user_prompt_rows([r["prompt"] for r in read_jsonl(Path(task_dir) / src)])
    for key, name in FILES.items():
        write_jsonl(Path(task_dir) / name, rows[key])


def paths(task_dir: str | Path) -> dict[str, Path]:
    """{key: path} of the user files of a built ``reviews`` task directory."""
    return {key: Path(task_dir) / name for key, name in FILES.items()}
