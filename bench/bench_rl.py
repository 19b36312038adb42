"""Online-RL throughput: alignflow ``train_rl`` (GRPO, RLOO) vs TRL ``GRPOTrainer`` / ``RLOOTrainer``, no vLLM.

Workload (identical on both sides):

* policy: the ``reviews`` task's tiny Llama of the other benches (hidden 256, 4 layers, 4 heads, MLP 1024, the
  task's word-level tokenizer), briefly SFT-trained by alignflow on the task's corpus (``SFT_STEPS`` steps,
  cached in ``--work``) so that responses end with EOS on their own (~99% do, ~20 tokens on average) instead
  of running to the 64-token cap as a random model would. Both sides load these same weights and tokenizer;
  the reference model is a second copy of them.
* prompts: the task's RL prompts (``Review : `` + a 2-4 word opening), ``--batch`` prompts per step (16) in the
  SAME order on both sides (alignflow's seeded prompt stream; TRL gets that order with ``shuffle_dataset=False``),
  and the same token ids (checked: TRL tokenises the text itself);
* group size 8, at most 64 new tokens, temperature 1, no top-k / top-p: 128 completions per step;
* reward: the task's gold reward (``alignflow.tasks.reviews.gold_reward``), a plain Python function on both sides
  (alignflow ``reward.task: {gold: 1.0}``; TRL a ``reward_funcs`` wrapper around the same function);
* algorithm and KL from the presets ``configs/grpo.yaml`` / ``configs/rloo.yaml``: GRPO beta 0.04 with the k3
  estimator as a loss term (TRL GRPO's only KL form; ``loss_type="grpo"`` = per-sequence token mean, clip 0.2),
  RLOO beta 0.03 with k1 summed into the sequence reward (TRL RLOO's only KL form). ``--no-kl`` sets beta 0 on
  both sides (no reference model at all);
* one optimiser step per generation batch (alignflow ``train.batch_size = 128``, ``ppo_epochs 1``; TRL
  ``per_device_train_batch_size = 128``, ``steps_per_generation = 1``, ``num_iterations = 1``), AdamW lr 1e-5
  constant (small, so that response lengths stay put over the run), no weight decay, grad-norm clip 1.0, fp32,
  the same number of torch threads, ``train.micro_batch_tokens`` at its default (8192) for alignflow
  (``--alignflow-budget N`` adds a second alignflow contender with ``train.micro_batch_tokens=N``).

TRL at its fastest settings without vLLM: ``gradient_checkpointing=False`` and ``bf16=False`` (TRL defaults to
True for both), no completion logging, no saving/eval, its default fused AdamW; liger kernels are not installed
and ``torch_compile`` is left off (CPU: minutes of compilation for a run of seconds). The generation backends
``--sweep`` times (``TRL_MODES``):

* ``generate``     ``model.generate`` (TRL's default path; transformers' dynamic KV cache);
* ``static_cache`` ``cache_implementation="static"`` (pre-allocated KV cache);
* ``paged``        ``use_transformers_continuous_batching=True`` (transformers' continuous-batching engine).

Timing. A step is a whole RL step: generation, reward, reference and old log-probs, advantages, forward,
backward, clipping and the optimiser step. completions/s = completions of the timed steps / wall time from the
end of the last warm-up step (``--warmup``, 1) to the end of the last timed step, so model loading and the
first step are excluded. Hooks: alignflow's ``online.rl_step`` is wrapped (the clock stamps when it returns;
completions, generated tokens and ``perf/gen_s`` come from the metrics it returns, the same numbers as
``metrics.jsonl``); on the TRL side a ``TrainerCallback.on_step_end`` stamps the clock and a wrapper around the
trainer's ``_generate`` (prompt tokenisation + ``model.generate`` + EOS masking + decoding: the counterpart of
alignflow's ``rollout.generate``, which also decodes) times generation and counts completions and tokens.
generation share = generation seconds of the timed steps / their wall time, the same formula on both sides.
Each contender runs in its own child process; contenders alternate (TRL, alignflow per algorithm, ``--runs``
times) and medians are compared.

    python bench/bench_rl.py [--algo grpo|rloo|both] [--steps 6] [--runs 3] [--threads 1] [--sweep]
    python bench/bench_rl.py --sweep --alignflow-budget 2048     # the recorded run (~37 min on 2 loaded cores)
    python bench/bench_rl.py --steps 2 --runs 1 --batch 8        # smoke run, 90 s (137 s at --batch 16)
    python bench/bench_rl.py --async-steps 1                     # alignflow sync vs one-step-off (no TRL)

The first run also SFT-trains the policy (~25 s, cached in ``--work``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "rl"
ALGOS = ("grpo", "rloo")
TRL_MODES = ("generate", "static_cache", "paged")
GROUP, NEW_TOKENS, LR = 8, 64, 1e-5
SFT_STEPS, SFT_LR = 60, 3e-3
TRL_LOSS = {"grpo": "grpo"}  # GRPO's per-sequence token mean (alignflow seq_mean_token_mean); RLOO has one loss


# ------------------------------------------------------------------------------------------ workload
def prepare_workload(work: Path, threads: int, no_kl: bool) -> dict:
    """The task, the SFT-trained policy (built once, reused) and the shared settings; returns what every child
    reads (also written to ``work/rl_workload.json``)."""
    import yaml

    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    task = common.build_task_dir(work)
    policy = work / "rl-policy"
    stamp = {"task_model": str(task.model_dir), "steps": SFT_STEPS, "lr": SFT_LR, "batch_size": 32, "seed": 0}
    done = policy / "sft.json"  # written last: the policy is complete and was trained as ``stamp`` says
    if not done.exists() or json.loads(done.read_text()) != stamp:
        from alignflow.config import SFTConfig, from_dict
        from alignflow.trainers.sft import train_sft

        print(f"SFT of the benchmark policy ({SFT_STEPS} steps, once; cached in {policy})", flush=True)
        train_sft(
            from_dict(
                SFTConfig,
                {
                    "model": {"name_or_path": str(task.model_dir), "tokenizer": str(task.tokenizer_dir)},
                    "data": {"path": str(task.sft_path), "eval_fraction": 0.0},
                    "optim": {"lr": SFT_LR, "scheduler": "cosine", "warmup_ratio": 0.05},
                    "train": {
                        "overwrite": True,
                        "output_dir": str(policy),
                        "batch_size": 32,
                        "max_steps": SFT_STEPS,
                        "progress": False,
                        "log_every": SFT_STEPS,
                        "device": "cpu",
                        "mixed_precision": "none",
                        "num_threads": threads,
                        "seed": 0,
                    },
                },
            )
        )
        done.write_text(json.dumps(stamp))
    presets = {a: yaml.safe_load((common.ROOT / "configs" / f"{a}.yaml").read_text()) for a in ALGOS}
    wl = {
        "model_dir": str(policy / "model"),
        "tokenizer_dir": str(task.tokenizer_dir),
        "prompts_path": str(task.prompts_path),
        "algo": {a: presets[a]["algo"] for a in ALGOS},
        "kl": {a: {**presets[a]["kl"], **({"coef": 0.0} if no_kl else {})} for a in ALGOS},
    }
    (work / "rl_workload.json").write_text(json.dumps(wl))
    return wl


def _workload(args) -> dict:
    return json.loads((Path(args.work) / "rl_workload.json").read_text())


def alignflow_config(args, wl: dict, algo: str, micro_batch_tokens: int = 0, async_steps: int = 0):
    """``micro_batch_tokens`` 0 keeps the trainer's default ``train.micro_batch_tokens``; ``async_steps`` sets
    ``rollout.async_steps`` (0: synchronous)."""
    from alignflow.config import RLConfig, from_dict

    budget = {"micro_batch_tokens": micro_batch_tokens} if micro_batch_tokens else {}
    return from_dict(
        RLConfig,
        {
            "model": {"name_or_path": wl["model_dir"], "tokenizer": wl["tokenizer_dir"]},
            "data": {"path": wl["prompts_path"], "eval_fraction": 0.0},
            "task": {"name": "reviews"},
            "algo": wl["algo"][algo],
            "kl": wl["kl"][algo],
            "rollout": {
                "prompts_per_step": args.batch,
                "n": GROUP,
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": 0,
                "max_new_tokens": NEW_TOKENS,
                "eval_prompts": 0,
                "async_steps": async_steps,
            },
            "reward": {"task": {"gold": 1.0}},
            "optim": {"lr": LR, "scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0},
            "train": {
                "overwrite": True,
                "output_dir": str(Path(args.work) / f"alignflow-{algo}"),
                "batch_size": args.batch * GROUP,
                "max_steps": args.warmup + args.steps,
                "progress": False,
                "log_every": 1,
                "seed": 0,
                "mixed_precision": "none",
                "device": "cpu",
                "num_threads": args.threads,
                **budget,
            },
        },
    )


class Tally:
    """Per-step completions, generated tokens and generation seconds, next to a :class:`common.StepClock`."""

    def __init__(self, warmup: int, steps: int):
        self.clock = common.StepClock(warmup, steps)
        self.completions: list[int] = []
        self.gen_s: list[float] = []

    def result(self) -> dict:
        w, n = self.clock.warmup, self.clock.timed
        if len(self.gen_s) < w + n or len(self.completions) < w + n:
            raise RuntimeError(f"{len(self.gen_s)} generations / {len(self.completions)} steps counted; need {w + n}")
        res = self.clock.result()  # tokens = generated tokens (EOS included)
        completions, gen = sum(self.completions[w : w + n]), sum(self.gen_s[w : w + n])
        return res | {
            "completions": completions,
            "completions_per_s": completions / res["seconds"],
            "completions_per_cpu_s": completions / res["cpu_seconds"],
            "gen_seconds": gen,
            "gen_share": gen / res["seconds"],
            "mean_completion_len": res["tokens"] / completions,
        }


# ------------------------------------------------------------------------------------------ alignflow
def alignflow_side(args, wl: dict, algo: str, mode: str) -> dict:
    """``mode`` "" runs the trainer's defaults; "mbtN" sets ``train.micro_batch_tokens=N``; "asyncK" sets
    ``rollout.async_steps=K``."""
    from alignflow.trainers import rl as online

    knob = next((k for k in ("mbt", "async") if mode.startswith(k) and mode[len(k) :].isdigit()), None)
    if mode and knob is None:
        raise ValueError(f"alignflow mode {mode!r}: expected '', 'mbt<N>' (micro_batch_tokens) or 'async<K>'")
    value = int(mode[len(knob) :]) if knob else 0
    cfg = alignflow_config(args, wl, algo, value if knob == "mbt" else 0, value if knob == "async" else 0)
    tally, real_step, shares = Tally(args.warmup, args.steps), online.rl_step, []

    def timed_step(*a, **k):
        m = real_step(*a, **k)
        tally.clock.mark()
        rows = cfg.rollout.prompts_per_step * cfg.rollout.n
        tally.completions.append(rows)
        tally.clock.tokens.append(round(m["rollout/response_len"] * rows))
        tally.gen_s.append(m["perf/gen_s"])
        shares.append(m["perf/gen_share"])
        return m

    online.rl_step = timed_step
    online.train_rl(cfg)
    w = args.warmup
    return tally.result() | {
        "logged_gen_share": statistics.mean(shares[w : w + args.steps]),
        "settings": {
            "algo": wl["algo"][algo],
            "kl": wl["kl"][algo],
            "algo.is_correction": cfg.algo.is_correction,
            "train.micro_batch_tokens": cfg.train.micro_batch_tokens,
            "rollout.async_steps": cfg.rollout.async_steps,
        },
    }


# ------------------------------------------------------------------------------------------ TRL
def trl_gold_reward(prompts, completions, **_):
    """The task's gold reward in TRL's ``reward_funcs`` signature (plain-text prompts and completions)."""
    from alignflow.tasks.reviews import gold_reward

    return gold_reward(prompts, completions)


def trl_prompts(args, wl: dict, tok) -> list[str]:
    """alignflow's prompt stream for the run (the same rows, in the same order); asserts TRL's tokenisation of
    the text gives alignflow's prompt ids."""
    from alignflow.config import RLConfig, from_dict
    from alignflow.data.pipeline import prepare_data
    from alignflow.trainers.rl_setup import PromptStream

    cfg = from_dict(RLConfig, {"data": {"path": wl["prompts_path"], "eval_fraction": 0.0}, "train": {"seed": 0}})
    rows = prepare_data(cfg.data, tok, expect=("prompt",), seed=cfg.train.seed).train
    taken = PromptStream(rows, cfg.train.seed).take(args.batch * (args.warmup + args.steps))
    texts, ids = taken["prompt"], taken["prompt_token_ids"]
    if tok(text=texts)["input_ids"] != [list(i) for i in ids]:
        raise RuntimeError("TRL's tokenisation of the prompts differs from alignflow's prompt ids")
    return texts


