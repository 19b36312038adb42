"""Typed configuration: dataclasses, YAML presets and dotted command-line overrides.

Every field is declared with :func:`field`, which takes a one-line ``doc`` (shown by ``alignflow <cmd> --help``
and checked by a test to be present on every field) and optional ``choices`` or ``range`` that are
validated when the config is loaded. Mistakes fail at load time with a message that names the key and
the valid keys or the allowed values (cleanrl ``Args`` / torchtune ``key=value``)::

    cfg = load_config(SFTConfig, "configs/sft.yaml", ["optim.lr=3e-4", "train.max_steps=100"])

Global batch sizes are algorithmic; per-device (micro) sizes are performance knobs that never change the
maths (verl's rule): ``train.batch_size`` is the number of rows per optimiser step, ``train.micro_batch_tokens``
only decides how that step is split into forward/backward passes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

_Config = TypeVar("_Config")  # a config dataclass: load_config(SFTConfig, ...) -> SFTConfig


class ConfigError(ValueError):
    """A configuration mistake; the message says which key and what is allowed."""


def field(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    choices: tuple[Any, ...] | None = None,
    range: tuple[Any, Any] | None = None,
    default_factory: Any = dataclasses.MISSING,  # noqa: A002
    check: Callable[[Any, str], Any] | None = None,
    allow_inf: bool = False,
) -> Any:
    """A dataclass field with its documentation and validation rules.

    ``range`` is ``(low, high)`` inclusive; either end may be ``None``. ``check(value, key)`` returns the
    normalised value or raises ConfigError (for rules a range cannot say). NaN is refused for every number, and
    so is an infinite one unless ``allow_inf``.
    """
    meta = {"doc": doc, "choices": choices, "range": range, "check": check, "allow_inf": allow_inf}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------- field checks
def check_betas(value: Any, key: str) -> list[float]:
    """AdamW's (beta1, beta2): two numbers, each in [0, 1)."""
    try:
        betas = [float(b) for b in value]
    except (TypeError, ValueError):
        betas = []
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{key}: {value!r} must be two numbers (beta1, beta2), each in [0, 1), e.g. [0.9, 0.999]")
    return betas


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def check_device(value: Any, key: str) -> str:
    """The device string's form (whether such a device exists is checked when the run starts)."""
    text = str(value)
    if not DEVICE_PATTERN.fullmatch(text):
        raise ConfigError(f"{key}: {text!r} is not a device; use auto, cpu, cuda, cuda:<index>, mps or xpu")
    return text


def check_micro_batch_tokens(value: Any, key: str) -> int:
    """0 (by device) or a budget of at least 16 tokens."""
    if isinstance(value, bool) or not isinstance(value, int) or (value != 0 and value < 16):
        raise ConfigError(f"{key}: {value!r} must be 0 (chosen for the device) or an integer >= 16")
    return int(value)


# ----------------------------------------------------------------------------------------------- sections
@dataclasses.dataclass
class LoraConfig:
    enabled: bool = field(False, doc="Train LoRA adapters (peft) instead of all weights.")
    r: int = field(16, doc="LoRA rank.", range=(1, None))
    alpha: int = field(32, doc="LoRA scaling numerator (alpha / r scales the update).", range=(1, None))
    dropout: float = field(0.0, doc="Dropout on the LoRA input.", range=(0.0, 1.0))
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        doc="Module names that get adapters ('all-linear' as one item for every linear layer).",
    )


@dataclasses.dataclass
class ModelConfig:
    name_or_path: str = field(
        "",
        doc="Hugging Face hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or local directory. "
        "Empty: use the built-in task's tiny model.",
    )
    tokenizer: str = field("", doc="Tokenizer path or hub id; empty means the same as name_or_path.")
    dtype: str = field(
        "float32", doc="Parameter dtype for loading.", choices=("float32", "bfloat16", "float16", "auto")
    )
    attn_implementation: str = field(
        "sdpa", doc="Attention kernel passed to transformers.", choices=("sdpa", "eager", "flash_attention_2")
    )
    gradient_checkpointing: bool = field(False, doc="Recompute activations in backward to save memory.")
    trust_remote_code: bool = field(False, doc="Allow model code from the hub repository (off unless you trust it).")
    revision: str = field("main", doc="Hub revision (branch, tag or commit).")
    lora: LoraConfig = field(default_factory=LoraConfig, doc="LoRA adapters.")


@dataclasses.dataclass
class DataConfig:
    path: str = field(
        "",
        doc="Training data: .jsonl/.json/.parquet/.csv file, a save_to_disk directory, or a hub "
        "dataset id. Empty: generate the built-in task's data.",
    )
    split: str = field("train", doc="Split name for datasets that have splits.")
    format: str = field(
        "auto",
        doc="Row format; 'auto' infers it from the fields of the first row.",
        choices=("auto", "lm", "prompt", "prompt_completion", "preference", "ranked", "unpaired", "rated"),
    )
    eval_path: str = field("", doc="Held-out data; empty means hold out eval_fraction of the training rows.")
    eval_fraction: float = field(
        0.05, doc="Fraction of rows held out for evaluation when eval_path is empty.", range=(0.0, 0.5)
    )
    max_prompt_len: int = field(
        256, doc="Prompt tokens kept (the LEFT end is cut: the most recent turns survive).", range=(1, None)
    )
    max_len: int = field(512, doc="Total tokens kept per sequence (the response's right end is cut).", range=(2, None))
    on_bad_row: str = field(
        "error",
        doc="What to do with a malformed row: stop with a report, or skip it and report the count and first examples.",
        choices=("error", "skip"),
    )
    completion_only: bool = field(True, doc="SFT: loss on response tokens only (prompt tokens masked).")
    chat_template: str = field(
        "",
        doc="Chat template for conversational rows: a Jinja template, or the path of a "
        "file holding one; it replaces the tokenizer's (and is saved with the "
        "model). Empty: the tokenizer's own.",
    )


@dataclasses.dataclass
class OptimConfig:
    lr: float = field(1e-5, doc="Peak learning rate.", range=(0.0, None))
    weight_decay: float = field(0.0, doc="AdamW decoupled weight decay.", range=(0.0, None))
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999], doc="AdamW (beta1, beta2), each in [0, 1).", check=check_betas
    )
    eps: float = field(1e-8, doc="AdamW epsilon.", range=(0.0, None))
    scheduler: str = field(
        "cosine", doc="Learning-rate schedule after warm-up.", choices=("constant", "linear", "cosine")
    )
    warmup_ratio: float = field(0.0, doc="Fraction of total steps spent warming up linearly from 0.", range=(0.0, 1.0))
    min_lr_ratio: float = field(0.0, doc="Final learning rate as a fraction of lr (cosine/linear).", range=(0.0, 1.0))
    max_grad_norm: float = field(
        1.0, doc="Clip the global gradient norm to this; 0 disables clipping.", range=(0.0, None)
    )


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = field("runs/run", doc="Run directory: checkpoints, metrics.jsonl, report.")
    seed: int = field(0, doc="Seed for data order, initialisation and sampling.")
    batch_size: int = field(
        32, doc="Rows (sequences or pairs) per optimiser step: the algorithmic batch size.", range=(1, None)
    )
    micro_batch_tokens: int = field(
        0,
        doc="Token budget of one forward/backward pass (performance knob only; "
        "the loss does not depend on it). 0 picks one for the device: 8192 "
        "on a CPU, 16384 on a GPU.",
        check=check_micro_batch_tokens,
    )
    epochs: float = field(1.0, doc="Passes over the training data (used when max_steps is 0).", range=(0.0, None))
    max_steps: int = field(0, doc="Optimiser steps; 0 means derive from epochs.", range=(0, None))
    packing: bool = field(
        True,
        doc="Pack several sequences into padding-free rows (laid end to end, attention "
        "per sequence: no pad token, no mask; models without that support get them "
        "padded); False pads length-sorted micro-batches. Same loss either way.",
    )
    mixed_precision: str = field(
        "auto",
        doc="Autocast dtype: auto = bf16 on a CUDA device that supports it, else none.",
        choices=("auto", "none", "bf16", "fp16"),
    )
    device: str = field("auto", doc="Device: auto = cuda when available, else cpu.", check=check_device)
    log_every: int = field(10, doc="Log metrics every N optimiser steps.", range=(1, None))
    eval_every: int = field(0, doc="Evaluate every N steps; 0 evaluates at the end only.", range=(0, None))
    save_every: int = field(
        500,
        doc="Checkpoint (checkpoints/step-N) every N steps and after the last step; 0 "
        "saves after the last step only. Ctrl-C also checkpoints.",
        range=(0, None),
    )
    save_total_limit: int = field(
        0,
        doc="Keep only the newest N checkpoints (older ones are deleted after each save); 0 keeps all.",
        range=(0, None),
    )
    resume: bool = field(False, doc="Resume from the latest checkpoint in output_dir when there is one.")
    overwrite: bool = field(
        False,
        doc="Let this run replace an earlier run's results in output_dir (model/, "
        "metrics.jsonl, checkpoints/); without it such a directory is refused "
        "unless resume finds a checkpoint to go on from.",
    )
    on_nonfinite: str = field(
        "error", doc="Non-finite loss or gradient: stop with a diagnostic, or skip the step.", choices=("error", "skip")
    )
    progress: bool = field(True, doc="Show a progress bar.")
    num_threads: int = field(0, doc="torch CPU threads; 0 keeps torch's default.", range=(0, None))
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        doc="Experiment trackers fed with the logged metrics: tensorboard, wandb, mlflow (any of "
        "them; [] for metrics.jsonl only). wandb and mlflow are the extras "
        "alignflow[wandb] / alignflow[mlflow].",
    )


