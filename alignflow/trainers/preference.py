"""Offline preference optimisation (``alignflow po``): DPO and its family on a fixed data set.

Algorithm (Rafailov et al. 2023 for DPO; every loss of ``alignflow.algorithms.preference`` plugs in by name):

1. reference log-probs ``LP_ref`` of every response are computed ONCE before training (no grad) and cached in
   ``output_dir/ref_logps.safetensors``, keyed by a hash of (reference fingerprint, token ids of every row,
   max lengths, dtype); a later run with the same key reads them back. The reference is ``ref_model``, or the
   policy's own initial weights (no copy: they are computed before the first update), or -- under LoRA -- the
   policy with its adapters disabled. Reference-free losses (SimPO, ORPO, CPL, PRO) skip it.
2. each optimiser step reads ``train.batch_size`` rows; chosen and rejected (or all responses of a ranked list)
   go through ONE forward, laid end to end in a padding-free row (``alignflow.models.varlen``) or, for models
   without that support, right-padded; only the response positions reach the LM head.
3. rows are split into micro-batches by ``train.micro_batch_tokens``; each micro-batch's SUMMED row losses are
   divided by the step's row count, so the loss and the gradient are the mean over the step's rows whatever the
   split (tested: identical gradients with 1 or many micro-batches).

Departures, and why:

* **KTO's z_0** needs mismatched pairs (x, y'). Each row gets a FIXED mismatched completion (a seeded derangement
  of the data set) so that its reference log-prob is cached with the rest; z_0 is still the mean over the step's
  rows, computed before the step (no grad: it is detached in the paper) and passed to every micro-batch so that it
  does not depend on the split. TRL builds its mismatched pairs once per data set in the same way.
* **T-REG's contrastive prompts** x+/x- are the prompt with an instruction's tokens inserted at its start (after
  BOS), for standard and chat rows alike; the paper words the instruction inside the chat.
* **INPO** runs its first round (pi_t = pi_ref) and **REFUEL** its single-turn form (REBEL) with the row's
  ``margin`` as Q(y) - Q(y') and pi_t = pi_ref; later rounds belong to an iterative trainer that calls
  :func:`po_step` with ``prev_*_logps`` / its own references in the rows.
* Dropout is off during training (probabilities set to 0, as TRL's ``disable_dropout``; the model stays in train
  mode so that gradient checkpointing works): the policy and the cached reference must agree at step 0 (h = 0, DPO
  loss log 2).

Reusable pieces (batch in, batch out): :func:`sequence_logps`, :func:`pair_logps`, :func:`row_inputs`,
:func:`compute_ref_logps`, :func:`cached_ref_logps`, :func:`kto_z0`, :func:`po_step`. A row is an encoded data row
(``alignflow.data.render``) plus any per-row PrefInputs value it carries, e.g. ``ref_chosen_logps`` (float),
``prev_chosen_logps``, ``chosen_rewards``, ``chosen_token_rewards`` (list per response token).

Metrics: ``pref/accuracy``, ``pref/margin``, ``pref/chosen_reward``, ``pref/rejected_reward`` (from the loss),
``pref/chosen_logp`` / ``pref/rejected_logp`` (mean LP_θ of the chosen / rejected responses; KTO: desirable /
undesirable), ``pref/kl`` (mean LP_ref - LP_θ over the step's responses: a k1 estimate of KL(π_ref‖π_θ) when the
responses were sampled from π_ref, as the built-in data is), ``train/loss``; held-out rows as ``eval/...``.

Run it:  ``alignflow po --config configs/dpo.yaml`` (no paths: SFT of the built-in ``reviews`` model, pairs
sampled from it and labelled by the task's gold reward, then DPO; ``eval/gold_reward`` before and after).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import random
import time
from array import array
from pathlib import Path
from typing import Callable, Optional

import torch

from alignflow.algorithms.preference import (PREFERENCE_LOSSES, REFERENCE_FREE, PrefInputs, cpl_bc_loss,
                                            treg_token_rewards)
from alignflow.config import ConfigError, POConfig, TrainConfig
from alignflow.data.collate import pad_right, token_budget_groups, token_groups
from alignflow.data.formats import DataError
from alignflow.data.pipeline import prepare_data
from alignflow.distributed.groups import dp_equal_groups, dp_sum, dp_sum_dict, dp_world_size
from alignflow.distributed.shard import through_root
from alignflow.models import load_causal_lm, save_model
from alignflow.models.backbone import get_lm_head, hidden_states, unwrap
from alignflow.models.logprobs import _chunk_stats, _plan_chunks  # the one log-softmax + gather (no copy of maths)
from alignflow.models.varlen import flat_hidden_states, supports_varlen
from alignflow.trainers import loop
from alignflow.trainers.po_learner import place_learner, row_batch
from alignflow.trainers.setup import start_run

log = logging.getLogger("alignflow.po")

CACHE_FILE = "ref_logps.safetensors"
# Data formats each loss trains on (pairwise losses need pairs; KTO also turns pairs into unpaired rows).
EXPECT = {"kto": ("unpaired", "preference"), "cpl": ("ranked", "preference"), "pro": ("ranked", "preference")}
# Per-row PrefInputs values a row may carry: floats (B,) and per-response-token lists (B, T).
ROW_SCALARS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "chosen_rewards", "rejected_rewards",
               "prev_chosen_logps", "prev_rejected_logps")
ROW_TOKENS = ("chosen_token_rewards", "rejected_token_rewards")


@dataclasses.dataclass
class POResult:
    model: torch.nn.Module
    tokenizer: object
    losses: list[float] = dataclasses.field(default_factory=list)
    history: list[dict] = dataclasses.field(default_factory=list)
    eval: dict = dataclasses.field(default_factory=dict)
    output_dir: Path = Path(".")
    ref_cache_hit: bool = False
    tokens_per_s: float = 0.0


# ------------------------------------------------------------------------------------------ rows
def row_format(row: dict) -> str:
    """'preference', 'ranked' or 'unpaired', from an encoded row's keys."""
    if "chosen_ids" in row:
        return "preference"
    if "responses_ids" in row:
        return "ranked"
    if "label" in row:
        return "unpaired"
    raise DataError(f"a preference-optimisation row needs chosen/rejected, responses or completion+label; got keys "
                    f"{sorted(row)}")


