"""``alignflow serve``: trained reward models behind the remote-reward wire format (``docs/remote_rewards.md``).

``POST /score`` with ``{"prompts": [...], "responses": [...]}`` answers ``{"rewards": [...], "members": [[...]]}``
(the aggregated reward per row, and the (B, k) member scores); ``GET /health`` answers ``{"status": "ok",
"members": k, "models": [...]}``. Every model re-renders the texts with its own tokenizer and chat template
(:mod:`alignflow.rewards.foreign`), so any model trained by ``alignflow rm`` serves whatever the policy's
tokenizer. A bad request is HTTP 400 with ``{"error": "..."}`` naming the field and row; more than
``max_rows`` rows is 413; a failure while scoring is 500 with its message.

The server is the standard library's ``ThreadingHTTPServer``: connections are handled on their own threads (a
health check is answered while a batch is scored) and scoring is serialised by a lock, since one process holds
one copy of the models and a forward already uses every core it is given. A reward server's throughput is the
models' forward, not the HTTP layer, so a server framework would add a dependency without adding speed; run
several processes behind a load balancer to scale out.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from alignflow.batch import Batch
from alignflow.config import ConfigError, ServeConfig
from alignflow.models.device import resolve_device
from alignflow.rewards.judge import build_judge
from alignflow.rewards.model import RewardModelScorer
from alignflow.rewards.preference_model import PreferenceModel, PreferenceReward

log = logging.getLogger("alignflow.serve")
MAX_BODY = 64 << 20  # bytes


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, max_rows: int) -> tuple[list, list, dict]:
    """(prompts, responses, row fields) from a request body; BadRequest naming the field and row otherwise. Any
    other key holding a list of one value per row (e.g. "reference", "principle") is a row field."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object with 'prompts' and 'responses', got {type(data).__name__}")
    for key in ("prompts", "responses"):
        if not isinstance(data.get(key), list):
            raise BadRequest(f"'{key}' must be a list, got {type(data.get(key)).__name__}")
    prompts, responses = data["prompts"], data["responses"]
    if len(prompts) != len(responses):
        raise BadRequest(f"{len(prompts)} prompts but {len(responses)} responses")
    if len(prompts) > max_rows:
        raise BadRequest(f"{len(prompts)} rows in one request; this server takes at most {max_rows} (max_rows)", 413)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if not isinstance(r, str):
            raise BadRequest(f"responses[{i}] must be a string, got {type(r).__name__}")
        chat = isinstance(p, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in p
        )
        if not (isinstance(p, str) or chat):
            raise BadRequest(f"prompts[{i}] must be a string or a list of {{'role', 'content'}} messages")
    fields = {k: v for k, v in data.items() if k not in ("prompts", "responses")}
    for k, v in fields.items():
        if not isinstance(v, list) or len(v) != len(prompts):
            raise BadRequest(f"'{k}' must be a list of {len(prompts)} values (one per row), like 'prompts'")
    return prompts, responses, fields


class RewardService:
    """Scores texts with a reward-model scorer (rewards and member scores) or any other reward -- an LLM judge, a
    preference model against an anchor -- (rewards); one call at a time."""

    def __init__(self, scorer, max_rows: int, models: list):
        self.scorer, self.max_rows, self.models = scorer, max_rows, [str(m) for m in models]
        self.lock = threading.Lock()

    def score(self, prompts: list, responses: list, fields: dict | None = None) -> dict:
        if not prompts:
            return {"rewards": [], "members": []}
        batch = Batch(meta={**(fields or {}), "prompt": prompts, "response": responses})
        with self.lock:
            if hasattr(self.scorer, "member_scores"):
                members = self.scorer.member_scores(batch)  # (B, k)
                out = {"rewards": self.scorer.aggregate(members).tolist(), "members": members.tolist()}
            else:
                out = {"rewards": self.scorer(batch).tolist()}
        if not all(math.isfinite(v) for v in out["rewards"]):
            raise RuntimeError("the reward model produced a non-finite score")
        return out


def make_handler(service: RewardService) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, obj: Any) -> None:
            body = json.dumps(obj).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path.rstrip("/") == "/health":
                self._send(
                    200,
                    {"status": "ok", "members": getattr(service.scorer, "num_members", 1), "models": service.models},
                )
            else:
                self._send(404, {"error": f"no such path {self.path!r}; use POST /score or GET /health"})

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/score":
                self._send(404, {"error": f"no such path {self.path!r}; use POST /score"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if length > MAX_BODY:
                    raise BadRequest(f"the body has {length} bytes; at most {MAX_BODY}", 413)
                self._send(200, service.score(*parse_request(self.rfile.read(length), service.max_rows)))
            except BadRequest as e:
                self._send(e.status, {"error": str(e)})
            except Exception as e:  # a scoring failure goes back to the client, named, and the server lives on
                log.exception("scoring failed")
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

        def log_message(self, fmt, *args):
            log.debug("%s %s", self.address_string(), fmt % args)

    return Handler


def make_server(cfg: ServeConfig) -> tuple[ThreadingHTTPServer, str]:
    """Load the models and bind the server (not yet serving); returns it and its /score URL."""

    served = [
        k
        for k, on in (
            ("models", cfg.models),
            ("preference_model", cfg.preference_model),
            ("judge", cfg.judge.model or cfg.judge.url),
        )
        if on
    ]
    if len(served) != 1:
        raise ConfigError(
            "give exactly one of models=[<reward-model dirs>], preference_model=<dir> and judge.model "
            f"/ judge.url to serve; got {', '.join(served) or 'none'}"
        )
    device = resolve_device(cfg.device)
    if cfg.judge.model or cfg.judge.url:
        scorer, names = build_judge(cfg.judge, device, 0, "judge"), [cfg.judge.model or cfg.judge.url]
    elif cfg.preference_model:
        pm = PreferenceModel(cfg.preference_model, device, budget=cfg.budget)
        scorer, names = PreferenceReward(pm, cfg.anchor_field), [cfg.preference_model]
    else:
        scorer, names = (
            RewardModelScorer(list(cfg.models), cfg.aggregation, cfg.uwo_lambda, device, budget=cfg.budget),
            list(cfg.models),
        )
        missing = [str(m) for m, r in zip(cfg.models, scorer.renderers, strict=True) if r is None]
        if missing:
            raise ConfigError(
                f"models: {', '.join(missing)} hold no tokenizer to render texts with (alignflow rm "
                "saves one next to the model)"
            )
    try:
        server = ThreadingHTTPServer((cfg.host, cfg.port), make_handler(RewardService(scorer, cfg.max_rows, names)))
    except OSError as e:
        raise ConfigError(f"host/port: cannot listen on {cfg.host}:{cfg.port}: {e}") from None
    server.daemon_threads = True
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}/score"


def serve(cfg: ServeConfig) -> None:
    """Serve until interrupted (Ctrl-C)."""
    server, url = make_server(cfg)
    what = (
        f"{len(cfg.models)} reward model(s)"
        if cfg.models
        else ("a judge" if cfg.judge.model or cfg.judge.url else "a preference model")
    )
    print(f"alignflow serve: {what} on POST {url} (GET {url[: -len('/score')]}/health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
