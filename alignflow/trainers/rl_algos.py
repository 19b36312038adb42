"""The online-RL algorithms as data, and the advantage step of the controller.

Every algorithm of ``alignflow rl`` is one row of :data:`ALGORITHMS`: which advantage estimator, which policy loss,
which loss aggregation, where the KL penalty goes, and which extra roles its dataflow needs (a critic, a cost critic,
a greedy rollout). The controller (:mod:`alignflow.trainers.rl`) never branches on the algorithm's name, only on
these fields, so a new variant is a new row plus, at most, a new estimator function.

==============  ==============  ===========  =========================  ========  ======================
algo.name       advantage       policy loss  loss_agg                   KL        extra roles
==============  ==============  ===========  =========================  ========  ======================
ppo             gae             ppo          token_mean                 reward    critic
grpo            grpo            ppo          seq_mean_token_mean        loss (k3)
dr_grpo         dr_grpo         ppo          seq_mean_token_sum_norm    loss (k3)
dapo            grpo            ppo          token_mean                 loss (k3)
rloo            rloo            vanilla_pg   seq_mean_token_sum         reward
remax           remax           vanilla_pg   seq_mean_token_sum         reward    greedy rollout
reinforce_pp    reinforce_pp    ppo          token_mean                 reward
safe_ppo        gae (R and C)   ppo          token_mean                 reward    critic, cost critic
gspo            grpo            gspo         seq_mean_token_mean        loss (k3)
pf_ppo          gae             ppo          token_mean                 reward    critic; best_random filter
ma_ppo          macro_gae       ppo          token_mean                 reward    critic (macro actions)
pairwise_grpo   pairwise        ppo          seq_mean_token_mean        loss (k3)  pairwise source
==============  ==============  ===========  =========================  ========  ======================

The presets in ``configs/`` set the papers' values (e.g. ``kl.coef: 0`` for Dr. GRPO, DAPO and GSPO).

:func:`compute_advantages` turns the scored, log-prob'd batch into ``advantages`` (and ``returns`` for critics)
with the pure functions of :mod:`alignflow.algorithms`; the ``ADVANTAGE_STEPS`` table maps an estimator name to
the small adapter that feeds it its inputs (the estimators' inputs really differ: token rewards and values for GAE,
sequence scores and group ids for GRPO/RLOO, the greedy baseline for ReMax).
"""

from __future__ import annotations

import dataclasses

import torch

from alignflow.algorithms.advantages import ADVANTAGE_ESTIMATORS, broadcast_to_tokens
from alignflow.algorithms.core import masked_mean, masked_var, masked_whiten
from alignflow.algorithms.kl import KLController, kl_penalty_rewards, make_kl_controller
from alignflow.algorithms.macro import (
    fixed_ngram_macros,
    macro_gae,
    parse_macros,
    perplexity_macros,
    phrase_openers,
    random_ngram_macros,
)
from alignflow.algorithms.safe import safe_combined_advantages, safe_shaped_rewards
from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig
from alignflow.trainers.rl_pairwise import check_pairwise, pairwise_metrics, pairwise_step
from alignflow.trainers.rl_par import check_shaping
from alignflow.trainers.rl_safety import check_safety_test


@dataclasses.dataclass(frozen=True)
class AlgoSpec:
    advantage: str  # key of ADVANTAGE_ESTIMATORS
    policy_loss: str  # key of POLICY_LOSSES
    loss_agg: str  # key of AGG_MODES
    kl_placement: str  # "reward" | "loss"
    critic: bool = False
    cost: bool = False  # Safe RLHF: cost sources, cost critic, Lagrange multiplier
    greedy_baseline: bool = False  # ReMax
    min_group: int = 1  # smallest rollout.n that makes sense
    sample_filter: str = "none"  # PF-PPO: which samples of a prompt are trained on (algorithms/filtration.py)


