"""``alignflow mpo``: a two-stage recipe of existing trainers (docs/mpo.md).

**MPO** (Gou & Nguyen 2024): score every pair with ``reward``, split easy/hard by |r(y_w) - r(y_l)| > δ
(:func:`~alignflow.algorithms.offline.mpo_split`), DPO (``train_po``) on the easy pairs from the SFT model, then
online RL (``train_rl``, PPO by default) on the hard pairs' prompts with the DPO model as initial policy and KL
reference. An empty easy set skips DPO (the SFT model goes on); an empty hard set (δ = -inf) skips RL.

Run:  ``alignflow mpo --config configs/mpo.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from alignflow.algorithms.offline import mpo_split
from alignflow.algorithms.preference_table import loss_spec
from alignflow.config import (
    ConfigError,
    MPOConfig,
    POConfig,
    RewardSourceConfig,
    RLConfig,
)
from alignflow.data.formats import DataError, validate
from alignflow.data.loading import load_records
from alignflow.data.render import encode_pair
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.models.device import resolve_device
from alignflow.tasks import build_task
from alignflow.trainers import loop
from alignflow.trainers.alol import rows_batch
from alignflow.trainers.po import train_po
from alignflow.trainers.po_data import gold_eval, resolve_po_builtin
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rl_setup import build_sources
from alignflow.trainers.roles import RewardRole
from alignflow.trainers.run_dir import check_output_dir, existing_results

log = logging.getLogger("alignflow.mpo")


# ----------------------------------------------------------------------------------------------- MPO
@dataclasses.dataclass
class MPOResult:
    model_dir: Path  # the final policy: rl/model, or dpo/model when the hard set is empty
    stats: dict = dataclasses.field(default_factory=dict)  # mpo/pairs, mpo/easy, mpo/hard, mpo/hard_prompts, ...
    eval: dict = dataclasses.field(default_factory=dict)  # eval/gold_reward_{sft,dpo,mpo} (built-in task rewards)
    dpo: object = None  # POResult of stage 1 (None when skipped)
    rl: object = None  # RLResult of stage 2 (None when skipped)
    output_dir: Path = Path(".")


def _check_mpo(cfg: MPOConfig) -> None:
    """The stages' model/data/reward/task/output_dir come from the top level; refuse a value set in dpo.* / rl.*."""
    po, rl = POConfig(), RLConfig()
    for key, got, default in (
        ("dpo.model", cfg.dpo.model, po.model),
        ("dpo.ref_model", cfg.dpo.ref_model, ""),
        ("dpo.data", cfg.dpo.data, po.data),
        ("dpo.task", cfg.dpo.task, po.task),
        ("dpo.train.output_dir", cfg.dpo.train.output_dir, po.train.output_dir),
        ("rl.model", cfg.rl.model, rl.model),
        ("rl.ref_model", cfg.rl.ref_model, ""),
        ("rl.data", cfg.rl.data, rl.data),
        ("rl.reward", cfg.rl.reward, RewardSourceConfig()),
        ("rl.task", cfg.rl.task, rl.task),
        ("rl.train.output_dir", cfg.rl.train.output_dir, rl.train.output_dir),
    ):
        if got != default:
            top = key.split(".")[-1].replace("ref_model", "model")
            raise ConfigError(
                f"{key} is set by mpo from the top-level '{top}' (the DPO model is the RL stage's "
                f"initial policy and reference); remove {key}"
            )
    if not loss_spec(cfg.dpo.loss.name, "dpo.loss.name").pairwise:
        raise ConfigError(f"dpo.loss.name={cfg.dpo.loss.name}: MPO's first stage trains on the easy PAIRS")


def score_pairs(path: str, cfg: MPOConfig, tok, reward: RewardRole) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """The preference rows of ``path`` (validated) and the reward of their chosen and rejected responses, (N,) each."""
    d = cfg.data
    checked = validate(load_records(path, d.split), fmt="preference", on_bad_row=d.on_bad_row, source=path)
    seqs = []
    for row, where in zip(checked.rows, checked.where, strict=False):
        fields = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "margin")}
        for side in ("chosen", "rejected"):
            try:
                enc = encode_pair(tok, row["prompt"], row[side], d.max_prompt_len, d.max_len)
            except DataError as e:
                raise DataError(f"{where}: field '{side}': {e}") from None
            seqs.append(
                {
                    "prompt": row["prompt"],
                    "fields": fields,
                    "prompt_ids": enc.input_ids[: enc.prompt_len],
                    "response_ids": enc.input_ids[enc.prompt_len :],
                }
            )
    scores = torch.cat(
        [reward.score(rows_batch(seqs[i : i + 256], tok))["scores"].float().cpu() for i in range(0, len(seqs), 256)]
    ).view(-1, 2)  # (N, 2): chosen, rejected
    return checked.rows, scores[:, 0], scores[:, 1]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mpo_split_pairs(cfg: MPOConfig, po_cfg: POConfig, tok, device) -> tuple[list[dict], list[dict], dict]:
    """Score every pair with ``reward`` and split by ``mpo.delta``: (easy pairs, hard prompt rows, stats)."""
    scorer_cfg = dataclasses.replace(cfg.rl, model=po_cfg.model, reward=cfg.reward, task=cfg.task)
    composite = build_sources(cfg.reward, "reward", cfg.task.name, scorer_cfg, device, tok.pad_token_id)
    if composite is None:
        raise ConfigError(
            "no reward source: set reward.task (e.g. {gold: 1.0}), reward.functions or reward.models "
            "(it scores the pairs for the easy/hard split and is the RL stage's reward)"
        )
    rows, chosen, rejected = score_pairs(po_cfg.data.path, cfg, tok, RewardRole(composite))
    easy, hard = mpo_split(chosen, rejected, cfg.mpo.delta)  # (N,) bool each
    hard_prompts = {
        json.dumps(rows[i]["prompt"]): {k: v for k, v in rows[i].items() if k not in ("chosen", "rejected", "margin")}
        for i in hard.nonzero().flatten().tolist()
    }
    stats = {
        "mpo/pairs": float(len(rows)),
        "mpo/easy": float(easy.sum()),
        "mpo/hard": float(hard.sum()),
        "mpo/hard_prompts": float(len(hard_prompts)),
        "mpo/gap_mean": float((chosen - rejected).abs().mean()),
        "mpo/chosen_better": float((chosen > rejected).float().mean()),
    }
    log.info(
        "MPO split at delta=%g: %d easy pairs, %d hard pairs (%d prompts)",
        cfg.mpo.delta,
        int(easy.sum()),
        int(hard.sum()),
        len(hard_prompts),
    )
    return [rows[i] for i in easy.nonzero().flatten().tolist()], list(hard_prompts.values()), stats


