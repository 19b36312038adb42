"""Online RL trainer (``alignflow rl``): it learns (GRPO on arithmetic, PPO on reviews), then the plumbing --
micro-batch invariance of the updates, the reference skipped at KL 0, the LoRA reference without a second model,
the NaN diagnostic, a failing reward naming its row, every preset running one step, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

from alignflow.algorithms.kl import make_kl_controller
from alignflow.batch import Batch, cat_rollouts
from alignflow.config import ConfigError, RLConfig, SFTConfig, TaskConfig, from_dict, load_config
from alignflow.data.pipeline import prepare_data
from alignflow.distributed.groups import LocalGroup
from alignflow.models import load_causal_lm, load_tokenizer, load_value_model
from alignflow.rewards import RewardError
from alignflow.rollout import HFEngine, SamplingParams
from alignflow.tasks import build_task
from alignflow.tasks.arithmetic import near_miss, solve
from alignflow.trainers import rl as online
from alignflow.trainers.loop import NonFiniteError
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rl_algos import ADVANTAGE_STEPS, explained_variance, resolve, truncated_is_weights
from alignflow.trainers.rl_setup import PromptStream, build_roles
from alignflow.trainers.roles import Actor, Critic, Reference, micro_batches
from alignflow.trainers.sft import train_sft
from tests.helpers import tiny_task

ROOT = Path(__file__).resolve().parents[1]
RL_PRESETS = ("ppo", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "remax", "reinforce_pp", "safe_ppo")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rl_cfg(task, out, model_dir=None, **sections) -> RLConfig:
    """A small RLConfig on a built task; ``sections`` are merged over the defaults below."""
    base = {
        "model": {"name_or_path": str(model_dir or task.model_dir), "tokenizer": str(task.tokenizer_dir)},
        "data": {"path": str(task.prompts_path)},
        "task": {"name": task.name},
        "reward": {"task": {"gold": 1.0}},
        "rollout": {"prompts_per_step": 2, "n": 2, "max_new_tokens": 6, "eval_prompts": 0},
        "optim": {"lr": 1e-3},
        "train": {"output_dir": str(out), "batch_size": 4, "max_steps": 1, "progress": False},
    }
    for k, v in sections.items():
        base[k] = base.get(k, {}) | v
    return from_dict(RLConfig, base)


def greedy_responses(model, tok, prompts: list[str], max_new: int) -> list[str]:
    batch = HFEngine(model, tok).generate(
        [tok(p)["input_ids"] for p in prompts], SamplingParams(temperature=0.0, max_new_tokens=max_new)
    )
    return tok.batch_decode(
        [r[m.bool()].tolist() for r, m in zip(batch["response_ids"], batch["response_mask"], strict=False)],
        skip_special_tokens=True,
    )


# ----------------------------------------------------------------------------------------------- fixtures
IDENTITY_FORMS = ("{a}+0=", "0+{a}=", "{a}-0=", "{a}*1=", "{a}*0=")


@pytest.fixture(scope="session")
def arith(tmp_path_factory):
    """The arithmetic task (2 layers, width 64) SFT'd for 60 steps on identity-element problems.

    The task's own 2-digit sums are beyond a 64-wide model in seconds (measured: 400 SFT steps give 3.5% held-out
    accuracy), so the problems are ``a+0, 0+a, a-0, a*1, a*0`` for a in 0..99 -- the task's prompt format,
    tokenizer, model, reward, and its SFT noise (30% near-miss answers, ``arithmetic.near_miss``). 20 operands are
    held out; answering them needs copying digits, which the model must generalise. (``a-a`` is left out: telling it
    from ``a-0`` needs comparing operands, and GRPO then collapses both to "0".)
    """
    root = tmp_path_factory.mktemp("arith")
    task = build_task(
        "arithmetic",
        TaskConfig(
            name="arithmetic",
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            intermediate_size=128,
            num_sft=10,
            num_pairs=10,
        ),
        root / "task",
    )
    held = set(random.Random(1).sample(range(100), 20))
    train = [f.format(a=a) for a in range(100) if a not in held for f in IDENTITY_FORMS]
    test = [f.format(a=a) for a in sorted(held) for f in IDENTITY_FORMS]
    rng = random.Random(0)
    sft = []
    for _ in range(2000):
        p = rng.choice(train)
        sft.append({"prompt": p, "completion": near_miss(rng, solve(p)) if rng.random() < 0.3 else solve(p)})
    paths = {
        "sft": write_jsonl(root / "sft.jsonl", sft),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": p, "answer": solve(p)} for p in train]),
    }
    train_sft(
        from_dict(
            SFTConfig,
            {
                "model": {"name_or_path": str(task.model_dir), "tokenizer": str(task.tokenizer_dir)},
                "data": {"path": str(paths["sft"]), "max_len": 16, "eval_fraction": 0.0},
                "optim": {"lr": 3e-3, "scheduler": "constant"},
                "train": {"output_dir": str(root / "sft"), "batch_size": 32, "max_steps": 60, "progress": False},
            },
        )
    )
    return {"task": task, "model": root / "sft" / "model", "prompts": paths["prompts"], "held_out": test}


@pytest.fixture(scope="session")
def arith_task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("arith-tiny"), "arithmetic", num_sft=10, num_pairs=10)


# ----------------------------------------------------------------------------------------------- it learns
def test_grpo_raises_held_out_exact_match(arith, tmp_path):
    """GRPO with the exact-match reward raises greedy exact-match accuracy on held-out operands by > 15 points
    (measured: 0.46 -> 0.78, 0.72 and 0.86 with RL seeds 0, 1, 2; the bar leaves room for noise)."""
    task, tok = arith["task"], load_tokenizer(str(arith["task"].tokenizer_dir))
    held = arith["held_out"]

    def accuracy(model) -> float:
        return sum(task.gold_reward(held, greedy_responses(model, tok, held, 4))) / len(held)

    before = accuracy(load_causal_lm(rl_cfg(task, tmp_path, arith["model"]).model))
    cfg = rl_cfg(
        task,
        tmp_path / "grpo",
        arith["model"],
        data={"path": str(arith["prompts"])},
        algo={"name": "grpo"},
        kl={"coef": 0.0},
        reward={"task": {"accuracy": 1.0}},
        rollout={"prompts_per_step": 16, "n": 8, "max_new_tokens": 4},
        optim={"lr": 1e-3, "scheduler": "constant"},
        train={"batch_size": 128, "max_steps": 20},
    )
    result = train_rl(cfg)
    after = accuracy(result.model)
    assert after > before + 0.15, (before, after)
    rewards = [h["rollout/reward_mean"] for h in result.history]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5  # the training reward rises too
    assert (tmp_path / "grpo" / "model" / "model.safetensors").exists()


def test_ppo_raises_gold_reward(reviews_task, reviews_sft, tmp_path):
    """PPO (critic + GAE + KL in the reward) on the hidden gold reward of the reviews task raises the mean gold
    reward of samples on held-out prompts (measured: -2.44 -> -1.29 and -1.31 with RL seeds 0 and 1)."""
    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    prompts = [json.loads(line)["prompt"] for line in open(reviews_task.eval_prompts_path)][:48]

    def gold(model) -> float:
        batch = HFEngine(model, tok).generate(
            [tok(p)["input_ids"] for p in prompts], SamplingParams(n=4, max_new_tokens=24, seed=7)
        )
        texts = tok.batch_decode(
            [r[m.bool()].tolist() for r, m in zip(batch["response_ids"], batch["response_mask"], strict=False)],
            skip_special_tokens=True,
        )
        return sum(reviews_task.gold_reward([p for p in prompts for _ in range(4)], texts)) / len(texts)

    before = gold(load_causal_lm(rl_cfg(reviews_task, tmp_path, reviews_sft).model))
    cfg = rl_cfg(
        reviews_task,
        tmp_path / "ppo",
        reviews_sft,
        algo={"name": "ppo", "ppo_epochs": 2},
        kl={"coef": 0.05},
        rollout={"prompts_per_step": 32, "n": 1, "max_new_tokens": 24},
        critic={"optim": {"lr": 3e-3, "scheduler": "constant"}},
        optim={"lr": 1e-3, "scheduler": "constant"},
        train={"batch_size": 16, "max_steps": 12},
    )
    result = train_rl(cfg)
    after = gold(result.model)
    assert after > before + 0.5, (before, after)
    last = result.history[-1]
    for key in (
        "rollout/reward_mean",
        "rollout/response_len",
        "policy/kl",
        "policy/clipfrac",
        "policy/entropy",
        "critic/value_loss",
        "critic/explained_var",
        "perf/tokens_per_s",
        "perf/gen_share",
    ):
        assert key in last and math.isfinite(last[key]), key
    assert last["policy/kl"] > 0  # the policy moved away from the reference


# ----------------------------------------------------------------------------------------------- plumbing
def _actor_batch(task, tmp_path, seed=0) -> tuple[RLConfig, Batch]:
    """A rollout of 6 rows with varied prompt and response lengths, plus synthetic advantages, log-probs of a
    perturbed old policy and reference (so that clipping and the KL loss are active), TIS weights, values."""
    cfg = rl_cfg(task, tmp_path, rollout={"prompts_per_step": 3, "n": 2, "max_new_tokens": 8})
    roles = build_roles(cfg, resolve(cfg), torch.device("cpu"), 1)
    prompts = PromptStream(prepare_data(cfg.data, roles.tokenizer, expect=("prompt",)).train, 0).take(3)
    batch = roles.rollout.generate(prompts)
    g = torch.Generator().manual_seed(seed)
    mask = batch["response_mask"].clone()
    for row, keep in enumerate([8, 3, 5, 1, 8, 6]):
        mask[row, keep:] = 0  # (B, Tr) varied response lengths
    batch["response_mask"] = mask
    batch["attention_mask"] = torch.cat([batch["prompt_mask"], mask], 1)
    batch = batch.union(roles.actor.logprobs(batch))
    noise = lambda: 0.3 * torch.randn(mask.shape, generator=g)  # noqa: E731
    batch["old_logprobs"] = batch["old_logprobs"] + noise()
    batch["ref_logprobs"] = batch["old_logprobs"] + noise()
    batch["advantages"] = torch.randn(mask.shape, generator=g) * mask
    batch["is_weights"] = torch.rand(mask.shape, generator=g) + 0.5
    batch["values"], batch["returns"] = noise(), torch.randn(mask.shape, generator=g)
    return cfg, batch


@pytest.mark.parametrize(
    "policy_loss,agg",
    [
        ("ppo", "token_mean"),
        ("ppo", "seq_mean_token_mean"),
        ("ppo", "seq_mean_token_sum_norm"),
        ("gspo", "seq_mean_token_mean"),
        ("vanilla_pg", "seq_mean_token_sum"),
    ],
)
def test_updates_do_not_depend_on_the_micro_batch_budget(reviews_task, tmp_path, policy_loss, agg):
    """One actor update (policy loss + KL loss + entropy bonus) and one critic update with a huge token budget
    (one micro-batch) and with the smallest one (one or two rows per micro-batch) give the same weights: every
    micro-batch divides by the mini-batch's token or sequence count."""
    cfg, batch = _actor_batch(reviews_task, tmp_path)
    assert len(micro_batches(batch, 10**6)) == 1 and len(micro_batches(batch, 16)) >= 4
    algo = dataclasses.replace(
        resolve(cfg), policy_loss=policy_loss, loss_agg=agg, kl_placement="loss", kl_estimator="k3", norm_len=8
    )
    algo_cfg = dataclasses.replace(cfg.algo, entropy_coef=0.01, clip_low=0.1, clip_high=0.1)
    weights, metrics = [], []
    for budget in (10**6, 16):
        train = dataclasses.replace(cfg.train, micro_batch_tokens=budget)
        actor = Actor(load_causal_lm(cfg.model), cfg.optim, train, algo, algo_cfg, 1.0, 10, torch.device("cpu"))
        actor.set_kl_coef(0.1, "0")
        m = actor.update(batch)
        critic_model = load_value_model(cfg.model, "cpu", pad_token_id=0, seed=0)
        critic = Critic(critic_model, cfg.critic.optim, train, cfg.algo, 10, torch.device("cpu"))
        m |= critic.update(batch)
        weights.append([p.detach().clone() for p in list(actor.model.parameters()) + list(critic_model.parameters())])
        metrics.append(m)
    assert metrics[0]["policy/policy_loss"] == pytest.approx(metrics[1]["policy/policy_loss"], rel=1e-5, abs=1e-7)
    for key in (
        "policy/kl_loss",
        "policy/entropy_loss",
        "policy/clipfrac" if policy_loss != "vanilla_pg" else "policy/pg_advantage_mean",
    ):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-5, abs=1e-7), key
    assert metrics[0]["critic/value_loss"] == pytest.approx(metrics[1]["critic/value_loss"], rel=1e-5)
    assert metrics[0]["policy/grad_norm"] > 0
    # One Adam step moves a weight by ~lr * g / (|g| + eps): for gradients near eps (1e-8) float-summation noise
    # of the split shows up as ~1e-6 in the weight, while a real error of the split moves it by ~lr (1e-3).
    for a, b in zip(*weights, strict=False):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_kl_coefficient_zero_skips_the_reference(reviews_task, tmp_path, monkeypatch):
    """kl.coef = 0: no reference model is built and no reference forward runs; kl.coef > 0: one per step."""
    calls = []
    original = Reference.logprobs
    monkeypatch.setattr(Reference, "logprobs", lambda self, batch: calls.append(len(batch)) or original(self, batch))
    cfg = rl_cfg(reviews_task, tmp_path / "a", algo={"name": "reinforce_pp"}, kl={"coef": 0.0}, train={"max_steps": 2})
    result = train_rl(cfg)
    assert calls == [] and result.roles.ref is None
    assert "policy/kl" not in result.history[-1]
    cfg = rl_cfg(reviews_task, tmp_path / "b", algo={"name": "reinforce_pp"}, kl={"coef": 0.1}, train={"max_steps": 2})
    result = train_rl(cfg)
    assert calls == [4, 4]  # prompts_per_step * n rows, once per step
    assert all(math.isfinite(h["policy/kl"]) for h in result.history)


