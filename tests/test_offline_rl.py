"""SuperHF and A-LoL trainers (``alignflow superhf`` / ``alignflow alol``): the maths of one update against an
independent computation, then learning on the reviews task's hidden gold reward, then the plumbing (LoRA prior,
resume, errors, CLI). One tiny SFT model is built for the module."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from alignflow.algorithms import offline
from alignflow.cli import COMMANDS, main
from alignflow.config import ALOL_VARIANTS, ALoLConfig, ConfigError, ModelConfig, SFTConfig, SuperHFConfig, from_dict
from alignflow.data.formats import DataError
from alignflow.data.pipeline import prepare_data
from alignflow.data.render import encode_pair
from alignflow.models import load_causal_lm, load_tokenizer, token_logprobs
from alignflow.rollout import HFEngine, SamplingParams
from alignflow.trainers import loop
from alignflow.trainers.alol import train_alol
from alignflow.trainers.rl_setup import PromptStream
from alignflow.trainers.sft import train_sft, train_step
from alignflow.trainers.superhf import (
    build_superhf_run,
    sample_and_select,
    superhf_backward,
    superhf_step,
    train_superhf,
)

CPU = torch.device("cpu")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_prompts(path: Path, k: int) -> list[str]:
    return [json.loads(line)["prompt"] for line in open(path)][:k]


@pytest.fixture(scope="module")
def sft_model(reviews_sft):
    """The reviews task's 1-layer, 32-wide model after 60 SFT steps (the shared ``reviews_sft``)."""
    return reviews_sft


def sampled_gold(task, model) -> float:
    """Mean gold reward of 4 seeded samples (24 tokens) for each of 48 held-out prompts."""
    tok = load_tokenizer(str(task.tokenizer_dir))
    prompts = read_prompts(task.eval_prompts_path, 48)
    batch = HFEngine(model, tok).generate(
        [tok(p)["input_ids"] for p in prompts], SamplingParams(n=4, max_new_tokens=24, seed=7)
    )
    texts = tok.batch_decode(
        [r[m.bool()].tolist() for r, m in zip(batch["response_ids"], batch["response_mask"], strict=False)],
        skip_special_tokens=True,
    )
    return sum(task.gold_reward([p for p in prompts for _ in range(4)], texts)) / len(texts)


def superhf_cfg(task, model_dir, out, **sections) -> SuperHFConfig:
    base = {
        "model": {"name_or_path": str(model_dir), "tokenizer": str(task.tokenizer_dir)},
        "data": {"path": str(task.prompts_path)},
        "task": {"name": "reviews"},
        "reward": {"task": {"gold": 1.0}},
        "rollout": {"prompts_per_step": 8, "n": 8, "max_new_tokens": 24, "eval_prompts": 0},
        "optim": {"lr": 1e-3},
        "train": {"output_dir": str(out), "batch_size": 8, "max_steps": 20, "progress": False},
    }
    for k, v in sections.items():
        base[k] = base.get(k, {}) | v
    return from_dict(SuperHFConfig, base)


def alol_cfg(task, model_dir, data, out, **sections) -> ALoLConfig:
    base = {
        "model": {"name_or_path": str(model_dir), "tokenizer": str(task.tokenizer_dir)},
        "data": {"path": str(data), "max_len": 64},
        "task": {"name": "reviews"},
        "reward": {"task": {"gold": 1.0}},
        "rollout": {"n": 4, "max_new_tokens": 24, "eval_prompts": 0},
        "optim": {"lr": 1e-3},
        "train": {"output_dir": str(out), "batch_size": 16, "max_steps": 30, "progress": False},
    }
    for k, v in sections.items():
        base[k] = base.get(k, {}) | v
    return from_dict(ALoLConfig, base)