@loop.bar_command("mpo")
def train_mpo(cfg: MPOConfig) -> MPOResult:
    """Run MPO as configured (``alignflow mpo``): split by reward gap, DPO on the easy pairs, RL on the hard prompts."""
    _check_mpo(cfg)
    out = check_output_dir(cfg.output_dir, "output_dir")
    done = [f"{d}/ ({', '.join(found)})" for d in ("dpo", "rl") if (found := existing_results(out / d))]
    told = any(t.overwrite or t.resume for t in (cfg.dpo.train, cfg.rl.train))  # the stages then decide
    if done and not told:  # said here, naming the key the user sets (a stage would name its own output_dir)
        raise ConfigError(
            f"output_dir={out} already holds an MPO run ({'; '.join(done)}); a new run would replace it. Choose a "
            f"new output_dir, or set dpo.train.overwrite=true rl.train.overwrite=true to replace it"
        )
    po_cfg = dataclasses.replace(
        cfg.dpo,
        model=dataclasses.replace(cfg.model),
        data=dataclasses.replace(cfg.data),
        task=cfg.task,
        train=dataclasses.replace(cfg.dpo.train, output_dir=str(out)),
    )
    art = resolve_po_builtin(po_cfg)  # SFT model and/or gold-labelled pairs of the built-in task when paths are empty
    if art is None and cfg.reward.task and cfg.eval_prompts:
        art = build_task(cfg.task.name, cfg.task, out / "task")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    loop.set_seed(cfg.dpo.train.seed)
    device = resolve_device(cfg.dpo.train.device)
    tok = load_tokenizer(
        po_cfg.model.tokenizer or po_cfg.model.name_or_path, po_cfg.model.revision, po_cfg.model.trust_remote_code
    )
    easy, hard_prompts, stats = mpo_split_pairs(cfg, po_cfg, tok, device)
    result = MPOResult(out / "model", stats=stats, output_dir=out)

    def sample_eval(path) -> float:  # mean gold reward of 2 samples per held-out prompt of the built-in task
        model = load_causal_lm(dataclasses.replace(po_cfg.model, name_or_path=str(path)), device)
        return gold_eval(model, tok, art, cfg.eval_prompts, po_cfg.builtin.max_new_tokens, cfg.dpo.train.seed)

    evaluate = art is not None and cfg.eval_prompts > 0
    policy = Path(po_cfg.model.name_or_path)
    if evaluate:
        result.eval["eval/gold_reward_sft"] = sample_eval(policy)
    if easy:  # stage 1: DPO on the easy pairs, reference = the SFT model
        data = dataclasses.replace(
            po_cfg.data, path=str(_write(out / "easy_pairs.jsonl", easy)), eval_path="", format="preference"
        )
        result.dpo = train_po(
            dataclasses.replace(po_cfg, data=data, train=dataclasses.replace(po_cfg.train, output_dir=str(out / "dpo")))
        )
        policy = out / "dpo" / "model"
    else:
        log.warning("MPO: no easy pairs at delta=%g; the DPO stage is skipped (the SFT model goes on)", cfg.mpo.delta)
    if evaluate:
        result.eval["eval/gold_reward_dpo"] = sample_eval(policy)
    if hard_prompts:  # stage 2: RL on the hard prompts; the DPO model is the initial policy AND the reference
        data = dataclasses.replace(
            cfg.rl.data,
            path=str(_write(out / "hard_prompts.jsonl", hard_prompts)),
            eval_path=str(art.eval_prompts_path) if art is not None else "",
        )
        result.rl = train_rl(
            dataclasses.replace(
                cfg.rl,
                model=dataclasses.replace(po_cfg.model, name_or_path=str(policy)),
                ref_model=str(policy),
                data=data,
                reward=cfg.reward,
                task=cfg.task,
                train=dataclasses.replace(cfg.rl.train, output_dir=str(out / "rl")),
            )
        )
        policy = out / "rl" / "model"
    else:
        log.info("MPO: no hard pairs at delta=%g; the RL stage is skipped", cfg.mpo.delta)
    result.model_dir = policy
    if evaluate:
        result.eval["eval/gold_reward_mpo"] = sample_eval(policy)
    (out / "mpo.json").write_text(json.dumps({"model": str(policy), **result.stats, **result.eval}, indent=1))
    return result