def test_lora_reference_is_the_actor_with_adapters_disabled(reviews_task, tmp_path):
    """With LoRA and no ref_model, the reference is the actor's own module with adapters off: no second model,
    log-probs equal to the base model's, and different from the actor's once the adapters are non-zero."""
    cfg = rl_cfg(
        reviews_task,
        tmp_path,
        kl={"coef": 0.1},
        model={"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}},
    )
    roles = build_roles(cfg, resolve(cfg), torch.device("cpu"), 1)
    assert roles.ref.model is roles.actor.model and roles.rollout.engine.model is roles.actor.model
    with torch.no_grad():
        for name, p in roles.actor.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the outputs
    prompts = PromptStream(prepare_data(cfg.data, roles.tokenizer, expect=("prompt",)).train, 0).take(2)
    batch = roles.rollout.generate(prompts)
    ref = roles.ref.logprobs(batch)["ref_logprobs"]
    actor = roles.actor.logprobs(batch)["old_logprobs"]
    base = Reference(
        model=load_causal_lm(dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, enabled=False)))
    ).logprobs(batch)["ref_logprobs"]
    mask = batch["response_mask"].bool()
    assert torch.allclose(ref[mask], base[mask], atol=1e-5)
    assert not torch.allclose(actor[mask], base[mask], atol=1e-3)
    assert any("lora" in n for n, _ in roles.actor.model.named_parameters())  # adapters still there


