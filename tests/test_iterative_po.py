"""Online / iterative preference optimisation (``alignflow online_po``) and MPO (``alignflow mpo``).

The maths first (pair construction, the Nash-MD-PG loss against hand-derived values, the geometric-mixture sampler's
log-probs against teacher-forced ones), then the references each method trains against, then learning and
equivalences on the reviews task with a tiny SFT model (online iterative DPO raises the gold reward; APO with
alpha = 0 is iterative DPO; resume reproduces the uninterrupted run), MPO's two stages, and the plumbing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignflow.algorithms.nash import bt_win_probability, mixture_logits, nash_md_pg_loss
from alignflow.batch import Batch
from alignflow.cli import COMMANDS, main
from alignflow.config import (
    ONLINE_PO_METHODS,
    ConfigError,
    ModelConfig,
    MPOConfig,
    OnlinePOConfig,
    from_dict,
    load_config,
)
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.recipes import mpo
from alignflow.rollout.mixture import generate_mixture
from alignflow.rollout.sampling import SamplingParams
from alignflow.tasks.common import read_jsonl, write_jsonl
from alignflow.tasks.labels import label_pairs
from alignflow.trainers import online_po as it
from alignflow.trainers.po import compute_ref_logps
from alignflow.trainers.po_data import sample_texts

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"online_dpo": "iterative_dpo", "inpo": "inpo", "apo": "apo", "nash_md": "nash_md"}


@pytest.fixture(scope="module")
def setup(reviews_task, reviews_sft, tmp_path_factory):
    """The reviews task's 1-layer, 32-wide model after 60 SFT steps, and 64 prompts x 4 of its samples as gold-
    labelled pairs (Bradley-Terry noise 0.5) for MPO."""
    root = tmp_path_factory.mktemp("online")
    task = reviews_task
    tok = load_tokenizer(str(task.tokenizer_dir))
    prompts = [r["prompt"] for r in read_jsonl(task.prompts_path)[:64]]
    sft = load_causal_lm(ModelConfig(name_or_path=str(reviews_sft)))
    write_jsonl(
        root / "pairs.jsonl",
        label_pairs(prompts, sample_texts(sft, tok, prompts, 4, 24, 1.0, 0), task.gold_reward, 0.5, 0),
    )
    return {"task": task, "tok": tok, "sft": reviews_sft, "pairs": root / "pairs.jsonl", "root": root}


def online_cfg(s, out, method="iterative_dpo", **sections) -> OnlinePOConfig:
    base = {
        "model": {"name_or_path": str(s["sft"]), "tokenizer": str(s["task"].tokenizer_dir)},
        "data": {"path": str(s["task"].prompts_path), "eval_path": str(s["task"].eval_prompts_path)},
        "task": {"name": "reviews"},
        "reward": {"task": {"gold": 1.0}},
        "loss": {"name": "inpo"} if method == "inpo" else {},
        "online": {"method": method, "rounds": 2, "prompts_per_round": 32, "steps_per_round": 3},
        "rollout": {"n": 4, "max_new_tokens": 16, "eval_prompts": 0},
        "optim": {"lr": 1e-3},
        "train": {"output_dir": str(out), "batch_size": 16, "progress": False},
    }
    for key, value in sections.items():
        base[key] = base.get(key, {}) | value
    return from_dict(OnlinePOConfig, base)


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ----------------------------------------------------------------------------------------------- maths
def test_best_worst_pairs_pick_the_extremes_and_skip_ties():
    """Prompt 0: best 1 (3.0) vs worst 0 (1.0); prompt 1 ties everywhere and is skipped; prompt 2 ties at the top
    and the bottom: the first argmax (0) vs the first argmin (1)."""
    rewards = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.5, 0.5], [2.0, -1.0, 2.0]])
    assert it.best_worst(rewards) == [(0, 1, 0), (2, 0, 1)]
    prompt = torch.tensor([[0, 7], [5, 6], [0, 9]]).repeat_interleave(3, 0)  # (9, 2), left-padded with 0
    pmask = (prompt != 0).long()
    resp = torch.arange(9 * 3).view(9, 3) + 10  # (9, 3)
    rmask = torch.ones(9, 3, dtype=torch.long)
    rmask[1, 2] = 0  # prompt 0's best sample has two tokens
    batch = Batch({"prompt_ids": prompt, "prompt_mask": pmask, "response_ids": resp, "response_mask": rmask})
    rows, m = it.pair_rows(batch, rewards.flatten(), 3)
    assert len(rows) == 2 and m["online/pairs"] == 2 and m["online/tied_prompts"] == 1
    assert rows[0]["chosen_ids"] == [7, 13, 14] and rows[0]["chosen_mask"] == [0, 1, 1]
    assert rows[0]["rejected_ids"] == [7, 10, 11, 12] and rows[0]["rejected_mask"] == [0, 1, 1, 1]
    assert rows[1]["chosen_ids"] == [9, 28, 29, 30] and rows[1]["rejected_ids"] == [9, 31, 32, 33]
    assert (rows[0]["chosen_rewards"], rows[0]["rejected_rewards"]) == (3.0, 1.0)
    assert m["online/reward_chosen"] == pytest.approx(2.5) and m["online/reward_rejected"] == pytest.approx(0.0)
    assert m["online/reward_mean"] == pytest.approx(float(rewards.mean()))


def test_nash_md_pg_loss_matches_the_hand_derivation():
    """One row, lp = (-1, -2) (+ a masked token), lp_ref = (-1.5, -1), p = 0.8, beta = 0.1:
    l = 0.1 * (0.5 * -1 + -1 * -2) - (0.8 - 0.5) * (-3) = 0.15 + 0.9 = 1.05 and
    dl/dlp = (0.1 * 0.5 - 0.3, 0.1 * -1 - 0.3) = (-0.25, -0.4); the masked token gets no gradient."""
    lp = torch.tensor([[-1.0, -2.0, -5.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.1]])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = nash_md_pg_loss(lp, ref, mask, torch.tensor([0.8]), beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(1.05)
    assert torch.allclose(lp.grad, torch.tensor([[-0.25, -0.4, 0.0]]))
    assert m["nash/kl"].item() == pytest.approx(-0.5) and m["nash/win_prob"].item() == pytest.approx(0.8)
    assert m["nash/score"].item() == pytest.approx(-0.9)
    assert bt_win_probability(torch.tensor([1.0]), torch.tensor([1.0])).item() == 0.5
    with pytest.raises(ValueError, match="win_prob"):
        nash_md_pg_loss(lp, ref, mask, torch.tensor([1.5]))


def test_mixture_logits_are_the_normalised_geometric_mixture():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g)
    assert torch.allclose(mixture_logits(a, b, 0.0), a.log_softmax(-1))
    assert torch.allclose(mixture_logits(a, b, 1.0), b.log_softmax(-1))
    p, q = a.softmax(-1), b.softmax(-1)
    geo = p**0.7 * q**0.3
    assert torch.allclose(mixture_logits(a, b, 0.3).softmax(-1), geo / geo.sum(-1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("coef", [0.0, 0.5, 1.0])
def test_mixture_sampler_draws_from_the_token_level_mixture(setup, coef):
    """The sampler's log-prob of every sampled token equals log_softmax((1-b) log pi + b log pi_ref) at that token,
    with both models teacher-forced on the sampled sequences: beta = 0 is the policy's distribution, beta = 1 the
    reference's (the untrained task model, a different one)."""
    tok = setup["tok"]
    policy = load_causal_lm(ModelConfig(name_or_path=str(setup["sft"])))
    ref = load_causal_lm(ModelConfig(name_or_path=str(setup["task"].model_dir)))
    prompts = [tok(r["prompt"])["input_ids"] for r in read_jsonl(setup["task"].eval_prompts_path)[:4]]
    out = generate_mixture(
        policy,
        ref,
        prompts,
        SamplingParams(n=2, max_new_tokens=10, seed=3),
        coef,
        eos_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
    )
    ids, am, pos = out["input_ids"], out["attention_mask"], out["position_ids"]  # (8, Tp + Tr)
    Tp, mask = out["prompt_ids"].shape[1], out["response_mask"].bool()
    with torch.no_grad():
        lp = policy(input_ids=ids, attention_mask=am, position_ids=pos).logits[:, Tp - 1 : -1].float()  # (8, Tr, V)
        lr = ref(input_ids=ids, attention_mask=am, position_ids=pos).logits[:, Tp - 1 : -1].float()
    mix = mixture_logits(lp.flatten(0, 1), lr.flatten(0, 1), coef).view_as(lp).log_softmax(-1)
    want = mix.gather(-1, out["response_ids"][..., None]).squeeze(-1)  # (8, Tr)
    assert mask.sum() > 8 and torch.allclose(out["sampling_logprobs"][mask], want[mask], atol=1e-4)
    single = (lp if coef == 0 else lr).log_softmax(-1).gather(-1, out["response_ids"][..., None]).squeeze(-1)
    if coef in (0.0, 1.0):
        assert torch.allclose(out["sampling_logprobs"][mask], single[mask], atol=1e-4)
    else:
        assert not torch.allclose(out["sampling_logprobs"][mask], single[mask], atol=1e-2)
    ends = out["response_ids"][torch.arange(8), mask.sum(-1) - 1]
    assert all(e == tok.eos_token_id for e, f in zip(ends.tolist(), out["finish_reason"], strict=False) if f == "eos")


