"""Reward models with their own tokenizer: the texts are re-rendered with the reward model's tokenizer and chat
template; heterogeneous ensembles (policy tokenizer + foreign tokenizer) score each member on its own input."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignflow.batch import Batch
from alignflow.models import load_tokenizer, sequence_scores
from alignflow.rewards import RewardModelScorer
from alignflow.rewards.foreign import same_tokenizer
from alignflow.tasks.common import CHAT_TEMPLATE, build_tokenizer
from alignflow.tasks.reviews import VOCAB

WORDS = [w for w in VOCAB if w.isalpha()]
PROMPTS = [" ".join(WORDS[0:4]), " ".join(WORDS[10:13]), " ".join(WORDS[20:26])]
RESPONSES = [" ".join(WORDS[30:33]), " ".join(WORDS[40:45]), " ".join(WORDS[50:51])]
# Another layout of the same markers: no BOS, the role marker after the content.
OTHER_TEMPLATE = CHAT_TEMPLATE.replace("{{ bos_token }}", "").replace(
    "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> ", "{{ m['content'] }} <|{{ m['role'] }}|> <|end|> "
)


def tiny_rm(vocab: int, pad: int, seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=pad,
    )
    return LlamaForSequenceClassification(cfg).eval()


def policy_batch(tok, prompts=PROMPTS, responses=RESPONSES) -> Batch:
    """A rollout-like batch: policy prompt ids (with BOS), response ids ending in EOS, and the decoded texts."""
    p = [tok(x).input_ids for x in prompts]
    r = [tok(x, add_special_tokens=False).input_ids + [tok.eos_token_id] for x in responses]
    tp, tr = max(map(len, p)), max(map(len, r))
    pad = tok.pad_token_id
    t = {
        "prompt_ids": torch.tensor([[pad] * (tp - len(x)) + x for x in p]),
        "prompt_mask": torch.tensor([[0] * (tp - len(x)) + [1] * len(x) for x in p]),
        "response_ids": torch.tensor([x + [pad] * (tr - len(x)) for x in r]),
        "response_mask": torch.tensor([[1] * len(x) + [0] * (tr - len(x)) for x in r]),
    }
    texts = tok.batch_decode([x for x in r], skip_special_tokens=True)
    return Batch(t, {"prompt": list(prompts), "response": texts})


def alone(model, ids) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        return sequence_scores(model, x, torch.ones_like(x))[0, 0].item()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The policy tokenizer (reviews vocabulary), a foreign one (the words in reverse order: every word gets
    another id), a reward model P on the policy vocabulary and F = P with its embedding rows permuted to the
    foreign ids -- the same function of the TEXT, so F on re-rendered text must score exactly like P."""
    root = tmp_path_factory.mktemp("foreign")
    policy = build_tokenizer(VOCAB)
    foreign = build_tokenizer(tuple(reversed(VOCAB)))
    p_model = tiny_rm(len(policy), policy.pad_token_id)
    f_model = tiny_rm(len(foreign), foreign.pad_token_id)
    f_model.load_state_dict(p_model.state_dict())
    perm = torch.tensor([policy.convert_tokens_to_ids(foreign.convert_ids_to_tokens(i)) for i in range(len(foreign))])
    with torch.no_grad():
        f_model.get_input_embeddings().weight.copy_(p_model.get_input_embeddings().weight[perm])
    for name, m, t in (("p", p_model, policy), ("f", f_model, foreign)):
        m.save_pretrained(root / name)
        t.save_pretrained(root / name)
    return {"root": root, "policy": policy, "foreign": foreign, "p": p_model, "f": f_model}


def test_ids_differ_between_the_two_tokenizers(setup):
    policy, foreign = setup["policy"], setup["foreign"]
    assert policy(PROMPTS[0]).input_ids != foreign(PROMPTS[0]).input_ids
    assert not same_tokenizer(policy, foreign)
    assert same_tokenizer(policy, load_tokenizer(str(setup["root"] / "p")))


