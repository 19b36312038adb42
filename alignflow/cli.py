"""``alignflow <command> [--config file.yaml] [section.key=value ...]``

Commands: sft, ift, rm, pm, rl, po, online_po, superhf, alol, cgpo, mpo, eval, demo, serve, merge, merge_models, recipe,
refuel.
``alignflow <command> --help`` lists every config key with its default and doc.
User mistakes (a bad config key or value, a malformed data row, a model path that does not load) end with a
one-paragraph error and exit code 2, never a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from alignflow.config import (
    ALoLConfig,
    CGPOConfig,
    ConfigError,
    DemoConfig,
    EvalConfig,
    IFTConfig,
    MergeConfig,
    MergeModelsConfig,
    MPOConfig,
    OnlinePOConfig,
    PMConfig,
    POConfig,
    QDHFConfig,
    RefuelConfig,
    RLConfig,
    RMConfig,
    ServeConfig,
    SFTConfig,
    SuperHFConfig,
    VPLConfig,
    describe,
    load_config,
)
from alignflow.recipes import RecipeConfig

COMMANDS = {
    "sft": (SFTConfig, "alignflow.trainers.sft:train_sft", "supervised fine-tuning"),
    "rm": (RMConfig, "alignflow.trainers.rm:train_rm", "reward-model training (BT, multi-objective, ensembles)"),
    "rl": (
        RLConfig,
        "alignflow.trainers.rl:train_rl",
        lambda: "online RL, algo.name one of: " + _algorithm_names(),
    ),
    "eval": (EvalConfig, "alignflow.eval.evaluate:run_eval", "evaluate a policy or a reward model"),
    "demo": (DemoConfig, "alignflow.recipes.demo:run_demo", "the whole pipeline on the built-in reviews task"),
    "po": (
        POConfig,
        "alignflow.trainers.po:train_po",
        lambda: "offline preference optimisation: " + _loss_titles(),
    ),
    "superhf": (SuperHFConfig, "alignflow.trainers.superhf:train_superhf", "SuperHF: best-of-n SFT + KL prior"),
    "alol": (ALoLConfig, "alignflow.trainers.alol:train_alol", "A-LoL: advantage-weighted offline RL"),
    "cgpo": (
        CGPOConfig,
        "alignflow.trainers.cgpo:train_cgpo",
        "CGPO: rule and LLM judges as constraints (CRPG, CODPO, CRRAFT)",
    ),
    "online_po": (
        OnlinePOConfig,
        "alignflow.trainers.online_po:train_online_po",
        "online / iterative preference optimisation: iterative DPO, INPO, APO, Nash-MD",
    ),
    "pm": (
        PMConfig,
        "alignflow.trainers.pm:train_pm",
        "pairwise preference model P(y > y' | x) on pairs in both orders",
    ),
    "serve": (ServeConfig, "alignflow.rewards.serve:serve", "serve trained reward models over HTTP (POST /score)"),
    "mpo": (
        MPOConfig,
        "alignflow.recipes.mpo:train_mpo",
        "MPO: DPO on easy pairs, then RL on the hard prompts from the DPO model",
    ),
    "merge": (
        MergeConfig,
        "alignflow.trainers.merge:merge_adapter",
        "fold a LoRA adapter into its base model: merge adapter=DIR output=DIR",
    ),
    "merge_models": (
        MergeModelsConfig,
        "alignflow.trainers.merge_models:merge_models",
        "interpolate the weights of several "
        "same-architecture models: merge_models models=[A,B] weights=[0.5,0.5] output=DIR",
    ),
    "ift": (
        IFTConfig,
        "alignflow.trainers.ift:train_ift",
        "Intuitive Fine-Tuning: SFT data, the model's own guesses mixed into the prefix, one policy",
    ),
    "qdhf": (
        QDHFConfig,
        "alignflow.trainers.qdhf:train_qdhf",
        "QDHF: diversity descriptors learned from similarity judgements, a MAP-Elites archive against best-of-n",
    ),
    "vpl": (
        VPLConfig,
        "alignflow.trainers.vpl:train_vpl",
        "VPL: a reward model conditioned on a user latent inferred from a few of the user's labelled pairs",
    ),
    "refuel": (
        RefuelConfig,
        "alignflow.trainers.refuel:train_refuel",
        "multi-turn REFUEL: regress two rollouts' log-ratio difference on their future-return difference",
    ),
    "recipe": (
        RecipeConfig,
        "alignflow.recipes.runner:run_recipe",
        "a multi-stage recipe: stages (commands) whose outputs feed the next, resumable by stage",
    ),
}


def _loss_titles() -> str:
    """The preference-loss table's losses, for ``alignflow po --help``. A documented lazy load: the table imports
    torch, which the command line needs only once a command runs."""
    from alignflow.algorithms.preference_table import PREFERENCE_LOSSES

    return ", ".join(f"{s.title or n} ({n})" for n, s in PREFERENCE_LOSSES.items())


def _algorithm_names() -> str:
    """The online-RL algorithm table's keys, for ``alignflow rl --help`` (a documented lazy load, as above)."""
    from alignflow.trainers.rl_algos import ALGORITHMS

    return ", ".join(ALGORITHMS)