# ----------------------------------------------------------------------------------------------- references
def test_each_method_trains_against_its_reference(setup, tmp_path):
    """After the policy moved (round 1 onward): iterative DPO (initial) uses the SFT model; previous uses the
    round-start policy; APO uses (1 + a) LP_now - a LP_snapshot; INPO uses the SFT model as ref and the round-start
    policy as prev."""
    cfg = online_cfg(setup, tmp_path)
    run = it.build_run(cfg, torch.device("cpu"), setup["tok"])
    sft = load_causal_lm(ModelConfig(name_or_path=str(setup["sft"])))
    prompts = it.prompt_batch(
        [
            {"prompt": p, "prompt_ids": setup["tok"](p)["input_ids"]}
            for p in ["Review : the film", "Review : this movie was"]
        ],
        [0, 1],
        ["prompt"],
    )
    batch = it.generate(run, prompts)
    rows, _ = it.pair_rows(batch, torch.arange(len(batch), dtype=torch.float), cfg.rollout.n)
    run.prev = it.snapshot(run.policy)  # the SFT weights
    with torch.no_grad():
        for p in run.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lp = lambda m: compute_ref_logps(m, rows, "cpu")["ref_chosen_logps"]  # noqa: E731
    now, init = lp(run.policy), lp(sft)
    assert (now - init).abs().max() > 1e-2

    def ref_of(method, **online):
        run.cfg = online_cfg(setup, tmp_path, method, online=online)
        out = it.reference_rows(run, rows, r=1)
        return torch.tensor([r["ref_chosen_logps"] for r in out]), out

    assert torch.allclose(ref_of("iterative_dpo")[0], init, atol=1e-5)
    assert torch.allclose(ref_of("iterative_dpo", ref_update="previous")[0], now, atol=1e-5)
    assert torch.allclose(ref_of("apo", apo_alpha=0.5)[0], 1.5 * now - 0.5 * init, atol=1e-4)
    assert torch.allclose(ref_of("apo", apo_alpha=0.0)[0], now, atol=1e-5)
    ref, out = ref_of("inpo")
    assert torch.allclose(ref, init, atol=1e-5)
    assert torch.allclose(torch.tensor([r["prev_chosen_logps"] for r in out]), now, atol=1e-5)
    assert torch.allclose(lp(run.policy), now)  # the snapshot swap restored the current weights


