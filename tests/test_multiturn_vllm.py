"""Multi-turn episodes (``env.*``) on the vLLM backend, against the stand-in ``vllm`` module of
tests/test_vllm_engine.py (real vLLM needs a GPU; nothing here runs it): the episodes equal the built-in engine's
token for token, every turn is one request per live conversation (its token ids so far, its own seed, its own
``max_tokens``, log-probs on), the engine is built with prefix caching and is synced once and put to sleep once
per step (never between turns), and ``alignflow rl`` runs multi-turn GRPO on that backend.

The model is the calculator task's tiny Llama with its EOS logit tilted up (so that sampled turns end by EOS,
by the length cap or by the room left, and episodes last one to three turns); the environment is the scripted
counting user (three turns, env.path ``alignflow.envs.counting_user:make_env``)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignflow.batch import Batch
from alignflow.config import RLConfig, from_dict
from alignflow.distributed.groups import LocalGroup
from alignflow.envs.counting_user import make_env, make_rows
from alignflow.envs.multiturn import MultiTurnLimits, rollout_episodes
from alignflow.models.loading import load_tokenizer
from alignflow.rollout import HFEngine, SamplingParams
from alignflow.rollout.vllm_engine import VLLMEngine, actor_weights, request_seeds
from alignflow.tasks.common import write_jsonl
from alignflow.trainers.multiturn_rl import run_episodes, turn_metrics
from alignflow.trainers.rl import train_rl
from alignflow.trainers.roles import Rollout
from tests.helpers import tiny_task
from tests.test_vllm_engine import FakeLLM, as_vllm_outputs, fake_vllm  # noqa: F401 (fake_vllm: a fixture)

MAX_NEW, MAX_TOKENS, TILT = 6, 22, 1.5  # per turn; per episode (first prompt 5 tokens, observation 4); EOS tilt


class KeyedLLM(FakeLLM):
    """The stand-in ``vllm.LLM`` with vLLM's per-request seeding: a seeded request draws the keyed noise of its
    own seed (HFEngine with ``seeds=[request seed]``), so its sample depends on that seed alone, as with vLLM's
    per-request generator. A prefix cache in blocks of ``BLOCK`` tokens, as vLLM's: a request's
    ``num_cached_tokens`` is its longest common prefix with an earlier request + response since the last reset
    or sleep, at most its length - 1 (the last token is always computed), rounded down to whole blocks.
    Records every request (prompt token ids, the vLLM sampling keywords, the cached tokens)."""

    BLOCK = 4

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.requests: list = []
        self.cache: list[list[int]] = []

    def reset_prefix_cache(self):
        self.cache = []
        return super().reset_prefix_cache()

    def sleep(self, level=1):
        self.cache = []
        super().sleep(level)

    def _hits(self, prompt: list[int]) -> int:
        def common(seq: list[int]) -> int:
            pairs = zip(prompt, seq, strict=False)
            return next((k for k, (a, b) in enumerate(pairs) if a != b), min(len(prompt), len(seq)))

        return min(max(map(common, self.cache), default=0), len(prompt) - 1) // self.BLOCK * self.BLOCK

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        ids = [list(p["prompt_token_ids"]) for p in prompts]
        hits = [self._hits(p) if self.kwargs["enable_prefix_caching"] else 0 for p in ids]
        self.requests.append([(p, sp.kw, h) for p, sp, h in zip(ids, sampling_params, hits, strict=True)])
        outputs = super().generate(prompts, sampling_params, use_tqdm)
        for p, out, h in zip(ids, outputs, hits, strict=True):
            out.num_cached_tokens = h
            self.cache += [p + list(c.token_ids) for c in out.outputs]
        return outputs

    def _one(self, prompt, kw):
        params = SamplingParams(
            n=kw["n"],
            temperature=kw["temperature"],
            max_new_tokens=kw["max_tokens"],
            stop_token_ids=kw["stop_token_ids"],
            seeds=None if kw["seed"] is None else [kw["seed"]],
            logprobs=True,
        )
        out = HFEngine(self.model, self.tokenizer).generate([prompt], params)
        return as_vllm_outputs(out, kw["n"], self.tokenizer.eos_token_id, kw["max_tokens"])[0]


class VllmSeeded:
    """The built-in engine with each prompt's seed replaced by the request seed VLLMEngine derives from it: the
    reference the keyed stand-in must equal."""

    def __init__(self, inner):
        self.inner = inner

    def generate(self, prompt_ids, params):
        seeds = None if params.seeds is None else request_seeds(params, len(prompt_ids))
        return self.inner.generate(prompt_ids, dataclasses.replace(params, seeds=seeds))


@pytest.fixture
def keyed_vllm(fake_vllm):  # noqa: F811
    fake_vllm.LLM = KeyedLLM
    return fake_vllm


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    """(task, model dir, tokenizer): the calculator task's model with the EOS row of its output layer moved
    1.5 along the mean final hidden state of random sequences (EOS becomes likelier, not certain)."""
    root = tmp_path_factory.mktemp("mt_vllm")
    task = tiny_task(root, "calculator", num_sft=16, num_pairs=8)
    tok = load_tokenizer(str(task.tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(task.model_dir).eval()
    with torch.no_grad():
        torch.manual_seed(0)
        h = model.model(torch.randint(3, len(tok), (16, 12))).last_hidden_state.mean((0, 1))
        model.lm_head.weight[tok.eos_token_id] += TILT * h / h.norm()
    model.save_pretrained(root / "tilted")
    return task, root / "tilted", tok


def rl_cfg(task, model_dir, out, **sections) -> RLConfig:
    base = {
        "model": {"name_or_path": str(model_dir), "tokenizer": str(task.tokenizer_dir)},
        "data": {"path": str(out / "rows.jsonl"), "eval_path": str(out / "rows.jsonl")},
        "task": {"name": "calculator"},
        "env": {"path": "alignflow.envs.counting_user:make_env", "max_turns": 3, "max_tokens": MAX_TOKENS},
        "algo": {"name": "grpo"},
        "kl": {"coef": 0.0},
        "rollout": {"backend": "vllm", "prompts_per_step": 2, "n": 2, "max_new_tokens": MAX_NEW, "eval_prompts": 2},
        "optim": {"lr": 1e-3},
        "train": {"output_dir": str(out), "batch_size": 4, "max_steps": 2, "progress": False, "eval_every": 1},
    }
    for k, v in sections.items():
        base[k] = base.get(k, {}) | v
    return from_dict(RLConfig, base)


def turn_prompts(traj) -> list[tuple]:
    """The token ids the episode sent at each turn: its sequence up to each run of the model's own tokens."""
    m = traj.loss_mask
    return [tuple(traj.token_ids[:i]) for i in range(len(m)) if m[i] and not m[i - 1]]


