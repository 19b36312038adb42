"""LLM judges as rewards: verdict parsing, the three templates against a fake OpenAI-compatible endpoint
(position bias cancelled by judging both orders, caching, the parse-failure policies, retries), and a tiny
local causal LM through the rollout engine."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignflow.batch import Batch
from alignflow.rewards import CompositeReward, RewardError
from alignflow.rewards.judge import EndpointJudge, JudgeReward, LocalJudge, parse_verdict
from alignflow.tasks.common import build_tokenizer
from tests.helpers import token_table_llama
from tests.test_vllm_engine import fake_vllm  # noqa: F401 (a fixture: the stand-in vllm module)


@pytest.mark.parametrize(
    "template, text, value",
    [
        ("pointwise", "Score: 3 would be harsh. It is clear and short.\nScore: 8", 7 / 9),  # the LAST one: (8-1)/9
        ("pointwise", "score : 1", 0.0),
        ("pointwise", "**Score:** 10", 1.0),
        ("pointwise", "Score: 11", None),  # outside [1, 10]
        ("pointwise", "I like it a lot.", None),
        ("pairwise", "A is longer, but Verdict: B", 0.0),
        ("pairwise", "**Verdict**: a", 1.0),
        ("principle", "The rule says 'Answer: Yes' or 'Answer: No'. It is polite.\nAnswer: yes", 1.0),
        ("principle", "ANSWER: No.", 0.0),
    ],
)
def test_parse_verdict_reads_the_last_verdict(template, text, value):
    got = parse_verdict(template, text)
    assert got == (None if value is None else pytest.approx(value))


class FakeChat:
    """An OpenAI-compatible /v1/chat/completions server; ``answer(question, temperature) -> str``."""

    def __init__(self, answer):
        self.requests, outer = [], self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                text = answer(body["messages"][0]["content"], body["temperature"])
                reply = (
                    text
                    if isinstance(text, bytes)
                    else json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                )
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def chat():
    servers = []

    def start(answer):
        servers.append(FakeChat(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.server.shutdown()
        s.server.server_close()


def section(question, name):
    return re.search(rf"{name}:\n(.*?)\n\n", question, re.S).group(1)


def rows(responses, **fields):
    return Batch(meta={"prompt": ["say something"] * len(responses), "response": list(responses), **fields})


def test_pointwise_scores_and_caches(chat):
    """The fake judge reasons, then scores 1 + (number of words); rewards are (N - 1)/9. A second call on the
    same rows is answered from the cache (no request)."""
    srv = chat(lambda q, t: f"Hmm, Score: 0 is wrong.\nScore: {1 + len(section(q, 'Response').split())}")
    judge = JudgeReward(EndpointJudge(srv.url, "m"), "pointwise", batch_size=2)
    got, m = judge.score(rows(["a b", "a b c d", "a b"]))
    assert got.tolist() == pytest.approx([2 / 9, 4 / 9, 2 / 9])
    assert len(srv.requests) == 2 and m["rollout/judge_cache_hits"] == 1.0  # the repeated row is asked once
    assert srv.requests[0]["model"] == "m" and srv.requests[0]["temperature"] == 0.0
    got2, m2 = judge.score(rows(["a b", "a b c d"]))
    assert got2.tolist() == pytest.approx([2 / 9, 4 / 9]) and len(srv.requests) == 2
    assert m2["rollout/judge_cache_hits"] == 2.0 and judge.totals["queries"] == 5


def test_pairwise_both_orders_cancel_a_position_bias(chat):
    """A fair judge prefers the longer response: the longer one wins both orders (reward 1), the shorter none
    (0). A judge that always says A (pure position bias) gives 0.5 to every response when both orders are
    asked, and 1.0 when only the response-first order is."""

    def fair(q, t):
        return "Verdict: A" if len(section(q, "Response A")) > len(section(q, "Response B")) else "Verdict: B"

    batch = rows(["a long long answer", "no"], reference=["medium one", "medium one"])
    assert JudgeReward(EndpointJudge(chat(fair).url, "m"), "pairwise")(batch).tolist() == [1.0, 0.0]
    biased = chat(lambda q, t: "Verdict: A").url
    assert JudgeReward(EndpointJudge(biased, "m"), "pairwise")(batch).tolist() == [0.5, 0.5]
    one_order = JudgeReward(EndpointJudge(biased, "m"), "pairwise", both_orders=False)
    assert one_order(batch).tolist() == [1.0, 1.0]
    with pytest.raises(RewardError, match="row 0 has no 'reference' response to compare with"):
        JudgeReward(EndpointJudge(biased, "m"), "pairwise")(rows(["x"]))


def test_principles_rlbff(chat):
    """Reward = fraction of principles satisfied; a row's own 'principle' field replaces the configured list."""

    def judge(q, t):
        principle = re.search(r"Principle: (.*)\n", q).group(1)
        response = section(q, "Response")
        ok = {"ends with !": response.endswith("!"), "is short": len(response) < 10}[principle]
        return f"Checking... Answer: {'Yes' if ok else 'No'}"

    url = chat(judge).url
    j = JudgeReward(EndpointJudge(url, "m"), "principle", principles=["ends with !", "is short"])
    assert j(rows(["great!", "a long answer!", "meh"])).tolist() == [1.0, 0.5, 0.5]
    own = rows(["a long answer!", "meh"], principle=["is short", None])
    assert j(own).tolist() == [0.0, 0.5]