# ----------------------------------------------------------------------------------------------- SuperHF
def test_superhf_beta_zero_one_sample_is_sft_on_self_samples(reviews_task, sft_model, tmp_path):
    """β = 0 and n = 1: the kept completion is the only sample, and the SuperHF gradient equals the gradient of the
    SFT trainer's step (token-mean NLL of the completion, packed padding-free rows) on the same prompt + sample."""
    cfg = superhf_cfg(reviews_task, sft_model, tmp_path, superhf={"beta": 0.0}, rollout={"prompts_per_step": 4, "n": 1})
    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    run = build_superhf_run(cfg, CPU, tok, 1)
    assert run.prior is None  # β = 0 loads no prior
    prompts = PromptStream(prepare_data(cfg.data, tok, expect=("prompt",)).train, 0).take(4)
    kept, m = sample_and_select(run, prompts)
    assert len(kept) == 4 and m["superhf/reward_best"] == pytest.approx(m["superhf/reward_mean"])
    terms = superhf_backward(run, kept)
    grads = {n: p.grad.clone() for n, p in run.policy.named_parameters()}
    run.policy.zero_grad(set_to_none=True)
    examples = []
    for ids, pm, resp, rm in zip(
        kept["prompt_ids"], kept["prompt_mask"], kept["response_ids"], kept["response_mask"], strict=False
    ):
        p, r = ids[pm.bool()].tolist(), resp[rm.bool()].tolist()  # unpadded prompt and sample
        examples.append({"input_ids": p + r, "loss_mask": [0] * len(p) + [1] * len(r)})
    sft = from_dict(SFTConfig, {"data": {"max_len": 128}, "train": {"packing": True}})
    sft_metrics, _ = train_step(run.policy, examples, sft, tok.pad_token_id, CPU)
    assert float(terms["nll"]) == pytest.approx(sft_metrics["loss"], rel=1e-5)
    assert float(terms["kl"]) == 0.0
    for name, p in run.policy.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_superhf_raises_gold_reward(reviews_task, sft_model, tmp_path):
    """20 SuperHF steps (8 prompts x 8 samples, top-1, β = 0.35, lr 1e-3) raise the mean gold reward of samples on
    held-out prompts (measured: -2.44 -> -1.38, -1.35, -1.44 with seeds 0, 1, 2)."""
    before = sampled_gold(reviews_task, load_causal_lm(superhf_cfg(reviews_task, sft_model, tmp_path).model))
    result = train_superhf(
        superhf_cfg(
            reviews_task,
            sft_model,
            tmp_path / "shf",
            rollout={"eval_prompts": 16},
            data={"eval_path": str(reviews_task.eval_prompts_path)},
        )
    )
    after = sampled_gold(reviews_task, result.model)
    assert after > before + 0.5, (before, after)
    h = result.history
    assert all(x["superhf/reward_best"] >= x["superhf/reward_mean"] for x in h)
    assert h[0]["superhf/kl"] == pytest.approx(0.0, abs=1e-6) and h[-1]["superhf/kl"] > 0  # π_θ leaves π_0
    for key in ("superhf/nll", "superhf/loss", "train/grad_norm", "perf/gen_s"):
        assert math.isfinite(h[-1][key]), key
    assert "eval/gold_reward" in result.eval
    logged = loop.read_metrics(tmp_path / "shf" / "metrics.jsonl")
    assert logged[-1]["eval/gold_reward"] == pytest.approx(result.eval["eval/gold_reward"])
    assert (tmp_path / "shf" / "model" / "model.safetensors").exists()


def test_superhf_lora_prior_is_the_policy_with_adapters_off(reviews_task, sft_model, tmp_path):
    """Under LoRA the prior is the policy itself (no second model) with adapters disabled: KL = 0 before the first
    update (LoRA's B starts at 0), > 0 after it, and the base weights never change."""
    cfg = superhf_cfg(
        reviews_task,
        sft_model,
        tmp_path,
        model={"lora": {"enabled": True, "r": 4}},
        rollout={"prompts_per_step": 2, "n": 4},
        train={"batch_size": 2},
    )
    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    run = build_superhf_run(cfg, CPU, tok, 4)
    assert run.prior is run.policy and run.shared_prior
    base = {n: p.clone() for n, p in run.policy.named_parameters() if "lora_" not in n}
    stream = PromptStream(prepare_data(cfg.data, tok, expect=("prompt",)).train, 0)
    first = superhf_step(run, stream.take(2), 0)
    second = superhf_step(run, stream.take(2), 1)
    assert first["superhf/kl"] == pytest.approx(0.0, abs=1e-6) and second["superhf/kl"] > 1e-6
    for n, p in run.policy.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


