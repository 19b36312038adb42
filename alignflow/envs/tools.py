"""Tools: Python functions the model may call, their JSON schemas, and the calls found in its output.

    def add(a: int, b: int) -> int:
        '''Add two integers.

        Args:
            a: the first number
            b: the second number
        '''
        return a + b

    box = ToolBox([add])
    box.schemas          # JSON schemas for the chat template: apply_chat_template(..., tools=box.schemas)
    msgs, stats = box.run(assistant_text)   # one {"role": "tool", ...} message per call found; stats counts bad calls

A tool is a plain function with type hints and a Google-style docstring (``Args:`` describes every argument);
its schema comes from ``transformers.utils.get_json_schema``. A function that cannot be described is a
``ConfigError`` naming it, at construction.

**Calls** are read from the assistant's text as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks (the format of the Qwen2.5 / Hermes chat templates). A call is **bad** when its JSON does not parse,
it names no known tool, its arguments are not an object or do not fit the function's signature, the tool
raises, or it runs past ``timeout_s``; a bad call is answered with a tool message that starts with ``error:``
and says what was wrong, and is counted, never raised.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Callable

from alignflow.config import ConfigError
from alignflow.rewards.rules import CallTimeout, run_with_timeout

CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclasses.dataclass
class ToolStats:
    """Counts of one or more turns: calls found, bad calls (of which: unparsable text, unknown tool)."""

    calls: int = 0
    bad: int = 0
    unparsable: int = 0
    unknown: int = 0

    def add(self, other: ToolStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of ``fn`` (name, description, parameters) from its signature and docstring."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # DocstringParsingException, TypeHintParsingException
        raise ConfigError(
            f"tool {getattr(fn, '__name__', fn)!r}: cannot describe it as a JSON schema ({e}); give it "
            "type hints and a docstring whose 'Args:' section describes every argument"
        ) from e


def parse_tool_calls(text: str) -> list:
    """Every ``<tool_call>`` block of ``text`` (an unclosed last block included), each as a dict
    ``{"name", "arguments"}`` or, when it does not parse, as an error string."""
    out = []
    for raw in CALL_RE.findall(text or ""):
        try:
            call = json.loads(raw.strip())
        except ValueError as e:
            out.append(f"the tool call is not valid JSON ({e.msg} at char {e.pos}): {raw.strip()[:80]!r}")
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            out.append(f"a tool call must be a JSON object with a 'name' string, got {raw.strip()[:80]!r}")
            continue
        out.append({"name": call["name"], "arguments": call.get("arguments", {})})
    return out


class ToolBox:
    """A set of tools by name; :meth:`run` answers every call in an assistant message."""

    def __init__(self, tools: list, timeout_s: float | None = 5.0, max_result_chars: int = 2000):
        self.tools: dict[str, Callable] = {}
        for fn in tools:
            if not callable(fn):
                raise ConfigError(f"tool {fn!r:.80} is not callable")
            schema = tool_schema(fn)
            name = schema["function"]["name"]
            if name in self.tools:
                raise ConfigError(f"two tools are named {name!r}")
            self.tools[name] = fn
        self.schemas = [tool_schema(fn) for fn in self.tools.values()]
        self.timeout_s, self.max_result_chars = timeout_s, max_result_chars

    def call(self, call: dict) -> tuple[str, bool]:
        """(the tool message's content, whether the call was good)."""
        name, args = call["name"], call["arguments"]
        if name not in self.tools:
            return f"error: no tool named {name!r}; the tools are: {', '.join(self.tools) or '(none)'}", False
        if not isinstance(args, dict):
            return f"error: the arguments of {name!r} must be a JSON object, got {type(args).__name__}", False
        fn = self.tools[name]
        try:
            inspect.signature(fn).bind(**args)
        except TypeError as e:
            return f"error: {name}{inspect.signature(fn)}: {e}", False
        try:
            result = run_with_timeout(fn, (), args, self.timeout_s)
        except CallTimeout:
            return f"error: {name} gave no result within {self.timeout_s} s", False
        except Exception as e:
            return f"error: {name} raised {type(e).__name__}: {e}"[: self.max_result_chars], False
        text = result if isinstance(result, str) else json.dumps(result, default=str)
        return text[: self.max_result_chars], True

    def run(self, text: str) -> tuple[list[dict], ToolStats]:
        """One tool message per call in ``text`` (in order) and the counts."""
        messages, stats = [], ToolStats()
        for call in parse_tool_calls(text):
            stats.calls += 1
            if isinstance(call, str):
                content, ok, name = f"error: {call}", False, "invalid"
                stats.unparsable += 1
            else:
                content, ok = self.call(call)
                name = call["name"]
                stats.unknown += name not in self.tools
            stats.bad += not ok
            messages.append({"role": "tool", "name": name, "content": content})
        return messages, stats
