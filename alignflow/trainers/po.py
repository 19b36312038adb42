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
  :func:`~alignflow.trainers.po_rows.po_step` with ``prev_*_logps`` / its own references in the rows.
* Dropout is off during training (probabilities set to 0, as TRL's ``disable_dropout``; the model stays in train
  mode so that gradient checkpointing works): the policy and the cached reference must agree at step 0 (h = 0, DPO
  loss log 2).

Reusable pieces (batch in, batch out): here :func:`compute_ref_logps`, :func:`attach_ref`,
:func:`cached_ref_logps`; the step and the rows' PrefInputs in :mod:`alignflow.trainers.po_rows` (``po_step``,
``row_inputs``, ``pair_logps``, ``kto_z0``); the one-forward log-probs in :mod:`alignflow.models.sequences`
(``sequence_logps``). The loss's row in :mod:`alignflow.algorithms.preference_table` decides the data format,
the reference and the extra inputs; this trainer never branches on a loss name.

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
import os
import random
import time
from array import array
from collections.abc import Callable
from pathlib import Path

import torch

from alignflow.algorithms.preference import treg_token_rewards
from alignflow.algorithms.preference_table import PREFERENCE_LOSSES, loss_spec
from alignflow.config import ConfigError, POConfig
from alignflow.data.collate import token_groups
from alignflow.data.formats import DataError
from alignflow.data.pipeline import prepare_data
from alignflow.distributed.placement import check_placement
from alignflow.distributed.save import save_model
from alignflow.models import load_causal_lm
from alignflow.models.sequences import disable_dropout, model_fingerprint, sequence_logps
from alignflow.models.user_embeddings import saved_plain
from alignflow.trainers import loop, po_rows
from alignflow.trainers.po_data import gold_eval, resolve_po_builtin
from alignflow.trainers.po_learner import place_learner, row_batch
from alignflow.trainers.po_rows import loss_kwargs, row_format, row_groups, row_sequences
from alignflow.trainers.po_users import user_rows
from alignflow.trainers.setup import start_run

log = logging.getLogger("alignflow.po")

CACHE_FILE = "ref_logps.safetensors"


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
        prompt = r["input_ids"][: r["loss_mask"].index(1)]
        completion = p["input_ids"][p["loss_mask"].index(1) :][: max(1, max_len - len(prompt))]
        out.append(r | {"kl_ids": prompt + completion, "kl_mask": [0] * len(prompt) + [1] * len(completion)})
    return out


def _instructed(ids: list[int], mask: list[int], inst: list[int], bos: int | None) -> tuple[list[int], list[int]]:
    """The sequence with the instruction's tokens inserted at the start of the prompt (after a leading BOS)."""
    at = 1 if bos is not None and ids and ids[0] == bos else 0
    return ids[:at] + inst + ids[at:], mask[:at] + [0] * len(inst) + mask[at:]


@torch.no_grad()
def compute_ref_logps(
    model,
    rows: list[dict],
    device,
    budget: int = 8192,
    flat: bool = True,
    treg: tuple[list[int], list[int], int | None] | None = None,
) -> dict[str, torch.Tensor]:
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
            values[i, : len(per_row[i])] = lp[k : k + len(per_row[i])]
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
            got = [
                sequence_logps(model, [_instructed(*seqs[i], inst, bos) for i in g], device, flat, True)
                for inst in (pos, neg)
            ]
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
            starts = [e - n for e, n in zip(ends, ref[f"{key}_lengths"].tolist(), strict=False)]
            for i, r in enumerate(out):
                r[key] = value[starts[offset + i] : ends[offset + i]].tolist()
        elif value.dim() == 1:
            for i, r in enumerate(out):
                r[key] = float(value[offset + i])
    return out


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
    """Data rows as the loss reads them (its row in the loss table): an unpaired loss turns pairs into unpaired
    rows; ``mismatched`` adds KTO's mismatched completions (held-out rows are paired among themselves; a single one
    is not evaluated); ``scores`` / ``optional_scores`` read a preference row's ``margin`` as the score difference
    r(y_w) - r(y_l)."""
    spec = loss_spec(cfg.loss.name)
    if spec.data == "unpaired" and fmt == "preference":
        rows = [
            {"input_ids": r[f"{s}_ids"], "loss_mask": r[f"{s}_mask"], "label": s == "chosen"}
            for r in rows
            for s in ("chosen", "rejected")
        ]
    if "mismatched" in spec.extra:
        if held_out and len(rows) < 2:
            return []
        return add_kto_mismatched(rows, seed, cfg.data.max_len)
    scores = {"scores", "optional_scores"} & set(spec.extra)
    if scores and fmt == "preference" and any(r["margin"] for r in rows):
        return [r | {"chosen_rewards": r["margin"], "rejected_rewards": 0.0} for r in rows]
    return rows  # optional scores absent (PRO): temperatures T = 1 (plain ranking)


def _check_rows(name: str, rows: list[dict], source: str) -> None:
    if "scores" in loss_spec(name).extra and not any(r.get("chosen_rewards") for r in rows):
        raise DataError(
            f"{source}: loss {name} regresses the log-ratio gap on eta * (Q(y) - Q(y')); give each row "
            "a 'margin' = Q(chosen) - Q(rejected)"
        )


