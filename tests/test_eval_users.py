"""``alignflow eval`` with a personalised policy (docs/eval.md, "Per-user evaluation"): each row's user's soft prompt,
each user's gold reward, the reference and reward model on their own prompts, and the refusals of ``users``."""

import json

import pytest
import torch

from alignflow.config import ConfigError, EvalConfig, ModelConfig
from alignflow.eval.evaluate import run_eval
from alignflow.eval.users import per_user_means, with_prompts
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.models.logprobs import token_logprobs
from alignflow.models.user_embeddings import attach_user_embeddings, load_user_embeddings, saved_plain, user_prompt
from alignflow.rollout.sample import sample_batch
from alignflow.tasks import users as task_users
from tests.test_eval import TINY, eval_cfg

USERS = list(task_users.USERS)  # fan, critic, stickler


@pytest.fixture(scope="module")
def p_dpo_dir(reviews_task, tmp_path_factory):
    """The task's tiny model with user embeddings (K = 1) whose offsets are far apart (seeded normal x 3), saved as
    alignflow po saves a P-DPO model: the model's files plus user_embeddings.safetensors."""
    out = tmp_path_factory.mktemp("p-dpo") / "model"
    model = load_causal_lm(ModelConfig(name_or_path=str(reviews_task.model_dir)), "cpu")
    emb = attach_user_embeddings(model, USERS, k=1)
    with torch.no_grad():
        emb.offsets.copy_(3.0 * torch.randn(emb.offsets.shape, generator=torch.Generator().manual_seed(0)))
    with saved_plain(model, out):
        model.save_pretrained(out)
    load_tokenizer(str(reviews_task.tokenizer_dir)).save_pretrained(out)
    return out


def _cfg(reviews_task, out, **kw) -> EvalConfig:
    """test_eval's config with 6 prompts and the task sizes of tests.helpers.tiny_task (its users' files)."""
    task = {"name": "reviews", "num_sft": 400, "num_pairs": 300, **TINY}
    return eval_cfg(reviews_task, out, **({"num_prompts": 6, "task": task} | kw))


def _samples(out) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_per_user_means_by_hand():
    """users a, b, a, None with values 1, 2, 3, 9: a -> (1 + 3) / 2 = 2, b -> 2; the row without a user is left out."""
    assert per_user_means("k", ["a", "b", "a", None], [1.0, 2.0, 3.0, 9.0]) == {"k/a": 2.0, "k/b": 2.0}


def test_users_eval_samples_after_each_users_soft_prompt_scored_by_their_gold(reviews_task, p_dpo_dir, tmp_path):
    """users: true -> the held-out user prompts (tags removed; users take turns), each sampled after its user's soft
    prompt: the samples equal a direct sample_batch of the same call (same seed) token for token, differ from the
    same prompts after another user's soft prompt, and eval/gold_reward/<user> is the mean of row_user_gold over
    that user's samples (eval/gold_reward over all of them). samples.jsonl rows keep their user."""
    out = tmp_path / "eval"
    m = run_eval(_cfg(reviews_task, out, policy=str(p_dpo_dir), users=True))
    rows = _samples(out)
    assert [r["user"] for r in rows] == [USERS[i % 3] for i in range(6)]
    assert all(r["prompt"].startswith("Review") for r in rows)  # no user tag in the text

    tok = load_tokenizer(str(p_dpo_dir))
    model = load_causal_lm(ModelConfig(name_or_path=str(p_dpo_dir)), "cpu")
    load_user_embeddings(model, p_dpo_dir)
    ids = [tok(r["prompt"])["input_ids"] for r in rows]

    def direct(users):
        prompts = [user_prompt(model, p, u, tok.bos_token_id) for p, u in zip(ids, users, strict=True)]
        return sample_batch(model, tok, prompts, 2, 8, 1.0, 0)["response"]

    assert [s for r in rows for s in r["samples"]] == direct([r["user"] for r in rows])
    assert direct(USERS[1:] + USERS[:1] + USERS[1:] + USERS[:1]) != direct([r["user"] for r in rows])

    flat = [(r["prompt"], s, r["user"]) for r in rows for s in r["samples"]]
    gold = task_users.row_user_gold(*map(list, zip(*flat, strict=True)))
    assert [g for r in rows for g in r["gold_reward"]] == pytest.approx(gold)
    for u in USERS:
        mine = [g for g, (_, _, who) in zip(gold, flat, strict=True) if who == u]
        assert m[f"eval/gold_reward/{u}"] == pytest.approx(sum(mine) / len(mine))
    assert m["eval/gold_reward"] == pytest.approx(sum(gold) / len(gold))


