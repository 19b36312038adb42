"""The reward-KL frontier: how much reward a policy buys per nat of KL from the reference.

Two sources:

* :func:`run_frontier` (``alignflow eval reference=... frontier=[...]``) evaluates several policies on the same
  prompts with the same sampling seed (common random numbers: differences between points are not sampling noise
  of different prompts) and plots ``eval/gold_reward`` (or ``eval/rm_score`` without a gold reward) against
  ``eval/kl``. Writes ``frontier.json`` (one point per policy, with all its metrics), ``frontier.png`` and
  ``frontier/<i>/samples.jsonl``.
* :func:`frontier_from_metrics` plots the per-step reward against ``policy/kl`` from RL runs' ``metrics.jsonl``
  (no sampling; the training batch's KL and reward, as logged).

A frontier entry may be a Hugging Face model directory (``config.json``), an alignflow checkpoint
(``checkpoints/step-N``: weights only, loaded onto the REFERENCE's architecture -- an RL run starts from the
reference, so its config is the run's) or a run directory (each of its complete checkpoints in step order, then
its ``model/``). Matplotlib is needed for the plots only; the JSON is written first.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

from alignflow.config import ConfigError, EvalConfig, ModelConfig
from alignflow.distributed.checkpoint import load_checkpoint
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.models.user_embeddings import load_user_embeddings

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- entries
def _is_model_dir(p: Path) -> bool:
    """A Hugging Face model directory: its config.json has a ``model_type`` (a run directory's config.json, the
    run's settings, has none)."""
    try:
        return "model_type" in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _is_checkpoint(p: Path) -> bool:
    """A complete alignflow checkpoint: one process's (model.safetensors) or a sharded run's (sharded/, DCP)."""
    return ((p / "model.safetensors").is_file() or (p / "sharded").is_dir()) and (p / "trainer_state.json").is_file()


def _run_policies(run: Path) -> list[Path]:
    """A run directory's complete actor checkpoints (``checkpoints/step-N``, by N), then its final ``model/``."""
    root = run / "checkpoints"
    steps = [p for p in root.glob("step-*") if p.name[5:].isdigit() and _is_checkpoint(p)] if root.is_dir() else []
    found = sorted(steps, key=lambda p: int(p.name[5:]))
    return found + ([run / "model"] if _is_model_dir(run / "model") else [])


def resolve_frontier(entries: list) -> list[dict]:
    """Frontier entries -> ``[{"label", "path", "group"}]``, one per policy to evaluate; ConfigError naming
    ``frontier[i]`` for an entry that is none of a model directory, a checkpoint or a run directory."""
    out = []
    for i, entry in enumerate(entries):
        p = Path(str(entry)).expanduser()
        if not p.is_dir():
            raise ConfigError(
                f"frontier[{i}]: {entry!s} is not a directory (give model directories, alignflow "
                f"checkpoints checkpoints/step-N, or run directories)"
            )
        if _is_model_dir(p) or _is_checkpoint(p):
            run = p.parent.parent if _is_checkpoint(p) and p.parent.name == "checkpoints" else None
            out.append({"label": _short(p), "path": str(p), "group": str(run or p)})
            continue
        found = _run_policies(p)
        if not found:
            raise ConfigError(
                f"frontier[{i}]: {entry!s} is not a model directory (config.json with a model_type), "
                f"an alignflow checkpoint (model.safetensors + trainer_state.json) or a run directory "
                f"with complete checkpoints/step-N or model/"
            )
        out += [{"label": _short(q), "path": str(q), "group": str(p)} for q in found]
    return out


def _short(p: Path) -> str:
    """``grpo/step-8`` for ``runs/grpo/checkpoints/step-8``, ``sft/model`` for ``runs/sft/model``, else the name."""
    p = Path(p)
    if p.name.startswith("step-") and p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}/{p.name}"
    return f"{p.parent.name}/{p.name}" if p.name == "model" and p.parent.name else p.name


def load_policy(path: str | Path, reference: str, device):
    """A model directory as it is; a checkpoint's weights on a fresh copy of the reference model. Either gets the
    user embeddings (``user_embeddings.safetensors``) of its directory when it has them."""
    path = Path(path)
    model = _load_weights(path, reference, device)
    load_user_embeddings(model, path)
    return model


def vocab_size(model) -> int:
    return model.get_input_embeddings().num_embeddings


