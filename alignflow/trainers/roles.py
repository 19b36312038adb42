"""The roles of online RL: objects with a handful of batch-in, batch-out methods (docs/design.md).

==========  =====================================================  ===========================================
role        methods                                                adds to the batch
==========  =====================================================  ===========================================
Rollout     ``generate(prompts, greedy=False)``                     the engine's fields, meta ``response``
RewardRole  ``score(batch)``                                        ``scores`` (B,) and ``scores/<source>`` (B,)
Reference   ``logprobs(batch)``                                     ``ref_logprobs`` (B, Tr)
Actor       ``logprobs(batch)``, ``update(batch)``, ``save/load``   ``old_logprobs``, ``entropy`` (B, Tr)
Critic      ``values(batch)``, ``update(batch)``, ``save/load``     ``values`` (B, Tr) (or ``cost_values``)
==========  =====================================================  ===========================================

Every method takes a :class:`~alignflow.batch.Batch` and returns a Batch of *new* fields (the controller merges
them with ``batch.union``), or, for ``update``, a dict of metrics. Nothing else crosses a role boundary, so a
``RayGroup`` can split the input across data-parallel workers and concatenate the outputs
(:mod:`alignflow.distributed.groups`).

Token layout: ``input_ids`` (B, Tp + Tr) is the left-padded prompt then the right-padded response; every
per-token RL tensor is over the response only, (B, Tr), aligned with ``response_mask``. ``*_logprobs[:, t]`` is
``log π(y_t | x, y_<t)``; ``values[:, t]`` is the critic's value of the state *before* ``y_t``
(``V(x, y_<t)``, read at input position Tp + t − 1), the InstructGPT/TRL convention for GAE.

Micro-batches: rows are grouped by length under ``train.micro_batch_tokens`` and each group is cut to its own
longest prompt and response, so padding costs little. Losses divide by counts of the whole mini-batch
(``global_tokens`` / ``global_seqs``), so the update does not depend on the split (tested). Dropout: ``logprobs``
and ``values`` run in eval mode, ``update`` in train mode; the policies we target (Llama, Qwen) have no dropout,
so the PPO ratio is exactly 1 before the first update.
"""

from __future__ import annotations

import contextlib

import torch

from alignflow.algorithms.core import masked_mean
from alignflow.algorithms.kl import kl_loss
from alignflow.algorithms.policy import entropy_bonus, gspo_policy_loss, ppo_policy_loss, value_loss, vanilla_pg_loss
from alignflow.batch import Batch
from alignflow.data.collate import token_budget_groups
from alignflow.distributed.checkpoint import load_checkpoint, save_checkpoint
from alignflow.distributed.groups import dispatch, dp_equal_groups, dp_max, dp_sum, dp_sum_dict, dp_world_size
from alignflow.distributed.save import save_model
from alignflow.distributed.shard import full_state_dict, gathered, through_root
from alignflow.models.backbone import get_score_head
from alignflow.models.heads import token_values
from alignflow.models.logprobs import selected_logprobs, token_logprobs
from alignflow.models.varlen import flat_hidden_states, supports_varlen
from alignflow.rewards.thinking import TOKEN_FIELDS, answers
from alignflow.rollout import HFEngine, SamplingParams
from alignflow.rollout.latr_tree import TreeSampler
from alignflow.rollout.vllm_engine import VLLMEngine, actor_weights
from alignflow.trainers import loop
from alignflow.trainers.ptx import ptx_loss

RESPONSE_FIELDS = (
    "response_ids",
    "response_mask",
    "sampling_logprobs",
    "old_logprobs",
    "ref_logprobs",
    "entropy",
    "values",
    "values_1",  # SAFE's double critic: each critic's own values (trainers/double_critic.py)
    "values_2",
    "cost_values",
    "advantages",
    "returns",
    "cost_returns",
    "is_weights",
)


