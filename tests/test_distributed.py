"""Scale-out (issue 5): roles on Ray workers that form one gloo process group, FSDP2-sharded.

The checks: a GRPO step (and a PPO step with split placement) on 2 workers equals the single-process step; a
killed worker is survived (recreated, resumed from the last checkpoint, same final metrics as an uninterrupted
run); checkpoints move between 2 and 1 workers; the token-balanced split and the reassembly are exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import pytest
import ray  # the [ray] extra; part of the dev install (scripts/setup.sh dev)
import torch
from safetensors.torch import load_file

from alignflow.batch import Batch
from alignflow.config import ConfigError
from alignflow.distributed.ray_group import _reassemble, balanced_partition, maybe_ray, row_costs
from alignflow.trainers import rl as online
from alignflow.trainers.rl import train_rl
from tests.test_online_rl import rl_cfg


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for this module (6 logical CPUs: split placement starts 4 worker sets, 5 workers)."""
    from alignflow.distributed.ray_group import init_ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_ray(num_cpus=6)
    yield
    ray.shutdown()


def _weights(out) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), (k, (a[k] - b[k]).abs().max())


def _cfg(task, out, workers: int, **sections):
    base = {
        "algo": {"name": "grpo"},
        "kl": {"coef": 0.05},
        "rollout": {"prompts_per_step": 3, "n": 2, "max_new_tokens": 6, "eval_prompts": 0},
        "train": {"output_dir": str(out), "batch_size": 6, "max_steps": 1, "progress": False, "num_threads": 1},
        "resources": {"actor": {"workers": workers}, "backend": "ray" if workers else "auto"},
    }
    for k, v in sections.items():
        base[k] = base.get(k, {}) | v
    return rl_cfg(task, out, **base)


# ----------------------------------------------------------------------------------------------- pure pieces
def test_balanced_partition_balances_tokens_not_rows():
    """Costs 9, 1, 1, 1, 8: longest first onto the least-loaded rank -> {9, 1} = 10 and {8, 1, 1} = 10 (by rows it
    would be 3 + 2 rows with 11 vs 9 tokens)."""
    assert balanced_partition([9, 1, 1, 1, 8], 2) == [[0, 2], [1, 3, 4]]
    assert balanced_partition([1, 1], 3)[2] == []  # more ranks than rows: an empty part


def test_reassemble_restores_input_order_with_k_outputs_per_row():
    """Rank 0 got inputs [0, 2], rank 1 got [1]; each input produced 2 output rows (n = 2 samples)."""
    outs = [Batch({"x": torch.tensor([[0], [0], [2], [2]])}), Batch({"x": torch.tensor([[1], [1]])})]
    whole = _reassemble([[0, 2], [1]], 3, outs)
    assert whole["x"][:, 0].tolist() == [0, 0, 1, 1, 2, 2]


