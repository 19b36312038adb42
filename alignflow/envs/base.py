"""The environment protocol: a conversation, one assistant turn at a time.

    env = make_env()                          # a fresh environment per episode
    messages = env.reset(row)                 # the first messages, from a data row
    obs, reward, done, info = env.step({"role": "assistant", "content": "..."})

``reset(row) -> list[dict]`` returns the conversation's first messages (``{"role", "content"}``; a ``system``
message may come first). ``step(message) -> StepResult`` takes the assistant's message and returns the
observation messages to append (``user`` or ``tool`` messages; may be empty), this turn's reward, whether the
episode is over, and an ``info`` dict (numbers in it are averaged into metrics). Environments may also have a
``tools`` attribute: a list of JSON schemas passed to the chat template (``tools=``).

Environments are named by dotted path like reward functions (``"my_pkg.envs:MathEnv"`` or
``"envs.py:make_env"``); :func:`load_env_factory` turns the path into a factory that builds one environment per
episode. Environments written for TRL (``reset(**row) -> str | None``, public methods as tools, an optional
``get_reward()``) and OpenEnv-style ones (``reset() / step(action)`` returning an object with ``observation``,
``reward`` and ``done``) are wrapped by :class:`TRLEnvAdapter` and :class:`OpenEnvAdapter`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

from alignflow.config import ConfigError
from alignflow.envs.tools import ToolBox, ToolStats
from alignflow.rewards.rules import RewardLoadError, load_callable


class StepResult(NamedTuple):
    observations: list
    reward: float
    done: bool
    info: dict


@runtime_checkable
class Environment(Protocol):
    def reset(self, row: dict) -> list: ...

    def step(self, message: dict) -> StepResult: ...


def prompt_messages(row: dict) -> list[dict]:
    """A row's prompt as messages: its ``messages`` list, else its ``prompt`` (a string or a message list)."""
    prompt = row.get("messages", row.get("prompt"))
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return [dict(m) for m in prompt]
    raise ValueError(
        f"row has no usable prompt: expected 'prompt' (text or messages) or 'messages', got fields {sorted(row)}"
    )


def check_step(result, env) -> StepResult:
    """``result`` as a :class:`StepResult`, or a ``TypeError`` naming the environment and what is wrong."""
    name = type(env).__name__
    if not isinstance(result, tuple) or len(result) != 4:
        raise TypeError(f"environment {name}.step returned {result!r:.80}; expected (observations, reward, done, info)")
    obs, reward, done, info = result
    if not isinstance(obs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in obs):
        raise TypeError(
            f"environment {name}.step: observations must be a list of {{'role', 'content'}} messages, got {obs!r:.80}"
        )
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise TypeError(f"environment {name}.step: reward must be a finite number, got {reward!r}")
    return StepResult(obs, float(reward), bool(done), dict(info or {}))


def load_env_factory(spec, **kwargs) -> Callable[[], Any]:
    """A factory of fresh environments from a dotted path (a class or a function returning an environment) or a
    callable; ``kwargs`` are passed to it. Environments that are not of this protocol but look like TRL's or
    OpenEnv's are wrapped in their adapter."""
    try:
        target = load_callable(spec) if isinstance(spec, str) else spec
    except RewardLoadError as e:
        raise ConfigError(str(e).replace("reward function", "environment")) from None
    if not callable(target):
        raise ConfigError(f"environment {spec!r}: not a class or a function")

    def make():
        return adapt(target(**kwargs), spec)

    return make


def adapt(env, spec="") -> Any:
    """``env`` itself when it follows the protocol, else its TRL or OpenEnv adapter."""
    reset = getattr(env, "reset", None)
    if not callable(reset):
        raise ConfigError(f"environment {spec!r}: {type(env).__name__} has no reset method")
    params = list(inspect.signature(reset).parameters.values())
    if callable(getattr(env, "step", None)):
        takes_row = params and params[0].kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
        return env if takes_row else OpenEnvAdapter(env)
    return TRLEnvAdapter(env)


