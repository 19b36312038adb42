"""Held-out evaluation of a generative reward model (Think-RM, ``docs/thinkrm.md``).

The model reads each judge prompt and decodes greedily; the last verdict of its output is compared with the
row's gold ``label`` (:mod:`alignflow.rewards.verdict`). Metrics, the same as the Bradley-Terry reward model's:

* ``accuracy`` -- the fraction of pairs whose verdict names the better response (no verdict = wrong);
* ``ece`` -- expected calibration error of the verdict probability. At the step where the model wrote its
  verdict word, ``p = softmax`` over the two verdict words only (``this`` vs ``that``), and ``p(label)`` is
  binned like the BT model's ``sigmoid(r_chosen - r_rejected)``
  (:func:`alignflow.algorithms.reward.calibration_error` of ``log p(label) - log p(other)``), over the
  rows that gave a verdict;
* ``parse_failures`` -- the fraction without a verdict.

Command line (the judge rows of a built ``reviews`` task)::

    python -m alignflow.rewards.generative_rm --model runs/thinkrm_grpo/model \\
        --data runs/thinkrm_sft/task/judge_eval.jsonl
"""

from __future__ import annotations

import argparse
import json

import torch

from alignflow.algorithms.reward import calibration_error
from alignflow.rewards.verdict import FIRST, POSITIONS, VERDICT_WORD, label_position, parse_position


@torch.no_grad()
def _generate(model, tokenizer, prompts: list, max_new_tokens: int):
    """Greedy continuations of ``prompts`` (left-padded batch): (texts, generated ids, per-step scores)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    gen = out.sequences[:, enc["input_ids"].shape[1] :]
    return tokenizer.batch_decode(gen, skip_special_tokens=True), gen, torch.stack(out.scores, dim=1)


def verdict_logit(gen: torch.Tensor, scores: torch.Tensor, ids: tuple) -> float | None:
    """log p(first) - log p(second) at the LAST verdict word written right after ``overall``; None if none.

    gen: (T,) generated ids; scores: (T, V) logits of each step; ids: (overall, this, that) token ids."""
    overall, first, second = ids
    toks = gen.tolist()
    steps = [t for t in range(1, len(toks)) if toks[t - 1] == overall and toks[t] in (first, second)]
    if not steps:
        return None
    logits = scores[steps[-1]].float()
    return (logits[first] - logits[second]).item()


def evaluate_generative_rm(model, tokenizer, rows: list, batch_size: int = 32, max_new_tokens: int = 96) -> dict:
    """accuracy, ece, parse_failures and n of a generative RM on judge rows ``{"prompt", "label"}``."""
    ids = tuple(tokenizer.convert_tokens_to_ids(w) for w in (VERDICT_WORD, *POSITIONS))
    correct, failures, diffs = 0, 0, []
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        texts, gen, scores = _generate(model, tokenizer, [r["prompt"] for r in chunk], max_new_tokens)
        for i, (row, text) in enumerate(zip(chunk, texts, strict=True)):
            want, got = label_position(row["label"], start + i), parse_position(text)
            correct += got == want
            failures += got is None
            z = verdict_logit(gen[i], scores[i], ids)
            if z is not None:
                diffs.append(z if want == FIRST else -z)
    n = len(rows)
    ece = calibration_error(torch.tensor(diffs)) if diffs else float("nan")
    return {"accuracy": correct / max(n, 1), "ece": ece, "parse_failures": failures / max(n, 1), "n": n}


def main(argv: list | None = None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description="Held-out accuracy / ECE of a generative reward model.")
    ap.add_argument("--model", required=True, help="a causal LM directory (e.g. runs/thinkrm_grpo/model)")
    ap.add_argument("--data", required=True, help="judge rows {prompt, label}, e.g. <task dir>/judge_eval.jsonl")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    metrics = evaluate_generative_rm(model, tok, rows, args.batch_size, args.max_new_tokens)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
