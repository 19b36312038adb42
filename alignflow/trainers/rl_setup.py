"""From an :class:`~alignflow.config.RLConfig` to the objects the online-RL controller drives: the roles (each in a
:class:`~alignflow.distributed.groups.LocalGroup`), the reward and cost sources, and the prompt stream.

Placement: every role is built in this process on ``train.device``. The rollout engine is built over the actor's
module itself (colocated "hybrid engine": no weight copy). The reference is a frozen copy of ``ref_model`` (default:
the policy's initial weights) -- or, when the policy has LoRA adapters and no separate ``ref_model`` is given, the
actor with its adapters disabled; it is not built at all when ``kl.coef`` is 0.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers

import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, ModelConfig, RLConfig
from alignflow.distributed.groups import LocalGroup
from alignflow.distributed.placement import roles_on_workers, set_plan, start_set, worker_device, worker_wrap
from alignflow.distributed.ray_group import WorkerSet, check_resources, init_ray, maybe_ray
from alignflow.models import get_score_head, load_causal_lm, load_tokenizer, load_value_model, seed_head_rows
from alignflow.rewards import CallableReward, CompositeReward, CostModelScorer, RewardModelScorer
from alignflow.rewards.judge import build_judge
from alignflow.rewards.pairwise import build_pairwise
from alignflow.rewards.remote import RemoteReward
from alignflow.rewards.rules import reward_options, user_code_files
from alignflow.rewards.seq2seq import build_seq2seq
from alignflow.rewards.vpl import vpl_parts
from alignflow.tasks import get_task
from alignflow.trainers.double_critic import DoubleCritic
from alignflow.trainers.loop import set_seed
from alignflow.trainers.ptx import build_ptx
from alignflow.trainers.qdhf import build_diversity
from alignflow.trainers.rl_algos import Resolved
from alignflow.trainers.roles import Actor, Critic, Reference, RewardRole, Rollout
from alignflow.trainers.vpl import build_vpl_reward

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- sources
def _weight(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"{key}: the weight must be a number, got {value!r}")
    return float(value)


def build_sources(
    section, section_name: str, task_name: str, cfg: RLConfig, device, pad_id: int, cost: bool = False
) -> CompositeReward | None:
    """A :class:`CompositeReward` of every source configured in ``section`` (``cfg.reward`` or ``cfg.cost``)."""
    task = get_task(task_name)
    table = task.costs if cost else task.rewards
    parts = []
    for name, w in section.task.items():
        if name not in table:
            raise ConfigError(
                f"{section_name}.task: task '{task_name}' has no {'cost' if cost else 'reward'} "
                f"{name!r}; valid: {', '.join(table) or '(none)'} (task.name picks the task)"
            )
        fn = CallableReward(table[name], name=name, **reward_options(cfg.reward))
        parts.append((name, fn, _weight(w, f"{section_name}.task.{name}")))
    for spec, w in section.functions.items():
        fn = CallableReward(spec, **reward_options(cfg.reward))
        parts.append((spec.rsplit(":", 1)[-1], fn, _weight(w, f"{section_name}.functions.{spec}")))
    if section.models:
        scorer_cls = CostModelScorer if cost else RewardModelScorer
        model_cfg = dataclasses.replace(
            cfg.model, lora=dataclasses.replace(cfg.model.lora, enabled=False), gradient_checkpointing=False
        )
        scorer = scorer_cls(
            list(section.models),
            section.aggregation,
            getattr(section, "uwo_lambda", 0.5),
            device,
            model_cfg=model_cfg,
            pad_token_id=pad_id,
            budget=cfg.train.micro_batch_tokens,
            tokenizer=cfg.model.tokenizer or cfg.model.name_or_path or None,
            brme_lambda=getattr(section, "brme_lambda", 0.5),
        )
        parts.append((scorer.name, scorer, getattr(section, "model_weight", 1.0)))
    remote = getattr(section, "remote", None)
    if remote is not None and remote.url:
        try:
            fn = RemoteReward(
                remote.url, remote.batch_size, remote.timeout_s, remote.retries, fields=list(remote.fields)
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        parts.append((fn.name, fn, _weight(remote.weight, f"{section_name}.remote.weight")))
    judge = getattr(section, "judge", None)
    pairwise = getattr(section, "pairwise", None)
    if pairwise is not None and (pairwise.model or pairwise.judge):  # docs/pairwise_rlhf.md
        fn = build_pairwise(pairwise, judge, device, cfg.train.seed, f"{section_name}.pairwise")
        parts.append((fn.name, fn, _weight(pairwise.weight, f"{section_name}.pairwise.weight")))
    seq2seq = getattr(section, "seq2seq", None)
    if seq2seq is not None and seq2seq.model:  # docs/seq2seq_rm.md
        fn = build_seq2seq(seq2seq, cfg, device, f"{section_name}.seq2seq")
        parts.append((fn.name, fn, _weight(seq2seq.weight, f"{section_name}.seq2seq.weight")))
    vpl = getattr(section, "vpl", None)
    if vpl is not None and vpl.model:  # docs/vpl.md: one part per user, vpl_<user>
        scorer = build_vpl_reward(vpl, device, f"{section_name}.vpl")
        parts += vpl_parts(scorer, _weight(vpl.weight, f"{section_name}.vpl.weight"))
    diversity = getattr(section, "diversity", None)
    if diversity is not None and diversity.descriptor:  # QDHF inside RL, docs/qdhf.md
        fn = build_diversity(diversity, cfg, f"{section_name}.diversity")
        parts.append((fn.name, fn, _weight(diversity.weight, f"{section_name}.diversity.weight")))
    if judge is not None and (judge.model or judge.url) and not (pairwise is not None and pairwise.judge):
        parts.append(
            (
                "judge",
                build_judge(judge, device, cfg.train.seed, f"{section_name}.judge"),
                _weight(judge.weight, f"{section_name}.judge.weight"),
            )
        )
    user = user_code_files(fn for _, fn, _ in parts if isinstance(fn, CallableReward))
    if user:
        log.info(
            "%s.functions: loaded user code %s (it runs with this process's permissions)", section_name, ", ".join(user)
        )
    return CompositeReward(parts) if parts else None


# ----------------------------------------------------------------------------------------------- prompts
class PromptStream:
    """Prompt rows in seeded epoch permutations laid end to end; ``take(k)`` returns the next k as a Batch.

    Row ``j`` of the stream gets the group uid ``j`` (unique over the run), so the samples of one prompt can be
    found however batches are filtered and refilled. ``position`` (rows taken so far) is the resumable data state.
    """

    def __init__(self, rows: list[dict], seed: int, shuffle: bool = True):
        if not rows:
            raise ConfigError("data.path: no prompt rows to train on")
        self.rows, self.seed, self.shuffle, self.position = rows, seed, shuffle, 0
        self.fields = sorted({k for r in rows for k in r} - {"prompt_ids"})
        self._perms: dict[int, list[int]] = {}

    def _index(self, pos: int) -> int:
        epoch, i = divmod(pos, len(self.rows))
        if not self.shuffle:
            return i
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.rows), generator=g).tolist()
        return self._perms[epoch][i]

    def take(self, k: int) -> Batch:
        picks = [(self.position + j, self.rows[self._index(self.position + j)]) for j in range(k)]
        self.position += k
        return prompt_batch([r for _, r in picks], [uid for uid, _ in picks], self.fields)


def prompt_batch(rows: list[dict], uids: list[int], fields: list[str]) -> Batch:
    """Rows -> Batch with meta ``prompt``, ``prompt_token_ids``, ``group`` and every field (None where missing)."""
    meta = {f: [r.get(f) for r in rows] for f in fields}
    meta["prompt_token_ids"] = [list(r["prompt_ids"]) for r in rows]
    meta["group"] = list(uids)
    return Batch(meta=meta)


# ----------------------------------------------------------------------------------------------- roles
@dataclasses.dataclass
class Roles:
    rollout: LocalGroup
    actor: LocalGroup
    reward: LocalGroup | None = None  # None with multi-turn episodes (the environment rewards)
    ref: LocalGroup | None = None
    critic: LocalGroup | None = None
    cost: LocalGroup | None = None
    cost_critic: LocalGroup | None = None
    ref_rollout: LocalGroup | None = None  # reward.shaping: the reference policy answering prompts (rl_par.py)
    tokenizer: object = None
    placement: object = None  # RayPlacement when the roles run on Ray workers (None: this process)


def _frozen_cfg(cfg: RLConfig, path: str) -> ModelConfig:
    """The policy's loading options for another model (no LoRA, no activation checkpointing)."""
    return dataclasses.replace(
        cfg.model,
        name_or_path=path,
        lora=dataclasses.replace(cfg.model.lora, enabled=False),
        gradient_checkpointing=False,
    )