# ----------------------------------------------------------------------------------------------- micro-batches
def micro_batches(batch: Batch, budget: int) -> list[tuple[torch.Tensor, Batch, int]]:
    """Length-sorted row groups under ``budget`` tokens: (row index, trimmed sub-batch, prompt width) each.

    A sub-batch keeps the last ``pw`` prompt columns (its longest prompt) and the first ``rw`` response columns
    (its longest response) of every token tensor; (B, Tr) response tensors keep their first ``rw`` columns.

    Under data parallelism every rank runs as many micro-batches as the busiest (:func:`dp_equal_groups`); a
    padding micro-batch comes with an EMPTY row index, which the callers run and then ignore (their loss counts 0
    and their outputs are not written).
    """
    budget = budget or loop.default_micro_batch_tokens(batch["prompt_mask"].device)  # 0: by device
    p_len = batch["prompt_mask"].sum(-1).cpu()  # (B,) on the host: group sizes and widths need no device sync
    # (B,) response tokens; multi-turn episodes attend to observation tokens outside the loss mask too
    true_r = batch["response_attention" if "response_attention" in batch else "response_mask"].sum(-1).cpu()
    r_len = true_r.clamp(min=1)
    Tp = batch["prompt_mask"].shape[1]
    groups = dp_equal_groups(token_budget_groups((p_len + r_len).tolist(), budget))
    if not len(batch) and groups:
        raise RuntimeError(
            "a data-parallel rank got no rows: the batch has fewer rows than workers "
            "(train.batch_size must be >= resources.actor.workers)"
        )
    out = []
    for rows, weight in groups:
        idx = torch.tensor(rows, dtype=torch.long)
        pw, rw = int(p_len[idx].max()), int(r_len[idx].max())
        sub = {}
        for k, v in batch.tensors.items():
            v = v[idx.to(v.device)]
            if k in ("input_ids", "attention_mask", "position_ids"):
                sub[k] = v[:, Tp - pw : Tp + rw]  # (b, pw + rw)
            elif k in RESPONSE_FIELDS:
                sub[k] = v[:, :rw]  # (b, rw)
            elif v.dim() == 1:
                sub[k] = v  # (b,)
        lens = (p_len[idx] + true_r[idx]).tolist()  # real tokens per row (the padding-free lengths)
        out.append((idx if weight else idx[:0], Batch(sub, {"seq_lens": lens}), pw))
    return out


def scatter_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], rows: int, width: int) -> torch.Tensor:
    """Place (index, (b, w) values) pieces back into a zero (rows, width) tensor (w <= width)."""
    first = parts[0][1]
    out = torch.zeros(rows, width, dtype=first.dtype, device=first.device)
    for idx, values in parts:
        if len(idx):  # an empty index is a padding micro-batch (see micro_batches)
            out[idx.to(out.device), : values.shape[1]] = values
    return out


def _flat(mb: Batch) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The micro-batch's real tokens laid end to end: ((1, N) ids, (b, pw + rw) bool mask of where they sit in
    the padded layout, per-row lengths). Row i's tokens are its prompt then its response, as in the padded row.
    The lengths come from the host copy :func:`micro_batches` keeps (``seq_lens`` meta), so no device sync."""
    keep = mb["attention_mask"].bool()  # (b, pw + rw): left-padded prompt, right-padded response
    lens = mb.meta.get("seq_lens") or keep.sum(-1).tolist()
    return mb["input_ids"][keep][None], keep, lens


def _unflat(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(1, N) per-token values back into the padded (b, pw + rw) layout, zeros at padding."""
    out = values.new_zeros(keep.shape)
    out[keep] = values[0]
    return out