def test_sampled_episodes_on_vllm_equal_the_builtin_engine(keyed_vllm, counting, tmp_path):
    """Four prompt rows x 2 sampled episodes (seeded), through the rollout role on each backend: the same
    trajectories (token ids, loss masks, messages, per-turn rewards, finishes; log-probs to float rounding) and
    the same training batch. On the vLLM side: the engine was built with prefix caching; the step is one weight
    sync, one generate per turn, one sleep, and no cache reset or sleep between the turns; each request is an
    episode's sequence so far, with one sample, log-probs, its own seed and ``max_tokens = min(6, 22 - its
    length)`` (the room left: so rows get different caps)."""
    task, model_dir, tok = counting
    cfg = rl_cfg(task, model_dir, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = make_rows(4, seed=1)
    prompts = Batch(meta={"prompt": [r["prompt"] for r in rows], "group": [10, 11, 12, 13]})
    vllm_role = Rollout(model, tok, cfg.rollout, "cpu", seed=0)
    builtin = Rollout(model, tok, dataclasses.replace(cfg.rollout, backend="builtin"), "cpu", seed=0)
    builtin.engine = VllmSeeded(builtin.engine)
    got_t, got, _ = run_episodes(SimpleNamespace(rollout=LocalGroup(vllm_role)), prompts, cfg, 2, False, 77)
    want_t, want, _ = run_episodes(SimpleNamespace(rollout=LocalGroup(builtin)), prompts, cfg, 2, False, 77)

    for g, w in zip(got_t, want_t, strict=True):
        assert (g.token_ids, g.loss_mask, g.messages) == (w.token_ids, w.loss_mask, w.messages)
        assert (g.turn_rewards, g.finish) == (w.turn_rewards, w.finish)
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-4)
    for k in want.tensors:
        close = torch.allclose if k == "sampling_logprobs" else torch.equal
        assert close(got[k], want[k]), k
    assert got["group"] == want["group"] == [10, 10, 11, 11, 12, 12, 13, 13] and got["scores"].tolist()
    turns = [t.turns for t in got_t]
    assert max(turns) >= 2 and {"done", "length"} <= {t.finish for t in got_t}, [(t.turns, t.finish) for t in got_t]

    llm = FakeLLM.instances[-1]
    assert llm.kwargs["enable_prefix_caching"] is True
    assert llm.calls[:2] == [("rpc", "alignflow_load_weights"), ("reset_prefix_cache",)]
    assert [c[0] for c in llm.calls[2:-1]] == ["generate"] * max(turns) and llm.calls[-1] == ("sleep", 2)
    sent = [(ids, kw) for turn in llm.requests for ids, kw, _ in turn]
    assert sorted(tuple(ids) for ids, _ in sent) == sorted(p for t in got_t for p in turn_prompts(t))
    assert all(kw["n"] == 1 and kw["logprobs"] == 0 for _, kw in sent)
    assert [kw["max_tokens"] for _, kw in sent] == [min(MAX_NEW, MAX_TOKENS - len(ids)) for ids, _ in sent]
    assert min(kw["max_tokens"] for _, kw in sent) < MAX_NEW  # a row near its episode's end got less room
    assert len({kw["seed"] for _, kw in sent}) == len(sent)  # one seed per episode and turn
    hits = [[h for _, _, h in turn] for turn in llm.requests]
    assert set(hits[0]) == {0} and all(h > 0 for turn in hits[1:] for h in turn)  # cache kept between turns only
    cached, sent_tokens = sum(map(sum, hits)), sum(len(ids) for ids, _ in sent)
    assert turn_metrics(got_t)["prefix_cache/hit_frac"] == pytest.approx(cached / sent_tokens)