# ----------------------------------------------------------------------------------------------- A-LoL
@pytest.mark.parametrize("variant", ["alol", "seq", "kl"])
def test_alol_drops_negative_rows_and_first_loss_is_weighted_nll(reviews_task, sft_model, tmp_path, variant):
    """16 rows with rewards +10 / -10 (far outside the gold rewards V_ref is fit to, about -8..1): the 8 rows at -10
    are dropped (A < 0), the 8 at +10 kept. With one step over exactly the kept rows, the first loss (π_θ = π_ref:
    w = 1, LP_θ − LP_ref = 0) is mean_i A_i·NLL_sum(y_i), NLL computed here on the unpadded prompt + completion."""
    corpus = [json.loads(line) for line in open(reviews_task.sft_path)][:16]
    rows = [
        {"prompt": r["prompt"], "completion": r["completion"], "reward": 10.0 if i % 2 else -10.0}
        for i, r in enumerate(corpus)
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = alol_cfg(
        reviews_task,
        sft_model,
        data,
        tmp_path / "run",
        alol={"variant": variant},
        rollout={"n": 2},
        train={"batch_size": 8, "max_steps": 1},
    )
    result = train_alol(cfg)
    s = result.stats
    assert (s["alol/kept_rows"], s["alol/dropped_rows"], s["alol/kept_fraction"]) == (8.0, 8.0, 0.5)
    keep = result.precomputed["keep"]
    assert keep.tolist() == [bool(i % 2) for i in range(16)]
    values = result.precomputed["values"]
    assert bool((values.abs() < 10).all()) and s["value/samples"] == 2 * len({r["prompt"] for r in rows})
    adv = result.precomputed["advantages"]
    torch.testing.assert_close(adv, result.precomputed["rewards"] - values)
    model = load_causal_lm(cfg.model)
    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    expected = 0.0
    for i in keep.nonzero().flatten().tolist():
        enc = encode_pair(tok, rows[i]["prompt"], rows[i]["completion"], 256, 64)
        with torch.no_grad():
            lp, _ = token_logprobs(model, torch.tensor([enc.input_ids]))  # (1, T)
        expected += float(adv[i]) * -float(lp[0, enc.prompt_len :].sum()) / 8
    first = result.history[0]
    assert first["alol/loss"] == pytest.approx(expected, rel=1e-4)
    assert first["alol/weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert first["alol/advantage_mean"] == pytest.approx(float(adv[keep].mean()), rel=1e-5)
    logged = loop.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert logged[0]["alol/kept_fraction"] == 0.5 and "value/explained_var" in logged[0]


@pytest.fixture(scope="module")
def own_samples(reviews_task, sft_model, tmp_path_factory) -> Path:
    """4 samples (24 tokens) from the SFT model for each of 128 training prompts, with their gold reward."""
    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    prompts = read_prompts(reviews_task.prompts_path, 128)
    model = load_causal_lm(ModelConfig(name_or_path=str(sft_model)))
    batch = HFEngine(model, tok).generate(
        [tok(p)["input_ids"] for p in prompts], SamplingParams(n=4, max_new_tokens=24, seed=3)
    )
    texts = tok.batch_decode(
        [r[m.bool()].tolist() for r, m in zip(batch["response_ids"], batch["response_mask"], strict=False)],
        skip_special_tokens=True,
    )
    ps = [p for p in prompts for _ in range(4)]
    gold = reviews_task.gold_reward(ps, texts)
    rows = [{"prompt": p, "completion": t, "reward": g} for p, t, g in zip(ps, texts, gold, strict=False) if t.strip()]
    return write_jsonl(tmp_path_factory.mktemp("own-samples") / "samples.jsonl", rows)


def test_alol_raises_gold_reward_on_own_samples(reviews_task, sft_model, own_samples, tmp_path):
    """A-LoL on the SFT model's own gold-scored samples (fixed data, rewards in the rows) raises the held-out gold
    reward; SFT on the same rows for as many steps barely moves it, so the gain is the advantage weighting's.
    Measured (30 steps, 16 rows, lr 1e-3): -2.44 -> -1.41, -1.65, -1.51 (seeds 0, 1, 2); SFT: -2.34."""
    before = sampled_gold(reviews_task, load_causal_lm(alol_cfg(reviews_task, sft_model, own_samples, tmp_path).model))
    result = train_alol(alol_cfg(reviews_task, sft_model, own_samples, tmp_path / "alol"))
    after = sampled_gold(reviews_task, result.model)
    sft = train_sft(
        from_dict(
            SFTConfig,
            {
                "model": {"name_or_path": str(sft_model), "tokenizer": str(reviews_task.tokenizer_dir)},
                "data": {"path": str(own_samples), "max_len": 64, "eval_fraction": 0.0},
                "optim": {"lr": 1e-3, "scheduler": "constant"},
                "train": {"output_dir": str(tmp_path / "sft"), "batch_size": 16, "max_steps": 30, "progress": False},
            },
        )
    )
    control = sampled_gold(reviews_task, sft.model)
    assert after > before + 0.5 and after > control + 0.3, (before, after, control)
    s = result.stats
    assert s["data/rows_scored"] == 0 and 0.2 < s["alol/kept_fraction"] < 0.9
    assert all(math.isfinite(s[k]) for k in ("value/mse", "value/explained_var", "value/val_explained_var"))
    assert all(h["alol/advantage_mean"] > 0 for h in result.history)
    assert (tmp_path / "alol" / "model" / "model.safetensors").exists()


def test_alol_resume_matches_the_uninterrupted_run(reviews_task, sft_model, own_samples, tmp_path):
    """Checkpoints every 2 steps; dropping the last one and resuming redoes steps 3-4 with the same losses and the
    same final weights, from the saved π_ref results (no new value fit)."""
    cfg = alol_cfg(
        reviews_task,
        sft_model,
        own_samples,
        tmp_path,
        alol={"sampling": "good_priority"},
        train={"max_steps": 4, "save_every": 2, "batch_size": 8},
    )
    full = train_alol(cfg)
    shutil.rmtree(tmp_path / "checkpoints" / "step-4")
    resumed = train_alol(
        dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, resume=True), rollout=dataclasses.replace(cfg.rollout, n=1)
        )
    )
    assert len(resumed.history) == 2 and resumed.stats == full.stats  # the saved π_ref results (n=1 would differ)
    assert [h["alol/loss"] for h in resumed.history] == pytest.approx(
        [h["alol/loss"] for h in full.history[2:]], rel=1e-6
    )
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=False):
        torch.testing.assert_close(a, b, msg=n)