def response_logprobs(
    model, mb: Batch, pw: int, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the response tokens of a micro-batch: (b, rw) each.

    Padding-free when the model supports it (``alignflow.models.varlen``): the linear layers then run over the
    real tokens only instead of the padded (b, pw + rw) rectangle -- RL rows vary a lot in length, and a padded
    micro-batch computed 2.5x as many positions as real tokens in the GRPO benchmark -- and the LM head runs
    over the response tokens only (:func:`~alignflow.models.logprobs.selected_logprobs`). Same values either way.
    """
    if supports_varlen(model):
        ids, keep, lens = _flat(mb)
        response = keep.clone()
        response[:, :pw] = False  # (b, pw + rw): the response tokens
        where = response[keep][None]  # (1, N)
        lp, ent = through_root(
            model,
            lambda: selected_logprobs(
                model, ids, where, seq_lens=lens, with_entropy=with_entropy, temperature=temperature
            ),
        )
        out_lp = lp.new_zeros(keep.shape)
        out_lp[response] = lp  # (b, pw + rw)
        out_ent = None
        if ent is not None:
            out_ent = ent.new_zeros(keep.shape)
            out_ent[response] = ent
        return out_lp[:, pw:], (out_ent[:, pw:] if out_ent is not None else None)
    lp, ent = through_root(
        model,
        lambda: token_logprobs(
            model,
            mb["input_ids"],
            mb["attention_mask"],
            mb["position_ids"],
            with_entropy=with_entropy,
            temperature=temperature,
        ),
    )  # (b, pw + rw)
    return lp[:, pw:], (ent[:, pw:] if ent is not None else None)


def response_values(model, mb: Batch, pw: int) -> torch.Tensor:
    """Critic values V(x, y_<t) for every response token t of a micro-batch: (b, rw); padding-free when the
    model supports it, like :func:`response_logprobs`."""
    if supports_varlen(model):
        ids, keep, lens = _flat(mb)
        h = through_root(model, lambda: get_score_head(model)(flat_hidden_states(model, ids, lens)))  # (1, N, 1)
        v = _unflat(h.squeeze(-1).float(), keep)  # (b, pw + rw)
    else:
        v = through_root(
            model, lambda: token_values(model, mb["input_ids"], mb["attention_mask"], mb["position_ids"])
        )  # (b, pw + rw)
    return v[:, pw - 1 : -1]  # position Tp + t - 1 holds the state before y_t


@contextlib.contextmanager
def eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


# ----------------------------------------------------------------------------------------------- rollout
class Rollout:
    """Generation with the built-in engine over the ACTOR's module itself (the same object: no copy, no sync), or,
    with ``rollout.backend: vllm``, with a vLLM engine that receives the actor's current weights before each
    generation and sleeps (frees its GPU memory) after it (:mod:`alignflow.rollout.vllm_engine`, docs/vllm.md).

    ``generate(prompts)`` takes a Batch of prompt rows (meta ``prompt`` text, ``prompt_token_ids`` lists,
    ``group`` uid and any other row fields) and returns ``n`` samples per prompt: the engine's tensors plus the
    prompt rows' meta repeated, and meta ``response`` (decoded, special tokens removed) for the rewards.
    """

    def __init__(self, model, tokenizer, cfg, device, mixed_precision: str = "none", seed: int = 0):
        self.model, self.vllm = model, cfg.backend == "vllm"
        self.engine = (
            VLLMEngine.from_config(model, tokenizer, cfg, seed=seed, device=device)
            if self.vllm
            else HFEngine(model, tokenizer)
        )
        self.tokenizer, self.cfg, self.device, self.mp, self.seed = tokenizer, cfg, device, mixed_precision, seed
        latr = getattr(cfg, "latr", None)  # LATR trees (alignflow rl only): sampled groups, not greedy decodes
        self.tree = TreeSampler(self.engine, latr) if latr is not None and latr.enabled and not self.vllm else None
        self.step = 0  # the RL step, for the LATR tree share's decay

    @dispatch("all")
    def set_step(self, step: int) -> None:
        """The RL step about to sample (the LATR tree share decays with it)."""
        self.step = step

    @dispatch("split")
    def generate(self, prompts: Batch, greedy: bool = False) -> Batch:
        with gathered(self.model):  # sharded actor: its full weights, for this call only (collective)
            if not len(prompts):  # a data-parallel rank with no prompts still joins the gather above
                return Batch()
            n = 1 if greedy else self.cfg.n
            params = SamplingParams(
                n=n,
                temperature=0.0 if greedy else self.cfg.temperature,
                top_p=self.cfg.top_p,
                top_k=self.cfg.top_k,
                max_new_tokens=self.cfg.max_new_tokens,
                stop_strings=list(self.cfg.stop_strings),
                logprobs=True,
                # One seed per prompt from its group uid (unique per prompt row over a run):
                # a prompt's samples are the same whichever batch or worker it lands in, and
                # a resumed run draws the same samples.
                seeds=[self.seed * 1_000_003 + int(uid) for uid in prompts["group"]],
            )
            ids = [list(p) for p in prompts["prompt_token_ids"]]
            if self.vllm:  # push the actor's current (gathered, LoRA-merged) weights, generate, sleep
                out = self.engine.generate_from(actor_weights(self.model), ids, params)
            else:
                with loop.autocast(self.device, self.mp):
                    if self.tree is not None and not greedy:
                        out = self.tree.generate(ids, params, self.step)
                    else:
                        out = self.engine.generate(ids, params)
        ids, mask = out["response_ids"], out["response_mask"]
        texts = self.tokenizer.batch_decode(
            [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=False)], skip_special_tokens=True
        )
        rows = Batch(meta={k: v for k, v in prompts.meta.items() if k != "prompt_token_ids"}).repeat(n)
        return out.union(rows).union(Batch(meta={"response": texts}))

    @dispatch("split")
    def with_engine(self, prompts: Batch, fn, *args) -> Batch:
        """``fn(engine, tokenizer, prompts, *args) -> Batch`` for callers that make several ``generate`` calls with
        one policy version (multi-turn episodes: one call per turn, trainers/multiturn_rl.py). The engine holds
        the actor's current weights throughout: a sharded actor is gathered once; the vLLM engine gets the
        weights pushed once before ``fn`` and sleeps once after it (not between the calls, so its prefix cache
        survives from one turn to the next). ``fn`` must be picklable (a module-level function) on Ray."""
        with gathered(self.model):  # collective: every rank enters, even one without prompts
            if not len(prompts):
                return Batch()
            if self.vllm:
                self.engine.sync_weights(actor_weights(self.model))
            try:
                # vLLM runs its own kernels (in this process with one GPU): no autocast around it
                amp = contextlib.nullcontext() if self.vllm else loop.autocast(self.device, self.mp)
                with amp:
                    return fn(self.engine, self.tokenizer, prompts, *args)
            finally:
                if self.vllm and self.engine.enable_sleep_mode:
                    self.engine.sleep(level=2)


# ----------------------------------------------------------------------------------------------- rewards
class RewardRole:
    """Scores rows with a :class:`~alignflow.rewards.CompositeReward`: ``key`` (B,), ``key/<source>`` (B,) and
    ``key_failures/<kind>`` (B,): on each row, how many sources failed and gave ``reward.error_score`` instead.

    A failing source raises (the reward module's ``RewardError`` names the function, the row and its prompt)
    unless ``reward.on_error=score``; nothing is swallowed. The cost role of Safe RLHF is a RewardRole with
    ``key="costs"``.

    A source may leave per-row tensors in its ``last_fields`` after a call (``alignflow.rewards.pairwise``:
    ``pair_prefs``, ``anchor_prefs``, ...; ``alignflow.rewards.seq2seq``: ``token_scores`` (B, Tr), weighted
    here like its value); they join the reward role's output for the advantage step.
    """

    def __init__(self, composite, key: str = "scores", answer: tuple[str, str, bool] | None = None):
        self.composite, self.key = composite, key
        self.answer = answer if answer and answer[0] else None  # RLMT (after, before, strict): rewards/thinking.py

    @dispatch("one")
    def sources_state(self) -> dict:
        """The reward sources' state across steps (:meth:`CompositeReward.state_dict`), for the RL checkpoint;
        with several reward workers, rank 0's."""
        return self.composite.state_dict()

    @dispatch("all")
    def load_sources_state(self, state: dict) -> None:
        self.composite.load_state_dict(state)

    @dispatch("split")
    def score(self, batch: Batch) -> Batch:
        if self.answer is not None:  # RLMT: the sources see the answer after the thinking, as text (no token ids)
            meta = batch.meta | {"response": answers(batch["response"], *self.answer)}
            batch = Batch({k: v for k, v in batch.tensors.items() if k not in TOKEN_FIELDS}, meta)
        parts, failures = self.composite.evaluate(batch)
        total = torch.zeros(len(batch), device=next(iter(parts.values())).device)
        extra: dict = {}  # per-row tensors a source leaves besides its value (pairwise preferences, token rewards)
        for name, fn, weight in self.composite.parts:
            total = total + weight * parts[name]
            fields = dict(getattr(fn, "last_fields", None) or {})
            if "token_scores" in fields:  # (B, Tr) token rewards: weighted, summed over the sources
                tok = weight * fields.pop("token_scores")
                extra["token_scores"] = extra["token_scores"] + tok if "token_scores" in extra else tok
            extra |= fields
        return Batch(
            {
                self.key: total,
                **{f"{self.key}/{name}": v for name, v in parts.items()},
                **{f"{self.key}_failures/{kind}": v for kind, v in failures.items()},
                **(extra if self.key == "scores" else {}),
            }
        )


# ----------------------------------------------------------------------------------------------- reference
class Reference:
    """Frozen reference log-probs. ``model``: a separate frozen copy; or ``None`` with ``lora_actor``: the actor's
    peft model with its adapters disabled (``with model.disable_adapter()``), i.e. the base weights, no copy."""

    def __init__(
        self,
        model=None,
        lora_actor=None,
        temperature: float = 1.0,
        budget: int = 8192,
        device="cpu",
        mixed_precision: str = "none",
    ):
        if (model is None) == (lora_actor is None):
            raise ValueError("Reference needs exactly one of model= (a frozen copy) or lora_actor= (adapters off)")
        self.model = model if model is not None else lora_actor
        self.shared = lora_actor is not None
        if model is not None:
            model.requires_grad_(False)
            model.eval()
        self.temperature, self.budget, self.device, self.mp = temperature, budget, device, mixed_precision
        self.calls = 0

    @dispatch("split")
    @torch.no_grad()
    def logprobs(self, batch: Batch) -> Batch:
        self.calls += 1
        adapters_off = self.model.disable_adapter() if self.shared else contextlib.nullcontext()
        parts = []
        with adapters_off, eval_mode(self.model), loop.autocast(self.device, self.mp):
            for idx, mb, pw in micro_batches(batch, self.budget):
                parts.append((idx, response_logprobs(self.model, mb, pw, self.temperature, False)[0]))
        return Batch({"ref_logprobs": scatter_rows(parts, len(batch), batch["response_mask"].shape[1])})


# ----------------------------------------------------------------------------------------------- trainable roles
class Optimised:
    """A model's optimiser, schedule, guarded step and checkpoint files; the actor and the critic each hold one
    (composition: the roles keep their maths, this keeps the bookkeeping)."""

    def __init__(self, model, optim_cfg, train_cfg, total_steps: int):
        self.model, self.optim_cfg, self.train_cfg = model, optim_cfg, train_cfg
        self.opt = loop.build_optimizer(model, optim_cfg)
        self.sched = loop.build_scheduler(self.opt, optim_cfg, max(1, total_steps))
        self.steps = 0  # optimiser steps taken

    def step(self, terms: dict, label: str) -> dict:
        """Guard the accumulated loss terms, clip, step. ``label`` names the RL step in a diagnostic."""
        if dp_world_size() > 1:  # every rank must skip (or raise) together, or the next collective hangs
            bad_here = loop.check_finite(label, terms) is not None
            if dp_max(float(bad_here)) > 0 and not bad_here:
                terms = {"(a loss term on another rank)": torch.tensor(float("nan"))} | terms
        if not loop.guard_loss(label, self.train_cfg, terms):
            self.opt.zero_grad(set_to_none=True)
            return {"skipped": 1.0}
        norm, stepped = loop.optimizer_step(
            self.model, self.opt, self.sched, self.train_cfg, self.optim_cfg.max_grad_norm, label
        )
        self.steps += int(stepped)
        return {"grad_norm": norm, "lr": self.sched.get_last_lr()[0], "skipped": float(not stepped)}

    def save(self, path, state: dict | None = None) -> None:
        save_checkpoint(path, self.model, self.opt, self.sched, {"role_steps": self.steps, **(state or {})})

    def load(self, path) -> dict:
        state = load_checkpoint(path, self.model, self.opt, self.sched)
        self.steps = int(state.get("role_steps", 0))
        return state


class TrainedRole:
    """What the actor and the critic share: ``self.model`` trained through ``self.optim`` (:class:`Optimised`),
    its weights and its checkpoint files."""

    model: torch.nn.Module
    optim: Optimised

    @dispatch("one")
    def state_dict(self) -> dict:
        """The model's weights; consolidated from the shards (collective, on CPU) when it is sharded."""
        return full_state_dict(self.model)

    @dispatch("one")
    def save(self, path, state: dict | None = None) -> None:
        self.optim.save(path, state)

    @dispatch("all")
    def load(self, path) -> dict:
        return self.optim.load(path)

    @dispatch("one")
    def export(self, path, tokenizer=None) -> None:
        """A Hugging Face model directory of the current weights (consolidated from the shards when sharded)."""

        save_model(self.model, tokenizer, path)


def host_floats(values: dict) -> dict:
    """Metrics that may be device tensors, as Python floats with ONE device-to-host copy for all of them (a
    ``float()`` per metric would wait for the device once each)."""
    keys = [k for k, v in values.items() if torch.is_tensor(v)]
    out = {k: float(v) for k, v in values.items() if not torch.is_tensor(v)}
    if keys:
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys]).tolist()
        out |= dict(zip(keys, stacked, strict=False))
    return out


