"""The probability verdict of a pairwise LLM judge (reward.judge.verdict: logprob, docs/judges.md) and the
direct-verdict judge rows of the reviews task."""

import math

import pytest
import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, JudgeConfig
from alignflow.rewards.judge import JudgeReward, LocalJudge, build_judge, continuation_logprobs
from alignflow.tasks.common import build_tokenizer
from tests.helpers import token_table_llama

WORDS = ("overall", "this", "that", "good", "bad")


def bigram_model(tok, logits: dict):
    """A tiny Llama whose next-token logits depend on the current token only: attention and MLP outputs are
    zeroed, so the last hidden state is the current token's one-hot embedding scaled by the final RMS norm
    (x / rms(x) = 4 e_k in 16 dimensions), and the untied head holds ``logits[current][next] / 4`` (0 for every pair
    not given), so the logits are exactly ``logits[current][next]``."""
    head = torch.zeros(len(tok), 16)
    for cur, nxt in logits.items():
        for word, value in nxt.items():
            head[tok.convert_tokens_to_ids(word), tok.convert_tokens_to_ids(cur)] = value / 4.0
    return token_table_llama(tok, 16, head, rms_eps=1e-12)


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


def test_local_judge_two_verdicts_give_the_renormalised_first_verdict_probability():
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
    first = lambda qs, words: [d[0] for d in judge.verdict_dist(qs, words)]  # p(first) = sigmoid(l1 - l2)
    got = first(["good", "bad good bad", "this good"], [" this", " that"])
    assert got == pytest.approx([sigmoid(2), sigmoid(-2), sigmoid(2)], abs=1e-5)
    got = first(["good", "bad bad"], [" overall this", " overall that"])
    assert got == pytest.approx([sigmoid(3), sigmoid(3)], abs=1e-5)
    with pytest.raises(ValueError, match="two continuations with different tokens"):
        first(["good"], [" this", " this"])


def test_local_judge_verdict_dist_renormalises_over_k_continuations():
    """After ``good`` the head gives ``bad`` 1, ``this`` 2, ``that`` 0 (every other token 0): over the three
    one-token continuations p = softmax(1, 2, 0) = (e, e^2, 1) / (e + e^2 + 1) = (0.2447, 0.6652, 0.0900);
    after ``bad`` all three are 0, p = 1/3 each. The pointwise value of the first, words from lowest to highest:
    (0 * 0.2447 + 1 * 0.6652 + 2 * 0.0900) / 2 = 0.4226."""
    from alignflow.rewards.judge import verdict_value

    tok = build_tokenizer(WORDS)
    model = bigram_model(tok, {"good": {"bad": 1.0, "this": 2.0}})
    judge = LocalJudge(model, tok, max_new_tokens=4, chat=False)
    got = judge.verdict_dist(["this good", "bad"], [" bad", " this", " that"])
    z = math.e + math.e**2 + 1
    assert got[0] == pytest.approx([math.e / z, math.e**2 / z, 1 / z], abs=1e-5)
    assert got[1] == pytest.approx([1 / 3] * 3, abs=1e-5)
    assert verdict_value("pointwise", got[0]) == pytest.approx((math.e**2 / z + 2 / z) / 2, abs=1e-5)
    assert verdict_value("pointwise", got[0]) == pytest.approx(0.4226, abs=1e-4)
    assert verdict_value("principle", got[0]) == pytest.approx(math.e / z, abs=1e-5)


class OrderedBackend:
    """p(first wins) = 0.9 when the first response is 'good', else 0.3: a position-biased judge."""

    def __init__(self):
        self.asked = 0

    def verdict_dist(self, questions, continuations):
        self.asked += len(questions)
        return [[p, 1 - p] for p in (0.9 if q.split("|")[0] == "good" else 0.3 for q in questions)]


class GradingBackend:
    """A pointwise / principle judge whose verdict distribution over the words is given per question."""

    def __init__(self, dists: dict):
        self.dists, self.words = dists, []

    def verdict_dist(self, questions, continuations):
        self.words.append(list(continuations))
        return [self.dists[q] for q in questions]


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


def test_logprob_pointwise_is_the_expected_score_and_principle_the_yes_probability():
    """Pointwise, default words ``Score: 1`` .. ``Score: 10``: p = 0.5 on Score: 3 (k = 2) and 0.5 on Score: 9
    (k = 8) gives E[k] / 9 = (0.5 * 2 + 0.5 * 8) / 9 = 5/9, the text verdict's (N - 1) / 9 in expectation; all
    mass on Score: 10 gives 1. Principle, default words (Answer: Yes, Answer: No): p(yes) per principle, averaged
    over the row's two principles: (0.8 + 0.2) / 2 = 0.5."""
    ten = [0.0] * 10
    mixed, top = ten.copy(), ten.copy()
    mixed[2] = mixed[8] = 0.5
    top[9] = 1.0
    backend = GradingBackend({"p|one": mixed, "p|two": top})
    judge = JudgeReward(backend, "pointwise", question="{prompt}|{response}", verdict="logprob")
    out, m = judge.score(Batch(meta={"prompt": ["p", "p"], "response": ["one", "two"]}))
    assert out.tolist() == pytest.approx([5 / 9, 1.0]) and m["rollout/judge_parse_failures"] == 0.0
    assert backend.words == [[f"Score: {n}" for n in range(1, 11)]]
    backend = GradingBackend({"r|P1": [0.8, 0.2], "r|P2": [0.2, 0.8]})
    judge = JudgeReward(backend, "principle", question="{response}|{principle}", verdict="logprob")
    out, _ = judge.score(Batch(meta={"prompt": ["p"], "response": ["r"], "principles": [["P1", "P2"]]}))
    assert out.tolist() == pytest.approx([0.5]) and backend.words == [["Answer: Yes", "Answer: No"]]


