"""Token-level rewards from a rewrite (seq2seq reward model), against hand-derived alignments."""

from alignflow.rewards.seq2seq import edit_token_rewards


def test_kept_deleted_replaced_and_inserted_tokens():
    """Alignments worked by hand:
    "the plot was dull dull" -> "the plot was dull .": 4 tokens kept, the second "dull" replaced by "." -> -1;
    "a b c" -> "a c d": a kept, b deleted (-1), c kept, "d" inserted after c (-0.5 on c);
    "b c" -> "a b c": "a" inserted at the start (-0.5 on the first token), b and c kept."""
    assert edit_token_rewards("the plot was dull dull".split(), "the plot was dull .".split()) == [0, 0, 0, 0, -1]
    assert edit_token_rewards("a b c".split(), "a c d".split()) == [0.0, -1.0, -0.5]
    assert edit_token_rewards("b c".split(), "a b c".split()) == [-0.5, 0.0]
    assert edit_token_rewards("a b".split(), "a b".split(), keep=0.1) == [0.1, 0.1]
    assert edit_token_rewards([], ["x"]) == []


def test_replacement_then_insertion_on_one_token_adds_up():
    """ "a b" -> "a x y": difflib gives equal(a), replace(b -> x y): b gets -1 only (a replace, not an insert);
    "a" -> "a z z": equal(a), insert(z z) after a: -0.5 on a."""
    assert edit_token_rewards(["a", "b"], ["a", "x", "y"]) == [0.0, -1.0]
    assert edit_token_rewards(["a"], ["a", "z", "z"]) == [-0.5]


def test_souring_swaps_positive_words_for_negative_words_of_their_class():
    """Souring replaces one or two positive sentiment words (here: "wonderful" an adjective, "loved" an opinion
    verb) by negative words of the same class; every other token stays where it was."""
    import random

    from alignflow.tasks import reviews
    from alignflow.tasks.reviews_rewrite import sour

    tail = "was wonderful . i loved the plot .".split()
    seen = set()
    for seed in range(20):
        out = sour(random.Random(seed), tail)
        changed = tuple(i for i, (a, b) in enumerate(zip(tail, out, strict=True)) if a != b)
        assert changed in {(1,), (4,), (1, 4)}, (tail, out)  # one or both positive words, nothing else
        seen.add(changed)
        for i in changed:
            cls = "ADJ" if i == 1 else "OPV"
            assert out[i] in reviews.CLASSES[cls] and reviews.SENTIMENT[out[i]] < 0, out
    assert seen == {(1,), (4,), (1, 4)}, seen  # over 20 seeds: each word alone, and both
    assert sour(random.Random(0), "was dull .".split()) == "was dull .".split()  # nothing positive: unchanged


def test_rewrite_rows_restore_a_grammatical_review_and_half_are_damaged():
    """Every completion is a whole grammatical review once the opening is put back (the original); the shown
    response equals it in the undamaged rows, about half of them (DAMAGE = 0.5), and the rows are deterministic."""
    from alignflow.config import TaskConfig
    from alignflow.tasks import reviews
    from alignflow.tasks.reviews_rewrite import rewrite_prompt, rewrite_rows

    rows = rewrite_rows(TaskConfig(name="reviews"), "train", 200)
    assert rows == rewrite_rows(TaskConfig(name="reviews"), "train", 200)
    for r in rows:
        toks = reviews.review_tokens(r["source_prompt"], r["completion"])
        assert all(reviews.parse(s) == "ok" for s in reviews.sentences(toks)), r
        assert r["prompt"] == rewrite_prompt(r["source_prompt"], r["response"])
    damaged = sum(r["response"] != r["completion"] for r in rows)
    assert 70 <= damaged <= 110, damaged


def test_echo_says_one_sentence_twice():
    """ "was great . i loved the plot ." has two sentences ("was great ." continues the opening); echoing one
    of them gives exactly one of the two hand-written copies, each sentence chosen for some seed."""
    import random

    from alignflow.tasks.reviews_rewrite import echo

    tail = "was great . i loved the plot .".split()
    first = "was great . was great . i loved the plot .".split()
    second = "was great . i loved the plot . i loved the plot .".split()
    outs = {tuple(echo(random.Random(seed), tail)) for seed in range(20)}
    assert outs == {tuple(first), tuple(second)}
