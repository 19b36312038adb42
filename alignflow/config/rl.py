"""``alignflow rl``: its schema (algorithm, KL, DAPO, cost, critic and environment sections)."""

from __future__ import annotations

import dataclasses
from typing import Any

from alignflow.config.loader import ConfigError, field
from alignflow.config.sections import (
    DataConfig,
    HubConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    ResourcesConfig,
    RewardSourceConfig,
    RolloutConfig,
    TaskConfig,
    TrainConfig,
)


def _check_rl_batch(cfg: Any, prefix: str) -> None:
    rows = cfg.rollout.prompts_per_step * cfg.rollout.n
    if cfg.train.batch_size > rows:
        raise ConfigError(
            f"{prefix}train.batch_size={cfg.train.batch_size} is larger than the rollout batch "
            f"{prefix}rollout.prompts_per_step x {prefix}rollout.n = {cfg.rollout.prompts_per_step} x "
            f"{cfg.rollout.n} = {rows} rows; use a {prefix}train.batch_size in [1, {rows}] (a "
            "mini-batch of one RL step)"
        )


RL_ALGORITHMS = (
    "ppo",
    "grpo",
    "dr_grpo",
    "dapo",
    "rloo",
    "remax",
    "reinforce_pp",
    "safe_ppo",
    "gspo",
    "pf_ppo",
    "ma_ppo",
    "pairwise_grpo",
)


@dataclasses.dataclass
class MacroConfig:
    """MA-RLHF macro actions (algo.name=ma_ppo, or algo.advantage=macro_gae on a critic algorithm; docs/ma_ppo.md)."""

    rule: str = field(
        "fixed",
        doc="Termination rule: fixed (every n tokens), random (span lengths drawn from lengths x repeat, "
        "shuffled; the rest is one macro), perplexity (a macro ends where the next token's -log p rises), "
        "parse (rule-based phrase chunks: cut before punctuation, conjunctions, prepositions, determiners).",
        choices=("fixed", "random", "perplexity", "parse"),
    )
    cutoff: int = field(
        0, doc="rule=parse: the longest phrase; a longer one is cut every cutoff tokens (0: no limit).", range=(0, None)
    )
    n: int = field(5, doc="rule=fixed: tokens per macro (1 is token-level PPO).", range=(1, None))
    lengths: list[int] = field(
        default_factory=lambda: [1, 2, 3, 5, 10], doc="rule=random: the multiset of span lengths."
    )
    repeat: int = field(3, doc="rule=random: copies of lengths drawn per response.", range=(1, None))
    value_weights: str = field(
        "equal",
        doc="Macro value V(w) = sum_t s_t V_t with s_t: equal (1/|w|), unit (last token), position (~1/position).",
        choices=("equal", "unit", "position"),
    )


