"""Multi-turn rollouts: episodes against environments, one engine ``generate`` call per turn.

    trajs = rollout_episodes(engine, tokenizer, [make_env() for _ in rows], rows, params,
                             MultiTurnLimits(max_turns=4, max_total_tokens=512))
    batch = trajectories_to_batch(trajs, pad_id)        # for a training forward
    write_trajectories(run_dir / "trajectories.jsonl", trajs, step=0)
    metrics = episode_metrics(trajs)

Each episode keeps one token sequence: the first prompt (the chat template over ``env.reset(row)``, with the
environment's ``tools`` and the generation prompt), then per turn the model's own tokens exactly as sampled
(loss mask 1) followed by the observation tokens (loss mask 0). Earlier turns are never re-tokenised, so a
training forward over the sequence sees exactly what the sampler saw. The observation tokens come from the chat
template: ``template(x, y) -> P`` and ``template(x, y, *observations, generation prompt) -> F`` on a fixed
two-message conversation; ``F`` must start with ``P`` (a template that re-renders earlier turns differently is
an error), and the observation tokens are what the template puts after the end-of-turn token in ``P`` plus
``F[len(P):]``.

An episode ends when the environment says ``done``, after ``max_turns`` assistant turns, when a turn is cut
off by ``max_new_tokens`` (``finish="length"``: the environment still scores that message, then the episode
ends, since an unfinished turn cannot be followed by another), or when the next turn would not fit in
``max_total_tokens`` (``finish="max_tokens"``; the observation that did not fit is not appended).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError
from alignflow.envs.base import check_step
from alignflow.rollout.sampling import SamplingParams
from alignflow.rollout.vllm_engine import CACHED_TOKENS

PROMPT_TOKENS_KEY, CACHED_TOKENS_KEY = "prefix_cache/prompt_tokens", "prefix_cache/cached_tokens"  # Trajectory.info

FINISHES = ("done", "max_turns", "length", "max_tokens")


@dataclasses.dataclass
class MultiTurnLimits:
    max_turns: int = 4
    max_total_tokens: int = 1024

    def __post_init__(self):
        for name in ("max_turns", "max_total_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"multi-turn limit {name}: must be an integer >= 1, got {value!r}")


@dataclasses.dataclass
class Trajectory:
    """One episode: its messages, its token sequence with the loss mask and sampling log-probs, its rewards."""

    messages: list
    token_ids: list
    loss_mask: list
    logprobs: list
    prompt_len: int
    turn_rewards: list = dataclasses.field(default_factory=list)
    finish: str = ""
    tool_calls: int = 0
    tool_errors: int = 0
    info: dict = dataclasses.field(default_factory=dict)  # sums of the other numbers in the steps' info dicts

    @property
    def turns(self) -> int:
        return len(self.turn_rewards)

    @property
    def reward(self) -> float:
        """The episode's return: the sum of its per-turn rewards (the last one is the final reward)."""
        return float(sum(self.turn_rewards))


class ChatTurns:
    """Token ids of a conversation's first prompt and of the observations between turns (see the module doc)."""

    def __init__(self, tokenizer, tools=None, **template_kwargs):
        self.tok, self.tools, self.kw = tokenizer, tools or None, template_kwargs
        self._closing: dict = {}

    def render(self, messages: list, generation_prompt: bool) -> list[int]:
        out = self.tok.apply_chat_template(
            messages,
            tools=self.tools,
            add_generation_prompt=generation_prompt,
            tokenize=True,
            return_dict=False,
            **self.kw,
        )
        return list(out["input_ids"] if isinstance(out, dict) else out)

    def first(self, messages: list) -> list[int]:
        return self.render(messages, True)

    def observation(self, observations: list, end_id) -> list[int]:
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        prefix, full = self.render(base, False), self.render(base + observations, True)
        if full[: len(prefix)] != prefix:
            raise ValueError(
                "the chat template renders the earlier turns differently once messages are appended; "
                "multi-turn rollouts need a template where appending messages only appends tokens"
            )
        closing = prefix[len(prefix) - prefix[::-1].index(end_id) :] if end_id in prefix else []
        return closing + full[len(prefix) :]


def _episode_keys(params: SamplingParams, episodes: int) -> list[int] | None:
    """Each episode's seed key: ``params.seeds[e]`` (one per episode), else ``seed * 1_000_003 + e * 7_919``."""
    if params.seeds is not None:
        if len(params.seeds) != episodes:
            raise ValueError(f"rollout_episodes: {len(params.seeds)} seeds for {episodes} episodes (one each)")
        return [int(s) for s in params.seeds]
    if params.seed is None:
        return None
    return [params.seed * 1_000_003 + e * 7_919 for e in range(episodes)]


def _turn_seeds(keys, episodes: list[int], turn: int) -> list[int] | None:
    if keys is None:
        return None
    return [(keys[e] + turn) % (2**31 - 1) for e in episodes]