def _critic(
    cfg: RLConfig,
    init: str,
    tok,
    total: int,
    device,
    key: str,
    returns_key: str,
    prefix: str,
    wrap=lambda m: m,
    seed: int | None = None,
) -> Critic:
    """A critic from ``init``. ``seed``: its value head is drawn afresh from this seed even when ``init`` has one
    (the double critic's two different initialisations); None: a head missing from ``init`` is seeded from
    ``train.seed``."""
    model_cfg = dataclasses.replace(_frozen_cfg(cfg, init), gradient_checkpointing=cfg.model.gradient_checkpointing)
    model = load_value_model(model_cfg, device, pad_token_id=tok.pad_token_id, seed=cfg.train.seed)
    if seed is not None:
        with torch.no_grad():
            seed_head_rows(get_score_head(model), seed)
    model = wrap(model)
    model.train()
    return Critic(model, cfg.critic.optim, cfg.train, cfg.algo, total, device, key, returns_key, prefix)


def role_objects(
    cfg: RLConfig, algo: Resolved, device, total_opt_steps: int, tok, names: tuple[str, ...], wrap=lambda m: m
) -> dict:
    """The role objects named in ``names`` (actor, rollout, ref, critic, cost_critic, reward, cost), built on
    ``device``; ``wrap`` transforms every trained or reference model right after loading (``shard`` on workers).
    The rollout role needs the actor (it reads the actor's module), and a LoRA reference needs it too."""
    out: dict = {}
    if "actor" in names:
        policy = wrap(load_causal_lm(cfg.model, device))
        policy.train()
        out["actor"] = Actor(
            policy, cfg.optim, cfg.train, algo, cfg.algo, cfg.rollout.temperature, total_opt_steps, device
        )
        out["actor"].ptx = build_ptx(cfg, tok)  # None unless algo.ptx_coef > 0
        if "rollout" in names:
            out["rollout"] = Rollout(policy, tok, cfg.rollout, device, cfg.train.mixed_precision, cfg.train.seed)
    if "ref" in names:
        common = dict(
            temperature=cfg.rollout.temperature,
            budget=cfg.train.micro_batch_tokens,
            device=device,
            mixed_precision=cfg.train.mixed_precision,
        )
        if cfg.model.lora.enabled and not cfg.ref_model:
            out["ref"] = Reference(lora_actor=out["actor"].model, **common)
        else:
            out["ref"] = Reference(
                model=wrap(load_causal_lm(_frozen_cfg(cfg, cfg.ref_model or cfg.model.name_or_path), device)), **common
            )
        if cfg.reward.shaping != "none":  # the reference policy answers prompts (builtin engine, M samples each)
            ref_cfg = dataclasses.replace(
                cfg.rollout,
                backend="builtin",
                n=cfg.reward.reference_samples,
                latr=dataclasses.replace(cfg.rollout.latr, enabled=False),  # plain samples of the reference
            )
            out["ref_rollout"] = Rollout(
                out["ref"].model, tok, ref_cfg, device, cfg.train.mixed_precision, cfg.train.seed
            )
    if "critic" in names:
        init = cfg.critic.name_or_path or (cfg.reward.models[0] if cfg.reward.models else cfg.model.name_or_path)
        if cfg.critic.double:  # SAFE: two critics, different value-head seeds, GAE on their soft minimum
            pair = [
                _critic(cfg, init, tok, total_opt_steps, device, f"values_{i}", "returns", p, wrap, cfg.train.seed + i)
                for i, p in ((1, "critic"), (2, "critic2"))
            ]
            out["critic"] = DoubleCritic(*pair, cfg.critic.soft_min_tau)
        else:
            out["critic"] = _critic(cfg, init, tok, total_opt_steps, device, "values", "returns", "critic", wrap)
    if "cost_critic" in names:
        init = cfg.cost.models[0] if cfg.cost.models else cfg.model.name_or_path
        out["cost_critic"] = _critic(
            cfg, init, tok, total_opt_steps, device, "cost_values", "cost_returns", "cost_critic", wrap
        )
    if "reward" in names:
        reward = build_sources(cfg.reward, "reward", cfg.task.name, cfg, device, tok.pad_token_id)
        if reward is None:
            raise ConfigError("no reward source: set reward.task (e.g. {gold: 1.0}), reward.functions or reward.models")
        r = cfg.reward  # RLMT: reward.answer_* score the answer after the thinking only
        out["reward"] = RewardRole(reward, answer=(r.answer_after, r.answer_before, r.answer_strict))
    if "cost" in names:
        cost = build_sources(cfg.cost, "cost", cfg.task.name, cfg, device, tok.pad_token_id, cost=True)
        if cost is None:
            raise ConfigError(
                "algo.name=safe_ppo needs a cost source: cost.task (reviews: {ungrammatical: 1.0}), "
                "cost.functions or cost.models"
            )
        out["cost"] = RewardRole(cost, key="costs")
    return out