def test_nan_loss_stops_with_step_and_term(reviews_task, tmp_path, monkeypatch):
    """A NaN advantage makes the policy loss NaN: the run stops naming the RL step and the loss term, and the
    weights are not touched."""

    def nan_advantages(batch, ctx):
        adv = torch.zeros_like(batch["response_mask"], dtype=torch.float32)
        adv[0, 0] = float("nan")
        return {"advantages": adv}

    monkeypatch.setitem(ADVANTAGE_STEPS, "reinforce_pp", nan_advantages)
    cfg = rl_cfg(reviews_task, tmp_path, algo={"name": "reinforce_pp"}, kl={"coef": 0.0})
    with pytest.raises(NonFiniteError) as e:
        train_rl(cfg)
    assert "step 0" in str(e.value) and "'policy_loss'" in str(e.value)


def exploding_reward(prompts, responses, **_):
    """A user reward that fails on one kind of prompt (used through its dotted path below)."""
    for p in prompts:
        if len(p.split()) % 2 == 0:
            raise ValueError("cannot score an even-length prompt")
    return [0.0] * len(prompts)


def test_failing_reward_reports_the_row(reviews_task, tmp_path, capsys):
    """A reward function that raises stops the run with the function, the row and the row's prompt named; the
    CLI turns it into a one-line error with exit code 2."""
    cfg = rl_cfg(
        reviews_task,
        tmp_path,
        algo={"name": "reinforce_pp"},
        kl={"coef": 0.0},
        reward={"task": {}, "functions": {"tests.test_online_rl:exploding_reward": 1.0}},
        rollout={"prompts_per_step": 4, "n": 1},
    )
    with pytest.raises(RewardError) as e:
        train_rl(cfg)
    assert e.value.row is not None and len(e.value.prompt.split()) % 2 == 0
    assert f"row {e.value.row}" in str(e.value) and "exploding_reward" in str(e.value)
    from alignflow.cli import main

    code = main(
        [
            "rl",
            f"model.name_or_path={reviews_task.model_dir}",
            f"data.path={reviews_task.prompts_path}",
            f"model.tokenizer={reviews_task.tokenizer_dir}",
            "reward.functions={'tests.test_online_rl:exploding_reward': 1.0}",
            f"train.output_dir={tmp_path / 'cli'}",
            "train.max_steps=1",
            "rollout.prompts_per_step=4",
            "rollout.n=1",
            "train.batch_size=4",
            "kl.coef=0",
            "algo.name=reinforce_pp",
            "train.progress=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "exploding_reward" in err and "row" in err and "Traceback" not in err


def parity_reward(prompts, responses, **_):
    """Constant on prompts of even length (their groups carry no signal), the response's length parity otherwise."""
    return [0.0 if len(p) % 2 == 0 else float(len(r) % 2) for p, r in zip(prompts, responses, strict=False)]


def test_dynamic_sampling_keeps_informative_groups_and_refills(reviews_task, tmp_path):
    """DAPO dynamic sampling: the training batch holds exactly prompts_per_step groups, each with unequal rewards
    (so none from an even-length prompt), gathered over several generation rounds; when no group is informative
    the step is skipped and reported, not trained on."""
    cfg = rl_cfg(
        reviews_task,
        tmp_path,
        algo={"name": "dapo"},
        kl={"coef": 0.0},
        reward={"task": {}, "functions": {"tests.test_online_rl:parity_reward": 1.0}},
        rollout={"prompts_per_step": 6, "n": 4},
        dapo={"dynamic_sampling": True, "max_sample_rounds": 8},
    )
    roles = build_roles(cfg, resolve(cfg), torch.device("cpu"), 1)
    rows = prepare_data(cfg.data, roles.tokenizer, expect=("prompt",)).train
    st = online.RLState(PromptStream(rows, 0), make_kl_controller("fixed", 0.0))
    batch, m = online.collect_rollouts(roles, st, cfg, online._Tally())
    assert len(batch) == 6 * 4 and m["rollout/kept_groups"] == 6 and m["rollout/sample_rounds"] >= 2
    for g in set(batch["group"]):
        idx = [i for i, x in enumerate(batch["group"]) if x == g]
        assert len(idx) == 4 and len(set(batch["scores"][idx].tolist())) > 1
        assert len(batch["prompt"][idx[0]]) % 2 == 1
    cfg.reward.functions = {}
    cfg.reward.task = {"gold": 0.0}  # every reward is 0: no informative group anywhere
    cfg.dapo.max_sample_rounds = 2
    result = train_rl(cfg)
    assert result.history[0]["train/skipped_step"] == 1.0 and result.history[0]["rollout/kept_groups"] == 0


def test_local_group_is_a_pass_through_of_public_methods():
    class Role:
        def score(self, batch):
            return Batch({"scores": torch.ones(len(batch))})

        def _secret(self):
            return 1

    group = LocalGroup(Role())
    assert group.score(Batch(meta={"prompt": ["a", "b"]}))["scores"].tolist() == [1.0, 1.0]
    assert group.world_size == 1
    with pytest.raises(AttributeError, match="private"):
        group._secret()


@pytest.mark.parametrize("preset", RL_PRESETS)
def test_every_preset_runs_one_step(preset, reviews_task, arith_task, tmp_path):
    """Each configs/<algo>.yaml trains one step on a tiny model with finite metrics and its algorithm's extras."""
    task_name = load_config(RLConfig, ROOT / "configs" / f"{preset}.yaml").task.name
    task = arith_task if task_name == "arithmetic" else reviews_task
    group = 1 if preset in ("ppo", "remax", "reinforce_pp", "safe_ppo") else 2
    cfg = load_config(
        RLConfig,
        ROOT / "configs" / f"{preset}.yaml",
        [
            f"model.name_or_path={task.model_dir}",
            f"model.tokenizer={task.tokenizer_dir}",
            f"data.path={task.prompts_path}",
            f"data.eval_path={task.eval_prompts_path}",
            "rollout.prompts_per_step=2",
            f"rollout.n={group}",
            "rollout.max_new_tokens=6",
            "rollout.eval_prompts=2",
            f"train.output_dir={tmp_path}",
            "train.max_steps=1",
            "train.batch_size=2",
            "train.progress=false",
            "dapo.max_sample_rounds=2",
        ],
    )
    result = train_rl(cfg)
    (m,) = result.history
    extras = {
        "ppo": ["critic/value_loss", "critic/explained_var", "policy/kl"],
        "safe_ppo": ["safe/lambda", "cost_critic/value_loss", "rollout/cost_mean"],
        "remax": ["rollout/greedy_reward_mean"],
        "dapo": ["rollout/sample_rounds"],
        "grpo": ["policy/kl"],
        "rloo": ["policy/kl"],
    }.get(preset, [])
    for key in [
        "rollout/reward_mean",
        "rollout/response_len",
        "policy/entropy",
        "perf/tokens_per_s",
        "perf/gen_share",
    ] + extras:
        assert math.isfinite(m[key]), key
    if "train/skipped_step" not in m:
        assert math.isfinite(m["policy/policy_loss"])
    assert "eval/reward_mean" in result.eval and "eval/gold_reward" in result.eval
    assert (tmp_path / "model").is_dir()


def test_resume_reproduces_the_uninterrupted_run(reviews_task, tmp_path):
    """Two steps straight and one step + resume + one step give the same metrics and weights (RNG, prompt position,
    optimiser, critic and KL controller restored)."""

    def run(out, steps, resume=False):
        cfg = rl_cfg(
            reviews_task,
            out,
            algo={"name": "ppo"},
            kl={"coef": 0.1, "controller": "adaptive"},
            train={"max_steps": steps, "save_every": 1, "resume": resume},
        )
        return train_rl(cfg)

    straight = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    resumed = run(tmp_path / "b", 2, resume=True)
    assert len(resumed.history) == 1
    for k in ("rollout/reward_mean", "policy/policy_loss", "critic/value_loss", "policy/kl_coef"):
        assert resumed.history[0][k] == pytest.approx(straight.history[1][k], rel=1e-5, abs=1e-7), k
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=False):
        assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------------------------- small pieces
def test_truncated_is_weights_hand_values():
    """w = min(exp(lp_old − lp_sampling), C): log-ratios (0, ln 1.5, ln 4) with C = 2 give (1, 1.5, 2); masked 0."""
    old = torch.tensor([[0.0, math.log(1.5), math.log(4.0), 5.0]])
    samp = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    assert torch.allclose(truncated_is_weights(old, samp, mask, 2.0), torch.tensor([[1.0, 1.5, 2.0, 0.0]]))


def test_explained_variance_hand_values():
    """G = (1, 2, 3, 4): V = G gives 1; V = mean(G) gives 0; V = G − (1, −1, 1, −1) gives 1 − (4/3)/(5/3) = 0.2."""
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(g, g, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(g, 2.5), g, mask) == pytest.approx(0.0)
    assert explained_variance(g - torch.tensor([[1.0, -1.0, 1.0, -1.0]]), g, mask) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"algo": {"name": "rloo"}, "rollout": {"n": 1, "prompts_per_step": 4}}, "rollout.n"),
        ({"algo": {"name": "grpo", "advantage": "gae"}}, "algo.advantage=gae"),
        ({"algo": {"name": "ppo", "advantage": "grpo"}}, "algo.advantage must be gae"),
        ({"train": {"packing": True}}, "train.packing"),
        ({"algo": {"name": "grpo", "dual_clip": 0.5}}, "algo.dual_clip"),
    ],
)
def test_bad_combinations_fail_with_the_key(reviews_task, tmp_path, overrides, needle):
    cfg = rl_cfg(reviews_task, tmp_path, **overrides)
    with pytest.raises(ConfigError) as e:
        resolve(cfg)
    assert needle in str(e.value)


