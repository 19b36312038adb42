"""Checkpoint I/O: atomic directories of safetensors + JSON, no pickle.

Layout of ``<output_dir>/checkpoints/step-<N>/`` for a model in one process (or replicated)::

    model.safetensors      model weights (state_dict; trainable adapters only under LoRA)
    optimizer.safetensors  optimiser tensors, flattened as "<param index>.<name>"
    optimizer.json         optimiser param groups and the non-tensor state
    rng.safetensors        torch (and CUDA) RNG states
    trainer_state.json     step, data position, scheduler state, python/numpy RNG, anything the trainer adds

A checkpoint directory is written to ``step-<N>.tmp-<pid>``, flushed to disk (every file and the directory) and
renamed into place only when complete, so a crash never leaves a half-written checkpoint that resume would pick
up; the leftovers of a killed writer are removed when the next run starts (``alignflow.trainers.run_dir``).

**Sharded layout** (the model is FSDP2-sharded, :func:`alignflow.distributed.shard.is_sharded`). ``save_checkpoint``
and ``load_checkpoint`` are then *collective*: every rank of the process group calls them. Each rank writes its own
shards with ``torch.distributed.checkpoint`` (DCP)::

    sharded/shard-0000<r>-model-00001-of-00001.safetensors
                           rank r's pieces of the model weights and optimiser tensors (keys ``model.<fqn>``,
                           ``optim.state.<fqn>.<name>``, ``extra.<name>.<fqn>``), each with its offset in the
                           full tensor in the file's metadata
    nontensor.json         the non-tensor leaves of the same state (optimiser hyper-parameters per parameter)
    rng/rank-<r>.safetensors   each rank's torch (and CUDA) RNG state
    trainer_state.json     as above, written by rank 0 (python/numpy RNG: rank 0's)

All ranks write into ``step-<N>.tmp`` (a name every rank derives alone, so no rank needs another's pid); the ranks
agree that every part succeeded (one all-reduce), rank 0 renames the directory into place, and a barrier ends the
call. A failure on any rank removes the temporary directory on rank 0 and raises on every rank, so the previous
checkpoint stays the latest. Multi-node: ``output_dir`` must be on a filesystem every node sees (NFS, Lustre, a
mounted bucket) -- rank 0 renames a directory the other nodes wrote into, and every rank reads all shards on load.

DCP stores each shard with the offset of the piece it holds, so a checkpoint loads on any number of ranks (it
reshards: saved on 2 ranks, loaded on 1 or 3), and also into a model that is not sharded (one process, with or
without a process group): the layout is chosen by what is on disk, not by the model. The other way round, a
checkpoint saved in one process (the first layout) loads into a sharded model too: every rank reads the full
tensors and keeps its shard (the optimiser's parameters are matched by position, as ``Optimizer.load_state_dict``
does, so the optimiser must be built the same way).

Departure from DCP's default: its ``FileSystemWriter`` stores a pickled ``.metadata`` file (and ``torch.save``
blobs), which breaks the no-pickle rule (docs/design.md, reliability); the safetensors storage writer of DCP
(``HuggingFaceStorageWriter(save_distributed=True)``) keeps the offsets in each file's safetensors header instead,
and the few non-tensor values go to JSON. Torch RNG: each rank's state is kept; on a rank that has no saved state
(more ranks than at save) it is derived from rank 0's and the rank, so ranks never share a sampling stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignflow.distributed.shard import is_sharded
from alignflow.models.backbone import unwrap


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``final`` only when the block finishes without error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        io = _os_error(e, final)
        if io is not None:
            raise io from e
        raise
    _replace_dir(tmp, final)


def _os_error(e: BaseException, path: Path) -> OSError | None:
    """safetensors reports a failed write (a full disk) as ``SafetensorError('... (os error 28) ...')``: the same
    as an OSError with that errno, so that callers can tell a disk problem from a bug."""
    import re

    m = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return OSError(int(m.group(1)), os.strerror(int(m.group(1))), str(path)) if m else None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Make ``tmp`` (flushed to disk first) ``final``. An existing ``final`` is swapped with ``tmp`` in one atomic
    rename where the OS can (Linux ``renameat2``), so ``final`` is never missing; elsewhere it is moved aside to
    ``final.old-<pid>`` first (a kill between the two renames leaves that, which the next run renames back).
    The replaced directory is deleted after."""
    _fsync_tree(tmp)
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old one
    else:
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, then the directories, so a rename never publishes unwritten data."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights worth saving: everything, or only the trainable (adapter) ones when most are frozen."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    state = model.state_dict()
    if len(trainable) < len(params):
        state = {k: v for k, v in state.items() if k in trainable}
    # safetensors refuses shared storage (tied embeddings): store contiguous clones.
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pid}.{name}"] = val.detach().contiguous()
            else:
                scalars[f"{pid}.{name}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, val in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    state: dict | None = None,
    extra_models: dict | None = None,
) -> Path:
    """Write a resumable checkpoint atomically; ``extra_models`` saves more modules (e.g. a gate) by name.

    Collective (every rank calls it) when ``model`` is sharded: the sharded layout of the module docstring."""
    path = Path(path)
    if _sharded(model):
        return _save_sharded(path, model, optimizer, scheduler, state, extra_models)
    with atomic_dir(path) as tmp:
        save_file(_trainable_state(model), str(tmp / "model.safetensors"))
        for name, m in (extra_models or {}).items():
            save_file(_trainable_state(m), str(tmp / f"{name}.safetensors"))
        if optimizer is not None:
            tensors, meta = _optimizer_to_files(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta))
        save_file(_torch_rng(), str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(_trainer_state_json(scheduler, state))
    return path


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra_models: dict | None = None,
) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the trainer state dict.

    Either layout loads into a sharded or an unsharded model (collective when the model is sharded or the
    checkpoint is)."""
    path = Path(path)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete alignflow checkpoint (no trainer_state.json)")
    if (path / "sharded").is_dir():
        _load_sharded(path, model, optimizer, extra_models)
        _restore_torch_rng({r: load_file(str(f)) for r, f in _rank_files(path / "rng")})
    elif _sharded(model):
        _load_full_into_sharded(path, model, optimizer, extra_models)
        _restore_torch_rng({0: load_file(str(path / "rng.safetensors"))})
    else:
        _load_full(path, model, optimizer, extra_models)
        _restore_torch_rng({0: load_file(str(path / "rng.safetensors"))})
    return _restore_trainer_state(path, scheduler)


def _load_full(path: Path, model: torch.nn.Module, optimizer, extra_models) -> None:
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise ValueError(f"{path}/model.safetensors has weights the model does not: {unexpected[:5]}")
    for name, m in (extra_models or {}).items():
        m.load_state_dict(load_file(str(path / f"{name}.safetensors")), strict=False)
    if optimizer is not None and (path / "optimizer.safetensors").exists():
        meta = json.loads((path / "optimizer.json").read_text())
        _optimizer_from_files(optimizer, load_file(str(path / "optimizer.safetensors")), meta)


def _torch_rng() -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return rng


def _restore_torch_rng(saved: dict[int, dict[str, torch.Tensor]]) -> None:
    """This rank's saved torch/CUDA RNG state; a rank with none (more ranks than at save) gets a state derived
    from rank 0's and its rank, so no two ranks draw the same stream (rollout seeds come from the global RNG)."""
    rank = _rank()
    rng = saved.get(rank)
    if rng is None:
        gen = torch.Generator()
        gen.set_state(saved[0]["torch"])
        seed = int(torch.randint(0, 2**62, (rank + 1,), generator=gen)[rank])
        torch.manual_seed(seed)  # seeds CUDA too
        return
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def _trainer_state_json(scheduler: Any, state: dict | None) -> str:
    np_state = np.random.get_state()
    full = dict(state or {})
    full["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    full["python_rng"] = repr(random.getstate())
    full["numpy_rng"] = [np_state[0], np_state[1].tolist(), *np_state[2:]]
    return json.dumps(full, indent=1)


def _restore_trainer_state(path: Path, scheduler: Any) -> dict:
    import ast

    state = json.loads((path / "trainer_state.json").read_text())
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    random.setstate(ast.literal_eval(state["python_rng"]))
    ns = state["numpy_rng"]
    np.random.set_state((ns[0], np.array(ns[1], dtype=np.uint32), *ns[2:]))
    return state


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``<output_dir>/checkpoints``, or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [
        p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit() and (p / "trainer_state.json").exists()
    ]
    return max(done, key=lambda p: int(p.name[5:])) if done else None


# ----------------------------------------------------------------------------------------------- sharded layout
def _sharded(model: torch.nn.Module) -> bool:

    return is_sharded(model)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _agree(error: BaseException | None, what: str, cleanup: Path | None = None) -> None:
    """A barrier that fails on every rank when ``error`` happened on any (one all-reduce of a flag per rank).

    On failure rank 0 first removes ``cleanup`` (the half-written directory); the failing rank re-raises its own
    error, the others raise one naming the failed ranks."""
    import torch.distributed as dist

    failed = [0] if error is not None else []
    if dist.is_available() and dist.is_initialized():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
        flags[dist.get_rank()] = int(error is not None)
        dist.all_reduce(flags)
        failed = flags.nonzero().flatten().tolist()
    if not failed:
        return
    if cleanup is not None and _rank() == 0:
        shutil.rmtree(cleanup, ignore_errors=True)
    if error is not None:
        raise error
    raise RuntimeError(f"{what} failed on rank(s) {failed} (their own error says why)")


_DSD_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")  # names DCP leaves out


def _dsd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # ignore_frozen_params: only the trainable weights under LoRA, as the one-process layout does.
    return StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True, **kw)