def needed_roles(cfg: RLConfig, algo: Resolved) -> tuple[str, ...]:
    """The roles the algorithm's dataflow uses (the reference only with a KL term, critics only for PPO/Safe RLHF)."""
    names = ["actor", "rollout"] + ([] if cfg.env.task or cfg.env.path else ["reward"])  # episodes: env rewards
    names += ["ref"] if cfg.kl.coef > 0 or cfg.reward.shaping != "none" else []
    names += ["critic"] if algo.critic else []
    names += ["cost", "cost_critic"] if algo.cost else []
    return tuple(names)


def build_roles(cfg: RLConfig, algo: Resolved, device, total_opt_steps: int, tok=None) -> Roles:
    """Load the models and build every role the algorithm's dataflow needs: in this process (LocalGroup), or on
    Ray workers when ``cfg.resources`` says so (``alignflow.distributed.placement``)."""
    if tok is None:
        tok = load_tokenizer(
            cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code
        )
    if maybe_ray(cfg.resources):
        placement = RayPlacement(cfg, algo, total_opt_steps, needed_roles(cfg, algo), tok)
        return Roles(tokenizer=tok, placement=placement, **placement.groups())
    objs = role_objects(cfg, algo, device, total_opt_steps, tok, needed_roles(cfg, algo))
    return Roles(tokenizer=tok, **{name: LocalGroup(role) for name, role in objs.items()})