@dataclasses.dataclass
class TaskConfig:
    name: str = field(
        "reviews",
        doc="Built-in task used when model/data paths are empty (calculator: multi-turn with a tool, see env.task).",
        choices=("reviews", "arithmetic", "calculator", "code"),
    )
    seed: int = field(0, doc="Seed for the task's grammar, data and model initialisation.")
    num_sft: int = field(4000, doc="Rows of SFT corpus generated.", range=(1, None))
    num_pairs: int = field(2000, doc="Preference pairs generated.", range=(1, None))
    label_noise: float = field(
        1.0,
        doc="Bradley-Terry temperature of preference labels (higher = noisier; 0 = "
        "always pick the higher gold reward).",
        range=(0.0, None),
    )
    hidden_size: int = field(128, doc="Tiny Llama hidden size.", range=(8, None))
    num_layers: int = field(2, doc="Tiny Llama layers.", range=(1, None))
    num_heads: int = field(4, doc="Tiny Llama attention heads.", range=(1, None))
    intermediate_size: int = field(512, doc="Tiny Llama MLP width.", range=(8, None))
    max_operand: int = field(
        0,
        doc="arithmetic: largest operand of + and - and of the first factor of * (the second "
        "is at most 9); 0 = 99. 9 (255 problems) is a range the tiny model learns. "
        "calculator: operands with its digit count up to it (99: 10..99); 0 = 6 digits.",
        range=(0, None),
    )
    sft_steps: int = field(
        0,
        doc="model.name_or_path=builtin:sft: SFT steps of the task's tiny model (built once, "
        "cached beside the run directory); 0 = the task's own default.",
        range=(0, None),
    )


@dataclasses.dataclass
class RewardConfig:
    loss: str = field(
        "bt",
        doc="Reward loss: Bradley-Terry on pairs, or regression on rated attributes.",
        choices=("bt", "regression"),
    )
    use_margin: bool = field(True, doc="Subtract the row's 'margin' inside the BT sigmoid (Llama 2) when present.")
    num_objectives: int = field(
        1,
        doc="Attributes scored (multi-objective head, ArmoRM stage 1): 1 = as many as the "
        "rated data has; more needs rated data with that many attributes.",
        range=(1, None),
    )
    gating: bool = field(False, doc="Learn a prompt-conditioned gate over objectives (ArmoRM stage 2).")
    ensemble_size: int = field(1, doc="k reward models trained from different seeds (Coste et al.).", range=(1, None))
    ensemble_mode: str = field(
        "heads",
        doc="'heads': k independently seeded heads on one backbone; 'models': k independent models.",
        choices=("heads", "models"),
    )
    aggregation: str = field(
        "mean",
        doc="How ensemble scores combine: mean, worst-case (min), uncertainty-weighted (mean - lambda * variance).",
        choices=("mean", "min", "uwo"),
    )
    uwo_lambda: float = field(0.5, doc="Variance weight of the uncertainty-weighted aggregation.", range=(0.0, None))


@dataclasses.dataclass
class HubConfig:
    push: bool = field(
        False,
        doc="Upload the run's final model/ directory to the Hub when the run ends (token from "
        "HF_TOKEN or `huggingface-cli login`).",
    )
    repo_id: str = field("", doc="Hub repository, e.g. my-name/my-model (created when missing); needed with push.")
    private: bool = field(False, doc="Create the repository as private.")
    revision: str = field("", doc="Branch to upload to; empty: the repository's default branch.")


@dataclasses.dataclass
class SFTConfig:
    """``alignflow sft``: supervised fine-tuning."""

    model: ModelConfig = field(default_factory=ModelConfig, doc="Policy model.")
    data: DataConfig = field(default_factory=DataConfig, doc="Training data.")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4), doc="Optimiser.")
    train: TrainConfig = field(default_factory=TrainConfig, doc="Loop settings.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")


@dataclasses.dataclass
class IFTOptions:
    lam: float = field(
        0.2,
        doc="Temporal residual connection: answer inputs are (1-lam)*E[y_t] + lam*E[guess_t] "
        "(authors' configuration 0.2); lam 0 with gamma 0 is SFT.",
        range=(0.0, 1.0),
    )
    gamma: float = field(
        0.95,
        doc="Relation propagation: token t weighs the gamma-discounted loss of the rest of the "
        "answer (authors' configuration 0.95); 0 weighs every token 1.",
        range=(0.0, 1.0),
    )


@dataclasses.dataclass
class IFTConfig(SFTConfig):
    """``alignflow ift``: Intuitive Fine-Tuning (docs/ift.md): SFT data, one policy, no reference model; the model
    conditions on its own guesses mixed into the target prefix. Rows are padded (train.packing is not used)."""

    ift: IFTOptions = field(default_factory=IFTOptions, doc="IFT's lam and gamma.")


@dataclasses.dataclass
class RMConfig:
    """``alignflow rm``: reward-model training."""

    model: ModelConfig = field(default_factory=ModelConfig, doc="Reward-model backbone.")
    data: DataConfig = field(default_factory=lambda: DataConfig(format="preference"), doc="Preference or rated data.")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4), doc="Optimiser.")
    train: TrainConfig = field(default_factory=TrainConfig, doc="Loop settings.")
    reward: RewardConfig = field(default_factory=RewardConfig, doc="Reward-model options.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")


# ----------------------------------------------------------------------------------------------- offline preference
@dataclasses.dataclass
class POLossConfig:
    """The preference loss and its hyper-parameters. An empty (null) hyper-parameter takes the loss's own default
    (the paper's; ``docs/preference.md``); setting one the chosen loss does not take is an error naming those it
    does."""

    # checked against the loss table (alignflow.algorithms.preference_table) when the run starts: config sits
    # below the algorithms layer and does not import it
    name: str = field("dpo", doc="Loss: a name in the preference-loss table (`alignflow po --help` lists them).")
    beta: float | None = field(
        None, doc="KL strength beta: DPO/cDPO/robust/hinge/KTO/T-REG 0.1, SimPO 2.0, IPO's tau 0.1.", range=(0.0, None)
    )
    label_smoothing: float | None = field(
        None,
        doc="Label smoothing eps (cDPO 0.1, DPO/SimPO 0) or robust DPO's assumed flip rate (0.1).",
        range=(0.0, 0.5),
    )
    gamma: float | None = field(None, doc="SimPO target reward margin gamma (1.0 = beta/2 with beta 2.0).")
    lam: float | None = field(
        None,
        doc="ORPO odds-ratio weight lambda (0.1), or CPL's conservative bias lambda in (0, 1] (0.5).",
        range=(0.0, None),
    )
    alpha: float | None = field(
        None, doc="CPL advantage scale alpha (0.1), or T-REG regulariser weight alpha (0.25).", range=(0.0, None)
    )
    length_normalize: bool | None = field(
        None, doc="IPO: length-averaged log-ratios (true, TRL's choice, the default) or summed ones (false, the paper)."
    )
    lambda_d: float | None = field(None, doc="KTO weight of desirable rows lambda_D (1.0).", range=(0.0, None))
    lambda_u: float | None = field(None, doc="KTO weight of undesirable rows lambda_U (1.0).", range=(0.0, None))
    sft_weight: float | None = field(
        None, doc="PRO weight w of the SFT term w*(n-1)^2*NLL(y1) (0.05).", range=(0.0, None)
    )
    bc_weight: float | None = field(None, doc="CPL behaviour-cloning term weight (0).", range=(0.0, None))
    bc_data: str = field(
        "",
        doc="CPL BC term on all responses ('all', the reference code) or the best ('pos'); empty: the loss default.",
        choices=("", "all", "pos"),
    )
    bc_steps: int = field(
        0,
        doc="CPL-BC: the first bc_steps optimiser steps train on the behaviour-cloning term "
        "alone (the paper's BC pre-training), then CPL; cpl only.",
        range=(0, None),
    )
    base: str = field(
        "", doc="T-REG base loss (dpo, or simpo with its beta/gamma); empty: dpo.", choices=("", "dpo", "simpo")
    )
    eta: float | None = field(
        None, doc="INPO step size eta (1.0, unverified) or REFUEL's eta (1.0).", range=(0.0, None)
    )
    tau: float | None = field(None, doc="INPO KL strength tau (0.1, unverified).", range=(0.0, None))
    treg_pos_instruction: str = field(
        "Give a helpful, correct, coherent and concise answer.",
        doc="T-REG: text whose tokens open the prompt x+ (the reference's token rewards contrast x+ with x-).",
    )
    treg_neg_instruction: str = field(
        "Give an unhelpful, incorrect, incoherent and verbose answer.",
        doc="T-REG: text whose tokens open the prompt x-.",
    )


