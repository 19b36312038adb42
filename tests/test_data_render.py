"""Tokenisation: one truncation rule, loss masks on completion/assistant tokens only, bad rows reported.

The fixture tokenizer is word-level (one token per word), adds <bos> like Llama's, and has a chat template
that renders ``<|role|> content <|end|>`` per message, so expected ids can be written down by hand.
"""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BatchEncoding, PreTrainedTokenizerFast

from alignflow.config import DataConfig
from alignflow.data.formats import DataError, validate
from alignflow.data.loading import Record
from alignflow.data.render import chat_ids, encode_lm, encode_pair, encode_prompt, encode_rows

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = SPECIALS + [
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "hello",
    "world",
    "hi",
    "there",
    "how",
    "are",
    "you",
    "good",
    "bad",
    "fine",
    "dog",
    "cat",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
]
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
BOS, EOS = 1, 2


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def tok():
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# ----------------------------------------------------------------------------------------------- pairs
def test_standard_pair_adds_bos_to_the_prompt_and_eos_to_the_completion(tok):
    enc = encode_pair(tok, "hello world", "good dog", max_prompt_len=10, max_len=20)
    assert enc.input_ids == [BOS] + ids("hello world good dog") + [EOS]
    assert enc.loss_mask == [0, 0, 0, 1, 1, 1] and enc.prompt_len == 3 and not enc.truncated


def test_truncation_cuts_the_prompt_left_and_the_completion_right(tok):
    """Prompt [bos one two three four five] keeps its last 3 tokens [three four five]; max_len 6 leaves room
    for 3 completion tokens out of [six seven eight nine eos]: [six seven eight]."""
    enc = encode_pair(tok, "one two three four five", "six seven eight nine", max_prompt_len=3, max_len=6)
    assert enc.input_ids == ids("three four five six seven eight")
    assert enc.loss_mask == [0, 0, 0, 1, 1, 1] and enc.prompt_len == 3 and enc.truncated


@pytest.mark.parametrize("max_prompt_len,max_len", [(1, 2), (2, 9), (3, 4), (5, 7), (6, 8), (6, 12), (20, 30)])
def test_truncation_invariants(tok, max_prompt_len, max_len):
    """Whatever the limits: total <= max_len, the prompt kept is a suffix of the whole prompt, the completion
    kept is a prefix of the whole completion, and the mask marks exactly the completion."""
    prompt, completion = [BOS] + ids("one two three four five"), ids("six seven eight nine") + [EOS]
    enc = encode_pair(tok, "one two three four five", "six seven eight nine", max_prompt_len, max_len)
    kept_prompt, kept_completion = enc.input_ids[: enc.prompt_len], enc.input_ids[enc.prompt_len :]
    assert len(enc.input_ids) <= max_len and enc.prompt_len == min(len(prompt), max_prompt_len)
    assert (
        kept_prompt == prompt[len(prompt) - enc.prompt_len :] and kept_completion == completion[: len(kept_completion)]
    )
    assert enc.loss_mask == [0] * enc.prompt_len + [1] * len(kept_completion) and kept_completion
    assert enc.truncated == (len(enc.input_ids) < len(prompt) + len(completion))


def test_completion_truncated_to_nothing_is_an_error(tok):
    with pytest.raises(
        DataError,
        match=r"completion truncated to nothing: the prompt keeps 4 tokens "
        r"\(max_prompt_len=4\) and max_len=4",
    ):
        encode_pair(tok, "one two three four five", "six", max_prompt_len=4, max_len=4)


def test_conversational_pair_uses_the_chat_template(tok):
    """prompt = <|user|> hello <|end|> <|assistant|> (generation prompt); completion = what the whole
    conversation adds after it: good dog <|end|> (no extra eos: the template ends the turn)."""
    enc = encode_pair(tok, user("hello"), assistant("good dog"), max_prompt_len=10, max_len=20)
    assert enc.input_ids == ids("<|user|> hello <|end|> <|assistant|> good dog <|end|>")
    assert enc.loss_mask == [0, 0, 0, 0, 1, 1, 1] and enc.prompt_len == 4


def test_conversational_prompt_is_cut_on_the_left_keeping_the_latest_turns(tok):
    prompt = user("one two") + assistant("three") + user("four")
    enc = encode_pair(tok, prompt, assistant("good"), max_prompt_len=4, max_len=6)
    assert enc.input_ids == ids("<|user|> four <|end|> <|assistant|> good <|end|>")


