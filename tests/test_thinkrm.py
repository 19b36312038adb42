"""Judge data of the reviews task, the verdict-accuracy reward, held-out evaluation of a generative RM (Think-RM)
and pairwise RLHF advantages."""

import json

import pytest
import torch

from alignflow.algorithms.pairwise_adv import anchor_advantages, group_win_rate_advantages, preference_matrix
from alignflow.data.formats import DataError
from alignflow.rewards.verdict import parse_position, verdict_accuracy, verdict_metrics
from alignflow.tasks import reviews, reviews_judge


def test_rationale_lists_gold_features_and_verdict_names_higher_gold():
    prompt = "Review : the acting"
    good, bad = " was truly wonderful .", " was boring boring"
    text = reviews_judge.rationale(prompt, good, bad, "this")
    # good: one positive word, 6 tokens (< 8: brief); bad: "boring" (negative), one repeat, a sentence that
    # does not parse (two adjectives without "and"), no final ".", 5 tokens (brief)
    assert text == (
        " this : wonderful , brief . that : but boring , stale , incoherent , sloppy , brief . overall this ."
    )
    row = reviews_judge.judge_row(__import__("random").Random(0), prompt, good, bad)
    better = row["first"] if row["label"] == "this" else row["second"]
    assert better == good and row["prompt"] == reviews_judge.judge_prompt(prompt, row["first"], row["second"])
    assert reviews_judge.review_rationale(prompt, " was not great .") == "but not great , brief"


def test_build_task_writes_judge_files_in_vocabulary(reviews_task):
    from transformers import AutoTokenizer

    files = reviews_judge.paths(reviews_task.dir)
    rows = {k: [json.loads(line) for line in open(p)] for k, p in files.items()}
    assert len(rows["judge_sft"]) == len(rows["judge_pairs"]) > 0 and len(rows["judge_eval"]) >= 64
    tok = AutoTokenizer.from_pretrained(str(reviews_task.tokenizer_dir))
    for r in rows["judge_sft"][:50]:
        assert tok.unk_token_id not in tok(r["prompt"] + r["completion"]).input_ids
    for r in rows["judge_pairs"] + rows["judge_eval"]:
        g1, g2 = reviews.gold_reward([r["source_prompt"]] * 2, [r["first"], r["second"]])
        assert r["label"] == ("this" if g1 > g2 else "that")
    train_openings = {r["source_prompt"] for r in rows["judge_pairs"]}
    assert not train_openings & {r["source_prompt"] for r in rows["judge_eval"]}
    assert {r["label"] for r in rows["principles"]} == {"yes", "no"}
    assert {r["principle_id"] for r in rows["principles"]} == set(reviews_judge.PRINCIPLES)


def test_verdict_parse_takes_the_last_verdict_in_either_form():
    assert parse_position(" this : great . overall that . overall this .") == "first"
    assert parse_position("reasoning ... **Verdict:** B") == "second"
    assert parse_position(" this : great . that : dull .") is None
    assert verdict_accuracy(
        ["p"] * 3, [" overall this .", " overall that .", " no verdict"], ["this", "this", "A"]
    ) == [1.0, 0.0, 0.0]
    assert verdict_metrics([" overall this .", "x"], ["A", "that"]) == {"accuracy": 0.5, "parse_failures": 0.5, "n": 2}
    with pytest.raises(DataError, match="row 1: label 'maybe'"):
        verdict_accuracy(["p", "p"], ["overall this", "overall this"], ["this", "maybe"])


def test_group_win_rate_advantages_hand_derived():
    """G = 3, P[0,1] = 0.8, P[0,2] = 0.6, P[1,2] = 0.3 and P[j,i] = 1 - P[i,j]:
    w_0 = (0.8 + 0.6)/2 = 0.7, w_1 = (0.2 + 0.3)/2 = 0.25, w_2 = (0.4 + 0.7)/2 = 0.55;
    A = w - 0.5 = (0.2, -0.25, 0.05), summing to 0. The diagonal (here 9) is never read."""
    p = torch.tensor([[9.0, 0.8, 0.6], [0.2, 9.0, 0.3], [0.4, 0.7, 9.0]])
    adv = group_win_rate_advantages(p)
    assert torch.allclose(adv, torch.tensor([0.2, -0.25, 0.05]))
    assert abs(adv.sum().item()) < 1e-6
    batched = group_win_rate_advantages(torch.stack([p, p.T]))
    assert batched.shape == (2, 3)
    with pytest.raises(ValueError, match="at least 2"):
        group_win_rate_advantages(torch.ones(1, 1))


def test_anchor_advantages_and_preference_matrix_hand_derived():
    """p = (0.9, 0.5, 0.1) against the anchor: p - 1/2 = (0.4, 0, -0.4); centred on mean 0.5: the same.
    p = (0.9, 0.7, 0.8): mean 0.8, centred (0.1, -0.1, 0)."""
    assert torch.allclose(anchor_advantages(torch.tensor([0.9, 0.5, 0.1])), torch.tensor([0.4, 0.0, -0.4]))
    assert torch.allclose(
        anchor_advantages(torch.tensor([0.9, 0.7, 0.8]), center=True), torch.tensor([0.1, -0.1, 0.0]), atol=1e-6
    )
    longer = preference_matrix(lambda a, b: float(len(a) > len(b)), ["aaa", "a", "aa"])
    assert torch.allclose(group_win_rate_advantages(longer), torch.tensor([0.5, -0.5, 0.0]))


def test_verdict_reward_reads_the_row_label_through_the_rule_reward_wiring():
    """As ``reward.functions`` loads it: the prompt row's ``label`` reaches ``labels`` (plural binding), and a
    bad label fails with the row named."""
    from alignflow.batch import Batch
    from alignflow.rewards.rules import CallableReward, RewardError

    reward = CallableReward("alignflow.rewards.verdict:verdict_accuracy")
    batch = Batch(
        meta={
            "prompt": ["p"] * 3,
            "response": [" overall this .", " overall this .", "none"],
            "label": ["this", "that", "that"],
        }
    )
    assert reward(batch).tolist() == [1.0, 0.0, 0.0]
    bad = Batch(meta={"prompt": ["p"], "response": [" overall this ."], "label": ["left"]})
    with pytest.raises((RewardError, DataError), match="label 'left'"):
        reward(bad)


def test_generative_rm_eval_reads_verdict_probability(reviews_task):
    """On the untrained fixture model: metrics have the documented keys and ranges; the verdict logit is read
    at the step after ``overall`` (a hand-made generation: overall, that -> logit(this) - logit(that) = 2 - 5)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.rewards.generative_rm import evaluate_generative_rm, verdict_logit

    tok = AutoTokenizer.from_pretrained(str(reviews_task.tokenizer_dir))
    ids = tuple(tok.convert_tokens_to_ids(w) for w in ("overall", "this", "that"))
    scores = torch.zeros(3, len(tok))
    scores[2, ids[1]], scores[2, ids[2]] = 2.0, 5.0
    assert verdict_logit(torch.tensor([ids[0], ids[0], ids[2]]), scores, ids) == pytest.approx(-3.0)
    assert verdict_logit(torch.tensor([ids[1], ids[2], ids[0]]), scores, ids) is None
    model = AutoModelForCausalLM.from_pretrained(str(reviews_task.model_dir))
    rows = [json.loads(line) for line in open(reviews_judge.paths(reviews_task.dir)["judge_eval"])][:4]
    m = evaluate_generative_rm(model, tok, rows, batch_size=4, max_new_tokens=4)
    assert m["n"] == 4 and 0 <= m["accuracy"] <= 1 and 0 <= m["parse_failures"] <= 1