@dataclasses.dataclass
class AlgoConfig:
    """The online-RL algorithm and its loss knobs. ``auto`` picks the algorithm's own choice (the table in
    ``alignflow/trainers/rl_algos.py`` and ``docs/online_rl.md``); any other value overrides it."""

    name: str = field(
        "ppo",
        doc="Algorithm: the dataflow (critic or not, greedy baseline, cost) and the defaults of the auto fields below.",
        choices=RL_ALGORITHMS,
    )
    advantage: str = field(
        "auto",
        doc="Advantage estimator (a key of ADVANTAGE_ESTIMATORS).",
        choices=("auto", "gae", "macro_gae", "grpo", "dr_grpo", "rloo", "remax", "reinforce_pp", "pairwise"),
    )
    policy_loss: str = field(
        "auto",
        doc="Policy loss (a key of POLICY_LOSSES): PPO clip, GSPO sequence clip, or unclipped REINFORCE.",
        choices=("auto", "ppo", "gspo", "vanilla_pg"),
    )
    loss_agg: str = field(
        "auto",
        doc="How per-token losses are reduced (token_mean: PPO/DAPO; seq_mean_token_mean: "
        "GRPO; seq_mean_token_sum: RLOO/ReMax; seq_mean_token_sum_norm: Dr. GRPO).",
        choices=("auto", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"),
    )
    norm_len: int = field(
        0, doc="Constant L of seq_mean_token_sum_norm (Dr. GRPO); 0 means rollout.max_new_tokens.", range=(0, None)
    )
    clip_low: float = field(
        0.2, doc="PPO ratio clip below 1 (epsilon_low). GSPO's paper value is 3e-4.", range=(0.0, 1.0)
    )
    clip_high: float = field(
        0.2, doc="PPO ratio clip above 1 (epsilon_high); 0.28 is DAPO's clip-higher.", range=(0.0, None)
    )
    dual_clip: float = field(
        0.0,
        doc="Dual-clip constant c > 1 bounding the loss of negative-advantage tokens (Ye et al. 2020); 0 disables.",
        range=(0.0, None),
    )
    ppo_epochs: int = field(1, doc="Passes over each rollout batch (PPO epochs).", range=(1, None))
    value_clip: float = field(
        0.2, doc="Critic value clip epsilon_v around the old values; 0 disables.", range=(0.0, None)
    )
    vf_coef: float = field(
        0.1,
        doc="Weight of the value loss (scales the critic's loss; the critic has its own optimiser).",
        range=(0.0, None),
    )
    entropy_coef: float = field(
        0.0, doc="Entropy bonus weight c_H (loss -= c_H * entropy); 0 disables.", range=(0.0, None)
    )
    entropy_target: float = field(
        0.0,
        doc="PPO-max entropy clip: the entropy term becomes c_H * token_mean "
        "|H - entropy_target| (pulls H towards the target; needs entropy_coef "
        "> 0); 0 keeps the plain bonus -H.",
        range=(0.0, None),
    )
    ptx_coef: float = field(
        0.0,
        doc="Weight of the pre-training (PTX) NLL mixed into every actor update "
        "(InstructGPT PPO-ptx, PPO-max; docs/ppo_max.md); 0 disables.",
        range=(0.0, None),
    )
    ptx_path: str = field(
        "", doc="PTX data: SFT rows (text or prompt+completion); empty: the built-in task's SFT corpus."
    )
    ptx_batch_size: int = field(8, doc="PTX rows per actor optimiser step.", range=(1, None))
    sample_filter: str = field(
        "auto",
        doc="PF-PPO policy filtration of each prompt's samples by reward (docs/"
        "pf_ppo.md): none, best (one row per prompt), best_worst, best_random, range; auto = the algorithm's.",
        choices=("auto", "none", "best", "best_worst", "best_random", "range"),
    )
    filter_range: list[float] = field(
        default_factory=lambda: [0.25, 0.75],
        doc="sample_filter=range: drop the rows "
        "whose reward lies strictly between these quantiles of the batch's rewards (the middle, "
        "where a reward model is least reliable).",
    )
    gamma: float = field(1.0, doc="Discount gamma of GAE and returns-to-go.", range=(0.0, 1.0))
    lam: float = field(0.95, doc="GAE lambda.", range=(0.0, 1.0))
    whiten_advantages: bool = field(
        True,
        doc="Whiten critic-based (GAE) advantages over the valid tokens of the "
        "rollout batch (group estimators normalise on their own).",
    )
    advantage_clip: float = field(
        0.0, doc="Clip advantages to [-c, c] after whitening (PPO-max uses 0.5); 0 disables.", range=(0.0, None)
    )
    reinforce_pp_baseline: bool = field(
        False, doc="REINFORCE++-baseline: subtract the prompt group's mean score before the global whitening."
    )
    is_correction: str = field(
        "tis",
        doc="Rollout/training mismatch: 'tis' weights each token's loss by "
        "min(exp(lp_old - lp_sampling), is_cap) (truncated importance sampling); "
        "'none' ignores the sampler's log-probs.",
        choices=("tis", "none"),
    )
    is_cap: float = field(2.0, doc="Cap C of the truncated importance weight.", range=(1.0, None))
    macro: MacroConfig = field(default_factory=MacroConfig, doc="MA-RLHF macro actions (advantage macro_gae).")
    old_logprobs: str = field(
        "auto",
        doc="Where the PPO ratio's old log-probs come from: 'recompute' (a forward "
        "pass of the actor before the update), 'sampling' (the rollout engine's, "
        "no extra pass; TIS weights are then 1), or 'auto' = sampling when each "
        "rollout batch gets exactly one update (ppo_epochs 1, one mini-batch: the "
        "ratio is 1 at that update whatever lp_old is), else recompute.",
        choices=("auto", "recompute", "sampling"),
    )


@dataclasses.dataclass
class KLConfig:
    coef: float = field(
        0.05,
        doc="KL coefficient beta (initial value for the adaptive controller). 0 skips the reference model entirely.",
        range=(0.0, None),
    )
    estimator: str = field(
        "auto", doc="KL estimator; auto = k1 in the reward, k3 in the loss (GRPO).", choices=("auto", "k1", "k2", "k3")
    )
    placement: str = field(
        "auto",
        doc="Where the KL penalty goes: per-token reward (InstructGPT PPO, RLOO, "
        "REINFORCE++) or a loss term (GRPO); auto = the algorithm's.",
        choices=("auto", "reward", "loss"),
    )
    controller: str = field(
        "fixed",
        doc="Fixed beta, adaptive beta towards a target KL (Ziegler et al. 2019), or safe: a PID law on the KL "
        "gated by the policy's entropy (SAFE; docs/safe_control.md).",
        choices=("fixed", "adaptive", "safe"),
    )
    target: float = field(6.0, doc="Adaptive and safe controllers: target KL (nats per sequence).", range=(0.0, None))
    horizon: float = field(10000.0, doc="Adaptive controller: horizon in samples.", range=(1.0, None))
    pid_kp: float = field(0.0, doc="Safe controller: proportional gain on KL - target (0: no PID).", range=(0.0, None))
    pid_ki: float = field(0.0, doc="Safe controller: integral gain.", range=(0.0, None))
    pid_kd: float = field(0.0, doc="Safe controller: derivative gain.", range=(0.0, None))
    pid_low: float = field(1e-3, doc="Safe controller: smallest beta of the PID law (> 0).", range=(1e-8, None))
    pid_high: float = field(1.0, doc="Safe controller: largest beta of the PID law.", range=(1e-8, None))
    entropy_target: float = field(
        0.0,
        doc="Safe controller: entropy H* (nats per token) below which the KL penalty is restored; beta is "
        "scaled by max(entropy_floor, sigmoid((H* - H) / entropy_width)); 0: no gate.",
        range=(0.0, None),
    )
    entropy_width: float = field(0.5, doc="Safe controller: width of the entropy gate (0: a step).", range=(0.0, None))
    entropy_floor: float = field(0.1, doc="Safe controller: smallest factor of the entropy gate.", range=(0.0, 1.0))


@dataclasses.dataclass
class DapoConfig:
    """DAPO's data-side knobs (Yu et al. 2025); usable with any group-based algorithm."""

    dynamic_sampling: bool = field(
        False, doc="Drop prompt groups whose rewards are all equal and sample more prompts until the batch is full."
    )
    max_sample_rounds: int = field(
        4,
        doc="Most generation rounds per step when refilling; a step that is still "
        "short trains on the groups it has (reported).",
        range=(1, None),
    )
    overlong_penalty: bool = field(
        False, doc="Add the soft overlong penalty to the reward (L_max = rollout.max_new_tokens)."
    )
    overlong_cache_len: int = field(
        0, doc="L_cache of the overlong penalty; 0 means max_new_tokens // 4.", range=(0, None)
    )


@dataclasses.dataclass
class SafetyTestConfig:
    """HC-RLHF (docs/hc_rlhf.md): the held-out high-confidence safety test at the end of a Safe RLHF run."""

    held_out: int = field(
        0,
        doc="Prompts of the safety set: the last N rows of the eval split, one sampled response each; the final "
        "policy is saved as <output_dir>/model only when the test passes. 0: no test.",
        range=(0, None),
    )
    delta: float = field(0.05, doc="The test holds with probability >= 1 - delta.", range=(1e-9, 0.5))
    threshold: float = field(0.0, doc="Pass iff the upper confidence bound of the expected cost <= threshold.")
    cost_range: list[float] = field(
        default_factory=lambda: [0.0, 4.0],
        doc="[low, high] of an episode cost (Hoeffding's bound needs it); costs are clipped into it.",
    )
    pessimistic: bool = field(
        False,
        doc="Train against the pessimistic bound: the Lagrange update uses mean(C) + 2 (b - a) sqrt(ln(1/delta) / "
        "(2 held_out)) of the window's costs instead of their mean.",
    )


@dataclasses.dataclass
class CostConfig:
    """Safe RLHF (algo.name=safe_ppo): cost sources (cost > 0 = unsafe) and the Lagrange multiplier."""

    task: dict[str, float] = field(
        default_factory=dict, doc="Built-in task costs by name -> weight (reviews: {ungrammatical: 1.0})."
    )
    functions: dict[str, float] = field(
        default_factory=dict,
        doc="Python cost functions 'pkg.module:fn' -> weight (run with reward.timeout_s and reward.executor).",
    )
    models: list[str] = field(default_factory=list, doc="Cost-model directories (k form a pessimistic ensemble).")
    aggregation: str = field(
        "mean",
        doc="Cost-model ensemble aggregation (min/uwo are pessimistic for a cost).",
        choices=("mean", "min", "uwo"),
    )
    threshold: float = field(0.0, doc="Constraint E[C] <= threshold (d).")
    lambda_init: float = field(1.0, doc="Initial Lagrange multiplier.", range=(1e-8, None))
    lambda_lr: float = field(0.1, doc="Learning rate of log(lambda).", range=(1e-8, None))
    lambda_max: float = field(5.0, doc="Upper bound of lambda.", range=(1e-8, None))
    window: int = field(128, doc="Episode costs in the sliding window of the multiplier update.", range=(1, None))
    token_clip: float = field(
        50.0, doc="Clip per-token shaped rewards and costs to +-token_clip; 0 disables.", range=(0.0, None)
    )
    safety_test: SafetyTestConfig = field(
        default_factory=SafetyTestConfig, doc="HC-RLHF held-out safety test and pessimistic Lagrange update."
    )


@dataclasses.dataclass
class CriticConfig:
    name_or_path: str = field(
        "", doc="Critic initialisation; empty: the first reward model when there is one (InstructGPT), else the policy."
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, scheduler="constant"), doc="Critic optimiser."
    )
    pretrain_steps: int = field(
        0,
        doc="PPO-max critic pre-training: the first N RL steps train the critic only, "
        "on rollouts of the frozen policy (they count in train.max_steps).",
        range=(0, None),
    )
    double: bool = field(
        False,
        doc="SAFE's double critic (docs/safe_control.md): two critics from different value-head "
        "initialisations, both regressed on the same returns; GAE reads their soft minimum.",
    )
    soft_min_tau: float = field(
        0.3,
        doc="critic.double: temperature tau of V = -tau log((exp(-V1/tau) + exp(-V2/tau)) / 2) "
        "(-> min(V1, V2) as tau -> 0, -> their mean as tau grows); SAFE's 0.3.",
        range=(1e-6, None),
    )


