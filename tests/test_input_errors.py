"""Malformed input ends in one clear report naming the file, the row and the field -- never a traceback, never a
silent drop -- and ``data.on_bad_row=skip`` drops only the bad rows (issue 11). Also the inputs that must be
accepted: a UTF-8 byte-order mark, TRL's implicit-prompt preference rows and a chat-template override.

The tokenizer is word-level (one token per word) with a ``<|role|> content <|end|>`` chat template, so that the
rows below tokenise without any download.
"""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from alignflow.config import ConfigError, DataConfig
from alignflow.data.formats import DataError, Unparseable, split_implicit_prompt, validate
from alignflow.data.loading import MAX_DEPTH, load_records
from alignflow.data.pipeline import prepare_data
from alignflow.data.render import encode_rows

WORDS = [
    "<pad>",
    "<bos>",
    "<eos>",
    "<unk>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|tool|>",
    "<|end|>",
    "hello",
    "world",
    "hi",
    "there",
    "good",
    "bad",
    "dog",
    "cat",
    "Q:",
    "A:",
]
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# A template like many real ones: it refuses roles other than user/assistant.
STRICT = (
    "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
    "{{ raise_exception('Conversation roles must be user or assistant') }}{% endif %}"
    "<|{{ m.role }}|> {{ m.content }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture
def tok():
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def msgs(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


GOOD = {"messages": msgs(("user", "hello"), ("assistant", "hi there"))}


def write_jsonl(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return str(path)


def row_problems(path, fmt="auto"):
    """The problems ``validate`` reports under ``skip``, and the rows it keeps."""
    checked = validate(load_records(path), fmt=fmt, on_bad_row="skip", source=path)
    return checked.examples, checked.rows


# ----------------------------------------------------------------------------------------------- roles
def test_validation_reports_an_unknown_role_and_skip_drops_only_that_row(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl", [json.dumps(GOOD), json.dumps({"messages": msgs(("human", "hello"), ("gpt", "hi"))})]
    )
    examples, rows = row_problems(path)
    assert rows == [GOOD]
    assert examples == [
        f"{path}:2: field 'messages': message 1: role 'human' is not one of system, developer, "
        "user, assistant, tool, function, ipython (use 'user')"
    ]
    with pytest.raises(DataError, match=r"chat\.jsonl:2: field 'messages': message 1: role 'human'"):
        validate(load_records(path), on_bad_row="error", source=path)


def test_a_role_the_template_refuses_is_a_bad_row_not_a_crash(tok, tmp_path):
    """'system' is a valid role, but this template raises on it: the row is reported with the template's own
    message (error) or dropped and counted (skip)."""
    tok.chat_template = STRICT
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [json.dumps(GOOD), json.dumps({"messages": msgs(("system", "hi"), ("user", "hello"), ("assistant", "good"))})],
    )
    checked = validate(load_records(path), source=path)
    with pytest.raises(
        DataError,
        match=r"chat\.jsonl:2: field 'messages': the chat template rejected these "
        r"messages: Conversation roles must be user or assistant",
    ):
        encode_rows(checked, tok, DataConfig(), on_bad_row="error")
    encoded = encode_rows(checked, tok, DataConfig(), on_bad_row="skip")
    assert len(encoded.rows) == 1 and encoded.skipped == 1
    assert encoded.examples[0].startswith(f"{path}:2: field 'messages': the chat template rejected")


# ----------------------------------------------------------------------------------------------- JSON structure
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100_000])
def test_deeply_nested_json_is_a_bad_row(tmp_path, depth):
    """100 000 levels overflow the JSON parser (RecursionError before); MAX_DEPTH + 1 levels parse but are refused
    so that nothing later recurses through them."""
    deep = '{"text": ' + "[" * depth + "]" * depth + "}"
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "hello"}', deep])
    records = load_records(path)
    assert records[1].row == Unparseable(f"nested too deeply (more than {MAX_DEPTH} levels of objects/arrays)")
    examples, rows = row_problems(path)
    assert rows == [{"text": "hello"}] and examples[0].startswith(f"{path}:2: nested too deeply")
    whole = tmp_path / "d.json"
    whole.write_text("[" * depth + "]" * depth)
    with pytest.raises(DataError, match=r"d\.json: nested too deeply|d\.json\[0\]"):
        validate(load_records(str(whole)), source=str(whole))