def test_reference_without_user_embeddings_scores_the_plain_prompt(reviews_task, p_dpo_dir, tmp_path):
    """A frontier entry and a reference with the same embeddings (one directory) get the same soft prompts: eval/kl
    = 0 exactly (the frontier loads its entries' embeddings). A reference without them gets the plain prompt:
    sample 0's kl is Σ_t log π(y_t | soft_u, x, y_<t) − Σ_t log π_ref(y_t | x, y_<t), both from a direct forward of
    one unpadded row."""
    dpo = str(p_dpo_dir)
    run_eval(_cfg(reviews_task, tmp_path / "a", users=True, reference=dpo, frontier=[dpo]))
    point = json.loads((tmp_path / "a" / "frontier.json").read_text())["points"][0]
    assert point["kl"] == 0.0 and point["metrics"]["eval/kl_k3"] == 0.0
    assert {f"eval/gold_reward/{u}" for u in USERS} <= set(point["metrics"])

    run_eval(
        _cfg(reviews_task, tmp_path / "b", policy=str(p_dpo_dir), users=True, reference=str(reviews_task.model_dir))
    )
    rows = _samples(tmp_path / "b")
    tok = load_tokenizer(str(p_dpo_dir))
    policy = load_causal_lm(ModelConfig(name_or_path=str(p_dpo_dir)), "cpu")
    load_user_embeddings(policy, p_dpo_dir)
    ref = load_causal_lm(ModelConfig(name_or_path=str(reviews_task.model_dir)), "cpu")
    prompts = [user_prompt(policy, tok(r["prompt"])["input_ids"], r["user"], tok.bos_token_id) for r in rows]
    batch = sample_batch(policy, tok, prompts, 2, 8, 1.0, 0)  # eval's sampling call: same prompts, same seed
    resp = batch["response_ids"][0][batch["response_mask"][0].bool()].tolist()
    plain, soft = tok(rows[0]["prompt"])["input_ids"], prompts[0]

    def summed(model, prompt):
        with torch.no_grad():
            labels = torch.tensor([[-100] * len(prompt) + resp])  # soft-prompt ids are no LM-head class
            lp = token_logprobs(model, torch.tensor([prompt + resp]), labels=labels)[0][0]  # (T,)
        return float(lp[len(prompt) :].sum())

    assert rows[0]["kl"][0] == pytest.approx(summed(policy, soft) - summed(ref, plain), abs=1e-4)