@dataclasses.dataclass
class EnvConfig:
    task: bool = field(
        False,
        doc="Multi-turn episodes against the built-in task's environment (task.name: "
        "calculator); rewards then come from the environment (docs/multiturn_rl.md).",
    )
    path: str = field(
        "",
        doc="Multi-turn episodes against this environment: 'pkg.module:Factory' or "
        "'file.py:make_env' (docs/environments.md); empty with env.task=false: single-turn.",
    )
    kwargs: dict[str, Any] = field(default_factory=dict, doc="Keyword arguments of the environment factory (env.path).")
    max_turns: int = field(4, doc="Assistant turns per episode at most.", range=(1, None))
    max_tokens: int = field(
        512,
        doc="Tokens per episode at most (first prompt, model turns, observations); each "
        "turn also stops at rollout.max_new_tokens.",
        range=(2, None),
    )
    save_trajectories: int = field(
        8, doc="Episodes per RL step appended to <output_dir>/trajectories.jsonl (0: none, -1: all).", range=(-1, None)
    )


@dataclasses.dataclass
class LatrConfig:
    """LATR lookahead tree rollouts (docs/latr.md): part of each group is sampled as a tree that branches at
    uncertain tokens and prunes branches that stay too close to their parent."""

    enabled: bool = field(
        False, doc="Sample round(eta * rollout.n) of each group as a LATR tree (off: plain sampling)."
    )
    top_m: int = field(3, doc="Most likely tokens considered as branch candidates at a step.", range=(2, None))
    tau_abs: float = field(
        0.25, doc="A candidate branches only if its probability exceeds tau_abs (>= 1: never).", range=(0.0, None)
    )
    tau_rel: float = field(
        0.15,
        doc="... and if the top token's probability exceeds the candidate's by more than tau_rel.",
        range=(0.0, 1.0),
    )
    tau_ed: float = field(
        0.4,
        doc="Lookahead pruning: a branch whose window differs from its parent's by a normalised edit distance "
        "below tau_ed is dropped.",
        range=(0.0, 1.0),
    )
    lookahead: int = field(
        20, doc="Window r (tokens from the branch token on) compared with the parent's before pruning.", range=(1, None)
    )
    eta0: float = field(0.5, doc="Share of each group sampled by the tree at step 0.", range=(0.0, 1.0))
    decay_steps: int = field(
        0, doc="The share decays linearly from eta0 to 0 over this many RL steps (0: constant eta0).", range=(0, None)
    )
    max_children: int = field(
        2, doc="Most branches one sample opens over its response (the tree's width per node).", range=(1, None)
    )
    branch_steps: int = field(
        0,
        doc="Branches open only in the first branch_steps decode steps (0: anywhere); later the tree's samples "
        "continue by plain sampling.",
        range=(0, None),
    )