def test_duplicate_keys_name_the_line_and_the_key(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            '{"prompt": "Q:", "chosen": "good", "rejected": "bad"}',
            '{"prompt": "Q:", "chosen": "good", "rejected": "bad", "chosen": "dog"}',
            '{"messages": [{"role": "user", "content": "hi", "content": "hello"}, '
            '{"role": "assistant", "content": "A:"}]}',
        ],
    )
    records = load_records(path)
    assert records[1].row == Unparseable("duplicate key 'chosen' in one object (JSON would keep only its last value)")
    assert records[2].row == Unparseable("duplicate key 'content' in one object (JSON would keep only its last value)")
    json_path = tmp_path / "d.json"
    json_path.write_text('[{"text": "hi"}, {"text": "a", "text": "b"}]')
    assert load_records(str(json_path))[1] == (
        f"{json_path}[1]",
        Unparseable("duplicate key 'text' in one object (JSON would keep only its last value)"),
    )


# ----------------------------------------------------------------------------------------------- bytes and text
def test_a_byte_that_is_not_utf8_rejects_its_row_only(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [b'{"text": "hello"}', b'{"text": "caf\xe9"}', b'{"text": "world"}'])
    examples, rows = row_problems(path)
    assert rows == [{"text": "hello"}, {"text": "world"}]
    assert examples == [f"{path}:2: not UTF-8 text: byte 0xe9 at character 14"]
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"prompt,completion\nhello,world\nhi,th\xffere\n")
    examples, rows = row_problems(str(csv_path))
    assert rows == [{"prompt": "hello", "completion": "world"}]
    assert examples == [f"{csv_path}:3: field 'completion': not UTF-8 text: byte 0xff at character 3"]
    json_path = tmp_path / "d.json"
    json_path.write_bytes(b'[{"text": "hello"},\n {"text": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"d\.json:2: not UTF-8 text: byte 0xe9"):
        load_records(str(json_path))


@pytest.mark.parametrize(
    "name,content", [("d.jsonl", '{"text": "hello"}\n'), ("d.json", '[{"text": "hello"}]'), ("d.csv", "text\nhello\n")]
)
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    assert [r.row for r in load_records(str(path))] == [{"text": "hello"}]


def test_a_lone_surrogate_is_reported_with_its_field(tmp_path):
    """JSON may escape half of a surrogate pair; the text then has no UTF-8 form and no tokenizer can read it."""
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            '{"prompt": "Q:", "completion": "hi \\ud800 there"}',
            '{"prompt": "Q:", "completion": "good"}',
            '{"prompt": [{"role": "user", "content": "\\udc00"}], '
            '"completion": [{"role": "assistant", "content": "hi"}]}',
        ],
    )
    examples, rows = row_problems(path)
    assert rows == [{"prompt": "Q:", "completion": "good"}]
    assert examples == [
        f"{path}:1: field 'completion': lone surrogate '\\ud800' at character 4 is not valid Unicode text",
        f"{path}:3: field 'prompt': message 1: lone surrogate '\\udc00' at character 1 is not valid Unicode text",
    ]


# ----------------------------------------------------------------------------------------------- Parquet
@pytest.mark.parametrize(
    "content,what",
    [(b"", "an empty file (0 bytes)"), (b"PAR1 this is not parquet PAR1", "not a readable Parquet file (29 bytes)")],
)
def test_empty_or_corrupt_parquet_is_one_line_naming_the_file(tmp_path, content, what):
    path = tmp_path / "d.parquet"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_records(str(path))
    assert str(info.value).startswith(f"{path}: {what}: ") and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------- KTO labels
@pytest.mark.parametrize("label", [True, False])
def test_unpaired_rows_with_one_label_only_are_refused(tok, tmp_path, label):
    rows = [{"prompt": "Q:", "completion": c, "label": label} for c in ("good", "bad", "dog")]
    path = write_jsonl(tmp_path / "kto.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(
        DataError,
        match=rf"kto\.jsonl: field 'label': all 3 rows are labelled "
        rf"{str(label).lower()}; KTO needs both",
    ):
        prepare_data(DataConfig(path=path, eval_fraction=0.0), tok)
    rows[0]["label"] = not label  # one row of the other label is enough
    write_jsonl(tmp_path / "kto.jsonl", [json.dumps(r) for r in rows])
    assert len(prepare_data(DataConfig(path=path, eval_fraction=0.0), tok).train) == 3


# ----------------------------------------------------------------------------------------------- implicit prompt
def test_implicit_prompt_strings_split_where_the_sides_differ():
    """'Q: good dog' / 'Q: bad dog' share 'Q: '; the trailing space goes to the completions (TRL's rule)."""
    row, problem = split_implicit_prompt({"chosen": "Q: good dog", "rejected": "Q: bad dog", "id": 7})
    assert problem is None
    assert row == {"prompt": "Q:", "chosen": " good dog", "rejected": " bad dog", "id": 7}


