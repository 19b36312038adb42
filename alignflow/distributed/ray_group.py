"""RayGroup: a role on N Ray actors that form one torch.distributed process group (docs/design.md).

A :class:`WorkerSet` is N Ray actors (``Worker``), placed with a Ray placement group (one bundle of
``cpus``/``gpus`` per worker, packed), that join one process group (gloo on CPU, NCCL on GPU) and then BUILD their
roles themselves from a picklable builder function -- the models are loaded and sharded inside the workers, never
shipped. A :class:`RayGroup` is one role of a worker set, and offers the role's public methods like a
:class:`~alignflow.distributed.groups.LocalGroup` does, so the controller cannot tell them apart. How a call is
spread follows the method's dispatch mode (``alignflow.distributed.groups.dispatch``):

* ``split``: the input Batch is partitioned across the ranks balanced by TOKEN count (greedy longest-first onto
  the least-loaded rank; rows keep their order within a rank), each rank runs the method on its part, and the
  outputs are put back in input order. A method may return k rows per input row (``generate`` returns n samples
  per prompt): output row order is recovered from k. A rank may get no rows (it still takes part in the
  collectives). Methods that return a metrics dict reduce it over the group themselves (``dp_sum_dict``); rank
  0's copy is returned.
* ``one``: every rank runs it (state dicts and checkpoints are collective under FSDP); rank 0's result is kept.
* ``all``: every rank runs it with the same arguments; rank 0's result is kept.

``group.submit(name, *args)`` starts a call and returns a :class:`Pending` whose ``result()`` waits for it: roles
on different worker sets (split placement) then run at the same time.

A worker that dies (killed, out of memory, a node lost) surfaces as :class:`WorkerLost` from the call that needed
it -- the first failed result is reported at once, without waiting for the ranks that are now stuck in a
collective. :meth:`WorkerSet.restart` kills what is left and builds the set again (new process group, same
builder); the trainer then reloads its last checkpoint (``trainers/rl.py``).
"""

from __future__ import annotations

import inspect
import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

from alignflow.batch import Batch, cat_rollouts
from alignflow.config import ConfigError


class WorkerLost(RuntimeError):
    """A worker of a group died during a call."""


def require_ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError(
            "placing roles on workers (resources.actor.workers > 1 or resources.backend=ray) needs Ray: "
            "pip install 'alignflow[ray]'"
        ) from e
    return ray


def init_ray(address: str = "", namespace: str = "alignflow", num_cpus: int = 0) -> None:
    """Attach to the cluster at ``address`` or start a local one (once per process). Workers inherit this
    process's ``sys.path`` and environment through the runtime env, so an editable checkout works unchanged."""
    ray = require_ray()
    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "OMP_", "ALIGNFLOW_", "TOKENIZERS_"))}
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [os.environ.get("PYTHONPATH", "")])
    kw = dict(namespace=namespace, runtime_env={"env_vars": env}, log_to_driver=True, include_dashboard=False)
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus or None, **kw)


def check_resources(demand: list[tuple[str, int, float, float]]) -> None:
    """Fail at once when the Ray cluster can never hold the worker sets of ``demand`` -- ``(set name, workers,
    cpus per worker, gpus per worker)`` each -- instead of letting Ray wait for resources that will not come: the
    cluster's totals must cover the sum, and some live node must fit one worker's bundle."""
    ray = require_ray()
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    missing = []
    for kind in ("CPU", "GPU"):
        col = 2 if kind == "CPU" else 3
        need, have = sum(d[1] * d[col] for d in demand), total.get(kind, 0.0)
        if need > have:
            missing.append(f"{need:g} {kind}s in all, the cluster has {have:g}")
    for name, _, cpus, gpus in demand:
        if nodes and not any(n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus for n in nodes):
            missing.append(f"no node has {cpus:g} CPUs and {gpus:g} GPUs for one '{name}' worker")
    if missing:
        asked = ", ".join(f"'{name}' {w} x ({c:g} CPU, {g:g} GPU)" for name, w, c, g in demand)
        raise ConfigError(
            f"the Ray cluster cannot place the workers this run asks for ({asked}): "
            f"{'; '.join(missing)}. Lower resources.<role>.workers / cpus_per_worker / gpus_per_worker, "
            f"or give Ray more (ray.num_cpus, a cluster via ray.address)"
        )


def balanced_partition(costs: list[int], parts: int) -> list[list[int]]:
    """Row indices per rank with near-equal summed ``costs``: longest row first onto the least-loaded rank (ties:
    the lower rank); each rank's rows in ascending order. Deterministic."""
    loads, out = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(parts), key=lambda r: (loads[r], len(out[r]), r))
        out[r].append(i)
        loads[r] += costs[i]
    return [sorted(o) for o in out]


