"""The probability verdict of a pairwise LLM judge (reward.judge.verdict: logprob, docs/judges.md) and the
direct-verdict judge rows of the reviews task."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignflow.batch import Batch
from alignflow.config import ConfigError, JudgeConfig
from alignflow.rewards.judge import JudgeReward, LocalJudge, build_judge, continuation_logprobs
from alignflow.tasks.common import build_tokenizer

WORDS = ("overall", "this", "that", "good", "bad")


def bigram_model(tok, logits: dict):
    """A tiny Llama whose next-token logits depend on the current token only: attention and MLP outputs are
    zeroed, so the last hidden state is the current token's one-hot embedding scaled by the final RMS norm
    (x / rms(x) = 4 e_k in 16 dimensions), and the untied head holds ``logits[current][next] / 4`` (0 for every pair
    not given), so the logits are exactly ``logits[current][next]``."""
    v = len(tok)
    cfg = LlamaConfig(
        vocab_size=v,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rms_norm_eps=1e-12,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(v, 16))
        head = torch.zeros(v, 16)
        for cur, nxt in logits.items():
            for word, value in nxt.items():
                head[tok.convert_tokens_to_ids(word), tok.convert_tokens_to_ids(cur)] = value / 4.0
        model.lm_head.weight.copy_(head)
    return model


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_continuation_logprobs_sums_the_tokens_after_start_and_ignores_padding():
    """Logits 0 everywhere but ``good -> bad`` = ln 4 in a vocabulary of V = 13 tokens: after ``good``,
    p(bad) = 4 / (V - 1 + 4) = 4/16, every other token 1/16; after any other token each is 1/V.
    [bos, good, bad, this] from 2: log(4/16) + log(1/13); from 3: log(1/13); from 0 (nothing predicts the first
    token) = from 1: log(1/13) + log(4/16) + log(1/13); the short sequence [bos, this] (padded): log(1/13)."""
    tok = build_tokenizer(WORDS)
    assert len(tok) == 13
    model = bigram_model(tok, {"good": {"bad": math.log(4.0)}})
    bos, good, bad, this = tok.bos_token_id, *tok.convert_tokens_to_ids(["good", "bad", "this"])
    seq = [bos, good, bad, this]
    got = continuation_logprobs(model, [seq, seq, seq, [bos, this]], [2, 3, 0, 1], tok.pad_token_id)
    a, b = math.log(4 / 16), math.log(1 / 13)
    assert got.tolist() == pytest.approx([a + b, b, b + a + b, b], abs=1e-5)


def test_local_judge_verdict_probs_is_the_renormalised_verdict_probability():
    """After ``good`` the head gives ``this`` 1 and ``that`` -1, after ``bad`` the reverse; after ``overall``
    ``this`` 3 and ``that`` 0. One-token verdicts: p = σ(l_this - l_that) = σ(2) after a question ending in good,
    σ(-2) after bad (questions of different lengths in one padded batch). Two-token verdicts
    ``overall this`` / ``overall that``: log p(overall | last) is shared and cancels, p = σ(3 - 0) for any
    question."""
    tok = build_tokenizer(WORDS)
    model = bigram_model(
        tok, {"good": {"this": 1.0, "that": -1.0}, "bad": {"this": -1.0, "that": 1.0}, "overall": {"this": 3.0}}
    )
    judge = LocalJudge(model, tok, max_new_tokens=4, chat=False)
    got = judge.verdict_probs(["good", "bad good bad", "this good"], [" this", " that"])
    assert got == pytest.approx([sigmoid(2), sigmoid(-2), sigmoid(2)], abs=1e-5)
    got = judge.verdict_probs(["good", "bad bad"], [" overall this", " overall that"])
    assert got == pytest.approx([sigmoid(3), sigmoid(3)], abs=1e-5)
    with pytest.raises(ValueError, match="two continuations with different tokens"):
        judge.verdict_probs(["good"], [" this", " this"])


class OrderedBackend:
    """p(first wins) = 0.9 when the first response is 'good', else 0.3: a position-biased judge."""

    def __init__(self):
        self.asked = 0

    def verdict_probs(self, questions, continuations):
        self.asked += len(questions)
        return [0.9 if q.split("|")[0] == "good" else 0.3 for q in questions]


def test_logprob_verdict_averages_both_orders_and_is_cached():
    """Response good vs anchor bad: ½ (0.9 + (1 - 0.3)) = 0.8; bad vs good: ½ (0.3 + (1 - 0.9)) = 0.2 (the
    two sum to 1: position bias cancels). No parse failures; a second call asks nothing."""
    backend = OrderedBackend()
    judge = JudgeReward(backend, "pairwise", question="{a}|{b}", verdict="logprob", verdict_words=("A", "B"))
    batch = Batch(meta={"prompt": ["p", "p"], "response": ["good", "bad"], "reference": ["bad", "good"]})
    out, m = judge.score(batch)
    assert out.tolist() == pytest.approx([0.8, 0.2]) and m["rollout/judge_parse_failures"] == 0.0
    assert backend.asked == 4
    judge.score(batch)
    assert backend.asked == 4


def test_logprob_verdict_config_errors_name_the_key():
    """verdict=logprob needs the pairwise template and a local judge; an unknown mode is refused."""
    with pytest.raises(ValueError, match="judge verdict 'guess' is not one of text, logprob"):
        JudgeReward(OrderedBackend(), "pairwise", verdict="guess")
    with pytest.raises(ValueError, match="needs template=pairwise"):
        JudgeReward(OrderedBackend(), "pointwise", verdict="logprob")
    cfg = JudgeConfig(url="http://127.0.0.1:1/v1", endpoint_model="m", template="pairwise", verdict="logprob")
    with pytest.raises(ConfigError, match=r"reward\.judge: judge verdict=logprob .* a local judge"):
        build_judge(cfg)


def test_reviews_task_writes_verdict_only_judge_rows():
    """judge_verdict_sft rows hold the rationale rows' prompts with the verdict alone as the completion."""
    from alignflow.config import TaskConfig
    from alignflow.tasks.reviews_judge import make_judge_rows

    pairs = [
        {"prompt": "Review :", "chosen": " a wonderful film .", "rejected": " a boring boring film"},
        {"prompt": "Review :", "chosen": " great acting .", "rejected": " awful awful plot ,"},
    ]
    rows = make_judge_rows(TaskConfig(), pairs)
    assert len(rows["judge_verdict_sft"]) == len(rows["judge_pairs"]) > 0
    for v, r in zip(rows["judge_verdict_sft"], rows["judge_pairs"], strict=True):
        assert v == {"prompt": r["prompt"], "completion": f" overall {r['label']} ."}
        assert r["label"] == ("this" if r["gold_first"] > r["gold_second"] else "that")