def test_implicit_prompt_conversations_split_at_the_first_different_message(tok):
    shared = msgs(("system", "hi"), ("user", "hello"))
    records = [
        ("p.jsonl:1", {"chosen": shared + msgs(("assistant", "good")), "rejected": shared + msgs(("assistant", "bad"))})
    ]
    checked = validate(records, on_bad_row="error", source="p.jsonl")
    assert checked.format == "preference"
    assert checked.rows == [
        {"prompt": shared, "chosen": msgs(("assistant", "good")), "rejected": msgs(("assistant", "bad"))}
    ]
    (example,) = encode_rows(checked, tok, DataConfig()).rows
    assert tok.decode(example["chosen_ids"]) == (
        "<|system|> hi <|end|> <|user|> hello <|end|> <|assistant|> good <|end|>"
    )
    assert example["prompt_len"] == 7


@pytest.mark.parametrize(
    "chosen,rejected,problem",
    [
        ("good dog", "bad dog", "field 'prompt': missing, and 'chosen' and 'rejected' do not start the same way"),
        ("Q: good", "Q: good dog", "field 'chosen': the whole of it is the prompt shared with the other side"),
        ("Q: good", "Q: good", "field 'rejected': identical to 'chosen'"),
        (msgs(("user", "hi")), msgs(("user", "hello")), "field 'prompt': missing, and 'chosen' and 'rejected' do not"),
    ],
)
def test_implicit_prompt_that_cannot_be_split_is_a_bad_row(chosen, rejected, problem):
    checked = validate(
        [
            ("p.jsonl:1", {"chosen": chosen, "rejected": rejected}),
            ("p.jsonl:2", {"chosen": "Q: good", "rejected": "Q: bad"}),
        ],
        on_bad_row="skip",
    )
    assert checked.rows == [{"prompt": "Q:", "chosen": " good", "rejected": " bad"}]
    assert checked.examples[0].startswith(f"p.jsonl:1: {problem}")


# ----------------------------------------------------------------------------------------------- chat template
def test_chat_template_override_from_a_string_or_a_file(tok, tmp_path):
    """The override replaces the tokenizer's template before the rows are rendered: here a template that puts
    'Q:'/'A:' in front of the turns instead of role tags."""
    plain = (
        "{% for m in messages %}{{ 'Q:' if m.role == 'user' else 'A:' }} {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [json.dumps({"prompt": msgs(("user", "hello")), "completion": msgs(("assistant", "hi there"))})],
    )
    template_file = tmp_path / "template.jinja"
    template_file.write_text(plain)
    for value in (plain, str(template_file)):
        tok.chat_template = TEMPLATE
        data = prepare_data(DataConfig(path=path, eval_fraction=0.0, chat_template=value), tok)
        assert tok.chat_template == plain
        assert tok.decode(data.train[0]["input_ids"]) == "Q: hello A: hi there"


@pytest.mark.parametrize(
    "value,message",
    [
        ("no/such/template.jinja", "data.chat_template: 'no/such/template.jinja' is neither a Jinja template"),
        (
            "{% for m in messages %}",
            "data.chat_template: not a valid Jinja template: line 1: Unexpected end of template",
        ),
    ],
)
def test_bad_chat_template_is_a_config_error(tok, tmp_path, value, message):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD)])
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
        prepare_data(DataConfig(path=path, eval_fraction=0.0, chat_template=value), tok)


# ----------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.betas=[0.9]", "optim.betas: [0.9] must be two numbers (beta1, beta2), each in [0, 1)"),
        ("optim.betas=[0.9,0.99,0.5]", "optim.betas: [0.9, 0.99, 0.5] must be two numbers"),
        ("optim.betas=[0.9,1.0]", "optim.betas: [0.9, 1.0] must be two numbers (beta1, beta2), each in [0, 1)"),
        ("optim.betas=[-0.1,0.9]", "optim.betas: [-0.1, 0.9] must be two numbers"),
        ("optim.betas=[a,b]", "optim.betas[0]: expected a number, got 'a'"),
        ("optim.max_grad_norm=nan", "optim.max_grad_norm: nan is not allowed; give a finite number"),
        ("optim.lr=inf", "optim.lr: inf is not allowed; give a finite number"),
        ("optim.lr=-inf", "optim.lr: -inf is not allowed; give a finite number"),
        ("task.label_noise=NaN", "task.label_noise: nan is not allowed"),
        ("train.device=gpu", "train.device: 'gpu' is not a device; use auto, cpu, cuda, cuda:<index>, mps or xpu"),
        ("train.device=cuda:x", "train.device: 'cuda:x' is not a device"),
    ],
)
def test_bad_config_values_are_one_line_naming_the_key(override, message):
    """Each was accepted before (NaN and inf pass every range check: nan < lo and nan > hi are both false, and
    ``optim.max_grad_norm=nan`` then silently turned clipping off)."""
    from alignflow.config import SFTConfig, load_config

    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, None, [override])
    assert str(info.value).startswith(f"command line: {message}") and "\n" not in str(info.value)


