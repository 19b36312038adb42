"""``alignflow qdhf``: quality diversity through human feedback (QDHF, Ding et al. 2024; docs/qdhf.md) on the
``reviews`` task.

1. The pool: every response of the rated rows (``qdhf.data_path``, default the task's ``rated.jsonl``); quality =
   the task's gold reward; features = bag-of-words counts (:func:`alignflow.tasks.similarity.bow_features`).
2. ``qdhf.triplets`` similarity judgements (ref, x1, x2) from the task's simulated judge.
3. A linear descriptor z = W f (K = ``qdhf.dims``) is fitted to them with the triplet loss, ``train.max_steps`` full
   -batch Adam steps.
4. Selection: the pool's samples whose quality reaches the ``qdhf.quality_quantile`` quantile enter a MAP-Elites
   archive of ``qdhf.bins`` cells per descriptor dimension (over the 5-95% quantiles of their descriptors, so that a
   few outliers do not squeeze the rest into one cell); its elites are
   QDHF's selection. Best-of-n takes the same number of samples by quality alone; the archive over the untrained
   projection is reported too.
5. Diversity is measured on the judge's hidden measures (tone, length): the cells of a ``qdhf.bins`` grid over
   [0, 1]^2 the selection occupies (``coverage``) and the mean distance between its samples' measures (``spread``);
   quality is its mean gold reward. The same for all the samples
   that entered the archive (``candidates``: no selection of them covers more) and for the whole pool.

Writes ``selected.jsonl`` (the elites: prompt, response, gold, descriptor), ``qdhf.json`` (the numbers) and
``descriptor.json`` (W, the archive's range and bins: what ``reward.diversity`` of ``alignflow rl`` reads); logs
``train/loss`` and ``qdhf/triplet_accuracy`` per logged step and ``eval/*`` at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from alignflow.algorithms.qdhf import coverage, map_elites, qd_select, spread, triplet_loss
from alignflow.config import ConfigError, ModelConfig, TaskConfig, to_dict
from alignflow.config.qdhf import QDHFConfig
from alignflow.data.formats import DataError
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.rewards.diversity import DESCRIPTOR_FILE, Descriptor, DiversityReward
from alignflow.rollout.sample import sample
from alignflow.tasks import build_task, reviews, similarity
from alignflow.tasks.common import read_jsonl, write_jsonl
from alignflow.trainers import loop
from alignflow.trainers.builtin_sft import BUILTIN_SFT, builtin_sft_model
from alignflow.trainers.run_dir import prepare_run_dir

log = logging.getLogger("alignflow")
RANGE = (0.05, 0.95)  # the archive spans these quantiles of the candidates' descriptors


@dataclasses.dataclass
class QDHFResult:
    descriptor: torch.nn.Linear
    output_dir: Path
    losses: list = dataclasses.field(default_factory=list)
    eval: dict = dataclasses.field(default_factory=dict)


def read_pool(path: str) -> tuple[list[str], list[str]]:
    """(prompts, responses) of every completion of the rated rows in ``path``; DataError naming row and field."""
    prompts, responses = [], []
    for i, row in enumerate(read_jsonl(Path(path)), 1):
        comps = row.get("completions")
        if not isinstance(row.get("prompt"), str) or not isinstance(comps, list) or not comps:
            field = "prompt" if not isinstance(row.get("prompt"), str) else "completions"
            raise DataError(f"{path}, row {i}: field {field!r} missing or empty (qdhf reads prompt + completions)")
        prompts += [row["prompt"]] * len(comps)
        responses += [str(c) for c in comps]
    if len(prompts) < 3:
        raise DataError(f"{path}: {len(prompts)} responses; qdhf needs at least 3")
    return prompts, responses


def fit_descriptor(feats: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, cfg: QDHFConfig, logger) -> QDHFResult:
    """Fit z = W f to the judgements with the triplet loss (full batch, Adam)."""
    torch.manual_seed(cfg.train.seed)
    desc = torch.nn.Linear(feats.shape[1], cfg.qdhf.dims, bias=False)
    opt = torch.optim.Adam(desc.parameters(), lr=cfg.optim.lr)
    result = QDHFResult(desc, Path(cfg.train.output_dir))
    bar = loop.Progress(cfg.train.max_steps, 0, cfg.train.progress, "qdhf")
    for step in range(1, cfg.train.max_steps + 1):
        z = desc(feats)
        loss, m = triplet_loss(z[idx[:, 0]], z[idx[:, 1]], z[idx[:, 2]], y, cfg.qdhf.margin)
        opt.zero_grad()
        loss.backward()
        opt.step()
        result.losses.append(float(loss.detach()))
        bar.update(0, loss=result.losses[-1])
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            logger.log(step, {"train/loss": result.losses[-1]} | {k: float(v) for k, v in m.items()})
    bar.close()
    return result


def archive_range(desc: torch.Tensor, quality: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of the archive: the 5-95% quantiles of the candidates' descriptors (outliers go to the edge cells)."""
    d = desc[quality >= quality.quantile(quantile)]
    return d.quantile(RANGE[0], dim=0), d.quantile(RANGE[1], dim=0)


