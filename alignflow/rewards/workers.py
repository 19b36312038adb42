"""A small pool of forked worker processes whose calls a timeout really stops.

A Python thread cannot be stopped: a reward check that overruns its timeout in a thread keeps computing (and
allocating) in the background. :class:`WorkerPool` runs each call in a forked child process instead:

* **timeout**: every item gets ``timeout_s`` seconds from the moment its worker starts it; a worker that
  overruns is killed (SIGKILL) and replaced by a fresh fork, and the item's outcome is ``"timeout"``;
* **memory**: a worker whose anonymous resident memory (``RssAnon``) grows more than ``memory_mb`` MiB past
  what the parent held at the fork is killed by the parent, which looks every ``MEMORY_POLL_S`` while it waits
  (outcome ``"memory"``, and a fresh worker takes its place). A failed allocation inside the worker does not
  reliably stop it (its code may catch the ``MemoryError`` and go on; a CI run once saw a sympy check run on to
  its timeout), so the parent's kill is the limit that holds. As a backstop against a burst between two looks,
  the worker's address space may grow by at most ``2 * memory_mb`` MiB (``resource.setrlimit(RLIMIT_AS)``):
  one allocation past that fails inside the worker (a ``MemoryError``, outcome ``"error"``) or kills it
  (outcome ``"crash"``);
* **batching**: :meth:`WorkerPool.map` spreads a list of items over ``size`` workers through pipes, a few
  queued on each worker at a time (so it never waits for the parent between items), with no process start-up;
  an item's clock starts when the worker finishes the previous one;
* **abandoned calls**: a map running in a thread whose caller stopped waiting (``run_with_timeout`` of
  :mod:`alignflow.rewards.rules` sets the thread's ``alignflow_cancel`` event) kills its busy workers and
  returns within ``POLL_S``, marking the unfinished items ``"cancelled"``, so the next call finds the pool
  free instead of waiting behind work nobody will read.

Workers are forked lazily on the first call and kept for the next; :meth:`close` (also at interpreter exit)
stops them. A worker ignores Ctrl-C (the parent stops it) and exits by itself when its parent dies. The work
function must be defined before the pool forks (it is inherited, not pickled); items and results travel
pickled. Linux (``fork``, ``resource`` and ``/proc`` for the memory limit).
"""

from __future__ import annotations

import atexit
import collections
import os
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

_POOLS: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
DEPTH = 8  # items queued on one worker at a time
PIPELINED_CHARS = 32_000  # text queued on a worker beyond its running item (well below a pipe's buffer)
POLL_S = 0.25  # how often a waiting map looks whether its caller gave up
MEMORY_POLL_S = 0.1  # how often a waiting map reads its busy workers' resident memory (when limited)


