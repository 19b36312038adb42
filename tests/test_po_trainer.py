"""Offline preference trainer (``alignflow po``): each loss raises the gold reward of an SFT model on the reviews task
(and flipped labels lower it), then the plumbing -- one forward for chosen and rejected equals the naive per-token
log-probs, gradients do not depend on the micro-batch split or on padding-free vs padded rows, the reference cache is
reused and invalidated, the LoRA reference is the base model, bad rows and bad keys name what is wrong, every preset
trains one step, resume reproduces the uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from alignflow.cli import main
from alignflow.config import ConfigError, LoraConfig, ModelConfig, POConfig, from_dict, load_config
from alignflow.data.formats import DataError
from alignflow.models import load_causal_lm, load_tokenizer, token_logprobs
from alignflow.tasks.common import read_jsonl, write_jsonl
from alignflow.tasks.labels import label_pairs
from alignflow.trainers import po, po_rows
from alignflow.trainers.po_data import rank_samples, sample_texts, to_unpaired

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["dpo", "cdpo", "robust_dpo", "ipo", "hinge", "simpo", "orpo", "kto", "cpl", "pro", "treg"]
FORMAT = {"kto": "unpaired", "cpl": "ranked", "pro": "ranked"}


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def setup(reviews_task, reviews_sft, tmp_path_factory):
    """The reviews task's 1-layer, 32-wide model after 60 SFT steps; 256 training prompts x 4 samples from it,
    labelled by the gold reward (Bradley-Terry noise 0.5) as pairs, unpaired rows, ranked lists, and flipped pairs;
    a held-out gold-reward probe (64 prompts x 4 samples, fixed sampling seed) and its value for the SFT model."""
    root = tmp_path_factory.mktemp("po")
    task = reviews_task
    tok = load_tokenizer(str(task.tokenizer_dir))
    sft = load_causal_lm(ModelConfig(name_or_path=str(reviews_sft)))
    prompts = [r["prompt"] for r in read_jsonl(task.prompts_path)[:256]]
    samples = sample_texts(sft, tok, prompts, 4, 24, 1.0, 0)
    pairs = label_pairs(prompts, samples, task.gold_reward, 0.5, 0)
    paths = {
        "preference": root / "pairs.jsonl",
        "unpaired": root / "unpaired.jsonl",
        "ranked": root / "ranked.jsonl",
        "flipped": root / "flipped.jsonl",
    }
    write_jsonl(paths["preference"], pairs)
    write_jsonl(paths["unpaired"], to_unpaired(pairs))
    write_jsonl(paths["ranked"], rank_samples(prompts, samples, task.gold_reward, 0.5, 0))
    write_jsonl(paths["flipped"], [r | {"chosen": r["rejected"], "rejected": r["chosen"]} for r in pairs])
    held = [r["prompt"] for r in read_jsonl(task.eval_prompts_path)[:64]]

    def gold(model) -> float:
        s = sample_texts(model, tok, held, 4, 24, 1.0, 7)
        g = task.gold_reward([p for p in held for _ in range(4)], [x for ss in s for x in ss])
        return sum(g) / len(g)

    return {
        "task": task,
        "tok": tok,
        "sft": reviews_sft,
        "paths": paths,
        "gold": gold,
        "gold_sft": gold(sft),
        "root": root,
    }


def _cfg(s, out, name="dpo", data=None, **sections) -> POConfig:
    base = {
        "model": {"name_or_path": str(s["sft"]), "tokenizer": str(s["task"].tokenizer_dir)},
        "data": {"path": str(data or s["paths"][FORMAT.get(name, "preference")]), "max_len": 64, "eval_fraction": 0.0},
        "loss": {"name": name},
        "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0},
        "train": {"output_dir": str(out), "batch_size": 32, "max_steps": 30, "progress": False, "seed": 0},
    }
    for key, value in sections.items():
        base[key] = base.get(key, {}) | value
    return from_dict(POConfig, base)


# ----------------------------------------------------------------------------------------------- it learns
# Measured gains of the held-out gold reward over the SFT model (-2.59) with 30 steps of 32 rows at lr 1e-3, over
# training seeds 0, 1, 2: dpo +0.83..+1.10, ipo +1.07..+1.18, kto +0.87..+1.14, cpl +0.67..+0.81, pro +0.80..+0.92,
# simpo +0.79..+0.94; the bar (+0.4) leaves room for noise. KTO runs at beta 0.5 (paper: 0.1, which moves this tiny
# model too slowly for 30 steps: +0.31).
@pytest.mark.parametrize(
    "loss,params", [("dpo", {}), ("ipo", {}), ("kto", {"beta": 0.5}), ("cpl", {}), ("pro", {}), ("simpo", {})]
)
def test_each_loss_raises_the_gold_reward(setup, tmp_path, loss, params):
    result = po.train_po(_cfg(setup, tmp_path, loss, loss=params))
    after = setup["gold"](result.model)
    assert after > setup["gold_sft"] + 0.4, (loss, setup["gold_sft"], after)
    last = result.history[-1]
    for key in ("loss", "pref/chosen_logp", "pref/rejected_logp") + (
        ("pref/accuracy", "pref/margin") if loss != "kto" else ()
    ):
        assert math.isfinite(last[key]), key
    if loss in ("dpo", "ipo", "kto"):
        assert last["pref/kl"] > 0  # the policy moved away from the reference on the data's responses


def test_dpo_on_flipped_labels_lowers_the_gold_reward(setup, tmp_path):
    """The same run with chosen and rejected swapped lowers the gold reward (measured -1.27..-1.39 over seeds 0-2):
    the gains above come from the preference direction, not from training on the SFT model's own samples."""
    result = po.train_po(_cfg(setup, tmp_path, "dpo", data=setup["paths"]["flipped"]))
    assert setup["gold"](result.model) < setup["gold_sft"] - 0.4


