"""Placement of the online-RL roles on Ray workers: the ``resources:`` section made real.

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

from alignflow.config import ConfigError, RLConfig
from alignflow.distributed.groups import LocalGroup
from alignflow.distributed.ray_group import WorkerSet, check_resources, init_ray


def worker_device() -> torch.device:
    """A worker's device: its (first) GPU -- Ray sets CUDA_VISIBLE_DEVICES -- or the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def worker_wrap(cfg, device: torch.device):
    """The transform applied to every trained or reference model in a worker: FSDP2 with the run's precision."""
    from alignflow.distributed.shard import shard

    mp = cfg.train.mixed_precision
    mp = ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none") if mp == "auto" else mp
    r = cfg.resources
    return lambda model: shard(model, mixed_precision=mp, cpu_offload=r.cpu_offload,
                               reshard_after_forward=r.reshard_after_forward)


def build_worker_roles(cfg: RLConfig, algo, total_opt_steps: int, names: tuple[str, ...]) -> dict:
    """Runs INSIDE each worker (after it joined the process group): load, shard and wrap the named roles."""
    from alignflow.models import load_tokenizer
    from alignflow.trainers.loop import set_seed
    from alignflow.trainers.rl_setup import role_objects

    device = worker_device()
    set_seed(cfg.train.seed)  # the same initialisation on every rank (value heads), as in one process
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    return role_objects(cfg, algo, device, total_opt_steps, tok, names, worker_wrap(cfg, device))


def _on_workers(cfg: RLConfig, names: tuple[str, ...]) -> dict[str, list[str]]:
    """Worker-set name -> the roles it holds; roles left out run in the controller."""
    model_reward = [n for n, models in (("reward", cfg.reward.models), ("cost", cfg.cost.models))
                    if n in names and models]
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
    return WorkerSet(name, workers, builder, args, gpus=res.gpus_per_worker, cpus=res.cpus_per_worker,
                     timeout_s=cfg.resources.dist_timeout_s, threads=cfg.train.num_threads)


def _plan(cfg, layout: dict) -> dict:
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
    from alignflow.distributed.ray_group import maybe_ray

    if not maybe_ray(cfg.resources):
        return
    init_ray(cfg.ray.address, cfg.ray.namespace, cfg.ray.num_cpus)
    plan = _plan(cfg, {"policy": None}) if names is None else _plan(cfg, _on_workers(cfg, names))
    check_resources([(s, n, res.cpus_per_worker, res.gpus_per_worker) for s, (res, n) in plan.items()])


class RayPlacement:
    """The worker sets of one RL run and the role groups over them; ``restart()`` rebuilds every set."""

    def __init__(self, cfg: RLConfig, algo, total_opt_steps: int, names: tuple[str, ...], tok):
        r = cfg.resources
        workers = max(r.actor.workers, 1)
        if cfg.train.batch_size < workers:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is smaller than resources.actor.workers="
                              f"{workers}: every worker needs at least one row of each mini-batch")
        if cfg.model.lora.enabled:
            raise ConfigError("resources: LoRA actors on Ray workers are not supported yet (FSDP2 + peft is "
                              "untested here); train LoRA in one process (resources.actor.workers=1)")
        init_ray(cfg.ray.address, cfg.ray.namespace, cfg.ray.num_cpus)
        self.sets: dict[str, WorkerSet] = {}
        self.local: dict = {}
        layout = _on_workers(cfg, names)
        plan = _plan(cfg, layout)
        check_resources([(s, n, res.cpus_per_worker, res.gpus_per_worker) for s, (res, n) in plan.items()])
        for set_name, roles in layout.items():
            res, n = plan[set_name]
            self.sets[set_name] = start_set(cfg, set_name, res, n, build_worker_roles,
                                            (cfg, algo, total_opt_steps, tuple(roles)))
        on_workers = {n for roles in layout.values() for n in roles}
        rest = tuple(n for n in names if n not in on_workers)
        if rest:  # rule-based rewards and costs: in this process
            from alignflow.trainers.rl_setup import role_objects

            self.local = {n: LocalGroup(o) for n, o in role_objects(cfg, algo, torch.device("cpu"), total_opt_steps,
                                                                    tok, rest).items()}
        self.layout = layout

    def groups(self) -> dict:
        out = dict(self.local)
        for set_name, roles in self.layout.items():
            for role in roles:
                out[role] = self.sets[set_name].group(role)
        return out

    def restart(self) -> None:
        for ws in self.sets.values():
            ws.restart()

    def shutdown(self) -> None:
        for ws in self.sets.values():
            ws.shutdown()
