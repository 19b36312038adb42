"""What the paper-finding benches share: the reviews task at a CPU size, its SFT policy, gold-labelled preference
pairs sampled from that policy, proxy reward models trained on them, RL / DPO runs, and one evaluation of a policy.

The setting is the synthetic gold-reward one of the over-optimisation papers: the task's hidden ``gold_reward``
plays the human, a Bradley-Terry reward model trained on a few hundred of its noisy labels (``label_noise`` = 1)
is the proxy that RL optimises, and every policy is measured by sampling held-out prompts:

* ``gold``  = mean gold reward of the samples (never optimised); ``gold_se`` its standard error (sample std /
  sqrt(samples));
* ``proxy`` = mean score of the proxy reward model(s) on the same samples (the members' mean for an ensemble);
* ``kl``    = mean over samples of sum_t (log pi(y_t) - log pi_sft(y_t)): KL(pi || pi_sft) per sequence, nats
  (``alignflow.eval.evaluate.kl_metrics``; the same samples, so gold, proxy and KL are paired).

Every policy is sampled with the same seed on the same prompts (common random numbers). Sizes come from a
:class:`Scale`: ``QUICK`` is for the tests (seconds, meaningless numbers), ``FULL`` for the recorded runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"


@dataclasses.dataclass(frozen=True)
class Scale:
    hidden: int = 64  # the task's Llama: hidden, 2 heads, MLP 2 x hidden, ``layers`` layers, 255-word vocabulary
    layers: int = 2
    sft_steps: int = 300  # sft_batch rows each, lr 3e-3
    pair_prompts: int = 1024  # prompts sampled twice by the SFT policy -> one labelled pair each (1/8 held out)
    rm_steps: int = 150
    new_tokens: int = 24
    eval_prompts: int = 128  # held-out prompts x eval_samples samples per evaluated policy
    eval_samples: int = 4
    rl_steps: int = 80
    rl_rows: int = 32  # responses per RL step
    save_every: int = 8  # RL checkpoints evaluated along the run
    po_steps: int = 40
    rl_lr: float = 3e-4
    rm_batch: int = 32
    num_sft: int = 2000  # rows of the task's SFT corpus
    sft_batch: int = 32


QUICK = Scale(
    hidden=16,
    layers=1,
    sft_steps=2,
    num_sft=200,
    sft_batch=8,
    pair_prompts=16,
    rm_steps=2,
    new_tokens=8,
    eval_prompts=4,
    eval_samples=2,
    rl_steps=2,
    rl_rows=4,
    save_every=1,
    po_steps=2,
    rm_batch=8,
)
FULL = Scale()


def threads(n: int = 1) -> None:
    """``n`` torch threads; the inter-op pool too, which torch allows to be set only before its first use."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already used in this process (a second bench run in one test session)
        pass


@dataclasses.dataclass
class Setup:
    """The built task, the SFT policy (the RL start and the KL reference) and the labelled pairs."""

    work: Path
    scale: Scale
    task: object
    sft: Path
    pairs_train: Path
    pairs_eval: Path
    tok: object


def _quiet_train(out: Path, steps: int, batch: int, seed: int = 0, **extra) -> dict:
    return {
        "output_dir": str(out),
        "overwrite": True,
        "batch_size": batch,
        "max_steps": steps,
        "seed": seed,
        "progress": False,
        "report_to": [],
        **extra,
    }


