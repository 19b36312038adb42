"""Preference rows -> PrefInputs -> one optimiser step: the step every preference trainer shares.

A row is an encoded data row (``alignflow.data.render``) of one format -- ``preference`` (chosen/rejected),
``ranked`` (responses, best first) or ``unpaired`` (completion + label) -- plus any per-row PrefInputs value it
carries, e.g. ``ref_chosen_logps`` (float), ``prev_chosen_logps``, ``chosen_rewards``, ``chosen_token_rewards``
(list per response token). :func:`po_step` runs the forward (and backward) of one step's rows for a loss of the
table (``alignflow.algorithms.preference_table``) and prepares the extra inputs its row names; the policy role
(``alignflow.trainers.po_learner``), ``alignflow po`` and ``online_po`` call it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from alignflow.algorithms.preference import PrefInputs
from alignflow.algorithms.preference_table import PREFERENCE_LOSSES, loss_spec
from alignflow.config import ConfigError, TrainConfig
from alignflow.data.collate import token_budget_groups, token_groups
from alignflow.data.formats import DataError
from alignflow.distributed.groups import dp_equal_groups, dp_sum, dp_sum_dict, dp_world_size
from alignflow.distributed.shard import through_root
from alignflow.models.sequences import sequence_logps
from alignflow.models.varlen import supports_varlen
from alignflow.trainers import loop

# Per-row PrefInputs values a row may carry: floats (B,) and per-response-token lists (B, T).
ROW_SCALARS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_logps",
    "chosen_rewards",
    "rejected_rewards",
    "prev_chosen_logps",
    "prev_rejected_logps",
    "user_conditioned",
)
ROW_TOKENS = ("chosen_token_rewards", "rejected_token_rewards")


# ------------------------------------------------------------------------------------------ rows
def row_format(row: dict) -> str:
    """'preference', 'ranked' or 'unpaired', from an encoded row's keys."""
    if "chosen_ids" in row:
        return "preference"
    if "responses_ids" in row:
        return "ranked"
    if "label" in row:
        return "unpaired"
    raise DataError(
        f"a preference-optimisation row needs chosen/rejected, responses or completion+label; got keys {sorted(row)}"
    )


def row_sequences(row: dict, kl: bool = False) -> list[tuple[list[int], list[int]]]:
    """The (input_ids, loss_mask) sequences a row puts in the forward, in order (``kl``: KTO's mismatched one)."""
    if kl:
        return [(row["kl_ids"], row["kl_mask"])]
    fmt = row_format(row)
    if fmt == "preference":
        return [(row["chosen_ids"], row["chosen_mask"]), (row["rejected_ids"], row["rejected_mask"])]
    if fmt == "ranked":
        return list(zip(row["responses_ids"], row["responses_mask"], strict=False))
    return [(row["input_ids"], row["loss_mask"])]


def row_groups(rows: list[dict], budget: int, flat: bool, seqs: list | None = None) -> list[list[int]]:
    """Micro-batches of row indices: a row's sequences (``seqs[i]``, default its :func:`row_sequences`) always share
    a forward. ``flat``: consecutive rows up to ``budget`` real tokens; otherwise length-sorted groups under
    ``budget`` padded tokens."""
    seqs = seqs or [row_sequences(r) for r in rows]
    if flat:
        return token_groups([sum(len(ids) for ids, _ in s) for s in seqs], budget)
    return token_budget_groups([len(s) * max(len(ids) for ids, _ in s) for s in seqs], budget)


def pair_logps(model, pairs: list[dict], device, flat: bool = True, with_tokens: bool = False) -> dict:
    """Chosen and rejected log-probs of preference rows in ONE forward: ``chosen_logps``, ``rejected_logps``,
    ``chosen_lengths``, ``rejected_lengths`` (B,) and, ``with_tokens``, ``chosen_token_logps``/``chosen_mask`` etc.
    (B, Tr)."""
    out = sequence_logps(model, [s for p in pairs for s in row_sequences(p)], device, flat, with_tokens)
    two = {k: v.view(len(pairs), 2, *v.shape[1:]) for k, v in out.items()}  # (B, 2, ...): [chosen, rejected]
    res = {}
    for side, i in (("chosen", 0), ("rejected", 1)):
        res |= {f"{side}_logps": two["logps"][:, i], f"{side}_lengths": two["lengths"][:, i]}
        if with_tokens:
            res |= {f"{side}_token_logps": two["token_logps"][:, i], f"{side}_mask": two["token_mask"][:, i]}
    return res


