"""MAPL training on the built-in constrained-instruction rows (``alignflow.tasks.constraints``): a small loop that
computes the policy's and the reference's summed answer log-probs for the three kinds of rows and minimises
``alignflow.algorithms.mapl.mapl_loss``. Not yet a command: the ``po`` trainer reads one prompt per row, and MAPL's
prompt-level rows have two (docs/mapl.md). The reference is the policy's initial weights; its log-probs are computed
once. Rows are encoded as ``tokenizer(prompt) + tokenizer(answer) + EOS`` (the built-in tasks' plain format).
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch

from alignflow.algorithms.mapl import mapl_loss, margins_from_logps
from alignflow.models.sequences import sequence_logps

# per kind: the (prompt, answer) of the winning and the losing side of each comparison
SIDES = {
    "response": (("prompt", "chosen"), ("prompt", "rejected")),
    "intra": (("prompt_chosen", "response"), ("prompt_rejected", "response")),
}


def encode(tok: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input ids, answer mask) of prompt + answer + EOS."""
    p = tok(prompt)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + a, [0] * len(p) + [1] * len(a)


def _seqs(tok: Any, kind: str, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Winning sides then losing sides; ``inter`` rows give four: (x⁺, y_w), (x⁺, y_l), (x, y_w), (x, y_l)."""
    if kind == "inter":
        keys = [("prompt_plus", "chosen"), ("prompt_plus", "rejected"), ("prompt", "chosen"), ("prompt", "rejected")]
    else:
        keys = list(SIDES[kind])
    return [encode(tok, r[p], r[a]) for p, a in keys for r in rows]


def margins(model: Any, ref_logps: torch.Tensor, tok: Any, kind: str, rows: list[dict], device: Any) -> torch.Tensor:
    """(B,) the level's margin h for ``rows`` (module ``alignflow.algorithms.mapl``)."""
    lp = sequence_logps(model, _seqs(tok, kind, rows), device, flat=False)["logps"]
    n = len(rows)
    if kind == "inter":
        plus = margins_from_logps(lp[:n], ref_logps[:n], lp[n : 2 * n], ref_logps[n : 2 * n])
        base = margins_from_logps(lp[2 * n : 3 * n], ref_logps[2 * n : 3 * n], lp[3 * n :], ref_logps[3 * n :])
        return plus - base
    return margins_from_logps(lp[:n], ref_logps[:n], lp[n:], ref_logps[n:])


def train_mapl(
    model: Any,
    tok: Any,
    data: dict[str, list[dict]],
    *,
    steps: int,
    batch: int = 16,
    lr: float = 1e-3,
    beta: float = 0.1,
    w_intra: float = 1.0,
    w_inter: float = 1.0,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` in place on ``data`` ({response, intra, inter}: row lists; an empty list drops that level);
    returns the per-step losses."""
    device = next(model.parameters()).device
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref_lp = {
            k: sequence_logps(ref, _seqs(tok, k, rows), device, flat=False)["logps"] for k, rows in data.items() if rows
        }
    del ref
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng, losses = random.Random(seed), []
    model.train()
    for _ in range(steps):
        h = {}
        for kind in ("response", "intra", "inter"):
            rows = data.get(kind) or []
            if not rows:
                h[kind] = torch.zeros(0, device=device)
                continue
            idx = rng.sample(range(len(rows)), min(batch, len(rows)))
            parts = 4 if kind == "inter" else 2
            n = len(rows)
            ref_sel = torch.cat([ref_lp[kind][j * n : (j + 1) * n][idx] for j in range(parts)])
            h[kind] = margins(model, ref_sel, tok, kind, [rows[i] for i in idx], device)
        loss, _ = mapl_loss(h["response"], h["intra"], h["inter"], beta=beta, w_intra=w_intra, w_inter=w_inter)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def level_accuracy(model: Any, ref: Any, tok: Any, kind: str, rows: list[dict]) -> float:
    """Fraction of ``rows`` whose margin h of level ``kind`` is positive (the model prefers the winning side more
    than the reference does)."""
    device = next(model.parameters()).device
    ref_lp = sequence_logps(ref, _seqs(tok, kind, rows), device, flat=False)["logps"]
    return float((margins(model, ref_lp, tok, kind, rows, device) > 0).float().mean())
