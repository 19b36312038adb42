"""Multi-turn episodes in ``alignflow rl``: the rollout source the controller uses when ``env.task`` or
``env.path`` is set (see ``docs/multiturn_rl.md``).

The controller (:mod:`alignflow.trainers.rl`) picks its rollout source and its evaluation from a table keyed
by :func:`mode`; in ``"episodes"`` mode one RL step is::

    prompts = next prompts_per_step rows;  envs = rollout.n fresh environments per row
    trajs   = rollout_episodes(engine, tokenizer, envs, rows)      turn by turn, all episodes batched per turn
    batch   = trajectories_to_batch(trajs)                         loss mask on the model's own tokens only
    scores  = each episode's return (sum of its per-turn rewards; the last one is the final reward)

and the rest of the step (reference and old log-probs, advantages, updates) is unchanged: the response of a
row is everything after the first prompt (model turns and observations), the loss and every per-token statistic
use ``response_mask`` (the model's tokens), and the forward passes attend to every response token.

Every estimator sees the episode's return as the sequence score; group estimators (GRPO, RLOO, ...) compare the
``rollout.n`` episodes of one row. The per-turn rewards are kept in the trajectories file and the metrics
(``episode/turn_reward_mean`` over the non-final turns, ``episode/final_reward_mean``), not spread over tokens.

Rewards come from the environment; ``reward.*`` sources are not used in this mode. ``rollout.async_steps`` = k
runs the episodes of step t + k in the asynchronous rollout thread on its copy of the policy while step t trains
(:func:`produce_episodes`; the version contract of docs/async.md). Not supported here (a ConfigError names the
key): ReMax's greedy baseline, DAPO's dynamic sampling and overlong shaping.

The episodes run inside the rollout role (``Rollout.with_engine`` calls :func:`episodes_on_engine` there), which
holds the actor's current weights for all of a step's turns: with ``rollout.backend: vllm`` they are pushed to
the engine once before the first turn and the engine sleeps once after the last, so its prefix cache lets a turn
reuse the conversation so far (``rollout.enable_prefix_caching``, docs/vllm.md). With roles on Ray worker sets
(``resources``) the prompt rows are split across the rollout role's workers, each runs its rows' episodes (the
environments are built there), and the trajectories come back as one batch in row order for the actor set.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig
from alignflow.envs.base import load_env_factory
from alignflow.envs.multiturn import (
    CACHED_TOKENS_KEY,
    PROMPT_TOKENS_KEY,
    MultiTurnLimits,
    episode_metrics,
    rollout_episodes,
    trajectories_to_batch,
    write_trajectories,
)
from alignflow.rollout.sampling import SamplingParams
from alignflow.tasks import TASKS, get_task

log = logging.getLogger("alignflow.rl")

TRAJECTORIES = "trajectories.jsonl"
TRAJ_META = "trajectory"  # meta column of a produced episode batch: each row's Trajectory (taken off before training)


def mode(cfg: RLConfig) -> str:
    """``"episodes"`` when the run has an environment (``env.task`` or ``env.path``), else ``"single"``."""
    return "episodes" if cfg.env.task or cfg.env.path else "single"


def check(cfg: RLConfig) -> None:
    """Refuse, before any work, what multi-turn episodes do not support; ConfigError names the key."""
    if mode(cfg) == "single":
        return
    if cfg.env.task and cfg.env.path:
        raise ConfigError("env.task and env.path both name an environment; set one of them")
    if cfg.env.task:
        if get_task(cfg.task.name).make_env is None:
            with_env = [n for n, spec in TASKS.items() if spec.make_env is not None]
            raise ConfigError(
                f"env.task: task '{cfg.task.name}' has no environment; task.name must be one of "
                f"{', '.join(with_env)} (or give env.path)"
            )
    refused = [
        ("algo.name", cfg.algo.name == "remax", "an algorithm without ReMax's greedy baseline"),
        ("dapo.dynamic_sampling", cfg.dapo.dynamic_sampling, "false"),
        ("dapo.overlong_penalty", cfg.dapo.overlong_penalty, "false"),
    ]
    for key, bad, valid in refused:
        if bad:
            raise ConfigError(f"{key}: multi-turn episodes (env.*) need {key}={valid}")


def env_factory(cfg: RLConfig):
    """A factory of fresh environments: the built-in task's (``env.task``) or ``env.path`` with ``env.kwargs``."""
    if cfg.env.task:
        make = get_task(cfg.task.name).make_env
        return lambda: make(**cfg.env.kwargs)
    return load_env_factory(cfg.env.path, **cfg.env.kwargs)


EPISODE_ROW = "episode_row"  # meta column of the prompts sent to the rollout role: each row's place in the call


def _rows(prompts: Batch, n: int) -> list[dict]:
    """One row dict per episode: each prompt row's fields (not its token ids), repeated ``n`` times."""
    keys = [k for k in prompts.meta if k not in ("prompt_token_ids", "group", EPISODE_ROW)]
    rows = [{k: prompts.meta[k][i] for k in keys if prompts.meta[k][i] is not None} for i in range(len(prompts))]
    return [row for row in rows for _ in range(n)]


