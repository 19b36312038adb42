"""Intuitive Fine-Tuning (IFT; Hua et al. 2024/2025) as pure tensor functions: SFT data, one policy, no reference.

IFT trains on the same (prompt, target answer) rows as SFT but changes what the model conditions on. SFT scores
token ``y_t`` after the TARGET prefix ``y_<t``, a prefix the model would not have produced itself; IFT moves the
prefix toward the model's own predictions with a *temporal residual connection* on the input embeddings::

    ŷ_t   = argmax π_θ(· | x, y_<t)                 the model's own guess of token t (a no-grad forward)
    ẽ_t   = (1 - λ)·E[y_t] + λ·E[ŷ_t]              on answer positions (prompt positions keep E[x_t])
    lp_t  = log π_θ(y_t | ẽ_<t)                     the target tokens scored on the mixed inputs (with gradient)

and weights each token by how much of the answer's remaining loss it leads to (*relation propagation*)::

    c_t = -lp_t / n                                 n = the answer's token count
    w_t = Σ_{s ≥ t} γ^(s - t)·c_s                   discounted sum over the rest of the answer
    w_t ← w_t · n / Σ_s w_s                         (so the weights average 1 over the answer)
    L   = (1/n)·Σ_t w_t·(-lp_t)                     per row; γ = 0 gives w_t = 1, the SFT loss on mixed inputs

λ = 0 and γ = 0 is plain SFT. Defaults λ = 0.2, γ = 0.95 are those of the authors' released configuration.
Gradient flows through the weights as well (they are built from lp), as in that configuration's code. The forward
passes that produce ``ŷ`` and ``lp`` live in the trainer; this module holds the arithmetic. docs/ift.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignflow.algorithms.preference import LossOut, reduce_rows, weighted_mean


def ift_shift_predictions(input_ids: Tensor, next_token_guess: Tensor, answer_mask: Tensor) -> Tensor:
    """(B, T) token ids whose answer positions hold the model's guess of that position's token.

    ``next_token_guess[:, t]`` is the argmax of the logits at position t, i.e. a guess of token t+1; it is shifted
    right by one so that position t holds the guess of token t. Positions outside ``answer_mask`` keep
    ``input_ids``.
    """
    shifted = torch.cat([input_ids[:, :1], next_token_guess[:, :-1]], dim=1)  # (B, T)
    return torch.where(answer_mask.bool(), shifted, input_ids)


def ift_mix_embeddings(target_embeds: Tensor, guess_embeds: Tensor, answer_mask: Tensor, lam: float) -> Tensor:
    """Temporal residual connection: ``(1 - λ)·E[y_t] + λ·E[ŷ_t]`` on answer positions, ``E[x_t]`` elsewhere.

    ``target_embeds``, ``guess_embeds``: (B, T, D); ``answer_mask`` (B, T); λ in [0, 1].
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"ift: lambda must be in [0, 1], got {lam}")
    mixed = (1.0 - lam) * target_embeds + lam * guess_embeds  # (B, T, D)
    return torch.where(answer_mask.bool().unsqueeze(-1), mixed, target_embeds)


def ift_propagation_weights(token_logps: Tensor, mask: Tensor, gamma: float = 0.95) -> Tensor:
    """(B, T) relation-propagation weights ``w_t`` (module docstring); 0 off the mask, mean 1 on it.

    ``w_t = Σ_{s≥t} γ^(s-t)·(-lp_s/n)``, rescaled to sum to n per row. γ = 0 returns 1 on every answer token.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"ift: gamma must be in [0, 1], got {gamma}")
    m = mask.to(token_logps.dtype)
    if gamma == 0.0:
        return m
    n = m.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1)
    c = -token_logps * m / n  # (B, T)
    w = torch.zeros_like(c)
    running = torch.zeros_like(c[:, 0])
    for t in range(c.shape[1] - 1, -1, -1):  # right to left: w_t = c_t + γ·w_{t+1}
        running = c[:, t] + gamma * running
        w[:, t] = running
    w = w * m
    return w * n / w.sum(-1, keepdim=True).clamp(min=1e-12)


def ift_loss(
    token_logps: Tensor, mask: Tensor, *, gamma: float = 0.95, reduction: str = "mean", weights: Tensor | None = None
) -> LossOut:
    """IFT loss from the target tokens' log-probs on mixed inputs: ``l_i = (1/n_i)·Σ_t w_t·(-lp_t)``.

    ``token_logps``, ``mask``: (B, T). Reduction and row ``weights`` as the preference losses
    (``alignflow.algorithms.preference``). Metrics: ``ift/nll`` (the unweighted per-token NLL, the SFT loss on the
    same inputs) and ``ift/weight_max`` (the largest propagation weight; 1 when γ = 0).
    """
    m = mask.to(token_logps.dtype)
    n = m.sum(-1).clamp(min=1.0)  # (B,)
    w = ift_propagation_weights(token_logps, mask, gamma)  # (B, T)
    losses = (-token_logps * w * m).sum(-1) / n  # (B,)
    nll = ((-token_logps * m).sum(-1) / n).detach()
    metrics = {"ift/nll": weighted_mean(nll, weights), "ift/weight_max": w.detach().max()}
    return reduce_rows(losses, reduction, weights), metrics
