"""Summed response log-probs of several sequences in one forward (padding-free when the model supports it), the
model helpers of preference training (dropout off, a model's identity for cache keys), and reward-model scores
of many sequences under a token budget (:func:`score`, used by the reward trainer, reward sources and eval).

The preference trainers (``alignflow po``, ``online_po``) and the pairwise preference model build on
:func:`sequence_logps`; the log-softmax and gather are the ones of :mod:`alignflow.models.logprobs`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignflow.data.collate import pad_right, token_budget_groups
from alignflow.models.backbone import hidden_states
from alignflow.models.heads import sequence_scores
from alignflow.models.logprobs import head_stats  # the one log-softmax + gather (no copy of maths)
from alignflow.models.varlen import flat_hidden_states, supports_varlen


def head_logps(model, hs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for hidden states (M, H) -> (M,) float32; the LM head runs on these M positions only
    (:func:`alignflow.models.logprobs.head_stats`)."""
    return head_stats(model, hs, targets)[0]


def sequence_logps(
    model, seqs: list[tuple[list[int], list[int]]], device, flat: bool = True, with_tokens: bool = False
) -> dict:
    """Summed response log-probs of n sequences in ONE forward.

    ``seqs``: (input_ids, loss_mask) lists; ``loss_mask`` is 1 on response tokens. ``flat``: the sequences laid end to
    end in one padding-free row when the model supports it, else right-padded rows run without a mask (causal
    attention never lets a real token see the padding after it). Returns ``logps`` (n,) float32 Σ_t lp[t] over each
    response (with grad), ``lengths`` (n,) response token counts and, ``with_tokens``, ``token_logps`` (n, Tr) --
    column j is the j-th response token -- with ``token_mask`` (n, Tr).
    """
    n, lens = len(seqs), [len(ids) for ids, _ in seqs]
    if flat and supports_varlen(model):
        ids = torch.tensor([t for s, _ in seqs for t in s], dtype=torch.long, device=device)[None]  # (1, N)
        mask = torch.tensor([m for _, ms in seqs for m in ms], dtype=torch.bool, device=device)[None]  # (1, N)
        start = torch.zeros_like(mask)
        start[0, torch.tensor([0] + lens[:-1]).cumsum(0).to(device)] = True  # first token of each: predicts nothing
        # built on the host: repeat_interleave with device repeats would wait for the device
        row_of = torch.repeat_interleave(torch.arange(n), torch.tensor(lens)).to(device)[None]
        h = flat_hidden_states(model, ids, lens)  # (1, N, H)
        where = mask[:, 1:] & ~start[:, 1:]  # (1, N-1): position t predicts token t+1
    else:
        ids = pad_right([s for s, _ in seqs], 0).to(device)  # (n, T)
        mask = pad_right([ms for _, ms in seqs], 0).to(device).bool()  # (n, T)
        row_of = torch.arange(n, device=device)[:, None].expand_as(ids)  # (n, T)
        h = hidden_states(model, ids)  # (n, T, H)
        where = mask[:, 1:]  # (n, T-1)
    token_lp = head_logps(model, h[:, :-1][where], ids[:, 1:][where])  # (M,)
    seq = row_of[:, 1:][where]  # (M,) which sequence each response token belongs to
    logps = torch.zeros(n, device=device, dtype=torch.float32).index_add(0, seq, token_lp)  # (n,)
    lengths = torch.bincount(seq, minlength=n)  # (n,)
    out = {"logps": logps, "lengths": lengths}
    if with_tokens:
        first = torch.cumsum(lengths, 0) - lengths  # (n,) index of each sequence's first response token in M
        col = torch.arange(seq.numel(), device=device) - first[seq]  # (M,)
        width = int(lengths.max()) if n else 0
        out["token_logps"] = torch.zeros(n, width, device=device).index_put((seq, col), token_lp)  # (n, Tr)
        out["token_mask"] = torch.zeros(n, width, device=device, dtype=torch.bool).index_put(
            (seq, col), torch.ones_like(col, dtype=torch.bool)
        )  # (n, Tr)
    return out


def disable_dropout(model):
    """Dropout probabilities to 0 (``nn.Dropout`` modules, incl. LoRA's, and attention dropout), as TRL's
    ``disable_dropout``: the policy's log-probs then equal the cached reference's at step 0."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


def model_fingerprint(name_or_path: str, revision: str = "main") -> str:
    """Identity of a model's weights for the cache key: a local directory's weight/config files (name, size,
    modification time), or ``hub:<id>@<revision>``."""
    path = Path(name_or_path)
    if not path.is_dir():
        return f"hub:{name_or_path}@{revision}"
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".pt"))
    return json.dumps(
        [str(path.resolve())] + [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    )


# ----------------------------------------------------------------------------------------------- scores
def forward_scores(model, seqs: list[list[int]], pad_id: int, device, flat: bool = False) -> torch.Tensor:
    """Scores of sequences in one forward: (N, num_labels). ``flat``: one padding-free row (no pad tokens, no
    mask; ``alignflow.models.varlen``) when the model supports it; otherwise right-padded rows."""
    if flat and supports_varlen(model):
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)[None].to(device)  # (1, N)
        return sequence_scores(model, ids, None, seq_lens=[len(s) for s in seqs])
    ids = pad_right(seqs, pad_id).to(device)  # (N, T)
    mask = pad_right([[1] * len(s) for s in seqs], 0).to(device)  # (N, T)
    return sequence_scores(model, ids, mask)


@torch.no_grad()
def score(model, seqs: list[list[int]], pad_id: int, device, budget: int = 8192) -> torch.Tensor:
    """Score many sequences under a token budget; rows come back in input order. (N, num_labels)."""
    was = model.training
    model.eval()
    out = [None] * len(seqs)
    for g in token_budget_groups([len(s) for s in seqs], budget):
        s = forward_scores(model, [seqs[i] for i in g], pad_id, device).float().cpu()
        for j, i in enumerate(g):
            out[i] = s[j]
    model.train(was)
    return torch.stack(out) if out else torch.zeros(0, 1)