ALGORITHMS = {
    "ppo": AlgoSpec("gae", "ppo", "token_mean", "reward", critic=True),
    "grpo": AlgoSpec("grpo", "ppo", "seq_mean_token_mean", "loss", min_group=2),
    "dr_grpo": AlgoSpec("dr_grpo", "ppo", "seq_mean_token_sum_norm", "loss", min_group=2),
    "dapo": AlgoSpec("grpo", "ppo", "token_mean", "loss", min_group=2),
    "rloo": AlgoSpec("rloo", "vanilla_pg", "seq_mean_token_sum", "reward", min_group=2),
    "remax": AlgoSpec("remax", "vanilla_pg", "seq_mean_token_sum", "reward", greedy_baseline=True),
    "reinforce_pp": AlgoSpec("reinforce_pp", "ppo", "token_mean", "reward"),
    "safe_ppo": AlgoSpec("gae", "ppo", "token_mean", "reward", critic=True, cost=True),
    "gspo": AlgoSpec("grpo", "gspo", "seq_mean_token_mean", "loss", min_group=2),
    "pf_ppo": AlgoSpec("gae", "ppo", "token_mean", "reward", critic=True, min_group=2, sample_filter="best_random"),
    "ma_ppo": AlgoSpec("macro_gae", "ppo", "token_mean", "reward", critic=True),
    "pairwise_grpo": AlgoSpec("pairwise", "ppo", "seq_mean_token_mean", "loss", min_group=2),
}

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
CRITIC_ESTIMATORS = ("gae", "macro_gae")  # estimators that read a critic's values


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The algorithm with every ``auto`` field of the config filled in."""

    name: str
    advantage: str
    policy_loss: str
    loss_agg: str
    kl_placement: str
    kl_estimator: str
    critic: bool
    cost: bool
    greedy_baseline: bool
    norm_len: int | None
    sample_filter: str = "none"


def resolve(cfg: RLConfig) -> Resolved:
    """Fill the ``auto`` fields from :data:`ALGORITHMS` and check the combination; ConfigError names the keys."""
    spec = ALGORITHMS[cfg.algo.name]
    pick = lambda value, default: default if value == "auto" else value  # noqa: E731
    advantage = pick(cfg.algo.advantage, spec.advantage)
    placement = pick(cfg.kl.placement, spec.kl_placement)
    estimator = pick(cfg.kl.estimator, "k1" if placement == "reward" else "k3")
    agg = pick(cfg.algo.loss_agg, spec.loss_agg)
    if advantage in CRITIC_ESTIMATORS and not spec.critic:
        raise ConfigError(
            f"algo.advantage={advantage} needs a critic; algo.name={cfg.algo.name} has none (use ppo, "
            "ma_ppo or safe_ppo, or another estimator)"
        )
    if spec.critic and advantage not in CRITIC_ESTIMATORS:
        raise ConfigError(
            f"algo.name={cfg.algo.name} trains a critic, so algo.advantage must be gae or macro_gae (or auto)"
        )
    if spec.cost and advantage != "gae":
        raise ConfigError(f"algo.name={cfg.algo.name} combines reward and cost GAE: algo.advantage must be gae")
    if cfg.algo.old_logprobs == "sampling" and cfg.rollout.backend != "builtin":
        raise ConfigError(
            "algo.old_logprobs=sampling needs rollout.backend=builtin: another backend's log-probs "
            "differ from the trainer's by kernel and precision; use algo.old_logprobs=recompute "
            "(or auto)"
        )
    if advantage == "remax" and not spec.greedy_baseline:
        raise ConfigError("algo.advantage=remax needs the greedy rollout of algo.name=remax")
    group = max(spec.min_group, 2 if advantage in GROUP_ESTIMATORS else 1)
    if cfg.rollout.n < group:
        raise ConfigError(
            f"algo.name={cfg.algo.name} with advantage {advantage} compares samples of one prompt: "
            f"rollout.n must be >= {group}, got {cfg.rollout.n}"
        )
    if cfg.dapo.dynamic_sampling and cfg.rollout.n < 2:
        raise ConfigError("dapo.dynamic_sampling keeps groups with unequal rewards: rollout.n must be >= 2")
    if cfg.algo.dual_clip and cfg.algo.dual_clip <= 1.0:
        raise ConfigError(f"algo.dual_clip must be > 1 (or 0 to disable), got {cfg.algo.dual_clip}")
    check_shaping(cfg)
    check_pairwise(cfg, advantage, pick(cfg.algo.sample_filter, spec.sample_filter))
    if cfg.critic.pretrain_steps and not spec.critic:
        raise ConfigError(
            f"critic.pretrain_steps: algo.name={cfg.algo.name} has no critic to pre-train (ppo, "
            "pf_ppo and safe_ppo have one)"
        )
    if cfg.critic.double and not spec.critic:
        raise ConfigError(
            f"critic.double: algo.name={cfg.algo.name} has no critic to double (ppo, pf_ppo, ma_ppo and "
            "safe_ppo have one)"
        )
    if cfg.algo.entropy_target and not cfg.algo.entropy_coef:
        raise ConfigError("algo.entropy_target clips the entropy term, which is off: set algo.entropy_coef > 0")
    check_kl_controller(cfg)
    check_safety_test(cfg)
    if cfg.train.packing:
        raise ConfigError(
            "train.packing: alignflow rl uses token-budget micro-batches and does not pack; set train.packing=false"
        )
    norm_len = (cfg.algo.norm_len or cfg.rollout.max_new_tokens) if agg == "seq_mean_token_sum_norm" else None
    return Resolved(
        cfg.algo.name,
        advantage,
        pick(cfg.algo.policy_loss, spec.policy_loss),
        agg,
        placement,
        estimator,
        spec.critic,
        spec.cost,
        spec.greedy_baseline,
        norm_len,
        check_filter(cfg, pick(cfg.algo.sample_filter, spec.sample_filter)),
    )


def check_kl_controller(cfg: RLConfig) -> None:
    """kl.controller=safe needs a reference (kl.coef > 0) and pid_low <= pid_high; ConfigError names the keys."""
    if cfg.kl.controller != "safe":
        return
    if cfg.kl.coef <= 0:
        raise ConfigError("kl.controller=safe steers the KL coefficient from kl.coef: set kl.coef > 0")
    if cfg.kl.pid_low > cfg.kl.pid_high:
        raise ConfigError(f"kl.pid_low={cfg.kl.pid_low} is above kl.pid_high={cfg.kl.pid_high}")


def kl_controller(cfg: RLConfig) -> KLController:
    """The KL controller of ``kl.controller`` with its keys (algorithms/kl.py, KL_CONTROLLERS)."""
    k = cfg.kl
    safe = {"kp": k.pid_kp, "ki": k.pid_ki, "kd": k.pid_kd, "low": k.pid_low, "high": k.pid_high}
    safe |= {"entropy_target": k.entropy_target, "entropy_width": k.entropy_width, "entropy_floor": k.entropy_floor}
    return make_kl_controller(k.controller, k.coef, k.target, k.horizon, **(safe if k.controller == "safe" else {}))


def check_filter(cfg: RLConfig, mode: str) -> str:
    """The PF-PPO filter mode, checked against rollout.n and algo.filter_range; ConfigError names the keys."""
    if mode in ("best", "best_worst", "best_random") and cfg.rollout.n < 2:
        what = "the best" if mode == "best" else "two"
        raise ConfigError(
            f"algo.sample_filter={mode} keeps {what} of each prompt's samples: rollout.n must be >= 2, "
            f"got {cfg.rollout.n}"
        )
    if mode == "range":
        rng = cfg.algo.filter_range
        ok = (
            isinstance(rng, (list, tuple))
            and len(rng) == 2
            and all(isinstance(q, (int, float)) and not isinstance(q, bool) for q in rng)
        )
        if not ok or not 0.0 <= rng[0] <= rng[1] <= 1.0:
            raise ConfigError(
                f"algo.filter_range: {rng!r} must be two quantiles [low, high] with "
                "0 <= low <= high <= 1, e.g. [0.25, 0.75]"
            )
    return mode


# ----------------------------------------------------------------------------------------------- pure helpers
@torch.no_grad()
def truncated_is_weights(
    logp_old: torch.Tensor, logp_sampling: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance weights ``w_t = min(exp(lp_old − lp_sampling), C)`` (TIS, as in verl / Yao et al. 2025).

    The sampler (rollout engine: another kernel, precision or a stale copy) and the trainer's recomputed log-probs
    of the same policy can differ; the PPO ratio uses the trainer's ``lp_old`` and each token's loss is weighted by
    ``w_t``, which corrects the sampling distribution up to the cap. Shapes (B, T) -> (B, T), 0 outside the mask.
    Scaling the advantage by ``w_t > 0`` scales the token's clipped-surrogate loss by exactly ``w_t`` (a positive
    factor commutes with the max inside the clip), which is how the actor applies it.
    """
    log_w = torch.where(mask.bool(), logp_old - logp_sampling, torch.zeros((), device=mask.device))
    return torch.where(mask.bool(), log_w.clamp(max=20.0).exp().clamp(max=cap), torch.zeros((), device=mask.device))


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 − Var(G − V) / Var(G)`` over valid tokens: 1 is a perfect critic, 0 predicts the mean, < 0 is worse."""
    var_g = masked_var(returns, mask)
    return float(1.0 - masked_var(returns - values, mask) / var_g.clamp(min=1e-8))


# ----------------------------------------------------------------------------------------------- advantages
@dataclasses.dataclass
class AdvContext:
    beta: float  # KL coefficient in the reward (0 when the KL is a loss term or the reference is skipped)
    estimator: str
    gamma: float
    lam: float
    whiten: bool
    reinforce_pp_baseline: bool
    lagrange: float = 0.0  # Safe RLHF lambda
    token_clip: float | None = None  # Safe RLHF per-token clip
    pairwise_center: bool = False  # pairwise advantage against an anchor: p - mean_group(p) (reward.pairwise.center)
    pairwise_normalize: bool = False  # group win rates scaled as Think-RM does (reward.pairwise.normalize)
    macro: object = None  # cfg.algo.macro (MA-RLHF termination rule and value weights)
    tokenizer: object = None  # the policy's tokenizer: the parse macro rule reads the tokens' text
    seed: int = 0  # seeds the random n-gram macros of this step


def token_rewards(batch: Batch, ctx: AdvContext, scores: torch.Tensor) -> torch.Tensor:
    """``r_t = −β·KL_t + 1[t = last]·R`` (B, T); without a reference (β = 0) just the score on the last token.
    With ``token_scores`` (B, T) in the batch (a token-level source, weighted, already inside R as its sum):
    ``r_t = −β·KL_t + T_t + 1[t = last]·(R − Σ_t T_t)``, so the sum over tokens is unchanged."""
    mask = batch["response_mask"]
    old = batch["old_logprobs"]
    ref = batch["ref_logprobs"] if ctx.beta > 0 else old
    if "token_scores" in batch:  # a token-level source (seq2seq RM): its rewards on their tokens, the rest last
        tok = batch["token_scores"].to(old.dtype) * mask  # (B, T)
        return kl_penalty_rewards(scores - tok.sum(-1), old, ref, mask, ctx.beta, ctx.estimator) + tok
    return kl_penalty_rewards(scores, old, ref, mask, ctx.beta, ctx.estimator)  # (B, T)


def _gae(batch: Batch, ctx: AdvContext) -> dict:
    mask = batch["response_mask"]
    adv, ret = ADVANTAGE_ESTIMATORS["gae"](
        token_rewards(batch, ctx, batch["scores"]), batch["values"], mask, ctx.gamma, ctx.lam
    )  # (B, T) each
    return {"advantages": masked_whiten(adv, mask) if ctx.whiten else adv, "returns": ret}


def _safe_gae(batch: Batch, ctx: AdvContext) -> dict:
    """Safe RLHF: GAE on the shaped reward and on the shaped cost, combined as (Â_R − λÂ_C)/(1 + λ)."""
    mask, gae = batch["response_mask"], ADVANTAGE_ESTIMATORS["gae"]
    ref = batch["ref_logprobs"] if ctx.beta > 0 else batch["old_logprobs"]
    r_tok, c_tok = safe_shaped_rewards(
        batch["scores"], batch["costs"], batch["old_logprobs"], ref, mask, ctx.beta, ctx.token_clip
    )  # (B, T) each
    adv_r, ret_r = gae(r_tok, batch["values"], mask, ctx.gamma, ctx.lam)
    adv_c, ret_c = gae(c_tok, batch["cost_values"], mask, ctx.gamma, ctx.lam)
    adv = safe_combined_advantages(adv_r, adv_c, ctx.lagrange)  # (B, T)
    return {"advantages": masked_whiten(adv, mask) if ctx.whiten else adv, "returns": ret_r, "cost_returns": ret_c}


def macro_ids(batch: Batch, ctx: AdvContext) -> torch.Tensor:
    """The macro index of every response token under ``algo.macro.rule`` (algorithms/macro.py): (B, T) long."""
    mask, mc = batch["response_mask"], ctx.macro
    if mc.rule == "fixed":
        return fixed_ngram_macros(mask, mc.n)
    if mc.rule == "random":
        return random_ngram_macros(mask, mc.lengths, mc.repeat, torch.Generator().manual_seed(ctx.seed))
    if mc.rule == "parse":
        return parse_macros(batch["response_ids"], mask, phrase_table(ctx.tokenizer), mc.cutoff)
    return perplexity_macros(batch["old_logprobs"], mask)


_PHRASE_TABLES: dict = {}  # id(tokenizer) -> (tokenizer, (V,) bool): built once per tokenizer


def phrase_table(tokenizer) -> torch.Tensor:
    """Which of the tokenizer's ids open a phrase (algorithms/macro.py ``phrase_openers``), cached."""
    if tokenizer is None:
        raise ValueError("algo.macro.rule=parse reads the tokens' text: the advantage step needs the tokenizer")
    hit = _PHRASE_TABLES.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        hit = _PHRASE_TABLES[id(tokenizer)] = (tokenizer, phrase_openers([t or "" for t in vocab]))
    return hit[1]


