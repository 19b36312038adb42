"""QDHF inside RL (docs/qdhf.md): a diversity bonus from the descriptor an ``alignflow qdhf`` run learned.

The run writes ``descriptor.json``: the words its bag-of-words features count, the projection W (K, V), the
archive's range ``lo``/``hi`` (K,) and its ``bins``. A response's descriptor is ``z = W f``, with ``f`` the word
counts of the review it forms with its prompt (the prompt's ``prompt_prefix`` marker removed).

:class:`DiversityReward` (``reward.diversity``) gives each sample one of two bonuses:

* ``group``: its novelty against the other samples of its group (the ``rollout.n`` samples of one prompt): the
  mean distance between its descriptor and theirs, in archive widths (each dimension divided by hi - lo);
* ``archive``: 1 when its MAP-Elites cell was empty in an occupancy archive kept across the run's steps, else 0.

Besides the (B,) bonus it leaves per-row fields named ``metric/<name>`` in ``last_fields``; the RL trainer logs
their batch mean as ``rollout/<name>``: ``diversity/group_cells`` (cells the row's group occupies),
``diversity/group_spread`` (mean pairwise distance of the group's descriptors, archive widths),
``diversity/group_distinct_2`` (distinct bigrams of the group's responses) and ``diversity/batch_cells`` (cells
the whole batch occupies).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignflow.algorithms.qdhf import archive_novelty, cell_index, coverage, distinct_n, group_novelty, spread
from alignflow.batch import ROW_METRIC, Batch
from alignflow.config import ConfigError
from alignflow.rewards.base import output_device

DESCRIPTOR_FILE = "descriptor.json"
MODES = ("group", "archive")


class Descriptor:
    """A learned linear descriptor over word counts (module docstring), read from ``descriptor.json``."""

    def __init__(
        self, words: list[str], weight: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int, prefix: str = ""
    ):
        self.index = {w: i for i, w in enumerate(words)}
        self.weight, self.lo, self.hi, self.bins, self.prefix = weight, lo, hi, bins, prefix.split()

    @classmethod
    def load(cls, path: str | Path, key: str = "reward.diversity.descriptor") -> Descriptor:
        """From a qdhf run directory (or the file itself); ConfigError naming ``key``, the file and the field."""
        path = Path(path)
        file = path / DESCRIPTOR_FILE if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{key}: {file} not found; give a finished alignflow qdhf run directory or builtin:qdhf")
        d = json.loads(file.read_text())
        for name in ("words", "weight", "lo", "hi", "bins"):
            if name not in d:
                raise ConfigError(f"{key}: {file} has no field {name!r} (written by alignflow qdhf)")
        weight = torch.tensor(d["weight"], dtype=torch.float32)
        if weight.ndim != 2 or weight.shape[1] != len(d["words"]) or len(d["lo"]) != weight.shape[0]:
            raise ConfigError(f"{key}: {file}: 'weight' must be (K, len(words)) and 'lo'/'hi' of length K")
        lo, hi = torch.tensor(d["lo"]), torch.tensor(d["hi"])
        return cls(list(d["words"]), weight, lo, hi, int(d["bins"]), str(d.get("prompt_prefix", "")))

    def features(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """(N, V) word counts of each review: the prompt without its marker, then the response."""
        out = torch.zeros(len(prompts), len(self.index))
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            head = str(p).split()
            if head[: len(self.prefix)] == self.prefix:
                head = head[len(self.prefix) :]
            for tok in head + str(r).split():
                if tok in self.index:
                    out[i, self.index[tok]] += 1
        return out

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """(N, K) descriptors."""
        return self.features(prompts, responses) @ self.weight.T

    @property
    def scale(self) -> torch.Tensor:
        return (self.hi - self.lo).clamp_min(1e-12)


def group_rows(batch: Batch) -> list[list[int]]:
    """Row indices of each group (meta ``group``, else equal prompts), in order of first appearance."""
    keys = batch["group"] if "group" in batch.meta else batch["prompt"]
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


class DiversityReward:
    """The ``reward.diversity`` source (module docstring). ``mode``: group or archive."""

    name = "diversity"

    def __init__(self, descriptor: Descriptor, mode: str = "group"):
        if mode not in MODES:
            raise ConfigError(f"reward.diversity.mode: {mode!r}; valid: {', '.join(MODES)}")
        self.descriptor, self.mode = descriptor, mode
        self.seen: set[int] = set()  # archive mode: cells occupied so far in the run
        self.last_fields: dict = {}

    def __call__(self, batch: Batch) -> torch.Tensor:
        prompts, responses = list(batch["prompt"]), list(batch["response"])
        d = self.descriptor
        desc = d(prompts, responses)  # (B, K)
        groups = group_rows(batch)
        if self.mode == "group":
            values = group_novelty(desc, groups, d.scale)
        else:
            values = archive_novelty(cell_index(desc, d.lo, d.hi, d.bins), self.seen)
        self.last_fields = self.measures(desc, groups, responses)
        return values.float().to(output_device(batch))

    def state_dict(self) -> dict:
        """What a resumed run needs (archive mode: the occupied cells), saved with the RL checkpoint."""
        return {"seen": sorted(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = {int(c) for c in state.get("seen", [])}

    def measures(self, desc: torch.Tensor, groups: list[list[int]], responses: list[str]) -> dict:
        """Per-row ``metric/diversity/*`` fields: each row carries its group's (or the batch's) value."""
        d, n = self.descriptor, desc.shape[0]
        cols = {k: torch.zeros(n) for k in ("group_cells", "group_spread", "group_distinct_2")}
        for rows in groups:
            idx = torch.tensor(rows)
            cols["group_cells"][idx] = float(coverage(desc[idx], d.lo, d.hi, d.bins))
            cols["group_spread"][idx] = spread(desc[idx] / d.scale)
            cols["group_distinct_2"][idx] = distinct_n([responses[i] for i in rows], 2)
        cols["batch_cells"] = torch.full((n,), float(coverage(desc, d.lo, d.hi, d.bins))) if n else torch.zeros(0)
        return {f"{ROW_METRIC}diversity/{k}": v for k, v in cols.items()}