def test_parse_failures_policy_and_retries(chat):
    """Greedy (temperature 0) the judge rambles without a verdict; sampled, it answers. error: RewardError
    naming the row; fallback: the fallback value, counted per row; parse_retries=1: the retry parses."""
    url = chat(lambda q, t: "Score: 10" if t > 0 or "good" in q else "I cannot decide.").url
    batch = rows(["good", "hm"])
    with pytest.raises(RewardError, match=r"row 1: no pointwise verdict .*after 1 attempts.*I cannot decide"):
        JudgeReward(EndpointJudge(url, "m"), "pointwise")(batch)
    fb = JudgeReward(EndpointJudge(url, "m"), "pointwise", on_parse_failure="fallback", fallback=-1.0)
    got, m = fb.score(batch)
    assert got.tolist() == [1.0, -1.0] and m["rollout/judge_parse_failures"] == 1.0
    assert fb.with_failures(batch)[1]["errors"].tolist() == [0.0, 1.0] and len(fb.cache) == 1  # not cached
    assert CompositeReward([("judge", fb, 1.0)]).score(batch)[1]["reward/errors"] == 1.0  # the RL metric
    retry = JudgeReward(EndpointJudge(url, "m"), "pointwise", parse_retries=1)
    got, m = retry.score(batch)
    assert got.tolist() == [1.0, 1.0] and m["rollout/judge_retries"] == 1.0


def test_malformed_endpoint_reply_is_an_error(chat):
    url = chat(lambda q, t: b'{"choices": []}').url
    with pytest.raises(RewardError, match=r"judge endpoint .*/v1/chat/completions: question 0: malformed reply"):
        JudgeReward(EndpointJudge(url, "m", retries=3), "pointwise")(rows(["x"]))


def bigram_judge(chain: list[str]):
    """A tiny Llama whose greedy output after the chat template's '<|assistant|>' is ``chain`` then EOS:
    attention and MLP outputs are zeroed, so the last hidden state is the current token's one-hot embedding,
    and the untied head maps each token of the chain to the next one (every other token to EOS)."""
    tok = build_tokenizer(("Score", ":", "7", "Verdict", "A", "B", "good"))
    v, h = len(tok), 32
    head = torch.zeros(v, h)
    head[tok.eos_token_id, :v] = 20.0
    ids = tok.convert_tokens_to_ids(["<|assistant|>"] + chain + ["<eos>"])
    for a, b in zip(ids, ids[1:], strict=False):
        head[:, a] = 0.0
        head[b, a] = 20.0
    return token_table_llama(tok, h, head, positions=256), tok