def _macro_gae(batch: Batch, ctx: AdvContext) -> dict:
    """MA-RLHF: GAE over macro actions; every token of a macro gets its advantage and its macro return."""
    mask = batch["response_mask"]
    ids = macro_ids(batch, ctx)
    rewards = token_rewards(batch, ctx, batch["scores"])  # (B, T)
    adv, ret = macro_gae(rewards, batch["values"], mask, ids, ctx.gamma, ctx.lam, ctx.macro.value_weights)  # (B, T)
    out = {"advantages": masked_whiten(adv, mask) if ctx.whiten else adv, "returns": ret}
    return out | {"macro_ids": ids}


def _group(name: str):
    def step(batch: Batch, ctx: AdvContext) -> dict:
        mask = batch["response_mask"]
        seq = token_rewards(batch, ctx, batch["scores"]).sum(-1)  # (B,): R − β·Σ_t KL_t
        adv = ADVANTAGE_ESTIMATORS[name](seq, group_ids=torch.as_tensor(batch["group"]))  # (B,)
        return {"advantages": broadcast_to_tokens(adv, mask)}  # (B, T)

    return step


def _remax(batch: Batch, ctx: AdvContext) -> dict:
    rewards = token_rewards(batch, ctx, batch["scores"])  # (B, T)
    return {"advantages": ADVANTAGE_ESTIMATORS["remax"](rewards, batch["greedy_scores"], batch["response_mask"])}