def _user_errors() -> tuple[type, ...]:
    """The error types a user's mistake raises: printed as one line, not a traceback. A documented lazy load, like
    the trainer modules (COMMANDS names them as strings): ``alignflow <cmd> --help`` and a bad config key answer
    without importing torch and the trainers."""
    from alignflow.data.formats import DataError
    from alignflow.models.loading import ModelLoadError
    from alignflow.rewards import RewardError, RewardLoadError
    from alignflow.trainers.finish import HubPushError
    from alignflow.trainers.loop import NonFiniteError

    return (
        ConfigError,
        DataError,
        ModelLoadError,
        NonFiniteError,
        FileNotFoundError,
        RewardError,
        RewardLoadError,
        HubPushError,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="alignflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to run")
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    if len(argv) >= 2 and argv[0] in COMMANDS and argv[1] in ("-h", "--help"):
        cls, _, what = COMMANDS[argv[0]]
        what = what() if callable(what) else what  # a description built from a method table
        print(f"alignflow {argv[0]}: {what}\n\nconfig keys (override with key=value):")
        print("\n".join(describe(cls)))
        return 0
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cls, target, _ = COMMANDS[args.command]
    # lazy loads (see _user_errors): the trainers' modules come in only once a command runs
    from alignflow.trainers.run_dir import disarm_interrupt, disk_error, interrupted_message

    cfg = None
    try:
        cfg = load_config(cls, args.config, args.overrides)
        module, fn = target.split(":")
        from alignflow.trainers.finish import finish, preflight

        preflight(cfg)
        t0 = time.perf_counter()
        getattr(importlib.import_module(module), fn)(cfg)
        summary = finish(args.command, cfg, time.perf_counter() - t0)  # hub.push, then the one-line summary
        if summary:
            print(summary)
    except _user_errors() as e:
        if args.debug:
            raise
        print(f"alignflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line saying where the checkpoint is and how to resume
        if args.debug:
            raise
        if args.command == "recipe":  # the recipe, not the stage's trainer, is what the user re-runs
            print(
                "alignflow recipe: interrupted; run the same command again to resume (stages done are skipped, "
                "the interrupted one goes on from its last checkpoint)",
                file=sys.stderr,
            )
            return 130
        print(f"alignflow {args.command}: {interrupted_message(argv, cfg, e)}", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk or a read-only directory is the machine's state, not a bug
        if args.debug or disk_error(e) is None:
            raise
        print(f"alignflow {args.command}: error: {disk_error(e)}", file=sys.stderr)
        return 2
    finally:
        disarm_interrupt(reset=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
