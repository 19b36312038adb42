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
