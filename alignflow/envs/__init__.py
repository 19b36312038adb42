"""Environments for multi-turn and tool-using RL (see ``docs/environments.md`` and ``docs/tools.md``).

Layering: this package may import config, batch, data, models, rollout and rewards, never the trainers.
"""

from alignflow.envs.base import (
    Environment,
    OpenEnvAdapter,
    StepResult,
    ToolEnv,
    TRLEnvAdapter,
    adapt,
    check_step,
    load_env_factory,
    prompt_messages,
)
from alignflow.envs.tools import ToolBox, ToolStats, parse_tool_calls, tool_schema

__all__ = [
    "Environment",
    "OpenEnvAdapter",
    "StepResult",
    "TRLEnvAdapter",
    "ToolBox",
    "ToolEnv",
    "ToolStats",
    "adapt",
    "check_step",
    "load_env_factory",
    "parse_tool_calls",
    "prompt_messages",
    "tool_schema",
]