def test_logprob_verdict_config_errors_name_the_key():
    """verdict=logprob needs a local judge, two words for pairwise / principle and at least two for pointwise;
    words the judge's tokenizer cannot tell apart stop at load time; an unknown mode is refused."""
    with pytest.raises(ValueError, match="judge verdict 'guess' is not one of text, logprob"):
        JudgeReward(OrderedBackend(), "pairwise", verdict="guess")
    with pytest.raises(ValueError, match="template principle reads exactly two continuations"):
        JudgeReward(OrderedBackend(), "principle", verdict="logprob", verdict_words=["yes", "no", "maybe"])
    with pytest.raises(ValueError, match="template pointwise reads at least two continuations"):
        JudgeReward(OrderedBackend(), "pointwise", verdict="logprob", verdict_words=["only"])
    tok = build_tokenizer(WORDS)
    local = LocalJudge(bigram_model(tok, {}), tok, max_new_tokens=4, chat=False)
    with pytest.raises(ValueError, match="different tokens"):
        JudgeReward(local, "pointwise", verdict="logprob", verdict_words=[" bad", " good", " bad"])
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


def _copy_kind(resp: str, originals) -> str | None:
    """Which damage turned one of ``originals`` into ``resp``: "repeat" (a sentence appended again), "stutter" (one
    word said again in place, 1-40 more times) or "negate" (``not`` put after a verb); None for none of them."""
    for orig in originals:
        o, r = orig.split(), resp.split()
        if resp.startswith(orig) and len(r) > len(o):
            return "repeat"
        for i in range(len(o)):
            for k in range(1, 41):
                if r == o[: i + 1] + [o[i]] * k + o[i + 1 :]:
                    return "stutter"
            if r == o[: i + 1] + ["not"] + o[i + 1 :] and o[i] in VERBS:
                return "negate"
    return None


VERBS = {"was", "is", "felt", "seemed", "looked", "sounded", "remained", "stayed", "became"}


def test_reviews_task_writes_pointwise_judge_rows_with_damaged_copies():
    """judge_point_sft: one row per distinct review of the pairs (good above the median gold of those reviews),
    plus damaged copies (a sentence repeated, a word stuttered, a verb negated) labelled by their own gold reward.
    Of four distinct golds the median is the ascending list's index 2 (the second best), so exactly one review, the
    best, is above it."""
    from alignflow.tasks import reviews
    from alignflow.tasks.reviews_judge import point_rows

    assert VERBS == set(reviews.CLASSES["VERB"])
    pairs = [
        {"prompt": "Review :", "chosen": " the film was wonderful .", "rejected": " a boring boring film"},
        {"prompt": "Review :", "chosen": " the acting felt great .", "rejected": " awful awful plot ,"},
    ]
    golds = {r: reviews.gold_reward(["Review :"], [r])[0] for p in pairs for r in (p["chosen"], p["rejected"])}
    median = sorted(golds.values())[2]
    kinds = set()
    for seed in range(20):
        rows = point_rows(pairs, seed=seed)
        first = rows[:4]
        assert [r["prompt"] for r in first] == [f"Review :{r}" for r in golds]
        for row, g in zip(first, golds.values(), strict=True):
            assert row["completion"] == (" overall good ." if g > median else " overall bad .")
        assert sum(r["completion"] == " overall good ." for r in first) == 1
        for row in rows[4:]:  # copies: each one damage of one review, graded by the same rule
            resp = row["prompt"][len("Review :") :]
            kind = _copy_kind(resp, golds)
            assert kind is not None, resp
            kinds.add(kind)
            g = reviews.gold_reward(["Review :"], [resp])[0]
            assert row["completion"] == (" overall good ." if g > median else " overall bad .")
    assert kinds == {"repeat", "stutter", "negate"}


def test_the_damages_of_the_pointwise_judge_rows():
    import random

    from alignflow.tasks.reviews_judge import STUTTER_TIMES, negate_word, repeat_sentence, stutter_word

    assert repeat_sentence(random.Random(0), " no end here") is None
    rep = repeat_sentence(random.Random(0), " great acting . awful plot !")
    assert rep in {
        f" great acting . awful plot !{tail}"
        for k in (1, 2, 3)
        for tail in (" great acting ." * k, " awful plot !" * k)
    }
    assert stutter_word(random.Random(0), " . !") is None  # punctuation alone: nothing to stutter
    # " was not ." has two words; the stuttered one is said again k times in place, before the final "."
    outs = {stutter_word(random.Random(seed), " was not .") for seed in range(60)}
    every = {" was" + " was" * k + " not ." for k in STUTTER_TIMES} | {
        " was not" + " not" * k + " ." for k in STUTTER_TIMES
    }
    assert outs <= every and len(outs) > len(every) // 2
    assert negate_word(random.Random(0), " the film was great .") == " the film was not great ."
    assert negate_word(random.Random(0), " the film was not great .") is None  # already negated
    assert negate_word(random.Random(0), " great film .") is None  # no verb
    assert negate_word(random.Random(0), " it was") is None  # a verb at the end: nothing to negate