# ----------------------------------------------------------------------------------------------- learning
def test_online_iterative_dpo_raises_the_gold_reward(setup, tmp_path):
    """2 rounds x 64 prompts x 4 samples, 8 DPO steps of 32 pairs each at lr 1e-3: the sampled held-out gold reward
    (64 prompts x 2 samples, the same seed before and after) rises; measured +0.69, +0.53, +0.87 over training seeds
    0, 1, 2 from -2.5."""
    cfg = online_cfg(
        setup,
        tmp_path,
        online={"prompts_per_round": 64, "steps_per_round": 8},
        rollout={"max_new_tokens": 24, "eval_prompts": 64},
        train={"batch_size": 32},
    )
    result = it.train_online_po(cfg)
    before, after = result.evals[0][1]["eval/gold_reward"], result.evals[-1][1]["eval/gold_reward"]
    assert after > before + 0.3, (before, after)
    assert len(result.history) == 16 and len(result.rounds) == 2
    last = result.rounds[-1]
    assert last["online/pairs"] > 32 and last["online/reward_chosen"] > last["online/reward_rejected"]
    for key in ("pref/accuracy", "pref/margin", "pref/kl", "online/reward_mean", "eval/reward_mean"):
        assert math.isfinite(last[key]), key
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any("online/reward_chosen" in row and "eval/gold_reward" in row for row in logged)
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_apo_with_alpha_zero_is_iterative_dpo(setup, tmp_path):
    """Same seed: APO (alpha 0) and iterative DPO against the previous round's policy end with identical weights; APO
    with alpha 0.5 matches them in round 1 (reference = SFT for both) and departs in round 2."""
    dpo = it.train_online_po(online_cfg(setup, tmp_path / "dpo", online={"ref_update": "previous"}))
    apo0 = it.train_online_po(online_cfg(setup, tmp_path / "apo0", "apo", online={"apo_alpha": 0.0}))
    apo5 = it.train_online_po(online_cfg(setup, tmp_path / "apo5", "apo", online={"apo_alpha": 0.5}))
    assert torch.equal(weights(dpo.model), weights(apo0.model))
    assert [h["train/loss"] for h in dpo.history] == [h["train/loss"] for h in apo0.history]
    assert [h["train/loss"] for h in apo5.history[:3]] == [h["train/loss"] for h in dpo.history[:3]]
    assert apo5.history[3]["train/loss"] != dpo.history[3]["train/loss"]
    assert not torch.equal(weights(dpo.model), weights(apo5.model))