def _reinforce_pp(batch: Batch, ctx: AdvContext) -> dict:
    scores = batch["scores"]
    if ctx.reinforce_pp_baseline:
        scores = ADVANTAGE_ESTIMATORS["dr_grpo"](scores, group_ids=torch.as_tensor(batch["group"]))  # R − mean_g R
    rewards = token_rewards(batch, ctx, scores)  # (B, T)
    return {"advantages": ADVANTAGE_ESTIMATORS["reinforce_pp"](rewards, batch["response_mask"], ctx.gamma)}


ADVANTAGE_STEPS = {
    "gae": _gae,
    "macro_gae": _macro_gae,
    "safe_gae": _safe_gae,
    "grpo": _group("grpo"),
    "dr_grpo": _group("dr_grpo"),
    "rloo": _group("rloo"),
    "remax": _remax,
    "reinforce_pp": _reinforce_pp,
    "pairwise": pairwise_step,
}


def compute_advantages(batch: Batch, algo: Resolved, ctx: AdvContext, adv_clip: float = 0.0) -> Batch:
    """Advantages (B, T) and, for critics, returns (B, T) of a scored batch, as a Batch of new fields."""
    key = "safe_gae" if algo.cost else algo.advantage
    out = ADVANTAGE_STEPS[key](batch, ctx)
    if adv_clip > 0:
        out["advantages"] = out["advantages"].clamp(-adv_clip, adv_clip)
    return Batch(out)


def advantage_metrics(batch: Batch) -> dict:
    mask = batch["response_mask"]
    out = {
        "policy/advantage_mean": float(masked_mean(batch["advantages"], mask)),
        "policy/advantage_std": float(masked_var(batch["advantages"], mask).sqrt()),
    }
    if "macro_ids" in batch:  # MA-RLHF: mean macro length, tokens per macro over the batch
        ids = batch["macro_ids"]
        out["macro/mean_len"] = float(mask.sum() / (ids.max(-1).values + 1).clamp(min=0).sum().clamp(min=1))
    if "values_1" in batch:  # SAFE's double critic: how far apart the two critics are, and the soft-min's pull
        out["critic/double_gap"] = float(masked_mean((batch["values_1"] - batch["values_2"]).abs(), mask))
        lower = torch.minimum(batch["values_1"], batch["values_2"])
        out["critic/soft_min_above_min"] = float(masked_mean(batch["values"] - lower, mask))
    if "returns" in batch:
        out["critic/explained_var"] = explained_variance(batch["values"], batch["returns"], mask)
        out["critic/return_mean"] = float(masked_mean(batch["returns"], mask))
    return out | pairwise_metrics(batch)
