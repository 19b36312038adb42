"""Rewards from judges, compared on the built-in ``reviews`` task (issue 13, item 8).

Five reward sources are trained from the task's SFT model (or the task's base model) with small budgets:

* **BT reward model** -- ``alignflow rm`` (configs/rm.yaml) on the task's preference pairs;
* **generative RM** -- Think-RM stage 1 (configs/thinkrm_sft.yaml): SFT of the task's base model on rationales
  then a verdict (``judge_sft.jsonl``);
* **pairwise preference model** -- ``alignflow pm`` (configs/pm.yaml) on the same pairs;
* **pairwise LLM judge** -- the SFT policy model fine-tuned (configs/thinkrm_sft.yaml's settings) to answer the
  same judge prompts with the verdict alone (``overall this .`` / ``overall that .``), no rationale;
* **pointwise LLM judge** -- the SFT policy model fine-tuned as configs/judge_sft.yaml (two epochs) to grade one
  review ``overall good .`` / ``overall bad .`` (``judge_point_sft.jsonl``), read as p(good) from its probabilities.

1. Accuracy against gold on the SAME held-out pairs (``judge_eval.jsonl``: openings never seen in training, each
   pair's better review by the hidden gold reward): BT ``r(first) > r(second)``; preference model
   ``P(first > second) > 1/2``; generative RM and pairwise judge: their greedy verdict (no verdict = wrong);
   pointwise judge: ``p(good | first) > p(good | second)``.
2. GRPO from the SFT policy with each as the reward, under one equal budget (same prompts, steps, group size,
   learning rate and KL); the BT model and the pointwise judge score each sample, the three pairwise sources give
   each sample its win rate in its group (``bench/judge_rewards.py``). Reported: the gold reward of greedy
   responses to held-out prompts before and after (``eval/gold_reward``; gold is a reward term of weight 0:
   logged, never optimised).

Run from the repository root (189 s measured on 2 shared cores; ``--quick`` cuts every budget for a smoke run)::

    nice -n 10 python bench/judge_comparison.py            # -> bench/results/judge_comparison.{md,json}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from alignflow.batch import Batch
from alignflow.config import ModelConfig, PMConfig, RLConfig, RMConfig, SFTConfig, TaskConfig, load_config
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.rewards.generative_rm import evaluate_generative_rm
from alignflow.rewards.judge import LocalJudge
from alignflow.rewards.model import RewardModelScorer
from alignflow.rewards.preference_model import PreferenceModel
from alignflow.tasks import build_task
from alignflow.tasks.common import read_jsonl, write_jsonl
from alignflow.tasks.reviews_judge import paths as judge_paths
from alignflow.trainers.builtin_sft import builtin_sft_model
from alignflow.trainers.pm import train_pm
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rm import train_rm
from alignflow.trainers.sft import train_sft

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "judge_comparison"
BUDGETS = {  # training steps of each source, and the equal GRPO budget
    "full": {"rm": 100, "pm": 100, "genrm": 300, "judge": 300, "point_judge": 0, "rl": 40, "eval_pairs": 128},
    "quick": {"rm": 4, "pm": 4, "genrm": 4, "judge": 4, "point_judge": 4, "rl": 2, "eval_pairs": 16},
}
RL_REWARDS = {  # reward section overrides of each GRPO run (the BT model's path is filled in)
    "bt_rm": None,
    "generative_rm": str(ROOT / "bench" / "judge_rewards.py") + ":genrm_win_rate",
    "preference_model": str(ROOT / "bench" / "judge_rewards.py") + ":pm_win_rate",
    "llm_judge": str(ROOT / "bench" / "judge_rewards.py") + ":judge_win_rate",
    "point_judge": None,
}
POINT_WORDS = [" overall bad", " overall good"]  # the pointwise judge's verdicts, lowest first: the value is p(good)
ENV = {"generative_rm": "JC_GENRM", "preference_model": "JC_PM", "llm_judge": "JC_JUDGE"}
COMMON = ["train.progress=false", "train.overwrite=true"]
log = logging.getLogger("bench.judge_comparison")


# ----------------------------------------------------------------------------------------------- training
def train_sources(task, sft: Path, b: dict) -> dict:
    """Train the five sources; returns {name: model directory}."""
    pairs = str(task.pairs_path)
    jp = judge_paths(task.dir)
    rm = train_rm(
        load_config(
            RMConfig,
            ROOT / "configs" / "rm.yaml",
            [f"model.name_or_path={sft}", f"data.path={pairs}", f"train.output_dir={WORK / 'rm'}"]
            + [f"train.max_steps={b['rm']}", *COMMON],
        )
    )
    pm = train_pm(
        load_config(
            PMConfig,
            ROOT / "configs" / "pm.yaml",
            [f"model.name_or_path={sft}", f"data.path={pairs}", f"train.output_dir={WORK / 'pm'}"]
            + [f"train.max_steps={b['pm']}", *COMMON],
        )
    )
    genrm = WORK / "genrm"
    train_sft(
        load_config(
            SFTConfig,
            ROOT / "configs" / "thinkrm_sft.yaml",
            [f"model.name_or_path={task.model_dir}", f"model.tokenizer={task.tokenizer_dir}"]
            + [f"data.path={jp['judge_sft']}", f"train.output_dir={genrm}", f"train.max_steps={b['genrm']}", *COMMON],
        )
    )
    verdicts = WORK / "judge_verdicts.jsonl"  # the judge prompts with the verdict alone
    write_jsonl(
        verdicts,
        [{"prompt": r["prompt"], "completion": f" overall {r['label']} ."} for r in read_jsonl(jp["judge_pairs"])],
    )
    judge = WORK / "judge"
    train_sft(
        load_config(
            SFTConfig,
            ROOT / "configs" / "thinkrm_sft.yaml",
            [f"model.name_or_path={sft}", f"data.path={verdicts}", f"train.output_dir={judge}"]
            + [f"train.max_steps={b['judge']}", *COMMON],
        )
    )
    point = WORK / "point_judge"  # 0 steps: the preset's two epochs
    train_sft(
        load_config(
            SFTConfig,
            ROOT / "configs" / "judge_sft.yaml",
            [f"model.name_or_path={sft}", f"data.path={jp['judge_point_sft']}", f"train.output_dir={point}"]
            + ([f"train.max_steps={b['point_judge']}"] if b["point_judge"] else [])
            + COMMON,
        )
    )
    del rm, pm
    return {
        "point_judge": point / "model",
        "bt_rm": WORK / "rm" / "model",
        "generative_rm": genrm / "model",
        "preference_model": WORK / "pm" / "model",
        "llm_judge": judge / "model",
    }


# ----------------------------------------------------------------------------------------------- accuracy
def accuracies(task, sources: dict, rows: list) -> dict:
    """Held-out pairwise accuracy of every source on the same judge rows (``label``: this = the first is better)."""
    first_better = torch.tensor([r["label"] == "this" for r in rows])
    prompts = [r["source_prompt"] for r in rows]
    scorer = RewardModelScorer(
        [str(sources["bt_rm"])],
        model_cfg=ModelConfig(name_or_path=str(sources["bt_rm"])),
        tokenizer=str(sources["bt_rm"]),
    )
    r1 = scorer(Batch(meta={"prompt": prompts, "response": [r["first"] for r in rows]}))
    r2 = scorer(Batch(meta={"prompt": prompts, "response": [r["second"] for r in rows]}))
    out = {"bt_rm": float(((r1 > r2) == first_better).float().mean())}
    pm = PreferenceModel(str(sources["preference_model"]))
    p = pm.win_prob(prompts, [r["first"] for r in rows], [r["second"] for r in rows])
    out["preference_model"] = float(((p > 0.5) == first_better).float().mean())
    judge = LocalJudge.from_path(str(sources["point_judge"]), max_new_tokens=4, chat=False)
    g1, g2 = (
        [d[1] for d in judge.verdict_dist([p + r[k] for p, r in zip(prompts, rows, strict=True)], POINT_WORDS)]
        for k in ("first", "second")
    )
    out["point_judge"] = float(((torch.tensor(g1) > torch.tensor(g2)) == first_better).float().mean())
    for name, tokens in (("generative_rm", 96), ("llm_judge", 4)):
        tok = load_tokenizer(str(sources[name]))
        model = load_causal_lm(ModelConfig(name_or_path=str(sources[name])), "cpu")
        m = evaluate_generative_rm(model, tok, rows, max_new_tokens=tokens)
        out[name] = m["accuracy"]
        out[f"{name}_parse_failures"] = m["parse_failures"]
    return out


# ----------------------------------------------------------------------------------------------- RL
def grpo_runs(task, sft: Path, sources: dict, steps: int) -> dict:
    """GRPO from the SFT policy against each source, one equal budget; the gold reward of greedy held-out responses
    before (step 0) and after, and the run's time."""
    out = {}
    for name, fn in RL_REWARDS.items():
        if name in ENV:
            os.environ[ENV[name]] = str(sources[name])
        if name == "bt_rm":
            reward = ["reward.models=[" + str(sources["bt_rm"]) + "]"]
        elif name == "point_judge":  # as configs/judge_grpo.yaml
            reward = [f"reward.judge.model={sources[name]}", "reward.judge.template=pointwise"]
            reward += ["reward.judge.question={prompt}{response}", "reward.judge.chat_template=false"]
            reward += ["reward.judge.verdict=logprob", "reward.judge.max_new_tokens=4", "reward.judge.batch_size=64"]
            reward += ["reward.judge.verdict_words=" + json.dumps(POINT_WORDS)]
        else:
            reward = [f'reward.functions={{"{fn}": 1.0}}']
        cfg = load_config(
            RLConfig,
            ROOT / "configs" / "rloo.yaml",
            [
                "algo.name=grpo",
                "kl.placement=loss",
                "kl.estimator=k3",
                "kl.coef=0.04",
                f"model.name_or_path={sft}",
                f"model.tokenizer={task.tokenizer_dir}",
                f"data.path={task.prompts_path}",
                f"data.eval_path={task.eval_prompts_path}",
                "rollout.prompts_per_step=8",
                "rollout.n=4",
                "rollout.max_new_tokens=32",
                "rollout.eval_prompts=64",
                "train.batch_size=32",
                "reward.timeout_s=3600",
                f"train.max_steps={steps}",
                f"train.eval_every={steps}",
                f"train.output_dir={WORK / ('rl_' + name)}",
                "reward.task={gold: 0.0}",
                "task.name=reviews",
                *reward,
                *COMMON,
            ],
        )
        t0 = time.perf_counter()
        result = train_rl(cfg)
        first = result.evals[0][1] if result.evals else {}
        out[name] = {
            "gold_before": first.get("eval/gold_reward"),
            "gold_after": result.eval.get("eval/gold_reward"),
            "sampled_gold_first4": _mean([h.get("rollout/reward_gold_mean") for h in result.history[:4]]),
            "sampled_gold_last4": _mean([h.get("rollout/reward_gold_mean") for h in result.history[-4:]]),
            "seconds": time.perf_counter() - t0,
        }
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------- report
TITLES = {
    "bt_rm": "BT reward model (`alignflow rm`)",
    "generative_rm": "generative RM (Think-RM SFT stage)",
    "preference_model": "pairwise preference model (`alignflow pm`)",
    "llm_judge": "pairwise LLM judge (SFT policy fine-tuned to give the verdict alone)",
    "point_judge": "pointwise LLM judge (SFT policy fine-tuned to grade one review, p(good))",
}


