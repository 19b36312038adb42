"""P-DPO with learned user embeddings in ``alignflow po`` (the ``users`` input of the loss table; docs/p_dpo.md).

For a loss whose row names the ``users`` input (``p_dpo``):

1. every row of ``data.path`` (and ``data.eval_path``) must name its user in a string field ``user``; with
   ``loss.users`` set, the user must be one of them. A missing or unknown user stops with one line naming the file,
   the row and the field;
2. the policy gets :class:`~alignflow.models.user_embeddings.UserPromptEmbedding` (``loss.user_tokens`` vectors per
   user, users in the order of ``loss.users`` or of first appearance in the training rows); its parameters train
   with the policy's;
3. each pair becomes two rows: after its user's soft prompt (``user_conditioned`` = 1) and after the generic one
   (0); the ``p_dpo`` loss weighs them alpha : 1 - alpha. The reference log-probs of both come from the policy
   before its first update (or ``ref_model``, with the same soft-prompt ids: see the docs' departures).
"""

from __future__ import annotations

from alignflow.config import ConfigError, POConfig
from alignflow.data.formats import DataError
from alignflow.data.loading import load_records
from alignflow.distributed.ray_group import maybe_ray
from alignflow.models.user_embeddings import attach_user_embeddings, prefix


def check_user_rows(path: str, split: str, users: list[str]) -> list[str]:
    """The ``user`` of every row of ``path`` (in order); DataError naming file, row and field for a row without
    one, or (with ``users`` non-empty) with a user not in ``users``."""
    out = []
    for where, row in load_records(path, split):
        user = row.get("user") if isinstance(row, dict) else None
        if not isinstance(user, str) or not user:
            raise DataError(f"{where}: field 'user': missing or not a string (P-DPO reads each pair's user)")
        if users and user not in users:
            raise DataError(f"{where}: field 'user': {user!r} is not one of loss.users ({', '.join(users)})")
        out.append(user)
    return out


def _expand(rows: list[dict], soft: dict[str, list[int]], generic: list[int], bos) -> list[dict]:
    out = []
    for r in rows:
        for ids, flag in ((soft[r["user"]], 1.0), (generic, 0.0)):
            c_ids, c_mask = prefix(r["chosen_ids"], r["chosen_mask"], ids, bos)
            r_ids, r_mask = prefix(r["rejected_ids"], r["rejected_mask"], ids, bos)
            extra = {"prompt_len": r["prompt_len"] + len(ids)} if "prompt_len" in r else {}
            new = {"chosen_ids": c_ids, "chosen_mask": c_mask, "rejected_ids": r_ids, "rejected_mask": r_mask}
            out.append(r | new | extra | {"user_conditioned": flag})
    return out


def user_rows(cfg: POConfig, model, tokenizer, train: list[dict], held: list[dict]) -> tuple[list[dict], list[dict]]:
    """Attach user embeddings to ``model`` and lay out the training and held-out rows (module docstring)."""
    alpha = cfg.loss.alpha
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"loss.alpha={alpha}: P-DPO's alpha weighs the user term against the generic one, in [0, 1]")
    if cfg.ref_model:
        raise ConfigError(
            "ref_model: P-DPO's reference is the policy before its first update, with its initial user embeddings "
            "(a separate reference has none); leave ref_model empty"
        )
    if maybe_ray(cfg.resources):
        raise ConfigError("resources: P-DPO's user embeddings train in one process; leave resources.actor unset")
    seen = check_user_rows(cfg.data.path, cfg.data.split, list(cfg.loss.users))
    if cfg.data.eval_path:
        check_user_rows(cfg.data.eval_path, cfg.data.split, list(cfg.loss.users) or list(dict.fromkeys(seen)))
    users = list(cfg.loss.users) or list(dict.fromkeys(seen))
    emb = attach_user_embeddings(model, users, cfg.loss.user_tokens)
    soft = {u: emb.soft_ids(u) for u in users}
    generic, bos = emb.soft_ids(None), tokenizer.bos_token_id
    return _expand(train, soft, generic, bos), _expand(held, soft, generic, bos)
