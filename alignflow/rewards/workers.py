"""A small pool of forked worker processes whose calls a timeout really stops.

A Python thread cannot be stopped: a reward check that overruns its timeout in a thread keeps computing (and
allocating) in the background. :class:`WorkerPool` runs each call in a forked child process instead:

* **timeout**: every item gets ``timeout_s`` seconds from the moment its worker starts it; a worker that
  overruns is killed (SIGKILL) and replaced by a fresh fork, and the item's outcome is ``"timeout"``;
* **memory**: each worker's address space may grow by at most ``memory_mb`` MiB beyond what it inherited at the
  fork (``resource.setrlimit(RLIMIT_AS)``); an allocation past that fails inside the worker (a ``MemoryError``,
  outcome ``"error"``), or kills it (outcome ``"crash"``, and a fresh worker takes its place);
* **batching**: :meth:`WorkerPool.map` hands a list of items to ``size`` workers over pipes, one item at a
  time per worker, so a batch pays one pipe round trip per item and no process start-up.

Workers are forked lazily on the first call and kept for the next; :meth:`close` (also at interpreter exit)
stops them. A worker ignores Ctrl-C (the parent stops it) and exits by itself when its parent dies. The work
function must be defined before the pool forks (it is inherited, not pickled); items and results travel
pickled. Linux/macOS only (``fork`` and ``resource``).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

_POOLS: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def _address_space() -> int:
    """This process's virtual size in bytes (VmSize), 0 when unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _limit_memory(memory_mb: int | None) -> None:
    if not memory_mb:
        return
    import resource

    limit = _address_space() + memory_mb * 2 ** 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _serve(conn, fn: Callable, memory_mb: int | None, close_fds: list, parent: int) -> None:
    """The worker's loop: receive ``(index, args)``, answer ``(index, ("ok", result) | ("error", text))``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for other in close_fds:  # the parent's ends of the other workers' pipes, inherited through the fork
        try:
            other.close()
        except OSError:
            pass
    _limit_memory(memory_mb)
    while True:
        while not conn.poll(1.0):
            if os.getppid() != parent:  # the parent died: nobody will read our answers
                return
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, args = msg
        try:
            out = ("ok", fn(*args))
        except BaseException as e:  # reported to the parent, which decides
            out = ("error", f"{type(e).__name__}: {str(e)[:200]}")
        del msg, args
        conn.send((index, out))


class _Worker:
    def __init__(self, ctx, fn: Callable, memory_mb: int | None, others: list):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn, memory_mb, others + [self.conn], os.getpid()),
                                daemon=True, name="alignflow-reward-worker")
        self.proc.start()
        child.close()
        self.index: int | None = None
        self.deadline = 0.0

    def stop(self, kill: bool = False) -> None:
        try:
            if kill:
                self.proc.kill()
            else:
                self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(1.0 if not kill else None)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class WorkerPool:
    """``size`` forked workers running ``fn``; see the module docstring.

    fn: the function each item is passed to as ``fn(*item)``. timeout_s: seconds per item. memory_mb: extra
    address space each worker may take (None: no limit). :meth:`map` returns one ``(status, value)`` per item:
    ``("ok", result)``, ``("error", "Type: message")``, ``("timeout", None)`` or ``("crash", None)``.
    """

    def __init__(self, fn: Callable, size: int = 2, timeout_s: float = 5.0, memory_mb: int | None = 1024):
        if size < 1:
            raise ValueError(f"WorkerPool: size must be >= 1, got {size}")
        if not timeout_s > 0:
            raise ValueError(f"WorkerPool: timeout_s must be > 0, got {timeout_s}")
        self.fn, self.size, self.timeout_s, self.memory_mb = fn, size, timeout_s, memory_mb
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()
        self.replaced = 0  # workers killed on a timeout or found dead, and replaced
        self._ctx = multiprocessing.get_context("fork")
        _POOLS.add(self)

    def _fork(self) -> _Worker:
        return _Worker(self._ctx, self.fn, self.memory_mb, [w.conn for w in self.workers])

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [w.proc.pid for w in self.workers if w.proc.is_alive()]

    def map(self, items: list[tuple], timeout_s: float | None = None) -> list[tuple[str, Any]]:
        """Run ``fn(*item)`` for every item on the workers; one ``(status, value)`` per item, in order.
        ``timeout_s`` overrides the pool's seconds per item for this call."""
        with self.lock:
            return self._map(list(items), timeout_s or self.timeout_s)

    def _map(self, items: list[tuple], timeout_s: float) -> list[tuple[str, Any]]:
        results: list = [None] * len(items)
        todo = list(range(len(items)))[::-1]
        while len(self.workers) < min(self.size, len(items)):
            self.workers.append(self._fork())
        busy: dict = {}
        while todo or busy:
            for w in self.workers:
                if todo and w.index is None:
                    self._give(w, todo.pop(), items, busy, timeout_s)
            self._collect(busy, results)
        return results

    def _give(self, w: _Worker, index: int, items: list, busy: dict, timeout_s: float) -> None:
        w.index, w.deadline = index, time.monotonic() + timeout_s
        busy[w.conn] = w
        try:
            w.conn.send((index, items[index]))
        except (OSError, ValueError):  # the worker died since its last item
            pass

    def _collect(self, busy: dict, results: list) -> None:
        """Wait for the next answer or deadline; record outcomes and replace dead or overdue workers."""
        now = time.monotonic()
        first = min(w.deadline for w in busy.values())
        for conn in wait(list(busy), timeout=max(0.0, first - now)):
            w = busy.pop(conn)
            try:
                index, out = conn.recv()
            except (EOFError, OSError):  # died mid-item (e.g. killed by the memory limit)
                results[w.index] = ("crash", None)
                self._replace(w)
                continue
            results[index], w.index = out, None
        now = time.monotonic()
        for conn, w in list(busy.items()):
            if w.deadline <= now:
                busy.pop(conn)
                results[w.index] = ("timeout", None)
                self._replace(w)

    def _replace(self, w: _Worker) -> None:
        w.stop(kill=True)
        self.replaced += 1
        i = self.workers.index(w)
        self.workers.pop(i)
        self.workers.insert(i, self._fork())

    def close(self) -> None:
        """Stop every worker; a later :meth:`map` forks new ones."""
        with self.lock:
            for w in self.workers:
                w.stop()
            self.workers = []


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS):
        try:
            pool.close()
        except Exception:  # interpreter shutdown: nothing left to clean
            pass