# ----------------------------------------------------------------------------------------------- plumbing
def _rows(s, fmt, n=12, loss="dpo"):
    """n encoded rows of the fixture's data in the format ``fmt``, with loss-specific fields (KTO partners)."""
    from alignflow.data.pipeline import prepare_data

    cfg = _cfg(s, s["root"] / "unused", loss)
    data = prepare_data(cfg.data, s["tok"], seed=0)
    return po._loss_rows(data.train[:n], data.format, cfg, 0)


@pytest.mark.parametrize("flat", [True, False])
def test_sequence_logps_equal_masked_token_logprobs(setup, flat):
    """The one forward over chosen and rejected gives, per sequence, the sum of token_logprobs over its response
    tokens (and the per-token values with_tokens), padding-free or padded."""
    model = load_causal_lm(ModelConfig(name_or_path=str(setup["sft"])))
    rows = _rows(setup, "preference", 5)
    got = po_rows.pair_logps(model, rows, "cpu", flat=flat, with_tokens=True)
    for side in ("chosen", "rejected"):
        for i, r in enumerate(rows):
            ids, mask = torch.tensor([r[f"{side}_ids"]]), torch.tensor([r[f"{side}_mask"]])
            lp, _ = token_logprobs(model, ids)  # (1, T)
            assert got[f"{side}_logps"][i].item() == pytest.approx((lp * mask).sum().item(), abs=1e-4)
            assert got[f"{side}_lengths"][i].item() == mask.sum().item()
            n = int(mask.sum())
            assert torch.allclose(got[f"{side}_token_logps"][i, :n], lp[mask.bool()], atol=1e-5)
            assert not got[f"{side}_mask"][i, n:].any()