def _flat_state(model: torch.nn.Module, optimizer, extra_models: dict | None) -> dict[str, Any]:
    """The model's, optimiser's and extra models' state as one flat dict: ``model.<fqn>``,
    ``optim.state.<fqn>.<name>`` / ``optim.param_groups.<fqn>.<key>``, ``extra.<name>.<fqn>``. Sharded tensors are
    DTensors holding this rank's piece. A fresh optimiser gets its state initialised (a zero-lr step with zero
    gradients, done by torch) so that there is a place to load into."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    flat = _model_state(model, "model.")
    if optimizer is not None:
        flat |= {f"optim.{k}": v for k, v in get_optimizer_state_dict(model, optimizer, options=_dsd_options()).items()}
    for name, m in (extra_models or {}).items():
        flat |= _model_state(m, f"extra.{name}.")
    return flat


def _model_state(m: torch.nn.Module, prefix: str) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {prefix + k: v for k, v in get_model_state_dict(m, options=_dsd_options()).items()}
    for p, names in _named_params(m, prefix):
        if not p.requires_grad:  # ignore_frozen_params leaves the second name of a tied frozen weight in
            for n in names:
                state.pop(n, None)
    return state


def _named_params(m: torch.nn.Module, prefix: str) -> list[tuple[torch.nn.Parameter, list[str]]]:
    """Each parameter with all its names (more than one when tied), as DCP spells them."""
    groups: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    for name, p in m.named_parameters(remove_duplicate=False):
        for w in _DSD_WRAPPERS:
            name = name.replace(w, "")
        groups.setdefault(id(p), (p, []))[1].append(prefix + name)
    return list(groups.values())


def _aliases(model: torch.nn.Module, extra_models: dict | None, keys) -> dict[str, str]:
    """``{alias key: source key}`` for tied parameters (one Parameter under several names: tied input and output
    embeddings). Both names are in the state dict, sharing storage, which safetensors refuses; only the source is
    stored. Decided from the module structure, so every rank agrees."""
    out: dict[str, str] = {}
    for prefix, m in [("model.", model)] + [(f"extra.{n}.", m) for n, m in (extra_models or {}).items()]:
        for _, names in _named_params(m, prefix):
            names = [n for n in names if n in keys]
            out |= {n: names[0] for n in names[1:]}
    return out


def _hf_storage() -> tuple[type, type]:
    """DCP's safetensors writer and reader; the writer must support one file per rank (``save_distributed``)."""
    import inspect

    try:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    except ImportError:
        HuggingFaceStorageWriter = None
    if (
        HuggingFaceStorageWriter is None
        or "save_distributed" not in inspect.signature(HuggingFaceStorageWriter.__init__).parameters
    ):
        raise RuntimeError(
            f"sharded checkpoints need torch.distributed.checkpoint.HuggingFaceStorageWriter with "
            f"save_distributed (a recent torch; tested with 2.13); this is torch {torch.__version__}"
        )
    return HuggingFaceStorageWriter, HuggingFaceStorageReader