def _generate_turn(engine, trajs, active, params: SamplingParams, limits: MultiTurnLimits, turn: int):
    """One ``generate`` over the active conversations' token ids: one sample each, with sampling log-probs, the
    episode's own seed for this turn, and at most ``min(max_new_tokens, room left)`` new tokens per row. An
    engine with ``per_prompt_max_new_tokens`` (vLLM) gets each row's cap; otherwise the largest cap is shared
    and a row that went past its own room is cut back to it here (finish "length") -- the same tokens. When the
    engine reports prefix-cache hits (vLLM's ``num_cached_tokens``), each episode's ``info`` adds up the prompt
    tokens it sent and those found in the cache (``prefix_cache/prompt_tokens``, ``prefix_cache/cached_tokens``)."""
    room = [limits.max_total_tokens - len(trajs[i].token_ids) for i in active]
    caps = [max(1, min(params.max_new_tokens, r)) for r in room]
    seeds = _turn_seeds(_episode_keys(params, len(trajs)), active, turn)
    turn_params = dataclasses.replace(params, n=1, logprobs=True, max_new_tokens=max(caps), seed=None, seeds=seeds)
    per_row = {"max_new_tokens": caps} if getattr(engine, "per_prompt_max_new_tokens", False) else {}
    out = engine.generate([trajs[i].token_ids for i in active], turn_params, **per_row)
    results, cached = [], out.meta.get(CACHED_TOKENS)
    for row, i in enumerate(active):
        if cached is not None and cached[row] is not None:
            info = trajs[i].info
            info[PROMPT_TOKENS_KEY] = info.get(PROMPT_TOKENS_KEY, 0.0) + len(trajs[i].token_ids)
            info[CACHED_TOKENS_KEY] = info.get(CACHED_TOKENS_KEY, 0.0) + float(cached[row])
        mask = out["response_mask"][row].bool()
        ids = out["response_ids"][row][mask].tolist()
        lps = out["sampling_logprobs"][row][mask].tolist()
        reason = out["finish_reason"][row]
        if len(ids) > room[row]:  # the shared max_new_tokens let this row past its own room
            ids, lps, reason = ids[: room[row]], lps[: room[row]], "length"
        results.append((i, ids, lps, reason))
    return results


def _step_episode(traj: Trajectory, env, ids, lps, reason, turns: ChatTurns, tokenizer, limits) -> bool:
    """Append one turn to ``traj``; True while the episode goes on."""
    traj.token_ids += ids
    traj.loss_mask += [1] * len(ids)
    traj.logprobs += lps
    text = tokenizer.decode(ids, skip_special_tokens=True)
    message = {"role": "assistant", "content": text}
    obs, reward, done, info = check_step(env.step(message), env)
    traj.messages += [message] + obs
    traj.turn_rewards.append(reward)
    traj.tool_calls += int(info.get("tool_calls", 0))
    traj.tool_errors += int(info.get("tool_errors", 0))
    for key, value in info.items():
        if key not in ("tool_calls", "tool_errors") and isinstance(value, (int, float)) and not isinstance(value, bool):
            traj.info[key] = traj.info.get(key, 0.0) + float(value)
    if done or reason == "length" or traj.turns >= limits.max_turns:
        traj.finish = "done" if done else "length" if reason == "length" else "max_turns"
        return False
    extra = turns.observation(obs, ids[-1])
    if len(traj.token_ids) + len(extra) >= limits.max_total_tokens:
        traj.finish = "max_tokens"
        return False
    traj.token_ids += extra
    traj.loss_mask += [0] * len(extra)
    traj.logprobs += [0.0] * len(extra)
    return True


def rollout_episodes(
    engine,
    tokenizer,
    envs: list,
    rows: list[dict],
    params: SamplingParams,
    limits: MultiTurnLimits | None = None,
    **template_kwargs,
) -> list[Trajectory]:
    """Run one episode per (environment, row) pair, all episodes' turns batched into one ``generate`` per turn.

    ``params.seed`` (when set) seeds each episode's turn with its own derived seed, so an episode does not depend
    on the others in the batch; ``params.seeds`` (one key per episode) replaces it, so that an episode's samples
    do not depend on its position either (episodes split across workers). ``template_kwargs`` go to
    ``apply_chat_template``.
    """
    limits = limits or MultiTurnLimits()
    if len(envs) != len(rows):
        raise ValueError(f"rollout_episodes: {len(envs)} environments for {len(rows)} rows (one each)")
    turns = [ChatTurns(tokenizer, getattr(env, "tools", None), **template_kwargs) for env in envs]
    trajs = []
    for env, row, t in zip(envs, rows, turns, strict=True):
        messages = env.reset(row)
        ids = t.first(messages)
        trajs.append(Trajectory(list(messages), ids, [0] * len(ids), [0.0] * len(ids), len(ids)))
    active = [i for i, tr in enumerate(trajs) if len(tr.token_ids) < limits.max_total_tokens]
    for i in set(range(len(trajs))) - set(active):
        trajs[i].finish = "max_tokens"
    turn = 0
    while active:
        results = _generate_turn(engine, trajs, active, params, limits, turn)
        active = [
            i
            for i, ids, lps, reason in results
            if _step_episode(trajs[i], envs[i], ids, lps, reason, turns[i], tokenizer, limits)
        ]
        turn += 1
    return trajs