def _counts(mask: torch.Tensor, agg: str) -> dict:
    """The mini-batch-wide denominator of ``agg`` (all-reduced under data parallelism)."""
    if agg == "token_mean":
        return {"global_tokens": max(dp_sum(mask.sum().item()), 1.0)}
    return {"global_seqs": max(dp_sum((mask.sum(-1) > 0).sum().item()), 1.0)}


def _ppo_term(lp, mb, adv, algo, kw):
    return ppo_policy_loss(
        lp, mb["old_logprobs"], adv, mb["response_mask"], algo.clip_low, algo.clip_high, algo.dual_clip or None, **kw
    )


def _gspo_term(lp, mb, adv, algo, kw):
    return gspo_policy_loss(lp, mb["old_logprobs"], adv, mb["response_mask"], algo.clip_low, algo.clip_high, **kw)


def _pg_term(lp, mb, adv, algo, kw):
    return vanilla_pg_loss(lp, adv, mb["response_mask"], **kw)


POLICY_TERMS = {"ppo": _ppo_term, "gspo": _gspo_term, "vanilla_pg": _pg_term}


class Actor(TrainedRole):
    """The policy being trained: ``logprobs`` (old log-probs and entropies) and ``update`` (one optimiser step).

    algo: the resolved algorithm (:class:`~alignflow.trainers.rl_algos.Resolved`); algo_cfg: ``cfg.algo`` (clip,
    entropy coefficient); temperature: the sampling temperature (log-probs are of the tempered policy).
    """

    def __init__(self, model, optim_cfg, train_cfg, algo, algo_cfg, temperature: float, total_steps: int, device):
        self.model, self.train_cfg, self.device = model, train_cfg, device
        self.optim = Optimised(model, optim_cfg, train_cfg, total_steps)
        self.algo, self.algo_cfg, self.temperature = algo, algo_cfg, temperature
        self.kl_coef = 0.0  # beta of the KL loss term (set by the controller each step)
        self.label = "?"  # the RL step being trained, named in a non-finite diagnostic
        self.ptx = None  # PTXStream when algo.ptx_coef > 0 (trainers/ptx.py)

    @dispatch("all")
    def set_kl_coef(self, beta: float, label: str = "?") -> None:
        self.kl_coef, self.label = float(beta), label

    @dispatch("split")
    @torch.no_grad()
    def logprobs(self, batch: Batch) -> Batch:
        lps, ents = [], []
        with eval_mode(self.model), loop.autocast(self.device, self.train_cfg.mixed_precision):
            for idx, mb, pw in micro_batches(batch, self.train_cfg.micro_batch_tokens):
                lp, ent = response_logprobs(self.model, mb, pw, self.temperature, True)
                lps.append((idx, lp))
                ents.append((idx, ent))
        width = batch["response_mask"].shape[1]
        return Batch(
            {"old_logprobs": scatter_rows(lps, len(batch), width), "entropy": scatter_rows(ents, len(batch), width)}
        )

    def _loss_terms(self, mb: Batch, pw: int, kw: dict) -> tuple[dict, dict, dict]:
        """One micro-batch: (terms, their coefficients, metrics). Each term is already divided by the mini-batch-wide
        count, so summing a term over micro-batches gives its mini-batch value; the loss is Σ coef·term."""
        bonus = self.algo_cfg.entropy_coef > 0
        with_entropy = bonus or "entropy" not in mb  # no prior logprobs pass: measure the entropy here
        lp, ent = response_logprobs(self.model, mb, pw, self.temperature, with_entropy)  # (b, rw)
        adv = mb["advantages"] * mb["is_weights"] if "is_weights" in mb else mb["advantages"]  # TIS, see rl_algos
        policy, metrics = POLICY_TERMS[self.algo.policy_loss](lp, mb, adv, self.algo_cfg, kw)
        terms, coefs = {"policy_loss": policy}, {"policy_loss": 1.0}
        if self.algo.kl_placement == "loss" and self.kl_coef > 0:
            terms["kl_loss"], _ = kl_loss(lp, mb["ref_logprobs"], mb["response_mask"], self.algo.kl_estimator, **kw)
            coefs["kl_loss"] = self.kl_coef
        if bonus:
            target = self.algo_cfg.entropy_target or None  # PPO-max entropy clip |H − target|
            terms["entropy_loss"], _ = entropy_bonus(ent, mb["response_mask"], target=target, **kw)  # −H, aggregated
            coefs["entropy_loss"] = self.algo_cfg.entropy_coef
        if "entropy" not in mb:
            metrics["policy/entropy"] = masked_mean(ent.detach(), mb["response_mask"])  # token mean of this micro-batch
        return terms, coefs, metrics

    @dispatch("split")
    def update(self, batch: Batch) -> dict:
        """One optimiser step on the mini-batch ``batch`` (fields: tokens, ``response_mask``, ``old_logprobs``,
        ``advantages``, optionally ``is_weights`` and ``ref_logprobs``). Returns metrics (``policy/*``): the loss
        terms unscaled (``policy_loss``, ``kl_loss`` = the KL estimate, ``entropy_loss`` = −entropy) and the loss
        function's token means (``clipfrac``, ``approx_kl``, ...)."""
        mask = batch["response_mask"]
        agg = self.algo.loss_agg
        kw = {"agg": agg, "norm_len": self.algo.norm_len, **_counts(mask, agg)}
        totals: dict = {}
        metrics: dict = {}
        n_tok, scale = max(dp_sum(mask.sum().item()), 1.0), dp_world_size()  # tokens of the whole mini-batch
        self.model.train()
        for idx, mb, pw in micro_batches(batch, self.train_cfg.micro_batch_tokens):
            real = float(len(idx) > 0)  # 0 for a padding micro-batch: it runs (collectives) but counts nothing
            with loop.autocast(self.device, self.train_cfg.mixed_precision):
                terms, coefs, m = self._loss_terms(mb, pw, kw)
            (sum(coefs[k] * v for k, v in terms.items()) * (scale * real)).backward()
            # token-weighted mean of micro-batch token means; a device tensor: no host sync in this loop
            share = mb["response_mask"].sum() * (real / n_tok)
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.detach() * real
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v * share
        if self.ptx is not None:
            totals["ptx_loss"] = self._ptx_backward()
        step = self.optim.step(totals, self.label)
        metrics = host_floats(metrics) | host_floats({f"policy/{k}": v for k, v in totals.items()})
        return dp_sum_dict(metrics) | {f"policy/{k}": v for k, v in step.items()}

    def _ptx_backward(self) -> torch.Tensor:
        """PPO-ptx (trainers/ptx.py): backpropagate ptx_coef · the token-mean NLL of the next SFT rows into this
        optimiser step. Every rank computes the same rows (FSDP's gradient mean keeps the term); the NLL is
        returned divided by the ranks because the update's metrics are summed over them."""

        k = self.algo_cfg.ptx_batch_size
        with loop.autocast(self.device, self.train_cfg.mixed_precision):
            loss, _ = ptx_loss(self.model, self.ptx.at(self.optim.steps * k, k), self.device)
        (self.algo_cfg.ptx_coef * loss).backward()
        return loss.detach() / dp_world_size()