def test_apply_chat_template_return_types(tok, monkeypatch):
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list; some
    tokenizers a batch of one or a tensor. chat_ids gives the same flat id list for all of them."""
    expected = ids("<|user|> hello <|end|> <|assistant|>")
    native = tok.apply_chat_template(user("hello"), add_generation_prompt=True, tokenize=True)
    assert chat_ids(tok, user("hello"), add_generation_prompt=True) == expected
    assert (native["input_ids"] if isinstance(native, BatchEncoding) else native) == expected
    for shape in (
        expected,
        [expected],
        {"input_ids": expected},
        BatchEncoding({"input_ids": expected}),
        torch.tensor([expected]),
    ):
        monkeypatch.setattr(type(tok), "apply_chat_template", lambda self, *a, _out=shape, **k: _out)
        assert chat_ids(tok, user("hello"), add_generation_prompt=True) == expected


def test_template_that_is_not_prefix_stable_is_reported(tok, monkeypatch):
    """This template's generation prompt (<|system|>) differs from how it renders the assistant turn."""
    monkeypatch.setattr(
        tok,
        "chat_template",
        TEMPLATE.replace("{% if add_generation_prompt %}<|assistant|>", "{% if add_generation_prompt %}<|system|>"),
    )
    with pytest.raises(DataError, match="chat template is not prefix-stable"):
        encode_pair(tok, user("hello"), assistant("good"), max_prompt_len=10, max_len=20)


def test_conversational_rows_need_a_chat_template(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        encode_prompt(tok, user("hello"), max_prompt_len=8)


def test_encode_prompt_same_rule_as_pairs(tok):
    assert encode_prompt(tok, "one two three", max_prompt_len=10) == [BOS] + ids("one two three")
    assert encode_prompt(tok, "one two three", max_prompt_len=2) == ids("two three")
    assert encode_prompt(tok, user("hi"), max_prompt_len=10) == ids("<|user|> hi <|end|> <|assistant|>")


# ----------------------------------------------------------------------------------------------- lm
def test_lm_text_all_tokens_in_the_loss_cut_on_the_right(tok):
    enc = encode_lm(tok, "hello world", max_len=10)
    assert enc.input_ids == [BOS] + ids("hello world") + [EOS] and enc.loss_mask == [1, 1, 1, 1]
    cut = encode_lm(tok, "hello world", max_len=3)
    assert cut.input_ids == [BOS] + ids("hello world") and cut.truncated


CONVERSATION = user("hello") + assistant("hi there") + user("how are you") + assistant("good")


def test_lm_messages_loss_only_on_assistant_tokens(tok):
    """<|user|> hello <|end|> <|assistant|> | hi there <|end|> | <|user|> how are you <|end|> <|assistant|> |
    good <|end|>: 1 on the tokens each assistant message adds after its header, 0 elsewhere."""
    enc = encode_lm(tok, CONVERSATION, max_len=50, completion_only=True)
    assert enc.input_ids == ids(
        "<|user|> hello <|end|> <|assistant|> hi there <|end|> <|user|> how are you <|end|> <|assistant|> good <|end|>"
    )
    assert enc.loss_mask == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1] and enc.prompt_len == 4
    everything = encode_lm(tok, CONVERSATION, max_len=50, completion_only=False)
    assert everything.input_ids == enc.input_ids and everything.loss_mask == [1] * 15


def test_lm_messages_mask_of_a_conversation_with_a_system_turn(tok):
    messages = [{"role": "system", "content": "fine"}] + user("hi") + assistant("bad")
    enc = encode_lm(tok, messages, max_len=50)
    assert enc.input_ids == ids("<|system|> fine <|end|> <|user|> hi <|end|> <|assistant|> bad <|end|>")
    assert enc.loss_mask == [0] * 7 + [1, 1]


def test_lm_messages_with_no_assistant_token_left(tok):
    with pytest.raises(DataError, match="no assistant tokens within max_len=4"):
        encode_lm(tok, CONVERSATION, max_len=4, completion_only=True)


# ----------------------------------------------------------------------------------------------- rows
def encoded(tok, rows, fmt, **cfg):
    records = [Record(f"d.jsonl:{i}", row) for i, row in enumerate(rows, 1)]
    return encode_rows(validate(records, fmt=fmt), tok, DataConfig(**cfg))


def test_encode_rows_lm_and_prompt_completion(tok):
    lm = encoded(tok, [{"text": "hello"}, {"messages": user("hi") + assistant("good")}], "lm")
    assert lm.rows == [
        {"input_ids": [BOS, *ids("hello"), EOS], "loss_mask": [1, 1, 1]},
        {"input_ids": ids("<|user|> hi <|end|> <|assistant|> good <|end|>"), "loss_mask": [0, 0, 0, 0, 1, 1]},
    ]
    row = [{"prompt": "hello", "completion": "good"}]
    assert encoded(tok, row, "prompt_completion").rows == [
        {"input_ids": [BOS, *ids("hello good"), EOS], "loss_mask": [0, 0, 1, 1]}
    ]
    assert encoded(tok, row, "prompt_completion", completion_only=False).rows[0]["loss_mask"] == [1, 1, 1, 1]


