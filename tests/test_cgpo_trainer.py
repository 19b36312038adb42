"""``alignflow cgpo``: the trainer's step against hand-derived weights, per-task reward routing, the judges from
config (rule judges by dotted path, LLM principle judges), resume, config mistakes, and learning on the reviews
task (constraint satisfaction rises, gold does not fall)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from alignflow.batch import Batch
from alignflow.cli import COMMANDS, main
from alignflow.config import CGPOConfig, ConfigError, from_dict, load_config
from alignflow.data.formats import DataError
from alignflow.data.pipeline import prepare_data
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.rollout import HFEngine, SamplingParams
from alignflow.tasks import reviews
from alignflow.trainers.cgpo import (
    TaskRewards,
    anchor_rewards,
    build_cgpo_run,
    build_judges,
    cgpo_loss,
    cgpo_step,
    row_logps,
    train_cgpo,
)
from alignflow.trainers.rl_setup import PromptStream

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
RULES = "alignflow.tasks.reviews_constraints"


def cgpo_cfg(task, model_dir, out, **sections) -> CGPOConfig:
    base = {
        "model": {"name_or_path": str(model_dir), "tokenizer": str(task.tokenizer_dir)},
        "data": {"path": str(task.prompts_path)},
        "task": {"name": "reviews"},
        "reward": {"functions": {f"{RULES}:tone": 1.0}},
        "cgpo": {"rule_judges": {"grammatical": f"{RULES}:grammatical", "no_repeats": f"{RULES}:no_repeats"}},
        "rollout": {"prompts_per_step": 2, "n": 2, "max_new_tokens": 8, "eval_prompts": 0},
        "optim": {"lr": 1e-3},
        "train": {"output_dir": str(out), "max_steps": 2, "progress": False},
    }
    for k, v in sections.items():
        base[k] = base.get(k, {}) | v
    return from_dict(CGPOConfig, base)


class FixedScores:
    """A reward role that gives the rows of each call the scores ``values`` in order."""

    def __init__(self, values):
        self.values = torch.tensor(values)

    def score(self, batch: Batch) -> Batch:
        return Batch({"scores": self.values[: len(batch)]})


def open_run(task, model_dir, out, **sections):
    cfg = cgpo_cfg(task, model_dir, out, **sections)
    tok = load_tokenizer(str(task.tokenizer_dir))
    run = build_cgpo_run(cfg, CPU, tok, 4)
    prompts = PromptStream(prepare_data(cfg.data, tok, expect=("prompt",)).train, 0).take(2)
    return run, prompts


# ----------------------------------------------------------------------------------------------- the step
def test_infeasible_sample_gets_no_crpg_weight_in_the_step(reviews_task, reviews_sft, tmp_path):
    """2 prompts x 2 samples, rewards r = (1, 0, 2, 2), the odd rows flagged by a judge. Anchors are the group
    means (0.5, 0.5, 2, 2), so sigmoid(r - anchor) = (s(0.5), s(-0.5), s(0), s(0)) = (0.622459, 0.377541, 0.5,
    0.5) and the CRPG weights are (0.622459, 0, 0.5, 0). The gradient of the step's loss equals that of
    -(w_0 log pi(y_0) + w_2 log pi(y_2)) / 4: the flagged rows contribute nothing."""
    run, prompts = open_run(reviews_task, reviews_sft, tmp_path)
    run.rewards = TaskRewards(FixedScores([1.0, 0.0, 2.0, 2.0]), {})
    run.judges = {"even_rows": lambda batch: [i % 2 == 0 for i in range(len(batch))]}
    s = 1 / (1 + math.exp(-0.5))
    m = cgpo_step(run, prompts, 0)
    assert m["_weights"].tolist() == pytest.approx([s, 0.0, 0.5, 0.0], abs=1e-6)
    assert m["constraints/even_rows"] == 0.5 and m["cgpo/feasible_share"] == 0.5
    assert m["cgpo/calibrated_reward"] == pytest.approx((s + (1 - s) + 0.5 + 0.5) / 4, abs=1e-6)

    batch = run.rollout.generate(prompts)  # the same samples again (seeded per prompt)
    r, V = torch.tensor([1.0, 0.0, 2.0, 2.0]), torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    run.policy.zero_grad(set_to_none=True)
    loss, _, w = cgpo_loss(run, batch, r, torch.tensor([0.5, 0.5, 2.0, 2.0]), V)
    loss.backward()
    got = {n: p.grad.clone() for n, p in run.policy.named_parameters()}
    run.policy.zero_grad(set_to_none=True)
    lp = row_logps(run, batch, [0, 2])
    (-(w[0] * lp[0] + w[2] * lp[1]) / 4).backward()
    for name, p in run.policy.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_no_feasible_sample_takes_no_optimiser_step(reviews_task, reviews_sft, tmp_path):
    run, prompts = open_run(reviews_task, reviews_sft, tmp_path, cgpo={"update": "crraft"})
    run.judges = {"never": lambda batch: [False] * len(batch)}
    before = [p.detach().clone() for p in run.policy.parameters()]
    m = cgpo_step(run, prompts, 0)
    assert m["train/skipped"] == 1.0 and m["cgpo/kept"] == 0.0 and m["constraints/all"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, run.policy.parameters(), strict=True))


def test_codpo_step_pairs_best_feasible_with_worst_infeasible(reviews_task, reviews_sft, tmp_path):
    """r = (1, 0, 2, 2), rows 1 and 3 infeasible: group 0 pairs (0, 1), group 1 pairs (2, 3): 2 pairs; the first
    CODPO loss has margin 0 (policy = reference), so it is log 2 + lam * mean(-lp_c / len_c) > log 2."""
    run, prompts = open_run(reviews_task, reviews_sft, tmp_path, cgpo={"update": "codpo"})
    run.rewards = TaskRewards(FixedScores([1.0, 0.0, 2.0, 2.0]), {})
    run.judges = {"even_rows": lambda batch: [i % 2 == 0 for i in range(len(batch))]}
    m = cgpo_step(run, prompts, 0)
    assert m["cgpo/pairs"] == 2.0 and m["cgpo/loss"] > math.log(2)


# ----------------------------------------------------------------------------------------------- rewards, judges
def test_task_field_picks_the_reward_and_unknown_tasks_fail():
    batch = Batch(meta={"prompt": ["a", "b", "c"], "response": ["x", "y", "z"], "task": ["math", None, "chat"]})
    rewards = TaskRewards(FixedScores([7.0, 7.0]), {"math": FixedScores([1.0]), "chat": FixedScores([2.0])})
    assert rewards.score(batch)["scores"].tolist() == [1.0, 7.0, 2.0]
    bad = Batch(meta={"prompt": ["a"], "response": ["x"], "task": ["poetry"]})
    with pytest.raises(DataError, match=r"prompt 'a' \(row 0 of the step\): task 'poetry'.*valid: math, chat"):
        rewards.score(bad)
    assert TaskRewards(FixedScores([7.0, 7.0, 7.0]), {}).score(batch)["scores"].tolist() == [7.0] * 3  # no routing
    with pytest.raises(DataError, match=r"prompt 'b' \(row 1 of the step\) has no 'task' field"):
        TaskRewards(None, {"math": FixedScores([1.0])}).score(batch.select([0, 1]))


def test_rule_and_llm_principle_judges_from_config(reviews_task, reviews_sft):
    """Rule judges by dotted path read the gold features; an LLM principle judge (the tiny task model, which never
    writes 'Answer: Yes') falls back to 'no' under on_parse_failure=fallback, so it flags every sample."""
    cfg = cgpo_cfg(
        reviews_task,
        reviews_sft,
        "unused",
        cgpo={
            "principles": {"polite": "The review is polite."},
            "judge": {"model": str(reviews_sft), "max_new_tokens": 4, "on_parse_failure": "fallback"},
        },
    )
    judges = build_judges(cfg, CPU)
    assert list(judges) == ["grammatical", "no_repeats", "polite"]
    p = "Review : the film"
    responses = ["was great .", "was great . the film was dull .", "was was great"]
    batch = Batch(meta={"prompt": [p] * 3, "response": responses})
    assert judges["grammatical"](batch) == [True, True, False]  # 'the film was was great' does not parse
    assert judges["no_repeats"](batch) == [True, False, True]  # 'film' twice
    assert judges["polite"](batch) == [False, False, False]


def test_config_mistakes_name_the_key(reviews_task, reviews_sft):
    with pytest.raises(ConfigError, match="cgpo: no judge"):
        load_config(CGPOConfig, None, [])
    with pytest.raises(ConfigError, match="cgpo.judge"):
        load_config(CGPOConfig, None, ["cgpo.principles={polite: be polite}"])
    with pytest.raises(ConfigError, match="cgpo.update"):
        load_config(CGPOConfig, ROOT / "configs" / "cgpo_crpg.yaml", ["cgpo.update=ppo"])
    with pytest.raises(ConfigError, match="rollout.n=1"):
        load_config(CGPOConfig, ROOT / "configs" / "cgpo_codpo.yaml", ["rollout.n=1"])
    cfg = cgpo_cfg(reviews_task, reviews_sft, "unused", cgpo={"rule_judges": {"typo": f"{RULES}:gramatical"}})
    with pytest.raises(ConfigError, match=r"cgpo.rule_judges.typo:.*no attribute 'gramatical'"):
        build_judges(cfg, CPU)


def test_command_help_and_presets(capsys):
    assert COMMANDS["cgpo"][0] is CGPOConfig
    assert main(["cgpo", "--help"]) == 0 and "cgpo.update" in capsys.readouterr().out
    for update in ("crpg", "codpo", "crraft"):
        cfg = load_config(CGPOConfig, ROOT / "configs" / f"cgpo_{update}.yaml", [])
        assert cfg.cgpo.update == update and cfg.cgpo.rule_judges
    assert "## How to run" in (ROOT / "docs" / "cgpo.md").read_text()


# ----------------------------------------------------------------------------------------------- resume, learning
def test_resume_matches_the_uninterrupted_run(reviews_task, reviews_sft, tmp_path):
    cfg = cgpo_cfg(reviews_task, reviews_sft, tmp_path, train={"max_steps": 4, "save_every": 2})
    full = train_cgpo(cfg)
    shutil.rmtree(tmp_path / "checkpoints" / "step-4")
    resumed = train_cgpo(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True)))
    assert len(resumed.history) == 2
    assert [h["cgpo/loss"] for h in resumed.history] == pytest.approx([h["cgpo/loss"] for h in full.history[2:]])
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def sampled(task, model, k: int = 48) -> tuple[float, float]:
    """(share of samples no rule judge flags, mean gold) of 4 seeded samples (24 tokens) for k held-out prompts."""
    tok = load_tokenizer(str(task.tokenizer_dir))
    prompts = [json.loads(line)["prompt"] for line in open(task.eval_prompts_path)][:k]
    out = HFEngine(model, tok).generate(
        [tok(p)["input_ids"] for p in prompts], SamplingParams(n=4, max_new_tokens=24, seed=7)
    )
    texts = tok.batch_decode(
        [r[m.bool()].tolist() for r, m in zip(out["response_ids"], out["response_mask"], strict=True)],
        skip_special_tokens=True,
    )
    ps = [p for p in prompts for _ in range(4)]
    comps = [reviews.gold_components(p, t) for p, t in zip(ps, texts, strict=True)]
    ok = [c["bad_sentences"] == 0 and c["repeats"] == 0 for c in comps]
    return sum(ok) / len(ok), sum(c["gold"] for c in comps) / len(comps)


def test_crpg_raises_constraint_satisfaction_and_not_gold_falls(reviews_task, reviews_sft, tmp_path):
    """CRPG against the tone-only reward with the grammatical and no_repeats judges, 8 steps of 8 prompts x 4
    samples (lr 3e-3): the share of held-out samples both judges accept rises and the gold reward does not fall
    (measured: accepted 0.057 -> 0.464, gold -2.44 -> -1.36; CRRAFT 0.057 -> 0.354, CODPO at lr 1e-3 0.057 ->
    0.203)."""
    cfg = cgpo_cfg(
        reviews_task,
        reviews_sft,
        tmp_path,
        rollout={"prompts_per_step": 8, "n": 4, "max_new_tokens": 24},
        optim={"lr": 3e-3},
        train={"max_steps": 8},
    )
    ok0, gold0 = sampled(reviews_task, load_causal_lm(cfg.model))
    result = train_cgpo(cfg)
    ok1, gold1 = sampled(reviews_task, result.model)
    assert ok1 > ok0 + 0.2, (ok0, ok1, gold0, gold1)
    assert gold1 >= gold0, (ok0, ok1, gold0, gold1)
    h = result.history
    assert all(set(x) >= {"constraints/grammatical", "constraints/no_repeats", "cgpo/feasible_share"} for x in h)
    assert "eval/gold_reward" not in result.eval  # no eval prompts in this configuration


def test_anchor_field_is_the_reward_of_the_rows_reference(reviews_task, reviews_sft, tmp_path):
    """cgpo.anchor=field: r_anchor of every sample of a prompt is the reward (here the tone term) of the prompt
    row's reference response; a row without one stops the step naming the field."""
    rows = [
        {"prompt": "Review : the film", "reference": " was wonderful ."},
        {"prompt": "Review : the plot", "reference": " was dull ."},
    ]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run, prompts = open_run(
        reviews_task, reviews_sft, tmp_path / "run", data={"path": str(data)}, cgpo={"anchor": "field"}
    )
    batch = run.rollout.generate(prompts)
    r = torch.zeros(len(batch))
    pairs = zip(prompts["prompt"], prompts["reference"], strict=True)
    want = [reviews.gold_components(p, ref)["sentiment"] for p, ref in pairs]
    got = anchor_rewards(run, batch, r, 2)
    assert got.tolist() == pytest.approx([want[0], want[0], want[1], want[1]])
    no_ref = Batch(batch.tensors, {k: v for k, v in batch.meta.items() if k != "reference"})
    with pytest.raises(DataError, match="no 'reference' response"):
        anchor_rewards(run, no_ref, r, 2)
