"""SAFE's double critic as a critic role (``critic.double: true``; docs/safe_control.md).

Two :class:`~alignflow.trainers.roles.Critic` objects over two value models loaded from the same weights (the
critic's initialisation, ``critic.name_or_path``) whose value heads are initialised from different seeds. Both
regress the same returns; the value the advantage step reads is their smooth minimum
(:func:`~alignflow.algorithms.safe_control.soft_min`):

    values = −τ · log((exp(−V1/τ) + exp(−V2/τ)) / 2)      per response token, τ = ``critic.soft_min_tau``

so GAE uses a pessimistic baseline where the critics disagree and the plain value where they agree. The role has
the interface of a single critic (``values``, ``update``, ``set_label``, ``save``, ``load``), so the controller
does not know there are two: ``values`` adds ``values`` (the soft minimum) and each critic's own ``values_1`` /
``values_2`` (B, Tr), which each critic's clipped value loss takes as its old values. Metrics: the first critic's
under ``critic/``, the second's under ``critic2/``. Checkpoints: the first critic at the path it is given
(``critic-N``), the second beside it (``critic_b-N``), pruned with the step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignflow.algorithms.safe_control import soft_min
from alignflow.batch import Batch
from alignflow.distributed.groups import dispatch
from alignflow.trainers.roles import Critic


def second_path(path) -> Path:
    """Where the second critic's checkpoint goes: ``.../critic-7`` -> ``.../critic_b-7``."""
    path = Path(path)
    name, sep, step = path.name.rpartition("-")
    return path.with_name(f"{name}_b{sep}{step}" if sep else f"{path.name}_b")


class DoubleCritic:
    """Two critics on the same returns; ``values`` is their soft minimum (module docstring)."""

    def __init__(self, first: Critic, second: Critic, tau: float):
        if tau <= 0:
            raise ValueError(f"DoubleCritic: the soft-min temperature must be > 0, got {tau}")
        self.first, self.second, self.tau = first, second, float(tau)
        self.key = "values"  # what GAE reads; the critics keep their own under first.key / second.key

    @dispatch("all")
    def set_label(self, label: str) -> None:
        self.first.set_label(label)
        self.second.set_label(label)

    @dispatch("split")
    @torch.no_grad()
    def values(self, batch: Batch) -> Batch:
        v1, v2 = self.first.values(batch)[self.first.key], self.second.values(batch)[self.second.key]  # (B, Tr)
        mask = batch["response_mask"].bool()
        v = torch.where(mask, soft_min(v1, v2, self.tau), torch.zeros((), dtype=v1.dtype, device=v1.device))
        return Batch({self.key: v, self.first.key: v1, self.second.key: v2})

    @dispatch("split")
    def update(self, batch: Batch) -> dict:
        """Each critic's own optimiser step on the same mini-batch and returns (its value clip around its own old
        values); the two metric dicts side by side."""
        return self.first.update(batch) | self.second.update(batch)

    @dispatch("one")
    def save(self, path, state: dict | None = None) -> None:
        self.second.save(second_path(path), state)  # first: resume needs the first critic's path to be complete
        self.first.save(path, state)

    @dispatch("all")
    def load(self, path) -> dict:
        self.second.load(second_path(path))
        return self.first.load(path)

    @dispatch("one")
    def state_dict(self) -> dict:
        """Both models' weights, the second's under ``second.``."""
        return self.first.state_dict() | {f"second.{k}": v for k, v in self.second.state_dict().items()}