def check_vocab(key: str, path, model, tok) -> None:
    """One line naming ``key`` when ``model`` cannot have been trained with the eval's tokenizer ``tok``: fewer
    embeddings than tokens, or a tokenizer of its own (saved in its directory) that gives some token another id
    (a run of another task: its samples, KL and rewards would mean nothing). The smaller vocabulary must sit
    inside the larger, so added tokens (P-DPO's user tokens) and padded embedding tables pass."""
    n = vocab_size(model)
    if n < len(tok):
        raise ConfigError(
            f"{key}: {path} has a vocabulary of {n} tokens but the tokenizer has {len(tok)}; the models must "
            f"share one tokenizer (set tokenizer=<dir> to the one they were trained with)"
        )
    p = Path(str(path))
    if not ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
        return  # a hub id, or a directory without a tokenizer of its own: nothing to compare with
    if p.resolve() == Path(tok.name_or_path).resolve():
        return  # the eval's tokenizer was loaded from this directory: no second load to compare it with itself
    own, theirs = tok.get_vocab(), load_tokenizer(str(p)).get_vocab()
    small, large = sorted((own, theirs), key=len)
    clash = next((t for t, i in small.items() if large.get(t) != i), None)
    if clash is not None:
        raise ConfigError(
            f"{key}: {path} was trained with another tokenizer than the eval's ({len(theirs)} tokens against "
            f"{len(own)}; {clash!r} is {theirs.get(clash)} there, {own.get(clash)} here); evaluate runs of the "
            f"same task, or set tokenizer=<dir> to theirs"
        )


