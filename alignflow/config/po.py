"""``alignflow po``: its schema (``loss.*`` keys are read by the preference-loss table's rows)."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field
from alignflow.config.sections import (
    DataConfig,
    HubConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    ResourcesConfig,
    TaskConfig,
    TrainConfig,
)


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
        None,
        doc="CPL advantage scale alpha (0.1), T-REG regulariser weight alpha (0.25), or P-DPO's weight alpha of the "
        "individual-user term against the generic one (0.5, in [0, 1]).",
        range=(0.0, None),
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
    users: list[str] = field(
        default_factory=list,
        doc="P-DPO: the users that get their own embedding, in order (ids 1..U); empty: the distinct values of the "
        "training rows' 'user' field. A row whose user is not listed stops with its file, row and field.",
    )
    user_tokens: int = field(
        1, doc="P-DPO: soft-prompt vectors K per user (e_i = e_0 + o_i, each (K, D); paper: 1).", range=(1, None)
    )
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
