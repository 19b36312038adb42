"""``alignflow vpl``: a variational preference-learning reward model (VPL, Poddar et al. 2024; docs/vpl.md).

1. Every (prompt, response) of the training and held-out pairs is embedded ONCE by the frozen model
   (``model.name_or_path``): the mean of its last hidden state over the text's tokens.
2. Each step draws ``train.batch_size`` training pairs; each gets a context of ``vpl.context_pairs`` OTHER pairs of
   the same user. The encoder turns the context into q(z | C), z is drawn by reparameterisation, and the decoder
   scores chosen and rejected given z; the loss is the negative ELBO (:func:`alignflow.algorithms.vpl.vpl_loss`)
   with the KL weight annealed over ``vpl.kl_anneal_steps``.
3. Evaluation: for each user, ``vpl.eval_contexts`` context sets from the user's training pairs give z = mu; the
   accuracy on the user's held-out pairs is averaged over them. ``vpl.latent=0`` trains the plain Bradley-Terry
   reward model on the same embeddings (no context is read).

Metrics: ``train/loss``, ``vpl/bt``, ``vpl/kl``, ``vpl/accuracy`` per logged step; ``eval/accuracy`` (mean over
users) and ``eval/accuracy/<user>`` at the end. Writes ``vpl.safetensors`` (encoder and decoder), ``vpl.json``
(what a reader needs to rebuild it: widths, embedding, frozen model, training pairs) and ``eval.json`` into
``train.output_dir``. :func:`build_vpl_reward` turns such a directory into ``alignflow rl``'s ``reward.vpl``
source (``alignflow.rewards.vpl``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignflow.algorithms.vpl import VPLRewardModel, kl_anneal, reparameterise, vpl_loss
from alignflow.config import ConfigError, ModelConfig
from alignflow.config.vpl import VPLConfig
from alignflow.data.formats import DataError
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.rewards.vpl import EmbedFn, VPLScorer
from alignflow.tasks import build_task, users
from alignflow.tasks.common import read_jsonl
from alignflow.trainers import loop
from alignflow.trainers.builtin_sft import resolve_model
from alignflow.trainers.run_dir import prepare_run_dir
from alignflow.trainers.run_start import start_run

log = logging.getLogger("alignflow")
FIELDS = ("prompt", "chosen", "rejected", "user")


@dataclasses.dataclass
class VPLResult:
    model: VPLRewardModel
    output_dir: Path
    losses: list = dataclasses.field(default_factory=list)
    eval: dict = dataclasses.field(default_factory=dict)


def read_user_pairs(path: str) -> list[dict]:
    """Rows with string prompt, chosen, rejected and user; a DataError naming the file, row and field otherwise."""
    try:
        rows = read_jsonl(Path(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read user pairs ({e})") from e
    for i, r in enumerate(rows, 1):
        bad = [f for f in FIELDS if not isinstance(r.get(f), str)]
        if bad:
            raise DataError(
                f"{path}, row {i}: field {bad[0]!r} missing or not a string (VPL reads {', '.join(FIELDS)})"
            )
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], device, batch: int = 64) -> torch.Tensor:
    """(N, D): the mean last hidden state over each text's tokens (padding excluded)."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], return_tensors="pt", padding=True).to(device)
        h = model(**enc, output_hidden_states=True).hidden_states[-1]  # (b, T, D)
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(((h * m).sum(1) / m.sum(1)).float().cpu())
    return torch.cat(out)


def embedder(kind: str, model, tok, device) -> EmbedFn:
    """e(prompt, response) -> (N, D): the frozen model's mean hidden state over prompt + response (``hidden``) or the
    reviews task's four attribute ratings of the review (``task_ratings``; user tags before the prompt are ignored)."""
    if kind == "task_ratings":
        return lambda prompts, responses: torch.tensor(users.rating_features(prompts, responses))
    return lambda prompts, responses: embed_texts(
        model, tok, [p + r for p, r in zip(prompts, responses, strict=True)], device
    )