def test_with_prompts_relays_the_batch_by_hand():
    """Prompts [[1, 9, 2], [3]] with responses [[4, 5], [6, pad]] -> prompts [[1, 2], [3]] left-padded to 2:
    ids [[1, 2], [0, 3]], mask [[1, 1], [0, 1]]; attention [[1, 1, 1, 1], [0, 1, 1, 0]]; positions cumsum − 1, 0 on
    padding: [[0, 1, 2, 3], [0, 0, 1, 0]]; the response tensors are unchanged."""
    from alignflow.batch import Batch

    batch = Batch(
        {
            "prompt_ids": torch.tensor([[1, 9, 2], [0, 0, 3]]),
            "prompt_mask": torch.tensor([[1, 1, 1], [0, 0, 1]]),
            "response_ids": torch.tensor([[4, 5], [6, 0]]),
            "response_mask": torch.tensor([[1, 1], [1, 0]]),
        }
    )
    new = with_prompts(batch, [[1, 2], [3]], pad_id=0)
    assert new["prompt_ids"].tolist() == [[1, 2], [0, 3]]
    assert new["input_ids"].tolist() == [[1, 2, 4, 5], [0, 3, 6, 0]]
    assert new["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]]
    assert new["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 0]]
    assert torch.equal(new["response_ids"], batch["response_ids"])


def test_rows_without_user_get_the_generic_soft_prompt(reviews_task, p_dpo_dir, tmp_path):
    """users off, the task's plain held-out prompts: a policy with user embeddings samples after the generic soft
    prompt (user None), and no per-user metric is written."""
    out = tmp_path / "eval"
    m = run_eval(_cfg(reviews_task, out, policy=str(p_dpo_dir), num_prompts=3))
    rows = _samples(out)
    tok = load_tokenizer(str(p_dpo_dir))
    model = load_causal_lm(ModelConfig(name_or_path=str(p_dpo_dir)), "cpu")
    load_user_embeddings(model, p_dpo_dir)
    prompts = [user_prompt(model, tok(r["prompt"])["input_ids"], None, tok.bos_token_id) for r in rows]
    assert [s for r in rows for s in r["samples"]] == sample_batch(model, tok, prompts, 2, 8, 1.0, 0)["response"]
    assert "user" not in rows[0] and not [k for k in m if k.startswith("eval/gold_reward/")]


def test_users_refusals_name_the_key(reviews_task, p_dpo_dir, tmp_path):
    plain = str(reviews_task.model_dir)
    with pytest.raises(
        ConfigError, match=r"^users: true .*task.name='arithmetic' has no users \(tasks with users: reviews\)"
    ):
        run_eval(_cfg(reviews_task, tmp_path, policy=str(p_dpo_dir), users=True, task={"name": "arithmetic"}))
    with pytest.raises(ConfigError, match=r"^users: true: policy: .* has no user_embeddings.safetensors"):
        run_eval(_cfg(reviews_task, tmp_path, policy=plain, users=True))
    with pytest.raises(ConfigError, match=r"^users: true: frontier \(.*\): .* has no user_embeddings.safetensors"):
        run_eval(_cfg(reviews_task, tmp_path, users=True, reference=plain, frontier=[str(p_dpo_dir), plain]))
    with pytest.raises(ConfigError, match=r"^users: true .*leave data.path empty"):
        run_eval(_cfg(reviews_task, tmp_path, policy=str(p_dpo_dir), users=True, data={"path": "x.jsonl"}))
    with pytest.raises(ConfigError, match=r"^users: true evaluates policies per user"):
        run_eval(_cfg(reviews_task, tmp_path, users=True, reward_model=plain))


def test_reward_model_scores_the_plain_prompt_and_response(reviews_task, p_dpo_dir, tmp_path):
    """A reward model has no soft prompts: each sample's rm_score is its score of the plain prompt ids + the sampled
    response ids (one unpadded sequence through alignflow.models.sequences.score), not of the soft-prompted row."""
    from alignflow.models import load_reward_model
    from alignflow.models.sequences import score

    rm_dir = tmp_path / "rm"
    tok = load_tokenizer(str(p_dpo_dir))
    rm = load_reward_model(
        ModelConfig(name_or_path=str(reviews_task.model_dir)), 1, "cpu", seed=0, pad_token_id=tok.pad_token_id
    )
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    out = tmp_path / "eval"
    run_eval(_cfg(reviews_task, out, policy=str(p_dpo_dir), users=True, reward_model=str(rm_dir), num_prompts=3))
    rows = _samples(out)
    policy = load_causal_lm(ModelConfig(name_or_path=str(p_dpo_dir)), "cpu")
    load_user_embeddings(policy, p_dpo_dir)
    plain = [tok(r["prompt"])["input_ids"] for r in rows]
    soft = [user_prompt(policy, p, r["user"], tok.bos_token_id) for p, r in zip(plain, rows, strict=True)]
    batch = sample_batch(policy, tok, soft, 2, 8, 1.0, 0)
    resp = [ids[m.bool()].tolist() for ids, m in zip(batch["response_ids"], batch["response_mask"], strict=True)]
    seqs = [plain[i // 2] + r for i, r in enumerate(resp)]
    want = score(rm, seqs, tok.pad_token_id, "cpu")[:, 0].tolist()
    assert [s for r in rows for s in r["rm_score"]] == pytest.approx(want, abs=1e-5)