def _check_latr(cfg: Any, prefix: str) -> None:
    """Refuse the settings the LATR tree sampler cannot serve (one line naming the key)."""
    if not cfg.rollout.latr.enabled:
        return
    r, env = cfg.rollout, cfg.env
    refused = (  # (key, its value, refused?, what to do)
        ("rollout.backend", r.backend, r.backend == "vllm", "the tree runs in the built-in engine; use builtin"),
        ("rollout.async_steps", r.async_steps, r.async_steps > 0, "the tree samples synchronously; set 0"),
        ("env.task", env.task, env.task, "the tree samples single-turn responses; set false"),
        ("env.path", env.path, bool(env.path), "the tree samples single-turn responses; leave it empty"),
        ("rollout.n", r.n, r.n < 2, "a tree needs at least 2 samples per prompt; set rollout.n >= 2"),
    )
    for key, value, hit, fix in refused:
        if hit:
            raise ConfigError(f"{prefix}rollout.latr.enabled=true cannot serve {prefix}{key}={value!r}: {fix}")


@dataclasses.dataclass
class RLRolloutConfig(RolloutConfig):
    """Sampling, plus the pipelining of ``alignflow rl`` (docs/async.md)."""

    latr: LatrConfig = field(
        default_factory=LatrConfig, doc="LATR lookahead tree rollouts (docs/latr.md); built-in engine only."
    )
    async_steps: int = field(
        0,
        doc="Asynchronous rollouts (docs/async.md): 0 = synchronous (generate, then train); k >= 1 = the "
        "batch of step t is sampled, in a background thread while earlier steps train, from the policy "
        "weights after step t-k-1 (policy version max(0, t-k)): at most k versions stale. k=1 is "
        "one-step-off. Holds a second copy of the policy for the rollout.",
        range=(0, None),
    )
    async_workers: int = field(
        1,
        doc="With async_steps >= 1 and roles on Ray workers (resources): workers of the rollout worker set "
        "(each a full, unsharded copy of the policy, with resources.actor's cpus/gpus per worker); the "
        "prompts of a batch are split across them. Unused in one process.",
        range=(1, None),
    )


