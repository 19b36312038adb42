"""P-RLHF's user model as soft prompts: learned user embeddings in the input-embedding space (docs/p_dpo.md).

User u (1..U) is K vectors ``e_u = e_0 + o_u`` prepended to the prompt: ``e_0`` (K, D) is the generic (unknown-user)
embedding shared by everyone, ``o_u`` (K, D) the user's individual offset; index 0 is the generic user itself
(``o_0 = 0``), which unknown and unseen users get.

The vectors reach the model through token ids past its vocabulary: :class:`UserPromptEmbedding` takes the place of
the model's input embedding, looks ids below the vocabulary size V up in the model's own table and id
``V + u * K + k`` as vector k of user u. So every forward of the project (padded or padding-free rows, generation,
the reference pass) runs unchanged; the LM head still has V outputs, so a sampled token is never a soft prompt.

Init: ``e_0`` is K rows of the model's own embedding table (a fixed permutation, seed 0: the same for every run, so
cached reference log-probs stay valid), ``o_u = 0``: at step 0 every user's conditioning is the generic one.

Saved next to the model (``user_embeddings.safetensors``: ``generic`` (K, D), ``offsets`` (U, K, D); its metadata
holds the user names and K); :func:`load_user_embeddings` attaches them to a loaded model for generation and
evaluation, and :func:`user_prompt` prefixes a prompt's token ids with a user's soft prompt.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

FILE = "user_embeddings.safetensors"


class UserPromptEmbedding(nn.Module):
    """The model's input embedding plus the user soft prompts (module docstring)."""

    def __init__(self, base: nn.Module, users: list[str], k: int) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"UserPromptEmbedding: k={k} soft-prompt vectors; at least 1")
        self.base, self.users, self.k = base, list(users), k
        self.vocab = base.num_embeddings
        w = base.weight.detach()
        pick = torch.randperm(self.vocab, generator=torch.Generator().manual_seed(0))[:k].to(w.device)
        self.generic = nn.Parameter(w[pick].clone())  # e_0 (K, D)
        self.offsets = nn.Parameter(torch.zeros(len(self.users), k, w.shape[1], dtype=w.dtype, device=w.device))

    # what callers of get_input_embeddings() read
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        """Ids this embedding accepts: the vocabulary and every user's soft-prompt ids (engines check prompts
        against it; the LM head keeps its V outputs)."""
        return self.vocab + (len(self.users) + 1) * self.k

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def table(self) -> Tensor:
        """((U + 1) * K, D): row u * K + k is e_0[k] + o_u[k], with o_0 = 0 (the generic user)."""
        zeros = self.offsets.new_zeros(1, self.k, self.offsets.shape[-1])
        return (self.generic.unsqueeze(0) + torch.cat([zeros, self.offsets])).reshape(-1, self.offsets.shape[-1])

    def forward(self, ids: Tensor) -> Tensor:
        soft = ids >= self.vocab
        out = self.base(ids.masked_fill(soft, 0))
        if not bool(soft.any()):
            return out
        extra = self.table()[(ids - self.vocab).clamp(min=0)]
        return torch.where(soft.unsqueeze(-1), extra.to(out.dtype), out)

    def index(self, user: str | None) -> int:
        """1..U for a known user, 0 (the generic user) for None or a user the model has not seen."""
        return self.users.index(user) + 1 if user in self.users else 0

    def soft_ids(self, user: str | None) -> list[int]:
        """The K token ids that stand for ``user``'s soft prompt."""
        start = self.vocab + self.index(user) * self.k
        return list(range(start, start + self.k))


def user_embedding(model) -> UserPromptEmbedding | None:
    emb = model.get_input_embeddings()
    return emb if isinstance(emb, UserPromptEmbedding) else None


def attach_user_embeddings(model, users: list[str], k: int) -> UserPromptEmbedding:
    """Put a fresh :class:`UserPromptEmbedding` (users in this order, K vectors) in the model's input embedding."""
    if user_embedding(model) is not None:
        raise ValueError("attach_user_embeddings: the model already has user embeddings")
    emb = UserPromptEmbedding(model.get_input_embeddings(), users, k)
    model.set_input_embeddings(emb)
    return emb


def prefix(ids: list[int], mask: list[int], soft: list[int], bos: int | None) -> tuple[list[int], list[int]]:
    """A sequence with the soft prompt's ids at the start of its prompt (after a leading BOS), outside the loss."""
    at = 1 if bos is not None and ids and ids[0] == bos else 0
    return ids[:at] + soft + ids[at:], mask[:at] + [0] * len(soft) + mask[at:]


def user_prompt(model, prompt_ids: list[int], user: str | None, bos: int | None = None) -> list[int]:
    """A prompt's token ids after ``user``'s soft prompt (the generic one for None or an unseen user); unchanged
    for a model without user embeddings."""
    emb = user_embedding(model)
    return prompt_ids if emb is None else prefix(prompt_ids, [0] * len(prompt_ids), emb.soft_ids(user), bos)[0]


def save_user_embeddings(emb: UserPromptEmbedding, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(directory) / FILE
    tensors = {"generic": emb.generic.detach().float().cpu(), "offsets": emb.offsets.detach().float().cpu()}
    save_file(tensors, str(path), metadata={"users": json.dumps(emb.users), "k": str(emb.k)})
    return path


def load_user_embeddings(model, directory: str | Path) -> UserPromptEmbedding | None:
    """Attach the user embeddings saved in ``directory`` to ``model`` (loaded from there); None when it has none."""
    from safetensors import safe_open

    path = Path(directory) / FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        emb = attach_user_embeddings(model, json.loads(meta["users"]), int(meta["k"]))
        with torch.no_grad():
            emb.generic.copy_(f.get_tensor("generic"))
            emb.offsets.copy_(f.get_tensor("offsets"))
    return emb


@contextlib.contextmanager
def saved_plain(model, directory: str | Path) -> Iterator[None]:
    """Inside: the model has its own input embedding back (what ``save_pretrained`` should write); after: the user
    embeddings are back in place and written to ``directory``. Nothing happens for a model without them."""
    emb = user_embedding(model)
    if emb is None:
        yield
        return
    model.set_input_embeddings(emb.base)
    try:
        yield
    finally:
        model.set_input_embeddings(emb)
    save_user_embeddings(emb, directory)
