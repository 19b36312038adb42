"""Sampling text from a policy with the built-in engine: ``n`` samples per prompt, decoded, with fixed seeds.

Used by evaluation, by the built-in data of ``alignflow po`` and by the online preference rounds' evaluation.
"""

from __future__ import annotations

from typing import Any

from alignflow.batch import Batch, cat_rollouts
from alignflow.rollout.engine import HFEngine
from alignflow.rollout.sampling import SamplingParams

GEN_ROWS = 256  # sampled rows per engine call (a memory knob; the samples depend on it through the seeds only)


def sample_batch(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    chunk_rows: int = GEN_ROWS,
) -> Batch:
    """``n`` samples per prompt with the built-in engine: rows i*n .. i*n+n-1 belong to prompt i.

    The engine's Batch (``prompt_ids``, ``response_ids``, masks, ``input_ids``, ``position_ids``, meta
    ``finish_reason``) plus meta ``response`` (decoded, special tokens removed). Prompts go through the engine
    ``chunk_rows // n`` at a time; chunk c samples with seed ``seed * 1_000_003 + c``.
    """
    engine = HFEngine(model, tokenizer)
    per = max(1, chunk_rows // n)
    parts = []
    for c, start in enumerate(range(0, len(prompt_ids), per)):
        params = SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed * 1_000_003 + c)
        parts.append(engine.generate(prompt_ids[start : start + per], params))
    batch = cat_rollouts(parts)
    ids, mask = batch["response_ids"], batch["response_mask"]  # (B, Tr) each
    texts = tokenizer.batch_decode(
        [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=False)], skip_special_tokens=True
    )
    return batch.union(Batch(meta={"response": texts}))


def sample(
    model: Any, tokenizer: Any, prompts: list[str], n: int, max_new_tokens: int, temperature: float, seed: int
) -> tuple[list[list[str]], list[list[int]]]:
    """Text prompts (tokenised as plain text) -> ``n`` decoded responses per prompt and their token counts."""
    batch = sample_batch(
        model, tokenizer, [tokenizer(p)["input_ids"] for p in prompts], n, max_new_tokens, temperature, seed
    )
    texts, lengths = batch["response"], batch["response_mask"].sum(-1).tolist()
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))], [
        lengths[i * n : (i + 1) * n] for i in range(len(prompts))
    ]