def test_row_costs_use_real_tokens():
    b = Batch({"attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])})
    assert row_costs(b) == [2, 3]
    assert row_costs(Batch(meta={"prompt_token_ids": [[1, 2], [3]]})) == [2, 1]


def test_local_backend_with_workers_is_a_config_error():
    from alignflow.config import ResourcesConfig, RoleResources

    with pytest.raises(ConfigError, match="backend"):
        maybe_ray(ResourcesConfig(backend="local", actor=RoleResources(workers=2)))
    assert not maybe_ray(ResourcesConfig())
    assert maybe_ray(ResourcesConfig(actor=RoleResources(workers=2)))


# ----------------------------------------------------------------------------------------------- equivalence
def test_grpo_step_on_two_workers_equals_one_process(cluster, reviews_task, tmp_path):
    """Same prompts, same seed: the 2-worker (FSDP2, gloo) step samples the same responses (per-prompt sampling
    seeds), gets the same loss and leaves the same weights as the single-process step. The 2-worker run is
    launched the way a user does: ``alignflow rl --config x.yaml resources.actor.workers=2``."""
    import yaml

    from alignflow import cli
    from alignflow.config import to_dict

    cfg = _cfg(reviews_task, tmp_path / "local", 0)
    local = train_rl(cfg)
    preset = tmp_path / "grpo.yaml"
    preset.write_text(yaml.safe_dump(to_dict(cfg)))
    assert (
        cli.main(["rl", "--config", str(preset), "resources.actor.workers=2", f"train.output_dir={tmp_path / 'ray'}"])
        == 0
    )
    logged = [json.loads(line) for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    a, b = local.history[-1], next(e for e in logged if "policy/policy_loss" in e)
    for k in (
        "rollout/reward_mean",
        "rollout/response_len",
        "policy/policy_loss",
        "policy/kl_loss",
        "policy/grad_norm",
        "policy/entropy",
    ):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    _assert_same_weights(_weights(tmp_path / "local"), _weights(tmp_path / "ray"))
    arch = json.loads((tmp_path / "ray" / "model" / "config.json").read_text())["architectures"]
    assert arch == ["LlamaForCausalLM"]


def test_ppo_step_split_placement_equals_one_process(cluster, reviews_task, tmp_path):
    """PPO with a reward model, split placement: 2 actor workers, and the reference, the critic and the reward
    model each on their own worker set (1 worker). Same metrics and weights as one process; the critic is sharded
    and trained there too, and the reward model scores on its own worker."""
    from alignflow.config import ModelConfig
    from alignflow.models import load_reward_model, load_tokenizer

    rm_dir = tmp_path / "rm"  # a reward model with a seeded random score head (what matters is that it scores)
    rm = load_reward_model(ModelConfig(name_or_path=str(reviews_task.model_dir)), num_labels=1, seed=3)
    rm.save_pretrained(rm_dir)
    load_tokenizer(str(reviews_task.tokenizer_dir)).save_pretrained(rm_dir)
    common = dict(algo={"name": "ppo"}, reward={"task": {"gold": 1.0}, "models": [str(rm_dir)]})
    extra = dict(
        resources={
            "placement": "split",
            "actor": {"workers": 2},
            "ref": {"workers": 1},
            "critic": {"workers": 1},
            "reward": {"workers": 1},
            "backend": "ray",
        },
        **common,
    )
    local = train_rl(_cfg(reviews_task, tmp_path / "local", 0, **common))
    split = train_rl(_cfg(reviews_task, tmp_path / "split", 2, **extra))
    for k in ("rollout/reward_mean", "policy/policy_loss", "critic/value_loss", "policy/grad_norm", "critic/grad_norm"):
        assert split.history[-1][k] == pytest.approx(local.history[-1][k], rel=1e-4, abs=1e-6), k
    assert any(
        k.startswith("rollout/reward_") and k != "rollout/reward_mean" and k != "rollout/reward_gold_mean"
        for k in split.history[-1]
    )  # the reward model's own score was logged
    _assert_same_weights(_weights(tmp_path / "local"), _weights(tmp_path / "split"))


# ----------------------------------------------------------------------------------------------- recovery
def test_killed_worker_is_recreated_and_the_run_resumes(cluster, reviews_task, tmp_path, monkeypatch):
    """Kill rank 1 in the middle of step 2 (after generation, before the reference pass). The controller gets
    WorkerLost, recreates the workers, reloads the step-2 checkpoint and redoes step 2; the run log records it.
    Its final metrics and weights equal an uninterrupted run's (which equals any run restarted from the step-2
    checkpoint: resume is exact, tests/test_online_rl.py)."""
    real_prepare, state = online.prepare, {"killed": False}

    def killing_prepare(roles, batch, st, cfg, algo):
        if st.step == 2 and not state["killed"]:
            state["killed"] = True
            os.kill(roles.placement.sets["workers"].pids[1], signal.SIGKILL)
        return real_prepare(roles, batch, st, cfg, algo)

    steps = dict(train={"max_steps": 3, "save_every": 1})
    clean = train_rl(_cfg(reviews_task, tmp_path / "clean", 0, **steps))
    monkeypatch.setattr(online, "prepare", killing_prepare)
    killed = train_rl(_cfg(reviews_task, tmp_path / "killed", 2, **steps))
    assert state["killed"]
    assert len(killed.history) == 3
    for k in ("rollout/reward_mean", "policy/policy_loss", "policy/grad_norm"):
        assert killed.history[-1][k] == pytest.approx(clean.history[-1][k], rel=1e-4, abs=1e-6), k
    _assert_same_weights(_weights(tmp_path / "clean"), _weights(tmp_path / "killed"))
    events = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    lost = [e for e in events if "event/worker_lost" in e]
    assert len(lost) == 1 and lost[0]["event/failed_at_step"] == 2 and lost[0]["event/resumed_from_step"] == 2


def test_checkpoint_moves_between_two_and_one_workers(cluster, reviews_task, tmp_path):
    """A step-1 checkpoint written by 2 workers loads on 1 worker, which saves it again, which 2 workers load:
    the consolidated weights are the same each time."""
    from alignflow.distributed.ray_group import WorkerSet
    from alignflow.trainers.rl_algos import resolve
    from alignflow.trainers.rl_setup import build_worker_roles

    cfg = _cfg(reviews_task, tmp_path / "two", 2, train={"save_every": 1})
    train_rl(cfg)
    saved = _weights(tmp_path / "two")
    ckpt = tmp_path / "two" / "checkpoints" / "step-1"
    from alignflow.eval.frontier import load_policy, resolve_frontier

    assert [e["path"] for e in resolve_frontier([str(tmp_path / "two")])] == [
        str(ckpt),
        str(tmp_path / "two" / "model"),
    ]
    in_eval = load_policy(ckpt, str(reviews_task.model_dir), "cpu").state_dict()  # sharded -> one process
    _assert_same_weights(saved, {k: v for k, v in in_eval.items() if k in saved}, atol=0)

    def load_on(workers: int, path):
        c = dataclasses.replace(
            cfg,
            resources=dataclasses.replace(
                cfg.resources, actor=dataclasses.replace(cfg.resources.actor, workers=workers)
            ),
        )
        ws = WorkerSet("actor", workers, build_worker_roles, (c, resolve(c), 1, ("actor",)))
        try:
            actor = ws.group("actor")
            state = actor.load(path)
            weights = actor.state_dict()
            if workers == 1:
                actor.save(tmp_path / "one" / "step-1", {"step": state["step"]})
            return state, weights
        finally:
            ws.shutdown()

    state, on_one = load_on(1, ckpt)
    assert state["step"] == 1
    _assert_same_weights(saved, {k: v for k, v in on_one.items() if k in saved}, atol=0)
    _, back_on_two = load_on(2, tmp_path / "one" / "step-1")
    _assert_same_weights(saved, {k: v for k, v in back_on_two.items() if k in saved}, atol=0)


# ----------------------------------------------------------------------------------------------- DPO
def test_dpo_step_on_two_workers_equals_one_process(cluster, reviews_task, tmp_path):
    """Two DPO steps of 12 pairs: the 2-worker run (rows split by token count, loss divided by the rows over
    both ranks) reports the same losses and accuracies and ends with the same weights as one process."""
    from alignflow.config import POConfig, from_dict
    from alignflow.trainers.po import train_po

    rows = [json.loads(line) for line in reviews_task.sft_path.read_text().splitlines()[:25]]
    pairs = [
        {"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]}
        for a, b in zip(rows, rows[1:], strict=False)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))

    def run(out, workers):
        return train_po(
            from_dict(
                POConfig,
                {
                    "model": {
                        "name_or_path": str(reviews_task.model_dir),
                        "tokenizer": str(reviews_task.tokenizer_dir),
                    },
                    "data": {"path": str(path), "max_len": 64, "eval_fraction": 0.0},
                    "loss": {"name": "dpo"},
                    "optim": {"lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0},
                    "ref_cache": False,
                    "train": {
                        "output_dir": str(out),
                        "batch_size": 12,
                        "max_steps": 2,
                        "progress": False,
                        "micro_batch_tokens": 256,
                    },
                    "resources": {"actor": {"workers": workers}},
                },
            )
        )

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    for a, b in zip(one.history, two.history, strict=False):
        for k in ("loss", "pref/accuracy", "pref/margin", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    assert one.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 0
    start = load_file(str(reviews_task.model_dir / "model.safetensors"))
    moved = _weights(tmp_path / "one")
    assert any(not torch.equal(moved[k], start[k]) for k in moved if k in start)  # the steps changed the weights
    _assert_same_weights(moved, _weights(tmp_path / "two"))


# ----------------------------------------------------------------------------------------------- dispatch
class Probe:
    """A test role: ``work`` records when it ran (wall clock) and on which rank; ``rank_sum`` all-reduces."""

    def __init__(self, delay: float):
        import torch.distributed as dist

        self.delay, self.rank = delay, dist.get_rank()

    @staticmethod
    def build(delay: float) -> dict:
        return {"probe": Probe(delay)}

    def work(self, batch: Batch) -> Batch:
        import time

        start = time.time()
        time.sleep(self.delay)
        n = len(batch)
        return Batch(
            {
                "x": batch["x"] * 10,
                "rank": torch.full((n,), self.rank),
                "start": torch.full((n,), start, dtype=torch.float64),
                "end": torch.full((n,), time.time(), dtype=torch.float64),
            }
        )

    def rank_sum(self) -> float:
        from alignflow.distributed.groups import dp_sum

        return dp_sum(self.rank + 1)


def test_worker_sets_split_gather_and_overlap(cluster):
    """A split call cuts the batch across 2 ranks and returns rows in input order; an unmarked method without a
    batch runs on every rank (here an all-reduce: 1 + 2); calls started with submit on two worker sets run at the
    same time (their recorded intervals overlap)."""
    from alignflow.distributed.ray_group import WorkerSet

    a = WorkerSet("a", 2, Probe.build, (1.0,))
    b = WorkerSet("b", 1, Probe.build, (1.0,))
    try:
        batch = Batch({"x": torch.arange(5)})
        pa, pb = a.group("probe").submit("work", batch), b.group("probe").submit("work", batch)
        ra, rb = pa.result(), pb.result()
        assert ra["x"].tolist() == [0, 10, 20, 30, 40] and rb["x"].tolist() == [0, 10, 20, 30, 40]
        assert set(ra["rank"].tolist()) == {0, 1}  # both ranks got rows
        assert float(ra["start"].min()) < float(rb["end"].max()) and float(rb["start"].min()) < float(ra["end"].max())
        assert a.group("probe").rank_sum() == 3.0
    finally:
        a.shutdown()
        b.shutdown()