def row_sequences(row: dict, kl: bool = False) -> list[tuple[list[int], list[int]]]:
    """The (input_ids, loss_mask) sequences a row puts in the forward, in order (``kl``: KTO's mismatched one)."""
    if kl:
        return [(row["kl_ids"], row["kl_mask"])]
    fmt = row_format(row)
    if fmt == "preference":
        return [(row["chosen_ids"], row["chosen_mask"]), (row["rejected_ids"], row["rejected_mask"])]
    if fmt == "ranked":
        return list(zip(row["responses_ids"], row["responses_mask"]))
    return [(row["input_ids"], row["loss_mask"])]


def row_groups(rows: list[dict], budget: int, flat: bool, seqs: Optional[list] = None) -> list[list[int]]:
    """Micro-batches of row indices: a row's sequences (``seqs[i]``, default its :func:`row_sequences`) always share
    a forward. ``flat``: consecutive rows up to ``budget`` real tokens; otherwise length-sorted groups under
    ``budget`` padded tokens."""
    seqs = seqs or [row_sequences(r) for r in rows]
    if flat:
        return token_groups([sum(len(ids) for ids, _ in s) for s in seqs], budget)
    return token_budget_groups([len(s) * max(len(ids) for ids, _ in s) for s in seqs], budget)


# ------------------------------------------------------------------------------------------ forward
def _head_logps(model, hs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for hidden states (M, H) -> (M,) float32; the LM head runs on these M positions only, in
    checkpointed chunks when the fp32 logits would be large (``alignflow.models.logprobs``)."""
    head = get_lm_head(model)
    softcap = getattr(unwrap(model).config, "final_logit_softcapping", None)
    size, use_ckpt = _plan_chunks(hs.shape[0], head.weight.shape[0], None, hs.device)
    size = size or max(hs.shape[0], 1)
    use_ckpt = use_ckpt and torch.is_grad_enabled()
    pieces = []
    for s in range(0, hs.shape[0], size):
        args = (head, hs[None, s:s + size], targets[None, s:s + size], 1.0, softcap, False)
        out = torch.utils.checkpoint.checkpoint(_chunk_stats, *args, use_reentrant=False) if use_ckpt \
            else _chunk_stats(*args)
        pieces.append(out[0, :, 0])  # (c,)
    return torch.cat(pieces) if pieces else hs.new_zeros(0, dtype=torch.float32)


def sequence_logps(model, seqs: list[tuple[list[int], list[int]]], device, flat: bool = True,
                   with_tokens: bool = False) -> dict:
    """Summed response log-probs of n sequences in ONE forward.

    ``seqs``: (input_ids, loss_mask) lists; ``loss_mask`` is 1 on response tokens. ``flat``: the sequences laid end to
    end in one padding-free row when the model supports it, else right-padded rows run without a mask (causal
    attention never lets a real token see the padding after it). Returns ``logps`` (n,) float32 Σ_t lp[t] over each
    response (with grad), ``lengths`` (n,) response token counts and, ``with_tokens``, ``token_logps`` (n, Tr) --
    column j is the j-th response token -- with ``token_mask`` (n, Tr).
    """
    n, lens = len(seqs), [len(ids) for ids, _ in seqs]
    if flat and supports_varlen(model):
        ids = torch.tensor([t for s, _ in seqs for t in s], dtype=torch.long, device=device)[None]  # (1, N)
        mask = torch.tensor([m for _, ms in seqs for m in ms], dtype=torch.bool, device=device)[None]  # (1, N)
        start = torch.zeros_like(mask)
        start[0, torch.tensor([0] + lens[:-1]).cumsum(0).to(device)] = True  # first token of each: predicts nothing
        # built on the host: repeat_interleave with device repeats would wait for the device
        row_of = torch.repeat_interleave(torch.arange(n), torch.tensor(lens)).to(device)[None]
        h = flat_hidden_states(model, ids, lens)  # (1, N, H)
        where = mask[:, 1:] & ~start[:, 1:]  # (1, N-1): position t predicts token t+1
    else:
        ids = pad_right([s for s, _ in seqs], 0).to(device)  # (n, T)
        mask = pad_right([ms for _, ms in seqs], 0).to(device).bool()  # (n, T)
        row_of = torch.arange(n, device=device)[:, None].expand_as(ids)  # (n, T)
        h = hidden_states(model, ids)  # (n, T, H)
        where = mask[:, 1:]  # (n, T-1)
    token_lp = _head_logps(model, h[:, :-1][where], ids[:, 1:][where])  # (M,)
    seq = row_of[:, 1:][where]  # (M,) which sequence each response token belongs to
    logps = torch.zeros(n, device=device, dtype=torch.float32).index_add(0, seq, token_lp)  # (n,)
    lengths = torch.bincount(seq, minlength=n)  # (n,)
    out = {"logps": logps, "lengths": lengths}
    if with_tokens:
        first = torch.cumsum(lengths, 0) - lengths  # (n,) index of each sequence's first response token in M
        col = torch.arange(seq.numel(), device=device) - first[seq]  # (M,)
        width = int(lengths.max()) if n else 0
        out["token_logps"] = torch.zeros(n, width, device=device).index_put((seq, col), token_lp)  # (n, Tr)
        out["token_mask"] = torch.zeros(n, width, device=device, dtype=torch.bool).index_put(
            (seq, col), torch.ones_like(col, dtype=torch.bool))  # (n, Tr)
    return out


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


def row_inputs(model, rows: list[dict], device, flat: bool = True, with_tokens: bool = False,
               n_max: Optional[int] = None) -> dict:
    """PrefInputs fields of ``rows`` (one format): the policy's log-probs from ONE forward, plus the values the rows
    carry (``ROW_SCALARS``, ``ROW_TOKENS``, KTO's ``label``). ``n_max`` pads ranked lists to that many responses."""
    fmt, dev = row_format(rows[0]), device
    fields: dict = {}
    if fmt == "preference":
        p = pair_logps(model, rows, device, flat, with_tokens)
        fields = {"policy_chosen_logps": p["chosen_logps"], "policy_rejected_logps": p["rejected_logps"],
                  "chosen_lengths": p["chosen_lengths"], "rejected_lengths": p["rejected_lengths"]}
        if with_tokens:
            fields |= {"policy_chosen_token_logps": p["chosen_token_logps"], "chosen_mask": p["chosen_mask"],
                       "policy_rejected_token_logps": p["rejected_token_logps"], "rejected_mask": p["rejected_mask"]}
    elif fmt == "unpaired":
        out = sequence_logps(model, [row_sequences(r)[0] for r in rows], device, flat)
        fields = {"policy_logps": out["logps"], "desirable": torch.tensor([bool(r["label"]) for r in rows], device=dev)}
    else:
        counts = [len(r["responses_ids"]) for r in rows]
        n = n_max or max(counts)
        out = sequence_logps(model, [s for r in rows for s in row_sequences(r)], device, flat)
        slot = torch.tensor([i * n + k for i, c in enumerate(counts) for k in range(c)], device=dev)  # (Σc,)
        scatter = lambda v, fill: torch.full((len(rows) * n,), fill, dtype=v.dtype, device=dev).index_put(  # noqa
            (slot,), v).view(len(rows), n)  # (B, n)
        fields = {"ranked_logps": scatter(out["logps"], 0.0), "ranked_lengths": scatter(out["lengths"], 0),
                  "ranked_mask": scatter(torch.ones_like(out["lengths"], dtype=torch.bool), False)}
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
def loss_kwargs(loss_cfg) -> dict:
    """The hyper-parameters set in ``loss_cfg`` (a POLossConfig) as keyword arguments of its loss; ConfigError when
    one is set that the loss does not take (the message lists the ones it does)."""
    fn = PREFERENCE_LOSSES[loss_cfg.name]
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("inputs", "reduction", "weights", "z0")]
    out = {}
    for f in dataclasses.fields(loss_cfg):
        value = getattr(loss_cfg, f.name)
        if f.name in ("name", "bc_steps") or f.name.startswith("treg_") or value is None or value == "":
            continue
        if f.name not in accepted:
            raise ConfigError(f"loss.{f.name}={value!r} is not a hyper-parameter of loss '{loss_cfg.name}' (its "
                              f"hyper-parameters: {', '.join(accepted) or 'none'})")
        out[f.name] = value
    return out


@torch.no_grad()
def kto_z0(model, rows: list[dict], device, flat: bool = True, budget: int = 8192) -> float:
    """KTO's reference point ``z_0 = max(0, mean_i[LP_θ(y'_i|x_i) - LP_ref(y'_i|x_i)])`` over the rows' mismatched
    completions (``kl_ids``/``kl_mask``, reference values ``ref_kl_logps``), without gradient (it is detached)."""
    if "kl_ids" not in rows[0] or "ref_kl_logps" not in rows[0]:
        raise ValueError("kto needs each row's mismatched completion (kl_ids, kl_mask) and its ref_kl_logps; "
                         "see add_kto_mismatched and compute_ref_logps")
    total = 0.0
    for g, real in dp_equal_groups(token_groups([len(rows[i]["kl_ids"]) for i in range(len(rows))], budget)):
        pol = sequence_logps(model, [row_sequences(rows[i], kl=True)[0] for i in g], device, flat)["logps"]
        total += real * float((pol - torch.tensor([rows[i]["ref_kl_logps"] for i in g], device=device)).sum())
    return max(0.0, dp_sum(total) / dp_sum(len(rows)))  # the mean over every data-parallel rank's rows


def _extra_metrics(f: dict) -> dict:
    """pref/chosen_logp, pref/rejected_logp and (with reference values) pref/kl of a step's PrefInputs fields."""
    if "policy_chosen_logps" in f:
        out = {"pref/chosen_logp": f["policy_chosen_logps"].mean(),
               "pref/rejected_logp": f["policy_rejected_logps"].mean()}
        if "ref_chosen_logps" in f:
            out["pref/kl"] = torch.cat([f["ref_chosen_logps"] - f["policy_chosen_logps"],
                                        f["ref_rejected_logps"] - f["policy_rejected_logps"]]).mean()
        return out
    if "policy_logps" in f:
        d, lp = f["desirable"], f["policy_logps"]
        out = {"pref/chosen_logp": lp[d].mean() if d.any() else lp.new_zeros(()),
               "pref/rejected_logp": lp[~d].mean() if (~d).any() else lp.new_zeros(())}
        if "ref_logps" in f:
            out["pref/kl"] = (f["ref_logps"] - lp).mean()
        return out
    return {"pref/chosen_logp": f["ranked_logps"][:, 0].mean(), "pref/rejected_logp": f["ranked_logps"][:, 1].mean()}


def po_step(model, rows: list[dict], loss: str | Callable, loss_kw: dict, train: TrainConfig, device,
            backward: bool = True) -> tuple[dict, int]:
    """Forward (and backward) of one optimiser step's ``rows``; gradients are left in ``.grad``.

    The loss is the mean over the rows: every micro-batch (``train.micro_batch_tokens``) adds its SUMMED row losses
    divided by ``len(rows)``. KTO's z_0 is computed over all the rows first (:func:`kto_z0`). The metrics come from
    the loss applied once more to the whole step's detached inputs, so they do not depend on the split either.
    Returns ``(metrics as floats, real tokens)``; a non-finite loss gives ``{"loss": nan}``.
    """
    fn, device = PREFERENCE_LOSSES[loss] if isinstance(loss, str) else loss, torch.device(device)
    flat = train.packing and supports_varlen(model)
    kw = dict(loss_kw)
    n_rows, scale = dp_sum(len(rows)), dp_world_size()  # the step's rows over every data-parallel rank
    if fn is PREFERENCE_LOSSES["kto"]:
        with loop.autocast(device, train.mixed_precision):
            kw["z0"] = through_root(model, lambda: kto_z0(model, rows, device, flat, train.micro_batch_tokens))
    with_tokens = fn is PREFERENCE_LOSSES["treg"]
    n_max = max((len(r.get("responses_ids", ())) for r in rows), default=0) or None
    parts, tokens = [], 0
    groups = row_groups(rows, train.micro_batch_tokens, flat)
    for g, real in dp_equal_groups(groups):
        chunk = [rows[i] for i in g]
        with loop.autocast(device, train.mixed_precision):
            fields = through_root(model, lambda: row_inputs(model, chunk, device, flat, with_tokens, n_max))
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


# ------------------------------------------------------------------------------------------ reference
def add_kto_mismatched(rows: list[dict], seed: int, max_len: int) -> list[dict]:
    """KTO's mismatched pairs: row i gets ``kl_ids``/``kl_mask`` = its own prompt + the completion of a partner row
    (a seeded derangement, so never itself), cut to ``max_len``. Returns new row dicts."""
    if len(rows) < 2:
        raise DataError("kto needs at least 2 rows to form the mismatched pairs of its reference point z_0")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    out = []
    for i, r in enumerate(rows):
        p = rows[partner[i]]
        prompt = r["input_ids"][:r["loss_mask"].index(1)]
        completion = p["input_ids"][p["loss_mask"].index(1):][:max(1, max_len - len(prompt))]
        out.append(r | {"kl_ids": prompt + completion, "kl_mask": [0] * len(prompt) + [1] * len(completion)})
    return out


def _instructed(ids: list[int], mask: list[int], inst: list[int], bos: Optional[int]) -> tuple[list[int], list[int]]:
    """The sequence with the instruction's tokens inserted at the start of the prompt (after a leading BOS)."""
    at = 1 if bos is not None and ids and ids[0] == bos else 0
    return ids[:at] + inst + ids[at:], mask[:at] + [0] * len(inst) + mask[at:]


@torch.no_grad()
def compute_ref_logps(model, rows: list[dict], device, budget: int = 8192, flat: bool = True,
                      treg: Optional[tuple[list[int], list[int], Optional[int]]] = None) -> dict[str, torch.Tensor]:
    """Reference values of every row, in row order, without gradient: (N,) float32 tensors named like the row fields.

    preference rows -> ``ref_chosen_logps``, ``ref_rejected_logps``; unpaired -> ``ref_logps`` (and ``ref_kl_logps``
    when the rows carry KTO's mismatched completions); ranked -> ``ref_ranked_logps`` (N, n_max). ``treg`` =
    (x+ instruction ids, x- instruction ids, bos id) adds T-REG's token rewards, ragged, as ``chosen_token_rewards``
    / ``rejected_token_rewards`` (flat (Σ|y|,)) with ``*_token_rewards_lengths`` (N,). Pass the reference model (or the
    policy before its first update; under LoRA call it inside ``model.disable_adapter()``)."""
    was, device = model.training, torch.device(device)
    model.eval()
    fmt, n = row_format(rows[0]), len(rows)
    kl = fmt == "unpaired" and "kl_ids" in rows[0]
    per_row = [row_sequences(r) + (row_sequences(r, kl=True) if kl else []) for r in rows]
    width = max(len(s) for s in per_row)
    values = torch.zeros(n, width)
    for g in row_groups(rows, budget, flat, per_row):
        lp = sequence_logps(model, [s for i in g for s in per_row[i]], device, flat)["logps"].float().cpu()
        k = 0
        for i in g:
            values[i, :len(per_row[i])] = lp[k:k + len(per_row[i])]
            k += len(per_row[i])
    if fmt == "preference":
        out = {"ref_chosen_logps": values[:, 0], "ref_rejected_logps": values[:, 1]}
    elif fmt == "unpaired":
        out = {"ref_logps": values[:, 0]} | ({"ref_kl_logps": values[:, 1]} if kl else {})
    else:
        out = {"ref_ranked_logps": values}
    if treg is not None:
        out |= _treg_rewards(model, rows, device, budget, flat, *treg)
    model.train(was)
    return {k: v.contiguous() for k, v in out.items()}


def _treg_rewards(model, rows, device, budget, flat, pos: list[int], neg: list[int], bos) -> dict:
    """T-REG's r̂_t for every response token of preference rows, from the reference under x+ and x-."""
    out = {}
    for side in ("chosen", "rejected"):
        flat_r, lengths = [], []
        seqs = [(r[f"{side}_ids"], r[f"{side}_mask"]) for r in rows]
        for g in token_groups([len(s[0]) for s in seqs], budget // 2):
            got = [sequence_logps(model, [_instructed(*seqs[i], inst, bos) for i in g], device, flat, True)
                   for inst in (pos, neg)]
            r = treg_token_rewards(got[0]["token_logps"], got[1]["token_logps"], got[0]["token_mask"]).cpu()
            for j, length in enumerate(got[0]["lengths"].tolist()):
                flat_r.append(r[j, :length])
                lengths.append(length)
        out[f"{side}_token_rewards"] = torch.cat(flat_r)
        out[f"{side}_token_rewards_lengths"] = torch.tensor(lengths)
    return out


def attach_ref(rows: list[dict], ref: dict[str, torch.Tensor], offset: int = 0) -> list[dict]:
    """Rows with their reference values (rows ``offset..`` of the tensors of :func:`compute_ref_logps`) added."""
    out = [dict(r) for r in rows]
    for key, value in ref.items():
        if key.endswith("_lengths"):
            continue
        if key.endswith("_token_rewards"):
            ends = ref[f"{key}_lengths"].cumsum(0).tolist()
            starts = [e - n for e, n in zip(ends, ref[f"{key}_lengths"].tolist())]
            for i, r in enumerate(out):
                r[key] = value[starts[offset + i]:ends[offset + i]].tolist()
        elif value.dim() == 1:
            for i, r in enumerate(out):
                r[key] = float(value[offset + i])
    return out


def model_fingerprint(name_or_path: str, revision: str = "main") -> str:
    """Identity of a model's weights for the cache key: a local directory's weight/config files (name, size,
    modification time), or ``hub:<id>@<revision>``."""
    path = Path(name_or_path)
    if not path.is_dir():
        return f"hub:{name_or_path}@{revision}"
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".pt"))
    return json.dumps([str(path.resolve())] + [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                               for p in files])