def _embed_pairs(embed: EmbedFn, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) embeddings (N, D) of user pairs."""
    prompts, responses = (
        [r["prompt"] for r in rows for _ in (0, 1)],
        [r[s] for r in rows for s in ("chosen", "rejected")],
    )
    e = embed(prompts, responses)
    return e[0::2], e[1::2]


def _resolve(cfg: VPLConfig) -> None:
    """Fill empty model/data paths from the built-in task (in place)."""
    prepare_run_dir(cfg.train, check_only=True)
    resolve_model(cfg)
    if cfg.model.name_or_path and cfg.data.path and cfg.data.eval_path:
        return
    if cfg.task.name != "reviews":
        raise DataError(f"task.name={cfg.task.name!r}: built-in user pairs exist for the reviews task only")
    art = build_task(cfg.task.name, cfg.task, Path(cfg.train.output_dir) / "task")
    if not cfg.model.name_or_path:
        cfg.model.name_or_path, cfg.model.tokenizer = str(art.model_dir), str(art.tokenizer_dir)
    paths = users.paths(art.dir)
    cfg.data.path = cfg.data.path or str(paths["user_pairs"])
    cfg.data.eval_path = cfg.data.eval_path or str(paths["user_eval"])


def _by_user(rows: list[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault(r["user"], []).append(i)
    return out


def _contexts(rng: random.Random, pool: list[int], k: int, exclude: int | None) -> list[int]:
    return rng.sample([j for j in pool if j != exclude], k)


def _check_users(cfg: VPLConfig, train: dict, held: dict) -> None:
    need = cfg.vpl.context_pairs + 1
    for u, idx in train.items():
        if len(idx) < need:
            raise DataError(f"{cfg.data.path}: user {u!r} has {len(idx)} pairs; vpl.context_pairs + 1 = {need} needed")
    unknown = sorted(set(held) - set(train))
    if unknown:
        raise DataError(f"{cfg.data.eval_path}: user {unknown[0]!r} has no training pairs in {cfg.data.path}")


def evaluate(model: VPLRewardModel, emb: tuple, held: dict, train: dict, k: int, draws: int, seed: int) -> dict:
    """Per-user held-out accuracy with z = mu of ``draws`` context sets from the user's training pairs."""
    (tc, tr), (hc, hr) = emb
    rng, out = random.Random(seed), {}
    with torch.no_grad():
        for u in sorted(held):
            acc = 0.0
            for _ in range(draws):
                ctx = _contexts(rng, train[u], k, None)
                mu, _ = model.posterior(torch.cat([tc[ctx], tr[ctx]], -1).unsqueeze(0))
                idx = held[u]
                acc += float((model.reward(hc[idx], mu) > model.reward(hr[idx], mu)).float().mean())
            out[f"eval/accuracy/{u}"] = acc / draws
    out["eval/accuracy"] = sum(out.values()) / len(out)
    return out