def _reference(cfg: POConfig, model, rows: list[dict], out: Path, device, tokenizer) -> tuple[list[dict], bool]:
    """Rows with their reference values (computed once, or read from the cache); ``(rows, reused)``."""
    spec = loss_spec(cfg.loss.name)
    if not spec.reference or not rows:
        return rows, False
    ref_path = cfg.ref_model or cfg.model.name_or_path
    treg = None
    if "token_rewards" in spec.extra:
        enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        treg = (enc(cfg.loss.treg_pos_instruction), enc(cfg.loss.treg_neg_instruction), tokenizer.bos_token_id)
    extra = {
        "dtype": cfg.model.dtype,
        "max_len": cfg.data.max_len,
        "max_prompt_len": cfg.data.max_prompt_len,
        "treg": treg,
        "version": 1,
    }
    key = ref_cache_key(model_fingerprint(ref_path, cfg.model.revision), rows, extra)
    flat = cfg.train.packing

    def compute() -> dict:
        log.info("computing reference log-probs of %d rows (%s)", len(rows), ref_path)
        if cfg.ref_model:
            ref_cfg = dataclasses.replace(
                cfg.model, name_or_path=cfg.ref_model, lora=dataclasses.replace(cfg.model.lora, enabled=False)
            )
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


def evaluate_rows(model, rows: list[dict], cfg: POConfig, kw: dict, device) -> dict:
    """The loss and preference metrics on held-out rows (no grad), as ``eval/...``."""
    if not rows:
        return {}
    with torch.no_grad():
        metrics, _ = po_rows.po_step(model, rows, cfg.loss.name, kw, cfg.train, device, backward=False)
    return eval_names(metrics)


def eval_names(metrics: dict) -> dict:
    """Held-out metric names: ``pref/accuracy`` -> ``eval/accuracy``, ``loss`` -> ``eval/loss``."""
    return {f"eval/{k.split('/')[-1] if k.startswith('pref/') else k}": v for k, v in metrics.items()}


def _steps(
    policy,
    cfg: POConfig,
    kw: dict,
    train: list,
    held: list,
    sampler,
    start: int,
    total: int,
    out: Path,
    logger,
    result: POResult,
) -> None:
    """The optimiser steps of :func:`train_po` (CPL-BC's behaviour-cloning phase first), with logging, held-out
    evaluation and checkpoints."""
    bar = loop.Progress(total, start, cfg.train.progress, loop.bar_label("po", cfg.loss.name))
    pretrain = loss_spec(cfg.loss.name).pretrain
    for step in range(start, total):
        t0 = time.perf_counter()
        loss, loss_kw = cfg.loss.name, kw
        if step < cfg.loss.bc_steps and pretrain is not None:  # CPL-BC: behaviour cloning first (checked above)
            pre_kw = inspect.signature(pretrain).parameters
            loss, loss_kw = pretrain, {k: v for k, v in kw.items() if k in pre_kw}
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
        loop.checkpoint_step(
            step + 1, total, cfg.train, out, lambda path, done=step + 1: policy.save(path, {"step": done})
        )
    bar.close()


def train_po(cfg: POConfig) -> POResult:
    """Run offline preference optimisation as configured; returns the trained policy and its metrics."""
    kw = loss_kwargs(cfg.loss)
    spec = loss_spec(cfg.loss.name)
    if cfg.loss.bc_steps and spec.pretrain is None:
        with_pretrain = " or ".join(n for n, s in PREFERENCE_LOSSES.items() if s.pretrain is not None)
        raise ConfigError(
            f"loss.bc_steps={cfg.loss.bc_steps} is CPL-BC's pre-training phase; it needs "
            f"loss.name={with_pretrain} (got {cfg.loss.name!r})"
        )
    check_placement(cfg)  # a Ray cluster too small for resources.actor fails now, not after the built-in SFT
    art = resolve_po_builtin(cfg)
    out, device, tok = start_run(cfg)
    data = prepare_data(cfg.data, tok, expect=spec.accepts, seed=cfg.train.seed)
    train_rows = _loss_rows(data.train, data.format, cfg, cfg.train.seed)
    held_rows = _loss_rows(data.eval, data.format, cfg, cfg.train.seed + 1, held_out=True)
    rows, n_train = train_rows + held_rows, len(train_rows)
    _check_rows(cfg.loss.name, rows, cfg.data.path)
    model = disable_dropout(load_causal_lm(cfg.model, device))
    if "users" in spec.extra:  # P-DPO: user embeddings; each pair after its user's and after the generic soft prompt
        train_rows, held_rows = user_rows(cfg, model, tok, train_rows, held_rows)
        rows, n_train = train_rows + held_rows, len(train_rows)
    model.train()  # train mode (gradient checkpointing runs only in it), dropout off (see the module docstring)
    g = cfg.builtin
    gold_init = (
        gold_eval(model, tok, art, g.eval_prompts, g.max_new_tokens, cfg.train.seed)
        if art is not None and g.eval_prompts
        else None
    )
    rows, reused = _reference(cfg, model, rows, out, device, tok)
    if "previous" in spec.extra:  # the first INPO round: the previous iterate pi_t is the reference
        rows = [
            {"prev_chosen_logps": r["ref_chosen_logps"], "prev_rejected_logps": r["ref_rejected_logps"]} | r
            for r in rows
        ]
    train, held = rows[:n_train], rows[n_train:]
    sampler = loop.StepSampler(len(train), cfg.train.batch_size, cfg.train.seed)
    total = sampler.total_steps(cfg.train)
    policy, workers = place_learner(cfg, model, total, device)
    try:
        start = int(loop.resume(out, cfg.train.resume, policy.load).get("step", 0))
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
    with saved_plain(model, out / "model"):  # user embeddings (P-DPO) go next to the model's own weights
        save_model(model, tok, out / "model")
    return result
