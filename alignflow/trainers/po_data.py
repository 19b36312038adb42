"""Built-in data of ``alignflow po``: the papers' synthetic gold-reward setup on a built-in task.

When ``model.name_or_path`` is empty the task's tiny model is first fine-tuned on the task's SFT corpus
(``builtin.sft_steps``); that SFT model is the policy and the reference. When ``data.path`` is empty the policy
answers ``builtin.num_prompts`` training prompts ``builtin.samples_per_prompt`` times, and the answers are labelled
by the task's hidden gold reward through a Bradley-Terry draw with temperature ``task.label_noise``
(``alignflow.tasks.labels.label_pairs``), in the format the loss trains on (its row's ``data`` in the loss table):

* ``preference`` (DPO family): disjoint pairs of distinct samples of a prompt;
* ``unpaired`` (KTO): each pair's chosen answer desirable, its rejected one undesirable;
* ``ranked`` (CPL, PRO): all distinct samples of a prompt, ordered by a Plackett-Luce draw on gold / noise (for two
  samples exactly the Bradley-Terry draw of the pairs).

Both stages are cached under ``output_dir/builtin`` and reused while their inputs (task config, builtin config,
seed, the policy's files) are unchanged. ``gold_eval`` measures the mean gold reward of samples on held-out prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from pathlib import Path

from alignflow.algorithms.preference_table import loss_spec
from alignflow.config import ModelConfig, POConfig, SFTConfig, from_dict, to_dict
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.models.device import resolve_device
from alignflow.models.sequences import model_fingerprint
from alignflow.rollout.sample import sample
from alignflow.tasks import build_task
from alignflow.tasks.common import read_jsonl, write_jsonl
from alignflow.tasks.labels import label_pairs
from alignflow.trainers.run_dir import prepare_run_dir
from alignflow.trainers.sft import train_sft

log = logging.getLogger("alignflow.po")


def rank_samples(prompts: list[str], samples: list[list[str]], gold, noise: float, seed: int) -> list[dict]:
    """One ranked row per prompt with >= 2 distinct non-empty samples, best first, drawn from the Plackett-Luce model
    P(order) = prod_k exp(g_k / noise) / sum_{i >= k} exp(g_i / noise) by sorting g / noise + Gumbel noise
    (noise 0: sorted by gold)."""
    rng, rows = random.Random(seed), []
    for p, ss in zip(prompts, samples, strict=False):
        distinct = list(dict.fromkeys(s for s in ss if s.strip()))
        if len(distinct) < 2:
            continue
        g = gold([p] * len(distinct), distinct)
        keys = [gi if noise == 0 else gi / noise - math.log(-math.log(rng.random() or 1e-300)) for gi in g]
        order = sorted(range(len(distinct)), key=lambda i: -keys[i])
        rows.append({"prompt": p, "responses": [distinct[i] for i in order]})
    return rows


def to_unpaired(pairs: list[dict]) -> list[dict]:
    """Preference pairs -> unpaired rows: the chosen answer desirable, the rejected one undesirable."""
    return [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in pairs
        for side in ("chosen", "rejected")
    ]


def sample_texts(
    model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, temperature: float, seed: int
) -> list[list[str]]:
    """``n`` decoded answers per prompt from the built-in engine (prompts tokenised as plain text, as in SFT)."""
    return sample(model, tokenizer, prompts, n, max_new_tokens, temperature, seed)[0]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(marker: Path, key: str) -> bool:
    return marker.exists() and marker.read_text().strip() == key


def builtin_sft(cfg: POConfig, art, out: Path) -> Path:
    """The task's tiny model after ``builtin.sft_steps`` of SFT (cached); returns the model directory."""
    b = cfg.builtin
    key = _key(to_dict(cfg.task), b.sft_steps, b.sft_lr, cfg.train.seed, cfg.train.device)
    marker = out / "sft.key"
    if not (_cached(marker, key) and (out / "sft" / "model").is_dir()):
        log.info("built-in data: SFT of the '%s' task's model for %d steps", cfg.task.name, b.sft_steps)
        train_sft(
            from_dict(
                SFTConfig,
                {
                    "model": {"name_or_path": str(art.model_dir), "tokenizer": str(art.tokenizer_dir)},
                    "data": {"path": str(art.sft_path), "max_len": 128, "eval_fraction": 0.0},
                    "optim": {"lr": b.sft_lr, "warmup_ratio": 0.05},
                    "train": {
                        "output_dir": str(out / "sft"),
                        "batch_size": 32,
                        "max_steps": b.sft_steps,
                        "seed": cfg.train.seed,
                        "progress": cfg.train.progress,
                        "device": cfg.train.device,
                        "num_threads": cfg.train.num_threads,
                        "overwrite": True,
                    },
                },
            )
        )  # a stale cache is replaced
        marker.write_text(key)
    return out / "sft" / "model"