@dataclasses.dataclass
class RLConfig:
    """``alignflow rl``: online RL (PPO, GRPO, Dr. GRPO, DAPO, RLOO, ReMax, REINFORCE++, Safe RLHF, GSPO).

    ``train.batch_size`` is the PPO mini-batch: rows (sequences) per optimiser step, an algorithmic size;
    ``train.micro_batch_tokens`` only splits a mini-batch into forward/backward passes. ``train.max_steps``
    counts RL steps (one rollout batch each; 0: ``train.epochs`` passes over the prompts).
    """

    model: ModelConfig = field(default_factory=ModelConfig, doc="Policy (actor) model; rollout reads its weights.")
    ref_model: str = field(
        "",
        doc="Reference model; empty: the policy's initial weights (under LoRA: the policy "
        "with adapters disabled, no second copy).",
    )
    critic: CriticConfig = field(default_factory=CriticConfig, doc="Critic (PPO, Safe RLHF).")
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="prompt", eval_fraction=0.0),
        doc="Prompts (rows with 'prompt' and any fields the rewards read).",
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-6, scheduler="constant"), doc="Actor optimiser."
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(batch_size=64, packing=False, max_steps=100, log_every=1),
        doc="Loop settings.",
    )
    algo: AlgoConfig = field(default_factory=AlgoConfig, doc="Algorithm and loss.")
    kl: KLConfig = field(default_factory=KLConfig, doc="KL penalty to the reference.")
    rollout: RLRolloutConfig = field(default_factory=RLRolloutConfig, doc="Sampling (and async_steps).")
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig, doc="Reward sources.")
    dapo: DapoConfig = field(default_factory=DapoConfig, doc="Dynamic sampling and overlong shaping.")
    cost: CostConfig = field(default_factory=CostConfig, doc="Safe RLHF cost and Lagrange multiplier.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")
    resources: ResourcesConfig = field(default_factory=ResourcesConfig, doc="Placement: workers per role, devices.")
    ray: RayConfig = field(default_factory=RayConfig, doc="Ray cluster (used when resources place roles on workers).")
    env: EnvConfig = field(
        default_factory=EnvConfig, doc="Multi-turn episodes against an environment (off: single-turn rollouts)."
    )

    def check_rules(self, prefix: str = "") -> None:
        """Rules between keys, run by the loader once the config is complete."""
        _check_rl_batch(self, prefix)
        _check_latr(self, prefix)