def _save_sharded(path: Path, model, optimizer, scheduler, state: dict | None, extra_models) -> Path:
    """Every rank writes its shards into ``step-N.tmp``; all agree; rank 0 renames (module docstring)."""
    import torch.distributed.checkpoint as dcp

    writer_cls, _ = _hf_storage()
    rank, tmp, error = _rank(), path.with_name(f"{path.name}.tmp"), None
    what = f"saving the sharded checkpoint {path}"
    try:
        if rank == 0:  # a crashed earlier attempt may have left one
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "sharded").mkdir(parents=True)
            (tmp / "rng").mkdir()
        flat = _flat_state(model, optimizer, extra_models)
        skip = _aliases(model, extra_models, flat)
        tensors = {k: v for k, v in flat.items() if torch.is_tensor(v) and k not in skip}
        plain = {k: v for k, v in flat.items() if not torch.is_tensor(v)}
    except BaseException as e:  # noqa: BLE001 -- every rank must reach _agree, or the others hang
        error = e
    _agree(error, what, cleanup=tmp)  # also: rank 0 made the directory before anyone writes into it
    try:
        # DCP is collective and raises on every rank when one fails; each rank's file holds its pieces.
        dcp.save(tensors, storage_writer=writer_cls(str(tmp / "sharded"), save_distributed=True))
        save_file(_torch_rng(), str(tmp / "rng" / f"rank-{rank}.safetensors"))
        if rank == 0:
            (tmp / "nontensor.json").write_text(json.dumps(plain, indent=1))
            (tmp / "trainer_state.json").write_text(_trainer_state_json(scheduler, state))
    except BaseException as e:  # noqa: BLE001
        error = e
    _agree(error, what, cleanup=tmp)
    try:
        if rank == 0:
            _replace_dir(tmp, path)
    except BaseException as e:  # noqa: BLE001
        error = e
    _agree(error, what, cleanup=tmp)  # the barrier after which every rank sees the complete checkpoint
    return path


