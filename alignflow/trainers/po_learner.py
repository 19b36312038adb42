"""The policy of offline preference optimisation as a role: ``step`` (one optimiser step on preference rows) and
``evaluate`` (the loss and metrics on held-out rows), so ``alignflow po`` runs in this process or on Ray workers
with the same loop (docs/design.md, roles and worker groups; placement from ``resources``, as for online RL).

Rows travel as ``Batch(meta={"row": [...]})``: a RayGroup splits them across the data-parallel ranks by token
count; :func:`~alignflow.trainers.po_rows.po_step` then divides by the step's row count over ALL ranks and
reduces its metrics, so a step on N workers is the single-process step (tests/test_distributed.py).
"""

from __future__ import annotations

import torch

from alignflow.batch import Batch
from alignflow.distributed.groups import LocalGroup, dispatch
from alignflow.distributed.placement import start_set, worker_device, worker_wrap
from alignflow.distributed.ray_group import init_ray, maybe_ray
from alignflow.models import load_causal_lm
from alignflow.models.sequences import disable_dropout
from alignflow.trainers import po_rows
from alignflow.trainers.loop import set_seed
from alignflow.trainers.roles import Optimised, TrainedRole


def row_batch(rows: list[dict]) -> Batch:
    return Batch(meta={"row": list(rows)})


class POLearner(TrainedRole):
    """``model`` trained by ``po_step`` through an :class:`Optimised` (optimiser, schedule, guarded step)."""

    def __init__(self, model, optim_cfg, train_cfg, total_steps: int, device):
        self.model, self.train_cfg, self.device = model, train_cfg, device
        self.optim = Optimised(model, optim_cfg, train_cfg, total_steps)

    @dispatch("split")
    def step(self, rows: Batch, loss, loss_kw: dict, label: str) -> dict:
        # looked up per call: tests and benches wrap po_rows.po_step
        metrics, ntok = po_rows.po_step(self.model, rows["row"], loss, loss_kw, self.train_cfg, self.device)
        name = loss if isinstance(loss, str) else getattr(loss, "__name__", "loss")
        out = self.optim.step({name: torch.tensor(metrics["loss"])}, label)
        return metrics | {
            "grad_norm": out.get("grad_norm", float("nan")),
            "lr": self.optim.sched.get_last_lr()[0],
            "tokens": float(ntok),
        }

    @dispatch("split")
    def evaluate(self, rows: Batch, loss, loss_kw: dict) -> dict:
        with torch.no_grad():
            metrics, _ = po_rows.po_step(
                self.model, rows["row"], loss, loss_kw, self.train_cfg, self.device, backward=False
            )
        return metrics


def build_po_worker(cfg, total_steps: int) -> dict:
    """Runs INSIDE each Ray worker: load the policy, drop dropout, shard it, wrap it in a POLearner."""
    device = worker_device()
    set_seed(cfg.train.seed)
    model = worker_wrap(cfg, device)(disable_dropout(load_causal_lm(cfg.model, device)))
    model.train()
    return {"policy": POLearner(model, cfg.optim, cfg.train, total_steps, device)}


def place_learner(cfg, model, total_steps: int, device):
    """(the policy group, the worker set or None): on Ray workers when ``cfg.resources`` says so, else a
    LocalGroup over ``model`` itself."""
    if not maybe_ray(cfg.resources):
        return LocalGroup(POLearner(model, cfg.optim, cfg.train, total_steps, device)), None
    init_ray(cfg.ray.address, cfg.ray.namespace, cfg.ray.num_cpus)
    actor = cfg.resources.actor
    ws = start_set(cfg, "policy", actor, max(actor.workers, 1), build_po_worker, (cfg, total_steps))
    return ws.group("policy"), ws