def row_costs(batch: Batch) -> list[int]:
    """Tokens per row: ``attention_mask`` when present, else the prompt token ids (times nothing: n is the same
    for every prompt), else 1."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(-1).tolist()
    if "prompt_token_ids" in batch.meta:
        return [len(p) for p in batch["prompt_token_ids"]]
    if "row" in batch.meta:  # preference rows: the token ids of all their sequences
        return [
            sum(len(v) for k, v in r.items() if k.endswith("_ids") and isinstance(v, list)) or 1 for r in batch["row"]
        ]
    return [1] * len(batch)


def free_port() -> int:
    """A TCP port that is free on this host now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Worker:
    """One rank: joins the process group, builds roles with the builder, runs their methods. (Wrapped with
    ``ray.remote`` when a WorkerSet starts, so importing this module does not need Ray.)"""

    def __init__(self, rank: int, world: int, threads: int = 0):
        self.rank, self.world, self.roles = rank, world, {}
        if threads:
            torch.set_num_threads(threads)

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def join(self, host: str, port: int, backend: str, timeout_s: float) -> int:
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPU(s)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{port}",
            rank=self.rank,
            world_size=self.world,
            timeout=timedelta(seconds=timeout_s),
        )
        return os.getpid()

    def build(self, builder: Callable[..., dict], args: tuple) -> dict:
        """Run ``builder(*args)`` -> {name: role}; returns {name: {method: dispatch mode}}."""
        from alignflow.distributed.groups import dispatch_mode

        built = builder(*args)
        self.roles.update(built)
        return {
            name: {
                m: dispatch_mode(getattr(role, m))
                for m in dir(role)
                if not m.startswith("_") and inspect.ismethod(getattr(role, m, None))
            }
            for name, role in built.items()
        }

    def call(self, role: str, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.roles[role], method)(*args, **kwargs)

    def attribute(self, role: str, name: str) -> Any:
        return getattr(self.roles[role], name)


class WorkerSet:
    """N workers in one process group, holding the roles ``builder(*args)`` makes in each of them."""

    def __init__(
        self,
        name: str,
        workers: int,
        builder: Callable[..., dict],
        args: tuple,
        gpus: float = 0.0,
        cpus: float = 1.0,
        timeout_s: float = 600.0,
        threads: int = 0,
    ):
        if workers < 1:
            raise ConfigError(f"resources.{name}.workers must be >= 1 for a worker set, got {workers}")
        self.name, self.size, self.builder, self.args = name, workers, builder, args
        self.gpus, self.cpus, self.timeout_s, self.threads = gpus, cpus, timeout_s, threads
        self.actors: list = []
        self.modes: dict = {}
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        ray = require_ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        check_resources([(self.name, self.size, self.cpus, self.gpus)])
        bundle = {"CPU": self.cpus} | ({"GPU": self.gpus} if self.gpus else {})
        self.pg = placement_group([bundle] * self.size, strategy="PACK")
        try:  # the cluster could hold the set, but other work holds the resources now
            ray.get(self.pg.ready(), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise ConfigError(
                f"worker set '{self.name}': {self.size} x {bundle} not free after {self.timeout_s:.0f} s "
                f"(resources.dist_timeout_s); free now: {ray.available_resources()}"
            ) from None
        remote = ray.remote(Worker)
        self.actors = [
            remote.options(
                num_cpus=self.cpus,
                num_gpus=self.gpus,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=r
                ),
            ).remote(r, self.size, self.threads)
            for r in range(self.size)
        ]
        host, port = self._get([self.actors[0].address.remote()])[0]
        backend = "nccl" if self.gpus else "gloo"
        self.pids = self._get([a.join.remote(host, port, backend, self.timeout_s) for a in self.actors])
        self.modes = self._get([a.build.remote(self.builder, self.args) for a in self.actors])[0]

    def restart(self) -> None:
        """Kill every worker of the set and start it again (new process group, roles rebuilt from scratch)."""
        self.shutdown()
        self.restarts += 1
        self._start()

    def shutdown(self) -> None:
        ray = require_ray()
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        remove_placement_group(self.pg)

    def _get(self, refs: list) -> list:
        """Results of ``refs``; the first worker failure raises :class:`WorkerLost` at once."""
        ray = require_ray()
        from ray.exceptions import RayActorError, RayTaskError

        pending, done = list(refs), {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=self.timeout_s)
            if not ready:
                raise WorkerLost(
                    f"worker set '{self.name}': no answer in {self.timeout_s:.0f} s (resources.dist_timeout_s)"
                )
            try:
                done[ready[0]] = ray.get(ready[0])
            except RayActorError as e:
                raise WorkerLost(
                    f"worker set '{self.name}': a worker died ({type(e).__name__}: {str(e).splitlines()[0]})"
                ) from e
            except RayTaskError as e:
                # A rank whose peer died can fail in its collective (the connection closes) before Ray reports
                # the death: look at the other ranks' results, and call it a lost worker if one of them died.
                dead = self._dead_rank(pending)
                if dead is not None:
                    raise WorkerLost(
                        f"worker set '{self.name}': a worker died and a peer's collective failed ({dead})"
                    ) from e
                raise
        return [done[r] for r in refs]

    def _dead_rank(self, refs: list, wait_s: float = 30.0) -> str | None:
        """The first of ``refs`` that fails with a dead worker within ``wait_s`` seconds, described; else None."""
        ray = require_ray()
        from ray.exceptions import RayActorError

        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s)
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError as e:
                return f"{type(e).__name__}: {str(e).splitlines()[0]}"
            except Exception:  # noqa: BLE001 -- another rank's own failure; keep looking for a dead one
                continue
        return None

    def group(self, role: str) -> RayGroup:
        if role not in self.modes:
            raise KeyError(f"worker set '{self.name}' holds no role {role!r} (it holds {', '.join(self.modes)})")
        return RayGroup(self, role)


