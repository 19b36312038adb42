"""Shared machinery of the built-in tasks: word-level tokenizer, tiny Llama, jsonl files, Bradley-Terry labels.

Each task module (``reviews``, ``arithmetic``) declares a :class:`TaskSpec` whose ``make_rows(cfg)`` returns
the task's data rows; :func:`build_task` (in ``alignflow.tasks``) writes them with the tokenizer and the
model into a temporary directory, adds a manifest and swaps the directory into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from alignflow.config import ConfigError, TaskConfig

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
CHAT_ROLES = ("system", "user", "assistant")
CHAT_MARKERS = tuple(f"<|{r}|>" for r in CHAT_ROLES) + ("<|end|>",)
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK) + CHAT_MARKERS

# Every message is "<|role|> content <|end|>"; the markers are special tokens, so a rendered conversation
# tokenises to exactly [<bos>, <|user|>, content..., <|end|>, <|assistant|>] (no BOS is added again: chat
# templates are tokenised with add_special_tokens=False).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat role must be system, user or assistant, got ' + m['role']) }}"
    "{% endif %}"
    "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

FILES = {
    "tokenizer_dir": "tokenizer",
    "model_dir": "model",
    "sft_path": "sft.jsonl",
    "prompts_path": "prompts.jsonl",
    "eval_prompts_path": "eval_prompts.jsonl",
    "pairs_path": "pairs.jsonl",
    "rated_path": "rated.jsonl",
}
MANIFEST = "task.json"
MAX_POSITIONS = 512

Reward = Callable[[list, list], list]


@dataclasses.dataclass
class TaskArtifacts:
    """Everything a built task provides: paths on disk plus its hidden gold reward."""

    name: str
    dir: Path
    tokenizer_dir: Path
    model_dir: Path
    sft_path: Path
    prompts_path: Path
    eval_prompts_path: Path
    pairs_path: Path
    rated_path: Path  # rated rows: prompt, completions, ratings of the task's attributes
    gold_reward: Reward
    rewards: dict = dataclasses.field(default_factory=dict)  # other named rewards, e.g. arithmetic's "format"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task: its vocabulary, how it writes its data files, its reward functions and its costs (``cost.task``
    of Safe RLHF: named functions of (prompts, responses) whose values a constraint keeps below a threshold)."""

    name: str
    vocab: tuple  # ordinary tokens (specials are added by build_tokenizer)
    join: str  # decoder separator: " " for words, "" for digit strings
    make_rows: Callable[[TaskConfig], dict]  # {"sft_path": [...], "prompts_path": ..., "eval_prompts_path": ...,
    #                                          "pairs_path": ..., "rated_path": ...}: the jsonl rows, keyed like FILES
    gold_reward: Reward
    rewards: dict = dataclasses.field(default_factory=dict)
    costs: dict = dataclasses.field(default_factory=dict)
    sft_steps: int = 400  # steps of the built-in SFT model (model.name_or_path=builtin:sft)
    sft_lr: float = 3e-3  # and its peak learning rate (cosine schedule, 5% warm-up, 32 rows per step)
    chat_template: str = ""  # the task's own chat template ("" = CHAT_TEMPLATE)
    special: tuple = ()  # extra special tokens (e.g. a role marker), dropped when decoding
    added: tuple = ()  # extra ordinary tokens matched whole before splitting (e.g. a tool-call opener)
    make_env: Callable | None = None  # multi-turn tasks: a factory of fresh environments (alignflow.envs)


# ------------------------------------------------------------------------------------------------ randomness
def task_rng(task: str, seed: int, stream: str) -> random.Random:
    """An independent, platform-stable stream per (task, seed, purpose): str seeds are hashed with SHA-512."""
    return random.Random(f"alignflow/{task}/{seed}/{stream}")


def bt_prefers_first(rng: random.Random, gold_a: float, gold_b: float, label_noise: float) -> bool:
    """Bradley-Terry draw: P(a preferred) = sigmoid((g(a) - g(b)) / label_noise); noise 0 -> the higher wins.

    Ties at zero noise go to ``a`` (so ``chosen >= rejected`` always holds in gold).
    """
    diff = gold_a - gold_b
    if label_noise == 0:
        return diff >= 0
    z = diff / label_noise
    p = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return rng.random() < p


def make_pair(
    rng: random.Random, prompt: str, a: str, b: str, gold_a: float, gold_b: float, label_noise: float
) -> dict:
    """A preference row ordered by a Bradley-Terry draw on the gold rewards of ``a`` and ``b``."""
    if bt_prefers_first(rng, gold_a, gold_b, label_noise):
        return {"prompt": prompt, "chosen": a, "rejected": b}
    return {"prompt": prompt, "chosen": b, "rejected": a}


