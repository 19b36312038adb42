"""VPL as a reward source of alignflow rl (reward.vpl; docs/vpl.md): the scores are a direct VPL forward with each
user's latent from the first context pairs of that user, split into one part per user; bad rows stop with a line."""

import pytest
import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, VPLRewardConfig
from alignflow.rewards import CompositeReward, RewardError
from alignflow.rewards.vpl import vpl_parts
from alignflow.tasks import users
from alignflow.tasks.common import read_jsonl
from alignflow.trainers.vpl import build_vpl_reward, load_vpl, train_vpl
from tests.helpers import vpl_config


@pytest.fixture(scope="module")
def vpl_run(reviews_task, tmp_path_factory):
    """A VPL model on the task's attribute ratings (latent 8, 4 context pairs), 60 steps."""
    out = tmp_path_factory.mktemp("vpl-rl") / "vpl"
    cfg = vpl_config(reviews_task, out, "train.max_steps=60", "vpl.embedding=task_ratings")
    train_vpl(cfg)
    return out


def _rollout(reviews_task, n: int = 9) -> Batch:
    rows = read_jsonl(reviews_task.dir / "user_prompts.jsonl")[:n]
    responses = [" was truly wonderful .", " felt dull and clumsy .", " was stylish ."] * (n // 3)
    return Batch(meta={"prompt": [r["prompt"] for r in rows], "response": responses, "user": [r["user"] for r in rows]})


def test_vpl_reward_is_a_direct_vpl_forward_split_by_user(vpl_run, reviews_task):
    """Row i of user u scores r(e_i, mu(C_u)), C_u = u's first 4 pairs in the training file, e = the task's four
    ratings of the review (tags before the prompt are not part of it); the parts vpl_<user> add up to it and each
    is 0 on the other users' rows."""
    scorer = build_vpl_reward(VPLRewardConfig(model=str(vpl_run)), "cpu")
    model, meta = load_vpl(vpl_run)
    assert meta["context_pairs"] == 4 and sorted(scorer.latents) == sorted(users.USERS)
    pairs = read_jsonl(reviews_task.dir / "user_pairs.jsonl")
    batch = _rollout(reviews_task)
    expected = []
    with torch.no_grad():
        for p, r, u in zip(batch.meta["prompt"], batch.meta["response"], batch.meta["user"], strict=True):
            ctx = [x for x in pairs if x["user"] == u][:4]
            e_w = torch.tensor(users.rating_features([x["prompt"] for x in ctx], [x["chosen"] for x in ctx]))
            e_l = torch.tensor(users.rating_features([x["prompt"] for x in ctx], [x["rejected"] for x in ctx]))
            mu, _ = model.posterior(torch.cat([e_w, e_l], -1).unsqueeze(0))
            expected.append(float(model.reward(torch.tensor(users.rating_features([p], [r])), mu)[0]))
    parts = vpl_parts(scorer, 2.0)
    assert [name for name, _, _ in parts] == ["vpl_critic", "vpl_fan", "vpl_stickler"]
    values = CompositeReward(parts).components(batch)
    total = sum(values.values())
    assert torch.allclose(total, torch.tensor(expected), atol=1e-6, rtol=0)  # batched vs one-row matmuls: rounding
    fan_rows = [u == "fan" for u in batch.meta["user"]]
    assert all(float(v) == 0.0 for v, f in zip(values["vpl_critic"], fan_rows, strict=True) if f)
    assert float(CompositeReward(parts)(batch).sum()) == pytest.approx(2.0 * sum(expected), abs=1e-5)
    # the critic and the fan disagree on a glowing review (z differs; same e)
    glowing = [users.tag_prompt("Review : the plot", u) for u in ("fan", "critic")]
    fan, critic = scorer.score(glowing, [" was truly wonderful ."] * 2, ["fan", "critic"]).tolist()
    assert fan > critic


def test_vpl_reward_errors_are_one_line(vpl_run, reviews_task, tmp_path):
    scorer = build_vpl_reward(VPLRewardConfig(model=str(vpl_run)), "cpu")
    part = vpl_parts(scorer, 1.0)[0][1]
    batch = _rollout(reviews_task, 3)
    with pytest.raises(RewardError, match=r"row 1: field 'user' = 'bob' has no context pairs; the context holds"):
        part(Batch(meta=batch.meta | {"user": ["fan", "bob", "critic"]}))
    with pytest.raises(RewardError, match=r"no field 'user'"):
        part(Batch(meta={k: v for k, v in batch.meta.items() if k != "user"}))
    with pytest.raises(ConfigError, match=r"reward.vpl.model=.*: no vpl.json"):
        build_vpl_reward(VPLRewardConfig(model=str(tmp_path)), "cpu")


def test_user_prompt_files_and_row_user_gold(reviews_task):
    """The task's prompts after their user's tag, users taking turns; row_user_gold scores each row for its own
    user (fan: the task's gold; critic: the sentiment term's sign flipped)."""
    plain = [r["prompt"] for r in read_jsonl(reviews_task.prompts_path)]
    rows = read_jsonl(reviews_task.dir / "user_prompts.jsonl")
    assert [r["user"] for r in rows[:4]] == ["fan", "critic", "stickler", "fan"]
    assert [r["prompt"] for r in rows[:2]] == [users.tag_prompt(plain[0], "fan"), users.tag_prompt(plain[1], "critic")]
    prompts, responses = [rows[0]["prompt"], rows[1]["prompt"]], [" was truly wonderful ."] * 2
    got = users.row_user_gold(prompts, responses, user=["fan", "critic"])
    assert got == [
        users.user_gold("fan", prompts[:1], responses[:1])[0],
        users.user_gold("critic", prompts[1:], responses[1:])[0],
    ]
    assert got[0] > 0 > got[1]