@dataclasses.dataclass
class POBuiltinConfig:
    """How ``alignflow po`` makes its data when ``data.path`` is empty: the built-in task's prompts, answered by the
    policy (the SFT model) and labelled by the task's hidden gold reward through a Bradley-Terry draw
    (``task.label_noise``) -- the papers' synthetic gold-reward setup."""

    sft_steps: int = field(
        300,
        doc="SFT steps of the task's tiny model, run first when model.name_or_path is "
        "empty (the SFT model is then the policy and the reference).",
        range=(1, None),
    )
    sft_lr: float = field(3e-3, doc="Peak learning rate of that SFT.", range=(0.0, None))
    num_prompts: int = field(512, doc="Training prompts answered by the policy.", range=(2, None))
    samples_per_prompt: int = field(
        4, doc="Samples per prompt: disjoint pairs (preference, unpaired) or one ranked list (ranked).", range=(2, None)
    )
    max_new_tokens: int = field(40, doc="Tokens generated per sample.", range=(1, None))
    temperature: float = field(1.0, doc="Sampling temperature.", range=(0.0, None))
    eval_prompts: int = field(
        64,
        doc="Held-out prompts sampled (2 each) before and after training to report eval/gold_reward; 0 disables.",
        range=(0, None),
    )


@dataclasses.dataclass
class POConfig:
    """``alignflow po``: offline preference optimisation (DPO, cDPO, robust DPO, IPO, hinge, SimPO, ORPO, KTO, CPL,
    PRO, T-REG; INPO and REFUEL as their first round / single-turn form). ``train.batch_size`` rows (pairs,
    completions for KTO, ranked lists) per optimiser step; ``train.micro_batch_tokens`` only splits a step."""

    model: ModelConfig = field(
        default_factory=ModelConfig,
        doc="Policy; usually the SFT model. Empty: the built-in task's tiny model after builtin.sft_steps of SFT.",
    )
    ref_model: str = field(
        "",
        doc="Reference model; empty: the policy's initial weights (under LoRA: the policy with "
        "adapters disabled, no second copy).",
    )
    ref_cache: bool = field(
        True,
        doc="Cache the reference log-probs in output_dir/ref_logps.safetensors, reused while "
        "the reference, the rows and the lengths are unchanged.",
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="auto", eval_fraction=0.05),
        doc="preference rows; unpaired rows (KTO) or ranked lists (CPL, PRO) also work. Empty: "
        "pairs sampled from the policy and labelled by the task's gold reward.",
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-6, scheduler="constant", warmup_ratio=0.1),
        doc="Optimiser (DPO paper: lr 1e-6, RMSprop, linear warm-up over 150 steps).",
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(batch_size=64, log_every=5),
        doc="Loop settings (DPO paper: 64 pairs per step).",
    )
    loss: POLossConfig = field(default_factory=POLossConfig, doc="Preference loss.")
    builtin: POBuiltinConfig = field(default_factory=POBuiltinConfig, doc="Built-in data (when data.path is empty).")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")
    resources: ResourcesConfig = field(
        default_factory=lambda: ResourcesConfig(),
        doc="Placement: resources.actor.workers data-parallel FSDP2 workers for the "
        "policy (Ray); the reference log-probs are computed in this process.",
    )
    ray: RayConfig = field(
        default_factory=lambda: RayConfig(), doc="Ray cluster (used when resources place the policy on workers)."
    )


# ----------------------------------------------------------------------------------------------- loading
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` (strings come from the command line), or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0] if typing.get_args(tp) else None  # list[float]: each item converted
        return [_coerce(v, item, f"{key}[{i}]") if item is not None else v for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _nonfinite(value: Any, allow_inf: bool) -> float | None:
    """The first NaN (or, unless ``allow_inf``, infinite) float in ``value`` or its list/dict items; else None."""
    items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
    for item in items:
        if isinstance(item, float) and (math.isnan(item) or (math.isinf(item) and not allow_inf)):
            return item
        if isinstance(item, (list, dict)) and item is not value:
            bad = _nonfinite(item, allow_inf)
            if bad is not None:
                return bad
    return None


def _check(f: dataclasses.Field[Any], value: Any, key: str) -> Any:
    """Validate a coerced value against the field's rules; returns it (normalised by the field's ``check``)."""
    bad = _nonfinite(value, f.metadata.get("allow_inf", False))
    if bad is not None:
        raise ConfigError(f"{key}: {bad!r} is not allowed; give a finite number")
    if f.metadata.get("check") is not None:
        value = f.metadata["check"](value, key)
    choices, rng = f.metadata.get("choices"), f.metadata.get("range")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    if rng is not None and value is not None:
        lo, hi = rng
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(
                f"{key}: {value!r} is outside the allowed range "
                f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            )
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested dict of updates to a dataclass instance, validating every key and value."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = _field_types(type(obj))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'. Valid keys here: {', '.join(sorted(fields))}")
        tp = hints[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{key}: is a section; give its keys ({', '.join(f.name for f in dataclasses.fields(tp))})"
                )
            _apply(getattr(obj, name), value, key + ".")
            continue
        setattr(obj, name, _check(fields[name], _coerce(value, tp, key), key))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "train.seed=1"]`` -> ``{"optim": {"lr": "3e-4"}, "train": {"seed": "1"}}``."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier one")
        node[parts[-1]] = raw
    return out


def load_config(cls: type[_Config], path: str | Path | None = None, overrides: list[str] | None = None) -> _Config:
    """Build ``cls`` from defaults, then the YAML file at ``path``, then dotted ``overrides``."""
    cfg = cls()
    if path:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        check_preset_command(cls, data.pop("command", None), path)
        try:
            _apply(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if overrides:
        try:
            _apply(cfg, parse_overrides(overrides))
        except ConfigError as e:
            raise ConfigError(f"command line: {e}") from None
    check_sections(cfg)
    return cfg


def check_preset_command(cls: type, named: Any, path: Path) -> None:
    """A preset's ``command:`` key must name the command it is loaded for: the ``alignflow <command>`` its config
    class's docstring opens with."""
    match = re.match(r"\s*``alignflow (\w+)", cls.__doc__ or "")
    if named is None or match is None or named == match.group(1):
        return
    raise ConfigError(
        f"{path} is a preset for `alignflow {named}` (its command: key), not `alignflow "
        f"{match.group(1)}`; run: alignflow {named} --config {path}"
    )


def from_dict(cls: type[_Config], sections: dict[str, Any]) -> _Config:
    """Programmatic construction with the same validation as YAML: ``from_dict(SFTConfig, {"train": {...}})``."""
    cfg = cls()
    _apply(cfg, sections)
    check_sections(cfg)
    return cfg


def _check_rl_batch(cfg: Any, prefix: str) -> None:
    rows = cfg.rollout.prompts_per_step * cfg.rollout.n
    if cfg.train.batch_size > rows:
        raise ConfigError(
            f"{prefix}train.batch_size={cfg.train.batch_size} is larger than the rollout batch "
            f"{prefix}rollout.prompts_per_step x {prefix}rollout.n = {cfg.rollout.prompts_per_step} x "
            f"{cfg.rollout.n} = {rows} rows; use a {prefix}train.batch_size in [1, {rows}] (a "
            "mini-batch of one RL step)"
        )


def check_sections(cfg: Any, prefix: str = "") -> None:
    """Rules between keys, checked once a config is complete (in nested sections too, e.g. ``rl.`` of mpo)."""
    if type(cfg).__name__ == "RLConfig":
        _check_rl_batch(cfg, prefix)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_sections(value, f"{prefix}{f.name}.")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def describe(cls: type, prefix: str = "") -> list[str]:
    """Lines 'key (default) -- doc' for every field, recursively; used by ``--help``."""
    lines = []
    obj = cls() if _is_dataclass_type(cls) else cls
    hints = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            lines += describe(getattr(obj, f.name), f"{prefix}{f.name}.")
        else:
            extra = f"; one of {'|'.join(map(str, f.metadata['choices']))}" if f.metadata.get("choices") else ""
            lines.append(f"  {prefix}{f.name} = {getattr(obj, f.name)!r}  -- {f.metadata.get('doc', '')}{extra}")
    return lines


RL_ALGORITHMS = ("ppo", "grpo", "dr_grpo", "dapo", "rloo", "remax", "reinforce_pp", "safe_ppo", "gspo", "pf_ppo")