class Critic(TrainedRole):
    """A value model: ``values(batch)`` adds ``key`` (B, Tr); ``update(batch)`` regresses it on ``returns_key``
    with the clipped value loss, token mean over the mini-batch, times ``vf_coef``."""

    def __init__(
        self,
        model,
        optim_cfg,
        train_cfg,
        algo_cfg,
        total_steps: int,
        device,
        key: str = "values",
        returns_key: str = "returns",
        prefix: str = "critic",
    ):
        self.model, self.train_cfg, self.device = model, train_cfg, device
        self.optim = Optimised(model, optim_cfg, train_cfg, total_steps)
        self.algo_cfg, self.key, self.returns_key, self.prefix = algo_cfg, key, returns_key, prefix
        self.label = "?"

    @dispatch("all")
    def set_label(self, label: str) -> None:
        self.label = str(label)

    @dispatch("split")
    @torch.no_grad()
    def values(self, batch: Batch) -> Batch:
        parts = []
        with eval_mode(self.model), loop.autocast(self.device, self.train_cfg.mixed_precision):
            for idx, mb, pw in micro_batches(batch, self.train_cfg.micro_batch_tokens):
                parts.append((idx, response_values(self.model, mb, pw)))
        return Batch({self.key: scatter_rows(parts, len(batch), batch["response_mask"].shape[1])})

    @dispatch("split")
    def update(self, batch: Batch) -> dict:
        kw = {"agg": "token_mean", **_counts(batch["response_mask"], "token_mean")}
        clip = self.algo_cfg.value_clip or None
        total, metrics = None, {}
        n_tok, scale = max(dp_sum(batch["response_mask"].sum().item()), 1.0), dp_world_size()
        self.model.train()
        for idx, mb, pw in micro_batches(batch, self.train_cfg.micro_batch_tokens):
            real = float(len(idx) > 0)  # see Actor.update
            with loop.autocast(self.device, self.train_cfg.mixed_precision):
                v = response_values(self.model, mb, pw)  # (b, rw)
                loss, m = value_loss(v, mb[self.key], mb[self.returns_key], mb["response_mask"], clip, **kw)
            (self.algo_cfg.vf_coef * loss * (scale * real)).backward()
            total = loss.detach() * real if total is None else total + loss.detach() * real
            share = mb["response_mask"].sum() * (real / n_tok)  # device tensor (see Actor.update)
            for k, val in m.items():
                if k != "critic/value_loss":
                    metrics[k] = metrics.get(k, 0.0) + val * share
        step = self.optim.step({f"{self.prefix}_value_loss": total}, self.label)
        out = {k.replace("critic/", f"{self.prefix}/"): v for k, v in metrics.items()}
        out = dp_sum_dict(host_floats(out | {f"{self.prefix}/value_loss": total}))
        return out | {f"{self.prefix}/{k}": v for k, v in step.items()}