def builtin_rows(cfg: POConfig, art, fmt: str, out: Path) -> Path:
    """Answers of the policy to the task's training prompts, gold-labelled in format ``fmt`` (cached); returns
    the jsonl path."""
    b = cfg.builtin
    path = out / f"{fmt}.jsonl"
    key = _key(to_dict(cfg.task), to_dict(b), fmt, cfg.train.seed, model_fingerprint(cfg.model.name_or_path))
    marker = out / f"{fmt}.key"
    if _cached(marker, key) and path.exists():
        return path
    prompts = [r["prompt"] for r in read_jsonl(art.prompts_path)[: b.num_prompts]]
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.revision)
    policy = load_causal_lm(
        ModelConfig(name_or_path=cfg.model.name_or_path, dtype=cfg.model.dtype), resolve_device(cfg.train.device)
    )
    log.info(
        "built-in data: %d prompts x %d samples from %s, labelled by the gold reward",
        len(prompts),
        b.samples_per_prompt,
        cfg.model.name_or_path,
    )
    samples = sample_texts(policy, tok, prompts, b.samples_per_prompt, b.max_new_tokens, b.temperature, cfg.train.seed)
    if fmt == "ranked":
        rows = rank_samples(prompts, samples, art.gold_reward, cfg.task.label_noise, cfg.train.seed)
    else:
        rows = label_pairs(prompts, samples, art.gold_reward, cfg.task.label_noise, cfg.train.seed)
        rows = to_unpaired(rows) if fmt == "unpaired" else rows
    write_jsonl(path, rows)
    marker.write_text(key)
    return path


def resolve_po_builtin(cfg: POConfig):
    """Fill in an empty ``model.name_or_path`` (SFT of the task's model) and ``data.path`` (gold-labelled samples of
    the policy), in place; returns the task artefacts (for ``gold_eval``), or None when both paths were given."""
    if cfg.model.name_or_path and cfg.data.path:
        return None
    root = prepare_run_dir(cfg.train, check_only=True)  # refused before the built-in SFT and samples
    art = build_task(cfg.task.name, cfg.task, root / "task")
    out = root / "builtin"
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.model.name_or_path:
        cfg.model.name_or_path = str(builtin_sft(cfg, art, out))
        cfg.model.tokenizer = cfg.model.tokenizer or str(art.tokenizer_dir)
    if not cfg.data.path:
        cfg.data.path = str(builtin_rows(cfg, art, loss_spec(cfg.loss.name).data, out))
        cfg.data.format = "auto"
    return art


def gold_eval(model, tokenizer, art, num_prompts: int, max_new_tokens: int, seed: int) -> float:
    """Mean gold reward of 2 samples (temperature 1) per held-out prompt of the task."""
    prompts = [r["prompt"] for r in read_jsonl(art.eval_prompts_path)[:num_prompts]]
    samples = sample_texts(model, tokenizer, prompts, 2, max_new_tokens, 1.0, seed)
    g = art.gold_reward(
        [p for p, ss in zip(prompts, samples, strict=False) for _ in ss], [s for ss in samples for s in ss]
    )
    return sum(g) / len(g)
