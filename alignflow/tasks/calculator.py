"""The ``calculator`` environment: products of large numbers that come out right only through a tool.

    from alignflow.tasks.calculator import make_rows, make_env
    rows = make_rows(seed=0, n=64)            # {"prompt": "What is 482913 * 77812?", "answer": "37576426956"}
    env = make_env()                          # a ToolEnv with the calculator tool (alignflow.envs)

A prompt asks for ``a <op> b`` with ``a`` and ``b`` of ``DIGITS`` digits (``+``, ``-`` or ``*``). The model may
call ``calculator(expression)`` with ``<tool_call>{"name": "calculator", "arguments": {"expression": "..."}}
</tool_call>``; the episode ends at the first message without a tool call, scored 1 when that message is
exactly the answer (surrounding whitespace ignored), else 0. Products of two 6-digit numbers have 11 or 12
digits: a guess is practically never right, a tool call then a copy of its result always is (tested).

The calculator evaluates integer arithmetic only (``+ - * // % ( )`` and unary minus) from the expression's
syntax tree; anything else, or an operand or result over ``MAX_DIGITS`` digits, is an error message.
"""

from __future__ import annotations

import ast
import operator

from alignflow.envs import ToolEnv
from alignflow.tasks.common import task_rng

NAME = "calculator"
DIGITS = 6
MAX_DIGITS = 40
SYSTEM = ('Use the calculator tool for arithmetic: <tool_call>{"name": "calculator", "arguments": '
          '{"expression": "12 * 34"}}</tool_call>. Then reply with the number only.')
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod}


def _eval(node):
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        value = _OPS[type(node.op)](left, right)
        if len(str(abs(value))) > MAX_DIGITS:
            raise ValueError(f"result over {MAX_DIGITS} digits")
        return value
    raise ValueError(f"only integers and + - * // % ( ) are allowed, got {ast.dump(node)[:60]}")


def calculator(expression: str) -> str:
    """Evaluate an integer arithmetic expression.

    Args:
        expression: integers with + - * // % and parentheses, e.g. "12 * (3 + 4)"
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an expression: {e.msg}") from None
    return str(_eval(tree.body))


def reward(row: dict, text: str) -> float:
    """1.0 when the final message is exactly the answer (whitespace ignored)."""
    if "answer" not in row:
        raise ValueError(f"calculator row has no 'answer' field (fields: {sorted(row)})")
    return float(text.strip() == str(row["answer"]))


def make_env() -> ToolEnv:
    """A fresh calculator environment (load it as ``alignflow.tasks.calculator:make_env``)."""
    return ToolEnv([calculator], reward_fn=reward, system=SYSTEM)


def make_rows(seed: int = 0, n: int = 256, digits: int = DIGITS) -> list[dict]:
    """``n`` distinct problems ``{"prompt", "answer", "expression"}``; the same seed gives the same rows."""
    rng = task_rng(NAME, seed, "problems")
    rows, seen = [], set()
    while len(rows) < n:
        a, b = rng.randrange(10 ** (digits - 1), 10 ** digits), rng.randrange(10 ** (digits - 1), 10 ** digits)
        op = rng.choice("+-*")
        expression = f"{a} {op} {b}"
        if expression not in seen:
            seen.add(expression)
            rows.append({"prompt": f"What is {expression}?", "answer": calculator(expression),
                         "expression": expression})
    return rows