@dataclasses.dataclass
class EvalConfig:
    """``alignflow eval``: evaluate a policy (samples scored by the task's gold reward and/or a reward model, KL to a
    reference, length, diversity, accuracy), the reward-KL frontier of several policies, or a reward model
    (pairwise accuracy on preference data). Metrics: docs/eval.md."""

    policy: str = field("", doc="Policy model directory or hub id; empty skips policy evaluation.")
    reward_model: str = field("", doc="Reward model directory; scores policy samples, or is evaluated on data.path.")
    tokenizer: str = field("", doc="Tokenizer; empty means the policy's (or the reward model's) directory.")
    reference: str = field(
        "",
        doc="Reference policy (the SFT model in practice, same tokenizer) for eval/kl and "
        "the frontier's x axis; empty skips the KL metrics.",
    )
    frontier: list[str] = field(
        default_factory=list,
        doc="Policies for the reward-KL frontier (needs reference): "
        "model directories, alignflow checkpoints (checkpoints/step-N, "
        "loaded on the reference's architecture) or run directories "
        "(each checkpoint, then model/). Writes frontier.json/.png.",
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="auto", eval_fraction=0.0),
        doc="Prompts (policy evaluation) or preference pairs (reward-model evaluation). "
        "Empty: the built-in task's held-out prompts.",
    )
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task for the gold reward.")
    num_prompts: int = field(128, doc="Prompts sampled for policy evaluation.", range=(1, None))
    samples_per_prompt: int = field(
        4, doc="Samples per prompt (diversity is measured within a prompt).", range=(1, None)
    )
    max_new_tokens: int = field(48, doc="Tokens generated per sample.", range=(1, None))
    temperature: float = field(1.0, doc="Sampling temperature (0 = greedy).", range=(0.0, None))
    output_dir: str = field("runs/eval", doc="Where eval.json, samples.jsonl and the frontier files are written.")
    seed: int = field(0, doc="Sampling seed (every frontier policy gets the same prompts and seed).")
    device: str = field("auto", doc="Device: auto = cuda when available, else cpu.", check=check_device)


@dataclasses.dataclass
class MergeConfig:
    """``alignflow merge adapter=DIR output=DIR``: fold a LoRA adapter (a directory with adapter_config.json, e.g.
    the model/ of a run with model.lora.enabled=true) into its base model and save the plain merged model."""

    adapter: str = field("", doc="LoRA adapter directory; its adapter_config.json names the base model.")
    output: str = field("", doc="Directory for the merged model and the tokenizer (replaced if it exists).")
    dtype: str = field(
        "float32",
        doc="dtype the base model is loaded and the merged model saved in.",
        choices=("float32", "bfloat16", "float16", "auto"),
    )


@dataclasses.dataclass
class MergeModelsConfig:
    """``alignflow merge_models models=[A,B] weights=[0.5,0.5] output=DIR``: the weighted average of several
    same-architecture causal LMs (SALSA, Balanced Actor Initialization; docs/merging.md). Use DIR as an RL run's
    ``model.name_or_path`` (the actor's start) or ``ref_model`` (the KL reference)."""

    models: list[str] = field(
        default_factory=list,
        doc="Model directories or hub ids (same architecture and tokenizer); the first one's tokenizer is saved.",
    )
    weights: list[float] = field(default_factory=list, doc="One weight >= 0 per model, summing to 1; empty: equal.")
    output: str = field("", doc="Directory for the merged model, its tokenizer and merge.json (replaced if it exists).")
    dtype: str = field(
        "float32",
        doc="dtype the models are loaded and the merged model saved in.",
        choices=("float32", "bfloat16", "float16"),
    )