def test_encode_rows_prompt_keeps_extra_columns(tok):
    out = encoded(tok, [{"prompt": "one two", "answer": "3"}], "prompt", max_prompt_len=2)
    assert out.rows == [{"prompt": "one two", "answer": "3", "prompt_ids": ids("one two")}] and out.truncated == 1


def test_encode_rows_preference(tok):
    rows = [
        {"prompt": "hello", "chosen": "good", "rejected": "bad dog", "margin": 2},
        {"prompt": user("hi"), "chosen": assistant("fine"), "rejected": assistant("bad")},
    ]
    out = encoded(tok, rows, "preference")
    assert out.rows[0] == {
        "chosen_ids": [BOS, *ids("hello good"), EOS],
        "chosen_mask": [0, 0, 1, 1],
        "rejected_ids": [BOS, *ids("hello bad dog"), EOS],
        "rejected_mask": [0, 0, 1, 1, 1],
        "prompt_len": 2,
        "margin": 2.0,
    }
    assert out.rows[1]["chosen_ids"] == ids("<|user|> hi <|end|> <|assistant|> fine <|end|>")
    assert out.rows[1]["prompt_len"] == 4 and out.rows[1]["margin"] == 0.0


def test_encode_rows_ranked_unpaired_rated(tok):
    ranked = encoded(tok, [{"prompt": "hi", "responses": ["good", "fine", "bad"]}], "ranked").rows[0]
    assert ranked["responses_ids"] == [[BOS, *ids(f"hi {w}"), EOS] for w in ("good", "fine", "bad")]
    assert ranked["responses_mask"] == [[0, 0, 1, 1]] * 3
    unpaired = encoded(tok, [{"prompt": "hi", "completion": "bad", "label": "false"}], "unpaired").rows[0]
    assert unpaired == {"input_ids": [BOS, *ids("hi bad"), EOS], "loss_mask": [0, 0, 1, 1], "label": False}
    rated = encoded(
        tok,
        [
            {
                "prompt": "hi",
                "completions": ["good", "bad"],
                "ratings": [{"honest": 4, "helpful": 5}, {"helpful": 1, "honest": 2.5}],
            }
        ],
        "rated",
    ).rows[0]
    assert rated["attributes"] == ["helpful", "honest"] and rated["ratings"] == [[5.0, 4.0], [1.0, 2.5]]
    assert rated["completions_ids"] == [[BOS, *ids("hi good"), EOS], [BOS, *ids("hi bad"), EOS]]
    assert rated["completions_mask"] == [[0, 0, 1, 1]] * 2


LONG = {"prompt": "one two three four five", "chosen": "good", "rejected": "bad"}
SHORT = {"prompt": "hi", "chosen": "good", "rejected": "bad"}


def test_over_long_rows_are_bad_rows_named_by_location_and_field(tok):
    """max_prompt_len 6 >= max_len 6: the 6-token prompt leaves no room for the completion."""
    with pytest.raises(DataError) as error:
        encoded(tok, [SHORT, LONG, SHORT], "preference", max_prompt_len=6, max_len=6)
    assert "1 of 3 rows are bad" in str(error.value)
    assert (
        "d.jsonl:2: field 'chosen': completion truncated to nothing: the prompt keeps 6 tokens "
        "(max_prompt_len=6) and max_len=6"
    ) in str(error.value)
    out = encoded(tok, [SHORT, LONG, SHORT], "preference", max_prompt_len=6, max_len=6, on_bad_row="skip")
    assert out.where == ["d.jsonl:1", "d.jsonl:3"] and len(out.rows) == 2 and out.skipped == 1
    assert out.summary().startswith(
        "data: 2 preference rows tokenised, 1 rows skipped, 0 rows truncated\n  d.jsonl:2: field 'chosen'"
    )
    with pytest.raises(DataError, match="every row is bad"):
        encoded(tok, [LONG, LONG], "preference", max_prompt_len=6, max_len=6, on_bad_row="skip")


def test_pair_identical_after_truncation_is_a_bad_row(tok):
    """'good dog one' vs 'good dog two' after [bos hi] with max_len 4 both become [bos hi good dog]."""
    row = {"prompt": "hi", "chosen": "good dog one", "rejected": "good dog two"}
    with pytest.raises(DataError, match="d.jsonl:1: field 'rejected': same tokens as 'chosen' once cut to max_len=4"):
        encoded(tok, [row, SHORT], "preference", max_len=4)
    assert encoded(tok, [row, SHORT], "preference", max_len=5).truncated == 1


def test_response_in_a_list_is_named_in_the_report(tok):
    rows = [
        {"prompt": "one two three four five", "responses": ["good", "bad"]},
        {"prompt": "hi", "responses": ["fine", "bad"]},
    ]
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'responses' \(response 1\): completion truncated"):
        encoded(tok, rows, "ranked", max_prompt_len=6, max_len=6)
