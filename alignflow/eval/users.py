"""Per-user evaluation in ``alignflow eval``: a personalised policy's user embeddings and each user's gold reward.

A policy directory that holds ``user_embeddings.safetensors`` (P-DPO, docs/p_dpo.md) is loaded with them, and
every prompt row is generated after a soft prompt: its ``user``'s, or the generic one for a row without a user or
with a user the policy has not seen (the rule of :mod:`alignflow.models.user_embeddings`).

``users: true`` evaluates on the built-in task's held-out user prompts (``reviews``: ``user_eval_prompts.jsonl``,
users taking turns) with the user tags taken off the text -- a P-DPO policy is conditioned by its soft prompts, and
was trained on untagged prompts -- and scores each sample with the gold reward of its row's user
(:func:`alignflow.tasks.users.row_user_gold`); ``eval/gold_reward/<user>`` is the mean over that user's samples.

The reference and the reward model see the sampled responses after prompts of their own: a reference with user
embeddings gets the row user's soft prompt from its own table, one without gets the plain prompt (so ``eval/kl``
is KL(pi(. | user, x) || pi_ref(. | x))); the reward model always scores the plain prompt and the response.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from alignflow.batch import Batch
from alignflow.config import ConfigError, EvalConfig, ModelConfig
from alignflow.data.pipeline import prepare_data
from alignflow.models import load_causal_lm
from alignflow.models.user_embeddings import FILE, load_user_embeddings, user_embedding, user_prompt
from alignflow.rollout.engine import pad_prompts, rollout_tensors
from alignflow.tasks import EXTRA_FILES, build_task
from alignflow.tasks import users as task_users
from alignflow.tasks.common import read_jsonl, write_jsonl

log = logging.getLogger(__name__)

USER_PROMPTS = "user_prompts.jsonl"  # the evaluated user prompts (tags removed), written into output_dir


def has_user_embeddings(path: str | Path) -> bool:
    return (Path(str(path)) / FILE).is_file()


def load_model(path: str | Path, device):
    """A causal LM from ``path``, with its user embeddings attached when the directory has them."""
    model = load_causal_lm(ModelConfig(name_or_path=str(path)), device)
    if Path(str(path)).is_dir():
        load_user_embeddings(model, path)
    return model


def check_users(cfg: EvalConfig, frontier: list[dict]) -> None:
    """``users: true`` before any model is loaded: a task with users, no ``data.path``, a policy to evaluate, and
    user embeddings in the policy and every frontier entry. One ConfigError line naming the key otherwise."""
    if not cfg.users:
        return
    if task_users not in EXTRA_FILES.get(cfg.task.name, ()):
        with_users = [name for name, mods in EXTRA_FILES.items() if task_users in mods]
        raise ConfigError(
            f"users: true evaluates on a built-in task's user prompts; task.name={cfg.task.name!r} has no users "
            f"(tasks with users: {', '.join(with_users)})"
        )
    if cfg.data.path:
        raise ConfigError(
            "users: true evaluates on the built-in task's held-out user prompts; leave data.path empty (a "
            "data.path file's 'user' fields pick the soft prompts without users: true, scored without gold)"
        )
    if not (cfg.policy or frontier):
        raise ConfigError("users: true evaluates policies per user; give policy=<dir> or frontier=<dir,...>")
    named = [("policy", cfg.policy)] if cfg.policy else []
    for where, path in named + [(f"frontier ({e['path']})", e["path"]) for e in frontier]:
        if not has_user_embeddings(path):
            raise ConfigError(
                f"users: true: {where}: {path} has no {FILE} (the user embeddings alignflow po writes with "
                f"loss.name=p_dpo); evaluate a P-DPO model, or drop users: true"
            )


def user_eval_rows(cfg: EvalConfig, tok, out: Path) -> list[dict]:
    """The built-in task's held-out user prompts, tags removed, tokenised: ``prompt``, ``prompt_ids``, ``user``."""
    art = build_task(cfg.task.name, cfg.task, out / "task")
    src = task_users.paths(art.dir)["user_eval_prompts"]
    path = out / USER_PROMPTS
    write_jsonl(path, [{**r, "prompt": task_users.strip_tags(r["prompt"])} for r in read_jsonl(src)])
    data = prepare_data(dataclasses.replace(cfg.data, path=str(path), eval_path=""), tok, expect=("prompt",))
    return (data.train + data.eval)[: cfg.num_prompts]


def policy_prompts(model, rows: list[dict], bos: int | None) -> list[list[int]]:
    """Each row's prompt ids after its user's soft prompt (unchanged for a model without user embeddings)."""
    emb = user_embedding(model)
    if emb is not None:
        unseen = sorted({r["user"] for r in rows if r.get("user") is not None} - set(emb.users))
        if unseen:
            log.warning("users the policy has no embedding for get the generic soft prompt: %s", ", ".join(unseen))
    return [user_prompt(model, r["prompt_ids"], r.get("user"), bos) for r in rows]


def with_prompts(batch: Batch, prompts: list[list[int]], pad_id: int) -> Batch:
    """``batch`` with row i's prompt replaced by ``prompts[i]`` (left-padded again), its response kept: new
    ``prompt_ids``, ``prompt_mask``, ``input_ids``, ``attention_mask`` and ``position_ids`` (cumsum of the mask
    - 1, 0 on padding, as the engine lays them out)."""
    dev = batch["response_ids"].device
    ids, mask = pad_prompts(prompts, pad_id)
    new = rollout_tensors(ids.to(dev), mask.to(dev), batch["response_ids"], batch["response_mask"])
    return Batch({**batch.tensors, **new}, batch.meta)


def per_user_means(key: str, users: list, values: list[float]) -> dict:
    """``{key/<user>: mean of values over that user's entries}`` (entries without a user are left out)."""
    by: dict = {}
    for u, v in zip(users, values, strict=True):
        if u is not None:
            by.setdefault(u, []).append(v)
    return {f"{key}/{u}": sum(vs) / len(vs) for u, vs in by.items()}