def test_nan_is_refused_inside_yaml_mappings_and_optional_numbers(tmp_path):
    from alignflow.config import POConfig, RLConfig, load_config

    preset = tmp_path / "rl.yaml"
    preset.write_text("reward:\n  task: {gold: .nan}\n")
    with pytest.raises(ConfigError, match=r"rl\.yaml: reward\.task: nan is not allowed"):
        load_config(RLConfig, preset)
    with pytest.raises(ConfigError, match=r"loss\.beta: nan is not allowed"):
        load_config(POConfig, None, ["loss.beta=nan"])


def test_betas_from_the_command_line_become_numbers():
    from alignflow.config import SFTConfig, load_config

    assert load_config(SFTConfig, None, ["optim.betas=0.9,0.95"]).optim.betas == [0.9, 0.95]


def test_minus_inf_stays_allowed_where_it_is_documented():
    """mpo.delta = -inf means 'every pair is easy' (docs/mpo.md)."""
    from alignflow.config import MPOConfig, load_config

    assert load_config(MPOConfig, None, ["mpo.delta=-inf"]).mpo.delta == float("-inf")
    with pytest.raises(ConfigError, match="mpo.delta: nan"):
        load_config(MPOConfig, None, ["mpo.delta=nan"])


def test_rl_train_batch_larger_than_the_rollout_batch_is_refused():
    from alignflow.config import MPOConfig, RLConfig, from_dict, load_config

    with pytest.raises(
        ConfigError,
        match=r"^train\.batch_size=65 is larger than the rollout batch "
        r"rollout\.prompts_per_step x rollout\.n = 16 x 4 = 64 rows; use a "
        r"train\.batch_size in \[1, 64\]",
    ):
        load_config(RLConfig, None, ["train.batch_size=65"])
    assert load_config(RLConfig, None, ["train.batch_size=64"]).train.batch_size == 64
    with pytest.raises(ConfigError, match=r"^rl\.train\.batch_size=8 is larger than the rollout batch"):
        from_dict(MPOConfig, {"rl": {"train": {"batch_size": 8}, "rollout": {"prompts_per_step": 2, "n": 2}}})


# ----------------------------------------------------------------------------------------------- reward objectives
def test_num_objectives_on_preference_data_is_refused_before_training(reviews_task, tmp_path):
    from alignflow.config import RMConfig, from_dict
    from alignflow.trainers.rm import train_rm

    cfg = from_dict(
        RMConfig,
        {
            "model": {"name_or_path": str(reviews_task.model_dir), "tokenizer": str(reviews_task.tokenizer_dir)},
            "data": {"path": str(reviews_task.pairs_path), "max_len": 32},
            "reward": {"num_objectives": 3},
            "train": {"output_dir": str(tmp_path), "max_steps": 1, "progress": False},
        },
    )
    with pytest.raises(
        ConfigError,
        match=rf"^reward\.num_objectives=3 needs rated rows .*; {reviews_task.pairs_path} "
        r"holds preference rows",
    ):
        train_rm(cfg)
    assert not (tmp_path / "model").exists()


def test_num_objectives_must_match_the_rated_attributes():
    from alignflow.data.pipeline import PreparedData, check_objectives

    rated = PreparedData("rated", [{"attributes": ["helpfulness", "honesty"]}], [])
    check_objectives(rated, 1, "regression", "r.jsonl")  # 1: as the data says
    check_objectives(rated, 2, "regression", "r.jsonl")
    with pytest.raises(
        ConfigError,
        match=r"^reward\.num_objectives=3, but r\.jsonl rates 2 attributes "
        r"\(helpfulness, honesty\); set reward\.num_objectives=2",
    ):
        check_objectives(rated, 3, "regression", "r.jsonl")
    with pytest.raises(ConfigError, match=r"^reward\.loss=regression needs rated rows"):
        check_objectives(PreparedData("preference", [{}], []), 1, "regression", "p.jsonl")
