"""LATR tree rollouts in the built-in engine (alignflow/rollout/latr_tree.py): the tree's samples, their log-probs,
pruning, the mix share, the rollout.latr.* keys, the RL hook and the measured diversity (docs/latr.md)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignflow.algorithms.latr import mix_ratio, tree_share
from alignflow.config import ConfigError, LatrConfig, RLConfig, from_dict, load_config
from alignflow.rollout import HFEngine, SamplingParams
from alignflow.rollout.latr_tree import STAT_PREFIX, TreeSampler, group_stats
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rl_algos import resolve
from alignflow.trainers.rl_setup import role_objects

ALWAYS = {"tau_abs": 0.0, "tau_rel": 0.0}  # every non-top candidate among the top 3 branches (when a slot is free)


@pytest.fixture(scope="module")
def tiny(reviews_task):
    """The reviews task's untrained 1-layer model, its tokenizer and 6 prompts (token ids)."""
    tok = AutoTokenizer.from_pretrained(reviews_task.tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(reviews_task.model_dir).eval()
    rows = [json.loads(line) for line in reviews_task.prompts_path.read_text().splitlines()[:6]]
    return model, tok, [tok(r["prompt"])["input_ids"] for r in rows]


def _params(n=4, max_new=10, temperature=1.0, prompts=6, **kw):
    return SamplingParams(
        n=n, temperature=temperature, max_new_tokens=max_new, seeds=list(range(7, 7 + prompts)), logprobs=True, **kw
    )


def _teacher_forced(model, batch, temperature):
    """log_softmax(logits / T) of the model at each response token, from one forward over the whole rows."""
    tp = batch["prompt_ids"].shape[1]
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits.float()
    lp = (logits[:, tp - 1 : -1] / temperature).log_softmax(-1)  # position t predicts token t + 1
    return lp.gather(-1, batch["response_ids"][..., None]).squeeze(-1) * batch["response_mask"]


def test_without_branches_the_tree_sampler_is_the_engines_plain_sampling(tiny):
    """k = 0 (eta 0), and k = 4 with tau_abs >= 1 (the trunk never branches, the free slots are filled by plain
    samples): every row is the engine's row with the same (seed, slot) stream, token for token."""
    model, tok, ids = tiny
    plain = HFEngine(model, tok).generate(ids, _params())
    for cfg in (LatrConfig(enabled=True, eta0=0.0), LatrConfig(enabled=True, eta0=1.0, tau_abs=1.0)):
        out = TreeSampler(HFEngine(model, tok), cfg).generate(ids, _params())
        assert torch.equal(out["response_ids"], plain["response_ids"])
        assert torch.allclose(out["sampling_logprobs"], plain["sampling_logprobs"], atol=1e-5)
        assert out.meta["finish_reason"] == plain.meta["finish_reason"]
        assert float(out[STAT_PREFIX + "latr_branches"].sum()) == 0.0


def test_tree_samples_carry_the_policys_logprobs_of_their_own_tokens(tiny):
    """Branches copy their parent's KV cache rows; each row's stored log-probs (branch token included) equal a
    teacher-forced forward over the finished row, and the prompts' rows share their prompt."""
    model, tok, ids = tiny
    out = TreeSampler(HFEngine(model, tok), LatrConfig(enabled=True, eta0=1.0, tau_ed=0.0, **ALWAYS)).generate(
        ids, _params(temperature=0.8)
    )
    assert len(out) == 6 * 4 and out.meta["prompt_index"] == [i // 4 for i in range(24)]
    assert float(out["latr_tree"].sum()) == 24  # tau_ed = 0 prunes nothing: the whole group comes from the tree
    assert float(out[STAT_PREFIX + "latr_branches"].mean()) == 3  # trunk + 3 branches fill G = 4
    mask = out["response_mask"].bool()
    recomputed = _teacher_forced(model, out, 0.8)
    assert (out["sampling_logprobs"] - recomputed)[mask].abs().max() < 1e-4
    prompts = out["prompt_ids"].view(6, 4, -1)
    assert torch.equal(prompts, prompts[:, :1].expand_as(prompts))


@pytest.fixture(scope="module")
def sft(reviews_task, reviews_sft):
    """The reviews task's model after 60 SFT steps (the shared fixture), its tokenizer and 32 prompts (ids)."""
    tok = AutoTokenizer.from_pretrained(reviews_task.tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(reviews_sft).eval()
    rows = [json.loads(line) for line in reviews_task.prompts_path.read_text().splitlines()[:32]]
    return model, tok, [tok(r["prompt"])["input_ids"] for r in rows]


def test_pruned_branches_free_their_slot_and_the_group_is_refilled(sft):
    """tau_ed = 1 prunes every branch whose window shares anything (in order) with its parent's; the group still
    has G rows, and the tree rows are the trunk plus the kept branches: 1 + branches - pruned per group."""
    model, tok, ids = sft
    cfg = LatrConfig(enabled=True, eta0=1.0, tau_ed=1.0, lookahead=4, **ALWAYS)
    out = TreeSampler(HFEngine(model, tok), cfg).generate(ids[:6], _params(max_new=12))
    groups = out["latr_tree"].view(6, 4).sum(-1)
    branches = out[STAT_PREFIX + "latr_branches"].view(6, 4)[:, 0]
    pruned = out[STAT_PREFIX + "latr_pruned"].view(6, 4)[:, 0]
    assert float(pruned.sum()) > 0
    assert torch.equal(groups, 1 + branches - pruned)
    assert torch.equal(out[STAT_PREFIX + "latr_tree_share"].view(6, 4)[:, 0], groups / 4)
    mask = out["response_mask"].bool()
    assert (out["sampling_logprobs"] - _teacher_forced(model, out, 1.0))[mask].abs().max() < 1e-4


def test_latr_groups_hold_more_distinct_responses_than_plain_sampling(sft):
    """The same 32 prompts, G = 8, the same seeds, temperature 0.2 (a peaked policy, where plain samples repeat),
    12 tokens, the thresholds of configs/latr_grpo.yaml: the share of distinct responses per group, measured for
    plain sampling and for LATR with the whole group (eta 1) and half of it (eta 0.5) from the tree."""
    model, tok, ids = sft
    params = _params(n=8, max_new=12, temperature=0.2, prompts=32)
    plain = HFEngine(model, tok).generate(ids, params)
    rows = [r[m.bool()].tolist() for r, m in zip(plain["response_ids"], plain["response_mask"], strict=True)]
    base = [group_stats(rows[i * 8 : (i + 1) * 8]) for i in range(32)]
    distinct = {"plain": sum(s["latr_distinct"] for s in base) / 32}
    edit = {"plain": sum(s["latr_edit_distance"] for s in base) / 32}
    for eta in (1.0, 0.5):
        cfg = LatrConfig(enabled=True, eta0=eta, tau_abs=0.1, tau_rel=0.05, lookahead=6)
        out = TreeSampler(HFEngine(model, tok), cfg).generate(ids, params)
        distinct[eta] = float(out[STAT_PREFIX + "latr_distinct"].mean())
        edit[eta] = float(out[STAT_PREFIX + "latr_edit_distance"].mean())
    print(f"distinct share {distinct}; mean pairwise edit distance {edit}")
    assert distinct[1.0] > distinct[0.5] > distinct["plain"]


def test_the_tree_share_follows_the_decaying_mix_ratio(tiny):
    """eta0 = 0.5 over 10 steps: step 0 -> round(0.5 * 4) = 2 tree slots per group, step 6 -> round(0.2 * 4) = 1
    (the trunk alone: nothing to branch into), step 10 -> 0."""
    model, tok, ids = tiny
    sampler = TreeSampler(
        HFEngine(model, tok), LatrConfig(enabled=True, eta0=0.5, decay_steps=10, tau_ed=0.0, **ALWAYS)
    )
    assert [tree_share(4, mix_ratio(s, 0.5, 10)) for s in (0, 6, 10)] == [2, 1, 0]
    for step, tree_rows in ((0, 2), (6, 1), (10, 0)):
        out = sampler.generate(ids, _params(), step=step)
        assert out["latr_tree"].view(6, 4).sum(-1).tolist() == [tree_rows] * 6
        assert out["latr_tree"].view(6, 4)[:, tree_rows:].sum() == 0  # tree rows take the first slots


def test_group_stats_by_hand():
    """Responses (1, 2, 3), (1, 2, 3), (4,): 2 distinct of 3; pair distances 0, 1, 1 -> mean 2/3."""
    stats = group_stats([[1, 2, 3], [1, 2, 3], [4]])
    assert stats["latr_distinct"] == pytest.approx(2 / 3) and stats["latr_edit_distance"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "override, key",
    [
        ("rollout.backend=vllm", "rollout.backend"),
        ("rollout.async_steps=1", "rollout.async_steps"),
        ("env.task=true", "env.task"),
        ("env.path=envs.py:make", "env.path"),
        ("rollout.n=1", "rollout.n"),
    ],
)
def test_settings_the_tree_cannot_serve_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(RLConfig, None, ["rollout.latr.enabled=true", "train.batch_size=4", override])
    assert str(e.value).startswith(f"rollout.latr.enabled=true cannot serve {key}=") and "\n" not in str(e.value)
    load_config(RLConfig, None, ["train.batch_size=4", override])  # without LATR the same setting loads


def test_latr_keys_are_validated():
    assert load_config(RLConfig, None, []).rollout.latr.enabled is False
    with pytest.raises(ConfigError, match=r"rollout\.latr\.eta0"):
        load_config(RLConfig, None, ["rollout.latr.eta0=1.5"])
    with pytest.raises(ConfigError, match=r"rollout\.latr\.top_m"):
        load_config(RLConfig, None, ["rollout.latr.top_m=1"])


def test_an_rl_run_samples_trees_and_logs_the_latr_metrics(reviews_task, tmp_path):
    """alignflow rl with rollout.latr on: 2 GRPO steps sample through the tree and log rollout/latr_*."""
    cfg = from_dict(
        RLConfig,
        {
            "model": {"name_or_path": str(reviews_task.model_dir), "tokenizer": str(reviews_task.tokenizer_dir)},
            "data": {"path": str(reviews_task.prompts_path)},
            "task": {"name": "reviews"},
            "algo": {"name": "grpo"},
            "reward": {"task": {"gold": 1.0}},
            "rollout": {
                "prompts_per_step": 2,
                "n": 4,
                "max_new_tokens": 6,
                "eval_prompts": 0,
                "latr": {"enabled": True, "eta0": 1.0, "decay_steps": 2, "tau_ed": 0.0, **ALWAYS},
            },
            "optim": {"lr": 1e-3},
            "train": {"output_dir": str(tmp_path), "batch_size": 8, "max_steps": 2, "progress": False, "log_every": 1},
        },
    )
    train_rl(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/latr_branches" in r]
    assert len(steps) == 2
    # step 0: eta 1 -> the whole group of 4 from the tree (3 branches, none pruned); step 1: eta 0.5 -> 2 slots
    assert [r["rollout/latr_tree_share"] for r in steps] == [1.0, 0.5]
    assert [r["rollout/latr_branches"] for r in steps] == [3.0, 1.0]
    assert all(0 < r["rollout/latr_distinct"] <= 1 for r in steps)


def test_the_reference_policy_of_reward_shaping_answers_with_plain_samples(reviews_task, tmp_path):
    """With rollout.latr on and reward.shaping=par, the policy's rollout role samples trees and the reference
    policy's (the PAR baseline answers) samples plainly."""
    cfg = from_dict(
        RLConfig,
        {
            "model": {"name_or_path": str(reviews_task.model_dir), "tokenizer": str(reviews_task.tokenizer_dir)},
            "task": {"name": "reviews"},
            "algo": {"name": "grpo"},
            "reward": {"task": {"gold": 1.0}, "shaping": "par", "reference_samples": 2},
            "rollout": {"prompts_per_step": 2, "n": 4, "latr": {"enabled": True}},
            "train": {"output_dir": str(tmp_path), "batch_size": 8, "progress": False},
        },
    )
    tok = AutoTokenizer.from_pretrained(reviews_task.tokenizer_dir)
    roles = role_objects(cfg, resolve(cfg), torch.device("cpu"), 1, tok, ("actor", "rollout", "ref"))
    assert roles["rollout"].tree is not None and roles["ref_rollout"].tree is None
