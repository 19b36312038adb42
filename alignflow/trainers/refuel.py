"""``alignflow refuel``: multi-turn REFUEL from a config (docs/refuel.md).

The maths and the step are in :mod:`alignflow.trainers.refuel_multiturn` (roll-in, two branched rollouts,
the regression loss); this module is the command around them:

    model    = model.name_or_path, or the built-in task's tiny model warm-started on the counting dialogue
    rows     = data.path, or 64 counting-dialogue rows;  make_env = env.path (default: the simulated user)
    eval     : mean return of refuel.eval_episodes sampled episodes (seeded), before training
    for step in train.max_steps:  refuel_iteration(...)  -> metrics.jsonl (refuel/*)
                                  checkpoint every train.save_every steps and at the end
    eval again, export <output_dir>/model

Checkpoints (``<output_dir>/checkpoints/step-N``) hold the weights, the AdamW state, the schedule, the torch RNG
and the branch-turn RNG (``refuel_rng``); with ``train.resume=true`` the run goes on from the newest one and ends
with the weights an uninterrupted run ends with (every other input of a step -- its rows, its sampling seed --
is a function of the step number). A resumed run reuses the warm start it finds in ``<output_dir>/warm_start``.

Not supported yet: Ray worker sets, LoRA.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

import torch

from alignflow.config import ConfigError, RefuelConfig, SFTConfig, from_dict
from alignflow.config.refuel import COUNTING_USER
from alignflow.data.loading import load_records
from alignflow.distributed.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignflow.distributed.save import save_model
from alignflow.envs import counting_user
from alignflow.envs.base import load_env_factory
from alignflow.envs.multiturn import MultiTurnLimits, rollout_episodes
from alignflow.models import load_causal_lm
from alignflow.rollout.engine import HFEngine
from alignflow.rollout.sampling import SamplingParams
from alignflow.tasks import build_task
from alignflow.tasks.common import write_jsonl
from alignflow.trainers import loop
from alignflow.trainers.refuel_multiturn import RefuelSettings, refuel_iteration
from alignflow.trainers.run_dir import prepare_run_dir
from alignflow.trainers.run_start import start_run
from alignflow.trainers.sft import train_sft

log = logging.getLogger("alignflow.refuel")

EVAL_SEED = 11  # sampling seed of the evaluation episodes (the same episodes before and after training)


@dataclasses.dataclass
class RefuelResult:
    model: torch.nn.Module
    tokenizer: object
    history: list = dataclasses.field(default_factory=list)  # one metrics dict per REFUEL step
    eval: dict = dataclasses.field(default_factory=dict)  # after training
    evals: list = dataclasses.field(default_factory=list)  # (step, eval metrics) at 0 and at the end
    output_dir: Path = Path(".")


def check(cfg: RefuelConfig) -> None:
    """What the command refuses before any work (one line naming the key)."""
    if cfg.model.lora.enabled:
        raise ConfigError("model.lora.enabled: alignflow refuel trains the whole model; use model.lora.enabled=false")
    if not cfg.model.name_or_path and cfg.env.path != COUNTING_USER:
        raise ConfigError(
            f"model.name_or_path: the built-in warm start is for env.path={COUNTING_USER}; give a model for "
            f"env.path={cfg.env.path}"
        )
    if not cfg.data.path and cfg.env.path != COUNTING_USER:
        raise ConfigError(f"data.path: give the rows of env.path={cfg.env.path} (only the default has built-in rows)")


def warm_start(cfg: RefuelConfig) -> None:
    """model.name_or_path empty: the built-in task's tiny model, fine-tuned for ``warm_start.sft_steps`` steps on
    simulated counting dialogues (``<output_dir>/warm_start``); sets ``model.name_or_path`` and its tokenizer."""
    out = Path(cfg.train.output_dir)
    art = build_task(cfg.task.name, cfg.task, out / "task")
    cfg.model.tokenizer = cfg.model.tokenizer or str(art.tokenizer_dir)
    w = cfg.warm_start
    if w.sft_steps == 0:
        cfg.model.name_or_path = str(art.model_dir)
        return
    done = out / "warm_start" / "sft" / "model"
    if cfg.train.resume and latest_checkpoint(out) is not None and (done / "config.json").exists():
        log.info("warm start: resuming, so the warm start in %s is reused", done)
        cfg.model.name_or_path = str(done)
        return
    corpus = out / "warm_start" / "conversations.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    turns = int(cfg.env.kwargs.get("turns", 3))
    write_jsonl(
        corpus, counting_user.sft_conversations(w.conversations, turns=turns, right=w.right, seed=cfg.train.seed)
    )
    sft = from_dict(
        SFTConfig,
        {
            "model": {"name_or_path": str(art.model_dir), "tokenizer": str(art.tokenizer_dir)},
            "data": {"path": str(corpus), "max_len": 64, "eval_fraction": 0.0},
            "optim": {"lr": w.lr, "scheduler": "constant"},
            "train": {
                "output_dir": str(out / "warm_start" / "sft"),
                "batch_size": 32,
                "max_steps": w.sft_steps,
                "progress": cfg.train.progress,
                "seed": cfg.train.seed,
                "device": cfg.train.device,
                "num_threads": cfg.train.num_threads,
                "overwrite": True,
            },
        },
    )
    log.info("warm start: %d SFT steps on %d simulated counting dialogues", w.sft_steps, w.conversations)
    train_sft(sft)
    cfg.model.name_or_path = str(out / "warm_start" / "sft" / "model")


def load_rows(cfg: RefuelConfig) -> list[dict]:
    """The rows handed to the environment's reset: ``data.path`` (any format alignflow reads), else 64 counting
    dialogue rows."""
    if not cfg.data.path:
        return counting_user.make_rows(64, seed=cfg.train.seed)
    rows = []
    for where, value in load_records(cfg.data.path, cfg.data.split):
        if not isinstance(value, dict):
            raise ConfigError(f"data.path: {where}: a row must be an object with the environment's fields")
        rows.append(value)
    if not rows:
        raise ConfigError(f"data.path: {cfg.data.path} holds no rows")
    return rows


@torch.no_grad()
def evaluate(model, tok, make_env, rows: list[dict], cfg: RefuelConfig) -> dict:
    """``eval/return_mean``: the mean return of ``refuel.eval_episodes`` sampled episodes (rows cycled, seeded
    sampling, so the same episodes are drawn for the same weights), and ``eval/turns_mean``."""
    r = cfg.refuel
    picked = [rows[i % len(rows)] for i in range(r.eval_episodes)]
    was = model.training
    model.eval()
    trajs = rollout_episodes(
        HFEngine(model, tok),
        tok,
        [make_env() for _ in picked],
        picked,
        SamplingParams(n=1, temperature=r.temperature, max_new_tokens=r.max_new_tokens, seed=EVAL_SEED, logprobs=True),
        MultiTurnLimits(max_turns=r.horizon, max_total_tokens=r.max_total_tokens),
    )
    model.train(was)
    n = max(len(trajs), 1)
    return {"eval/return_mean": sum(t.reward for t in trajs) / n, "eval/turns_mean": sum(t.turns for t in trajs) / n}


def resume(out: Path, enabled: bool, model, opt, sched, rng: random.Random) -> int:
    """Restore the newest checkpoint's weights, optimiser, schedule, torch RNG and branch-turn RNG (through
    :func:`loop.resume`) when ``enabled``; the step to go on from (0 without a checkpoint)."""

    def load(ckpt: Path) -> dict:
        state = load_checkpoint(ckpt, model, opt, sched)
        version, inner, gauss = state["refuel_rng"]  # JSON turned the state's tuples into lists
        rng.setstate((version, tuple(inner), gauss))
        return state

    return int(loop.resume(out, enabled, load).get("step", 0))


def settings_of(cfg: RefuelConfig) -> RefuelSettings:
    """The step's settings from the config (``train.max_steps`` REFUEL steps)."""
    r = cfg.refuel
    return RefuelSettings(
        steps=cfg.train.max_steps,
        episodes_per_step=r.episodes_per_step,
        horizon=r.horizon,
        eta=r.eta,
        temperature=r.temperature,
        max_new_tokens=r.max_new_tokens,
        seed=cfg.train.seed,
        max_total_tokens=r.max_total_tokens,
        max_grad_norm=cfg.optim.max_grad_norm,
    )