def episodes_on_engine(
    engine, tokenizer, prompts: Batch, cfg: RLConfig, n: int, greedy: bool, seed: int | None
) -> Batch:
    """Runs where the rollout role is (``Rollout.with_engine``: this process or a Ray worker of the actor's set):
    ``n`` episodes per prompt row on ``engine``, one ``generate`` per turn. Returns the training batch with
    ``scores`` (the returns), meta group / prompt / response (the last assistant message) and the trajectories
    in meta ``TRAJ_META``. Episode e of prompt row r (``EPISODE_ROW``, its place among all the call's rows) is
    keyed ``seed * 1_000_003 + (r * n + e) * 7_919``: the same samples whichever worker runs it."""
    rows = _rows(prompts, n)
    make = env_factory(cfg)
    envs = [make() for _ in rows]
    r = cfg.rollout
    keys = None
    if seed is not None:
        keys = [seed * 1_000_003 + (int(row) * n + e) * 7_919 for row in prompts[EPISODE_ROW] for e in range(n)]
    params = SamplingParams(
        n=1,
        temperature=0.0 if greedy else r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        logprobs=True,
        seeds=keys,
    )
    limits = MultiTurnLimits(max_turns=cfg.env.max_turns, max_total_tokens=cfg.env.max_tokens)
    trajs = rollout_episodes(engine, tokenizer, envs, rows, params, limits)
    batch = trajectories_to_batch(trajs, tokenizer.pad_token_id)
    last = [next((m["content"] for m in reversed(t.messages) if m["role"] == "assistant"), "") for t in trajs]
    return batch.union(
        Batch(
            {"scores": torch.tensor([t.reward for t in trajs], dtype=torch.float32)},
            {
                "group": [g for g in prompts["group"] for _ in range(n)],
                "prompt": [row.get("prompt") for row in rows],
                "response": last,
                TRAJ_META: trajs,
            },
        )
    )


def run_episodes(roles, prompts: Batch, cfg: RLConfig, n: int, greedy: bool, seed: int | None):
    """``n`` episodes per prompt row with the rollout role's engine, which holds the actor's current weights for
    all the turns (vLLM: pushed once, slept once; Ray: the rows split across the workers); returns
    (trajectories, batch, seconds)."""
    prompts = prompts.union(Batch(meta={EPISODE_ROW: list(range(len(prompts)))}))
    t0 = time.perf_counter()
    batch = roles.rollout.with_engine(prompts, episodes_on_engine, cfg, n, greedy, seed)
    secs = time.perf_counter() - t0
    trajs = batch.meta.pop(TRAJ_META)
    return trajs, batch, secs


def turn_metrics(trajs) -> dict:
    """Per-turn rewards: ``episode/final_reward_mean`` (last turn) and ``episode/turn_reward_mean`` (earlier
    turns; absent when every episode has one turn). With an engine that reports prefix-cache hits (vLLM):
    ``prefix_cache/hit_frac``, the share of the prompt tokens sent over all turns that came from the cache."""
    finals = [t.turn_rewards[-1] for t in trajs if t.turn_rewards]
    earlier = [r for t in trajs for r in t.turn_rewards[:-1]]
    out = {"episode/final_reward_mean": sum(finals) / max(len(finals), 1)}
    if earlier:
        out["episode/turn_reward_mean"] = sum(earlier) / len(earlier)
    sent = sum(t.info.get(PROMPT_TOKENS_KEY, 0.0) for t in trajs)
    if sent:
        out["prefix_cache/hit_frac"] = sum(t.info.get(CACHED_TOKENS_KEY, 0.0) for t in trajs) / sent
    return out


def produce_episodes(roles, prompts: Batch, cfg: RLConfig, step: int) -> tuple[Batch, float]:
    """The episodes of RL step ``step`` for ``prompts`` (what the asynchronous rollout thread runs on its copy of
    the policy, rl_async.py): the batch, with its trajectories in meta ``TRAJ_META``, and the generation seconds.
    The sampling seed is the step's, as in a synchronous step."""
    trajs, batch, secs = run_episodes(roles, prompts, cfg, cfg.rollout.n, False, cfg.train.seed * 1_000_003 + step)
    return batch.union(Batch(meta={TRAJ_META: trajs})), secs


def collect_episodes(roles, st, cfg: RLConfig, tally=None) -> tuple[Batch, dict]:
    """The rollout source of ``"episodes"`` mode (same contract as ``online.collect_rollouts``); with
    asynchronous rollouts the step's episodes were run ``rollout.async_steps`` steps ago, on the rollout copy."""
    waits: dict = {}
    if st.pipeline is not None:
        batch, secs, waits = st.pipeline.take(st.step)
    else:
        batch, secs = produce_episodes(roles, st.prompts.take(cfg.rollout.prompts_per_step), cfg, st.step)
    trajs = batch.meta.pop(TRAJ_META)
    keep = len(trajs) if cfg.env.save_trajectories < 0 else cfg.env.save_trajectories
    if keep:
        write_trajectories(Path(cfg.train.output_dir) / TRAJECTORIES, trajs[:keep], step=st.step)
    m = episode_metrics(trajs) | turn_metrics(trajs)
    m |= {
        "perf/gen_s": secs,
        "rollout/reward_mean": float(batch["scores"].mean()),
        "rollout/response_len": float(batch["response_mask"].sum(-1).float().mean()),
        "rollout/truncated_frac": sum(t.finish in ("length", "max_tokens") for t in trajs) / len(trajs),
    }
    return batch, m | waits


@torch.no_grad()
def evaluate_episodes(roles, prompts: Batch, gold, cfg: RLConfig) -> dict:
    """Greedy episodes on the held-out rows: ``eval/reward_mean`` (the mean return) and the episode metrics
    with an ``eval/`` prefix (``eval/episode/turns_mean``, ``eval/tools/call_success``, ...)."""
    if not len(prompts):
        return {}
    trajs, batch, _ = run_episodes(roles, prompts, cfg, 1, True, None)
    m = {
        "eval/reward_mean": float(batch["scores"].mean()),
        "eval/response_len": float(batch["response_mask"].sum(-1).float().mean()),
    }
    return m | {f"eval/{k}": v for k, v in (episode_metrics(trajs) | turn_metrics(trajs)).items()}
