"""VPL, variational preference learning (Poddar et al. 2024): a reward model conditioned on a latent user variable z
inferred from a few of the user's labelled pairs (docs/vpl.md).

Inputs are embeddings of whole (prompt, response) texts, ``e`` of width D, from a frozen language model.

* encoder q(z | C): each context pair (e_chosen, e_rejected) of the user's set C goes through a pair MLP, then one
  self-attention layer over the set, a mean over the set and two linear heads give (mu, log sigma^2); mu is clamped
  to [-1, 1];
* decoder r(e, z) = MLP([e; z]);
* loss (the negative ELBO) = mean_i softplus(-(r(e_w, z) - r(e_l, z))) + w_KL * mean KL(N(mu, sigma^2) || N(0, I)),
  with z = mu + sigma * eps (reparameterisation); the KL mean is over the context sets.

With latent width 0 the decoder is MLP(e) and the loss is the Bradley-Terry loss: a plain reward model on the
same embeddings (the baseline VPL is compared with).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row, (U, L) -> (U,):
    0.5 * sum_k (mu_k^2 + sigma_k^2 - 1 - log sigma_k^2)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def reparameterise(mu: Tensor, logvar: Tensor, noise: Tensor | None) -> Tensor:
    """z = mu + exp(logvar / 2) * noise; ``noise`` None gives the mean mu (evaluation)."""
    return mu if noise is None else mu + (0.5 * logvar).exp() * noise


def vpl_loss(
    r_chosen: Tensor, r_rejected: Tensor, mu: Tensor, logvar: Tensor, kl_weight: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative ELBO: mean BT loss of the (B,) reward pairs + kl_weight * mean KL of the (U, L) posteriors.
    Metrics: ``vpl/bt``, ``vpl/kl``, ``vpl/accuracy`` (fraction with r_chosen > r_rejected)."""
    bt = F.softplus(-(r_chosen - r_rejected)).mean()
    kl = gaussian_kl(mu, logvar).mean() if mu.numel() else r_chosen.new_zeros(())
    metrics = {"vpl/bt": bt.detach(), "vpl/kl": kl.detach(), "vpl/accuracy": (r_chosen > r_rejected).float().mean()}
    return bt + kl_weight * kl, metrics


def kl_anneal(step: int, weight: float, anneal_steps: int) -> float:
    """The KL weight at ``step``: linear from 0 to ``weight`` over ``anneal_steps`` (0: ``weight`` at once)."""
    return weight if anneal_steps <= 0 else weight * min(1.0, step / anneal_steps)


class VPLEncoder(nn.Module):
    """q(z | C): context pairs (U, K, 2D) -> (mu, logvar), each (U, L)."""

    def __init__(self, dim: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.pair = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.attn = nn.MultiheadAttention(hidden, 1, batch_first=True)
        self.mu, self.logvar = nn.Linear(hidden, latent), nn.Linear(hidden, latent)

    def forward(self, pairs: Tensor) -> tuple[Tensor, Tensor]:
        h = self.pair(pairs)  # (U, K, H)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        pooled = h.mean(1)  # (U, H)
        return self.mu(pooled).clamp(-1.0, 1.0), self.logvar(pooled)


class VPLRewardModel(nn.Module):
    """The encoder (absent with ``latent`` 0) and the decoder r(e, z) = MLP([e; z])."""

    def __init__(self, dim: int, hidden: int = 64, latent: int = 8) -> None:
        super().__init__()
        self.latent = latent
        self.encoder = VPLEncoder(dim, hidden, latent) if latent else None
        self.decoder = nn.Sequential(nn.Linear(dim + latent, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def posterior(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of each user's context set (U, K, 2D); empty (U, 0) tensors without a latent."""
        if self.encoder is None:
            empty = context.new_zeros(context.shape[0], 0)
            return empty, empty
        mu, logvar = self.encoder(context)
        return mu, logvar

    def reward(self, emb: Tensor, z: Tensor) -> Tensor:
        """r(e, z) for embeddings (..., D) and latents broadcast to (..., L) -> (...)."""
        out: Tensor = self.decoder(torch.cat([emb, z.expand(*emb.shape[:-1], z.shape[-1])], -1))
        return out.squeeze(-1)
