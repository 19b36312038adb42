"""Typed configuration. The loader (:mod:`alignflow.config.loader`) is apart from the schemas: one module per
command, named as the command, and the sections several commands share (:mod:`alignflow.config.sections`).
Everything is re-exported here, so ``from alignflow.config import RLConfig, load_config`` works."""

from __future__ import annotations

from alignflow.config.alol import (
    ALOL_VARIANTS,
    ALoLConfig,
    ALoLOptions,
    ValueFitConfig,
)
from alignflow.config.cgpo import (
    CGPO_UPDATES,
    CGPOConfig,
    CGPOOptions,
)
from alignflow.config.demo import (
    DemoConfig,
)
from alignflow.config.eval import (
    EvalConfig,
)
from alignflow.config.ift import (
    IFTConfig,
    IFTOptions,
)
from alignflow.config.loader import (
    DEVICE_PATTERN,
    ConfigError,
    check_betas,
    check_device,
    check_micro_batch_tokens,
    check_preset_command,
    check_sections,
    describe,
    field,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)
from alignflow.config.merge import (
    MergeConfig,
    MergeModelsConfig,
)
from alignflow.config.mpo import (
    MPOConfig,
    MPOOptions,
)
from alignflow.config.online_po import (
    ONLINE_PO_METHODS,
    OnlinePOConfig,
    OnlinePOOptions,
)
from alignflow.config.pm import (
    PMConfig,
    PMOptions,
)
from alignflow.config.po import (
    POBuiltinConfig,
    POConfig,
    POLossConfig,
)
from alignflow.config.qdhf import QDHFConfig, QDHFSection
from alignflow.config.refuel import (
    RefuelConfig,
    RefuelEnvConfig,
    RefuelOptions,
    WarmStartConfig,
)
from alignflow.config.rl import (
    RL_ALGORITHMS,
    AlgoConfig,
    CostConfig,
    CriticConfig,
    DapoConfig,
    EnvConfig,
    KLConfig,
    LatrConfig,
    MacroConfig,
    RLConfig,
    RLRolloutConfig,
    SafetyTestConfig,
)
from alignflow.config.rm import (
    RMConfig,
)
from alignflow.config.sections import (
    DataConfig,
    DiversityRewardConfig,
    HubConfig,
    JudgeConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PairwiseRewardConfig,
    RayConfig,
    RemoteRewardConfig,
    ResourcesConfig,
    RewardConfig,
    RewardSourceConfig,
    RoleResources,
    RolloutConfig,
    Seq2SeqRewardConfig,
    TaskConfig,
    TrainConfig,
    VPLRewardConfig,
)
from alignflow.config.serve import (
    ServeConfig,
)
from alignflow.config.sft import (
    SFTConfig,
)
from alignflow.config.superhf import (
    SuperHFConfig,
    SuperHFOptions,
)
from alignflow.config.vpl import VPLConfig, VPLSection

__all__ = [
    "ALOL_VARIANTS",
    "ALoLConfig",
    "ALoLOptions",
    "AlgoConfig",
    "CGPOConfig",
    "CGPOOptions",
    "CGPO_UPDATES",
    "ConfigError",
    "CostConfig",
    "CriticConfig",
    "DEVICE_PATTERN",
    "DapoConfig",
    "DataConfig",
    "DemoConfig",
    "DiversityRewardConfig",
    "EnvConfig",
    "EvalConfig",
    "HubConfig",
    "IFTConfig",
    "IFTOptions",
    "JudgeConfig",
    "KLConfig",
    "MacroConfig",
    "SafetyTestConfig",
    "LoraConfig",
    "MPOConfig",
    "MPOOptions",
    "MergeConfig",
    "MergeModelsConfig",
    "LatrConfig",
    "ModelConfig",
    "ONLINE_PO_METHODS",
    "OnlinePOConfig",
    "OnlinePOOptions",
    "OptimConfig",
    "PMConfig",
    "PMOptions",
    "PairwiseRewardConfig",
    "POBuiltinConfig",
    "POConfig",
    "POLossConfig",
    "RLConfig",
    "RefuelConfig",
    "RefuelEnvConfig",
    "RefuelOptions",
    "RL_ALGORITHMS",
    "RMConfig",
    "RayConfig",
    "RLRolloutConfig",
    "RemoteRewardConfig",
    "ResourcesConfig",
    "RewardConfig",
    "RewardSourceConfig",
    "RoleResources",
    "RolloutConfig",
    "SFTConfig",
    "Seq2SeqRewardConfig",
    "VPLRewardConfig",
    "ServeConfig",
    "SuperHFConfig",
    "SuperHFOptions",
    "TaskConfig",
    "TrainConfig",
    "QDHFConfig",
    "QDHFSection",
    "VPLConfig",
    "VPLSection",
    "ValueFitConfig",
    "WarmStartConfig",
    "check_betas",
    "check_device",
    "check_micro_batch_tokens",
    "check_preset_command",
    "check_sections",
    "describe",
    "field",
    "from_dict",
    "load_config",
    "parse_overrides",
    "to_dict",
]
