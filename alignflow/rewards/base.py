"""The reward protocol and the weighted composition of rewards.

A reward is anything that maps a rollout :class:`~alignflow.batch.Batch` to one float per row::

    reward(batch) -> torch.Tensor  # (B,) float32

The batch a reward sees is the rollout engine's (``docs/rollout.md``) joined with the prompt rows' fields:

* meta ``prompt`` (str), ``response`` (str), and every other field of the prompt row (e.g. ``answer``), one
  entry per row;
* tensors ``input_ids`` / ``attention_mask`` (B, Tp + Tr): the left-padded prompt followed by the
  right-padded response, and the two halves ``prompt_ids`` / ``prompt_mask`` (B, Tp) and ``response_ids`` /
  ``response_mask`` (B, Tr).

Rule rewards read the texts (:mod:`alignflow.rewards.rules`), reward models read the tokens
(:mod:`alignflow.rewards.model`). :class:`CompositeReward` sums several of them with weights and reports each
one's batch mean as ``rollout/reward_<name>_mean``.

**Failures.** A reward may also offer ``with_failures(batch) -> (values (B,), {kind: (B,) 0/1})``: which rows it
scored with a fallback value because the computation failed (kinds: ``errors``, ``timeouts``, ``nonfinite``;
see ``on_error`` in :mod:`alignflow.rewards.rules`). :meth:`CompositeReward.evaluate` adds those flags up over
the components; a reward without the method never reports a failure (it raises instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from alignflow.batch import Batch

FAILURE_KINDS = ("errors", "timeouts", "nonfinite")  # an exception or a non-number, a timeout, NaN / inf


@runtime_checkable
class RewardFn(Protocol):
    """Anything with ``__call__(batch) -> (B,) tensor``. A ``name`` attribute, when present, names its metrics."""

    def __call__(self, batch: Batch) -> torch.Tensor: ...


def reward_name(fn: Callable) -> str:
    """The name a reward's metrics go under: its ``name`` attribute, else its function/class name."""
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


def output_device(batch: Batch) -> torch.device:
    """Where a reward's (B,) result should live: the device of the batch's token ids (CPU without tensors)."""
    for key in ("input_ids", "response_ids"):
        if key in batch.tensors:
            return batch.tensors[key].device
    return torch.device("cpu")


def check_reward(values: torch.Tensor, batch: Batch, name: str) -> torch.Tensor:
    """Validate a reward's output: a (B,) tensor of finite numbers; returns it as float32."""
    if not torch.is_tensor(values):
        raise TypeError(f"reward {name!r} returned {type(values).__name__}, expected a (B,) torch.Tensor")
    if values.shape != (len(batch),):
        raise ValueError(
            f"reward {name!r} returned shape {tuple(values.shape)}, expected ({len(batch)},) "
            "(one value per row of the batch)"
        )
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if bad.numel():
        row = int(bad[0])
        raise ValueError(
            f"reward {name!r} returned a non-finite value {values[row].item()} at row {row} "
            f"({bad.numel()} non-finite rows)"
        )
    return values.float()


class CompositeReward:
    """Weighted sum of rewards: ``R(x, y) = sum_j w_j * r_j(x, y)``.

    components: a sequence of ``(fn, weight)`` or ``(name, fn, weight)``; the name defaults to
    :func:`reward_name` of ``fn`` and must be unique. ``__call__`` returns the (B,) sum; :meth:`score` also
    returns the metrics ``rollout/reward_<name>_mean`` (unweighted batch mean of each component) and
    ``rollout/reward_mean`` (of the weighted sum); :meth:`components` returns every component's (B,) values.
    """

    name = "composite"

    def __init__(self, components: Sequence[tuple]):
        if not components:
            raise ValueError("CompositeReward needs at least one (fn, weight) component")
        self.parts: list[tuple[str, Callable, float]] = []
        for i, comp in enumerate(components):
            if not isinstance(comp, (tuple, list)) or len(comp) not in (2, 3):
                raise ValueError(
                    f"CompositeReward component {i}: expected (fn, weight) or (name, fn, weight), got {comp!r:.100}"
                )
            name, fn, weight = comp if len(comp) == 3 else (reward_name(comp[0]), comp[0], comp[1])
            if not callable(fn):
                raise TypeError(f"CompositeReward component {i} ({name!r}): {fn!r:.80} is not callable")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight != weight:
                raise ValueError(f"CompositeReward component {i} ({name!r}): weight must be a number, got {weight!r}")
            if any(name == p[0] for p in self.parts):
                raise ValueError(
                    f"CompositeReward: two components are named {name!r}; name them with (name, fn, weight)"
                )
            self.parts.append((str(name), fn, float(weight)))

    def evaluate(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each component's validated (B,) float32 values by name, and per failure kind the (B,) number of
        components that failed on each row (see the module docstring)."""
        device = output_device(batch)
        values: dict[str, torch.Tensor] = {}
        failures = {k: torch.zeros(len(batch), device=device) for k in FAILURE_KINDS}
        for name, fn, _ in self.parts:
            if hasattr(fn, "with_failures"):
                out, flags = fn.with_failures(batch)
                for k, v in flags.items():
                    failures[k] = failures[k] + v.to(device).float()
            else:
                out = fn(batch)
            values[name] = check_reward(out, batch, name).to(device)
        return values, failures

    def state_dict(self) -> dict:
        """The state of every component that keeps one across calls (``state_dict``), by name: what a resumed
        RL run restores (e.g. the QDHF archive of ``reward.diversity``)."""
        return {name: fn.state_dict() for name, fn, _ in self.parts if hasattr(fn, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for name, fn, _ in self.parts:
            if name in state and hasattr(fn, "load_state_dict"):
                fn.load_state_dict(state[name])

    def components(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each component's validated (B,) float32 values, by name."""
        return self.evaluate(batch)[0]

    def score(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """(weighted sum (B,), metrics); the metrics include the batch's failure counts ``reward/<kind>``."""
        values, failures = self.evaluate(batch)
        total = torch.zeros(len(batch), device=output_device(batch))
        metrics = {}
        for name, _, weight in self.parts:
            total = total + weight * values[name]
            metrics[f"rollout/reward_{name}_mean"] = values[name].mean().item() if len(batch) else 0.0
        metrics["rollout/reward_mean"] = total.mean().item() if len(batch) else 0.0
        metrics.update({f"reward/{k}": float(v.sum()) for k, v in failures.items()})
        return total, metrics

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.score(batch)[0]