# ----------------------------------------------------------------------------------------------- Ray placement
def build_worker_roles(cfg: RLConfig, algo, total_opt_steps: int, names: tuple[str, ...]) -> dict:
    """Runs INSIDE each worker (after it joined the process group): load, shard and wrap the named roles."""
    device = worker_device()
    set_seed(cfg.train.seed)  # the same initialisation on every rank (value heads), as in one process
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    return role_objects(cfg, algo, device, total_opt_steps, tok, names, worker_wrap(cfg, device))


class RayPlacement:
    """The worker sets of one RL run and the role groups over them; ``restart()`` rebuilds every set."""

    def __init__(self, cfg: RLConfig, algo, total_opt_steps: int, names: tuple[str, ...], tok):
        r = cfg.resources
        workers = max(r.actor.workers, 1)
        if cfg.train.batch_size < workers:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} is smaller than resources.actor.workers="
                f"{workers}: every worker needs at least one row of each mini-batch"
            )
        if cfg.model.lora.enabled:
            raise ConfigError(
                "resources: LoRA actors on Ray workers are not supported yet (FSDP2 + peft is "
                "untested here); train LoRA in one process (resources.actor.workers=1)"
            )
        init_ray(cfg.ray.address, cfg.ray.namespace, cfg.ray.num_cpus)
        self.sets: dict[str, WorkerSet] = {}
        self.local: dict = {}
        layout = roles_on_workers(cfg, names)
        plan = set_plan(cfg, layout)
        check_resources([(s, n, res.cpus_per_worker, res.gpus_per_worker) for s, (res, n) in plan.items()])
        for set_name, roles in layout.items():
            res, n = plan[set_name]
            self.sets[set_name] = start_set(
                cfg, set_name, res, n, build_worker_roles, (cfg, algo, total_opt_steps, tuple(roles))
            )
        on_workers = {n for roles in layout.values() for n in roles}
        rest = tuple(n for n in names if n not in on_workers)
        if rest:  # rule-based rewards and costs: in this process
            self.local = {
                n: LocalGroup(o)
                for n, o in role_objects(cfg, algo, torch.device("cpu"), total_opt_steps, tok, rest).items()
            }
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
