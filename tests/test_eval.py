"""``alignflow eval``: text metrics against hand-derived values, the KL against a direct computation, accuracy on
real generations with known answers, the reward-KL frontier over a real RL run's checkpoints, and config errors."""

import json
import math

import pytest
import torch

from alignflow.cli import main
from alignflow.config import ConfigError, EvalConfig, ModelConfig, RLConfig, from_dict
from alignflow.eval.evaluate import distinct_n, kl_metrics, policy_logprobs, policy_metrics, run_eval
from alignflow.eval.frontier import frontier_from_metrics
from alignflow.eval.metrics import accuracy_metrics, answer_correct, extracted_answer, self_bleu, sentence_bleu
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.rollout.sample import sample, sample_batch

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def eval_cfg(task, out, /, **kw) -> EvalConfig:  # (positional: kw may hold a "task" section)
    base = {
        "tokenizer": str(task.tokenizer_dir),
        "num_prompts": 4,
        "samples_per_prompt": 2,
        "max_new_tokens": 8,
        "output_dir": str(out),
        "task": {"name": task.name, **TINY},
    }
    return from_dict(EvalConfig, base | kw)


# ----------------------------------------------------------------------------------------------- text metrics
def test_distinct_n_hand_example():
    """'a b a b' has bigrams ab, ba, ab: 2 distinct of 3; unigrams a, b of 4 tokens: 0.5."""
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert distinct_n([""], 2) == 0.0


def test_self_bleu_hand_values():
    """Identical samples -> 1; samples sharing no word -> 0 (unigram precision is not smoothed).

    'a b c d' vs the reference 'a b c e' (and the other way round, by symmetry):
      p1 = 3/4 (a, b, c match);  p2 = (2 + 1)/(3 + 1) = 3/4 (ab, bc of ab, bc, cd; add-one smoothing);
      p3 = (1 + 1)/(2 + 1) = 2/3 (abc of abc, bcd);  p4 = (0 + 1)/(1 + 1) = 1/2;  equal lengths: BP = 1;
      BLEU = (3/4 * 3/4 * 2/3 * 1/2) ** (1/4) = (3/16) ** (1/4) = 0.65804.
    Brevity: 'a b' vs 'a b c d': p1 = 1, p2 = (1+1)/(1+1) = 1, p3 = p4 = (0+1)/(0+1) = 1; BP = exp(1 - 4/2) = e^-1.
      'a b c d' vs 'a b': p1 = 2/4, p2 = (1+1)/(3+1), p3 = (0+1)/(2+1), p4 = (0+1)/(1+1); c > r: BP = 1;
      BLEU = (1/2 * 1/2 * 1/3 * 1/2) ** (1/4) = (1/24) ** (1/4). Self-BLEU = the mean of the two.
    """
    assert self_bleu(["x y z w", "x y z w", "x y z w"]) == pytest.approx(1.0)
    assert self_bleu(["a b c", "d e f", "g h"]) == 0.0
    assert self_bleu(["a b c d", "a b c e"]) == pytest.approx((3 / 16) ** 0.25)
    assert (3 / 16) ** 0.25 == pytest.approx(0.65804, abs=1e-5)
    assert self_bleu(["a b", "a b c d"]) == pytest.approx((math.exp(-1) + (1 / 24) ** 0.25) / 2)
    assert self_bleu(["only one"]) is None


def test_sentence_bleu_clipping_and_closest_reference():
    """Clipping: 'the the the the' vs 'the cat' -- 'the' counts at most once: p1 = 1/4, p2 = (0+1)/(3+1),
    p3 = (0+1)/(2+1), p4 = (0+1)/(1+1); BLEU = (1/96) ** (1/4).
    Closest reference length, ties to the shorter: 'a b c' vs refs 'a b' (2) and 'a b c d' (4) is a tie at
    distance 1, so r = 2 < c = 3 and BP = 1; all precisions are 1 (every n-gram is in the second reference)."""
    assert sentence_bleu("the the the the".split(), ["the cat".split()]) == pytest.approx((1 / 96) ** 0.25)
    assert sentence_bleu("a b c".split(), ["a b".split(), "a b c d".split()]) == pytest.approx(1.0)
    assert sentence_bleu("a b c".split(), ["a b c d".split()]) == pytest.approx(math.exp(1 - 4 / 3))
    assert sentence_bleu([], ["a".split()]) == 0.0