def write_report(out_dir: Path, res: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "judge_comparison.json").write_text(json.dumps(res, indent=1))
    b, acc, rl = res["budgets"], res["accuracy"], res["grpo"]
    lines = [
        "# Rewards from judges on the reviews task",
        "",
        f"`python bench/judge_comparison.py{' --quick' if res['quick'] else ''}`, {res['seconds']:.0f} s on "
        f"{res['machine']}. Training steps: BT RM {b['rm']}, preference model {b['pm']}, generative RM {b['genrm']},"
        f" pairwise judge {b['judge']}, pointwise judge {b['point_judge'] or 'two epochs'}; GRPO {b['rl']} steps of"
        " 8 prompts x 4 samples for every source.",
        "",
        f"| reward source | held-out pairwise accuracy ({acc['n']} pairs) | gold before GRPO | gold after GRPO |"
        " gold of samples, first 4 steps | last 4 steps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, title in TITLES.items():
        g = rl.get(name, {})
        before, after = g.get("gold_before"), g.get("gold_after")
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        s4, e4 = g.get("sampled_gold_first4"), g.get("sampled_gold_last4")
        lines.append(f"| {title} | {acc[name]:.3f} | {fmt(before)} | {fmt(after)} | {fmt(s4)} | {fmt(e4)} |")
    lines += [
        "",
        "Accuracy: the share of held-out pairs (openings never seen in training) where the source prefers the review"
        " with the higher hidden gold reward; the generative RM and the judge count a missing verdict as wrong"
        f" (missing: generative RM {acc['generative_rm_parse_failures']:.3f}, pairwise judge"
        f" {acc['llm_judge_parse_failures']:.3f}). Gold before / after: the task's hidden gold reward of greedy"
        " responses to 64 held-out prompts; gold of samples: the mean gold of the GRPO step's 32 sampled responses"
        " over its first and last 4 steps. Every GRPO run sees the same prompts in the same order, so the sampled"
        " columns move with the prompts' difficulty too: a source whose advantages are all 0 (every comparison a"
        " tie) leaves the policy as it was, and its row then shows that drift alone. One seed; differences of a"
        " few hundredths are within run-to-run noise.",
    ]
    (out_dir / "judge_comparison.md").write_text("\n".join(lines) + "\n")


def main(argv: list | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the .md and .json go")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    b = BUDGETS["quick" if args.quick else "full"]
    t0 = time.perf_counter()
    task = build_task("reviews", TaskConfig(name="reviews"), WORK / "task")
    sft = builtin_sft_model(TaskConfig(name="reviews"), WORK / "x", progress=False)
    sources = train_sources(task, sft, b)
    rows = read_jsonl(judge_paths(task.dir)["judge_eval"])[: b["eval_pairs"]]
    acc = accuracies(task, sources, rows) | {"n": len(rows)}
    rl = grpo_runs(task, sft, sources, b["rl"])
    res = {
        "quick": args.quick,
        "budgets": b,
        "accuracy": acc,
        "grpo": rl,
        "seconds": time.perf_counter() - t0,
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    write_report(Path(args.out), res)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