def train_refuel(cfg: RefuelConfig) -> RefuelResult:
    """Run ``alignflow refuel`` as configured; returns the policy, per-step metrics and the evaluations (a resumed
    run's ``history`` holds the steps it ran, its ``evals`` only the final evaluation)."""
    check(cfg)
    make_env = load_env_factory(cfg.env.path, **cfg.env.kwargs)
    prepare_run_dir(cfg.train, check_only=True)  # refused before the warm start is trained
    if not cfg.model.name_or_path:
        warm_start(cfg)
    out, device, tok = start_run(cfg)
    rows = load_rows(cfg)
    model = load_causal_lm(cfg.model, device)
    settings = settings_of(cfg)
    opt = loop.build_optimizer(model, cfg.optim)
    sched = loop.build_scheduler(opt, cfg.optim, max(1, settings.steps))
    rng = random.Random(cfg.train.seed)
    start = resume(out, cfg.train.resume, model, opt, sched, rng)
    logger = loop.MetricsLogger(out, start=start, report_to=cfg.train.report_to)
    result = RefuelResult(model, tok, output_dir=out)
    if start == 0:  # a resumed run keeps the step-0 evaluation its first part logged
        result.evals.append((0, evaluate(model, tok, make_env, rows, cfg)))
        logger.log(0, result.evals[0][1])
    bar = loop.Progress(settings.steps, start, cfg.train.progress, "refuel")  # Ctrl-C: finish the step, checkpoint
    engine = HFEngine(model, tok)
    for step in range(start, settings.steps):
        m = refuel_iteration(model, tok, engine, opt, make_env, rows, settings, step, rng)
        sched.step()
        m = {f"refuel/{k}": v for k, v in m.items()} | {"refuel/lr": sched.get_last_lr()[0]}
        result.history.append(m)
        bar.update(0, ret=m["refuel/episode_return_mean"])
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == settings.steps:
            logger.log(step + 1, m)
        state = {"step": step + 1, "refuel_rng": rng.getstate()}
        save = lambda path, st=state: save_checkpoint(path, model, opt, sched, st)  # noqa: E731
        loop.checkpoint_step(step + 1, settings.steps, cfg.train, out, save)
    bar.close()
    result.eval = evaluate(model, tok, make_env, rows, cfg)
    result.evals.append((settings.steps, result.eval))
    logger.log(settings.steps, result.eval)
    logger.close()
    model.eval()
    save_model(model, tok, out / "model")
    return result
