"""CGPO: a mixture of judges as constraints, and its three policy updates (``docs/cgpo.md``).

Each judge j says whether a sample violates its constraint: ``V[i, j] = 1`` (violated) or 0. Rule judges are
Python functions over texts; an LLM judge's principle verdict (yes = satisfied) is one more column. A sample
is *feasible* when no judge flags it, ``f_i = prod_j (1 - V[i, j])``. With a reward model score ``r_i`` and the
score ``r_anchor`` of the prompt's anchor response (a reference answer), the *calibrated* reward is

    R_i = sigmoid(r_i - r_anchor)                 (in (0, 1): how likely y_i beats the anchor)

The three updates, per prompt group of G samples:

* **CRPG** (constrained regularised policy gradient): ``w_i = f_i * R_i``; loss ``-mean_i w_i * log pi(y_i)``
  (``log pi`` summed over the response's tokens; weights are constants). An infeasible sample gets no
  reward, so the gradient only pushes up feasible, well-rated samples.
* **CODPO** (constrained online DPO): chosen = the feasible sample with the highest ``r``; rejected = the
  infeasible sample with the lowest ``r`` when one exists, else the lowest-``r`` sample of the group. A
  group without a feasible sample, or with one sample only, gives no pair. Loss
  ``-log sigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r))) - lam * lp_c / len_c`` (DPO plus the chosen
  response's length-normalised NLL).
* **CRRAFT** (constrained reward-ranked fine-tuning): the feasible sample with the highest ``r`` per group is
  kept, weighted by its calibrated reward; loss ``-sum_kept R_k * log pi(y_k) / #kept``.

:func:`constraint_satisfaction` reports, per judge, the fraction of samples that satisfy it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def feasible(violations: Tensor) -> Tensor:
    """(N, J) violation flags -> (N,) 1.0 where no judge is violated, else 0.0."""
    return (violations.float().sum(-1) == 0).float()


def calibrated_reward(rewards: Tensor, anchor_rewards: Tensor) -> Tensor:
    """sigmoid(r_i - r_anchor): rewards (N,), anchor_rewards (N,) (the anchor of each sample's prompt)."""
    return torch.sigmoid(rewards - anchor_rewards)


def crpg_loss(logp: Tensor, rewards: Tensor, anchor_rewards: Tensor, violations: Tensor) -> tuple[Tensor, Tensor]:
    """CRPG: (loss, weights); logp (N,) summed log-probabilities, violations (N, J)."""
    w = (feasible(violations) * calibrated_reward(rewards, anchor_rewards)).detach()
    return -(w * logp).mean(), w


def codpo_pairs(rewards: Tensor, violations: Tensor) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs within one group: rewards (G,), violations (G, J); [] when none."""
    ok = feasible(violations).bool()
    if rewards.numel() < 2 or not ok.any():
        return []
    idx = torch.arange(rewards.numel())
    chosen = int(idx[ok][rewards[ok].argmax()])
    pool = idx[~ok] if (~ok).any() else idx[idx != chosen]
    rejected = int(pool[rewards[pool].argmin()])
    return [(chosen, rejected)]


def codpo_loss(
    lp_c: Tensor, ref_c: Tensor, lp_r: Tensor, ref_r: Tensor, len_c: Tensor, beta: float = 0.1, lam: float = 1.0
) -> Tensor:
    """CODPO over P pairs (each argument (P,)): mean of -log sigmoid(beta * margin) - lam * lp_c / len_c."""
    margin = (lp_c - ref_c) - (lp_r - ref_r)
    return (-F.logsigmoid(beta * margin) - lam * lp_c / len_c.float()).mean()


def crraft_select(rewards: Tensor, violations: Tensor) -> int | None:
    """The kept sample of one group: the feasible one with the highest reward; None when none is feasible."""
    ok = feasible(violations).bool()
    if not ok.any():
        return None
    idx = torch.arange(rewards.numel())
    return int(idx[ok][rewards[ok].argmax()])


def crraft_loss(logp: Tensor, rewards: Tensor, anchor_rewards: Tensor, violations: Tensor, group_size: int) -> Tensor:
    """CRRAFT over N = B * group_size samples (grouped consecutively); 0 (with a graph) when nothing is kept."""
    calib = calibrated_reward(rewards, anchor_rewards).detach()
    kept = [
        g * group_size + k
        for g in range(rewards.numel() // group_size)
        if (
            k := crraft_select(
                rewards[g * group_size : (g + 1) * group_size], violations[g * group_size : (g + 1) * group_size]
            )
        )
        is not None
    ]
    if not kept:
        return logp.sum() * 0.0
    sel = torch.tensor(kept)
    return -(calib[sel] * logp[sel]).sum() / len(kept)


Judge = Callable[[list[str], list[str]], Sequence[object]]  # fn(prompts, responses) -> satisfied per sample


def judge_violations(judges: dict[str, Judge], prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
    """(N, J) violation flags from judges ``name -> fn(prompts, responses) -> list[bool]`` (True = satisfied).

    A rule judge is any such function; an LLM judge's principle reward (1 yes, 0 no) fits with ``>= 0.5``."""
    cols = []
    for name, fn in judges.items():
        ok = list(fn(list(prompts), list(responses)))
        if len(ok) != len(responses):
            raise ValueError(f"constraint judge {name!r} returned {len(ok)} verdicts for {len(responses)} samples")
        cols.append(torch.tensor([0.0 if bool(v) else 1.0 for v in ok]))
    return torch.stack(cols, dim=1) if cols else torch.zeros(len(responses), 0)


def constraint_satisfaction(violations: Tensor, names: Sequence[str]) -> dict[str, float]:
    """Per judge, the fraction of samples that satisfy it (``constraints/<name>``), and ``constraints/all``."""
    out = {f"constraints/{n}": 1.0 - violations[:, j].float().mean().item() for j, n in enumerate(names)}
    out["constraints/all"] = feasible(violations).mean().item() if violations.numel() else 1.0
    return out
