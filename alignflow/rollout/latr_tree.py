"""LATR tree rollouts in the built-in engine: part of each group is sampled as a tree (docs/latr.md).

For a group of G samples of one prompt, ``k = tree_share(G, mix_ratio(step, eta0, decay_steps))`` samples come
from a tree and the other ``G - k`` from plain sampling:

1. the trunk (slot 0) decodes like a plain sample; at every step, each tree row whose group has fewer than k
   tree rows asks :func:`~alignflow.algorithms.latr.branch_candidates` whether an alternative to its sampled
   token is likely enough; each candidate opens a child row in the lowest free tree slot. The child is the
   parent's response so far plus the candidate token; its KV cache rows are a copy of the parent's (no
   re-prefill). A row opens at most ``max_children`` branches, and only in the first ``branch_steps`` steps;
2. once the child and its parent both have ``lookahead`` tokens from the branch token on (or ended), the two
   windows are compared by :func:`~alignflow.algorithms.latr.keep_branches`: a child too close to its parent
   is dropped and its slot is free again (for a later branch);
3. tree slots left free when decoding ends are filled by plain samples from the prompt (a second prefill).

Every row decodes in lockstep (all rows of a call share the step index), so sampling noise is the engine's
counter-based noise keyed by the row's slot: slot j of prompt i uses the stream ``(seeds[i], j)``, the one
``HFEngine.generate`` gives its row ``i*n + j``. With ``k = 0`` or ``tau_abs >= 1`` (no branch ever opens) the
result is the engine's own plain sampling, row for row.

The stored ``sampling_logprobs`` of every row are ``log_softmax(logits / T)`` at its own tokens, a branch token
included (the policy's log-probability of the token, not of the tree's choice rule); the engine's convention.
This sampler runs the model's own forward with a preallocated ``DynamicCache`` (not the lean forward), with one
host sync per decode step for the branch decisions.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import random
from typing import Any

import torch

from alignflow.algorithms.latr import branch_candidates, keep_branches, mix_ratio, normalized_edit_distance, tree_share
from alignflow.batch import ROW_METRIC, Batch
from alignflow.config import LatrConfig
from alignflow.rollout.engine import FINISH_REASONS, pad_prompts, pad_responses, rollout_tensors, validate_prompt_ids
from alignflow.rollout.kv_cache import preallocated_cache
from alignflow.rollout.sampling import SamplingParams, chosen_logprobs, process_logits, sample_keys, sample_tokens

STAT_PREFIX = ROW_METRIC  # per-row group statistics, logged by the RL trainer as rollout/<name>
EDIT_WINDOW = 64  # tokens of each response compared by the group's mean pairwise edit distance


@dataclasses.dataclass
class _Row:
    """One sample being decoded: its group (prompt), slot, response so far and place in the tree."""

    prompt: int
    slot: int
    tree: bool  # a tree sample (trunk or branch) rather than a plain one
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    parent: _Row | None = None
    fork: int = 0  # response index of the branch token
    children: int = 0
    reason: int | None = None  # finish code (FINISH_REASONS) once ended
    pending: bool = False  # lookahead comparison with the parent still to do
    pruned: bool = False


@dataclasses.dataclass
class _Group:
    """Per prompt: tree slots in use and the counts logged as metrics."""

    k: int
    used: set[int] = dataclasses.field(default_factory=set)
    branches: int = 0
    pruned: int = 0

    def free_slot(self) -> int | None:
        return next((j for j in range(self.k) if j not in self.used), None)


class _Forward:
    """The model's own forward over a preallocated KV cache whose rows can be gathered (copied, repeated)."""

    def __init__(self, model: Any, capacity: int) -> None:
        self.model, self.cache = model, preallocated_cache(model.config, capacity)
        names = inspect.signature(model.forward).parameters  # transformers renamed past_key_values to cache
        self.cache_arg = "cache" if "cache" in names else "past_key_values"

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        kwargs = {self.cache_arg: self.cache, "use_cache": True}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position, **kwargs)
        logits: torch.Tensor = out.logits[:, -1].float()  # (b, V)
        return logits

    def gather(self, index: torch.Tensor) -> None:
        """Row j of the cache becomes old row ``index[j]`` (a branch copies its parent's rows)."""
        self.cache.batch_select_indices(index)