def test_resume_after_a_round_reproduces_the_uninterrupted_run(setup, tmp_path):
    """APO (its snapshot of the previous policy is part of the checkpoint): 1 round saved, then resumed to 2 rounds,
    equals 2 rounds in one go."""
    full = it.train_online_po(online_cfg(setup, tmp_path / "full", "apo"))
    it.train_online_po(online_cfg(setup, tmp_path / "cut", "apo", online={"rounds": 1}, train={"save_every": 1}))
    assert (tmp_path / "cut" / "checkpoints" / "apo_prev-3.safetensors").exists()
    resumed = it.train_online_po(online_cfg(setup, tmp_path / "cut", "apo", train={"resume": True}))
    assert len(resumed.history) == 3 and torch.equal(weights(full.model), weights(resumed.model))


def test_inpo_and_nash_md_rounds(setup, tmp_path):
    """INPO's first step has h = 0 (pi = pi_t = pi_ref), so its loss is (eta/2)^2; Nash-MD's first step plays the
    policy against itself (round 0: pi = pi_ref, so the mixture is the policy): KL 0, win probabilities around 1/2,
    and 2 rounds change the policy."""
    inpo = it.train_online_po(online_cfg(setup, tmp_path / "inpo", "inpo", loss={"eta": 1.0}))
    assert inpo.history[0]["train/loss"] == pytest.approx(0.25, abs=1e-4)
    assert inpo.history[0]["pref/margin"] == pytest.approx(0.0, abs=1e-4)
    nash = it.train_online_po(online_cfg(setup, tmp_path / "nash", "nash_md"))
    first = nash.history[0]
    assert abs(first["nash/kl"]) < 1e-3 and 0.3 < first["nash/win_prob"] < 0.7
    assert nash.rounds[0]["online/pairs"] == 32 * 4
    assert math.isfinite(nash.rounds[-1]["online/reward_mixture"]) and abs(nash.history[-1]["nash/kl"]) > 1e-3


