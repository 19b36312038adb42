"""The torch device a config names (``train.device``, ``device``), checked against this machine."""

from __future__ import annotations

import torch

from alignflow.config import ConfigError


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``name`` (the config value of ``key``) as a torch device; a string torch does not know, or a CUDA device
    this machine does not have, is a ConfigError naming the key."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}={name!r} is not a device; use auto, cpu, cuda, cuda:<index> or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"{key}={name} but CUDA is not available here (torch {torch.__version__}, no "
                f"visible GPU); use {key}=cpu or auto"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{key}={name} but this machine has {count} CUDA device(s) (0..{count - 1})")
    return device
