"""Sharding is a transform: :func:`shard` applies torch's FSDP2 (``fully_shard``) to a model, and the model and
loss code run unchanged on the result (docs/design.md).

What ``shard`` does: every decoder layer becomes one FSDP unit (its parameters all-gathered just before its
forward and freed after), then the root module becomes the unit that owns the rest (embeddings, final norm, LM
head, a value or score head; tied embeddings stay together there). Gradients are reduce-scattered in the
backward; FSDP2 *averages* them over ranks, which is why the roles multiply their loss by
:func:`~alignflow.distributed.groups.dp_world_size` after dividing by the all-reduced token count -- the summed
gradient then equals the single-process one.

Two helpers cover the places where alignflow does not call ``model(...)`` itself:

* :func:`through_root` -- the padding-free forwards (:mod:`alignflow.models.varlen`) call the backbone and the
  LM head directly. FSDP2's hooks live on each unit's ``forward`` call, so the root unit would never gather its
  parameters. ``through_root(model, fn)`` runs ``fn`` *as* the root module's forward (an instance attribute
  shadowing the class's ``forward`` for one call), so the root's hooks gather, and its backward reduce-scatters.
* :func:`gathered` -- generation reads the whole model many times (one decode step per token, with no
  collective allowed in between since ranks decode different numbers of steps). ``with gathered(model):``
  all-gathers every unit once, keeps the parameters unsharded during generation, and frees them at the end: the
  rollout engine reads the actor's current weights, with no second copy kept between steps.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from alignflow.config import ConfigError
from alignflow.models.backbone import get_backbone, unwrap

MIXED_PRECISION = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_inside = threading.local()


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` (or the module under its peft wrapper) is an FSDP2 unit."""
    if not fsdp_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or isinstance(unwrap(model), FSDPModule)


def _layers(model: nn.Module) -> list[nn.Module]:
    try:
        layers = getattr(get_backbone(model), "layers", None)
    except TypeError:
        layers = None
    if layers is None:
        raise ConfigError(
            f"shard: cannot find the decoder layers of {type(unwrap(model)).__name__} "
            "(expected backbone.layers); FSDP needs one unit per layer"
        )
    return list(layers)


def shard(
    model: nn.Module,
    mesh: Any = None,
    mixed_precision: str = "none",
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply FSDP2 to ``model`` in place (one unit per decoder layer, then the root); returns it.

    mesh: a 1-D ``DeviceMesh`` over the data-parallel ranks (default: all ranks of the default process group on
    this device type). mixed_precision: ``none`` | ``bf16`` | ``fp16`` -- the dtype parameters are gathered and
    computed in; gradients are reduced in fp32 and the sharded master weights stay fp32. cpu_offload: keep the
    sharded parameters, gradients and optimiser state in CPU memory (FSDP2's ``CPUOffloadPolicy``).
    reshard_after_forward: free each layer's gathered parameters after its forward (ZeRO-3); False keeps them
    until the backward (ZeRO-2-like: more memory, one all-gather fewer).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"shard: mixed_precision {mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
    if not dist.is_initialized():
        raise RuntimeError("shard() needs an initialised torch.distributed process group (RayGroup creates one)")
    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    if cpu_offload and device_type != "cuda":  # FSDP2 pins the offloaded shards: it needs an accelerator
        raise ConfigError(
            "resources.cpu_offload moves a GPU model's shards to CPU memory; this model is on the CPU "
            "already (no GPU workers): set resources.cpu_offload=false"
        )
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    dtype = MIXED_PRECISION[mixed_precision]
    kw = dict(
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None),
        offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    )
    for layer in _layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def through_root(model: nn.Module, fn: Callable[[], Any]) -> Any:
    """``fn()``, run inside the root FSDP unit's forward when ``model`` is sharded (see the module docstring);
    just ``fn()`` otherwise, or when already inside such a call."""
    if getattr(_inside, "active", False) or not is_sharded(model):
        return fn()
    root = model if _is_fsdp(model) else unwrap(model)
    # shadows the class's forward for this one call; views are copied because FSDP hooks the output's backward
    # and an in-place op on a view would drop that hook
    root.forward = lambda *_, **__: _no_views(fn())
    _inside.active = True
    try:
        return root()
    finally:
        _inside.active = False
        del root.forward


def _no_views(out: Any) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t, out)


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _units(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every FSDP unit of ``model`` holds its full parameters (all-gathered once; collective,
    so every rank must enter); they are freed again on exit. A no-op for a model that is not sharded."""
    if not is_sharded(model):
        yield model
        return
    units = _units(model)
    saved = [_reshard_state(u) for u in units]
    for u in units:
        u.unshard()
        u.set_reshard_after_forward(False, recurse=False)  # a forward inside the block must not free them
    try:
        yield model
    finally:
        for u, state in zip(units, saved, strict=False):
            u.reshard()
            _restore_reshard_state(u, state)


# set_reshard_after_forward has no getter; these read and restore what it sets (FSDP2 internals: torch 2.6-2.13).
def _reshard_state(unit) -> tuple:
    st = unit._get_fsdp_state()
    return st._auto_reshard_after_forward, [g.post_forward_mesh_info for g in st._fsdp_param_groups]


def _restore_reshard_state(unit, saved: tuple) -> None:
    st = unit._get_fsdp_state()
    st._auto_reshard_after_forward = saved[0]
    for g, info in zip(st._fsdp_param_groups, saved[1], strict=False):
        g.post_forward_mesh_info = info


def full_state_dict(model: nn.Module, cpu: bool = True) -> dict[str, torch.Tensor] | None:
    """The consolidated (unsharded) state dict of a sharded model (collective: every rank must call it); with
    ``cpu=True`` torch gathers it to rank 0's CPU memory only and the other ranks get ``{}``. For a model that is
    not sharded, its own state dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu))