# ----------------------------------------------------------------------------------------------- MPO
def mpo_cfg(s, out, delta, **sections) -> MPOConfig:
    base = {
        "model": {"name_or_path": str(s["sft"]), "tokenizer": str(s["task"].tokenizer_dir)},
        "data": {"path": str(s["pairs"]), "max_len": 64},
        "task": {"name": "reviews"},
        "reward": {"task": {"gold": 1.0}},
        "mpo": {"delta": delta},
        "output_dir": str(out),
        "eval_prompts": 0,
        "dpo": {"optim": {"lr": 1e-3}, "train": {"batch_size": 16, "max_steps": 3, "progress": False}},
        "rl": {
            "algo": {"name": "grpo"},
            "kl": {"coef": 0.05},
            "rollout": {"prompts_per_step": 4, "n": 4, "max_new_tokens": 16, "eval_prompts": 0},
            "optim": {"lr": 1e-3},
            "train": {"batch_size": 16, "max_steps": 2, "progress": False},
        },
    }
    for key, value in sections.items():
        base[key] = base.get(key, {}) | value
    return from_dict(MPOConfig, base)


def test_mpo_refuses_to_replace_a_finished_run_naming_its_own_key(setup, tmp_path):
    """A second `alignflow mpo` into the same output_dir: one line naming output_dir (the top-level key the user
    sets), not the DPO stage's internal directory; overwrite goes through to the stages."""
    (tmp_path / "dpo" / "model").mkdir(parents=True)
    with pytest.raises(ConfigError, match=rf"^output_dir={tmp_path} already holds an MPO run \(dpo/ \(model/\)\)"):
        mpo.train_mpo(mpo_cfg(setup, tmp_path, float("-inf")))
    with pytest.raises(ConfigError, match=r"train.output_dir=.*dpo already holds a run"):  # the stage's own check
        mpo.train_mpo(mpo_cfg(setup, tmp_path, float("-inf"), dpo={"train": {"batch_size": 16, "resume": True}}))


def test_mpo_with_delta_minus_inf_is_dpo_then_no_rl(setup, tmp_path):
    result = mpo.train_mpo(mpo_cfg(setup, tmp_path, float("-inf")))
    assert result.stats["mpo/hard"] == 0 and result.stats["mpo/easy"] == result.stats["mpo/pairs"] > 0
    assert result.rl is None and not (tmp_path / "rl").exists() and not (tmp_path / "hard_prompts.jsonl").exists()
    assert result.dpo is not None and len(result.dpo.history) == 3
    assert result.model_dir == tmp_path / "dpo" / "model" and (result.model_dir / "model.safetensors").exists()
    assert json.loads((tmp_path / "mpo.json").read_text())["model"] == str(result.model_dir)