def _status_bytes(field: str, pid: int | str = "self") -> int:
    """A size field of ``/proc/<pid>/status`` (``VmSize``, ``RssAnon``) in bytes, 0 when unknown or gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _limit_memory(memory_mb: int | None) -> None:
    inherited = _status_bytes("VmSize")
    if not memory_mb or not inherited:  # no /proc: the inherited size is unknown, so no limit
        return
    import resource

    limit = inherited + 2 * memory_mb * 2**20  # the backstop; the parent kills at memory_mb resident
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
    """One forked child and the parent's end of its socket. ``os.fork`` directly, not ``multiprocessing``: that
    also works inside a daemonic process (a ``multiprocessing`` pool worker may not start children)."""

    def __init__(self, fn: Callable, memory_mb: int | None, others: list):
        ours, theirs = socket.socketpair()
        parent = os.getpid()
        held = _status_bytes("RssAnon")  # the child starts with at most this much of its own anonymous memory
        # no limit where /proc is missing (the parent cannot read what the child holds)
        self.rss_limit = held + memory_mb * 2**20 if memory_mb and held else 0
        pid = os.fork()
        if pid == 0:  # the child: serve, and never return into the parent's code
            code = 0
            try:
                ours.close()
                _serve(Connection(theirs.detach()), fn, memory_mb, others, parent)
            except BaseException:  # noqa: B036 -- whatever happens, the child must end here
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.pid: int | None = pid
        self.conn = Connection(ours.detach())
        self.queue: collections.deque = collections.deque()  # (index, chars) sent, not answered; the first runs
        self.queued_chars = 0
        self.deadline = 0.0  # when the running item times out

    def alive(self) -> bool:
        """Whether the child still runs (a child that ended is reaped here)."""
        if self.pid is None:
            return False
        try:
            done = os.waitpid(self.pid, os.WNOHANG)[0]
        except ChildProcessError:
            done = self.pid
        if done:
            self.pid = None
        return not done

    def stop(self, kill: bool = False) -> None:
        """Ask the child to exit (or SIGKILL it at once), wait for it, close the socket."""
        if not kill:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
            end = time.monotonic() + 1.0
            while self.alive() and time.monotonic() < end:
                time.sleep(0.01)
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = None
        self.conn.close()


class WorkerPool:
    """``size`` forked workers running ``fn``; see the module docstring.

    fn: the function each item is passed to as ``fn(*item)``. timeout_s: seconds per item. memory_mb: extra
    resident memory each worker may take (None: no limit). :meth:`map` returns one ``(status, value)`` per item:
    ``("ok", result)``, ``("error", "Type: message")``, ``("timeout", None)``, ``("memory", None)``,
    ``("crash", None)`` or ``("cancelled", None)``.
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
        self.memory_looked = 0.0  # when the busy workers' memory was last read
        _POOLS.add(self)

    def _fork(self) -> _Worker:
        return _Worker(self.fn, self.memory_mb, [w.conn for w in self.workers])

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [w.pid for w in self.workers if w.alive()]

    def map(self, items: list[tuple], timeout_s: float | None = None) -> list[tuple[str, Any]]:
        """Run ``fn(*item)`` for every item on the workers; one ``(status, value)`` per item, in order.
        ``timeout_s`` overrides the pool's seconds per item for this call."""
        with self.lock:
            return self._map(list(items), timeout_s or self.timeout_s)

    def _map(self, items: list[tuple], timeout_s: float) -> list[tuple[str, Any]]:
        results: list = [None] * len(items)
        todo = collections.deque(range(len(items)))
        while len(self.workers) < min(self.size, len(items)):
            self.workers.append(self._fork())
        cancel = getattr(threading.current_thread(), "alignflow_cancel", None)
        while todo or any(w.queue for w in self.workers):
            if cancel is not None and cancel.is_set():
                return self._cancel(results, todo)
            for w in self.workers:
                self._fill(w, todo, items, timeout_s)
            self._collect(results, todo, timeout_s)
        return results

    def _cancel(self, results: list, todo: collections.deque) -> list:
        """The caller gave up on this call (its thread timed out): stop the work, mark what is left."""
        for w in [w for w in self.workers if w.queue]:
            todo.extend(index for index, _ in w.queue)
            w.queue.clear()
            self._replace(w)
        for index in todo:
            results[index] = ("cancelled", None)
        return results

    def _fill(self, w: _Worker, todo: collections.deque, items: list, timeout_s: float) -> None:
        """Queue items on ``w`` (up to DEPTH, and PIPELINED_CHARS of text beyond the first) so that it never
        waits for the parent between items; the first item's clock starts now."""
        while todo and len(w.queue) < DEPTH:
            size = sum(len(str(x)) for x in items[todo[0]])
            if w.queue and w.queued_chars + size > PIPELINED_CHARS:
                return  # a send could block on a full pipe while the worker computes
            index = todo.popleft()
            if not w.queue:
                w.deadline = time.monotonic() + timeout_s
            w.queue.append((index, size))
            w.queued_chars += size
            try:
                w.conn.send((index, items[index]))
            except (OSError, ValueError):  # the worker died since its last item: _collect finds out
                return

    def _collect(self, results: list, todo: collections.deque, timeout_s: float) -> None:
        """Wait for the next answer or deadline; record outcomes and replace dead or overdue workers (their
        queued items go back to ``todo``)."""
        busy = {w.conn: w for w in self.workers if w.queue}
        first = min(w.deadline for w in busy.values())
        poll = MEMORY_POLL_S if self.memory_mb else POLL_S
        for conn in wait(list(busy), timeout=min(poll, max(0.0, first - time.monotonic()))):
            w = busy[conn]
            try:
                index, out = conn.recv()
            except (EOFError, OSError):  # died mid-item (e.g. killed by the memory limit)
                self._give_up(w, "crash", results, todo)
                continue
            w.queued_chars -= w.queue.popleft()[1]
            results[index] = out
            w.deadline = time.monotonic() + timeout_s  # the next queued item starts now
        now = time.monotonic()
        look = self.memory_mb and now - self.memory_looked >= MEMORY_POLL_S  # not on every answer: /proc reads
        if look:
            self.memory_looked = now
        for w in busy.values():
            if w.queue and w.deadline <= now:
                self._give_up(w, "timeout", results, todo)
            elif look and w.queue and w.rss_limit and w.pid and _status_bytes("RssAnon", w.pid) > w.rss_limit:
                self._give_up(w, "memory", results, todo)

    def _give_up(self, w: _Worker, status: str, results: list, todo: collections.deque) -> None:
        """The item ``w`` is running gets ``status``; its other queued items are retried; ``w`` is replaced."""
        results[w.queue.popleft()[0]] = (status, None)
        todo.extendleft(index for index, _ in reversed(w.queue))
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
