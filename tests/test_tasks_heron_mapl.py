"""Built-in data for HERON (weak signals of ranked importance) and MAPL (instruction constraints) on reviews."""

import pytest

from alignflow.config import TaskConfig
from alignflow.tasks import reviews
from alignflow.tasks.constraints import STYLE, constrained, make_mapl_rows, satisfies
from alignflow.tasks.weak_signals import SIGNALS, agreement, heron_relabel, weak_signals


@pytest.fixture(scope="module")
def rows():
    return reviews.make_rows(TaskConfig(num_sft=10, num_pairs=600))


def test_weak_signals_are_the_gold_reward_terms(rows):
    p = rows["pairs_path"][0]
    assert sum(weak_signals(p["prompt"], p["chosen"])) == pytest.approx(
        reviews.gold_reward([p["prompt"]], [p["chosen"]])[0]
    )


def test_heron_labels_from_ranked_weak_signals_agree_with_gold_more_than_the_noisy_labels(rows):
    """The task's pairs carry Bradley-Terry-noisy labels (task.label_noise 1): 78% agree with the noise-free gold
    order here. HERON's hierarchical comparison of the four weak signals, using only their order and margins,
    keeps the pairs it can decide (89%) and orders 82% of them like the gold reward."""
    pairs = rows["pairs_path"]
    relabelled, stats = heron_relabel(pairs)
    assert stats["pairs"] + stats["ties"] == len(pairs) == 600
    assert sum(stats["decided_by"].values()) == stats["pairs"] and list(stats["decided_by"]) == list(SIGNALS)
    assert stats["decided_by"]["fluency"] > 0 and stats["decided_by"]["sentiment"] > 0
    assert agreement(relabelled) > agreement(pairs) + 0.02
    assert heron_relabel([]) == ([], {"pairs": 0, "ties": 0, "decided_by": dict.fromkeys(SIGNALS, 0)})


def test_mapl_rows_respect_their_constraints_and_stay_in_the_task_vocabulary(rows):
    data = make_mapl_rows(TaskConfig(), rows["rated_path"][:60])
    assert all(len(data[k]) >= 40 for k in ("response", "intra", "inter"))
    vocab = set(reviews.VOCAB)

    def keywords(instruction, prompt):
        return instruction[: len(instruction) - len(prompt)].split()

    for r in data["response"]:
        task_prompt = r["prompt"].split(" ", 1)[1]
        (c,) = keywords(r["prompt"], task_prompt)
        assert satisfies(c, task_prompt, r["chosen"]) and not satisfies(c, task_prompt, r["rejected"])
    for r in data["intra"]:
        task_prompt = "Review :" + r["prompt_chosen"].split("Review :", 1)[1]
        assert all(satisfies(c, task_prompt, r["response"]) for c in keywords(r["prompt_chosen"], task_prompt))
        assert not all(satisfies(c, task_prompt, r["response"]) for c in keywords(r["prompt_rejected"], task_prompt))
    for r in data["inter"]:
        task_prompt = "Review :" + r["prompt"].split("Review :", 1)[1]
        added = keywords(r["prompt_plus"], task_prompt)[-1]
        assert satisfies(added, task_prompt, r["chosen"]) and not satisfies(added, task_prompt, r["rejected"])
        assert set(r["prompt_plus"].split()) <= vocab | {"Review", ":"}
    assert constrained("Review : the", ["plot", "short"]) == "plot short Review : the"
    with pytest.raises(ValueError, match="one of short, long, good, bad"):
        satisfies("funny", "Review : the", " plot .")
    assert STYLE == ("short", "long", "good", "bad")


def test_heron_recipe_step_relabels_a_pairs_file(rows, tmp_path):
    import json

    from alignflow.config import ConfigError
    from alignflow.recipes.steps import HeronConfig, heron

    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows["pairs_path"][:100]))
    stats = heron(HeronConfig(input=str(src), output_dir=str(tmp_path / "out")))
    written = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert len(written) == stats["pairs"] and stats["pairs"] + stats["ties"] == 100
    assert stats["gold_agreement_after"] == pytest.approx(agreement(written))
    with pytest.raises(ConfigError, match="margins: give 4 non-negative numbers"):
        heron(HeronConfig(input=str(src), margins=[0.5], output_dir=str(tmp_path / "bad")))
