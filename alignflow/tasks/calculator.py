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

As a built-in task (``task.name: calculator``, :data:`TASK`: products only) it has its own tokenizer and chat
template: digits and operators are single tokens and decode with no separator, the tool-call opener
``CALL_OPEN`` and closer ``CALL_CLOSE`` are one token each (so a call is ``CALL_OPEN``, the expression's tokens,
``CALL_CLOSE``), every
message ends with ``<eos>`` (which also ends a sampled turn) and tool results come as ``<|tool|>`` messages.
The template does not print the tool schemas: the tiny model learns the one tool from its SFT corpus, where
``TOOL_FRACTION`` of the conversations call it and copy its result, and the rest answer at once with a guess
of the right length (practically always wrong). ``task.max_operand`` (e.g. 99) sets the operands' range
(:func:`operand_range`): two-digit products are a size the tiny model learns to copy in a test-sized SFT. RL
with the environment's reward (``env.task: true``) then has a reason to call the tool more often. The task's
environment has no system message (its words are not in the vocabulary); ``make_env()`` keeps :data:`SYSTEM`
for real chat models.
"""

from __future__ import annotations

import ast
import operator

from alignflow.config import TaskConfig
from alignflow.envs import ToolEnv
from alignflow.tasks.common import TaskSpec, make_pair, split_of, task_rng

NAME = "calculator"
DIGITS = 6
MAX_DIGITS = 40
SYSTEM = (
    'Use the calculator tool for arithmetic: <tool_call>{"name": "calculator", "arguments": '
    '{"expression": "12 * 34"}}</tool_call>. Then reply with the number only.'
)
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


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


def make_env(system: str = SYSTEM) -> ToolEnv:
    """A fresh calculator environment (load it as ``alignflow.tasks.calculator:make_env``)."""
    return ToolEnv([calculator], reward_fn=reward, system=system)


def operand_range(digits: int = DIGITS, max_operand: int = 0) -> tuple[int, int]:
    """(smallest, largest) operand: ``digits``-digit numbers, or, with ``max_operand`` (``task.max_operand``),
    the numbers with as many digits as ``max_operand`` up to it (99: 10..99)."""
    if max_operand:
        return 10 ** (len(str(max_operand)) - 1), max_operand
    return 10 ** (digits - 1), 10**digits - 1


def make_rows(seed: int = 0, n: int = 256, digits: int = DIGITS, ops: str = "+-*", max_operand: int = 0) -> list[dict]:
    """``n`` distinct problems ``{"prompt", "answer", "expression"}`` with operators from ``ops`` and operands
    from :func:`operand_range` (at most as many rows as there are distinct problems); the same seed gives the
    same rows."""
    rng = task_rng(NAME, seed, "problems")
    lo, hi = operand_range(digits, max_operand)
    n = min(n, (hi - lo + 1) ** 2 * len(set(ops)))
    rows, seen = [], set()
    while len(rows) < n:
        a, b = rng.randrange(lo, hi + 1), rng.randrange(lo, hi + 1)
        op = rng.choice(ops)
        expression = f"{a} {op} {b}"
        if expression not in seen:
            seen.add(expression)
            rows.append(
                {"prompt": f"What is {expression}?", "answer": calculator(expression), "expression": expression}
            )
    return rows


# ------------------------------------------------------------------------------------------------ built-in task
CALL_OPEN = '<tool_call>{"name": "calculator", "arguments": {"expression": "'
CALL_CLOSE = '"}}</tool_call>'
TOOL_MARKER = "<|tool|>"
TOOL_FRACTION = 0.5  # SFT conversations that call the tool (the rest guess)
OPS = "*"  # the built-in task asks for products only (11-12 digit answers)
NUM_PROMPTS = 1024
NUM_EVAL_PROMPTS = 128
VOCAB = tuple("0123456789") + ("+", "-", "*", "What", "is", "?")
# Like the shared template, with a tool role and <eos> closing every message (the sampled turn's end token).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('chat role must be system, user, assistant or tool, got ' + m['role']) }}"
    "{% endif %}"
    "<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def call_text(expression: str) -> str:
    """The assistant message that calls the calculator on ``expression`` in the built-in task's format."""
    return f"{CALL_OPEN}{expression.replace(' ', '')}{CALL_CLOSE}"


def task_env() -> ToolEnv:
    """The built-in task's environment: the calculator without a system message."""
    return make_env(system="")


def _answer_of(prompt: str) -> str:
    expression = prompt.strip().removeprefix("What is").removesuffix("?").strip()
    return calculator(expression)


def gold_reward(prompts: list, responses: list) -> list:
    """Single-turn view of the task: 1.0 where the response is exactly the prompt's answer."""
    return [float(str(r).strip() == _answer_of(p)) for p, r in zip(prompts, responses, strict=True)]


def _guess(rng, answer: str) -> str:
    """A wrong number with as many digits as the answer (a guess without the tool)."""
    sign, digits = ("-", answer[1:]) if answer.startswith("-") else ("", answer)
    while True:
        wrong = sign + str(rng.randrange(10 ** (len(digits) - 1), 10 ** len(digits)))
        if wrong != answer:
            return wrong


def _conversation(rng, row: dict) -> list:
    user = {"role": "user", "content": row["prompt"]}
    if rng.random() < TOOL_FRACTION:
        return [
            user,
            {"role": "assistant", "content": call_text(row["expression"])},
            {"role": "tool", "name": "calculator", "content": row["answer"]},
            {"role": "assistant", "content": row["answer"]},
        ]
    return [user, {"role": "assistant", "content": _guess(rng, row["answer"])}]


def _task_rows(cfg: TaskConfig) -> dict:
    """SFT conversations, train / eval prompts (disjoint by :func:`split_of`), answer pairs and rated answers."""
    pool = make_rows(
        cfg.seed, max(NUM_PROMPTS + NUM_EVAL_PROMPTS, cfg.num_sft) * 2, ops=OPS, max_operand=cfg.max_operand
    )
    split = {"train": [], "eval": []}
    for row in pool:
        split[split_of(row["prompt"], cfg.seed)].append(row)
    rng = task_rng(NAME, cfg.seed, "sft")
    train = split["train"]
    sft = [{"messages": _conversation(rng, train[i % len(train)])} for i in range(cfg.num_sft)]
    rng = task_rng(NAME, cfg.seed, "pairs")
    pairs, rated = [], []
    for i in range(cfg.num_pairs):
        row = train[i % len(train)]
        wrong = _guess(rng, row["answer"])
        pairs.append(make_pair(rng, row["prompt"], row["answer"], wrong, 1.0, 0.0, cfg.label_noise))
        if i < max(1, cfg.num_pairs // 2):
            rated.append(
                {
                    "prompt": row["prompt"],
                    "completions": [row["answer"], wrong],
                    "ratings": [{"correct": 1.0}, {"correct": 0.0}],
                }
            )
    return {
        "sft_path": sft,
        "prompts_path": train[:NUM_PROMPTS],
        "eval_prompts_path": split["eval"][:NUM_EVAL_PROMPTS],
        "pairs_path": pairs,
        "rated_path": rated,
    }


TASK = TaskSpec(
    name=NAME,
    vocab=VOCAB,
    join="",
    make_rows=_task_rows,
    gold_reward=gold_reward,
    rewards={"gold": gold_reward},
    chat_template=CHAT_TEMPLATE,
    special=(TOOL_MARKER,),
    added=(CALL_OPEN, CALL_CLOSE),
    make_env=task_env,
)
