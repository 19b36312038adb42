"""Placement of roles on Ray workers: the ``resources:`` section made real (the pieces every command shares; the
online-RL worker sets over them are ``alignflow.trainers.rl_setup.RayPlacement``).

``colocated`` (the default, the hybrid engine): ONE worker set holds every model role -- actor, rollout (over the
actor's own sharded module: it gathers the shards for a generate call and frees them after, so there is no second
copy to keep in sync), reference, critic(s) and reward/cost models -- on ``resources.actor.workers`` workers.
``split``: the actor and the rollout on one set, the reference, the critics and the reward models each on their
own set (``resources.ref``/``critic``/``reward``: workers 0 = the actor's count), so their calls can run at once.

Rule-based rewards and costs (Python functions) always run in the controller's process: they are cheap, and the
controller's timeouts and error messages name the failing row. Reward models go to workers.

Every trained or reference model is sharded with FSDP2 (``alignflow.distributed.shard``) inside its workers, with
``train.mixed_precision`` and ``resources.cpu_offload``; reward models are replicated (inference only, no
collective) and score their part of the batch.
"""

from __future__ import annotations

import torch

from alignflow.config import RLConfig
from alignflow.distributed.ray_group import WorkerSet, check_resources, init_ray, maybe_ray
from alignflow.distributed.shard import shard


def worker_device() -> torch.device:
    """A worker's device: its (first) GPU -- Ray sets CUDA_VISIBLE_DEVICES -- or the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def worker_wrap(cfg, device: torch.device):
    """The transform applied to every trained or reference model in a worker: FSDP2 with the run's precision."""
    mp = cfg.train.mixed_precision
    mp = ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none") if mp == "auto" else mp
    r = cfg.resources
    return lambda model: shard(
        model, mixed_precision=mp, cpu_offload=r.cpu_offload, reshard_after_forward=r.reshard_after_forward
    )


def roles_on_workers(cfg: RLConfig, names: tuple[str, ...]) -> dict[str, list[str]]:
    """Worker-set name -> the roles it holds; roles left out run in the controller."""
    model_reward = [
        n for n, models in (("reward", cfg.reward.models), ("cost", cfg.cost.models)) if n in names and models
    ]
    trained = [n for n in ("actor", "rollout", "ref", "critic", "cost_critic") if n in names]
    if cfg.resources.placement == "colocated":
        return {"workers": trained + model_reward}
    sets = {"actor": [n for n in ("actor", "rollout") if n in names]}
    if "ref" in names:
        sets["ref"] = ["ref"]
    critics = [n for n in ("critic", "cost_critic") if n in names]
    if critics:
        sets["critic"] = critics
    if model_reward:
        sets["reward"] = model_reward
    return sets


def start_set(cfg, name: str, res, workers: int, builder, args: tuple) -> WorkerSet:
    """A worker set of ``workers`` workers with the Ray resources ``res`` (a RoleResources) and the run's timeout and
    torch threads, its roles built by ``builder(*args)`` (the RL placement and ``alignflow po`` both start theirs
    here)."""
    return WorkerSet(
        name,
        workers,
        builder,
        args,
        gpus=res.gpus_per_worker,
        cpus=res.cpus_per_worker,
        timeout_s=cfg.resources.dist_timeout_s,
        threads=cfg.train.num_threads,
    )


def set_plan(cfg, layout: dict) -> dict:
    """Worker-set name -> (its RoleResources, number of workers)."""
    r, workers, plan = cfg.resources, max(cfg.resources.actor.workers, 1), {}
    for set_name in layout:
        own = set_name in ("workers", "actor", "policy")  # the actor's (or po policy's) set
        res = r.actor if own else getattr(r, set_name)
        plan[set_name] = (res, workers if own else (res.workers or workers))
    return plan


def check_placement(cfg, names: tuple[str, ...] | None = None) -> None:
    """Before any costly work (a built-in SFT, reference log-probs, loading models): when ``cfg.resources`` puts
    roles on Ray, start (or attach to) Ray and check that the cluster can hold the worker sets -- the RL roles'
    sets for ``names``, or the one policy set of ``alignflow po`` when ``names`` is None."""
    if not maybe_ray(cfg.resources):
        return
    init_ray(cfg.ray.address, cfg.ray.namespace, cfg.ray.num_cpus)
    plan = set_plan(cfg, {"policy": None}) if names is None else set_plan(cfg, roles_on_workers(cfg, names))
    check_resources([(s, n, res.cpus_per_worker, res.gpus_per_worker) for s, (res, n) in plan.items()])
