"""Worker groups: where a role runs. The controller calls ``group.method(batch)`` and never knows which kind it has.

``LocalGroup(role)`` runs the role in this process: every public method of the role is exposed unchanged (a thin
pass-through), so ``LocalGroup(actor).update(batch)`` *is* ``actor.update(batch)``. It is the default placement and
the one every CPU test uses.

``RayGroup`` (:mod:`alignflow.distributed.ray_group`) runs the same roles on N Ray actors that form one
``torch.distributed`` process group, each role's model sharded with ``fully_shard`` (:mod:`.shard`); the controller
does not change. Each role method carries a dispatch mode, set with :func:`dispatch`:

* ``"split"`` (the default; ``generate``, ``logprobs``, ``values``, ``score``, ``update``): the group cuts the input
  batch across the ranks balanced by token count, calls the method on each rank with its part and puts the outputs
  back in input order; a method returning a metrics dict reduces it over the group itself (:func:`dp_sum_dict`), so
  any rank's copy is the whole batch's;
* ``"one"`` (``state_dict``, ``save``, ``export``): called on every rank (FSDP gathers collectively), rank 0's
  result is kept;
* ``"all"`` (``load``, setters): called on every rank with the same arguments.

Exact normalisation survives the split: a role that divides a loss by a batch-wide count (the actor's token mean)
takes that count through :func:`dp_sum`, the all-reduced sum over the data-parallel group (the identity here), and
scales its loss by :func:`dp_world_size` because FSDP *averages* gradients over ranks; then the summed gradient
equals the single-process one (``algorithms/core.py`` states the same rule for micro-batches).

Everything that needs the whole batch (advantages, whitening, group statistics, the KL controller) runs in the
controller on gathered batches, so it is the same maths whatever the placement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

DISPATCH_MODES = ("split", "one", "all")


def dispatch(mode: str) -> Callable:
    """Mark a role method with how a multi-worker group calls it (see the module docstring)."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"dispatch mode {mode!r} is not one of {', '.join(DISPATCH_MODES)}")

    def mark(fn: Callable) -> Callable:
        fn.dispatch_mode = mode
        return fn

    return mark


def dispatch_mode(method: Callable) -> str:
    """The mode a method was marked with, ``"split"`` when unmarked."""
    return getattr(method, "dispatch_mode", "split")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def dp_world_size() -> int:
    """Ranks in the data-parallel group (1 in one process)."""
    return dist.get_world_size() if _distributed() else 1


def dp_sum(value: float) -> float:
    """Sum of ``value`` over the data-parallel group (the value itself in one process)."""
    if not _distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def _reduce(values: list[float], op) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def dp_max(value: float) -> float:
    """Maximum of ``value`` over the data-parallel group (the value itself in one process)."""
    return float(value) if not _distributed() else _reduce([float(value)], dist.ReduceOp.MAX)[0]


def dp_sum_dict(values: dict) -> dict:
    """Every entry summed over the data-parallel group in ONE collective (the dict itself in one process). All
    ranks must pass the same keys; they are sorted so the order agrees."""
    if not _distributed() or not values:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    return dict(zip(keys, _reduce([float(values[k]) for k in keys], dist.ReduceOp.SUM), strict=False))


def dp_equal_groups(groups: list[list[int]]) -> list[tuple[list[int], float]]:
    """``(rows, 1.0)`` for each micro-batch group; under data parallelism every rank gets as many micro-batches as
    the busiest (each FSDP unit all-gathers its weights collectively, so the forward counts must agree): the largest
    groups are halved, then *padding* micro-batches ``([0], 0.0)`` -- row 0 again, weight 0 -- make up the rest.
    The caller runs a padding micro-batch (for the collectives) and counts nothing from it. verl balances the same
    way."""
    if dp_world_size() == 1:
        return [(g, 1.0) for g in groups]
    target, groups = int(dp_max(len(groups))), list(groups)
    while len(groups) < target and any(len(g) > 1 for g in groups):
        big = max(range(len(groups)), key=lambda i: len(groups[i]))
        g = groups.pop(big)
        groups[big:big] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return [(g, 1.0) for g in groups] + [([0], 0.0)] * (target - len(groups))


class Done:
    """A finished call (what ``LocalGroup.submit`` returns); ``result()`` gives its value."""

    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value


class LocalGroup:
    """A role in this process. Attribute access goes straight to the role (methods, and ``role.model`` for tests).

    ``world_size`` is 1; ``role`` is the wrapped object. Private names (``_x``) are not exposed, so the controller
    can only use the role's public interface -- the same interface a ``RayGroup`` offers.
    """

    world_size = 1

    def __init__(self, role: Any):
        if role is None:
            raise ValueError("LocalGroup needs a role object")
        self.role = role

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(f"{type(self.role).__name__} role: {name!r} is private to the role")
        return getattr(self.role, name)

    def submit(self, method: str, *args, **kwargs) -> Done:
        """The same interface as ``RayGroup.submit``: here the call runs now and the result waits in a Done."""
        return Done(getattr(self.role, method)(*args, **kwargs))

    def __repr__(self) -> str:
        return f"LocalGroup({type(self.role).__name__})"