@dataclasses.dataclass
class DemoConfig:
    """``alignflow demo``: the whole pipeline on the built-in ``reviews`` task in a few minutes on a CPU."""

    output_dir: str = field("runs/demo", doc="Run directory (report.md, plots, models).")
    seed: int = field(0, doc="Seed for everything.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="The built-in task.")
    sft_steps: int = field(400, doc="SFT optimiser steps.", range=(1, None))
    sft_lr: float = field(3e-3, doc="SFT peak learning rate.", range=(0.0, None))
    sft_batch_size: int = field(32, doc="SFT rows per step.", range=(1, None))
    num_prompts: int = field(
        1024, doc="Prompts sampled from the SFT policy to build preference pairs.", range=(8, None)
    )
    samples_per_prompt: int = field(8, doc="Samples per prompt; disjoint pairs of them are labelled.", range=(2, None))
    max_new_tokens: int = field(40, doc="Tokens generated per sample.", range=(1, None))
    temperature: float = field(1.0, doc="Sampling temperature of the SFT policy.", range=(0.0, None))
    rm_steps: int = field(300, doc="Reward-model optimiser steps.", range=(1, None))
    rm_lr: float = field(1e-3, doc="Reward-model peak learning rate.", range=(0.0, None))
    rm_batch_size: int = field(32, doc="Pairs per reward-model step.", range=(1, None))
    eval_fraction: float = field(0.15, doc="Pairs held out to measure reward-model accuracy.", range=(0.05, 0.5))
    rl_algo: str = field(
        "ppo", doc="Online RL stage against the learned reward model; none skips it.", choices=("none",) + RL_ALGORITHMS
    )
    rl_steps: int = field(24, doc="RL steps (one rollout batch each).", range=(1, None))
    rl_lr: float = field(3e-4, doc="RL actor learning rate (constant).", range=(0.0, None))
    rl_rows_per_step: int = field(
        64,
        doc="Responses sampled per RL step (PPO: one per prompt; group methods: rows / rl_n prompts).",
        range=(1, None),
    )
    rl_n: int = field(
        8, doc="Group size of the group methods (GRPO, RLOO, ...); PPO samples one per prompt.", range=(2, None)
    )
    rl_kl_coef: float = field(0.1, doc="KL coefficient beta to the SFT policy.", range=(0.0, None))
    rl_eval_every: int = field(
        5, doc="RL steps between greedy evaluations on held-out prompts (gold and proxy reward).", range=(1, None)
    )
    progress: bool = field(True, doc="Show progress bars.")


# ----------------------------------------------------------------------------------------------- online RL


@dataclasses.dataclass
class AlgoConfig:
    """The online-RL algorithm and its loss knobs. ``auto`` picks the algorithm's own choice (the table in
    ``alignflow/trainers/rl_algos.py`` and ``docs/online_rl.md``); any other value overrides it."""

    name: str = field(
        "ppo",
        doc="Algorithm: the dataflow (critic or not, greedy baseline, cost) and the defaults of the auto fields below.",
        choices=RL_ALGORITHMS,
    )
    advantage: str = field(
        "auto",
        doc="Advantage estimator (a key of ADVANTAGE_ESTIMATORS).",
        choices=("auto", "gae", "grpo", "dr_grpo", "rloo", "remax", "reinforce_pp"),
    )
    policy_loss: str = field(
        "auto",
        doc="Policy loss (a key of POLICY_LOSSES): PPO clip, GSPO sequence clip, or unclipped REINFORCE.",
        choices=("auto", "ppo", "gspo", "vanilla_pg"),
    )
    loss_agg: str = field(
        "auto",
        doc="How per-token losses are reduced (token_mean: PPO/DAPO; seq_mean_token_mean: "
        "GRPO; seq_mean_token_sum: RLOO/ReMax; seq_mean_token_sum_norm: Dr. GRPO).",
        choices=("auto", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"),
    )
    norm_len: int = field(
        0, doc="Constant L of seq_mean_token_sum_norm (Dr. GRPO); 0 means rollout.max_new_tokens.", range=(0, None)
    )
    clip_low: float = field(
        0.2, doc="PPO ratio clip below 1 (epsilon_low). GSPO's paper value is 3e-4.", range=(0.0, 1.0)
    )
    clip_high: float = field(
        0.2, doc="PPO ratio clip above 1 (epsilon_high); 0.28 is DAPO's clip-higher.", range=(0.0, None)
    )
    dual_clip: float = field(
        0.0,
        doc="Dual-clip constant c > 1 bounding the loss of negative-advantage tokens (Ye et al. 2020); 0 disables.",
        range=(0.0, None),
    )
    ppo_epochs: int = field(1, doc="Passes over each rollout batch (PPO epochs).", range=(1, None))
    value_clip: float = field(
        0.2, doc="Critic value clip epsilon_v around the old values; 0 disables.", range=(0.0, None)
    )
    vf_coef: float = field(
        0.1,
        doc="Weight of the value loss (scales the critic's loss; the critic has its own optimiser).",
        range=(0.0, None),
    )
    entropy_coef: float = field(
        0.0, doc="Entropy bonus weight c_H (loss -= c_H * entropy); 0 disables.", range=(0.0, None)
    )
    entropy_target: float = field(
        0.0,
        doc="PPO-max entropy clip: the entropy term becomes c_H * token_mean "
        "|H - entropy_target| (pulls H towards the target; needs entropy_coef "
        "> 0); 0 keeps the plain bonus -H.",
        range=(0.0, None),
    )
    ptx_coef: float = field(
        0.0,
        doc="Weight of the pre-training (PTX) NLL mixed into every actor update "
        "(InstructGPT PPO-ptx, PPO-max; docs/ppo_max.md); 0 disables.",
        range=(0.0, None),
    )
    ptx_path: str = field(
        "", doc="PTX data: SFT rows (text or prompt+completion); empty: the built-in task's SFT corpus."
    )
    ptx_batch_size: int = field(8, doc="PTX rows per actor optimiser step.", range=(1, None))
    sample_filter: str = field(
        "auto",
        doc="PF-PPO policy filtration of each prompt's samples by reward (docs/"
        "pf_ppo.md): none, best_worst, best_random, range; auto = the algorithm's.",
        choices=("auto", "none", "best_worst", "best_random", "range"),
    )
    filter_range: list[float] = field(
        default_factory=lambda: [0.25, 0.75],
        doc="sample_filter=range: drop the rows "
        "whose reward lies strictly between these quantiles of the batch's rewards (the middle, "
        "where a reward model is least reliable).",
    )
    gamma: float = field(1.0, doc="Discount gamma of GAE and returns-to-go.", range=(0.0, 1.0))
    lam: float = field(0.95, doc="GAE lambda.", range=(0.0, 1.0))
    whiten_advantages: bool = field(
        True,
        doc="Whiten critic-based (GAE) advantages over the valid tokens of the "
        "rollout batch (group estimators normalise on their own).",
    )
    advantage_clip: float = field(
        0.0, doc="Clip advantages to [-c, c] after whitening (PPO-max uses 0.5); 0 disables.", range=(0.0, None)
    )
    reinforce_pp_baseline: bool = field(
        False, doc="REINFORCE++-baseline: subtract the prompt group's mean score before the global whitening."
    )
    is_correction: str = field(
        "tis",
        doc="Rollout/training mismatch: 'tis' weights each token's loss by "
        "min(exp(lp_old - lp_sampling), is_cap) (truncated importance sampling); "
        "'none' ignores the sampler's log-probs.",
        choices=("tis", "none"),
    )
    is_cap: float = field(2.0, doc="Cap C of the truncated importance weight.", range=(1.0, None))
    old_logprobs: str = field(
        "auto",
        doc="Where the PPO ratio's old log-probs come from: 'recompute' (a forward "
        "pass of the actor before the update), 'sampling' (the rollout engine's, "
        "no extra pass; TIS weights are then 1), or 'auto' = sampling when each "
        "rollout batch gets exactly one update (ppo_epochs 1, one mini-batch: the "
        "ratio is 1 at that update whatever lp_old is), else recompute.",
        choices=("auto", "recompute", "sampling"),
    )


@dataclasses.dataclass
class KLConfig:
    coef: float = field(
        0.05,
        doc="KL coefficient beta (initial value for the adaptive controller). 0 skips the reference model entirely.",
        range=(0.0, None),
    )
    estimator: str = field(
        "auto", doc="KL estimator; auto = k1 in the reward, k3 in the loss (GRPO).", choices=("auto", "k1", "k2", "k3")
    )
    placement: str = field(
        "auto",
        doc="Where the KL penalty goes: per-token reward (InstructGPT PPO, RLOO, "
        "REINFORCE++) or a loss term (GRPO); auto = the algorithm's.",
        choices=("auto", "reward", "loss"),
    )
    controller: str = field(
        "fixed",
        doc="Fixed beta, or adaptive beta towards a target KL (Ziegler et al. 2019).",
        choices=("fixed", "adaptive"),
    )
    target: float = field(6.0, doc="Adaptive controller: target KL (nats per sequence).", range=(0.0, None))
    horizon: float = field(10000.0, doc="Adaptive controller: horizon in samples.", range=(1.0, None))


@dataclasses.dataclass
class RolloutConfig:
    prompts_per_step: int = field(
        16, doc="Prompts per RL step; the rollout batch is prompts_per_step * n rows.", range=(1, None)
    )
    n: int = field(4, doc="Samples per prompt (the group size G of GRPO/RLOO/DAPO).", range=(1, None))
    temperature: float = field(
        1.0, doc="Sampling temperature; log-probs for training use the same temperature.", range=(1e-6, None)
    )
    top_p: float = field(1.0, doc="Nucleus sampling mass (1 disables).", range=(1e-6, 1.0))
    top_k: int = field(0, doc="Top-k sampling (0 disables).", range=(0, None))
    max_new_tokens: int = field(
        64, doc="Generation budget per response (L_max of DAPO, L of Dr. GRPO).", range=(1, None)
    )
    stop_strings: list[str] = field(default_factory=list, doc="Strings that end a response (besides EOS).")
    eval_prompts: int = field(
        64,
        doc="Held-out prompts decoded greedily at each evaluation (eval/reward_mean); 0 disables evaluation.",
        range=(0, None),
    )
    backend: str = field(
        "builtin",
        doc="Rollout engine: builtin (HFEngine on the actor's weights in place, CPU or "
        "GPU) or vllm (GPU only, pip install 'alignflow[vllm]'; the actor's weights "
        "are pushed to it before each generation). See docs/vllm.md.",
        choices=("builtin", "vllm"),
    )
    gpu_memory_utilization: float = field(
        0.5,
        doc="backend=vllm: fraction of the GPU's memory vLLM may take for its "
        "weights and KV cache (leave room for training when colocated).",
        range=(0.01, 1.0),
    )
    tensor_parallel_size: int = field(
        1, doc="backend=vllm: GPUs per vLLM engine (tensor parallelism).", range=(1, None)
    )
    enable_sleep_mode: bool = field(
        True,
        doc="backend=vllm: release the engine's GPU memory (weights and KV cache) "
        "after each generation, while the actor trains.",
    )
    max_model_len: int = field(
        0,
        doc="backend=vllm: longest prompt + response (tokens) the engine plans its KV cache "
        "for; 0 = the model config's maximum.",
        range=(0, None),
    )
    dtype: str = field(
        "bfloat16",
        doc="backend=vllm: dtype of the engine's weights and activations (auto = the model config's).",
        choices=("auto", "bfloat16", "float16", "float32"),
    )


@dataclasses.dataclass
class RemoteRewardConfig:
    """A reward served over HTTP (docs/remote_rewards.md): POST {"prompts": [...], "responses": [...]} ->
    {"rewards": [...]}, one finite number per row."""

    url: str = field(
        "", doc="Endpoint URL, e.g. http://127.0.0.1:8000/score (alignflow serve); empty: no remote reward."
    )
    weight: float = field(1.0, doc="Weight of the remote reward term.")
    batch_size: int = field(64, doc="Rows per request.", range=(1, None))
    timeout_s: float = field(
        30.0,
        doc="Seconds allowed per request (connecting, sending and reading the whole reply); past it the attempt fails.",
        range=(1e-3, None),
    )
    retries: int = field(
        2,
        doc="Further attempts after a connection error, a timeout or a 5xx/429 reply (a "
        "malformed reply is never retried).",
        range=(0, None),
    )
    fields: list[str] = field(
        default_factory=list,
        doc="Row fields sent with each batch, one list per field "
        "(e.g. [reference] for a served preference model or "
        "pairwise judge).",
    )


@dataclasses.dataclass
class JudgeConfig:
    """An LLM judge as a reward (docs/judges.md): a local causal LM (model) or an OpenAI-compatible endpoint (url)."""

    model: str = field("", doc="Local judge: causal-LM directory or hub id, generating through the rollout engine.")
    url: str = field("", doc="Endpoint judge: OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
    endpoint_model: str = field("", doc="Model name sent to the endpoint; its key is read from $OPENAI_API_KEY.")
    template: str = field(
        "pointwise",
        doc="pointwise: Score 1-10 -> (N-1)/9; pairwise: Verdict A/B against the "
        "row's anchor_field; principle: Answer Yes/No per principle (RLBFF).",
        choices=("pointwise", "pairwise", "principle"),
    )
    principles: list[str] = field(
        default_factory=list,
        doc="template=principle: the principles (a row's 'principles' or 'principle' field replaces them).",
    )
    anchor_field: str = field("reference", doc="template=pairwise: the row field holding the response to beat.")
    both_orders: bool = field(True, doc="template=pairwise: judge (response, anchor) and (anchor, response).")
    weight: float = field(1.0, doc="Weight of the judge term.")
    max_new_tokens: int = field(256, doc="Most tokens of a judge's answer.", range=(1, None))
    batch_size: int = field(32, doc="Questions per backend call.", range=(1, None))
    on_parse_failure: str = field(
        "error",
        doc="No verdict after the retries: error stops the run naming the row; "
        "fallback scores the verdict judge.fallback (counted in "
        "reward/errors).",
        choices=("error", "fallback"),
    )
    fallback: float = field(0.0, doc="Value of an unparsed verdict with on_parse_failure=fallback.")
    parse_retries: int = field(0, doc="Times an unparsed question is asked again, sampled.", range=(0, None))
    retry_temperature: float = field(0.7, doc="Sampling temperature of those retries.", range=(0.0, None))
    timeout_s: float = field(60.0, doc="Endpoint: seconds per request attempt.", range=(1e-3, None))
    retries: int = field(2, doc="Endpoint: further attempts after a connection error, timeout or 5xx.", range=(0, None))


@dataclasses.dataclass
class RewardSourceConfig:
    """Reward sources, summed with weights: R = sum_j w_j * r_j."""

    task: dict[str, float] = field(
        default_factory=dict,
        doc="Built-in task rewards by name -> weight, e.g. "
        "{gold: 1.0} (reviews) or {accuracy: 1.0, format: 0.1} (arithmetic).",
    )
    functions: dict[str, float] = field(
        default_factory=dict,
        doc="Python rewards 'pkg.module:fn' or 'file.py:fn' -> "
        "weight; fn(prompts, responses, **row_fields) -> list[float].",
    )
    models: list[str] = field(default_factory=list, doc="Reward-model directories (k of them form an ensemble).")
    model_weight: float = field(1.0, doc="Weight of the reward-model term.")
    remote: RemoteRewardConfig = field(default_factory=RemoteRewardConfig, doc="A reward served over HTTP.")
    judge: JudgeConfig = field(default_factory=JudgeConfig, doc="An LLM judge as a reward.")
    aggregation: str = field(
        "mean",
        doc="Ensemble aggregation of the reward models (Coste et al. 2024; brme: "
        "Yan et al. 2024, brme_lambda * mean + (1 - brme_lambda) * min).",
        choices=("mean", "min", "uwo", "brme"),
    )
    uwo_lambda: float = field(0.5, doc="Variance weight of the uwo aggregation.", range=(0.0, None))
    brme_lambda: float = field(
        0.5, doc="Nominal weight of the brme aggregation (1 = mean, 0 = worst case).", range=(0.0, 1.0)
    )
    timeout_s: float = field(10.0, doc="Seconds allowed per call of a Python reward.", range=(1e-3, None))
    executor: str = field(
        "thread", doc="Where Python rewards run ('process' can stop a stuck function).", choices=("thread", "process")
    )
    per_row: bool = field(
        False, doc="Call Python rewards once per row, each row with its own timeout (names a slow row; slower)."
    )
    on_error: str = field(
        "fail",
        doc="A Python reward that raises, times out or returns NaN/inf on a row: fail stops "
        "the run naming the function, the row and the cause; score gives the row "
        "reward.error_score and counts it (reward/errors, reward/timeouts, "
        "reward/nonfinite).",
        choices=("fail", "score"),
    )
    error_score: float = field(0.0, doc="Reward of a failed row when reward.on_error=score.")
    normalize: str = field(
        "none",
        doc="Running reward normalisation (PPO-max): (R - mean)/std, R/std, or none.",
        choices=("none", "running", "running_scale"),
    )
    clip: float = field(
        0.0, doc="Clip the (normalised) reward to [-clip, clip]; 0 disables (PPO-max: 10).", range=(0.0, None)
    )
    shaping: str = field(
        "none",
        doc="Shape R against the rewards r_ref of the reference policy's responses to the "
        "same prompt (docs/par.md): par = mean_m sigmoid(R - r_ref_m) (Preference As "
        "Reward), centered = R - mean_m r_ref_m, lsc = log sigmoid(R - 85th "
        "percentile of r_ref); none.",
        choices=("none", "par", "centered", "lsc"),
    )
    reference_samples: int = field(
        1,
        doc="shaping: M reference responses per prompt, sampled from the reference "
        "policy at rollout.temperature (scored once per prompt and cached).",
        range=(1, None),
    )
    reference_greedy: bool = field(
        False, doc="shaping: one greedy reference response per prompt instead of reference_samples sampled ones."
    )


@dataclasses.dataclass
class DapoConfig:
    """DAPO's data-side knobs (Yu et al. 2025); usable with any group-based algorithm."""

    dynamic_sampling: bool = field(
        False, doc="Drop prompt groups whose rewards are all equal and sample more prompts until the batch is full."
    )
    max_sample_rounds: int = field(
        4,
        doc="Most generation rounds per step when refilling; a step that is still "
        "short trains on the groups it has (reported).",
        range=(1, None),
    )
    overlong_penalty: bool = field(
        False, doc="Add the soft overlong penalty to the reward (L_max = rollout.max_new_tokens)."
    )
    overlong_cache_len: int = field(
        0, doc="L_cache of the overlong penalty; 0 means max_new_tokens // 4.", range=(0, None)
    )


@dataclasses.dataclass
class CostConfig:
    """Safe RLHF (algo.name=safe_ppo): cost sources (cost > 0 = unsafe) and the Lagrange multiplier."""

    task: dict[str, float] = field(
        default_factory=dict, doc="Built-in task costs by name -> weight (reviews: {ungrammatical: 1.0})."
    )
    functions: dict[str, float] = field(
        default_factory=dict,
        doc="Python cost functions 'pkg.module:fn' -> weight (run with reward.timeout_s and reward.executor).",
    )
    models: list[str] = field(default_factory=list, doc="Cost-model directories (k form a pessimistic ensemble).")
    aggregation: str = field(
        "mean",
        doc="Cost-model ensemble aggregation (min/uwo are pessimistic for a cost).",
        choices=("mean", "min", "uwo"),
    )
    threshold: float = field(0.0, doc="Constraint E[C] <= threshold (d).")
    lambda_init: float = field(1.0, doc="Initial Lagrange multiplier.", range=(1e-8, None))
    lambda_lr: float = field(0.1, doc="Learning rate of log(lambda).", range=(1e-8, None))
    lambda_max: float = field(5.0, doc="Upper bound of lambda.", range=(1e-8, None))
    window: int = field(128, doc="Episode costs in the sliding window of the multiplier update.", range=(1, None))
    token_clip: float = field(
        50.0, doc="Clip per-token shaped rewards and costs to +-token_clip; 0 disables.", range=(0.0, None)
    )


@dataclasses.dataclass
class CriticConfig:
    name_or_path: str = field(
        "", doc="Critic initialisation; empty: the first reward model when there is one (InstructGPT), else the policy."
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, scheduler="constant"), doc="Critic optimiser."
    )
    pretrain_steps: int = field(
        0,
        doc="PPO-max critic pre-training: the first N RL steps train the critic only, "
        "on rollouts of the frozen policy (they count in train.max_steps).",
        range=(0, None),
    )


@dataclasses.dataclass
class RoleResources:
    workers: int = field(
        0,
        doc="Ray workers (data-parallel ranks) for this role; 0 = the actor's count (colocated: always the actor's).",
        range=(0, None),
    )
    gpus_per_worker: float = field(0.0, doc="GPUs per worker (Ray num_gpus; fractions share a GPU).", range=(0.0, None))
    cpus_per_worker: float = field(1.0, doc="CPUs per worker (Ray num_cpus).", range=(0.0, None))


@dataclasses.dataclass
class ResourcesConfig:
    """Where the roles run (docs/design.md). ``actor.workers`` 0 or 1 with ``backend: auto`` runs everything in
    this process (LocalGroup); more workers (or ``backend: ray``) start Ray workers that form one torch.distributed
    group per worker set, each holding an FSDP2-sharded copy of its roles' models."""

    backend: str = field(
        "auto", doc="auto: Ray when actor.workers > 1, else this process; local; ray.", choices=("auto", "local", "ray")
    )
    placement: str = field(
        "colocated",
        doc="colocated: every model role (actor, rollout, ref, critic, reward models) "
        "on the same workers (the hybrid engine); split: the reference, the "
        "critic(s) and the reward models each on their own workers, whose calls "
        "then overlap.",
        choices=("colocated", "split"),
    )
    actor: RoleResources = field(default_factory=RoleResources, doc="Actor + rollout workers.")
    ref: RoleResources = field(default_factory=RoleResources, doc="Reference workers (split placement).")
    critic: RoleResources = field(
        default_factory=RoleResources, doc="Critic workers (split placement; Safe RLHF's cost critic shares them)."
    )
    reward: RoleResources = field(default_factory=RoleResources, doc="Reward/cost model workers (split placement).")
    cpu_offload: bool = field(
        False, doc="FSDP2 CPU offload of sharded parameters, gradients and optimiser state (GPU workers only)."
    )
    reshard_after_forward: bool = field(
        True, doc="Free each layer's gathered weights after its forward (ZeRO-3); False keeps them until the backward."
    )
    dist_timeout_s: float = field(
        600.0, doc="torch.distributed collective timeout; a hung rank fails after this.", range=(1.0, None)
    )
    max_restarts: int = field(
        3,
        doc="Times the run recreates its workers after one dies, resuming from the last "
        "checkpoint (train.save_every) before giving up.",
        range=(0, None),
    )


@dataclasses.dataclass
class RayConfig:
    address: str = field(
        "",
        doc="Ray cluster to attach to ('auto', 'ray://head:10001', ...); empty starts a local cluster in this process.",
    )
    namespace: str = field("alignflow", doc="Ray namespace of the run's actors.")
    num_cpus: int = field(0, doc="CPUs of a local cluster started here; 0 = Ray's default (all).", range=(0, None))


@dataclasses.dataclass
class EnvConfig:
    task: bool = field(
        False,
        doc="Multi-turn episodes against the built-in task's environment (task.name: "
        "calculator); rewards then come from the environment (docs/multiturn_rl.md).",
    )
    path: str = field(
        "",
        doc="Multi-turn episodes against this environment: 'pkg.module:Factory' or "
        "'file.py:make_env' (docs/environments.md); empty with env.task=false: single-turn.",
    )
    kwargs: dict[str, Any] = field(default_factory=dict, doc="Keyword arguments of the environment factory (env.path).")
    max_turns: int = field(4, doc="Assistant turns per episode at most.", range=(1, None))
    max_tokens: int = field(
        512,
        doc="Tokens per episode at most (first prompt, model turns, observations); each "
        "turn also stops at rollout.max_new_tokens.",
        range=(2, None),
    )
    save_trajectories: int = field(
        8, doc="Episodes per RL step appended to <output_dir>/trajectories.jsonl (0: none, -1: all).", range=(-1, None)
    )


@dataclasses.dataclass
class RLConfig:
    """``alignflow rl``: online RL (PPO, GRPO, Dr. GRPO, DAPO, RLOO, ReMax, REINFORCE++, Safe RLHF, GSPO).

    ``train.batch_size`` is the PPO mini-batch: rows (sequences) per optimiser step, an algorithmic size;
    ``train.micro_batch_tokens`` only splits a mini-batch into forward/backward passes. ``train.max_steps``
    counts RL steps (one rollout batch each; 0: ``train.epochs`` passes over the prompts).
    """

    model: ModelConfig = field(default_factory=ModelConfig, doc="Policy (actor) model; rollout reads its weights.")
    ref_model: str = field(
        "",
        doc="Reference model; empty: the policy's initial weights (under LoRA: the policy "
        "with adapters disabled, no second copy).",
    )
    critic: CriticConfig = field(default_factory=CriticConfig, doc="Critic (PPO, Safe RLHF).")
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="prompt", eval_fraction=0.0),
        doc="Prompts (rows with 'prompt' and any fields the rewards read).",
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-6, scheduler="constant"), doc="Actor optimiser."
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(batch_size=64, packing=False, max_steps=100, log_every=1),
        doc="Loop settings.",
    )
    algo: AlgoConfig = field(default_factory=AlgoConfig, doc="Algorithm and loss.")
    kl: KLConfig = field(default_factory=KLConfig, doc="KL penalty to the reference.")
    rollout: RolloutConfig = field(default_factory=RolloutConfig, doc="Sampling.")
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig, doc="Reward sources.")
    dapo: DapoConfig = field(default_factory=DapoConfig, doc="Dynamic sampling and overlong shaping.")
    cost: CostConfig = field(default_factory=CostConfig, doc="Safe RLHF cost and Lagrange multiplier.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")
    resources: ResourcesConfig = field(default_factory=ResourcesConfig, doc="Placement: workers per role, devices.")
    ray: RayConfig = field(default_factory=RayConfig, doc="Ray cluster (used when resources place roles on workers).")
    env: EnvConfig = field(
        default_factory=EnvConfig, doc="Multi-turn episodes against an environment (off: single-turn rollouts)."
    )


