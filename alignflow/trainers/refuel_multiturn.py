"""Multi-turn REFUEL (Gao et al. 2024, "Regressing the Relative Future"): one policy step is

    h ~ U{1..H} per episode;  roll in with the current policy for h-1 turns (state s_h: the conversation so far)
    two rollouts y, y' from s_h to the end (copies of the environment, so the simulated user answers each)
    Q(y) = sum of the rewards of turns h..H of y;  lr(y) = log pi_theta(y | s_h) - log pi_t(y | s_h)
    loss = mean over pairs of ( lr(y) - lr(y') - eta * (Q(y) - Q(y')) )^2

``log pi(y | s_h)`` sums the log-probs of the model's own tokens after the branch point (the user's tokens are
the environment's, not the policy's); ``pi_t`` is the policy that sampled the pair, scored before the update.
``eta`` scales the rewards as in the single-turn loss (``refuel_loss``: ``(h - eta * dQ)^2``).

    pairs = branch_rollouts(engine, tokenizer, envs, rows, params, horizon=3, rng=random.Random(0))
    stats = refuel_step(model, optimizer, pairs, eta=1.0)
    result = train_refuel(model, tokenizer, make_env, rows, RefuelSettings(steps=20))

The command ``alignflow refuel`` (:mod:`alignflow.trainers.refuel`) runs :func:`refuel_iteration` from a config.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import torch

from alignflow.envs.multiturn import (
    ChatTurns,
    MultiTurnLimits,
    Trajectory,
    _generate_turn,
    _step_episode,
)
from alignflow.models.sequences import sequence_logps
from alignflow.rollout.engine import HFEngine
from alignflow.rollout.sampling import SamplingParams


@dataclasses.dataclass
class Branch:
    """One of the two rollouts of a pair: the whole episode and where the branch began."""

    traj: Trajectory
    start_token: int  # tokens before the branch point (s_h)
    start_turn: int  # assistant turns before the branch point (h - 1)

    @property
    def future_return(self) -> float:
        return float(sum(self.traj.turn_rewards[self.start_turn :]))

    def loss_mask(self) -> list[int]:
        """The model's own tokens after the branch point."""
        return [m if i >= self.start_token else 0 for i, m in enumerate(self.traj.loss_mask)]


def pair_loss(
    lr_a: torch.Tensor, lr_b: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor, eta: float = 1.0
) -> torch.Tensor:
    """``mean((lr_a - lr_b - eta * (q_a - q_b))^2)`` over pairs: (P,) log-ratios and future returns -> scalar."""
    return ((lr_a - lr_b - eta * (q_a - q_b)) ** 2).mean()


def _run_turns(engine, tokenizer, trajs, envs, turns, active, params, limits, stop_at):
    """Turn by turn for the ``active`` episodes until each has ``stop_at[i]`` turns or ends; True = still going."""
    going = {i: True for i in active}
    turn = 0
    active = [i for i in active if trajs[i].turns < stop_at[i]]
    while active:
        results = _generate_turn(engine, trajs, active, params, limits, turn)
        for i, ids, lps, reason in results:
            going[i] = _step_episode(trajs[i], envs[i], ids, lps, reason, turns[i], tokenizer, limits)
        active = [i for i in active if going[i] and trajs[i].turns < stop_at[i]]
        turn += 1
    return going


def branch_rollouts(
    engine,
    tokenizer,
    envs: list,
    rows: list[dict],
    params: SamplingParams,
    horizon: int,
    rng: random.Random,
    max_total_tokens: int = 512,
) -> tuple[list[tuple[Branch, Branch]], int]:
    """Roll in each episode for h-1 turns (h uniform in 1..``horizon``), then two rollouts to the end from copies
    of its state. Returns the pairs and the number of episodes that ended during the roll-in (no pair)."""
    limits = MultiTurnLimits(max_turns=horizon, max_total_tokens=max_total_tokens)
    turns = [ChatTurns(tokenizer, getattr(env, "tools", None)) for env in envs]
    trajs = []
    for env, row, t in zip(envs, rows, turns, strict=True):
        messages = env.reset(row)
        ids = t.first(messages)
        trajs.append(Trajectory(list(messages), ids, [0] * len(ids), [0.0] * len(ids), len(ids)))
    h = [rng.randint(1, horizon) for _ in envs]
    going = _run_turns(
        engine, tokenizer, trajs, envs, turns, list(range(len(envs))), params, limits, [k - 1 for k in h]
    )
    live = [i for i in range(len(envs)) if going[i]]
    b_trajs, b_envs, b_turns, starts = [], [], [], []
    for i in live:
        for _ in range(2):
            b_trajs.append(copy.deepcopy(trajs[i]))
            b_envs.append(copy.deepcopy(envs[i]))
            b_turns.append(turns[i])
            starts.append((len(trajs[i].token_ids), trajs[i].turns))
    _run_turns(
        engine, tokenizer, b_trajs, b_envs, b_turns, list(range(len(b_trajs))), params, limits, [horizon] * len(b_trajs)
    )
    branches = [Branch(t, s, k) for t, (s, k) in zip(b_trajs, starts, strict=True)]
    return [(branches[2 * j], branches[2 * j + 1]) for j in range(len(live))], len(envs) - len(live)