def test_heterogeneous_ensemble_scores_each_member_on_its_own_tokens(setup):
    """Members [P (policy tokenizer), F (foreign)]: P reads the policy ids, F the texts re-rendered with its own
    tokenizer. F is P up to the vocabulary permutation, so both columns are equal and the ensemble's
    disagreement (member_std) is 0. Scoring the policy ids with F directly (the old behaviour) gives other
    scores, so the re-rendering is what makes them equal."""
    root, batch = setup["root"], policy_batch(setup["policy"])
    scorer = RewardModelScorer([str(root / "p"), str(root / "f")], tokenizer=setup["policy"])
    assert scorer.foreign == [False, True]
    members = scorer.member_scores(batch)  # (3, 2)
    assert torch.allclose(members[:, 0], members[:, 1], atol=1e-5)
    expected = [
        alone(
            setup["p"],
            setup["policy"](p).input_ids
            + setup["policy"](r, add_special_tokens=False).input_ids
            + [setup["policy"].eos_token_id],
        )
        for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ]
    assert members[:, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert scorer.score(batch)[1]["rollout/reward_model_member_std"] == pytest.approx(0.0, abs=1e-5)
    naive = [
        alone(setup["f"], s)
        for s in (
            batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
            + batch["response_ids"][i][batch["response_mask"][i].bool()].tolist()
            for i in range(3)
        )
    ]
    assert max(abs(a - b) for a, b in zip(naive, expected, strict=True)) > 1e-3


def test_a_different_chat_template_alone_makes_a_member_foreign(setup, tmp_path):
    """Same vocabulary, another chat template: conversational prompts are rendered with the reward model's
    template (prompt messages + the response as the assistant's message), not the policy's."""
    policy = setup["policy"]
    other = build_tokenizer(VOCAB)
    other.chat_template = OTHER_TEMPLATE
    setup["p"].save_pretrained(tmp_path / "rm")
    other.save_pretrained(tmp_path / "rm")
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    p_ids = [policy.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in chats]
    p_ids = [list(x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x) for x in p_ids]
    batch = policy_batch(policy)
    batch.meta["prompt"] = chats
    scorer = RewardModelScorer(str(tmp_path / "rm"), tokenizer=policy)
    assert scorer.foreign == [True]
    got = scorer.member_scores(batch)[:, 0].tolist()
    want = []
    for c, r in zip(chats, batch["response"], strict=True):
        ids = other.apply_chat_template(c + [{"role": "assistant", "content": r}], tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert ids[0] != policy.bos_token_id  # the other template has no BOS: really its rendering
        want.append(alone(setup["p"], ids))
    assert got == pytest.approx(want, abs=1e-5)


def test_texts_only_batch_and_errors(setup):
    """A batch with texts and no token ids (what `alignflow serve` scores) uses every member's own tokenizer;
    a foreign member without texts is an error naming what is missing."""
    root = setup["root"]
    scorer = RewardModelScorer([str(root / "p"), str(root / "f")])  # policy tokenizer unknown
    texts = Batch(meta={"prompt": PROMPTS, "response": RESPONSES})
    members = scorer.member_scores(texts)
    assert torch.allclose(members[:, 0], members[:, 1], atol=1e-5)
    tokens_only = policy_batch(setup["policy"])
    del tokens_only.meta["response"]
    with pytest.raises(KeyError, match="re-renders the texts.*no meta response"):
        RewardModelScorer(str(root / "f"), tokenizer=setup["policy"]).member_scores(tokens_only)


def test_rl_reward_sources_pass_the_policy_tokenizer(setup, tmp_path):
    """build_sources (the RL trainers' reward wiring) gives the scorer the policy's tokenizer from
    model.tokenizer, so a foreign member in reward.models re-renders: the two members score alike."""
    from alignflow.config import RLConfig, from_dict
    from alignflow.trainers.rl_setup import build_sources

    root = setup["root"]
    setup["policy"].save_pretrained(tmp_path / "policy-tok")
    cfg = from_dict(
        RLConfig,
        {
            "model": {"name_or_path": str(root / "p"), "tokenizer": str(tmp_path / "policy-tok")},
            "reward": {"models": [str(root / "p"), str(root / "f")]},
        },
    )
    composite = build_sources(cfg.reward, "reward", "reviews", cfg, "cpu", setup["policy"].pad_token_id)
    scorer = composite.parts[0][1]
    assert scorer.foreign == [False, True]
    members = scorer.member_scores(policy_batch(setup["policy"]))
    assert torch.allclose(members[:, 0], members[:, 1], atol=1e-5)