# ----------------------------------------------------------------------------------------------- SuperHF, A-LoL
ALOL_VARIANTS = ("alol", "seq", "ref_free", "kl")  # = alignflow.algorithms.offline.ALOL_VARIANTS (a test checks)


@dataclasses.dataclass
class SuperHFOptions:
    beta: float = field(
        0.35,
        doc="KL weight beta of CE(y*) + beta * max(0, KL(pi_0 || pi_theta)) (SuperHF paper: "
        "0.35); 0 is SFT on the best samples and loads no prior.",
        range=(0.0, None),
    )
    keep: int = field(1, doc="Completions kept per prompt: the top-k by reward (paper: top-1).", range=(1, None))


@dataclasses.dataclass
class SuperHFConfig:
    """``alignflow superhf``: SuperHF (Mukobi et al. 2023): sample ``rollout.n`` completions for each of
    ``rollout.prompts_per_step`` prompts, keep the best ``superhf.keep`` of each by reward, and fine-tune on them with
    CE plus a KL prior. ``train.batch_size`` kept completions make one optimiser step; ``train.max_steps`` counts
    SuperHF steps (sample -> filter -> update; 0: ``train.epochs`` passes over the prompts)."""

    model: ModelConfig = field(
        default_factory=ModelConfig,
        doc="Policy; its initial weights are the prior pi_0 (under LoRA: the policy with adapters disabled, no copy).",
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="prompt", eval_fraction=0.0),
        doc="Prompts (rows with 'prompt' and any fields the rewards read).",
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-5, scheduler="constant"), doc="Optimiser (paper: lr 2e-5)."
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(batch_size=2, packing=False, max_steps=100, log_every=1),
        doc="Loop settings.",
    )
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(prompts_per_step=2, n=16, top_p=0.95),
        doc="Sampling of the candidates (paper: 2 prompts x 16, temperature 1, "
        "top-p 0.95) and the greedy held-out evaluation.",
    )
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig, doc="Reward sources that rank the samples.")
    superhf: SuperHFOptions = field(default_factory=SuperHFOptions, doc="SuperHF loss and filtering.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")


