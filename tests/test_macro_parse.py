"""MA-RLHF's parsing-based termination rule as a shallow phrase chunker (algo.macro.rule=parse): by hand on a
sentence of the reviews task, the word-start marks of subword vocabularies, and the rule inside the advantage step."""

from __future__ import annotations

import pytest
import torch

from alignflow.algorithms.macro import parse_macros, phrase_openers
from alignflow.batch import Batch
from alignflow.config import ConfigError
from alignflow.models import load_tokenizer
from alignflow.trainers.rl_algos import AdvContext, macro_ids, phrase_table
from tests.test_online_rl import rl_cfg

SENTENCE = "the plot was really good , but the acting felt flat ."


def test_parse_macros_by_hand_on_a_reviews_sentence(reviews_task):
    """Tokens (word-level): the plot was really good , but the acting felt flat . (positions 0..11).
    Cuts before the first token and before ",", "but", "the", "." (punctuation, conjunction, determiner):
    phrases [0-4] [5] [6] [7-10] [11]. The one-token phrases [5], [6] and [11] join the phrase before them:
    [0-6] "the plot was really good , but" and [7-11] "the acting felt flat ." -> ids 0 x 7, 1 x 5.
    cutoff 3 then cuts each phrase every 3 tokens: [0-2] [3-5] [6] [7-9] [10-11] -> 0,0,0,1,1,1,2,3,3,3,4,4.
    Padding after the response stays -1."""
    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    ids = tok(SENTENCE, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == SENTENCE.split()
    table = phrase_table(tok)
    row = torch.tensor([ids + [tok.pad_token_id] * 2])  # (1, 14)
    mask = torch.tensor([[1] * 12 + [0, 0]])
    assert parse_macros(row, mask, table).tolist() == [[0] * 7 + [1] * 5 + [-1, -1]]
    assert parse_macros(row, mask, table, cutoff=3).tolist() == [[0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 4, 4, -1, -1]]
    # a response that opens with a one-token phrase keeps it (there is no phrase before it to join)
    lone = tok(". the film", add_special_tokens=False)["input_ids"]
    assert parse_macros(torch.tensor([lone]), torch.ones(1, 3), table).tolist() == [[0, 1, 1]]


def test_phrase_openers_respect_word_start_marks():
    """Byte-level BPE marks a word start with U+0120: "\u0120and" opens a phrase, a bare "and" (the end of "band")
    does not; punctuation opens one with or without the mark; content words never. Ids past the table open
    nothing. A word-level vocabulary (no marks anywhere) treats every entry as a whole word."""
    bpe = ["b", "and", "\u0120and", "\u0120film", ",", "\u0120.", "\u0120The"]
    assert phrase_openers(bpe).tolist() == [False, False, True, False, True, True, True]
    assert phrase_openers(["and", "film", "!"]).tolist() == [True, False, True]
    # ids: film and(bare) [id 9: beyond the table] , -> phrases: [film and X] [,] -> the "," joins: one macro
    table = phrase_openers(bpe)
    assert parse_macros(torch.tensor([[3, 1, 9, 4]]), torch.ones(1, 4), table).tolist() == [[0, 0, 0, 0]]
    with pytest.raises(ValueError, match="cutoff"):
        parse_macros(torch.tensor([[3]]), torch.ones(1, 1), table, cutoff=-1)


def test_parse_rule_in_the_advantage_step(reviews_task, tmp_path):
    """algo.macro.rule=parse is a config choice (ma_ppo): macro_ids reads the response ids through the tokenizer
    the controller passes in the advantage context; a bad rule is one line naming the key."""
    cfg = rl_cfg(reviews_task, tmp_path, algo={"name": "ma_ppo", "macro": {"rule": "parse", "cutoff": 0}})
    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    ids = tok(SENTENCE, add_special_tokens=False)["input_ids"]
    ctx = AdvContext(0.0, "k1", 1.0, 0.95, True, False, macro=cfg.algo.macro, tokenizer=tok)
    batch = Batch({"response_ids": torch.tensor([ids]), "response_mask": torch.ones(1, len(ids))})
    assert macro_ids(batch, ctx).tolist() == [[0] * 7 + [1] * 5]
    with pytest.raises(ConfigError, match="algo.macro.rule"):
        rl_cfg(reviews_task, tmp_path, algo={"name": "ma_ppo", "macro": {"rule": "constituency"}})
