"""Built-in tasks: determinism, tokenizer, chat template, tiny model, gold reward, Bradley-Terry labels."""

import hashlib
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignflow.config import ConfigError, TaskConfig
from alignflow.tasks import TASKS, arithmetic, build_task, common, reviews
from alignflow.tasks.common import read_jsonl

# The language tasks share one chat template, a large prompt pool and seeded pairs; the agentic tasks (calculator,
# code) have their own templates and fixed problem sets, tested in tests/test_tasks_builtin_agentic.py.
LANGUAGE_TASKS = ["reviews", "arithmetic"]

SMALL = dict(num_sft=300, num_pairs=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def small(name, **kw):
    return TaskConfig(name=name, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> artifacts: small builds (seed 0 twice, seed 1) of both tasks with label_noise=0."""
    root = tmp_path_factory.mktemp("tasks")
    out = {}
    for name in TASKS:
        out[name] = build_task(name, small(name, label_noise=0.0), root / name / "a")
        out[name + "_again"] = build_task(name, small(name, label_noise=0.0), root / name / "b")
        out[name + "_seed1"] = build_task(name, small(name, seed=1, label_noise=0.0), root / name / "c")
    return out


@pytest.fixture(scope="module")
def default_builds(tmp_path_factory, request):
    """Both tasks at the default TaskConfig (label_noise 1.0, 2000 pairs); build times printed, not asserted."""
    root = tmp_path_factory.mktemp("default")
    out, times = {}, {}
    for name in TASKS:
        t0 = time.perf_counter()
        out[name] = build_task(name, TaskConfig(name=name), root / name)
        times[name] = time.perf_counter() - t0
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n[build time, default TaskConfig] " + ", ".join(f"{k}: {v:.2f} s" for k, v in times.items()))
    return out


def file_hashes(d: Path) -> dict:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_gives_identical_files_and_weights(built, name):
    a, b = built[name], built[name + "_again"]
    assert file_hashes(a.dir) == file_hashes(b.dir)
    wa, wb = load_file(a.model_dir / "model.safetensors"), load_file(b.model_dir / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("name", LANGUAGE_TASKS)
def test_different_seed_gives_different_data_and_weights(built, name):
    a, c = built[name], built[name + "_seed1"]
    for attr in ("sft_path", "pairs_path", "prompts_path", "eval_prompts_path"):
        assert getattr(a, attr).read_bytes() != getattr(c, attr).read_bytes(), attr
    wa, wc = load_file(a.model_dir / "model.safetensors"), load_file(c.model_dir / "model.safetensors")
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_rebuild_reuses_then_overwrites_atomically(tmp_path):
    cfg = small("arithmetic", num_sft=20, num_pairs=10)
    art = build_task("arithmetic", cfg, tmp_path / "task")
    stamp = art.sft_path.stat().st_mtime_ns
    build_task("arithmetic", cfg, tmp_path / "task")  # same config and code: reused as is
    assert art.sft_path.stat().st_mtime_ns == stamp
    art2 = build_task("arithmetic", small("arithmetic", num_sft=30, num_pairs=10), tmp_path / "task")
    assert len(read_jsonl(art2.sft_path)) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]  # no temp or old directories left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a task directory"):
        build_task("arithmetic", cfg, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "user data"


def test_bad_task_name_and_model_shape_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="reviews, arithmetic"):
        build_task("poetry", TaskConfig(), tmp_path / "x")
    with pytest.raises(ConfigError, match="task.hidden_size"):
        build_task("reviews", small("reviews", hidden_size=30, num_heads=4), tmp_path / "y")
    assert not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------------ tokenizer
def test_reviews_tokenizer_round_trips_canonical_text(built):
    art = built["reviews"]
    tok = AutoTokenizer.from_pretrained(art.tokenizer_dir)
    assert tok.is_fast and tok.padding_side == "right"
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert 100 < len(tok) < 600
    for row in read_jsonl(art.sft_path)[:100]:
        text = row["prompt"] + row["completion"]
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.unk_token_id not in ids and tok.eos_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(tok("the plot felt slow.").input_ids) == [
        "<bos>",
        "the",
        "plot",
        "felt",
        "slow",
        ".",
    ]
    assert tok("the zeppelin").input_ids[-1] == tok.unk_token_id


def test_arithmetic_tokenizer_has_one_token_per_digit_and_operator(built):
    tok = AutoTokenizer.from_pretrained(built["arithmetic"].tokenizer_dir)
    assert tok.convert_ids_to_tokens(tok("37+58=").input_ids) == ["<bos>", "3", "7", "+", "5", "8", "="]
    for text in ("37+58=95", "90-7=83", "12*9=108"):
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert tok.decode(tok("95").input_ids + [tok.eos_token_id], skip_special_tokens=True) == "95"


@pytest.mark.parametrize("name", LANGUAGE_TASKS)
def test_chat_template_renders_and_tokenises_to_marker_tokens(built, name):
    tok = AutoTokenizer.from_pretrained(built[name].tokenizer_dir)
    content = "the film was good ." if name == "reviews" else "37+58="
    messages = [{"role": "system", "content": content}, {"role": "user", "content": content}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"<bos><|system|> {content} <|end|> <|user|> {content} <|end|> <|assistant|> "
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    body = tok.convert_ids_to_tokens(tok(content, add_special_tokens=False).input_ids)
    assert tok.convert_ids_to_tokens(ids) == (
        ["<bos>", "<|system|>"] + body + ["<|end|>", "<|user|>"] + body + ["<|end|>", "<|assistant|>"]
    )
    with pytest.raises(Exception, match="chat role"):
        tok.apply_chat_template([{"role": "tool", "content": content}], tokenize=False)


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("name", list(TASKS))
def test_model_loads_with_auto_class_and_matches_tokenizer(built, name):
    art = built[name]
    tok = AutoTokenizer.from_pretrained(art.tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(art.model_dir)
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and (art.model_dir / "model.safetensors").exists()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (len(tok), 32, 1, 2)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert c.tie_word_embeddings and c.max_position_embeddings == 512 and c._attn_implementation == "sdpa"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    batch = tok(
        ["37+58=", "1+1="] if name == "arithmetic" else ["the film was", "i loved"], padding=True, return_tensors="pt"
    )
    logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_model_init_is_seeded_and_leaves_global_rng_alone():
    tok = common.build_tokenizer(arithmetic.VOCAB, join="")
    state = torch.get_rng_state()
    m1, m2 = common.init_model(small("arithmetic"), tok), common.init_model(small("arithmetic"), tok)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=False))


# ------------------------------------------------------------------------------------------------ gold reward
def test_reviews_gold_hand_computed():
    """'the film was very good .' (prompt 'Review : the film', response ' was very good .').

    Tokens: the film was very good . -> n = 6 < 8, length_excess = 2, cost 0.1 * 2 = 0.2.
    raw = weight(good) * mult(very) = 1.0 * 1.5 = 1.5; sentiment = 2 * tanh(1.5 / 4) = 2 * tanh(0.375).
    Grammatical, punctuated, no repeats: gold = 2 * tanh(0.375) - 0.2.
    """
    (g,) = reviews.gold_reward(["Review : the film"], [" was very good ."])
    assert g == pytest.approx(2 * math.tanh(0.375) - 0.2, abs=1e-12)


def test_reviews_gold_prefers_positive_to_negative_fluent_reviews():
    prompt = "Review : the acting"
    pos = [" was truly wonderful , and the plot felt clever .", " seemed warm . we really loved the ending ."]
    neg = [" was truly awful , and the plot felt tedious .", " seemed stiff . we really hated the ending ."]
    gp, gn = reviews.gold_reward([prompt] * 2, pos), reviews.gold_reward([prompt] * 2, neg)
    assert all(p > 0.5 for p in gp) and all(n < -0.5 for n in gn)
    assert all(p > n for p, n in zip(gp, gn, strict=False))


def test_reviews_degenerate_positive_spam_scores_below_a_mild_fluent_review():
    spam, mild = "great great great great great", "the film was pretty good , and the soundtrack was fine ."
    assert reviews.naive_sentiment(spam) > reviews.naive_sentiment(mild)  # the shallow count goes up ...
    (g_spam, g_mild) = reviews.gold_reward(["", ""], [spam, mild])
    assert 0 < g_mild and g_spam < g_mild - 2  # ... the gold reward goes down
    c = reviews.gold_components("", spam)
    assert (c["repeats"], c["bad_sentences"], c["no_final_punct"]) == (4, 1, 1)


def test_reviews_gold_penalty_terms():
    """Each penalty changes gold by its documented cost, other terms held equal (all reviews 9-11 tokens)."""
    base = "the film was good and long , but the ending felt slow ."
    g = lambda r: reviews.gold_reward([""], [r])[0]  # noqa: E731
    # repeating 'good' instead of neutral 'long': the repeat is worth nothing and costs 0.5
    assert g(base) - g(base.replace("and long", "and good")) == pytest.approx(0.5)
    assert g(base) - g(base[:-2]) == pytest.approx(0.5)  # final "." missing (n 12 -> 11)
    swapped = "film the was good and long , but the ending felt slow ."
    assert reviews.gold_components("", swapped)["bad_sentences"] == 1
    assert g(base) - g(swapped) == pytest.approx(1.0)
    assert g(" ".join(["the film was good ."] * 9)) < g(base)  # too long and repetitive
    assert g("the film was not good .") < g("the film was good .")
    assert g("the film was not bad .") > g("the film was bad .")


def test_reviews_gold_is_deterministic_and_order_independent():
    prompts = ["Review : the film", "Review : i", "", "Review : sadly ,"]
    responses = [" was great .", " loved the cast .", "great great", " the plot was slow ."]
    g1 = reviews.gold_reward(prompts, responses)
    assert g1 == reviews.gold_reward(prompts, responses)
    assert g1[::-1] == reviews.gold_reward(prompts[::-1], responses[::-1])
    # special tokens from decoding with skip_special_tokens=False are ignored
    assert reviews.gold_reward(["<bos>Review : the film"], [" was great . <eos>"]) == g1[:1]


def test_reviews_lexicon_classes_are_consistent():
    assert not set(reviews.POSITIVE) & set(reviews.NEGATIVE)
    assert not (set(reviews.POSITIVE) | set(reviews.NEGATIVE)) & set(reviews.NEUTRAL)
    assert 200 <= len(reviews.VOCAB) <= 500
    tok = common.build_tokenizer(reviews.VOCAB)
    assert tok.unk_token_id not in tok(" ".join(reviews.VOCAB)).input_ids


def test_reviews_sft_corpus_is_grammatical_and_mixed_in_tone(built):
    art = built["reviews"]
    rows = read_jsonl(art.sft_path)
    assert len(rows) == 300
    comps = [reviews.gold_components(r["prompt"], r["completion"]) for r in rows]
    for r, c in zip(rows, comps, strict=False):
        assert r["prompt"].startswith("Review : ") and r["completion"].startswith(" ")
        assert (c["bad_sentences"], c["repeats"], c["no_final_punct"], c["length_excess"]) == (0, 0, 0, 0), r
    pos = sum(c["sentiment"] > 0.5 for c in comps) / len(comps)
    neg = sum(c["sentiment"] < -0.5 for c in comps) / len(comps)
    assert pos > 0.2 and neg > 0.2


@pytest.mark.parametrize("name", LANGUAGE_TASKS)
def test_eval_prompts_are_disjoint_from_training_prompts(built, name):
    art = built[name]
    train = (
        {r["prompt"] for r in read_jsonl(art.sft_path)}
        | {r["prompt"] for r in read_jsonl(art.prompts_path)}
        | {r["prompt"] for r in read_jsonl(art.pairs_path)}
    )
    evals = [r["prompt"] for r in read_jsonl(art.eval_prompts_path)]
    rl = [r["prompt"] for r in read_jsonl(art.prompts_path)]
    assert len(evals) == len(set(evals)) > 100 and len(rl) == len(set(rl)) > 500
    assert not train & set(evals)


# ------------------------------------------------------------------------------------------------ BT labels
@pytest.mark.parametrize("name", list(TASKS))
def test_zero_label_noise_always_chooses_the_higher_gold(built, name):
    art = built[name]
    pairs = read_jsonl(art.pairs_path)
    assert len(pairs) == 300 and all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
    if name == "code":  # its gold reward runs every program in the sandbox: 600 programs took 44 s, 160 take ~8
        pairs = pairs[:80]
    prompts = [p["prompt"] for p in pairs]
    gc = art.gold_reward(prompts, [p["chosen"] for p in pairs])
    gr = art.gold_reward(prompts, [p["rejected"] for p in pairs])
    assert all(c >= r for c, r in zip(gc, gr, strict=False))
    assert sum(c > r for c, r in zip(gc, gr, strict=False)) > 0.6 * len(
        pairs
    )  # labels are informative, not mostly ties


def test_label_noise_gives_imperfect_but_informative_labels(default_builds):
    art = default_builds["reviews"]
    pairs = read_jsonl(art.pairs_path)
    assert len(pairs) == 2000
    prompts = [p["prompt"] for p in pairs]
    gc = art.gold_reward(prompts, [p["chosen"] for p in pairs])
    gr = art.gold_reward(prompts, [p["rejected"] for p in pairs])
    agree = sum(c > r for c, r in zip(gc, gr, strict=False)) / len(pairs)
    assert 0.65 < agree < 0.95


def test_bradley_terry_draw_matches_sigmoid():
    """P(a preferred) = sigmoid((g_a - g_b) / noise): g_a - g_b = 1, noise 1 -> sigmoid(1) = 0.7311.

    20000 draws: standard error sqrt(0.73 * 0.27 / 20000) = 0.0031, so 0.02 is > 6 standard errors.
    """
    rng = common.task_rng("test", 0, "bt")
    rate = sum(common.bt_prefers_first(rng, 1.0, 0.0, 1.0) for _ in range(20000)) / 20000
    assert rate == pytest.approx(1 / (1 + math.exp(-1)), abs=0.02)
    assert common.bt_prefers_first(rng, 0.3, 0.2, 0.0) and not common.bt_prefers_first(rng, 0.2, 0.3, 0.0)


# ------------------------------------------------------------------------------------------------ arithmetic
def test_arithmetic_rows_have_correct_answers_and_wrong_sft_fraction(built):
    art = built["arithmetic"]
    for path in (art.prompts_path, art.eval_prompts_path):
        for row in read_jsonl(path):
            a, op, b = row["prompt"][:-1].replace("+", " + ").replace("-", " - ").replace("*", " * ").split()
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert row["answer"] == str(expected) and expected >= 0
    rows = read_jsonl(art.sft_path)
    correct = [r["completion"] == arithmetic.solve(r["prompt"]) for r in rows]
    assert all(r["completion"].isdigit() for r in rows)
    assert abs(1 - sum(correct) / len(rows) - arithmetic.WRONG_FRACTION) < 0.1
    assert arithmetic.solve("37+58=") == "95" and arithmetic.solve("90-7=") == "83"
    assert arithmetic.solve("12*9=") == "108"
    with pytest.raises(ValueError, match="37\\+58="):
        arithmetic.solve("what is 2+2?")


def test_arithmetic_format_and_accuracy_rewards():
    prompts = ["37+58="] * 7
    responses = ["95", " 95 ", "95<eos>", "96", "95+", "9 5", "095"]
    assert arithmetic.format_reward(prompts, responses) == [1, 1, 1, 1, 0, 0, 1]
    assert arithmetic.accuracy_reward(prompts, responses) == [1, 1, 1, 0, 0, 0, 0]
    assert arithmetic.accuracy_reward(prompts, responses, answers=["96"] * 7) == [0, 0, 0, 1, 0, 0, 0]
    assert arithmetic.gold_reward(prompts, responses) == arithmetic.accuracy_reward(prompts, responses)
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        arithmetic.accuracy_reward(["1+1=", "2+2="], ["2"])


def test_task_table_and_named_gold_rewards(built):
    assert set(TASKS) == {"reviews", "arithmetic", "calculator", "code", "bandit"}
    assert built["reviews"].gold_reward is reviews.gold_reward
    assert built["arithmetic"].gold_reward is arithmetic.gold_reward
    assert built["arithmetic"].rewards["format"] is arithmetic.format_reward
