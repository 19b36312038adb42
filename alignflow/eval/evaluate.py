"""``alignflow eval``: sample a policy and score it; measure a reward model on held-out pairs; the reward-KL frontier.

Policy metrics (every name and formula on ``docs/eval.md``), over ``num_prompts`` held-out prompts x
``samples_per_prompt`` samples drawn at ``temperature``:

* reward: ``eval/gold_reward`` (the built-in task's hidden gold reward, when the prompts are the task's),
  ``eval/rm_score`` (``reward_model``'s score, when given), ``eval/grammatical`` (``reviews``);
* ``eval/kl`` (k1, summed over the response, mean over samples) and ``eval/kl_k3`` (k3, mean per token) to
  ``reference``, when given;
* ``eval/response_len``, ``eval/truncated``; ``eval/distinct_1``, ``eval/distinct_2``, ``eval/self_bleu``;
* ``eval/accuracy`` (pass@1), ``eval/pass_at_k``, ``eval/maj_at_k`` when the prompt rows carry an ``answer``
  (the ``arithmetic`` task's do).

A policy with user embeddings (P-DPO) samples every row after its ``user``'s soft prompt; ``users: true`` evaluates
on the task's held-out user prompts with each row's user's gold and ``eval/gold_reward/<user>``
(:mod:`alignflow.eval.users`).

Reward-model metrics (``reward_model`` without ``policy``): ``eval/accuracy``, ``eval/margin``, ``eval/ece`` on the
preference pairs of ``data.path``. ``frontier: [...]`` evaluates several policies the same way and plots reward
against KL (:mod:`alignflow.eval.frontier`).

Run it::

    alignflow eval policy=runs/grpo/model reference=runs/sft/model
    alignflow eval reference=runs/sft/model frontier=runs/sft/model,runs/grpo     # every checkpoint of a run
    alignflow eval reward_model=runs/rm/model data.path=pairs.jsonl

Writes ``eval.json`` (the metrics) and ``samples.jsonl`` (one row per prompt: its samples and their scores) to
``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from alignflow.algorithms.core import masked_mean
from alignflow.algorithms.kl import kl_k1, kl_k3, sequence_kl
from alignflow.batch import Batch
from alignflow.config import ConfigError, EvalConfig, ModelConfig
from alignflow.data.pipeline import prepare_data
from alignflow.eval.frontier import check_vocab, resolve_frontier, run_frontier
from alignflow.eval.metrics import accuracy_metrics, answer_correct, distinct_n, diversity_metrics, length_metrics
from alignflow.eval.users import check_users, load_model, per_user_means, policy_prompts, user_eval_rows, with_prompts
from alignflow.models import load_reward_model, load_tokenizer
from alignflow.models.device import resolve_device
from alignflow.models.sequences import score
from alignflow.rewards.model import RewardModelScorer
from alignflow.rollout.sample import sample_batch
from alignflow.tasks import build_task, get_task
from alignflow.tasks.reviews import gold_components
from alignflow.tasks.users import row_user_gold
from alignflow.trainers.builtin_sft import resolve_eval_models
from alignflow.trainers.loop import Progress
from alignflow.trainers.rm import pair_metrics
from alignflow.trainers.roles import Reference
from alignflow.trainers.run_dir import check_output_dir

__all__ = [
    "EvalContext",
    "distinct_n",
    "evaluate_policy",
    "kl_metrics",
    "policy_logprobs",
    "policy_metrics",
    "run_eval",
]


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def policy_metrics(
    prompts: list,
    samples: list[list[str]],
    lengths: list[list[int]],
    gold=None,
    rm_scores: list[float] | None = None,
    grammatical=None,
) -> dict:
    """Metrics of texts already sampled (no model): ``eval/response_len``, distinct-1/2 and self-BLEU, and
    ``eval/gold_reward`` / ``eval/grammatical`` / ``eval/rm_score`` when given (flattened prompt-major)."""
    flat_p = [p for p, s in zip(prompts, samples, strict=False) for _ in s]
    flat_s = [x for s in samples for x in s]
    out = {"eval/response_len": _mean([x for ls in lengths for x in ls])} | diversity_metrics(samples)
    if gold is not None:
        out["eval/gold_reward"] = _mean(gold(flat_p, flat_s))
    if grammatical is not None:
        out["eval/grammatical"] = _mean([float(grammatical(p, s)) for p, s in zip(flat_p, flat_s, strict=False)])
    if rm_scores is not None:
        out["eval/rm_score"] = _mean(rm_scores)
    return out


# ----------------------------------------------------------------------------------------------- KL
def policy_logprobs(model, batch: Batch, temperature: float) -> torch.Tensor:
    """log π(y_t | x, y_<t) of the sampled response tokens, (B, Tr), 0 on padding, at the sampling temperature
    (logits / T; T = 1 when sampling was greedy).

    Both sides of the KL come from here -- the policy recomputed with a full forward rather than the engine's
    ``sampling_logprobs`` -- through the very function the RL trainer uses for reference log-probs
    (:class:`alignflow.trainers.roles.Reference`): the engine's values come from an incremental KV-cache decode
    and differ from a full forward by rounding (more under reduced precision), which would make the KL of a
    policy to itself nonzero and bias small KLs. One extra forward of the policy costs little next to sampling.
    """
    t = temperature if temperature > 0 else 1.0
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    try:
        return Reference(model=model, temperature=t).logprobs(batch)["ref_logprobs"]
    finally:  # Reference freezes its model; leave the caller's model as it was
        for p, g in zip(model.parameters(), grads, strict=False):
            p.requires_grad_(g)
        model.train(was_training)


def kl_metrics(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """KL(π‖π_ref) estimates from samples y ~ π (Schulman's estimators, docs/online_rl.md; ``algorithms/kl.py``).

    ``eval/kl`` = mean_i Σ_t m·k1 with k1 = lp − lp_ref: the sequence-level KL (the same quantity as the RL
    trainer's ``policy/kl``); ``eval/kl_k3`` = Σ_{i,t} m·k3 / Σ_{i,t} m with k3 = exp(lp_ref − lp) − (lp_ref − lp)
    − 1 >= 0: the per-token KL with lower variance. logp, ref_logp, mask: (B, Tr).
    """
    return {
        "eval/kl": float(sequence_kl(logp, ref_logp, mask, "k1")),
        "eval/kl_k3": float(masked_mean(kl_k3(logp, ref_logp), mask.bool())),
    }


# ----------------------------------------------------------------------------------------------- policy evaluation
@dataclasses.dataclass
class EvalContext:
    """What every evaluated policy is measured with: prompts, scorers and the reference (shared by the frontier)."""

    tokenizer: object
    device: torch.device
    rows: list  # prompt rows: "prompt", "prompt_ids" and the file's other fields (e.g. "answer")
    gold: Callable | None = None  # the task's gold reward f(prompts, responses) -> list[float]
    grammatical: Callable | None = None  # f(prompt, response) -> bool (reviews)
    answers: list | None = None  # one reference answer per prompt row (verifiable tasks)
    rm: Callable | None = None  # RewardModelScorer: Batch -> (B,)
    reference: torch.nn.Module | None = None
    gold_by_user: bool = False  # gold is f(prompts, responses, users): each row's user's gold (users: true)

    @property
    def reward_key(self) -> str | None:
        """The reward a frontier plots: the gold reward when there is one, else the reward model's score."""
        return "eval/gold_reward" if self.gold else "eval/rm_score" if self.rm else None


def reviews_grammatical(prompt: str, response: str) -> bool:
    """A review is grammatical when every sentence parses and it ends with punctuation."""
    c = gold_components(prompt, response)
    return c["bad_sentences"] == 0 and c["no_final_punct"] == 0


def evaluate_policy(policy, ctx: EvalContext, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """Sample ``cfg.samples_per_prompt`` responses to every prompt of ``ctx`` and measure them.

    Returns (metrics, one samples.jsonl row per prompt: the prompt, its samples and per-sample scores).
    """
    n, rows, bos = cfg.samples_per_prompt, ctx.rows, ctx.tokenizer.bos_token_id
    prompt_ids = policy_prompts(policy, rows, bos)  # after each row's user's soft prompt when the policy has them
    batch = sample_batch(policy, ctx.tokenizer, prompt_ids, n, cfg.max_new_tokens, cfg.temperature, cfg.seed)
    texts = batch["response"]
    samples = [texts[i * n : (i + 1) * n] for i in range(len(rows))]
    lengths = batch["response_mask"].sum(-1).tolist()  # (B,)
    m = length_metrics(lengths, batch["finish_reason"]) | diversity_metrics(samples)
    per: dict = {"length": lengths}
    prompts = [r["prompt"] for r in rows for _ in range(n)]
    users = [r.get("user") for r in rows for _ in range(n)]
    if ctx.gold is not None:
        per["gold_reward"] = [float(g) for g in ctx.gold(prompts, texts, *([users] if ctx.gold_by_user else []))]
        m["eval/gold_reward"] = _mean(per["gold_reward"])
        m |= per_user_means("eval/gold_reward", users, per["gold_reward"]) if ctx.gold_by_user else {}
    if ctx.grammatical is not None:
        m["eval/grammatical"] = _mean([float(ctx.grammatical(p, s)) for p, s in zip(prompts, texts, strict=False)])
    if ctx.answers is not None:
        m |= accuracy_metrics(samples, ctx.answers)
        per["correct"] = [answer_correct(s, ctx.answers[i // n]) for i, s in enumerate(texts)]
    pad = ctx.tokenizer.pad_token_id or 0
    if ctx.rm is not None:  # the plain prompt and the response (the reward model has no soft prompts)
        per["rm_score"] = ctx.rm(with_prompts(batch, [r["prompt_ids"] for r in rows for _ in range(n)], pad))
        per["rm_score"] = per["rm_score"].float().cpu().tolist()
        m["eval/rm_score"] = _mean(per["rm_score"])
    if ctx.reference is not None:  # the reference's own soft prompt for the row's user, or the plain prompt
        mask, ref_prompts = batch["response_mask"], policy_prompts(ctx.reference, rows, bos)
        ref_batch = with_prompts(batch, [p for p in ref_prompts for _ in range(n)], pad)
        lp, ref_lp = (
            policy_logprobs(policy, batch, cfg.temperature),
            policy_logprobs(ctx.reference, ref_batch, cfg.temperature),
        )
        m |= kl_metrics(lp, ref_lp, mask)
        per["kl"] = torch.where(mask.bool(), kl_k1(lp, ref_lp), 0.0).sum(-1).cpu().tolist()  # (B,)
    out_rows = [
        {"prompt": r["prompt"], **({"user": r["user"]} if r.get("user") is not None else {}), "samples": samples[i]}
        | {k: v[i * n : (i + 1) * n] for k, v in per.items()}
        for i, r in enumerate(rows)
    ]
    return m, out_rows


# ----------------------------------------------------------------------------------------------- set-up
def load_prompts(cfg: EvalConfig, tok, out: Path) -> tuple[list[dict], Callable | None, Callable | None]:
    """(prompt rows, gold reward, grammaticality check): ``data.path``, or the built-in task's held-out prompts
    with its gold reward (the gold reward is defined on the task's prompts only, so a ``data.path`` gets none)."""
    gold = grammatical = None
    path = cfg.data.path
    if cfg.users:  # the task's held-out user prompts, each scored by its user's gold (check_users: reviews)
        return user_eval_rows(cfg, tok, out), row_user_gold, reviews_grammatical
    if not path:
        art = build_task(cfg.task.name, cfg.task, out / "task")
        path, gold = str(art.eval_prompts_path), art.gold_reward
        grammatical = reviews_grammatical if cfg.task.name == "reviews" else None
    data = prepare_data(dataclasses.replace(cfg.data, path=path, eval_path=""), tok, expect=("prompt",))
    rows = (data.train + data.eval)[: cfg.num_prompts]
    if not rows:
        raise ConfigError(f"data.path: {path} has no prompt rows to evaluate on")
    return rows, gold, grammatical


def build_context(cfg: EvalConfig, tok, device: torch.device, out: Path) -> EvalContext:
    """Prompts, gold reward, answers, reward-model scorer and reference model for policy evaluation."""
    rows, gold, grammatical = load_prompts(cfg, tok, out)
    answers = [r["answer"] for r in rows] if all(r.get("answer") is not None for r in rows) else None
    rm = RewardModelScorer(cfg.reward_model, device=device, pad_token_id=tok.pad_token_id) if cfg.reward_model else None
    ref = load_model(cfg.reference, device) if cfg.reference else None  # with its user embeddings, if any
    if ref is not None:
        check_vocab("reference", cfg.reference, ref, tok)
    return EvalContext(tok, device, rows, gold, grammatical, answers, rm, ref, gold_by_user=cfg.users)


def reward_model_metrics(cfg: EvalConfig, tok, device) -> dict:
    """Pairwise accuracy, margin and calibration of a reward model on ``cfg.data.path`` (all rows held out)."""
    if not cfg.data.path:
        raise ConfigError("alignflow eval: a reward model is evaluated on preference pairs; set data.path=<file>")
    data = prepare_data(cfg.data, tok, expect=("preference",))
    pairs = data.train + data.eval
    rm = load_reward_model(
        ModelConfig(name_or_path=cfg.reward_model), num_labels=None, device=device, pad_token_id=tok.pad_token_id
    )
    c = score(rm, [p["chosen_ids"] for p in pairs], tok.pad_token_id, device).mean(-1)
    r = score(rm, [p["rejected_ids"] for p in pairs], tok.pad_token_id, device).mean(-1)
    return pair_metrics(c, r, "eval")


def _meant_local(value: str) -> bool:
    """A path, not a hub id: it starts with / or ., or its first part is a local directory (``runs/...``)."""
    return value.startswith(("/", ".")) or (Path(value.split("/")[0]).is_dir() and "/" in value)


def check_config(cfg: EvalConfig) -> list:
    """Fail before any model is loaded; returns the resolved frontier policies."""
    if not (cfg.policy or cfg.reward_model or cfg.frontier):
        raise ConfigError(
            "alignflow eval: nothing to evaluate; give policy=<dir>, frontier=<dir,...> and/or reward_model=<dir>"
        )
    get_task(cfg.task.name)  # an unknown task name -> ConfigError listing the tasks
    for key in ("policy", "reference", "reward_model", "tokenizer"):
        value = getattr(cfg, key)
        if value and _meant_local(value) and not Path(value).is_dir():
            raise ConfigError(
                f"{key}: {value} does not exist (cwd: {os.getcwd()}); run the command that writes it first (a "
                f"run's model/ directory), or give a hub id"
            )
    if not cfg.frontier:
        check_users(cfg, [])
        return []
    if not cfg.reference:
        raise ConfigError("frontier: the x axis is the KL to a reference policy; set reference=<dir> (the SFT model)")
    if cfg.data.path and not cfg.reward_model:
        raise ConfigError(
            "frontier: with data.path there is no gold reward (it is defined on the built-in task's "
            "prompts); set reward_model=<dir> to plot its score"
        )
    frontier = resolve_frontier(cfg.frontier)
    check_users(cfg, frontier)
    return frontier


def _write_samples(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def run_eval(cfg: EvalConfig) -> dict:
    """``alignflow eval``: writes eval.json and samples.jsonl (and frontier.json/.png) into ``cfg.output_dir``;
    returns the metrics of ``policy`` (or of ``reward_model`` on pairs)."""
    resolve_eval_models(cfg)  # policy / reference / frontier = builtin:sft: the built-in task's SFT model
    frontier = check_config(cfg)

    out = check_output_dir(cfg.output_dir, "output_dir")
    device = resolve_device(cfg.device, "device")
    tok = load_tokenizer(cfg.tokenizer or cfg.policy or cfg.reference or cfg.reward_model)
    metrics: dict = {}
    if cfg.policy or frontier:
        ctx = build_context(cfg, tok, device, out)
        bar = Progress(int(bool(cfg.policy)) + len(frontier), 0, None, "eval", unit="policy", interrupt=False)
        if cfg.policy:
            policy = load_model(cfg.policy, device)  # with its user embeddings, if any
            check_vocab("policy", cfg.policy, policy, tok)
            metrics, rows = evaluate_policy(policy, ctx, cfg)
            _write_samples(out / "samples.jsonl", rows)
            del policy
            bar.update(0)
        if frontier:
            run_frontier(frontier, ctx, cfg, out, evaluate_policy, _write_samples)
            bar.bar.update(len(frontier))
        bar.close()
    else:
        metrics = reward_model_metrics(cfg, tok, device)
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    return metrics