def test_mpo_runs_rl_on_the_hard_prompts_from_and_against_the_dpo_model(setup, tmp_path):
    """A split at the median reward gap: DPO on the easy half, then GRPO on the hard half's prompts whose initial
    policy and KL reference are both the DPO model (so the first RL step's KL is 0 although DPO moved away from the
    SFT model)."""
    rows = read_jsonl(setup["pairs"])
    gaps = sorted(
        abs(a - b)
        for a, b in zip(
            *[
                setup["task"].gold_reward([r["prompt"] for r in rows], [r[s] for r in rows])
                for s in ("chosen", "rejected")
            ],
            strict=False,
        )
    )
    delta = gaps[len(gaps) // 2]
    result = mpo.train_mpo(mpo_cfg(setup, tmp_path, delta))
    s = result.stats
    assert s["mpo/easy"] + s["mpo/hard"] == s["mpo/pairs"] == len(rows) and s["mpo/easy"] > 0 and s["mpo/hard"] > 0
    hard = read_jsonl(tmp_path / "hard_prompts.jsonl")
    assert len(hard) == s["mpo/hard_prompts"] and {r["prompt"] for r in hard} <= {r["prompt"] for r in rows}
    rl_cfg = json.loads((tmp_path / "rl" / "config.json").read_text())
    dpo_dir = str(tmp_path / "dpo" / "model")
    assert rl_cfg["model"]["name_or_path"] == rl_cfg["ref_model"] == dpo_dir
    assert result.rl is not None and abs(result.rl.history[0]["policy/kl"]) < 1e-4
    dpo = load_causal_lm(ModelConfig(name_or_path=dpo_dir))
    assert not torch.equal(weights(dpo), weights(load_causal_lm(ModelConfig(name_or_path=str(setup["sft"])))))
    assert result.model_dir == tmp_path / "rl" / "model"


# ----------------------------------------------------------------------------------------------- plumbing
def test_config_mistakes_are_clear_errors(setup, tmp_path):
    with pytest.raises(ConfigError, match="online.method.*one of iterative_dpo, inpo, apo, nash_md"):
        from_dict(OnlinePOConfig, {"online": {"method": "spin"}})
    cases = [
        ("iterative_dpo", {"loss": {"name": "inpo"}}, "method inpo trains loss inpo"),
        ("inpo", {"loss": {"name": "dpo"}}, "loss.name=dpo"),
        ("iterative_dpo", {"loss": {"name": "kto"}}, "pairwise loss"),
        ("nash_md", {"loss": {"beta": 0.2}}, "online.kl_coef"),
        ("apo", {"loss": {"name": "simpo"}}, "uses none"),
        ("iterative_dpo", {"train": {"max_steps": 5}}, "online.steps_per_round"),
        ("iterative_dpo", {"reward": {"task": {}}}, "no reward source"),
        ("iterative_dpo", {"loss": {"lam": 0.5}}, "loss.lam"),
    ]
    for method, sections, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            it.train_online_po(online_cfg(setup, tmp_path, method, **sections))
    with pytest.raises(ConfigError, match="dpo.model is set by mpo"):
        mpo.train_mpo(mpo_cfg(setup, tmp_path, 0.0, dpo={"model": {"name_or_path": "x"}}))
    with pytest.raises(ConfigError, match="rl.reward is set by mpo"):
        mpo.train_mpo(mpo_cfg(setup, tmp_path, 0.0, rl={"reward": {"task": {"gold": 1.0}}}))


def test_commands_presets_and_docs(capsys):
    assert ONLINE_PO_METHODS == ("iterative_dpo", "inpo", "apo", "nash_md")
    for name, cls in (("online_po", OnlinePOConfig), ("mpo", MPOConfig)):
        assert COMMANDS[name][0] is cls and main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "online.apo_alpha" in out and "mpo.delta" in out and "rl.algo.name" in out

    for preset, method in PRESETS.items():
        cfg = load_config(OnlinePOConfig, ROOT / "configs" / f"{preset}.yaml")
        assert cfg.online.method == method and cfg.model.name_or_path == "builtin:sft"  # runs as written
    mpo = load_config(MPOConfig, ROOT / "configs" / "mpo.yaml")
    assert mpo.model.name_or_path == "" and math.isfinite(mpo.mpo.delta)  # empty: MPO makes its own SFT model
    for page in ("online_po", "mpo"):
        assert (ROOT / "docs" / f"{page}.md").exists()
