"""The two forward passes of an Intuitive Fine-Tuning step (the maths is in ``alignflow.algorithms.ift``).

1. no gradient: the model reads the target sequence and guesses every next token (greedy);
2. with gradient: the answer positions' input embeddings become ``(1 - λ)·E[y_t] + λ·E[ŷ_t]`` and the model scores
   the TARGET tokens on those inputs.

Works with any Hugging Face causal LM that accepts ``inputs_embeds``. Padded rows only (the varlen path reads token
ids). The embedding table is read through the model's own input embeddings; the guesses' embeddings are detached,
so the gradient reaches the embedding table only through the target tokens (the authors freeze a copy for both;
here the target side trains as in SFT). docs/ift.md.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alignflow.algorithms.ift import ift_mix_embeddings, ift_shift_predictions


def ift_token_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, answer_mask: Tensor, lam: float
) -> Tensor:
    """(B, T) log π_θ(y_t | mixed inputs before t) at the positions of ``answer_mask`` (0 elsewhere).

    ``input_ids``, ``attention_mask``, ``answer_mask``: (B, T), right-padded; ``answer_mask`` marks the answer
    tokens (the ones scored). λ = 0 gives the ordinary teacher-forced log-probs.
    """
    embed = model.get_input_embeddings()
    with torch.no_grad():
        guess = model(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)  # (B, T)
    guess_ids = ift_shift_predictions(input_ids, guess, answer_mask)  # (B, T)
    mixed = ift_mix_embeddings(embed(input_ids), embed(guess_ids).detach(), answer_mask, lam)  # (B, T, D)
    logits = model(inputs_embeds=mixed, attention_mask=attention_mask).logits[:, :-1].float()  # (B, T-1, V)
    lp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    lp = torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)  # (B, T): position t scores token t
    return lp * answer_mask.to(lp.dtype)