def refuel_step(
    model, optimizer, pairs: list[tuple[Branch, Branch]], eta: float = 1.0, max_grad_norm: float = 0.0
) -> dict:
    """One regression step on the pairs: pi_t's log-probs (no grad, before the update), then the loss and an
    optimiser step (gradient norm clipped to ``max_grad_norm`` when > 0). Returns ``loss``,
    ``future_return_mean``, ``abs_return_gap`` (mean |Q(y) - Q(y')|) and ``grad_norm``."""
    device = next(model.parameters()).device
    seqs = [(b.traj.token_ids, b.loss_mask()) for pair in pairs for b in pair]
    with torch.no_grad():
        old = sequence_logps(model, seqs, device)["logps"]  # (2P,)
    new = sequence_logps(model, seqs, device)["logps"]  # (2P,), with grad
    q = torch.tensor([b.future_return for pair in pairs for b in pair], device=device)  # (2P,)
    lr = new - old
    loss = pair_loss(lr[0::2], lr[1::2], q[0::2], q[1::2], eta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
    optimizer.step()
    return {
        "loss": loss.item(),
        "grad_norm": float(norm),
        "future_return_mean": float(q.mean()),
        "abs_return_gap": float((q[0::2] - q[1::2]).abs().mean()),
    }


@dataclasses.dataclass
class RefuelSettings:
    steps: int = 20
    episodes_per_step: int = 32  # roll-ins per step (two rollouts each)
    horizon: int = 3  # H: assistant turns per episode
    eta: float = 1.0
    lr: float = 1e-3
    temperature: float = 1.0
    max_new_tokens: int = 4
    seed: int = 0
    max_total_tokens: int = 512  # tokens per episode at most
    max_grad_norm: float = 0.0  # 0: no clipping


def refuel_iteration(
    model, tokenizer, engine, optimizer, make_env, rows: list[dict], s: RefuelSettings, step: int, rng
):
    """REFUEL step ``step``: roll-ins on the next ``s.episodes_per_step`` rows (cycled), the pairs, one update.
    Metrics: ``loss``, ``future_return_mean``, ``abs_return_gap``, ``grad_norm``, ``rollin_ended`` and
    ``episode_return_mean`` (the mean return of the whole branched episodes)."""
    batch = [rows[(step * s.episodes_per_step + k) % len(rows)] for k in range(s.episodes_per_step)]
    params = SamplingParams(
        n=1, temperature=s.temperature, max_new_tokens=s.max_new_tokens, logprobs=True, seed=s.seed * 1_000_003 + step
    )
    model.eval()
    with torch.no_grad():
        pairs, ended = branch_rollouts(
            engine, tokenizer, [make_env() for _ in batch], batch, params, s.horizon, rng, s.max_total_tokens
        )
    model.train()
    m = refuel_step(model, optimizer, pairs, s.eta, s.max_grad_norm) if pairs else {}
    m["rollin_ended"] = float(ended)
    m["episode_return_mean"] = sum(b.traj.reward for p in pairs for b in p) / max(2 * len(pairs), 1)
    return m


def train_refuel(model, tokenizer, make_env, rows: list[dict], s: RefuelSettings) -> list[dict]:
    """``s.steps`` REFUEL steps on ``rows`` (cycled) against environments from ``make_env``; per-step metrics
    (``loss``, ``future_return_mean``, ``abs_return_gap``, ``rollin_ended``, ``episode_return_mean``: the mean
    return of the whole branched episodes)."""

    rng = random.Random(s.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr)
    engine = HFEngine(model, tokenizer)
    history = [refuel_iteration(model, tokenizer, engine, optimizer, make_env, rows, s, t, rng) for t in range(s.steps)]
    model.eval()
    return history