def _rank_files(folder: Path) -> list[tuple[int, Path]]:
    return [(int(f.stem.split("-", 1)[1]), f) for f in folder.glob("rank-*.safetensors")]


def _saved_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            keys |= set(h.keys())
    return keys


def _check_keys(path: Path, wanted: set[str], saved: set[str], requested) -> None:
    """The checkpoint must hold exactly what is asked for (parts not asked for, e.g. the optimiser, are skipped)."""
    missing = sorted(wanted - saved)
    unexpected = sorted(k for k in saved - wanted if requested(k))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the model/optimiser it is loaded into: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )


def _load_sharded(path: Path, model, optimizer, extra_models) -> None:
    """DCP reads every saved piece that overlaps this rank's piece of each tensor (any number of ranks)."""
    import torch.distributed.checkpoint as dcp

    _, reader_cls = _hf_storage()
    saved = _saved_keys(path / "sharded")
    plain = json.loads((path / "nontensor.json").read_text())
    if optimizer is not None and not any(k.startswith("optim.") for k in saved):
        optimizer = None  # saved without one: keep the optimiser as it is, as the one-process layout does
    prefixes = (
        ("model.",)
        + (("optim.",) if optimizer is not None else ())
        + tuple(f"extra.{n}." for n in (extra_models or {}))
    )
    flat = _flat_state(model, optimizer, extra_models)
    skip = _aliases(model, extra_models, flat)
    tensors = {k: v for k, v in flat.items() if torch.is_tensor(v) and k not in skip}
    _check_keys(path, set(tensors), saved, lambda k: k.startswith(prefixes))
    _check_keys(
        path, {k for k, v in flat.items() if not torch.is_tensor(v)}, set(plain), lambda k: k.startswith(prefixes)
    )
    dcp.load(tensors, storage_reader=reader_cls(str(path / "sharded")))
    flat |= tensors
    flat |= {alias: flat[src] for alias, src in skip.items()}
    flat |= {k: tuple(plain[k]) if isinstance(v, tuple) else plain[k] for k, v in flat.items() if k in plain}
    _set_flat_state(flat, model, optimizer, extra_models, full=False)


def _set_flat_state(flat: dict, model, optimizer, extra_models, full: bool) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    def part(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}

    opts = _dsd_options(strict=False, full_state_dict=full)  # keys were checked above (frozen ones are left out)
    set_model_state_dict(model, part("model."), options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, part("optim."), options=opts)
    for name, m in (extra_models or {}).items():
        set_model_state_dict(m, part(f"extra.{name}."), options=opts)