def test_accuracy_metrics_on_given_strings():
    """Prompt 1 (answer 95): '95' and 'the answer is 95' are right, '94' wrong; majority 95 (2 votes) is right.
    Prompt 2 (answer 12): '13', 'x', '13' are all wrong; majority 13 is wrong. pass@1 = 2/6, pass@k = maj@k = 1/2."""
    m = accuracy_metrics([["95", "the answer is 95", "94"], ["13", "x", "13"]], ["95", "12"])
    assert m == pytest.approx({"eval/accuracy": 2 / 6, "eval/pass_at_k": 0.5, "eval/maj_at_k": 0.5})
    # a tie is won by the answer reached first; a sample without an answer does not vote
    assert accuracy_metrics([["94", "95", "none"]], ["95"])["eval/maj_at_k"] == 0.0
    assert accuracy_metrics([["none", "95"]], ["95"])["eval/maj_at_k"] == 1.0
    assert answer_correct("=095", "95") and answer_correct("1,234", 1234) and answer_correct("95.0", "95")
    assert not answer_correct("no number", "95") and extracted_answer("no number") is None
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        accuracy_metrics([["1"], ["2"]], ["1"])


def test_policy_metrics_of_given_texts():
    """Two copies of 'a b' (2 tokens each): distinct-1 = 2/4, distinct-2 = 1/2, self-BLEU 1; and 'c' alone: no
    self-BLEU, so the mean over prompts is over the first prompt only; lengths (2, 2, 1) average 5/3."""
    m = policy_metrics(
        ["p", "q"],
        [["a b", "a b"], ["c"]],
        [[2, 2], [1]],
        gold=lambda ps, ss: [len(s) for s in ss],
        rm_scores=[1.0, 2.0, 6.0],
    )
    assert m == pytest.approx(
        {
            "eval/response_len": 5 / 3,
            "eval/distinct_1": (0.5 + 1) / 2,
            "eval/distinct_2": (0.5 + 0) / 2,
            "eval/self_bleu": 1.0,
            "eval/gold_reward": (3 + 3 + 1) / 3,
            "eval/rm_score": 3.0,
        }
    )


# ----------------------------------------------------------------------------------------------- KL
def direct_kl(policy, ref, batch, temperature: float) -> tuple[float, float]:
    """Row by row, without padding: log-softmax(logits / T) of each response token under both models;
    returns (mean over rows of the summed k1, k3 averaged over all response tokens)."""
    k1_rows, k3_sum, tokens = [], 0.0, 0
    for i in range(len(batch)):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        resp = batch["response_ids"][i][batch["response_mask"][i].bool()].tolist()
        ids = torch.tensor([prompt + resp])
        pos = range(len(prompt) - 1, len(prompt) + len(resp) - 1)  # the positions that predict the response
        with torch.no_grad():
            lp = (policy(ids).logits[0] / temperature).log_softmax(-1)[list(pos), resp]
            lr = (ref(ids).logits[0] / temperature).log_softmax(-1)[list(pos), resp]
        k1_rows.append(float((lp - lr).sum()))
        k3_sum += float((torch.exp(lr - lp) - (lr - lp) - 1).sum())
        tokens += len(resp)
    return sum(k1_rows) / len(k1_rows), k3_sum / tokens


