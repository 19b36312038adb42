"""A reward served over HTTP: the rows' texts are POSTed in JSON batches to an endpoint that returns one reward each.

Wire format (``docs/remote_rewards.md``), one request per batch of at most ``batch_size`` rows::

    POST <url>   Content-Type: application/json
    {"prompts": [<str or list of {"role", "content"}>, ...], "responses": [<str>, ...]}
    200 OK
    {"rewards": [<finite number>, ...]}          # exactly one per row, in order; other keys are ignored

Failure policy -- nothing is ever scored 0 in place of a reply:

* a connection error, a timeout or an HTTP 5xx / 429 reply is retried ``retries`` times (waiting 0.5 s, 1 s,
  2 s, ... between attempts); after the last attempt :class:`~alignflow.rewards.rules.RewardError` names the URL,
  the batch (its index and rows) and the last failure;
* any other HTTP status (4xx) and a malformed reply (not JSON, no ``rewards`` list, the wrong number of values, a
  value that is not a finite number) fail at once with the same naming: a server that answers wrongly will
  answer wrongly again.

``timeout_s`` bounds each attempt as a whole (connecting, sending and reading the reply): the socket timeout is
the time left, and the reply is read in chunks against the deadline, so a server that trickles bytes cannot hang
the run. Only the standard library is used (``urllib``).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from typing import Any

import torch

from alignflow.batch import Batch
from alignflow.rewards.base import output_device
from alignflow.rewards.rules import RewardError

RETRY_STATUS = (429, 500, 502, 503, 504)
CHUNK = 1 << 16


class _Retryable(Exception):
    """An attempt failed in a way that may pass on a later attempt (connection, timeout, 5xx/429)."""


class _Fatal(Exception):
    """An attempt failed in a way a retry cannot fix (4xx, malformed reply)."""


def _read(resp, deadline: float) -> bytes:
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Retryable("timed out while reading the reply")
        sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
        if sock is not None:
            sock.settimeout(left)
        chunk = resp.read1(CHUNK)  # returns after one receive, so the deadline is checked between them
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def post_json(url: str, payload: dict, timeout_s: float, headers: dict | None = None) -> Any:
    """POST ``payload`` as JSON and return the decoded JSON reply; raises _Retryable or _Fatal."""
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    req = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json", **(headers or {})},
    )
    deadline = time.monotonic() + timeout_s
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (the user's endpoint)
            raw = _read(resp, deadline)
    except urllib.error.HTTPError as e:
        detail = e.read(500).decode("utf-8", "replace").strip()
        msg = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
        raise (_Retryable if e.code in RETRY_STATUS else _Fatal)(msg) from None
    except TimeoutError:  # socket.timeout is TimeoutError
        raise _Retryable(f"no reply within timeout_s={timeout_s:g} s") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError):
            raise _Retryable(f"no reply within timeout_s={timeout_s:g} s") from None
        raise _Retryable(f"cannot connect: {reason}") from None
    except (ConnectionError, OSError) as e:
        raise _Retryable(f"connection failed: {e}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _Fatal(f"malformed reply: not JSON: {raw[:200]!r}") from None


def parse_rewards(reply: Any, n: int) -> list[float]:
    """The ``rewards`` of a reply: exactly ``n`` finite numbers; _Fatal naming what is wrong otherwise."""
    if not isinstance(reply, dict) or "rewards" not in reply:
        keys = sorted(reply) if isinstance(reply, dict) else type(reply).__name__
        raise _Fatal(f"malformed reply: expected a JSON object with a 'rewards' list, got {keys}")
    values = reply["rewards"]
    if not isinstance(values, list) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise _Fatal(f"malformed reply: 'rewards' must be a list of {n} numbers (one per row), got {got}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _Fatal(f"malformed reply: reward {i} of the batch is {v!r}, not a finite number")
    return [float(v) for v in values]


def post_with_retries(
    url: str,
    payload: dict,
    timeout_s: float,
    retries: int,
    backoff_s: float,
    parse,
    where: str,
    name: str,
    row: int,
    headers: dict | None = None,
) -> tuple[Any, int]:
    """``parse(post_json(...))`` with the failure policy above: (result, retries used); RewardError prefixed by
    ``where`` once retries are spent or at once for a permanent failure (``parse`` raises _Fatal)."""
    for attempt in range(retries + 1):
        try:
            return parse(post_json(url, payload, timeout_s, headers)), attempt
        except _Fatal as e:
            raise RewardError(f"{where}: {e}", name, row) from None
        except _Retryable as e:
            if attempt == retries:
                raise RewardError(
                    f"{where}: {e} (after {attempt + 1} attempts; the retries setting allows more)", name, row
                ) from None
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


class RemoteReward:
    """``reward(batch) -> (B,)``: the batch's meta ``prompt`` and ``response`` scored by an HTTP endpoint.

    url: the endpoint; batch_size: rows per request; timeout_s: seconds per attempt; retries: further attempts
    after a retryable failure; backoff_s: the first wait between attempts (doubled each time).
    ``last_metrics`` holds the last call's ``rollout/remote_requests`` and ``rollout/remote_retries``.
    """

    name = "remote"

    def __init__(
        self,
        url: str,
        batch_size: int = 64,
        timeout_s: float = 30.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        name: str = "remote",
        fields: tuple | list = (),
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward.remote.url must start with http:// or https://, got {url!r}")
        if batch_size < 1 or timeout_s <= 0 or retries < 0:
            raise ValueError(
                f"reward.remote: batch_size >= 1, timeout_s > 0 and retries >= 0 are required, got "
                f"{batch_size}, {timeout_s}, {retries}"
            )
        self.url, self.batch_size, self.timeout_s = url, int(batch_size), float(timeout_s)
        self.retries, self.backoff_s, self.name = int(retries), float(backoff_s), name
        self.fields = [str(f) for f in fields]
        if set(self.fields) & {"prompts", "responses"}:
            raise ValueError("reward.remote.fields: 'prompts' and 'responses' are always sent")
        self.last_metrics: dict = {}

    def _where(self, k: int, lo: int, hi: int, nb: int) -> str:
        return f"remote reward {self.url}: batch {k + 1} of {nb} (rows {lo}-{hi - 1})"

    def score_texts(self, prompts: list, responses: list, fields: dict | None = None) -> list[float]:
        """Rewards for the texts, in order: one request per ``batch_size`` rows (``fields``: name -> one value per
        row, sent alongside)."""
        out: list[float] = []
        nb = max(1, math.ceil(len(prompts) / self.batch_size))
        requests = retried = 0
        for k, lo in enumerate(range(0, len(prompts), self.batch_size)):
            hi = min(lo + self.batch_size, len(prompts))
            payload = {
                "prompts": list(prompts[lo:hi]),
                "responses": list(responses[lo:hi]),
                **{k: list(v[lo:hi]) for k, v in (fields or {}).items()},
            }
            values, used = post_with_retries(
                self.url,
                payload,
                self.timeout_s,
                self.retries,
                self.backoff_s,
                lambda r, n=hi - lo: parse_rewards(r, n),
                self._where(k, lo, hi, nb),
                self.name,
                lo,
            )
            out += values
            requests, retried = requests + used + 1, retried + used
        self.last_metrics = {"rollout/remote_requests": float(requests), "rollout/remote_retries": float(retried)}
        return out

    def __call__(self, batch: Batch) -> torch.Tensor:
        missing = [k for k in ("prompt", "response", *self.fields) if k not in batch.meta]
        if missing:
            raise KeyError(f"remote reward {self.url}: the batch has no meta {', '.join(missing)}")
        values = self.score_texts(
            list(batch.meta["prompt"]), list(batch.meta["response"]), {k: list(batch.meta[k]) for k in self.fields}
        )
        return torch.tensor(values, dtype=torch.float32, device=output_device(batch))