def ref_cache_key(fingerprint: str, rows: list[dict], extra: dict) -> str:
    """sha256 of the reference fingerprint, every sequence's token ids and loss mask, and ``extra`` (lengths,
    dtype, T-REG instructions...)."""
    h = hashlib.sha256(fingerprint.encode())
    h.update(json.dumps(extra, sort_keys=True).encode())
    for r in rows:
        for ids, mask in row_sequences(r) + (row_sequences(r, kl=True) if "kl_ids" in r else []):
            h.update(array("q", ids).tobytes() + array("b", mask).tobytes() + b"|")
    return h.hexdigest()


def cached_ref_logps(path: Path, key: str, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """Reference tensors from ``path`` when its stored key equals ``key``; else ``compute()``, written atomically
    (safetensors, the key in its metadata). Returns ``(tensors, reused)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return {k: f.get_tensor(k) for k in f.keys()}, True
        except Exception as e:  # a damaged cache is recomputed, never trusted
            log.warning("ignoring the unreadable reference cache %s: %s", path, e)
    tensors = compute()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"key": key})
    os.replace(tmp, path)
    return tensors, False


# ------------------------------------------------------------------------------------------ the run
def _loss_rows(rows: list[dict], fmt: str, cfg: POConfig, seed: int, held_out: bool = False) -> list[dict]:
    """Data rows as the loss reads them: KTO turns pairs into unpaired rows and adds its mismatched completions
    (held-out rows are paired among themselves; a single one is not evaluated); PRO and REFUEL read a preference
    row's ``margin`` as the score difference r(y_w) - r(y_l)."""
    name = cfg.loss.name
    if name == "kto":
        if fmt == "preference":
            rows = [{"input_ids": r[f"{s}_ids"], "loss_mask": r[f"{s}_mask"], "label": s == "chosen"}
                    for r in rows for s in ("chosen", "rejected")]
        if held_out and len(rows) < 2:
            return []
        return add_kto_mismatched(rows, seed, cfg.data.max_len)
    if name in ("pro", "refuel") and fmt == "preference" and any(r["margin"] for r in rows):
        return [r | {"chosen_rewards": r["margin"], "rejected_rewards": 0.0} for r in rows]
    return rows  # PRO without margins: temperatures T = 1 (plain ranking)


def _check_rows(name: str, rows: list[dict], source: str) -> None:
    if name == "refuel" and not any(r.get("chosen_rewards") for r in rows):
        raise DataError(f"{source}: refuel regresses the log-ratio gap on eta * (Q(y) - Q(y')); give each row a "
                        "'margin' = Q(chosen) - Q(rejected)")


def _reference(cfg: POConfig, model, rows: list[dict], out: Path, device, tokenizer) -> tuple[list[dict], bool]:
    """Rows with their reference values (computed once, or read from the cache); ``(rows, reused)``."""
    name = cfg.loss.name
    if name in REFERENCE_FREE or not rows:
        return rows, False
    ref_path = cfg.ref_model or cfg.model.name_or_path
    treg = None
    if name == "treg":
        enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        treg = (enc(cfg.loss.treg_pos_instruction), enc(cfg.loss.treg_neg_instruction), tokenizer.bos_token_id)
    extra = {"dtype": cfg.model.dtype, "max_len": cfg.data.max_len, "max_prompt_len": cfg.data.max_prompt_len,
             "treg": treg, "version": 1}
    key = ref_cache_key(model_fingerprint(ref_path, cfg.model.revision), rows, extra)
    flat = cfg.train.packing

    def compute() -> dict:
        log.info("computing reference log-probs of %d rows (%s)", len(rows), ref_path)
        if cfg.ref_model:
            ref_cfg = dataclasses.replace(cfg.model, name_or_path=cfg.ref_model,
                                          lora=dataclasses.replace(cfg.model.lora, enabled=False))
            ref = load_causal_lm(ref_cfg, device)
            with loop.autocast(device, cfg.train.mixed_precision):
                return compute_ref_logps(ref, rows, device, cfg.train.micro_batch_tokens, flat, treg)
        adapters_off = model.disable_adapter() if cfg.model.lora.enabled else contextlib.nullcontext()
        with adapters_off, loop.autocast(device, cfg.train.mixed_precision):
            return compute_ref_logps(model, rows, device, cfg.train.micro_batch_tokens, flat, treg)

    if cfg.ref_cache:
        ref, reused = cached_ref_logps(out / CACHE_FILE, key, compute)
    else:
        ref, reused = compute(), False
    if reused:
        log.info("reference log-probs read from %s", out / CACHE_FILE)
    return attach_ref(rows, ref), reused


def disable_dropout(model):
    """Dropout probabilities to 0 (``nn.Dropout`` modules, incl. LoRA's, and attention dropout), as TRL's
    ``disable_dropout``: the policy's log-probs then equal the cached reference's at step 0."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


def evaluate_rows(model, rows: list[dict], cfg: POConfig, kw: dict, device) -> dict:
    """The loss and preference metrics on held-out rows (no grad), as ``eval/...``."""
    if not rows:
        return {}
    with torch.no_grad():
        metrics, _ = po_step(model, rows, cfg.loss.name, kw, cfg.train, device, backward=False)
    return eval_names(metrics)


def eval_names(metrics: dict) -> dict:
    """Held-out metric names: ``pref/accuracy`` -> ``eval/accuracy``, ``loss`` -> ``eval/loss``."""
    return {f"eval/{k.split('/')[-1] if k.startswith('pref/') else k}": v for k, v in metrics.items()}


def _resume(policy, out: Path, cfg: POConfig) -> int:
    """The step to start from: that of the newest checkpoint under ``train.resume``, else 0."""
    from alignflow.distributed.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out) if cfg.train.resume else None
    if ckpt is None:
        return 0
    start = int(policy.load(ckpt)["step"])
    log.info("resumed from %s at step %d", ckpt, start)
    return start


def _steps(policy, cfg: POConfig, kw: dict, train: list, held: list, sampler, start: int, total: int, out: Path,
           logger, result: POResult) -> None:
    """The optimiser steps of :func:`train_po` (CPL-BC's behaviour-cloning phase first), with logging, held-out
    evaluation and checkpoints."""
    bar = loop.Progress(total, start, cfg.train.progress, loop.bar_label("po", cfg.loss.name))
    for step in range(start, total):
        t0 = time.perf_counter()
        loss, loss_kw = cfg.loss.name, kw
        if step < cfg.loss.bc_steps:  # CPL-BC: behaviour cloning first (bc_steps > 0 only with cpl, checked above)
            loss, loss_kw = cpl_bc_loss, {"bc_data": kw.get("bc_data", "all")}
        metrics = policy.step(row_batch([train[i] for i in sampler.rows(step)]), loss, loss_kw, str(step))
        ntok = int(metrics.pop("tokens"))
        metrics["perf/tokens_per_s"] = ntok / (time.perf_counter() - t0)
        result.losses.append(metrics["loss"])
        result.history.append(metrics)
        result.tokens_per_s = bar.update(ntok, loss=metrics["loss"])
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total:
            logger.log(step + 1, {f"train/{k}" if "/" not in k else k: v for k, v in metrics.items()})
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and held:
            logger.log(step + 1, eval_names(policy.evaluate(row_batch(held), cfg.loss.name, kw)))
        loop.checkpoint_step(step + 1, total, cfg.train, out, lambda path: policy.save(path, {"step": step + 1}))
    bar.close()


def train_po(cfg: POConfig) -> POResult:
    """Run offline preference optimisation as configured; returns the trained policy and its metrics."""
    from alignflow.distributed.placement import check_placement
    from alignflow.trainers.po_data import gold_eval, resolve_po_builtin

    kw = loss_kwargs(cfg.loss)
    if cfg.loss.bc_steps and cfg.loss.name != "cpl":
        raise ConfigError(f"loss.bc_steps={cfg.loss.bc_steps} is CPL-BC's pre-training phase; it needs loss.name=cpl "
                          f"(got {cfg.loss.name!r})")
    check_placement(cfg)  # a Ray cluster too small for resources.actor fails now, not after the built-in SFT
    art = resolve_po_builtin(cfg)
    out, device, tok = start_run(cfg)
    expect = EXPECT.get(cfg.loss.name, ("preference",))
    data = prepare_data(cfg.data, tok, expect=expect, seed=cfg.train.seed)
    train_rows = _loss_rows(data.train, data.format, cfg, cfg.train.seed)
    held_rows = _loss_rows(data.eval, data.format, cfg, cfg.train.seed + 1, held_out=True)
    rows, n_train = train_rows + held_rows, len(train_rows)
    _check_rows(cfg.loss.name, rows, cfg.data.path)
    model = disable_dropout(load_causal_lm(cfg.model, device))
    model.train()  # train mode (gradient checkpointing runs only in it), dropout off (see the module docstring)
    g = cfg.builtin
    gold_init = gold_eval(model, tok, art, g.eval_prompts, g.max_new_tokens, cfg.train.seed) \
        if art is not None and g.eval_prompts else None
    rows, reused = _reference(cfg, model, rows, out, device, tok)
    if cfg.loss.name == "inpo":  # the first INPO round: the previous iterate pi_t is the reference
        rows = [{"prev_chosen_logps": r["ref_chosen_logps"], "prev_rejected_logps": r["ref_rejected_logps"]} | r
                for r in rows]
    train, held = rows[:n_train], rows[n_train:]
    sampler = loop.StepSampler(len(train), cfg.train.batch_size, cfg.train.seed)
    total = sampler.total_steps(cfg.train)
    policy, workers = place_learner(cfg, model, total, device)
    try:
        start = _resume(policy, out, cfg)
        logger = loop.MetricsLogger(out, start=start)
        for r in data.reports:
            logger.log(start, {"data/report": r})
        result = POResult(model, tok, output_dir=out, ref_cache_hit=reused)
        _steps(policy, cfg, kw, train, held, sampler, start, total, out, logger, result)
        if workers is not None:  # the driver's copy gets the trained weights (for the gold eval and the result)
            model.load_state_dict(policy.state_dict())
    finally:
        if workers is not None:
            workers.shutdown()
    result.eval = evaluate_rows(model, held, cfg, kw, device)
    if gold_init is not None:
        gold = gold_eval(model, tok, art, g.eval_prompts, g.max_new_tokens, cfg.train.seed)
        result.eval |= {"eval/gold_reward_init": gold_init, "eval/gold_reward": gold}
    logger.log(total, result.eval)
    logger.close()
    save_model(model, tok, out / "model")
    return result
