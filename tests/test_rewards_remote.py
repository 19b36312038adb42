"""Remote rewards against local servers started in the test: batching and order, timeouts (a silent and a
trickling server), a dead server, malformed replies (never retried, never scored 0), retried 5xx, and round
trips through ``alignflow serve`` (in-process and the CLI command) with a tiny reward model."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig, ServeConfig, from_dict
from alignflow.rewards import RewardError, RewardModelScorer
from alignflow.rewards.remote import RemoteReward
from alignflow.rewards.serve import make_server
from alignflow.tasks.common import build_tokenizer
from alignflow.tasks.reviews import VOCAB
from tests.test_rewards_foreign import PROMPTS, RESPONSES, tiny_rm


class FakeServer:
    """A local HTTP server whose reply is ``behave(body: dict, hit: int) -> (status, bytes, delay_s)``."""

    def __init__(self, behave):
        self.hits, outer = 0, self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.hits += 1
                status, data, delay = behave(body, outer.hits)
                time.sleep(max(delay, 0))
                try:
                    self._reply(status, data, delay)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout tests)
                    pass

            def _reply(self, status, data, delay):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if delay < 0:  # trickle: one byte every -delay seconds
                    for b in data:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                        time.sleep(-delay)
                else:
                    self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve_fake():
    servers = []

    def start(behave):
        servers.append(FakeServer(behave))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def lengths(body, hit):
    return 200, json.dumps({"rewards": [len(r) for r in body["responses"]]}).encode(), 0


def texts(n):
    return Batch(meta={"prompt": [f"p{i}" for i in range(n)], "response": ["x" * i for i in range(n)]})


def test_batches_in_order(serve_fake):
    """5 rows in batches of 2 -> 3 requests; the rewards come back in row order."""
    srv = serve_fake(lengths)
    fn = RemoteReward(srv.url, batch_size=2, timeout_s=5)
    assert fn(texts(5)).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert srv.hits == 3 and fn.last_metrics["rollout/remote_requests"] == 3.0


@pytest.mark.parametrize("delay", [3.0, -0.15], ids=["silent", "trickle"])
def test_a_slow_server_fails_within_the_timeout_naming_url_and_batch(serve_fake, delay):
    """A server that waits 3 s, or trickles its reply a byte at a time (~4 s in all): timeout_s=0.4 with one
    retry fails after 2 attempts, well before the server would have answered."""
    srv = serve_fake(lambda b, h: (200, json.dumps({"rewards": [1.0, 2.0, 3.0]}).encode(), delay))
    fn = RemoteReward(srv.url, batch_size=8, timeout_s=0.4, retries=1, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=rf"{srv.url}: batch 1 of 1 \(rows 0-2\).*after 2 attempts") as e:
        fn(texts(3))
    assert time.monotonic() - t0 < 2.5
    assert "timed out" in str(e.value) or "no reply within" in str(e.value)


def test_a_dead_server_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fn = RemoteReward(f"http://127.0.0.1:{port}/score", batch_size=2, timeout_s=1, retries=2, backoff_s=0.01)
    with pytest.raises(
        RewardError,
        match=rf"127.0.0.1:{port}/score: batch 1 of 2 \(rows 0-1\): cannot connect.*"
        "after 3 attempts",
    ):
        fn(texts(3))


@pytest.mark.parametrize(
    "reply, needle",
    [
        (b"<html>oops</html>", "not JSON"),
        (b'{"scores": [1, 2]}', "expected a JSON object with a 'rewards' list"),
        (b'{"rewards": [1.0]}', "'rewards' must be a list of 2 numbers .*got 1 values"),
        (b'{"rewards": [1.0, NaN]}', "reward 1 of the batch is nan"),
        (b'{"rewards": [1.0, "2"]}', "reward 1 of the batch is '2'"),
        (b'{"rewards": [true, 1.0]}', "reward 0 of the batch is True"),
        (b'{"rewards": [1.0, null]}', "reward 1 of the batch is None"),
    ],
)
def test_malformed_replies_are_errors_and_are_not_retried(serve_fake, reply, needle):
    srv = serve_fake(lambda b, h: (200, reply, 0))
    with pytest.raises(RewardError, match=rf"{srv.url}: batch 1 of 1 \(rows 0-1\): malformed reply: {needle}"):
        RemoteReward(srv.url, timeout_s=5, retries=3)(texts(2))
    assert srv.hits == 1


def test_5xx_is_retried_and_4xx_is_not(serve_fake):
    flaky = serve_fake(lambda b, h: (503, b'{"error": "busy"}', 0) if h == 1 else lengths(b, h))
    fn = RemoteReward(flaky.url, timeout_s=5, retries=2, backoff_s=0.01)
    assert fn(texts(2)).tolist() == [0.0, 1.0] and fn.last_metrics["rollout/remote_retries"] == 1.0
    bad = serve_fake(lambda b, h: (400, b'{"error": "responses[0] must be a string"}', 0))
    with pytest.raises(RewardError, match=r"HTTP 400 .*responses\[0\] must be a string"):
        RemoteReward(bad.url, timeout_s=5, retries=3)(texts(2))
    assert bad.hits == 1


def test_config_section_builds_the_remote_term(serve_fake):
    from alignflow.trainers.rl_setup import build_sources

    srv = serve_fake(lengths)
    cfg = from_dict(RLConfig, {"reward": {"remote": {"url": srv.url, "weight": 0.5, "batch_size": 4}}})
    composite = build_sources(cfg.reward, "reward", "reviews", cfg, "cpu", 0)
    total, metrics = composite.score(texts(3))
    assert total.tolist() == [0.0, 0.5, 1.0] and metrics["rollout/reward_remote_mean"] == 1.0
    cfg.reward.remote.url = "127.0.0.1:9/score"
    with pytest.raises(ConfigError, match="must start with http:// or https://"):
        build_sources(cfg.reward, "reward", "reviews", cfg, "cpu", 0)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("served") / "rm"
    tok = build_tokenizer(VOCAB)
    tiny_rm(len(tok), tok.pad_token_id, seed=3).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def post(url, obj):
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_round_trip_matches_local_scoring(rm_dir):
    """RemoteReward through make_server gives the local scorer's rewards on the same texts; bad requests are
    400 / 413 naming the field."""
    server, url = make_server(
        from_dict(ServeConfig, {"models": [str(rm_dir)], "port": 0, "device": "cpu", "max_rows": 3})
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got = RemoteReward(url, batch_size=2, timeout_s=30)(Batch(meta={"prompt": PROMPTS, "response": RESPONSES}))
        local = RewardModelScorer(str(rm_dir))(Batch(meta={"prompt": PROMPTS, "response": RESPONSES}))
        assert torch.allclose(got, local, atol=1e-5) and got.std() > 0
        assert post(url, {"prompts": ["a"], "responses": [3]}) == (
            400,
            {"error": "responses[0] must be a string, got int"},
        )
        assert post(url, {"prompts": ["a"] * 4, "responses": ["b"] * 4})[0] == 413
    finally:
        server.shutdown()
        server.server_close()


def test_serve_cli_round_trip(rm_dir):
    """`alignflow serve models=[dir] port=0` in a subprocess: it prints its URL; a batch round-trips."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignflow.cli", "serve", f"models=[{rm_dir}]", "port=0", "device=cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("alignflow serve: 1 reward model(s) on POST http://127.0.0.1:"), line
        url = line.split("POST ", 1)[1].split()[0]
        status, reply = post(url, {"prompts": PROMPTS, "responses": RESPONSES})
        local = RewardModelScorer(str(rm_dir))(Batch(meta={"prompt": PROMPTS, "response": RESPONSES}))
        assert status == 200 and reply["rewards"] == pytest.approx(local.tolist(), abs=1e-5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def serving(cfg_dict):
    server, url = make_server(from_dict(ServeConfig, {"port": 0, "device": "cpu", **cfg_dict}))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, url


def test_serve_a_preference_model_against_the_rows_anchor(tmp_path):
    """preference_model=<dir>: reward = P(response beats the row's 'reference'), sent by reward.remote.fields;
    equal to the local PreferenceReward, ½ for a response against itself; a field of the wrong length is 400."""
    from alignflow.rewards.preference_model import PreferenceModel, PreferenceReward, write_meta

    tok = build_tokenizer(VOCAB)
    tiny_rm(len(tok), tok.pad_token_id, seed=5).save_pretrained(tmp_path / "pm")
    tok.save_pretrained(tmp_path / "pm")
    write_meta(tmp_path / "pm", symmetric=True)
    server, url = serving({"preference_model": str(tmp_path / "pm")})
    try:
        batch = Batch(meta={"prompt": PROMPTS, "response": RESPONSES, "reference": [RESPONSES[1]] * 3})
        got = RemoteReward(url, batch_size=2, timeout_s=30, fields=["reference"])(batch)
        local = PreferenceReward(PreferenceModel(str(tmp_path / "pm")))(batch)
        assert torch.allclose(got, local, atol=1e-5) and got[1].item() == pytest.approx(0.5, abs=1e-6)
        status, reply = post(url, {"prompts": ["a"], "responses": ["b"], "reference": ["c", "d"]})
        assert status == 400 and "'reference' must be a list of 1 values" in reply["error"]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ConfigError, match="give exactly one of models"):
        make_server(from_dict(ServeConfig, {"port": 0, "models": ["x"], "preference_model": "y"}))


def test_serve_an_llm_judge():
    """judge.url=<OpenAI-compatible endpoint>, template principle: the row's 'principle' field rides along."""
    from tests.test_rewards_judge import FakeChat

    chat = FakeChat(lambda q, t: "Answer: Yes" if "short" in q and len(q) < 400 else "Answer: No")
    server, url = serving({"judge": {"url": chat.url, "endpoint_model": "m", "template": "principle"}})
    try:
        batch = Batch(meta={"prompt": ["p", "p"], "response": ["ok", "ok"], "principle": ["is short", "is long"]})
        assert RemoteReward(url, timeout_s=30, fields=["principle"])(batch).tolist() == [1.0, 0.0]
    finally:
        for s in (server, chat.server):
            s.shutdown()
            s.server_close()