def split_of(text: str, seed: int, eval_percent: int = 10) -> str:
    """'eval' for a stable ~eval_percent% of prompt texts, else 'train' (keeps eval prompts out of training)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}|{text}".encode()).digest()[:4], "big")
    return "eval" if h % 100 < eval_percent else "train"


def sample_unique(sample: Callable[[], dict], n: int, what: str, key: str = "prompt") -> list:
    """Draw rows from ``sample`` until ``n`` distinct ``row[key]`` values; error when the space runs dry."""
    rows, seen, tries = [], set(), 0
    while len(rows) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ConfigError(f"could not draw {n} distinct {what} (got {len(rows)}); ask for fewer")
        row = sample()
        if row[key] not in seen:
            seen.add(row[key])
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ files
def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines via a temporary file and an atomic rename; returns the row count."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_jsonl(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------ tokenizer
def build_tokenizer(
    vocab: Iterable[str], join: str = " ", special: tuple = (), added: tuple = (), chat_template: str = ""
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``vocab`` plus the special and chat-marker tokens.

    Pre-tokenisation splits on whitespace, isolates punctuation and splits digits one by one, so
    ``"37+58="`` -> ``3 7 + 5 8 =`` and ``"slow."`` -> ``slow .``. Decoding joins tokens with ``join``: with
    ``" "`` the canonical text (tokens separated by single spaces) round-trips exactly; with ``""`` digit
    strings do. A ``<bos>`` is prepended by the post-processor; no ``<eos>`` is appended (trainers add it).
    ``special`` tokens join the specials; ``added`` tokens are ordinary tokens matched whole in the raw text
    (before the split), so a long fixed string such as a tool-call opener is one token that decodes to itself.
    """
    if join not in (" ", ""):
        raise ValueError(f"join must be ' ' or '', got {join!r}")
    words = [w for w in dict.fromkeys(vocab) if w not in SPECIAL_TOKENS]
    specials = SPECIAL_TOKENS + tuple(special)
    table = {tok: i for i, tok in enumerate(list(specials) + words + list(added))}
    tok = Tokenizer(models.WordLevel(table, unk_token=UNK))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in added])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    # WordPiece without "##" continuation tokens and without clean-up joins every token with one space.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False) if join == " " else decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, table[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = chat_template or CHAT_TEMPLATE
    return fast


# ------------------------------------------------------------------------------------------------ model
def tiny_llama_config(cfg: TaskConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The tiny Llama architecture of a task; sizes from ``cfg``, vocabulary and special ids from the tokenizer."""
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"task.hidden_size ({cfg.hidden_size}) must be divisible by task.num_heads ({cfg.num_heads})")
    if (cfg.hidden_size // cfg.num_heads) % 2:
        raise ConfigError(
            f"task.hidden_size / task.num_heads = {cfg.hidden_size // cfg.num_heads} must be even "
            "(rotary embeddings rotate pairs of dimensions)"
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    return config


def init_model(cfg: TaskConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama; the same ``cfg.seed`` gives identical weights (global RNG untouched)."""
    config = tiny_llama_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def manifest(spec: TaskSpec, cfg: TaskConfig, source_hash: str) -> dict:
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "sft_steps"}  # not a property of the files
    return {"name": spec.name, "config": config, "source": source_hash, "files": FILES}


def artifacts(spec: TaskSpec, out_dir: Path) -> TaskArtifacts:
    out_dir = Path(out_dir)
    return TaskArtifacts(
        name=spec.name,
        dir=out_dir,
        gold_reward=spec.gold_reward,
        rewards=dict(spec.rewards),
        **{k: out_dir / v for k, v in FILES.items()},
    )


def write_task(spec: TaskSpec, cfg: TaskConfig, tmp_dir: Path, meta: dict) -> None:
    """Write every file of the task into ``tmp_dir`` (a fresh directory)."""
    tokenizer = build_tokenizer(spec.vocab, spec.join, spec.special, spec.added, spec.chat_template)
    tokenizer.save_pretrained(tmp_dir / FILES["tokenizer_dir"])
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise here
    try:
        init_model(cfg, tokenizer).save_pretrained(tmp_dir / FILES["model_dir"])
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    rows = spec.make_rows(cfg)
    for key in ("sft_path", "prompts_path", "eval_prompts_path", "pairs_path", "rated_path"):
        write_jsonl(tmp_dir / FILES[key], rows[key])
    (tmp_dir / MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