# ----------------------------------------------------------------------------------------------- errors, CLI, config
def test_bad_reward_value_names_the_row_and_field(reviews_task, sft_model, tmp_path):
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "Review : the film", "completion": "was great .", "reward": 1.0},
            {"prompt": "Review : the plot", "completion": "was dull .", "reward": "high"},
        ],
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*field 'reward'"):
        train_alol(alol_cfg(reviews_task, sft_model, data, tmp_path / "run"))


def test_config_mistakes_fail_with_the_key(reviews_task, sft_model, tmp_path):
    with pytest.raises(ConfigError, match="superhf.keep"):
        train_superhf(superhf_cfg(reviews_task, sft_model, tmp_path, superhf={"keep": 9}))
    with pytest.raises(ConfigError, match="reward.normalize"):
        train_superhf(superhf_cfg(reviews_task, sft_model, tmp_path, reward={"normalize": "running"}))
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Review : the film", "completion": "was great ."}])
    with pytest.raises(ConfigError, match="reward.task"):
        train_alol(alol_cfg(reviews_task, sft_model, data, tmp_path / "run", reward={"task": {}}))
    with pytest.raises(ConfigError, match="alol.variant"):
        from_dict(ALoLConfig, {"alol": {"variant": "ppo"}})


def test_commands_configs_and_docs(capsys):
    assert ALOL_VARIANTS == offline.ALOL_VARIANTS
    for name, cls in (("superhf", SuperHFConfig), ("alol", ALoLConfig)):
        assert COMMANDS[name][0] is cls
        assert main([name, "--help"]) == 0
        assert f"{name}." in capsys.readouterr().out  # superhf.beta, alol.variant, ...

    root = Path(__file__).resolve().parents[1]
    for name in ("superhf", "alol"):
        assert (root / "docs" / f"{name}.md").exists() and (root / "configs" / f"{name}.yaml").exists()