def test_kl_is_zero_to_itself_and_matches_a_direct_computation(reviews_task):
    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    policy = load_causal_lm(ModelConfig(name_or_path=str(reviews_task.model_dir)))
    ref = load_causal_lm(ModelConfig(name_or_path=str(reviews_task.model_dir)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    prompts = [tok(p)["input_ids"] for p in ("Review : the film", "Review : honestly , the plot was", "Review :")]
    batch = sample_batch(policy, tok, prompts, 4, 10, 0.7, 0)  # prompts of different lengths: left padding in play
    mask = batch["response_mask"]
    texts, lengths = sample(
        policy, tok, ["Review : the film", "Review : honestly , the plot was", "Review :"], 4, 10, 0.7, 0
    )  # the text-prompt wrapper samples the same
    assert [t for ts in texts for t in ts] == batch["response"] and sum(lengths, []) == mask.sum(-1).tolist()
    same = kl_metrics(policy_logprobs(policy, batch, 0.7), policy_logprobs(policy, batch, 0.7), mask)
    assert same == {"eval/kl": 0.0, "eval/kl_k3": 0.0}
    m = kl_metrics(policy_logprobs(policy, batch, 0.7), policy_logprobs(ref, batch, 0.7), mask)
    k1, k3 = direct_kl(policy, ref, batch, 0.7)
    assert m["eval/kl"] == pytest.approx(k1, abs=1e-4) and m["eval/kl_k3"] == pytest.approx(k3, abs=1e-5)
    assert m["eval/kl"] > 0.1 and m["eval/kl_k3"] > 0.01
    assert any(p.requires_grad for p in policy.parameters())  # computing log-probs left the model trainable


# ----------------------------------------------------------------------------------------------- end to end
def test_policy_eval_writes_metrics_and_samples(reviews_task, tmp_path):
    m = run_eval(
        eval_cfg(
            reviews_task,
            tmp_path,
            policy=str(reviews_task.model_dir),
            num_prompts=6,
            reference=str(reviews_task.model_dir),
        )
    )
    keys = (
        "eval/gold_reward",
        "eval/grammatical",
        "eval/response_len",
        "eval/truncated",
        "eval/distinct_1",
        "eval/distinct_2",
        "eval/self_bleu",
        "eval/kl",
        "eval/kl_k3",
    )
    assert set(keys) <= set(m) and json.loads((tmp_path / "eval.json").read_text()) == m
    assert 0 < m["eval/response_len"] <= 8 and 0 <= m["eval/truncated"] <= 1
    assert m["eval/kl"] == 0.0 and m["eval/kl_k3"] == 0.0  # the reference is the policy itself
    rows = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert len(rows) == 6 and all(len(r["samples"]) == 2 and r["kl"] == [0.0, 0.0] for r in rows)
    gold = [g for r in rows for g in r["gold_reward"]]
    assert m["eval/gold_reward"] == pytest.approx(sum(gold) / len(gold))
    lengths = [n for r in rows for n in r["length"]]
    assert m["eval/response_len"] == pytest.approx(sum(lengths) / len(lengths))
    assert m["eval/self_bleu"] == pytest.approx(sum(self_bleu(r["samples"]) for r in rows) / 6)


def test_arithmetic_accuracy_on_real_generations_with_known_answers(tmp_path):
    """Greedy decoding is deterministic row by row: answers set to the model's own extracted greedy answer for
    half of the prompts and to that answer + 1 for the other half give accuracy, pass@k and maj@k of exactly 1/2
    through the whole command (prompt file -> engine -> decode -> extraction -> metrics). The untrained tiny
    arithmetic model greedily writes '======'; with its LM head reduced to the digit rows (others zeroed) it
    writes digits instead, different ones for different prompts."""
    from tests.helpers import tiny_task

    task = tiny_task(tmp_path, "arithmetic", num_sft=10, num_pairs=10)
    tok = load_tokenizer(str(task.tokenizer_dir))
    model = load_causal_lm(ModelConfig(name_or_path=str(task.model_dir)))
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # (V, H)
        keep = head[digits].clone()
        head.zero_()
        head[digits] = keep
    model.save_pretrained(tmp_path / "digits")
    prompts = [json.loads(line)["prompt"] for line in open(task.eval_prompts_path)][:24]
    greedy = sample_batch(model, tok, [tok(p)["input_ids"] for p in prompts], 1, 6, 0.0, 0)["response"]
    known = [
        (p, extracted_answer(r)) for p, r in zip(prompts, greedy, strict=False) if extracted_answer(r) is not None
    ][:8]
    assert len(known) >= 4, greedy
    known = known[: len(known) // 2 * 2]
    rows = [{"prompt": p, "answer": a if i % 2 == 0 else str(int(a) + 1)} for i, (p, a) in enumerate(known)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len({a for _, a in known}) > 1  # not one constant output
    m = run_eval(
        eval_cfg(
            task,
            tmp_path / "ev",
            policy=str(tmp_path / "digits"),
            data={"path": str(path)},
            temperature=0.0,
            max_new_tokens=6,
            num_prompts=len(rows),
        )
    )
    assert m["eval/accuracy"] == m["eval/pass_at_k"] == m["eval/maj_at_k"] == 0.5
    assert "eval/gold_reward" not in m  # the gold reward belongs to the task's own prompts
    out = [json.loads(line) for line in open(tmp_path / "ev" / "samples.jsonl")]
    assert [r["correct"] for r in out] == [[i % 2 == 0] * 2 for i in range(len(rows))]


def test_reward_model_eval_on_pairs(reviews_task, tmp_path):
    from alignflow.config import RMConfig
    from alignflow.trainers.rm import train_rm

    train_rm(
        from_dict(
            RMConfig,
            {
                "model": {"name_or_path": str(reviews_task.model_dir), "tokenizer": str(reviews_task.tokenizer_dir)},
                "data": {"path": str(reviews_task.pairs_path), "max_len": 96},
                "train": {"output_dir": str(tmp_path / "rm"), "max_steps": 2, "progress": False},
            },
        )
    )
    m = run_eval(
        from_dict(
            EvalConfig,
            {
                "reward_model": str(tmp_path / "rm" / "model"),
                "data": {"path": str(reviews_task.pairs_path), "max_len": 96},
                "output_dir": str(tmp_path / "ev"),
            },
        )
    )
    assert 0.0 <= m["eval/accuracy"] <= 1.0 and "eval/ece" in m
    # the same reward model scores policy samples: eval/rm_score is the mean of the per-sample scores
    p = run_eval(
        eval_cfg(
            reviews_task,
            tmp_path / "pol",
            policy=str(reviews_task.model_dir),
            reward_model=str(tmp_path / "rm" / "model"),
        )
    )
    rows = [json.loads(line) for line in open(tmp_path / "pol" / "samples.jsonl")]
    scores = [s for r in rows for s in r["rm_score"]]
    assert len(scores) == 8 and p["eval/rm_score"] == pytest.approx(sum(scores) / 8)


# ----------------------------------------------------------------------------------------------- frontier
@pytest.fixture(scope="module")
def rl_run(reviews_task, tmp_path_factory):
    """Two GRPO steps on the tiny reviews model with a checkpoint after each (real checkpoints and metrics.jsonl)."""
    from alignflow.trainers.rl import train_rl

    out = tmp_path_factory.mktemp("rl") / "grpo"
    train_rl(
        from_dict(
            RLConfig,
            {
                "model": {"name_or_path": str(reviews_task.model_dir), "tokenizer": str(reviews_task.tokenizer_dir)},
                "data": {"path": str(reviews_task.prompts_path), "eval_path": str(reviews_task.eval_prompts_path)},
                "task": {"name": "reviews"},
                "reward": {"task": {"gold": 1.0}},
                "algo": {"name": "grpo"},
                "kl": {"coef": 0.05},
                "rollout": {"prompts_per_step": 2, "n": 4, "max_new_tokens": 6, "eval_prompts": 4},
                "optim": {"lr": 3e-2},
                "train": {
                    "output_dir": str(out),
                    "batch_size": 8,
                    "max_steps": 2,
                    "save_every": 1,
                    "log_every": 1,
                    "progress": False,
                },
            },
        )
    )
    return out


def test_frontier_over_checkpoints_writes_json_and_png(reviews_task, rl_run, tmp_path):
    ref = str(reviews_task.model_dir)
    run_eval(eval_cfg(reviews_task, tmp_path, reference=ref, frontier=[ref, str(rl_run)]))
    res = json.loads((tmp_path / "frontier.json").read_text())
    assert res["reward_key"] == "eval/gold_reward" and res["kl_key"] == "eval/kl"
    assert [p["label"] for p in res["points"]] == ["task-reviews/model", "grpo/step-1", "grpo/step-2", "grpo/model"]
    ref_point, step1, step2, final = res["points"]
    assert ref_point["kl"] == 0.0 and ref_point["metrics"]["eval/kl_k3"] == 0.0
    assert step1["metrics"]["eval/kl_k3"] > 0 and step2["metrics"]["eval/kl_k3"] > 0
    assert all(
        p["reward"] == p["metrics"]["eval/gold_reward"] and p["kl"] == p["metrics"]["eval/kl"] for p in res["points"]
    )
    # the last checkpoint, loaded onto the reference's architecture, is the saved final model
    assert step2["metrics"] == final["metrics"]
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "frontier" / "3" / "samples.jsonl").read_text().splitlines()) == 4


def test_frontier_from_rl_metrics(rl_run, tmp_path):
    runs = frontier_from_metrics([rl_run], tmp_path / "rl_frontier.png")
    logged = [json.loads(line) for line in open(rl_run / "metrics.jsonl")]
    expect = [
        {"step": r["step"], "kl": r["policy/kl"], "reward": r["rollout/reward_mean"]}
        for r in logged
        if "policy/kl" in r
    ]
    assert runs == {"grpo": expect} and len(expect) == 2
    assert (tmp_path / "rl_frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "rl_frontier.json").read_text())["runs"] == runs
    # the final evaluation row (eval/gold_reward) merges with the training row of the same step
    gold = frontier_from_metrics([rl_run / "metrics.jsonl"], tmp_path / "g.png", reward_key="eval/gold_reward")
    assert [p["step"] for p in gold["grpo"]] == [2] and gold["grpo"][0]["kl"] == expect[1]["kl"]
    with pytest.raises(ValueError, match="no step logs both 'policy/kl' and 'eval/nope'.*rollout/reward_mean"):
        frontier_from_metrics([rl_run], tmp_path / "x.png", reward_key="eval/nope")
    with pytest.raises(FileNotFoundError, match="missing"):
        frontier_from_metrics([tmp_path / "missing.jsonl"], tmp_path / "x.png")


def test_plot_without_matplotlib_is_a_clear_error(rl_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        frontier_from_metrics([rl_run], tmp_path / "f.png")
    assert (tmp_path / "f.json").exists()  # the numbers are written before the plot


# ----------------------------------------------------------------------------------------------- config errors
def test_bad_configs_are_clear_errors(reviews_task, tmp_path, capsys, monkeypatch):
    ref = str(reviews_task.model_dir)
    with pytest.raises(ConfigError, match=r"frontier\[1\]: .*nope is not a directory"):
        run_eval(eval_cfg(reviews_task, tmp_path, reference=ref, frontier=[ref, str(tmp_path / "nope")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"frontier\[0\]: .*not a model directory"):
        run_eval(eval_cfg(reviews_task, tmp_path, reference=ref, frontier=[str(tmp_path / "empty")]))
    with pytest.raises(ConfigError, match="set reference="):
        run_eval(eval_cfg(reviews_task, tmp_path, frontier=[ref]))
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run_eval(eval_cfg(reviews_task, tmp_path))
    (tmp_path / "runs").mkdir()  # runs/ppo/model below is a local path (runs/ exists), not a hub id
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^policy: runs/ppo/model does not exist \(cwd: .*\); run the command"):
        run_eval(eval_cfg(reviews_task, tmp_path / "e", policy="runs/ppo/model"))
    with pytest.raises(ConfigError, match="task.name: 'chess' is not one of reviews, arithmetic"):
        from_dict(EvalConfig, {"policy": ref, "task": {"name": "chess"}})
    assert main(["eval", f"reference={ref}", f"frontier={tmp_path / 'gone'}", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "frontier[0]" in err and "gone" in err and "Traceback" not in err


def test_a_policy_of_another_task_is_a_clear_error(reviews_task, tmp_path):
    """An arithmetic model (22-token vocabulary) evaluated against the reviews SFT model: before, with the
    arithmetic tokenizer the policy line ran and reported a KL of ~20 nats and no grammatical sample, and the
    frontier of a checkpoint was a load_state_dict traceback. Each is now one line naming the key."""
    import shutil

    from safetensors.torch import save_file

    from tests.helpers import tiny_task

    arith = tiny_task(tmp_path / "a", "arithmetic", num_sft=10, num_pairs=10)
    ref = tmp_path / "ref"  # the reviews model with its tokenizer saved beside it, as a trained run's model/ is
    shutil.copytree(reviews_task.model_dir, ref)
    load_tokenizer(str(reviews_task.tokenizer_dir)).save_pretrained(str(ref))
    policy = str(arith.model_dir)
    v_ref = len(load_tokenizer(str(reviews_task.tokenizer_dir)))
    v_pol = load_causal_lm(ModelConfig(name_or_path=policy)).get_input_embeddings().num_embeddings
    assert v_pol < v_ref
    with pytest.raises(
        ConfigError, match=rf"^policy: .* has a vocabulary of {v_pol} tokens but the tokenizer has {v_ref}"
    ):
        run_eval(eval_cfg(reviews_task, tmp_path / "e1", policy=policy, reference=str(ref)))
    arith_tok = str(arith.tokenizer_dir)
    with pytest.raises(
        ConfigError, match=rf"^reference: .*ref was trained with another tokenizer .*\({v_ref} tokens against {v_pol};"
    ):
        run_eval(eval_cfg(reviews_task, tmp_path / "e2", policy=policy, reference=str(ref), tokenizer=arith_tok))
    step = tmp_path / "run" / "checkpoints" / "step-1"  # a checkpoint of the arithmetic model
    step.mkdir(parents=True)
    weights = load_causal_lm(ModelConfig(name_or_path=policy)).state_dict()
    save_file({k: v.clone() for k, v in weights.items()}, str(step / "model.safetensors"))  # (tied: cloned)
    (step / "trainer_state.json").write_text("{}")
    with pytest.raises(
        ConfigError,
        match=rf"^frontier: .*step-1/model.safetensors does not fit .* is \({v_pol}, \d+\) there, \({v_ref}, \d+\) in",
    ):
        run_eval(eval_cfg(reviews_task, tmp_path / "e3", reference=str(ref), frontier=[str(tmp_path / "run")]))