def trajectories_to_batch(trajs: list[Trajectory], pad_id: int) -> Batch:
    """A training Batch: ``prompt_ids``/``prompt_mask`` (B, Tp) left-padded first prompts; ``response_ids``
    (B, Tr) right-padded rest of each episode; ``response_mask`` 1 on the model's own tokens only (the loss
    mask); ``response_attention`` 1 on every real response token (model and observation); ``input_ids``,
    ``attention_mask`` (= cat(prompt_mask, response_attention)), ``position_ids`` (cumsum - 1, 0 on padding),
    ``sampling_logprobs`` (B, Tr), 0 off the model's tokens; meta ``reward`` (the return), ``turn_rewards``,
    ``turns``, ``finish``, ``tool_calls``, ``tool_errors``."""
    tp = max(t.prompt_len for t in trajs)
    tr = max(max(len(t.token_ids) - t.prompt_len for t in trajs), 1)
    b = len(trajs)
    prompt_ids = torch.full((b, tp), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, tp), dtype=torch.long)
    resp_ids = torch.full((b, tr), pad_id, dtype=torch.long)
    resp_mask, resp_att = torch.zeros((b, tr), dtype=torch.long), torch.zeros((b, tr), dtype=torch.long)
    lps = torch.zeros((b, tr))
    for i, t in enumerate(trajs):
        p, n = t.prompt_len, len(t.token_ids) - t.prompt_len
        prompt_ids[i, tp - p :] = torch.tensor(t.token_ids[:p])
        prompt_mask[i, tp - p :] = 1
        if n:
            resp_ids[i, :n] = torch.tensor(t.token_ids[p:])
            resp_mask[i, :n] = torch.tensor(t.loss_mask[p:])
            resp_att[i, :n] = 1
            lps[i, :n] = torch.tensor(t.logprobs[p:])
    attention = torch.cat([prompt_mask, resp_att], 1)
    return Batch(
        tensors={
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "response_ids": resp_ids,
            "response_mask": resp_mask,
            "response_attention": resp_att,
            "input_ids": torch.cat([prompt_ids, resp_ids], 1),
            "attention_mask": attention,
            "position_ids": (attention.cumsum(1) - 1).clamp(min=0) * attention,
            "sampling_logprobs": lps,
        },
        meta={
            "reward": [t.reward for t in trajs],
            "turn_rewards": [list(t.turn_rewards) for t in trajs],
            "turns": [t.turns for t in trajs],
            "finish": [t.finish for t in trajs],
            "tool_calls": [t.tool_calls for t in trajs],
            "tool_errors": [t.tool_errors for t in trajs],
        },
    )


def episode_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """``episode/turns_mean``, ``episode/return_mean``, ``episode/model_tokens_mean``, ``episode/finish_<f>``
    (share of episodes), ``tools/calls_per_episode`` and ``tools/call_success`` (good calls / calls; absent
    without calls). Other numbers the environment put in ``info``: keys with a ``/`` (``sandbox/failures_timeout``)
    are summed over the episodes, the others averaged per episode as ``env/<key>``."""
    n = max(len(trajs), 1)
    out = {
        "episode/turns_mean": sum(t.turns for t in trajs) / n,
        "episode/return_mean": sum(t.reward for t in trajs) / n,
        "episode/model_tokens_mean": sum(sum(t.loss_mask) for t in trajs) / n,
    }
    for f in FINISHES:
        out[f"episode/finish_{f}"] = sum(t.finish == f for t in trajs) / n
    calls = sum(t.tool_calls for t in trajs)
    out["tools/calls_per_episode"] = calls / n
    if calls:
        out["tools/call_success"] = 1.0 - sum(t.tool_errors for t in trajs) / calls
    for key in sorted({k for t in trajs for k in t.info}):
        total = sum(t.info.get(key, 0.0) for t in trajs)
        out[key if "/" in key else f"env/{key}"] = total if "/" in key else total / n
    return out


def write_trajectories(path, trajs: list[Trajectory], step: int = 0) -> None:
    """Append one JSON object per episode to ``path`` (``trajectories.jsonl`` in a run directory): step,
    messages, per-turn rewards, return, turns, finish, tool counts and token counts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for t in trajs:
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "messages": t.messages,
                        "turn_rewards": t.turn_rewards,
                        "return": t.reward,
                        "turns": t.turns,
                        "finish": t.finish,
                        "tool_calls": t.tool_calls,
                        "tool_errors": t.tool_errors,
                        "tokens": len(t.token_ids),
                        "model_tokens": sum(t.loss_mask),
                    }
                )
                + "\n"
            )