def setup(work: Path, scale: Scale) -> Setup:
    """Build (or reuse) the task, SFT model and gold-labelled pairs under ``work``."""
    from alignflow.config import ModelConfig, SFTConfig, TaskConfig, from_dict
    from alignflow.models import load_causal_lm, load_tokenizer
    from alignflow.rollout.sample import sample
    from alignflow.tasks import build_task
    from alignflow.tasks.common import read_jsonl, write_jsonl
    from alignflow.tasks.labels import label_pairs
    from alignflow.trainers.sft import train_sft

    work = Path(work)
    task = build_task(
        "reviews",
        TaskConfig(
            hidden_size=scale.hidden,
            num_layers=scale.layers,
            num_heads=2,
            intermediate_size=2 * scale.hidden,
            num_sft=scale.num_sft,
            num_pairs=10,
        ),
        work / "task",
    )
    sft = work / "sft" / "model"
    if not sft.exists():
        train_sft(
            from_dict(
                SFTConfig,
                {
                    "model": {"name_or_path": str(task.model_dir), "tokenizer": str(task.tokenizer_dir)},
                    "data": {"path": str(task.sft_path), "max_len": 64, "eval_fraction": 0.0},
                    "optim": {"lr": 3e-3, "scheduler": "constant"},
                    "train": _quiet_train(work / "sft", scale.sft_steps, scale.sft_batch),
                },
            )
        )
    tok = load_tokenizer(str(task.tokenizer_dir))
    train_p, eval_p = work / "pairs_train.jsonl", work / "pairs_eval.jsonl"
    if not train_p.exists():
        prompts = [r["prompt"] for r in read_jsonl(task.prompts_path)[: scale.pair_prompts]]
        samples, _ = sample(
            load_causal_lm(ModelConfig(name_or_path=str(sft))), tok, prompts, 2, scale.new_tokens, 1.0, 0
        )
        pairs = label_pairs(prompts, samples, task.gold_reward, 1.0, 0)
        n_eval = max(2, len(pairs) // 8)
        write_jsonl(eval_p, pairs[:n_eval])
        write_jsonl(train_p, pairs[n_eval:])
    return Setup(work, scale, task, sft, train_p, eval_p, tok)


def train_rm(s: Setup, seed: int = 0) -> Path:
    """A Bradley-Terry reward model initialised from the SFT model, trained on the pairs with ``seed`` (head init
    and batch order); cached under ``work/rm-<seed>``. Ensemble members differ only in this seed."""
    from alignflow.config import RMConfig, from_dict
    from alignflow.trainers.rm import train_rm as _train

    out = s.work / f"rm-{seed}"
    if not (out / "model").exists():
        _train(
            from_dict(
                RMConfig,
                {
                    "model": {"name_or_path": str(s.sft)},
                    "data": {"path": str(s.pairs_train), "eval_path": str(s.pairs_eval), "max_len": 64},
                    "optim": {"lr": 1e-3, "scheduler": "constant"},
                    "train": _quiet_train(out, s.scale.rm_steps, s.scale.rm_batch, seed),
                },
            )
        )
    return out / "model"


def rm_accuracy(s: Setup, rm: Path) -> float:
    """Share of held-out pairs the reward model orders like their (noisy) labels."""
    from alignflow.config import ModelConfig
    from alignflow.data.render import encode_pair
    from alignflow.models import load_reward_model
    from alignflow.models.sequences import score
    from alignflow.tasks.common import read_jsonl

    rows = read_jsonl(s.pairs_eval)
    model = load_reward_model(ModelConfig(name_or_path=str(rm)), num_labels=None, pad_token_id=s.tok.pad_token_id)

    def ids(r, key):
        return encode_pair(s.tok, r["prompt"], r[key], max_prompt_len=64, max_len=64).input_ids

    c = score(model, [ids(r, "chosen") for r in rows], s.tok.pad_token_id, model.device).mean(-1)
    j = score(model, [ids(r, "rejected") for r in rows], s.tok.pad_token_id, model.device).mean(-1)
    return float((c > j).float().mean())


def rl_config(s: Setup, out: Path, algo: dict, kl_coef: float, reward: dict, rows: int | None = None, **over):
    """An ``alignflow rl`` config from the SFT policy on the task's prompts; PPO gets one sample per prompt and 2
    epochs of 2 mini-batches, group methods ``n`` = 4 and one update per batch."""
    from alignflow.config import RLConfig, from_dict

    sc = s.scale
    rows = rows or sc.rl_rows
    critic = algo["name"] in ("ppo",)
    n = 1 if critic else 4
    cfg = {
        "model": {"name_or_path": str(s.sft), "tokenizer": str(s.task.tokenizer_dir)},
        "task": {"name": "reviews"},
        "data": {"path": str(s.task.prompts_path), "eval_path": str(s.task.eval_prompts_path)},
        "algo": {"ppo_epochs": 2 if critic else 1} | algo,
        "kl": {"coef": kl_coef},
        "rollout": {"prompts_per_step": max(1, rows // n), "n": n, "max_new_tokens": sc.new_tokens, "eval_prompts": 0},
        "reward": reward,
        "optim": {"lr": sc.rl_lr, "scheduler": "constant"},
        "critic": {"optim": {"lr": 3e-3, "scheduler": "constant"}},
        "train": _quiet_train(
            out, sc.rl_steps, max(1, rows // 2) if critic else rows, save_every=sc.save_every, save_total_limit=0
        ),
    }
    for k, v in over.items():
        cfg[k] = cfg.get(k, {}) | v
    return from_dict(RLConfig, cfg)


def rm_reward(rms: list[Path], aggregation: str = "mean", **extra) -> dict:
    """The reward section of an RL run against the proxy reward model(s); the gold reward rides along at weight 0
    (logged as ``rollout/reward_gold_mean``, never optimised)."""
    return {"models": [str(p) for p in rms], "aggregation": aggregation, "task": {"gold": 0.0}, **extra}


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, policy) for every checkpoint of an RL run (step 0 is not among them: it is the SFT model)."""
    root = run / "checkpoints"
    found = [(int(p.name[5:]), p) for p in root.glob("step-*") if p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found)


class Evaluator:
    """Samples a policy on the held-out prompts and measures gold, proxy and KL to the SFT policy."""

    def __init__(self, s: Setup, rms: list[Path], seed: int = 1234):
        import torch

        from alignflow.config import ModelConfig
        from alignflow.models import load_causal_lm
        from alignflow.rewards.model import RewardModelScorer
        from alignflow.tasks.common import read_jsonl

        self.s, self.seed = s, seed
        self.device = torch.device("cpu")
        rows = read_jsonl(s.task.eval_prompts_path)[: s.scale.eval_prompts]
        self.prompts = [r["prompt"] for r in rows]
        self.prompt_ids = [s.tok(p)["input_ids"] for p in self.prompts]
        self.ref = load_causal_lm(ModelConfig(name_or_path=str(s.sft)), self.device)
        self.rm = (
            RewardModelScorer([str(p) for p in rms], device=self.device, pad_token_id=s.tok.pad_token_id)
            if rms
            else None
        )

    def policy(self, path: Path):
        from alignflow.eval.frontier import load_policy

        return load_policy(path, str(self.s.sft), self.device)

    def __call__(self, policy) -> dict:
        import torch

        from alignflow.eval.evaluate import kl_metrics, policy_logprobs
        from alignflow.rollout.sample import sample_batch

        n = self.s.scale.eval_samples
        with torch.no_grad():
            b = sample_batch(policy, self.s.tok, self.prompt_ids, n, self.s.scale.new_tokens, 1.0, self.seed)
            prompts = [p for p in self.prompts for _ in range(n)]
            gold = self.s.task.gold_reward(prompts, b["response"])
            members = self.rm.member_scores(b) if self.rm is not None else None  # (B, k)
            kl = kl_metrics(policy_logprobs(policy, b, 1.0), policy_logprobs(self.ref, b, 1.0), b["response_mask"])
        return {
            "gold": sum(gold) / len(gold),
            "gold_se": statistics.stdev(gold) / math.sqrt(len(gold)) if len(gold) > 1 else float("nan"),
            "proxy": float(members.mean()) if members is not None else float("nan"),
            "proxy_min": float(members.min(-1).values.mean()) if members is not None else float("nan"),
            "kl": max(0.0, kl["eval/kl"]),
            "sqrt_kl": math.sqrt(max(0.0, kl["eval/kl"])),
            "response_len": float(b["response_mask"].sum(-1).float().mean()),
        }


def curve(ev: Evaluator, run: Path, label: str, start: dict | None = None) -> list[dict]:
    """The SFT start (step 0) and every checkpoint of ``run``, each evaluated; rows tagged with ``label``."""
    rows = [{"run": label, "step": 0, **(start or ev(ev.ref))}]
    for step, path in checkpoints(run):
        rows.append({"run": label, "step": step, **ev(ev.policy(path))})
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


# ------------------------------------------------------------------------------------------ output
def fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def md_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def write_results(name: str, out_dir: Path, rows: list[dict], columns: list[str], text: str, meta: dict) -> dict:
    """``<name>.json`` (meta + rows) and ``<name>.md`` (text, then the table of ``columns``) under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "columns": columns, "rows": rows}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (out_dir / f"{name}.md").write_text(text.rstrip() + "\n\n" + md_table(rows, columns))
    return payload


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def machine(scale: Scale) -> dict:
    import platform

    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_1min": os.getloadavg()[0],
        "scale": dataclasses.asdict(scale),
    }


def base_parser(doc: str):
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds: for the tests (numbers meaningless)")
    ap.add_argument("--work", default="", help="work directory (default runs/bench_findings[_quick])")
    ap.add_argument("--out", default=str(RESULTS), help="where the table (md, json) and the plot (png) go")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def parse(ap, argv) -> tuple:
    args = ap.parse_args(argv)
    scale = QUICK if args.quick else FULL
    work = Path(args.work or ("runs/bench_findings_quick" if args.quick else "runs/bench_findings"))
    threads(1)
    return args, scale, work