@dataclasses.dataclass
class ALoLOptions:
    variant: str = field(
        "alol",
        doc="Loss: A-LoL (sequence importance weight), seq (per-token weights), ref_free "
        "(weight 1) or kl (weight 1 plus kl_beta * (LP_theta - LP_ref)).",
        choices=ALOL_VARIANTS,
    )
    clip: float = field(0.9, doc="Importance weight clip c: w in [1 - c, 1 + c] (paper: 0.9).", range=(0.0, None))
    kl_beta: float = field(0.2, doc="beta of the kl variant (LoL-RL README: 0.2).", range=(0.0, None))
    sampling: str = field(
        "uniform",
        doc="Training-row order: uniform epochs, or good_priority (rows drawn with "
        "probability proportional to their advantage, with replacement).",
        choices=("uniform", "good_priority"),
    )
    reward_field: str = field(
        "reward", doc="Data field holding R(x, y); rows without it are scored once by the reward sources."
    )


@dataclasses.dataclass
class ValueFitConfig:
    num_prompts: int = field(0, doc="Distinct training prompts used to fit V_ref; 0 = all of them.", range=(0, None))
    hidden_size: int = field(
        256, doc="Width of the value MLP on the reference's last prompt hidden state.", range=(1, None)
    )
    steps: int = field(300, doc="Full-batch Adam steps of the MSE fit.", range=(1, None))
    lr: float = field(1e-3, doc="Learning rate of the value MLP.", range=(0.0, None))


@dataclasses.dataclass
class ALoLConfig:
    """``alignflow alol``: A-LoL (Baheti et al. 2023), offline policy gradient on fixed prompt-completion data.

    R(x, y) comes from the rows' ``alol.reward_field`` or is scored once by ``reward``; V_ref(x) is an MLP on the
    frozen reference's prompt hidden state, fit to the rewards of ``rollout.n`` samples per prompt from the reference
    (``rollout.temperature``/``top_p``/``top_k``/``max_new_tokens``; ``rollout.prompts_per_step`` prompts per
    generation call). Rows with A = R - V_ref <= 0 are dropped. ``train.batch_size`` rows per optimiser step;
    ``rollout.eval_prompts`` held-out prompts are decoded greedily at the end. Preference rows are accepted: both
    responses become rows, scored by ``reward``. The reference is the policy's initial weights; everything it is needed
    for is computed once before training, so no second model is held.
    """

    model: ModelConfig = field(default_factory=ModelConfig, doc="Policy; its initial weights are the reference pi_ref.")
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="auto", eval_fraction=0.0),
        doc="Fixed data: prompt_completion rows (optional reward field) or preference rows. "
        "Empty: the built-in task's preference pairs, both responses of each.",
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-4, scheduler="constant"),
        doc="Optimiser (LoL-RL's HH script: lr 2e-4, constant, QLoRA LLaMA-7B).",
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(batch_size=16, packing=False, log_every=1),
        doc="Loop settings (LoL-RL's HH script: 16 rows per step).",
    )
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(prompts_per_step=64, n=4),
        doc="Sampling from pi_ref for the value fit, and the held-out evaluation.",
    )
    reward: RewardSourceConfig = field(
        default_factory=RewardSourceConfig, doc="Reward sources: score rows without a reward, and pi_ref's samples."
    )
    alol: ALoLOptions = field(default_factory=ALoLOptions, doc="A-LoL loss and sampling.")
    value: ValueFitConfig = field(default_factory=ValueFitConfig, doc="The reference value estimate V_ref(x).")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")


# ----------------------------------------------------------------------------------------------- online / iterative PO
ONLINE_PO_METHODS = ("iterative_dpo", "inpo", "apo", "nash_md")


