"""The environment protocol, its TRL and OpenEnv adapters, and tools (schemas, parsed calls, bad calls)."""

import dataclasses

import pytest

from alignflow.config import ConfigError
from alignflow.envs import (
    OpenEnvAdapter,
    StepResult,
    ToolBox,
    ToolEnv,
    TRLEnvAdapter,
    check_step,
    load_env_factory,
    parse_tool_calls,
    tool_schema,
)


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def broken(x: int) -> int:
    """Always fails.

    Args:
        x: ignored
    """
    raise RuntimeError("out of order")


def call(name, **arguments):
    import json

    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_schema_from_signature_and_docstring():
    schema = tool_schema(multiply)["function"]
    assert schema["name"] == "multiply" and schema["description"] == "Multiply two integers."
    assert schema["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first factor"}
    assert schema["parameters"]["required"] == ["a", "b"]

    def undocumented(a: int):
        return a

    with pytest.raises(ConfigError, match="tool 'undocumented'.*docstring"):
        ToolBox([undocumented])


def test_parse_tool_calls():
    text = "think " + call("multiply", a=2, b=3) + " then <tool_call>{oops</tool_call> <tool_call>[1]</tool_call>"
    calls = parse_tool_calls(text + ' <tool_call>{"name": "multiply", "arguments": {"a": 1, "b": 1}}')
    assert calls[0] == {"name": "multiply", "arguments": {"a": 2, "b": 3}}
    assert "not valid JSON" in calls[1] and "'name' string" in calls[2]
    assert calls[3] == {"name": "multiply", "arguments": {"a": 1, "b": 1}}  # unclosed last block
    assert parse_tool_calls("no calls here") == []


def test_bad_calls_answered_and_counted_never_raised():
    box = ToolBox([multiply, broken], timeout_s=2)
    text = (
        call("multiply", a=6, b=7)
        + call("divide", a=1, b=2)
        + call("multiply", a=1)
        + call("broken", x=1)
        + "<tool_call>not json</tool_call>"
        + call("multiply", a=1, b=2, c=3)
    )
    messages, stats = box.run(text)
    contents = [m["content"] for m in messages]
    assert contents[0] == "42" and messages[0] == {"role": "tool", "name": "multiply", "content": "42"}
    assert contents[1].startswith("error: no tool named 'divide'; the tools are: multiply, broken")
    assert contents[2].startswith("error: multiply(a: int, b: int) -> int: missing a required argument: 'b'")
    assert contents[3] == "error: broken raised RuntimeError: out of order"
    assert contents[4].startswith("error: the tool call is not valid JSON")
    assert "unexpected keyword argument 'c'" in contents[5]
    assert dataclasses.asdict(stats) == {"calls": 6, "bad": 5, "unparsable": 1, "unknown": 1}


def test_tool_env_episode():
    env = ToolEnv([multiply], reward_fn=lambda row, text: float(text.strip() == row["answer"]), system="Use tools.")
    first = env.reset({"prompt": "What is 6 * 7?", "answer": "42"})
    assert first == [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is 6 * 7?"}]
    assert env.tools[0]["function"]["name"] == "multiply"
    obs, reward, done, info = env.step({"role": "assistant", "content": call("multiply", a=6, b=7)})
    assert (obs, reward, done, info) == (
        [{"role": "tool", "name": "multiply", "content": "42"}],
        0.0,
        False,
        {"tool_calls": 1, "tool_errors": 0},
    )
    assert env.step({"role": "assistant", "content": "42"}) == StepResult(
        [], 1.0, True, {"tool_calls": 0, "tool_errors": 0}
    )


class CounterEnv:
    """A protocol environment: the episode ends on the third turn with reward = number of 'yes' answers."""

    def __init__(self, turns: int = 3):
        self.turns, self.count, self.yes = turns, 0, 0

    def reset(self, row):
        self.count = self.yes = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, message):
        self.count += 1
        self.yes += message["content"] == "yes"
        done = self.count >= self.turns
        return StepResult([] if done else [{"role": "user", "content": "again?"}], float(self.yes * done), done, {})


class TRLStyleEnv:
    """TRL's shape: reset(**row) returns text for the prompt, public methods are tools, get_reward scores."""

    def reset(self, **kwargs):
        self.secret = kwargs["secret"]
        self.guesses = 0
        return "Guess the number with the check tool."

    def check(self, guess: int) -> str:
        """Check a guess.

        Args:
            guess: the number guessed
        """
        self.guesses += 1
        return "right" if guess == self.secret else "wrong"

    def get_reward(self) -> float:
        return 1.0 / self.guesses if self.guesses else 0.0


@dataclasses.dataclass
class Obs:
    text: str


@dataclasses.dataclass
class Result:
    observation: Obs
    reward: float
    done: bool


class EchoOpenEnv:
    """OpenEnv's shape: reset() / step(action) return (observation, reward, done) objects."""

    def reset(self):
        return Result(Obs("say hello"), 0.0, False)

    def step(self, action):
        return Result(Obs(f"you said {action}"), float(action == "hello"), action == "hello")


def test_load_env_factory_gives_fresh_protocol_envs():
    make = load_env_factory("tests.test_envs:CounterEnv", turns=2)
    a, b = make(), make()
    assert a is not b and a.turns == 2
    a.reset({"prompt": "start"})
    assert check_step(a.step({"role": "assistant", "content": "yes"}), a).done is False
    assert check_step(a.step({"role": "assistant", "content": "yes"}), a) == StepResult([], 2.0, True, {})
    with pytest.raises(ConfigError, match="environment 'tests.test_envs:Nope'.*has no attribute 'Nope'"):
        load_env_factory("tests.test_envs:Nope")
    with pytest.raises(ConfigError, match="has no reset method"):
        load_env_factory(dict)()
    with pytest.raises(TypeError, match="reward must be a finite number"):
        check_step(([], float("nan"), True, {}), a)


def test_trl_style_adapter():
    env = load_env_factory("tests.test_envs:TRLStyleEnv")()
    assert isinstance(env, TRLEnvAdapter) and env.tools[0]["function"]["name"] == "check"
    first = env.reset({"prompt": "Play.", "secret": 7})
    assert first == [{"role": "user", "content": "Play.\n\nGuess the number with the check tool."}]
    assert env.step({"role": "assistant", "content": call("check", guess=3)}).observations[0]["content"] == "wrong"
    assert env.step({"role": "assistant", "content": call("check", guess=7)}).observations[0]["content"] == "right"
    assert env.step({"role": "assistant", "content": "done"}) == StepResult(
        [], 0.5, True, {"tool_calls": 0, "tool_errors": 0}
    )


def test_openenv_style_adapter():
    env = load_env_factory("tests.test_envs:EchoOpenEnv")()
    assert isinstance(env, OpenEnvAdapter)
    assert env.reset({}) == [{"role": "user", "content": "say hello"}]
    assert env.step({"role": "assistant", "content": "hi"}) == StepResult(
        [{"role": "user", "content": "you said hi"}], 0.0, False, {}
    )
    assert env.step({"role": "assistant", "content": "hello"}) == StepResult([], 1.0, True, {})