class TreeSampler:
    """Samples groups with LATR trees on a built-in engine's model (see the module docstring).

    ``engine``: an :class:`~alignflow.rollout.engine.HFEngine` (its model, tokenizer, EOS and pad ids are used).
    """

    def __init__(self, engine: Any, cfg: LatrConfig) -> None:
        self.engine, self.cfg = engine, cfg

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, step: int = 0) -> Batch:
        """``params.n`` samples per prompt, rows i*n .. i*n+n-1 for prompt i, as ``HFEngine.generate`` returns
        them, plus ``latr_tree`` (B,) (1 on tree samples) and the group statistics ``metric/latr_*``
        (B,) (the group's value on each of its rows): branches, pruned, tree_share, distinct, edit_distance."""
        validate_prompt_ids(prompt_ids, "TreeSampler", self.engine.vocab_size)
        params.validate()
        if params.greedy or params.repetition_penalty != 1.0:
            raise ValueError("TreeSampler.generate: LATR samples at temperature > 0 without a repetition penalty")
        params.check_seeds(len(prompt_ids), "TreeSampler.generate")
        n = params.n
        k = tree_share(n, mix_ratio(step, self.cfg.eta0, self.cfg.decay_steps))
        seeds = params.seeds or _call_seeds(params.seed, len(prompt_ids))
        keys = sample_keys(seeds, n)  # (P*n, 2): slot j of prompt i is row i*n + j
        groups = [_Group(k) for _ in prompt_ids]
        model, was_training = self.engine.model, self.engine.model.training
        model.eval()
        try:
            with torch.inference_mode():
                first = [_Row(i, 0, True) for i in range(len(prompt_ids)) if k > 0]
                first += [_Row(i, j, False) for i in range(len(prompt_ids)) for j in range(k, n)]
                for g in groups:
                    g.used = {0} if k > 0 else set()
                done = self._decode(prompt_ids, first, keys, params, groups)
                fill = [_Row(i, j, False) for i, g in enumerate(groups) for j in range(k) if j not in g.used]
                if fill:
                    done += self._decode(prompt_ids, fill, keys, params, None)
        finally:
            model.train(was_training)
        return self._assemble(prompt_ids, done, params, groups)

    # ------------------------------------------------------------------------------------------- decoding
    def _decode(
        self,
        prompt_ids: list[list[int]],
        rows: list[_Row],
        keys: torch.Tensor,
        params: SamplingParams,
        groups: list[_Group] | None,
    ) -> list[_Row]:
        """Decode ``rows`` in lockstep; branch and prune when ``groups`` is given. Returns the kept rows."""
        device, n, max_new = self.engine.device, params.n, params.max_new_tokens
        needed = sorted({r.prompt for r in rows})
        prompt, prompt_mask = self._left_pad([prompt_ids[i] for i in needed], device)  # (p, Tp)
        width = prompt.shape[1]
        forward = _Forward(self.engine.model, width + max_new)
        position = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)
        logits = forward(prompt, prompt_mask, position)  # (p, V)
        where = {p: j for j, p in enumerate(needed)}
        index = torch.tensor([where[r.prompt] for r in rows], device=device)
        forward.gather(index)  # one cache row per sample, copied from its prompt's
        logits, lengths = logits[index], prompt_mask.sum(-1)[index]  # (b, V), (b,)
        mask = torch.cat([prompt_mask[index], prompt_mask.new_ones(len(rows), max_new)], dim=1)
        live, kept = list(rows), list(rows)
        for t in range(max_new):
            row_keys = keys[[r.prompt * n + r.slot for r in live]].to(device)
            token = sample_tokens(logits, params, None, keys=row_keys, step=t)  # (b,)
            logprob = chosen_logprobs(logits, token, params.temperature)
            born = self._branch(live, logits, token, t, params, groups) if groups is not None else []
            for row, tok, lp in zip(live, token.tolist(), logprob.tolist(), strict=True):
                row.tokens.append(tok)
                row.logprobs.append(lp)
            for row, _ in born:
                kept.append(row)
            self._end_rows(live + [r for r, _ in born], t, params)
            if groups is not None:
                self._prune(kept, t, groups)
            nxt = [(r, j) for j, r in enumerate(live) if r.reason is None and not r.pruned]
            nxt += [(r, j) for r, j in born if r.reason is None and not r.pruned]
            if not nxt or t + 1 == max_new:
                break
            order = torch.tensor([j for _, j in nxt], device=device)
            if len(nxt) != len(live) or bool((order != torch.arange(len(live), device=device)).any()):
                forward.gather(order)
                mask, lengths = mask[order], lengths[order]
            live = [r for r, _ in nxt]
            fed = torch.tensor([r.tokens[t] for r in live], device=device)
            logits = forward(fed[:, None], mask[:, : width + t + 1], (lengths + t)[:, None])
        if groups is not None:
            self._prune(kept, max_new, groups, final=True)
        return [r for r in kept if not r.pruned]

    def _branch(
        self,
        live: list[_Row],
        logits: torch.Tensor,
        token: torch.Tensor,
        t: int,
        params: SamplingParams,
        groups: list[_Group],
    ) -> list[tuple[_Row, int]]:
        """Children opened at step ``t``: (row, index of its parent in ``live``), most likely candidate first."""
        cfg = self.cfg
        if cfg.branch_steps and t >= cfg.branch_steps:
            return []
        eligible = [
            j
            for j, r in enumerate(live)
            if r.tree and r.children < cfg.max_children and len(groups[r.prompt].used) < groups[r.prompt].k
        ]
        if not eligible:
            return []
        sub = logits[eligible]  # (e, V)
        probs = process_logits(sub, params).softmax(-1)  # the distribution the sampler draws from
        values, top = probs.topk(min(cfg.top_m, probs.shape[-1]), dim=-1)  # (e, m)
        temp = params.temperature
        lps = (sub / temp).log_softmax(-1).gather(-1, top).tolist()  # log-probs the engine stores for a token
        values = values.cpu()
        ids: list[list[int]] = top.tolist()
        sampled: list[int] = token[eligible].tolist()
        born = []
        for e, j in enumerate(eligible):
            parent, group = live[j], groups[live[j].prompt]
            at = ids[e].index(sampled[e]) if sampled[e] in ids[e] else -1
            for pos in branch_candidates(values[e], at, cfg.top_m, cfg.tau_abs, cfg.tau_rel):
                slot = group.free_slot()
                if slot is None or parent.children >= cfg.max_children:
                    break
                child = _Row(parent.prompt, slot, True, parent.tokens[:t] + [ids[e][pos]], parent.logprobs[:t])
                child.logprobs.append(lps[e][pos])
                child.parent, child.fork, child.pending = parent, t, True
                parent.children += 1
                group.used.add(slot)
                group.branches += 1
                born.append((child, j))
        return born

    def _prune(self, rows: list[_Row], t: int, groups: list[_Group], final: bool = False) -> None:
        """Compare each pending child's lookahead window with its parent's once both are complete (``final``:
        whatever they hold at the end); drop the children that stay too close and free their slots."""
        r = self.cfg.lookahead
        for child in [c for c in rows if c.pending and not c.pruned]:
            parent = child.parent
            assert parent is not None  # every pending row is a branch
            ready = all(len(x.tokens) >= child.fork + r or x.reason is not None or x.pruned for x in (child, parent))
            if not (ready or final):
                continue
            child.pending = False
            window = slice(child.fork, child.fork + r)
            if not keep_branches([child.tokens[window]], [parent.tokens[window]], self.cfg.tau_ed)[0]:
                child.pruned = True
                groups[child.prompt].used.discard(child.slot)
                groups[child.prompt].pruned += 1

    def _end_rows(self, rows: list[_Row], t: int, params: SamplingParams) -> None:
        """Set the finish reason of rows whose newest token (index ``t``) ends them: EOS, a stop id, a stop string,
        or the length budget."""
        eos, stop = set(self.engine.eos_ids), set(params.stop_token_ids)
        for row in rows:
            if row.reason is not None or row.pruned:
                continue
            tok = row.tokens[t]
            if tok in eos:
                row.reason = 1
            elif tok in stop:
                row.reason = 2
            elif params.stop_strings and self._stop_string(row.tokens, params.stop_strings):
                row.reason = 2
            elif t + 1 == params.max_new_tokens:
                row.reason = 0

    def _stop_string(self, tokens: list[int], stop_strings: list[str]) -> bool:
        """Whether the newest tokens complete a stop string (the engine's window rule)."""
        if self.engine.tokenizer is None:
            raise ValueError("TreeSampler: stop_strings need a tokenizer; build HFEngine(model, tokenizer)")
        window = max(len(s) for s in stop_strings) + 4
        text = self.engine.tokenizer.decode(tokens[-window:], skip_special_tokens=False)
        return any(s in text for s in stop_strings)

    def _left_pad(self, prompt_ids: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, Tp) left-padded ids and mask."""
        ids, mask = pad_prompts(prompt_ids, self.engine.pad_id)
        return ids.to(device), mask.to(device)

    # ------------------------------------------------------------------------------------------- result
    def _assemble(
        self, prompt_ids: list[list[int]], rows: list[_Row], params: SamplingParams, groups: list[_Group]
    ) -> Batch:
        """The engine's Batch layout (rows in slot order within each group) plus the LATR fields."""
        n = params.n
        by_slot = {(r.prompt, r.slot): r for r in rows}
        ordered = [by_slot[(i, j)] for i in range(len(prompt_ids)) for j in range(n)]
        prompt, prompt_mask = self._left_pad(prompt_ids, torch.device("cpu"))
        prompt, prompt_mask = prompt.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)  # (B, Tp)
        response, response_mask = pad_responses([r.tokens for r in ordered], self.engine.pad_id)
        tensors = rollout_tensors(prompt, prompt_mask, response, response_mask) | {
            "latr_tree": torch.tensor([float(r.tree) for r in ordered]),
        }
        if params.logprobs:
            tensors["sampling_logprobs"] = torch.tensor(
                [r.logprobs + [0.0] * (response.shape[1] - len(r.logprobs)) for r in ordered], dtype=torch.float32
            )
        stats = [group_stats([r.tokens for r in ordered[i * n : (i + 1) * n]]) for i in range(len(prompt_ids))]
        for i, g in enumerate(groups):
            stats[i] |= {"latr_branches": g.branches, "latr_pruned": g.pruned}
            stats[i]["latr_tree_share"] = sum(r.tree for r in ordered[i * n : (i + 1) * n]) / n
        for name in stats[0]:
            tensors[STAT_PREFIX + name] = torch.tensor([float(s[name]) for s in stats]).repeat_interleave(n)
        device = self.engine.device
        meta: dict[str, list[Any]] = {
            "prompt_index": [i // n for i in range(len(ordered))],
            "finish_reason": [FINISH_REASONS[r.reason or 0] for r in ordered],
        }
        return Batch({k: v.to(device) for k, v in tensors.items()}, meta)


def group_stats(responses: list[list[int]]) -> dict[str, float]:
    """Diversity of one group's responses (token ids): ``latr_distinct``, the share of distinct responses, and
    ``latr_edit_distance``, the mean normalised edit distance over all pairs of their first ``EDIT_WINDOW``
    tokens (0 for a group of one)."""
    pairs = list(itertools.combinations([r[:EDIT_WINDOW] for r in responses], 2))
    mean_ed = sum(normalized_edit_distance(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0
    return {"latr_distinct": len({tuple(r) for r in responses}) / len(responses), "latr_edit_distance": mean_ed}


def _call_seeds(seed: int | None, prompts: int) -> list[int]:
    """One seed per prompt when the caller gave none: from ``seed``, or drawn."""
    base = seed if seed is not None else random.getrandbits(62)
    return [base * 1_000_003 + i for i in range(prompts)]