def _pad_cols(rows: list[list[float]], width: int, device) -> torch.Tensor:
    return torch.tensor([list(r) + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32, device=device)


def row_inputs(
    model, rows: list[dict], device, flat: bool = True, with_tokens: bool = False, n_max: int | None = None
) -> dict:
    """PrefInputs fields of ``rows`` (one format): the policy's log-probs from ONE forward, plus the values the rows
    carry (``ROW_SCALARS``, ``ROW_TOKENS``, KTO's ``label``). ``n_max`` pads ranked lists to that many responses."""
    fmt, dev = row_format(rows[0]), device
    fields: dict = {}
    if fmt == "preference":
        p = pair_logps(model, rows, device, flat, with_tokens)
        fields = {
            "policy_chosen_logps": p["chosen_logps"],
            "policy_rejected_logps": p["rejected_logps"],
            "chosen_lengths": p["chosen_lengths"],
            "rejected_lengths": p["rejected_lengths"],
        }
        if with_tokens:
            fields |= {
                "policy_chosen_token_logps": p["chosen_token_logps"],
                "chosen_mask": p["chosen_mask"],
                "policy_rejected_token_logps": p["rejected_token_logps"],
                "rejected_mask": p["rejected_mask"],
            }
    elif fmt == "unpaired":
        out = sequence_logps(model, [row_sequences(r)[0] for r in rows], device, flat)
        fields = {"policy_logps": out["logps"], "desirable": torch.tensor([bool(r["label"]) for r in rows], device=dev)}
    else:
        counts = [len(r["responses_ids"]) for r in rows]
        n = n_max or max(counts)
        out = sequence_logps(model, [s for r in rows for s in row_sequences(r)], device, flat)
        slot = torch.tensor([i * n + k for i, c in enumerate(counts) for k in range(c)], device=dev)  # (Σc,)

        def scatter(v: torch.Tensor, fill: float) -> torch.Tensor:  # (Σc,) -> (B, n), `fill` where a row has fewer
            return (
                torch.full((len(rows) * n,), fill, dtype=v.dtype, device=dev).index_put((slot,), v).view(len(rows), n)
            )

        fields = {
            "ranked_logps": scatter(out["logps"], 0.0),
            "ranked_lengths": scatter(out["lengths"], 0),
            "ranked_mask": scatter(torch.ones_like(out["lengths"], dtype=torch.bool), False),
        }
    for key in ROW_SCALARS:
        if key in rows[0]:
            fields[key] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float32, device=dev)
    for key in ROW_TOKENS:
        if key in rows[0] and with_tokens:
            width = fields["chosen_mask"].shape[1] if key.startswith("chosen") else fields["rejected_mask"].shape[1]
            fields[key] = _pad_cols([r[key] for r in rows], width, dev)
    return fields


def _cat_fields(parts: list[dict]) -> dict:
    """Concatenate micro-batches' PrefInputs fields row-wise (2-D fields right-padded to the widest)."""
    out = {}
    for key in parts[0]:
        values = [p[key].detach() for p in parts]
        if values[0].dim() == 2:
            width = max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values]
        out[key] = torch.cat(values)
    return out


# ------------------------------------------------------------------------------------------ the step
def loss_kwargs(loss_cfg, key: str = "loss") -> dict:
    """The hyper-parameters set in ``loss_cfg`` (a POLossConfig, at config key ``key``) as keyword arguments of its
    loss; ConfigError for an unknown loss name, or when a hyper-parameter is set that the loss does not take (the
    message lists the ones it does). Keys the trainers read themselves (any loss's ``settings``, ``bc_steps``) are
    not hyper-parameters."""
    accepted = loss_spec(loss_cfg.name, f"{key}.name").hyper_parameters()
    trainer_keys = {"name", "bc_steps"} | {k for s in PREFERENCE_LOSSES.values() for k in s.settings}
    out = {}
    for f in dataclasses.fields(loss_cfg):
        value = getattr(loss_cfg, f.name)
        if f.name in trainer_keys or value is None or value == "":
            continue
        if f.name not in accepted:
            raise ConfigError(
                f"loss.{f.name}={value!r} is not a hyper-parameter of loss '{loss_cfg.name}' (its "
                f"hyper-parameters: {', '.join(accepted) or 'none'})"
            )
        out[f.name] = value
    return out