def trl_settings(mode: str) -> dict:
    if mode == "generate":
        return {}
    if mode == "static_cache":
        return {"cache_implementation": "static"}
    if mode == "paged":
        return {"use_transformers_continuous_batching": True}
    raise ValueError(f"unknown TRL mode {mode!r}; choose from {', '.join(TRL_MODES)}")


def trl_side(args, wl: dict, algo: str, mode: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from alignflow.models import load_tokenizer

    tok = load_tokenizer(wl["tokenizer_dir"])
    ds = Dataset.from_dict({"prompt": trl_prompts(args, wl, tok)})
    beta = float(wl["kl"][algo]["coef"])
    algo_cfg = wl["algo"][algo]
    settings = {
        "num_generations": GROUP,
        "per_device_train_batch_size": args.batch * GROUP,
        "gradient_accumulation_steps": 1,
        "steps_per_generation": 1,
        "num_iterations": 1,
        "max_completion_length": NEW_TOKENS,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "beta": beta,
        "epsilon": algo_cfg.get("clip_low", 0.2),
        "shuffle_dataset": False,
        **trl_settings(mode),
    }
    if algo in TRL_LOSS:
        settings["loss_type"] = TRL_LOSS[algo]
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algo == "grpo" else (RLOOConfig, RLOOTrainer)
    targs = config_cls(
        output_dir=str(Path(args.work) / f"trl-{algo}-{mode}"),
        max_steps=args.warmup + args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=10**6,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        log_completions=False,
        seed=0,
        **settings,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(wl["model_dir"], dtype=torch.float32)
    tally = Tally(args.warmup, args.steps)

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            tally.clock.mark()

    trainer = trainer_cls(
        model=model,
        reward_funcs=trl_gold_reward,
        args=targs,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Clock()],
    )
    real_generate = trainer._generate

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        out = real_generate(*a, **k)
        tally.gen_s.append(time.perf_counter() - t0)
        completion_ids = out[1]  # (prompt_ids, completion_ids, ...) in both trainers
        tally.completions.append(len(completion_ids))
        tally.clock.tokens.append(sum(len(c) for c in completion_ids))
        return out

    trainer._generate = timed_generate
    trainer.train()
    shown = settings | {
        "gradient_checkpointing": False,
        "bf16": False,
        "optim": getattr(targs.optim, "value", str(targs.optim)),
    }
    return tally.result() | {"settings": shown}


# ------------------------------------------------------------------------------------------ comparison
def summary(runs: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {
        "median_completions_per_s": med("completions_per_s"),
        "median_tokens_per_s": med("tokens_per_s"),
        "median_completions_per_cpu_s": med("completions_per_cpu_s"),
        "median_gen_share": med("gen_share"),
        "median_completion_len": med("mean_completion_len"),
        "runs": runs,
    }


def _commit() -> str:
    """The repository's HEAD (+ "-dirty" with uncommitted changes), so that a result names the code it timed."""
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=common.ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return (head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) if head else "unknown"


def compare(args) -> dict:
    """Prepare, optionally sweep TRL's generation settings, alternate the contenders; the result record."""
    work = Path(args.work)
    algos = ALGOS if args.algo == "both" else (args.algo,)
    machine = common.machine_info(args.threads)
    prepare_workload(work, args.threads, args.no_kl)
    print(
        f"RL bench: {', '.join(algos)}; {args.batch} prompts x {GROUP} completions/step, <= {NEW_TOKENS} new "
        f"tokens, {args.warmup} warm-up + {args.steps} timed steps, {args.repeats} run(s), {args.threads} thread(s), "
        f"load {common.load_average():.2f}",
        flush=True,
    )
    script = Path(__file__).resolve()
    trl_mode, sweep = {a: args.trl_mode for a in algos}, {}
    if args.sweep:
        quick = argparse.Namespace(**{**vars(args), "steps": args.sweep_steps})
        for a in algos:
            runs = common.alternate(script, quick, work, [("trl", f"{a}.{m}") for m in TRL_MODES], 1)
            sweep[a] = {key.split(".", 1)[1]: summary(v) for key, v in runs.items()}  # "trl/grpo.generate"
            trl_mode[a] = max(sweep[a], key=lambda m: sweep[a][m]["median_completions_per_s"])
            print(f"  {a}: fastest TRL setting {trl_mode[a]}", flush=True)
    tuned = f".mbt{args.alignflow_budget}" if args.alignflow_budget else ""
    sides = [
        s
        for a in algos
        for s in [("trl", f"{a}.{trl_mode[a]}"), ("alignflow", a)] + ([("alignflow", a + tuned)] if tuned else [])
    ]
    runs = common.alternate(script, args, work, sides, args.repeats)
    out = {
        "bench": NAME,
        "machine": machine,
        "alignflow_commit": _commit(),
        "steps": args.steps,
        "warmup": args.warmup,
        "runs": args.repeats,
        "prompts_per_step": args.batch,
        "group": GROUP,
        "max_new_tokens": NEW_TOKENS,
        "lr": LR,
        "sft_steps": SFT_STEPS,
        "kl": "off" if args.no_kl else "presets",
        "trl_sweep_steps": args.sweep_steps if sweep else 0,
        "alignflow_budget": args.alignflow_budget,
        "algos": {},
    }
    for a in algos:
        tr = summary(runs[f"trl/{a}.{trl_mode[a]}"])
        rec = {"trl_mode": trl_mode[a], "trl": tr, "trl_sweep": sweep.get(a, {})}
        for key, mode in (("alignflow", a), ("alignflow_tuned", a + tuned)) if tuned else (("alignflow", a),):
            af = summary(runs[f"alignflow/{mode}"])
            rec[key] = af | {
                "ratio": af["median_completions_per_s"] / tr["median_completions_per_s"],
                "token_ratio": af["median_tokens_per_s"] / tr["median_tokens_per_s"],
                "cpu_time_ratio": af["median_completions_per_cpu_s"] / tr["median_completions_per_cpu_s"],
            }
            print(
                f"{a.upper()} alignflow{'[' + mode.split('.')[1] + ']' if '.' in mode else ''}/TRL[{trl_mode[a]}] "
                f"= {rec[key]['ratio']:.2f}x completions/s ({af['median_completions_per_s']:.1f} vs "
                f"{tr['median_completions_per_s']:.1f}), {rec[key]['token_ratio']:.2f}x generated tok/s, "
                f"{rec[key]['cpu_time_ratio']:.2f}x per CPU second; generation share {af['median_gen_share']:.0%}"
                f" vs {tr['median_gen_share']:.0%}; mean completion {af['median_completion_len']:.1f} vs "
                f"{tr['median_completion_len']:.1f} tokens",
                flush=True,
            )
        out["algos"][a] = rec
    return out


def markdown(res: dict) -> str:
    """The RL section of ``bench/results/README.md``."""
    m = res["machine"]
    lines = [
        "# alignflow vs TRL: online RL (GRPO, RLOO), no vLLM",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared), torch threads {m['threads']}; torch {m['torch']}, "
        f"transformers {m['transformers']}, trl {m['trl']}; {m['date']}, 1-min load at start "
        f"{m['load_average_1m_at_start']:.2f}; alignflow {res.get('alignflow_commit', 'commit not recorded')}.",
        "",
        f"{res['prompts_per_step']} prompts x {res['group']} completions per step, <= {res['max_new_tokens']} new "
        f"tokens, KL {res['kl']}, 1 optimiser step per generation batch, lr {res['lr']:g}; {res['warmup']} warm-up "
        f"+ {res['steps']} timed steps, medians of {res['runs']} alternated run(s). completions/s = completions of "
        "the timed steps / their wall time (generation, reward, reference and old log-probs, update); per CPU-s: "
        "the same per second of process CPU time (steadier on a loaded machine); generation share = generation "
        "seconds / step seconds. Method: `docs/benchmarks.md`. Regenerate with "
        f"`python bench/bench_rl.py --sweep"
        f"{' --alignflow-budget ' + str(res['alignflow_budget']) if res['alignflow_budget'] else ''}`"
        ".",
        "",
        "| algorithm | alignflow | TRL | alignflow compl/s | TRL compl/s | ratio (wall) | ratio (CPU time) | "
        "gen. tok/s ratio | gen. share af / TRL | mean completion af / TRL |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for a, r in res["algos"].items():
        tr = r["trl"]
        for key, label in (
            ("alignflow", "defaults"),
            ("alignflow_tuned", f"micro_batch_tokens={res['alignflow_budget']}"),
        ):
            if key not in r:
                continue
            af = r[key]
            lines.append(
                f"| {a.upper()} | {label} | {r['trl_mode']} | {af['median_completions_per_s']:.1f} | "
                f"{tr['median_completions_per_s']:.1f} | **{af['ratio']:.2f}x** | "
                f"{af['cpu_time_ratio']:.2f}x | {af['token_ratio']:.2f}x | "
                f"{af['median_gen_share']:.0%} / {tr['median_gen_share']:.0%} | "
                f"{af['median_completion_len']:.1f} / {tr['median_completion_len']:.1f} |"
            )
    for a, r in res["algos"].items():
        if r["trl_sweep"]:
            af = r["alignflow"]
            lines += [
                "",
                f"{a.upper()}: every TRL generation setting ({res['trl_sweep_steps']} timed steps, one "
                "run each; alignflow = its defaults' median)",
                "",
                "| TRL setting | compl/s | compl/CPU-s | gen. share | alignflow / TRL (wall) | "
                "alignflow / TRL (CPU time) |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for mode, s in r["trl_sweep"].items():
                lines.append(
                    f"| {mode} | {s['median_completions_per_s']:.1f} | "
                    f"{s['median_completions_per_cpu_s']:.1f} | {s['median_gen_share']:.0%} | "
                    f"{af['median_completions_per_s'] / s['median_completions_per_s']:.2f}x | "
                    f"{af['median_completions_per_cpu_s'] / s['median_completions_per_cpu_s']:.2f}x |"
                )
        lines += [
            "",
            f"{a.upper()} settings: alignflow `{json.dumps(r['alignflow']['runs'][0]['settings'])}`; "
            f"TRL `{json.dumps(r['trl']['runs'][0]['settings'])}`.",
        ]
    return "\n".join(lines) + "\n"


SECTION = "# alignflow vs TRL: online RL"


def write_results(res: dict, results: Path) -> None:
    """``rl.json`` and the RL section of ``README.md`` (replacing an older RL section, keeping the rest)."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{NAME}.json").write_text(json.dumps(res, indent=1))
    readme = results / "README.md"
    text = readme.read_text() if readme.exists() else ""
    if SECTION in text:
        text = text[: text.index(SECTION)]
    readme.write_text((text.rstrip() + "\n\n" if text.strip() else "") + markdown(res))


ASYNC_SECTION = "# alignflow online RL: asynchronous rollouts"


def compare_async(args) -> dict:
    """alignflow synchronous against ``rollout.async_steps=K`` (no TRL), alternated; the result record."""
    work, k = Path(args.work), args.async_steps
    algos = ALGOS if args.algo == "both" else (args.algo,)
    machine = common.machine_info(args.threads)
    prepare_workload(work, args.threads, args.no_kl)
    sides = [s for a in algos for s in (("alignflow", a), ("alignflow", f"{a}.async{k}"))]
    runs = common.alternate(Path(__file__).resolve(), args, work, sides, args.repeats)
    out = {"bench": NAME + "_async", "machine": machine, "alignflow_commit": _commit(), "async_steps": k}
    out |= {"steps": args.steps, "warmup": args.warmup, "runs": args.repeats, "prompts_per_step": args.batch}
    out |= {"group": GROUP, "max_new_tokens": NEW_TOKENS, "kl": "off" if args.no_kl else "presets", "algos": {}}
    for a in algos:
        sync, asy = summary(runs[f"alignflow/{a}"]), summary(runs[f"alignflow/{a}.async{k}"])
        speedup = asy["median_completions_per_s"] / sync["median_completions_per_s"]
        out["algos"][a] = {"sync": sync, "async": asy, "speedup": speedup}
        print(
            f"{a.upper()} async_steps={k} / sync = {speedup:.2f}x completions/s "
            f"({asy['median_completions_per_s']:.1f} vs {sync['median_completions_per_s']:.1f})",
            flush=True,
        )
    return out


def async_markdown(res: dict) -> str:
    """The asynchronous-rollouts section of ``bench/results/README.md``."""
    m = res["machine"]
    lines = [
        ASYNC_SECTION,
        "",
        f"CPU only: {m['cpu']}, {m['cores']} cores (shared), torch threads {m['threads']} per thread of work; torch "
        f"{m['torch']}; {m['date']}, 1-min load at start {m['load_average_1m_at_start']:.2f}; alignflow "
        f"{res['alignflow_commit']}. The workload of the RL bench above ({res['prompts_per_step']} prompts x "
        f"{res['group']} completions, <= {res['max_new_tokens']} new tokens, KL {res['kl']}); {res['warmup']} warm-up "
        f"+ {res['steps']} timed steps, medians of {res['runs']} alternated run(s). The async run generates in a "
        "second thread, so it can use a second core that the synchronous run leaves idle at 1 torch thread. "
        f"Regenerate with `python bench/bench_rl.py --async-steps {res['async_steps']}`.",
        "",
        "| algorithm | sync compl/s | async compl/s | speedup | gen. share sync / async |",
        "|---|---:|---:|---:|---|",
    ]
    for a, r in res["algos"].items():
        s, x = r["sync"], r["async"]
        lines.append(
            f"| {a.upper()} (async_steps={res['async_steps']}) | {s['median_completions_per_s']:.1f} | "
            f"{x['median_completions_per_s']:.1f} | **{r['speedup']:.2f}x** | "
            f"{s['median_gen_share']:.0%} / {x['median_gen_share']:.0%} |"
        )
    for a, r in res["algos"].items():
        each = {k: ", ".join(f"{run['completions_per_s']:.1f}" for run in r[k]["runs"]) for k in ("sync", "async")}
        lines += ["", f"{a.upper()} compl/s of each run: sync {each['sync']}; async {each['async']}."]
    return "\n".join(lines) + "\n"


def write_async_results(res: dict, results: Path) -> None:
    """``rl_async.json`` and the asynchronous section of ``README.md`` (replacing an older one)."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{NAME}_async.json").write_text(json.dumps(res, indent=1))
    readme = results / "README.md"
    text = readme.read_text() if readme.exists() else ""
    if ASYNC_SECTION in text:
        start = text.index(ASYNC_SECTION)
        after = text.find("\n# ", start + 1)
        text = text[:start] + (text[after + 1 :] if after >= 0 else "")
    readme.write_text(text.rstrip() + "\n\n" + async_markdown(res))


def parser() -> argparse.ArgumentParser:
    p = common.common_argparser(__doc__.splitlines()[0])
    p.set_defaults(
        steps=6,
        warmup=1,
        batch=16,
        repeats=3,
        sweep_steps=3,
        work=str(Path(common.common_argparser("").get_default("work") + "-rl")),
    )
    for opt, text in (
        ("--batch", "prompts per RL step (each sampled 8 times)"),
        ("--mode", "child run's contender: ALGO (alignflow) or ALGO.TRL_MODE (TRL)"),
        ("--steps", "timed RL steps"),
        ("--warmup", "untimed RL steps first (model loading is never timed)"),
    ):
        p._option_string_actions[opt].help = text
    p.add_argument("--runs", dest="repeats", type=int, help="alternations of the contenders (default 3)")
    p.add_argument("--algo", default="both", choices=ALGOS + ("both",))
    p.add_argument("--trl-mode", default="generate", choices=TRL_MODES, help="TRL generation setting when not sweeping")
    p.add_argument("--no-kl", action="store_true", help="beta 0 on both sides (no reference model)")
    p.add_argument(
        "--alignflow-budget",
        type=int,
        default=0,
        help="also time alignflow with train.micro_batch_tokens=N (0: only the trainer's defaults)",
    )
    p.add_argument(
        "--async-steps",
        type=int,
        default=0,
        help="instead of the TRL comparison: alignflow synchronous against rollout.async_steps=K (rl_async.json)",
    )
    return p


def main() -> None:
    args = parser().parse_args()
    if args.side != "main":
        common.set_threads(args.threads)
        wl = _workload(args)
        algo, _, mode = args.mode.partition(".")
        side = alignflow_side if args.side == "alignflow" else trl_side
        res = side(args, wl, algo, mode)
        Path(args.out).write_text(json.dumps(res))
        return
    if args.async_steps:
        write_async_results(compare_async(args), Path(args.results))
        return
    write_results(compare(args), Path(args.results))


if __name__ == "__main__":
    main()