def _load_weights(path: Path, reference: str, device):
    from safetensors.torch import load_file

    if _is_model_dir(path):
        return load_causal_lm(ModelConfig(name_or_path=str(path)), device)
    model = load_causal_lm(ModelConfig(name_or_path=reference), device)
    if (path / "sharded").is_dir():  # written by Ray workers: DCP reshards it into this one-process model
        load_checkpoint(path, model)
        return model
    weights, own = load_file(str(path / "model.safetensors")), model.state_dict()
    wrong = [k for k, v in weights.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ConfigError(
            f"frontier: {path}/model.safetensors does not fit the reference's architecture ({reference}): "
            f"{wrong[0]} is {tuple(weights[wrong[0]].shape)} there, {tuple(own[wrong[0]].shape)} in the "
            f"reference (a run of another task or model?)"
        )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise ConfigError(
            f"frontier: {path}/model.safetensors does not fit the reference's architecture "
            f"({reference}): unexpected weights {unexpected[:3]}. A LoRA run checkpoints its adapters "
            f"only; evaluate its model/ directory instead"
        )
    if missing:  # frozen parameters are not checkpointed; they keep the reference's values
        log.warning(
            "%s: %d weights not in the checkpoint keep the reference's values (e.g. %s)", path, len(missing), missing[0]
        )
    return model


# ----------------------------------------------------------------------------------------------- evaluation
def run_frontier(
    policies: list[dict], ctx, cfg: EvalConfig, out: Path, evaluate_policy: Callable, write_samples: Callable
) -> dict:
    """Evaluate every resolved policy (:func:`resolve_frontier`) with ``ctx`` (which holds the reference) and write
    ``frontier.json`` then ``frontier.png``. Returns the JSON's content:
    ``{"reward_key", "kl_key": "eval/kl", "points": [{"label", "path", "group", "kl", "reward", "metrics"}]}``.
    ``evaluate_policy(policy, ctx, cfg) -> (metrics, rows)`` and ``write_samples(path, rows)`` are ``alignflow
    eval``'s own (passed in: this module sits below ``alignflow.eval.evaluate``)."""
    reward_key = ctx.reward_key
    if reward_key is None or ctx.reference is None:
        raise ConfigError(
            "frontier: needs reference=<dir> and a reward (the built-in task's gold reward or reward_model=<dir>)"
        )
    points = []
    for i, entry in enumerate(policies):
        policy = load_policy(entry["path"], cfg.reference, ctx.device)
        check_vocab("frontier", entry["path"], policy, ctx.tokenizer)
        metrics, rows = evaluate_policy(policy, ctx, cfg)
        del policy
        write_samples(out / "frontier" / str(i) / "samples.jsonl", rows)
        points.append({**entry, "kl": metrics["eval/kl"], "reward": metrics[reward_key], "metrics": metrics})
        log.info("frontier %s: kl %.4f, %s %.4f", entry["label"], metrics["eval/kl"], reward_key, metrics[reward_key])
    result = {"reward_key": reward_key, "kl_key": "eval/kl", "points": points}
    (out / "frontier.json").write_text(json.dumps(result, indent=1))
    groups: dict = {}
    for p in points:
        groups.setdefault(p["group"], []).append(p)
    shorts = [_short(Path(g)) for g in groups]
    names = [
        s if shorts.count(s) == 1 else g for s, g in zip(shorts, groups, strict=False)
    ]  # full path when names clash
    plot_frontier(
        dict(zip(names, groups.values(), strict=False)),
        out / "frontier.png",
        reward_key,
        "KL to the reference (nats, eval/kl)",
        annotate="label",
    )
    return result


# ----------------------------------------------------------------------------------------------- from RL logs
def _read_steps(path: Path) -> dict:
    """``metrics.jsonl`` rows merged by step (a training row and an eval row of the same step become one)."""
    by_step: dict = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not a JSON object ({e.msg})") from None
        by_step.setdefault(row.get("step"), {}).update(row)
    return by_step


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def frontier_from_metrics(
    metrics_paths: list, out_png: str | Path, reward_key: str = "rollout/reward_mean", kl_key: str = "policy/kl"
) -> dict:
    """Per-step reward vs KL of RL runs, from their ``metrics.jsonl`` (a path to the file or to the run directory).

    Rows of one step are merged; every step that has both ``kl_key`` and ``reward_key`` (finite) is a point. The
    RL trainer logs ``policy/kl`` (k1 summed over the response, mean over the batch: the same estimate as
    ``eval/kl``) and ``rollout/reward_mean`` every ``log_every`` steps, both measured on the step's rollouts,
    i.e. on the policy BEFORE that step's update (step 1 has KL 0). ``reward_key="eval/gold_reward"`` plots the
    gold reward of the steps where an evaluation coincides with a logged training step; that evaluation runs
    AFTER the update, so its KL lags it by one update (use ``alignflow eval frontier=`` on the checkpoints for
    matched pairs). Writes ``out_png``
    and a JSON of the points next to it (same name, ``.json``). Returns ``{run label: [{"step", "kl",
    "reward"}]}``; a run is labelled by its directory name (its full path when two names clash).
    """
    paths = [Path(p) / "metrics.jsonl" if Path(p).is_dir() else Path(p) for p in metrics_paths]
    if not paths:
        raise ValueError("frontier_from_metrics: no metrics.jsonl paths given")
    names = [p.parent.name for p in paths]
    runs = {}
    for p, name in zip(paths, names, strict=False):
        if not p.is_file():
            raise FileNotFoundError(f"frontier_from_metrics: {p} does not exist")
        steps = _read_steps(p)
        pts = [
            {"step": s, "kl": r[kl_key], "reward": r[reward_key]}
            for s, r in steps.items()
            if _number(r.get(kl_key)) and _number(r.get(reward_key))
        ]
        if not pts:
            keys = sorted({k for r in steps.values() for k in r})
            raise ValueError(f"{p}: no step logs both {kl_key!r} and {reward_key!r} (keys found: {', '.join(keys)})")
        runs[str(p.parent) if names.count(name) > 1 else name] = sorted(pts, key=lambda q: q["step"])
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out_png.with_suffix(".json").write_text(
        json.dumps({"reward_key": reward_key, "kl_key": kl_key, "runs": runs}, indent=1)
    )
    plot_frontier(runs, out_png, reward_key, f"KL to the reference (nats, {kl_key})", annotate="step")
    return runs


# ----------------------------------------------------------------------------------------------- plotting
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the reward-KL frontier plot needs matplotlib: pip install matplotlib (the numbers are "
            "already written to the .json file next to the plot)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(series: dict, path: Path, reward_key: str, xlabel: str, annotate: str) -> None:
    """One line per series (points in order, each marked and labelled with its ``annotate`` field)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, pts in series.items():
        ax.plot([p["kl"] for p in pts], [p["reward"] for p in pts], marker="o", label=name)
        if len(pts) <= 12:
            for p in pts:
                ax.annotate(
                    str(p[annotate]).rsplit("/", 1)[-1],
                    (p["kl"], p["reward"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
    ax.set(title="reward-KL frontier", xlabel=xlabel, ylabel=reward_key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