class Pending:
    """A started group call; ``result()`` waits for every rank and assembles the answer."""

    def __init__(self, workers: WorkerSet, refs: list, finish: Callable[[list], Any]):
        self.workers, self.refs, self.finish = workers, refs, finish

    def result(self) -> Any:
        return self.finish(self.workers._get(self.refs))


def _reassemble(parts: list[list[int]], inputs: int, outs: list) -> Batch:
    """Rank outputs back in input order; each input row may have produced k output rows (k the same for all)."""
    filled = [(idx, o) for idx, o in zip(parts, outs, strict=False) if len(idx)]
    if not filled:
        return outs[0]
    k = len(filled[0][1]) // len(filled[0][0])
    order = [0] * (inputs * k)
    pos = 0
    for idx, o in filled:
        if len(o) != k * len(idx):
            raise RuntimeError(f"a rank returned {len(o)} rows for {len(idx)} inputs; expected {k} per input")
        for j, i in enumerate(idx):
            for s in range(k):
                order[i * k + s] = pos + j * k + s
        pos += len(o)
    # prompt-side columns are left-padded: cat_rollouts aligns them
    whole = cat_rollouts([o for _, o in filled]) if "prompt_ids" in filled[0][1] else Batch.cat([o for _, o in filled])
    return whole.select(order)


class RayGroup:
    """One role on a :class:`WorkerSet`; attribute access gives the role's methods, dispatched by mode."""

    def __init__(self, workers: WorkerSet, role: str):
        self.workers, self.role = workers, role

    @property
    def world_size(self) -> int:
        return self.workers.size

    def submit(self, method: str, *args, **kwargs) -> Pending:
        mode = self.workers.modes[self.role].get(method)
        if mode is None:
            raise AttributeError(f"{self.role} role has no public method {method!r}")
        actors = self.workers.actors
        if mode == "split" and args and isinstance(args[0], Batch):
            batch = args[0]
            parts = balanced_partition(row_costs(batch), len(actors))
            refs = [
                a.call.remote(self.role, method, (batch.select(idx),) + args[1:], kwargs)
                for a, idx in zip(actors, parts, strict=False)
            ]

            def finish(outs):
                if isinstance(outs[0], Batch):
                    return _reassemble(parts, len(batch), outs)
                return outs[0]

            return Pending(self.workers, refs, finish)
        refs = [a.call.remote(self.role, method, args, kwargs) for a in actors]
        return Pending(self.workers, refs, lambda outs: outs[0])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        modes = self.workers.modes.get(self.role, {})
        if name in modes:
            return lambda *a, **k: self.submit(name, *a, **k).result()
        # a plain attribute of the role (e.g. ``model`` for reading weights): fetched from rank 0
        return self.workers._get([self.workers.actors[0].attribute.remote(self.role, name)])[0]

    def __repr__(self) -> str:
        return f"RayGroup({self.role} x {self.workers.size} on '{self.workers.name}')"


def maybe_ray(cfg_resources) -> bool:
    """Does this resources section place roles on Ray workers?"""
    r = cfg_resources
    if r.backend == "local":
        if r.actor.workers > 1:
            raise ConfigError(
                f"resources.backend=local runs one process; resources.actor.workers={r.actor.workers} "
                "needs backend auto or ray"
            )
        return False
    return r.backend == "ray" or r.actor.workers > 1