def test_episode_keys_and_engine_caps(keyed_vllm, counting):
    """``params.seeds`` gives episode e the key seeds[e] (the turn's seed is key + turn), so an episode run
    alone equals the same episode run among others; a wrong count of seeds, or caps outside [1, max_new_tokens],
    are refused with a line naming them."""
    _, model_dir, tok = counting
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    engine, rows = HFEngine(model, tok), make_rows(3, seed=2)

    def episodes(keys, rows):
        params = SamplingParams(max_new_tokens=MAX_NEW, seeds=keys, logprobs=True)
        return rollout_episodes(engine, tok, [make_env() for _ in rows], rows, params, MultiTurnLimits(3, 40))

    together, alone = episodes([5, 900, 77], rows), episodes([900], rows[1:2])
    assert together[1].token_ids == alone[0].token_ids and together[1].logprobs == alone[0].logprobs
    with pytest.raises(ValueError, match="2 seeds for 3 episodes"):
        episodes([1, 2], rows)
    vllm = VLLMEngine.from_model(model, tok)
    vllm.sync_weights(actor_weights(model))
    with pytest.raises(ValueError, match=r"one integer in \[1, 4\].*for each of the 2 prompts"):
        vllm.generate([[3, 4], [5]], SamplingParams(max_new_tokens=4), max_new_tokens=[2, 5])


def test_rl_runs_multiturn_grpo_on_the_vllm_backend(keyed_vllm, counting, tmp_path):
    """Two GRPO steps of counting episodes through ``alignflow rl`` with rollout.backend=vllm (the stand-in):
    the run completes, writes every episode of both steps to trajectories.jsonl and reports episode metrics
    and the greedy episode evaluation; the engine got the actor's weights before each step's and each
    evaluation's episodes and slept after each."""
    task, model_dir, _ = counting
    write_jsonl(tmp_path / "rows.jsonl", make_rows(8, seed=3))
    result = train_rl(rl_cfg(task, model_dir, tmp_path))
    assert len(result.history) == 2 and "eval/reward_mean" in result.evals[-1][1]
    lines = [json.loads(x) for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0] * 4 + [1] * 4 and all(1 <= x["turns"] <= 3 for x in lines)
    assert all(
        "episode/turns_mean" in m and m["rollout/reward_mean"] == m["episode/return_mean"] for m in result.history
    )
    assert all(0.0 < m["prefix_cache/hit_frac"] < 1.0 for m in result.history)  # reported (stand-in's cache)
    calls = [c[0] for c in FakeLLM.instances[-1].calls]
    syncs = 2 + len(result.evals)  # the two steps and every evaluation
    assert calls.count("rpc") == calls.count("sleep") == syncs and calls[-1] == "sleep"
    between = "".join("r" if c == "rpc" else "s" if c == "sleep" else "g" if c == "generate" else "" for c in calls)
    assert between.replace("g", "") == "rs" * syncs and "rs" not in between  # every sync: >= 1 turn, then one sleep