def test_unknown_task_reward_names_the_valid_ones(reviews_task, tmp_path):
    cfg = rl_cfg(reviews_task, tmp_path, reward={"task": {"accuracy": 1.0}})
    with pytest.raises(ConfigError) as e:
        train_rl(cfg)
    assert "reward.task" in str(e.value) and "gold" in str(e.value)


def test_cat_rollouts_left_aligns_prompts():
    """Batches with prompt widths 2 and 3 concatenate so that every row's prompt ends at the same column."""

    def rollout(prompt, resp):
        p = torch.tensor([prompt])
        r = torch.tensor([resp])
        return Batch(
            {
                "prompt_ids": p,
                "prompt_mask": (p > 0).long(),
                "response_ids": r,
                "response_mask": torch.ones_like(r),
                "input_ids": torch.cat([p, r], 1),
                "attention_mask": torch.cat([(p > 0).long(), torch.ones_like(r)], 1),
                "position_ids": torch.arange(p.shape[1] + r.shape[1])[None],
            },
            {"prompt": ["x"]},
        )

    out = cat_rollouts([rollout([5, 6], [7]), rollout([4, 5, 6], [7, 8])])
    assert out["input_ids"].tolist() == [[0, 5, 6, 7, 0], [4, 5, 6, 7, 8]]
    assert out["prompt_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert out["response_mask"].tolist() == [[1, 0], [1, 1]]


def test_rl_is_a_cli_command_with_help(capsys):
    from alignflow.cli import main

    assert main(["rl", "--help"]) == 0
    out = capsys.readouterr().out
    assert "algo.name" in out and "kl.placement" in out and "rollout.n" in out and "dapo.dynamic_sampling" in out


def test_padding_free_rl_forward_matches_padded(monkeypatch):
    """The actor's and critic's padding-free micro-batch forward (real tokens only, per-sequence attention) gives
    the padded forward's response log-probs, entropies and values: rows with left-padded prompts of 1..6 tokens
    and right-padded responses of 1..7 tokens, GQA llama, temperature 0.7."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    from alignflow.trainers import roles

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        attn_implementation="sdpa",
    )
    actor, critic = LlamaForCausalLM(cfg), LlamaForTokenClassification(LlamaConfig(**cfg.to_dict(), num_labels=1))
    B, Tp, Tr = 5, 6, 7
    pm, rm = torch.zeros(B, Tp, dtype=torch.long), torch.zeros(B, Tr, dtype=torch.long)
    for i, (p, r) in enumerate([(6, 7), (2, 3), (4, 1), (1, 7), (3, 5)]):
        pm[i, Tp - p :], rm[i, :r] = 1, 1
    att = torch.cat([pm, rm], 1)
    mb = Batch(
        {
            "input_ids": torch.randint(1, 50, (B, Tp + Tr)) * att,
            "attention_mask": att,
            "position_ids": (att.cumsum(-1) - 1).clamp(min=0),
            "response_mask": rm,
            "prompt_mask": pm,
        }
    )
    assert roles.supports_varlen(actor)
    flat = roles.response_logprobs(actor, mb, Tp, 0.7, True) + (roles.response_values(critic, mb, Tp),)
    monkeypatch.setattr(roles, "supports_varlen", lambda model: False)
    padded = roles.response_logprobs(actor, mb, Tp, 0.7, True) + (roles.response_values(critic, mb, Tp),)
    for a, b in zip(flat, padded, strict=False):
        torch.testing.assert_close(a[rm.bool()], b[rm.bool()], atol=1e-5, rtol=1e-5)


def test_single_update_reuses_the_sampling_logprobs(reviews_task, tmp_path, monkeypatch):
    """algo.old_logprobs=auto with one update per rollout batch skips the actor's old-log-prob pass, and the
    updated weights equal those of the run that recomputes lp_old (the PPO ratio is 1 at the single update either
    way: its gradient is A·∇lp). With two PPO epochs, auto recomputes."""
    calls = []
    original = Actor.logprobs
    monkeypatch.setattr(Actor, "logprobs", lambda self, batch: calls.append(len(batch)) or original(self, batch))
    weights, entropies = [], []
    for mode in ("auto", "recompute"):
        cfg = rl_cfg(
            reviews_task,
            tmp_path / mode,
            algo={"name": "grpo", "old_logprobs": mode},
            kl={"coef": 0.0},
            rollout={"prompts_per_step": 2, "n": 4, "max_new_tokens": 6},
        )
        result = train_rl(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=8)))
        weights.append([p.detach().clone() for p in result.model.parameters()])
        entropies.append(result.history[0]["policy/entropy"])
    assert calls == [8]  # only the recompute run ran the extra pass
    assert entropies[0] == pytest.approx(entropies[1], rel=1e-4)  # measured in the update pass instead
    for a, b in zip(*weights, strict=False):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    calls.clear()
    cfg = rl_cfg(reviews_task, tmp_path / "epochs", algo={"name": "grpo", "ppo_epochs": 2}, kl={"coef": 0.0})
    train_rl(cfg)
    assert calls == [4]