def select(desc: torch.Tensor, quality: torch.Tensor, quantile: float, bins: int) -> list[int]:
    """Pool indices of the MAP-Elites archive over ``desc`` of the samples whose quality reaches ``quantile``."""
    ok = (quality >= quality.quantile(quantile)).nonzero().squeeze(1)
    lo, hi = archive_range(desc, quality, quantile)
    return ok[map_elites(desc[ok], quality[ok], lo, hi, bins)].tolist()


def write_descriptor(path: Path, weight: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> None:
    """``descriptor.json``: what ``reward.diversity`` of ``alignflow rl`` reads (alignflow.rewards.diversity)."""
    blob = {"words": list(similarity.WORDS), "weight": weight.tolist(), "lo": lo.tolist(), "hi": hi.tolist()}
    blob |= {"bins": bins, "prompt_prefix": reviews.PROMPT_PREFIX}
    path.write_text(json.dumps(blob) + "\n")


def _stats(sel: list[int], measures: torch.Tensor, quality: torch.Tensor, bins: int) -> dict:
    lo, hi = torch.zeros(measures.shape[1]), torch.ones(measures.shape[1])
    cov = coverage(measures[sel], lo, hi, bins)
    return {"coverage": cov, "spread": spread(measures[sel]), "quality": float(quality[sel].mean()), "k": len(sel)}


def generation_selection(cfg: QDHFConfig, descriptor, lo: torch.Tensor, hi: torch.Tensor, out: Path) -> dict:
    """``qdhf.policy``: n samples per held-out prompt; per prompt, k kept by :func:`qd_select` over the learned
    descriptors (quality = gold) and k by gold alone (best-of-k). Coverage, spread (on the judge's measures) and
    quality of each prompt's k, averaged over the prompts: ``gen_qd`` and ``gen_best_of_k``."""
    q = cfg.qdhf
    path = q.policy
    if path == BUILTIN_SFT:
        path = str(builtin_sft_model(cfg.task, out, cfg.train.seed, progress=cfg.train.progress))
    model, tok = load_causal_lm(ModelConfig(name_or_path=path)), load_tokenizer(path)
    art = build_task(cfg.task.name, cfg.task, out / "task")
    prompts = [r["prompt"] for r in read_jsonl(art.eval_prompts_path)][: q.prompts]
    with torch.no_grad():
        texts, _ = sample(model, tok, prompts, q.samples, q.max_new_tokens, 1.0, cfg.train.seed)
        return _select_per_prompt(cfg, descriptor, lo, hi, prompts, texts)


def _select_per_prompt(cfg: QDHFConfig, descriptor, lo, hi, prompts: list[str], texts: list[list[str]]) -> dict:
    q = cfg.qdhf
    sums: dict = {"gen_qd": {}, "gen_best_of_k": {}}
    for p, responses in zip(prompts, texts, strict=True):
        ps = [p] * len(responses)
        quality = torch.tensor(reviews.gold_reward(ps, responses))
        desc = descriptor(similarity.bow_features(ps, responses))
        measures = similarity.true_measures(ps, responses)
        picks = {
            "gen_qd": qd_select(desc, quality, lo, hi, q.bins, q.select),
            "gen_best_of_k": quality.argsort(descending=True, stable=True)[: q.select].tolist(),
        }
        for name, sel in picks.items():
            for m, v in _stats(sel, measures, quality, q.bins).items():
                sums[name][m] = sums[name].get(m, 0.0) + v / len(prompts)
    return sums


def train_qdhf(cfg: QDHFConfig) -> QDHFResult:
    """Learn QDHF descriptors and compare the archive's selection with best-of-n; module docstring."""
    if cfg.task.name != "reviews":
        raise ConfigError(f"task.name: {cfg.task.name!r}; qdhf's similarity judge exists for the reviews task only")
    out = prepare_run_dir(cfg.train)
    path = cfg.qdhf.data_path or str(build_task(cfg.task.name, cfg.task, out / "task").rated_path)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    prompts, responses = read_pool(path)
    quality = torch.tensor(reviews.gold_reward(prompts, responses))
    measures, feats = similarity.true_measures(prompts, responses), similarity.bow_features(prompts, responses)
    idx, y = similarity.judge_triplets(measures, cfg.qdhf.triplets, cfg.train.seed)
    logger = loop.MetricsLogger(out)
    torch.manual_seed(cfg.train.seed)
    untrained = torch.nn.Linear(feats.shape[1], cfg.qdhf.dims, bias=False)
    result = fit_descriptor(feats, idx, y, cfg, logger)
    with torch.no_grad():
        z, z0 = result.descriptor(feats), untrained(feats)
    q, b = cfg.qdhf.quality_quantile, cfg.qdhf.bins
    qd = select(z, quality, q, b)
    lo, hi = archive_range(z, quality, q)
    stats = {
        "qdhf": _stats(qd, measures, quality, b),
        "best_of_n": _stats(quality.argsort(descending=True)[: len(qd)].tolist(), measures, quality, b),
        "untrained_descriptor": _stats(select(z0, quality, q, b), measures, quality, b),
        "candidates": _stats((quality >= quality.quantile(q)).nonzero().squeeze(1).tolist(), measures, quality, b),
        "pool": _stats(list(range(len(prompts))), measures, quality, b),
    }
    if cfg.qdhf.policy:  # QD selection at generation
        stats |= generation_selection(cfg, result.descriptor, lo, hi, out)
    result.eval = {f"eval/{k}/{m}": float(v) for k, s in stats.items() for m, v in s.items()}
    logger.log(cfg.train.max_steps, result.eval)
    logger.close()
    rows = [
        {"prompt": prompts[i], "response": responses[i], "gold": float(quality[i]), "descriptor": z[i].tolist()}
        for i in qd
    ]
    write_jsonl(out / "selected.jsonl", rows)
    write_descriptor(out / DESCRIPTOR_FILE, result.descriptor.weight.detach(), lo, hi, b)
    (out / "qdhf.json").write_text(json.dumps(stats, indent=1) + "\n")
    log.info(
        "QDHF: coverage %d (best-of-n %d) at quality %.2f (%.2f)",
        stats["qdhf"]["coverage"],
        stats["best_of_n"]["coverage"],
        stats["qdhf"]["quality"],
        stats["best_of_n"]["quality"],
    )
    return result


# ------------------------------------------------------------------------------------- QDHF inside alignflow rl
BUILTIN_QDHF = "builtin:qdhf"


def builtin_descriptor(task: TaskConfig, output_dir: str | Path, seed: int = 0) -> Path:
    """``builtin:qdhf``: the descriptor of ``alignflow qdhf`` with its defaults (those of configs/qdhf.yaml) on the
    built-in reviews task, fitted on first use and cached in ``<parent of output_dir>/builtin-qdhf/<key>/`` (like
    builtin:sft). Returns the run directory."""
    if task.name != "reviews":
        raise ConfigError(
            f"reward.diversity.descriptor={BUILTIN_QDHF}: the similarity judge exists for the reviews task only "
            f"(task.name is {task.name!r}); give a qdhf run directory instead"
        )
    blob = json.dumps([dataclasses.asdict(task), seed, Path(similarity.__file__).read_text()], sort_keys=True)
    out = Path(output_dir).resolve().parent / "builtin-qdhf" / hashlib.sha256(blob.encode()).hexdigest()[:12]
    if (out / DESCRIPTOR_FILE).is_file():
        return out
    cfg = QDHFConfig(task=dataclasses.replace(task))
    cfg.train.output_dir, cfg.train.overwrite, cfg.train.seed, cfg.train.progress = str(out), True, seed, False
    cfg.train.log_every, cfg.train.report_to = cfg.train.max_steps, []
    log.info("reward.diversity.descriptor=%s: fitting the QDHF descriptor into %s", BUILTIN_QDHF, out)
    train_qdhf(cfg)
    return out


def build_diversity(section, cfg, key: str) -> DiversityReward:
    """The ``reward.diversity`` source of an RL run: its descriptor from a qdhf run directory or ``builtin:qdhf``."""
    path = section.descriptor
    if path == BUILTIN_QDHF:
        path = builtin_descriptor(cfg.task, cfg.train.output_dir, cfg.train.seed)
    return DiversityReward(Descriptor.load(path, f"{key}.descriptor"), section.mode)