class TRLEnvAdapter:
    """A TRL-style environment: ``reset(**row)`` may return text appended to the last user message; its public
    methods are tools; ``get_reward()``, when present, scores the episode when the assistant answers without a
    tool call. Each assistant message with tool calls gets the tool results and another turn."""

    def __init__(self, env, timeout_s: float | None = 5.0):
        self.env = env
        methods = [
            getattr(env, n)
            for n, _ in inspect.getmembers(type(env), inspect.isfunction)
            if not n.startswith("_") and n not in ("reset", "get_reward", "step")
        ]
        self.box = ToolBox(methods, timeout_s=timeout_s)
        self.tools = self.box.schemas

    def reset(self, row: dict) -> list:
        messages = prompt_messages(row)
        extra = self.env.reset(**{k: v for k, v in row.items()})
        if extra:
            messages[-1] = {**messages[-1], "content": f"{messages[-1]['content']}\n\n{extra}"}
        return messages

    def step(self, message: dict) -> StepResult:
        tool_messages, stats = self.box.run(message.get("content", ""))
        info = {"tool_calls": stats.calls, "tool_errors": stats.bad}
        if tool_messages:
            return StepResult(tool_messages, 0.0, False, info)
        reward = float(self.env.get_reward()) if callable(getattr(self.env, "get_reward", None)) else 0.0
        return StepResult([], reward, True, info)


class OpenEnvAdapter:
    """An OpenEnv-style environment: ``reset()`` and ``step(action)`` return an object (or dict) with
    ``observation``, ``reward`` and ``done``. ``to_action(text)`` builds the action from the assistant's text
    (default: the text itself); ``to_text(observation)`` renders an observation as a user message (default:
    ``str``, or its ``text`` / ``message`` / ``content`` field when it has one)."""

    def __init__(self, env, to_action: Callable | None = None, to_text: Callable | None = None):
        self.env, self.to_action, self.to_text = env, to_action or (lambda text: text), to_text or _observation_text

    @staticmethod
    def _field(result, name, default=None):
        return result.get(name, default) if isinstance(result, dict) else getattr(result, name, default)

    def reset(self, row: dict) -> list:
        first = self.env.reset()
        messages = prompt_messages(row) if ("prompt" in row or "messages" in row) else []
        obs = self._field(first, "observation")
        if obs is not None:
            messages.append({"role": "user", "content": self.to_text(obs)})
        if not messages:
            raise ValueError("OpenEnvAdapter: the row has no prompt and reset() returned no observation")
        return messages

    def step(self, message: dict) -> StepResult:
        result = self.env.step(self.to_action(message.get("content", "")))
        obs = self._field(result, "observation")
        reward = self._field(result, "reward", 0.0)
        done = bool(self._field(result, "done", False))
        observations = [] if done or obs is None else [{"role": "user", "content": self.to_text(obs)}]
        return StepResult(observations, float(reward or 0.0), done, {})


def _observation_text(obs) -> str:
    for name in ("text", "message", "content"):
        value = obs.get(name) if isinstance(obs, dict) else getattr(obs, name, None)
        if isinstance(value, str):
            return value
    return str(obs)


class ToolEnv:
    """Tools plus a final reward: every assistant message with tool calls gets tool messages and another turn;
    the first message without one ends the episode, scored by ``reward_fn(row, text) -> float``.

    tools: functions (see :mod:`alignflow.envs.tools`). system: an optional system message before the prompt.
    """

    def __init__(
        self, tools: list, reward_fn: Callable[[dict, str], float], system: str = "", timeout_s: float | None = 5.0
    ):
        self.box = ToolBox(tools, timeout_s=timeout_s)
        self.tools = self.box.schemas
        self.reward_fn, self.system = reward_fn, system
        self.row: dict = {}
        self.stats = ToolStats()

    def reset(self, row: dict) -> list:
        self.row, self.stats = row, ToolStats()
        messages = prompt_messages(row)
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def step(self, message: dict) -> StepResult:
        tool_messages, stats = self.box.run(message.get("content", ""))
        self.stats.add(stats)
        info = {"tool_calls": stats.calls, "tool_errors": stats.bad}
        if tool_messages:
            return StepResult(tool_messages, 0.0, False, info)
        return StepResult([], float(self.reward_fn(self.row, message.get("content", ""))), True, info)