@dataclasses.dataclass
class OnlinePOOptions:
    method: str = field(
        "iterative_dpo",
        doc="iterative_dpo (RLHF Workflow: sample, best-vs-worst pairs, DPO, "
        "repeat), inpo (loss inpo against the previous round's policy), apo "
        "(iterative DPO with a Nesterov-extrapolated reference), nash_md "
        "(Nash-MD-PG against the policy/reference mixture).",
        choices=ONLINE_PO_METHODS,
    )
    rounds: int = field(
        3, doc="Rounds (sample -> label -> train); RLHF Workflow and INPO: 3 iterations.", range=(1, None)
    )
    prompts_per_round: int = field(
        256, doc="Fresh training prompts answered in each round (RLHF Workflow: 20k).", range=(1, None)
    )
    steps_per_round: int = field(
        0,
        doc="Optimiser steps per round; 0: epochs_per_round passes over the round's "
        "pairs. Fix it to compare runs after the same number of updates.",
        range=(0, None),
    )
    epochs_per_round: float = field(
        2.0,
        doc="Passes over a round's pairs when steps_per_round is 0 (RLHF Workflow: 2 epochs per iteration).",
        range=(0.0, None),
    )
    ref_update: str = field(
        "initial",
        doc="iterative_dpo's reference: the initial policy in every round (RLHF "
        "Workflow's code), or the previous round's policy (the proximal-point "
        "form that APO accelerates; apo = previous with alpha 0).",
        choices=("initial", "previous"),
    )
    apo_alpha: float = field(
        0.3,
        doc="APO momentum alpha: the next reference is (1 + alpha) * LP(round-start "
        "policy) - alpha * LP(previous round-start policy); 0 is iterative DPO with "
        "ref_update=previous (alpha 0.3 unverified).",
        range=(0.0, None),
    )
    mixture_coef: float = field(
        0.5,
        doc="Nash-MD: beta of the opponent pi_mix ∝ pi^(1-beta) * pi_ref^beta, per token "
        "(TRL mixture_coef 0.5); 0 is self-play, 1 plays the reference.",
        range=(0.0, 1.0),
    )
    kl_coef: float = field(
        0.1, doc="Nash-MD-PG: KL(pi || pi_ref) coefficient of the loss (TRL beta 0.1).", range=(0.0, None)
    )
    preference_scale: float = field(
        1.0,
        doc="Nash-MD: P(y beats y') = sigmoid((r(y) - r(y')) / scale) from the "
        "reward sources (a Bradley-Terry preference model).",
        range=(1e-6, None),
    )
    preference_model: str = field(
        "",
        doc="Nash-MD: a pairwise preference model directory (alignflow pm); P(y beats "
        "y') is read from it instead of sigmoid of a reward difference.",
    )
    eval_samples: int = field(
        2,
        doc="Samples per held-out prompt (rollout.eval_prompts of them, temperature "
        "rollout.temperature, a fixed seed) for eval/* after every round.",
        range=(1, None),
    )


@dataclasses.dataclass
class OnlinePOConfig:
    """``alignflow online_po``: online / iterative preference optimisation (iterative DPO, INPO, APO, Nash-MD).

    Each round answers ``online.prompts_per_round`` fresh prompts ``rollout.n`` times with the current policy, scores
    the answers with ``reward``, and trains for ``online.steps_per_round`` optimiser steps of ``train.batch_size``
    pairs (best vs worst answer of a prompt; ties skipped) with a fresh optimiser. ``rollout.prompts_per_step`` is the
    number of prompts per generation call; ``rollout.eval_prompts`` held-out prompts are SAMPLED (not greedy) after
    every round. ``train.max_steps``/``train.epochs`` are not used (see ``online.*``); ``train.save_every`` counts
    rounds."""

    model: ModelConfig = field(
        default_factory=ModelConfig,
        doc="Policy; usually the SFT model (e.g. runs/sft/model). Empty: the built-in task's untrained tiny model.",
    )
    ref_model: str = field(
        "",
        doc="Reference pi_ref; empty: the policy's initial weights (a frozen copy, or under "
        "LoRA the policy with its adapters disabled).",
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="prompt", eval_fraction=0.0),
        doc="Prompts (rows with 'prompt' and any fields the rewards read). Empty: the built-in "
        "task's prompts and held-out prompts.",
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=5e-7, scheduler="constant"),
        doc="Optimiser, rebuilt every round (RLHF Workflow: lr 5e-7).",
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(batch_size=128, log_every=1),
        doc="Loop settings; batch_size = pairs per optimiser step (RLHF Workflow: 128).",
    )
    loss: POLossConfig = field(
        default_factory=POLossConfig,
        doc="Preference loss of iterative_dpo/apo (any pairwise "
        "loss but kto); inpo needs name=inpo; unused by "
        "nash_md.",
    )
    online: OnlinePOOptions = field(default_factory=OnlinePOOptions, doc="Rounds and method.")
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(prompts_per_step=64, n=8),
        doc="Sampling (RLHF Workflow: n = 8 answers per prompt, best vs worst).",
    )
    reward: RewardSourceConfig = field(
        default_factory=RewardSourceConfig,
        doc="Reward sources that rank the answers (reward models, task rewards, Python functions).",
    )
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")


@dataclasses.dataclass
class MPOOptions:
    delta: float = field(
        1.0,
        doc="Reward-gap threshold: pairs with |r(chosen) - r(rejected)| > delta are easy (DPO), "
        "the rest hard (RL on their prompts). Tuned per reward scale (paper value "
        "unverified); -inf: everything easy, no RL stage.",
        allow_inf=True,
    )


@dataclasses.dataclass
class MPOConfig:
    """``alignflow mpo``: mixed preference optimisation (Gou & Nguyen 2024). Score every pair with ``reward``, split
    easy/hard by ``mpo.delta``, run DPO (section ``dpo``, an ``alignflow po`` config) on the easy pairs from the SFT
    model, then online RL (section ``rl``, an ``alignflow rl`` config) on the hard pairs' prompts with the DPO model as
    the initial policy AND the KL reference. The stages' model/data/reward/task/output_dir keys are set from the
    top-level ones (setting them in dpo.* or rl.* is an error)."""

    model: ModelConfig = field(
        default_factory=ModelConfig,
        doc="The SFT policy (stage-1 initialisation and "
        "reference). Empty: the built-in task's model after "
        "dpo.builtin.sft_steps of SFT.",
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="preference", eval_fraction=0.0),
        doc="Preference pairs. Empty: the built-in task's prompts answered by the SFT model, "
        "gold-labelled (dpo.builtin).",
    )
    reward: RewardSourceConfig = field(
        default_factory=RewardSourceConfig, doc="Scores the pairs for the split, and is the RL stage's reward."
    )
    mpo: MPOOptions = field(default_factory=MPOOptions, doc="The easy/hard split.")
    dpo: POConfig = field(default_factory=POConfig, doc="Stage 1 (loss, optim, train, ref_cache, builtin).")
    rl: RLConfig = field(
        default_factory=lambda: RLConfig(algo=AlgoConfig(name="ppo")),
        doc="Stage 2 (algo, kl, rollout, optim, train, critic, dapo).",
    )
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")
    output_dir: str = field("runs/mpo", doc="Run directory; the stages write to <output_dir>/dpo and <output_dir>/rl.")
    eval_prompts: int = field(
        64,
        doc="Held-out prompts of the built-in task sampled (2 each, temperature 1) after "
        "SFT, DPO and RL for eval/gold_reward_*; 0 disables.",
        range=(0, None),
    )


@dataclasses.dataclass
class ServeConfig:
    """``alignflow serve``: serve trained reward models, a pairwise preference model or an LLM judge on POST /score
    (docs/remote_rewards.md); each model re-renders the texts with its own tokenizer."""

    models: list[str] = field(default_factory=list, doc="Reward-model directories (k form an ensemble).")
    preference_model: str = field(
        "",
        doc="Instead: a pairwise preference model (alignflow pm); reward = P(response "
        "beats the row's anchor_field response).",
    )
    anchor_field: str = field("reference", doc="preference_model: the request key holding the anchor responses.")
    judge: JudgeConfig = field(default_factory=JudgeConfig, doc="Instead: an LLM judge (judge.model or judge.url).")
    aggregation: str = field("mean", doc="Ensemble aggregation.", choices=("mean", "min", "uwo"))
    uwo_lambda: float = field(0.5, doc="Variance weight of the uwo aggregation.", range=(0.0, None))
    host: str = field("127.0.0.1", doc="Address to listen on (0.0.0.0: every interface).")
    port: int = field(8000, doc="Port; 0 picks a free one (printed at start).", range=(0, 65535))
    device: str = field("auto", doc="Device for the models: auto (cuda when available), cpu, cuda, cuda:N.")
    max_rows: int = field(1024, doc="Most rows one request may hold (more: HTTP 413).", range=(1, None))
    budget: int = field(
        8192, doc="Padded tokens per forward (speed only; scores do not depend on it).", range=(1, None)
    )


@dataclasses.dataclass
class PMOptions:
    symmetric: bool = field(
        False,
        doc="Enforce P(y>y') + P(y'>y) = 1: P = sigmoid((z(x,y,y') - z(x,y',y))/2); "
        "false: P = sigmoid(z(x,y,y')), its asymmetry measured (pm/symmetry_gap).",
    )


@dataclasses.dataclass
class PMConfig:
    """``alignflow pm``: a pairwise preference model P(y > y' | x) trained on pairs shown in both orders
    (docs/pairwise_rm.md)."""

    model: ModelConfig = field(default_factory=ModelConfig, doc="Backbone (a causal LM; a new one-logit head).")
    data: DataConfig = field(default_factory=lambda: DataConfig(format="preference"), doc="Preference pairs.")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4), doc="Optimiser.")
    train: TrainConfig = field(default_factory=TrainConfig, doc="Loop settings.")
    pm: PMOptions = field(default_factory=PMOptions, doc="Preference-model options.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