def train_vpl(cfg: VPLConfig) -> VPLResult:
    """Train VPL (or, with ``vpl.latent=0``, plain BT) on a frozen model's embeddings; module docstring."""
    _resolve(cfg)
    out, device, tok = start_run(cfg)
    rows, held_rows = read_user_pairs(cfg.data.path), read_user_pairs(cfg.data.eval_path)
    train_u, held_u = _by_user(rows), _by_user(held_rows)
    _check_users(cfg, train_u, held_u)
    lm = load_causal_lm(cfg.model, device).eval() if cfg.vpl.embedding == "hidden" else None
    embed = embedder(cfg.vpl.embedding, lm, tok, device)
    emb = (_embed_pairs(embed, rows), _embed_pairs(embed, held_rows))
    del lm, embed
    (tc, tr), v = emb[0], cfg.vpl
    model = VPLRewardModel(tc.shape[1], v.hidden, v.latent)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    rng, gen = random.Random(cfg.train.seed), torch.Generator().manual_seed(cfg.train.seed)
    logger, result = loop.MetricsLogger(out, report_to=cfg.train.report_to), VPLResult(model, out)
    bar = loop.Progress(cfg.train.max_steps, 0, cfg.train.progress, "vpl")
    for step in range(1, cfg.train.max_steps + 1):
        idx = [rng.randrange(len(rows)) for _ in range(cfg.train.batch_size)]
        ctx = [_contexts(rng, train_u[rows[i]["user"]], v.context_pairs, i) for i in idx]
        mu, logvar = model.posterior(torch.cat([tc[ctx], tr[ctx]], -1))  # (B, K, 2D) -> (B, L)
        z = reparameterise(mu, logvar, torch.randn(mu.shape, generator=gen))
        loss, m = vpl_loss(
            model.reward(tc[idx], z),
            model.reward(tr[idx], z),
            mu,
            logvar,
            kl_anneal(step, v.kl_weight, v.kl_anneal_steps),
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        result.losses.append(float(loss.detach()))
        bar.update(0, loss=result.losses[-1])
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            logger.log(step, {"train/loss": result.losses[-1]} | {k: float(x) for k, x in m.items()})
    bar.close()
    result.eval = evaluate(model, emb, held_u, train_u, v.context_pairs, v.eval_contexts, cfg.train.seed + 1)
    logger.log(cfg.train.max_steps, result.eval)
    logger.close()
    save_file({k: t.contiguous() for k, t in model.state_dict().items()}, str(out / "vpl.safetensors"))
    _save_meta(cfg, out, tc.shape[1])
    (out / "eval.json").write_text(json.dumps(result.eval, indent=1) + "\n")
    log.info("VPL: held-out accuracy %.3f (%s)", result.eval["eval/accuracy"], out)
    return result


# ------------------------------------------------------------------------------------------ as an RL reward
META = "vpl.json"


def _local(path: str) -> str:
    """An existing local path made absolute (the reward may run from another directory); a hub id as it is."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def _save_meta(cfg: VPLConfig, out: Path, dim: int) -> None:
    v = cfg.vpl
    meta = {
        "dim": dim,
        "hidden": v.hidden,
        "latent": v.latent,
        "embedding": v.embedding,
        "context_pairs": v.context_pairs,
        "model": _local(cfg.model.name_or_path),
        "tokenizer": _local(cfg.model.tokenizer),
        "data": str(Path(cfg.data.path).resolve()),
    }
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")


def load_vpl(directory: str | Path, key: str = "reward.vpl.model") -> tuple[VPLRewardModel, dict]:
    """The VPL reward model ``alignflow vpl`` saved in ``directory`` and its ``vpl.json``; ConfigError naming ``key``
    when the directory holds none."""
    d = Path(directory)
    if not (d / META).is_file() or not (d / "vpl.safetensors").is_file():
        raise ConfigError(f"{key}={directory}: no vpl.json and vpl.safetensors there (alignflow vpl writes them)")
    meta = json.loads((d / META).read_text())
    model = VPLRewardModel(meta["dim"], meta["hidden"], meta["latent"])
    model.load_state_dict(load_file(str(d / "vpl.safetensors")))
    return model.eval(), meta


@torch.no_grad()
def user_latents(model: VPLRewardModel, embed: EmbedFn, rows: list[dict], k: int) -> dict[str, torch.Tensor]:
    """Each user's z = mu of q(z | C), C = the user's first ``k`` pairs in ``rows`` (file order); (0,) tensors for a
    model without a latent. DataError for a user with fewer than ``k`` pairs."""
    out = {}
    for user, idx in _by_user(rows).items():
        if len(idx) < k:
            raise DataError(f"user {user!r} has {len(idx)} context pairs; reward.vpl.context_pairs = {k} needed")
        chosen, rejected = _embed_pairs(embed, [rows[i] for i in idx[:k]])
        mu, _ = model.posterior(torch.cat([chosen, rejected], -1).unsqueeze(0).float())
        out[user] = mu[0]
    return out


def build_vpl_reward(vcfg, device, key: str = "reward.vpl") -> VPLScorer:
    """A :class:`~alignflow.rewards.vpl.VPLScorer` from a ``reward.vpl`` section: the model of ``vcfg.model``, the
    latents of the users of ``vcfg.context`` (default: the VPL run's training pairs) from ``vcfg.context_pairs``
    pairs each (0: as many as the model was trained with)."""
    model, meta = load_vpl(vcfg.model, f"{key}.model")
    context = vcfg.context or meta["data"]
    k = vcfg.context_pairs or meta["context_pairs"]
    lm, tok = None, None
    if meta["embedding"] == "hidden":
        mcfg = ModelConfig(name_or_path=meta["model"], tokenizer=meta["tokenizer"])
        lm = load_causal_lm(mcfg, device).eval()
        tok = load_tokenizer(meta["tokenizer"] or meta["model"])
    embed = embedder(meta["embedding"], lm, tok, device)
    latents = user_latents(model, embed, read_user_pairs(context), k)
    return VPLScorer(model, latents, embed, vcfg.user_field)
