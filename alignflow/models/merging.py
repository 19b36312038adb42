"""Weight interpolation of same-architecture models (model merging): pure functions on state dicts.

SALSA (Chegini et al. 2024) starts RL from, and anchors the KL to, the average of several fine-tuned models;
Balanced Actor Initialization mixes an SFT model with a distilled one. Both are the same operation::

    theta_merged = sum_i w_i * theta_i,    w_i >= 0,  sum_i w_i = 1

applied to every floating-point tensor of the state dicts. Non-floating tensors (integer buffers such as
position ids) cannot be interpolated: they must be equal in every model and are copied. ``alignflow
merge_models`` (:mod:`alignflow.trainers.merge_models`) applies it to model directories; docs/merging.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Tensor = torch.Tensor
WEIGHT_TOLERANCE = 1e-6


def check_merge_weights(weights: Sequence[float], n: int) -> list[float]:
    """``weights`` for ``n`` models as floats; empty means equal weights 1/n (SALSA's average).

    Raises ValueError unless there is one finite weight >= 0 per model and they sum to 1 (within 1e-6).
    """
    if n < 1:
        raise ValueError("model merging needs at least one model")
    if not weights:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights given for {n} models; give one weight per model (or none: equal)")
    out = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in out):
        raise ValueError(f"merge weights must be finite and >= 0 (an interpolation), got {out}")
    if abs(sum(out) - 1.0) > WEIGHT_TOLERANCE:
        raise ValueError(f"merge weights must sum to 1 (an interpolation), got {out} (sum {sum(out):.6g})")
    return out


def _check_same_layout(states: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> None:
    """Every state dict has the first one's keys, shapes and dtypes; the first difference is an error."""
    first = states[0]
    for state, name in zip(states[1:], names[1:], strict=True):
        missing, extra = sorted(set(first) - set(state)), sorted(set(state) - set(first))
        if missing or extra:
            raise ValueError(
                f"{name} does not have the architecture of {names[0]}: tensors missing {missing[:5]}, extra {extra[:5]}"
            )
        for key, t in first.items():
            if state[key].shape != t.shape or state[key].dtype != t.dtype:
                raise ValueError(
                    f"{name}: tensor {key!r} is {tuple(state[key].shape)} {state[key].dtype}, "
                    f"{names[0]} has {tuple(t.shape)} {t.dtype}; only same-architecture models merge"
                )


@torch.no_grad()
def interpolate_state_dicts(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float] = (), names: Sequence[str] = ()
) -> dict[str, Tensor]:
    """``sum_i w_i * states[i][key]`` for every floating tensor (accumulated in float32, returned in the
    tensors' own dtype); non-floating tensors must be equal in every state dict and are copied from the first.

    states: k state dicts of one architecture. weights: k weights >= 0 summing to 1, or empty (1/k each).
    names: how errors name the models (default ``model 0 .. model k-1``). Returns a new dict of new tensors.
    """
    names = list(names) or [f"model {i}" for i in range(len(states))]
    w = check_merge_weights(weights, len(states))
    _check_same_layout(states, names)
    out = {}
    for key, t in states[0].items():
        if not t.is_floating_point():
            for state, name in zip(states[1:], names[1:], strict=True):
                if not torch.equal(state[key], t):
                    raise ValueError(
                        f"{name}: the non-float tensor {key!r} differs from {names[0]}'s; it cannot be interpolated"
                    )
            out[key] = t.clone()
            continue
        acc = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        for state, wi in zip(states, w, strict=True):
            acc.add_(state[key].to(device=t.device, dtype=torch.float32), alpha=wi)
        out[key] = acc.to(t.dtype)
    return out