def _load_full_into_sharded(path: Path, model, optimizer, extra_models) -> None:
    """A one-process checkpoint into a sharded model: every rank reads the full tensors, DCP's state-dict API keeps
    this rank's piece. Optimiser entries are keyed by parameter index in the file; they are matched to the
    parameters by position in the optimiser's groups (as ``Optimizer.load_state_dict`` does)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    weights = load_file(str(path / "model.safetensors"))
    model_keys = {k[len("model.") :] for k in _flat_state(model, None, None)}
    unexpected = sorted(set(weights) - model_keys)
    if unexpected:
        raise ValueError(f"{path}/model.safetensors has weights the model does not: {unexpected[:5]}")
    full = _dsd_options(strict=False, full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    for name, m in (extra_models or {}).items():
        set_model_state_dict(m, load_file(str(path / f"{name}.safetensors")), options=full)
    if optimizer is not None and (path / "optimizer.safetensors").exists():
        meta = json.loads((path / "optimizer.json").read_text())
        osd = _optimizer_by_name(path, model, optimizer, load_file(str(path / "optimizer.safetensors")), meta)
        set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def _optimizer_by_name(path: Path, model, optimizer, tensors: dict, meta: dict) -> dict:
    """The one-process optimiser files as a full state dict keyed by parameter name (DCP's format)."""
    names = {id(p): ns[0] for p, ns in _named_params(model, "")}
    if len(meta["param_groups"]) != len(optimizer.param_groups) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(meta["param_groups"], optimizer.param_groups, strict=False)
    ):
        raise ValueError(
            f"{path}/optimizer.json: its parameter groups do not match the optimiser's (sizes "
            f"{[len(g['params']) for g in meta['param_groups']]} vs "
            f"{[len(g['params']) for g in optimizer.param_groups]}); build the optimiser as at save"
        )
    fqn: dict[int, str] = {}
    groups = []
    for saved, group in zip(meta["param_groups"], optimizer.param_groups, strict=False):
        fqn |= {i: names[id(p)] for i, p in zip(saved["params"], group["params"], strict=False)}
        groups.append({**saved, "params": [fqn[i] for i in saved["params"]]})
    state: dict[str, dict[str, Any]] = {}
    for key, val in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(fqn[int(pid)], {})[name] = val
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------- HF export
def _original_class(model: torch.nn.Module) -> type:
    """The model's own class: ``fully_shard`` swaps it for a subclass ``FSDP<Name>(FSDPModule, <Name>)``."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if issubclass(cls, FSDPModule):
        cls = next(b for b in cls.__bases__ if not issubclass(b, FSDPModule))
    return cls


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """A consolidated Hugging Face checkpoint of a (sharded) model: ``config.json``, ``model.safetensors`` and the
    tokenizer files, loadable with ``AutoModelForCausalLM.from_pretrained(out_dir)`` in one process.

    Collective: every rank takes part in gathering the full weights (to CPU, on rank 0 only); rank 0 writes,
    atomically (``out_dir`` replaced). A peft model writes its adapters only, as ``save_pretrained`` does.
    Tied weights (input/output embeddings) are gathered as two tensors; they are made one again so that
    ``save_pretrained`` stores the tie, not two copies."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out_dir, error = Path(out_dir), None
    try:
        full = None  # a model that is not sharded saves its own state dict (tied weights share storage there)
        if _sharded(model):
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if _rank() == 0 and full is not None:
            for alias, src in _aliases(model, None, {f"model.{k}" for k in full}).items():
                full[alias[len("model.") :]] = full[src[len("model.") :]]
        if _rank() == 0:
            with atomic_dir(out_dir) as tmp:
                model.save_pretrained(tmp, state_dict=full)
                _fix_architectures(tmp / "config.json", _original_class(unwrap(model)).__name__)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
    except BaseException as e:  # noqa: BLE001 -- the other ranks wait in _agree
        error = e
    _agree(error, f"exporting {out_dir}")
    return out_dir


def _fix_architectures(config_file: Path, name: str) -> None:
    """``save_pretrained`` names ``type(model)``, which ``fully_shard`` renamed ``FSDP<Name>``; transformers 5.23
    strips the prefix itself, but not every version does, and a stripped name is only right by convention."""
    if not config_file.exists():  # a peft adapter directory has adapter_config.json instead
        return
    cfg = json.loads(config_file.read_text())
    if cfg.get("architectures") != [name]:
        cfg["architectures"] = [name]
        config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