def _grads(model):
    return torch.cat([p.grad.flatten().clone() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("loss", ["dpo", "kto", "pro", "treg", "simpo"])
def test_gradients_do_not_depend_on_micro_batches_or_padding(setup, loss):
    """One step of 12 rows as one micro-batch, as many small ones (budget 16 tokens: one row each), padding-free and
    padded: the same loss, metrics and gradients, because each micro-batch divides its summed row losses by the
    step's 12 rows (and KTO's z_0 is taken over the whole step)."""
    fmt = FORMAT.get(loss, "preference")
    model = load_causal_lm(ModelConfig(name_or_path=str(setup["sft"])))
    rows = _rows(setup, fmt, 12, loss)
    treg = (
        (
            setup["tok"]("i loved this film !", add_special_tokens=False)["input_ids"],
            setup["tok"]("i hated this film !", add_special_tokens=False)["input_ids"],
            setup["tok"].bos_token_id,
        )
        if loss == "treg"
        else None
    )
    if loss not in ("pro", "simpo"):
        rows = po.attach_ref(rows, po.compute_ref_logps(model, rows, "cpu", treg=treg))
    if loss == "kto":  # reference values below the policy's on the mismatched pairs: z_0 > 0, off its floor
        rows = [r | {"ref_kl_logps": r["ref_kl_logps"] - 20.0} for r in rows]
    with torch.no_grad():  # a policy that differs from the reference, so that every term is active
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    results = []
    for budget, packing in ((10**6, True), (16, True), (10**6, False), (16, False)):
        train = dataclasses.replace(POConfig().train, micro_batch_tokens=budget, packing=packing)
        assert len(po.row_groups(rows, budget, packing)) == (1 if budget > 1000 else 12)
        model.zero_grad()
        metrics, _ = po_rows.po_step(model, rows, loss, {"beta": 0.5} if loss == "kto" else {}, train, "cpu")
        results.append((metrics, _grads(model)))
    for metrics, grads in results[1:]:
        assert torch.allclose(grads, results[0][1], atol=1e-6, rtol=1e-4)
        for key, value in results[0][0].items():
            assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert results[0][1].abs().sum() > 0
    if loss == "kto":
        assert results[0][0]["kto/z0"] > 0


def test_ref_cache_is_reused_then_invalidated_when_the_data_change(setup, tmp_path, monkeypatch):
    """First run: the reference log-probs are computed and written; second run with the same reference, rows and
    lengths: read back (no computation, file untouched); a changed data file: computed again."""
    calls = []
    real = po.compute_ref_logps
    monkeypatch.setattr(po, "compute_ref_logps", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    # the same run directory each time (it holds the cache): each run replaces the previous one
    cfg = lambda data: _cfg(setup, tmp_path, data=data, train={"max_steps": 1, "overwrite": True})  # noqa: E731
    first = po.train_po(cfg(setup["paths"]["preference"]))
    cache = tmp_path / po.CACHE_FILE
    stamp = cache.stat().st_mtime_ns
    second = po.train_po(cfg(setup["paths"]["preference"]))
    assert (first.ref_cache_hit, second.ref_cache_hit) == (False, True) and len(calls) == 1
    assert cache.stat().st_mtime_ns == stamp
    assert second.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == cached reference at step 0
    changed = tmp_path / "changed.jsonl"
    write_jsonl(changed, read_jsonl(setup["paths"]["preference"])[1:])
    third = po.train_po(cfg(changed))
    assert not third.ref_cache_hit and len(calls) == 2 and cache.stat().st_mtime_ns != stamp


def test_lora_reference_is_the_base_model_without_a_second_copy(setup, tmp_path, monkeypatch):
    """Under LoRA with no ref_model the reference log-probs are the policy's with its adapters disabled: equal to
    the base model's, different from the adapted policy's; train_po loads one model only."""
    lora = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}
    model = load_causal_lm(ModelConfig(name_or_path=str(setup["sft"]), lora=LoraConfig(**lora)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rows = _rows(setup, "preference", 6)
    with model.disable_adapter():
        ref = po.compute_ref_logps(model, rows, "cpu")
    base = po.compute_ref_logps(load_causal_lm(ModelConfig(name_or_path=str(setup["sft"]))), rows, "cpu")
    adapted = po.compute_ref_logps(model, rows, "cpu")
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.allclose(ref[key], base[key], atol=1e-4)
        assert not torch.allclose(adapted[key], base[key], atol=1e-2)
    loads = []
    real = po.load_causal_lm
    monkeypatch.setattr(po, "load_causal_lm", lambda *a, **k: loads.append(a[0].name_or_path) or real(*a, **k))
    result = po.train_po(_cfg(setup, tmp_path, model={"lora": lora}, train={"max_steps": 2}))
    assert len(loads) == 1 and result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert any("lora" in n for n, _ in result.model.named_parameters())


def test_resume_reproduces_the_uninterrupted_run(setup, tmp_path):
    """Two steps straight, and one step + resume + one step, give the same losses and weights."""
    straight = po.train_po(_cfg(setup, tmp_path / "a", train={"max_steps": 2, "batch_size": 8}))
    po.train_po(_cfg(setup, tmp_path / "b", train={"max_steps": 1, "batch_size": 8, "save_every": 1}))
    resumed = po.train_po(_cfg(setup, tmp_path / "b", train={"max_steps": 2, "batch_size": 8, "resume": True}))
    assert resumed.losses == pytest.approx(straight.losses[1:], rel=1e-5) and resumed.ref_cache_hit
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=False):
        assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------------------------- user errors
def test_bad_preference_rows_name_file_line_and_field(setup, tmp_path):
    """chosen == rejected, an empty response and a missing field are reported with file:line: field, together."""
    good = {"prompt": "Review : the film", "chosen": " was great .", "rejected": " was bad ."}
    rows = [
        good,
        good | {"rejected": good["chosen"]},
        good | {"chosen": ""},
        {"prompt": "Review : it", "chosen": " ok ."},
    ]
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, rows)
    with pytest.raises(DataError) as err:
        po.train_po(_cfg(setup, tmp_path / "out", data=path))
    text = str(err.value)
    for line in (
        f"{path}:2: field 'rejected': identical to 'chosen'",
        f"{path}:3: field 'chosen': empty string",
        f"{path}:4: field 'rejected': missing",
    ):
        assert line in text
    ranked = tmp_path / "ranked.jsonl"
    write_jsonl(ranked, [{"prompt": "Review : the film", "responses": [" was great .", " was bad .", " was great ."]}])
    with pytest.raises(DataError, match=f"{ranked}:1: field 'responses': response 3 is identical to response 1"):
        po.train_po(_cfg(setup, tmp_path / "out2", "pro", data=ranked))


def test_bad_keys_and_mismatched_data_are_clear_errors(setup, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"loss.gamma=1.0 is not a hyper-parameter of loss 'dpo' \(its "
        r"hyper-parameters: beta, label_smoothing\)",
    ):
        po.train_po(_cfg(setup, tmp_path, loss={"gamma": 1.0}))
    with pytest.raises(ConfigError, match="loss.name: 'dp' is not one of dpo, cdpo"):
        po.train_po(_cfg(setup, tmp_path, loss={"name": "dp"}))
    with pytest.raises(DataError, match="rows are in 'unpaired' format, this command needs one of preference"):
        po.train_po(_cfg(setup, tmp_path, "dpo", data=setup["paths"]["unpaired"]))
    with pytest.raises(DataError, match="refuel .* give each row a 'margin'"):
        po.train_po(_cfg(setup, tmp_path, "refuel"))


def test_pairs_feed_pro_scores_only_when_they_carry_margins(setup):
    """PRO on preference rows: a 'margin' becomes the score difference r(y_w) - r(y_l) (its temperature); without
    margins the rows carry no scores, so T = 1 -- not T = 0, which would make the ranking loss constant."""
    rows = [
        {
            "chosen_ids": [1, 5, 6],
            "chosen_mask": [0, 1, 1],
            "rejected_ids": [1, 7],
            "rejected_mask": [0, 1],
            "margin": 0.0,
        }
    ] * 2
    cfg = _cfg(setup, setup["root"] / "unused", "pro")
    assert "chosen_rewards" not in po._loss_rows(rows, "preference", cfg, 0)[0]
    scored = po._loss_rows([rows[0], rows[1] | {"margin": 2.5}], "preference", cfg, 0)
    assert [(r["chosen_rewards"], r["rejected_rewards"]) for r in scored] == [(0.0, 0.0), (2.5, 0.0)]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_and_trains_one_step(preset, setup, tmp_path):
    """configs/<loss>.yaml loads, names its loss, sets only that loss's hyper-parameters, and trains one step on the
    fixture's data (run through the command line for dpo)."""
    path = ROOT / "configs" / f"{preset}.yaml"
    cfg = load_config(POConfig, path)
    assert cfg.loss.name == preset and po_rows.loss_kwargs(cfg.loss)
    overrides = [
        f"model.name_or_path={setup['sft']}",
        f"model.tokenizer={setup['task'].tokenizer_dir}",
        f"data.path={setup['paths'][FORMAT.get(preset, 'preference')]}",
        "data.max_len=64",
        f"train.output_dir={tmp_path}",
        "train.max_steps=1",
        "train.batch_size=4",
        "train.progress=false",
    ]
    if preset == "dpo":
        assert main(["po", "--config", str(path)] + overrides) == 0
        last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert math.isfinite(last[-1]["eval/accuracy"]) and (tmp_path / "model" / "model.safetensors").exists()
        return
    result = po.train_po(load_config(POConfig, path, overrides))
    assert math.isfinite(result.history[0]["loss"]) and math.isfinite(result.history[0]["pref/chosen_logp"])
    if preset == "treg":
        assert math.isfinite(result.history[0]["treg/reg"])


def test_cpl_bc_pretraining_then_cpl(setup, tmp_path, monkeypatch):
    """loss.bc_steps (CPL-BC): the first bc_steps optimiser steps minimise the BC term alone (cpl_bc_loss, its value
    hand-checked in test_preference_losses), the rest the CPL loss; bc_steps with another loss is a config error."""
    from alignflow.algorithms.preference import cpl_bc_loss

    used, original = [], po_rows.po_step

    def recording(model, rows, loss, loss_kw, train, device, backward=True):
        if backward:
            used.append(loss)
        return original(model, rows, loss, loss_kw, train, device, backward)

    monkeypatch.setattr(po_rows, "po_step", recording)
    result = po.train_po(_cfg(setup, tmp_path / "cpl", "cpl", loss={"bc_steps": 4}, train={"max_steps": 6}))
    assert used == [cpl_bc_loss] * 4 + ["cpl"] * 2
    bc, cpl = result.history[:4], result.history[4:]
    assert all(h["loss"] == pytest.approx(h["cpl/bc_nll"]) and "pref/margin" not in h for h in bc)
    assert all("cpl/bc_nll" not in h and "pref/margin" in h for h in cpl)
    with pytest.raises(ConfigError, match="loss.bc_steps=2 is CPL-BC's pre-training phase; it needs loss.name=cpl"):
        po.train_po(_cfg(setup, tmp_path / "dpo", "dpo", loss={"bc_steps": 2}))