@torch.no_grad()
def kto_z0(model, rows: list[dict], device, flat: bool = True, budget: int = 8192) -> float:
    """KTO's reference point ``z_0 = max(0, mean_i[LP_θ(y'_i|x_i) - LP_ref(y'_i|x_i)])`` over the rows' mismatched
    completions (``kl_ids``/``kl_mask``, reference values ``ref_kl_logps``), without gradient (it is detached)."""
    if "kl_ids" not in rows[0] or "ref_kl_logps" not in rows[0]:
        raise ValueError(
            "kto needs each row's mismatched completion (kl_ids, kl_mask) and its ref_kl_logps; "
            "see add_kto_mismatched and compute_ref_logps"
        )
    total = 0.0
    for g, real in dp_equal_groups(token_groups([len(rows[i]["kl_ids"]) for i in range(len(rows))], budget)):
        pol = sequence_logps(model, [row_sequences(rows[i], kl=True)[0] for i in g], device, flat)["logps"]
        total += real * float((pol - torch.tensor([rows[i]["ref_kl_logps"] for i in g], device=device)).sum())
    return max(0.0, dp_sum(total) / dp_sum(len(rows)))  # the mean over every data-parallel rank's rows


def _extra_metrics(f: dict) -> dict:
    """pref/chosen_logp, pref/rejected_logp and (with reference values) pref/kl of a step's PrefInputs fields."""
    if "policy_chosen_logps" in f:
        out = {
            "pref/chosen_logp": f["policy_chosen_logps"].mean(),
            "pref/rejected_logp": f["policy_rejected_logps"].mean(),
        }
        if "ref_chosen_logps" in f:
            out["pref/kl"] = torch.cat(
                [f["ref_chosen_logps"] - f["policy_chosen_logps"], f["ref_rejected_logps"] - f["policy_rejected_logps"]]
            ).mean()
        return out
    if "policy_logps" in f:
        d, lp = f["desirable"], f["policy_logps"]
        out = {
            "pref/chosen_logp": lp[d].mean() if d.any() else lp.new_zeros(()),
            "pref/rejected_logp": lp[~d].mean() if (~d).any() else lp.new_zeros(()),
        }
        if "ref_logps" in f:
            out["pref/kl"] = (f["ref_logps"] - lp).mean()
        return out
    return {"pref/chosen_logp": f["ranked_logps"][:, 0].mean(), "pref/rejected_logp": f["ranked_logps"][:, 1].mean()}


def po_step(
    model, rows: list[dict], loss: str | Callable, loss_kw: dict, train: TrainConfig, device, backward: bool = True
) -> tuple[dict, int]:
    """Forward (and backward) of one optimiser step's ``rows``; gradients are left in ``.grad``.

    The loss is the mean over the rows: every micro-batch (``train.micro_batch_tokens``) adds its SUMMED row losses
    divided by ``len(rows)``. KTO's z_0 is computed over all the rows first (:func:`kto_z0`). The metrics come from
    the loss applied once more to the whole step's detached inputs, so they do not depend on the split either.
    ``loss``: a name in the loss table (its row's ``extra`` inputs are prepared) or a plain loss function.
    Returns ``(metrics as floats, real tokens)``; a non-finite loss gives ``{"loss": nan}``.
    """
    extra = loss_spec(loss).extra if isinstance(loss, str) else ()  # a plain function (a pretrain loss): none
    fn, device = loss_spec(loss).fn if isinstance(loss, str) else loss, torch.device(device)
    flat = train.packing and supports_varlen(model)
    kw = dict(loss_kw)
    n_rows, scale = dp_sum(len(rows)), dp_world_size()  # the step's rows over every data-parallel rank
    if "mismatched" in extra:
        with loop.autocast(device, train.mixed_precision):
            kw["z0"] = through_root(model, lambda: kto_z0(model, rows, device, flat, train.micro_batch_tokens))
    with_tokens = "token_rewards" in extra
    n_max = max((len(r.get("responses_ids", ())) for r in rows), default=0) or None
    parts, tokens = [], 0
    groups = row_groups(rows, train.micro_batch_tokens, flat)
    for g, real in dp_equal_groups(groups):
        chunk = [rows[i] for i in g]
        with loop.autocast(device, train.mixed_precision):
            fields = through_root(model, lambda chunk=chunk: row_inputs(model, chunk, device, flat, with_tokens, n_max))
        total, _ = fn(PrefInputs(**fields), reduction="sum", **kw)
        if backward:
            (total * (scale * real / n_rows)).backward()  # mean over the step's rows, whatever the split
        if real:
            parts.append(fields)
            tokens += sum(len(ids) for r in chunk for ids, _ in row_sequences(r))
    step = _cat_fields(parts)
    with torch.no_grad():
        value, metrics = fn(PrefInputs(**step), reduction="mean", **kw)
    metrics = {"loss": value} | metrics | _extra_metrics(step)
    # row-weighted over the ranks: exact for the loss and every per-row mean (accuracy, margins, log-probs)
    metrics = dp_sum_dict({k: float(v) * len(rows) / n_rows for k, v in metrics.items()})
    if not math.isfinite(metrics["loss"]):
        return {"loss": float("nan")}, 0
    return metrics, int(dp_sum(tokens))
