"""Run a function on N local processes forming one torch.distributed group (gloo, CPU): the multi-rank test harness.

    results = run_ranks(fn, 2, arg1, arg2)   # fn(rank, world_size, arg1, arg2) on each rank; its return values

``fn`` must be importable by a fresh interpreter (a module-level function of a test module or of alignflow), and its
arguments and return value picklable: the ranks are ``spawn``-ed processes (a fork would copy the parent's threads
and torch state). Each rank runs with ``OMP_NUM_THREADS=1`` and one torch thread. When a rank raises, the others are
stopped (they may be blocked in a collective waiting for it) and ``run_ranks`` raises :class:`RankFailed` with the
failing ranks' own tracebacks (the first to report first: a rank whose peer left a collective fails in turn); a run
that outlives ``timeout`` seconds is stopped the same way.

    with single_rank_group():   # a world-1 gloo group in this process (no spawn): FSDP2 on one rank
        ...
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from alignflow.distributed.ray_group import free_port


class RankFailed(AssertionError):
    """A rank raised (the message carries its traceback) or the ranks did not finish in time.

    An AssertionError, so that a failed ``assert`` inside a rank reads as a test failure, not an error."""


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            out = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 -- everything goes back to the parent, with the traceback
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; the list of their return values by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the children at start-up
    try:
        procs = [
            ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, results), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    outputs: dict[int, Any] = {}
    failures: list[str] = []
    deadline, grace = time.monotonic() + timeout, float("inf")
    try:
        while len(outputs) + len(failures) < world_size:
            if failures and time.monotonic() > grace:
                break
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                if failures:
                    continue
                if time.monotonic() > deadline:
                    left = sorted(set(range(world_size)) - set(outputs))
                    failures.append(f"ranks {left} did not finish in {timeout:.0f} s")
                    break
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outputs]
                if dead:  # killed without reporting (a segfault, the OOM killer)
                    time.sleep(0.5)  # its report may still be in flight
                    if results.empty():
                        failures.append(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                        break
                continue
            if ok:
                outputs[rank] = value
            else:
                if not failures:  # the others may fail in turn (a peer left a collective): collect them briefly
                    grace = time.monotonic() + 3.0
                failures.append(f"rank {rank} of {world_size} raised:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 0.5)
        for p in procs:
            if p.is_alive():  # blocked in a collective with a failed rank
                p.terminate()
                p.join(timeout=5)
    if failures:  # in the order they reported; the first is usually the cause
        raise RankFailed(f"{getattr(fn, '__name__', fn)}: " + "\n".join(failures))
    return [outputs[r] for r in range(world_size)]


@contextlib.contextmanager
def single_rank_group() -> Iterator[None]:
    """A gloo process group of world size 1 in this process for the block, destroyed after it (cheaper than
    spawning one rank; the test process must not hold a group already)."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("single_rank_group: this process already has a default process group")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