def test_tiny_local_model_through_the_rollout_engine():
    """The local judge answers 'Score : 7' to every question: reward (7 - 1)/9 for each row, one engine call
    per chunk of batch_size, nothing asked again for cached rows; a judge that answers 'good' has no verdict."""
    model, tok = bigram_judge(["Score", ":", "7"])
    backend = LocalJudge(model, tok, max_new_tokens=6)
    assert backend.complete(["rate this"]) == ["Score : 7"]
    calls = []
    real = backend.engine.generate
    backend.engine.generate = lambda ids, p: calls.append(len(ids)) or real(ids, p)
    judge = JudgeReward(backend, "pointwise", batch_size=2)
    assert judge(rows(["one", "two", "three"])).tolist() == pytest.approx([6 / 9] * 3)
    assert calls == [2, 1]
    judge(rows(["two", "three"]))
    assert calls == [2, 1]
    junk = JudgeReward(
        LocalJudge(*bigram_judge(["good"]), max_new_tokens=6), "pointwise", on_parse_failure="fallback", fallback=0.0
    )
    got, m = junk.score(rows(["one"]))
    assert got.tolist() == [0.0] and m["rollout/judge_parse_failures"] == 1.0


def test_config_section_builds_the_judge_term(chat, tmp_path):
    """reward.judge.url (+ endpoint_model) adds a 'judge' term to the RL reward sources; a local judge loads
    from a directory; bad combinations name the key."""
    from alignflow.config import ConfigError, RLConfig, from_dict
    from alignflow.trainers.rl_setup import build_sources

    url = chat(lambda q, t: "Score: 10").url
    cfg = from_dict(RLConfig, {"reward": {"judge": {"url": url, "endpoint_model": "m", "weight": 2.0}}})
    total, m = build_sources(cfg.reward, "reward", "reviews", cfg, "cpu", 0).score(rows(["x", "y"]))
    assert total.tolist() == [2.0, 2.0] and m["rollout/reward_judge_mean"] == 1.0
    model, tok = bigram_judge(["Score", ":", "7"])
    model.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    local = from_dict(RLConfig, {"reward": {"judge": {"model": str(tmp_path / "judge"), "max_new_tokens": 6}}})
    total, _ = build_sources(local.reward, "reward", "reviews", local, "cpu", 0).score(rows(["x"]))
    assert total.tolist() == pytest.approx([6 / 9])
    cfg.reward.judge.model = "somewhere"
    with pytest.raises(ConfigError, match="reward.judge: set exactly one of model .* and url"):
        build_sources(cfg.reward, "reward", "reviews", cfg, "cpu", 0)


def test_local_judge_on_the_vllm_backend(fake_vllm, tmp_path):  # noqa: F811
    """reward.judge.backend=vllm: the judge directory is loaded by a vLLM engine (the stand-in ``vllm`` module,
    which loads the saved weights as vLLM would) and answers 'Score : 7', so every row gets (7 - 1)/9, one engine
    call per chunk; the engine gets the configured memory share and dtype. verdict=logprob is refused (it reads
    the Hugging Face model's probabilities), and so is backend=vllm with an endpoint judge."""
    from alignflow.config import ConfigError, JudgeConfig
    from alignflow.rewards.judge import build_judge
    from tests.test_vllm_engine import FakeLLM

    class LoadingLLM(FakeLLM):  # vLLM with load_format=auto reads the checkpoint's weights
        def __init__(self, model, **kw):
            super().__init__(model, **kw)
            self.model.load_state_dict(AutoModelForCausalLM.from_pretrained(model).state_dict())

    fake_vllm.LLM = LoadingLLM
    model, tok = bigram_judge(["Score", ":", "7"])
    model.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    cfg = JudgeConfig(
        model=str(tmp_path / "judge"), backend="vllm", max_new_tokens=6, batch_size=2, gpu_memory_utilization=0.2
    )
    judge = build_judge(cfg)
    assert judge(rows(["one", "two", "three"])).tolist() == pytest.approx([6 / 9] * 3)
    (llm,) = LoadingLLM.instances
    assert [c for c in llm.calls if c[0] == "generate"] == [("generate", 2), ("generate", 1)]
    assert llm.kwargs["gpu_memory_utilization"] == 0.2 and llm.kwargs["dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="reward.judge: judge verdict=logprob .* backend=hf, not vllm"):
        build_judge(
            JudgeConfig(
                model=str(tmp_path / "judge"), backend="vllm", max_new_tokens=6, template="pairwise", verdict="logprob"
            )
        )
    with pytest.raises(ConfigError, match=r"reward.judge.backend=vllm .* not url"):
        build_judge(JudgeConfig(url="http://127.0.0.1:1/v1", endpoint_model="m", backend="vllm"))
