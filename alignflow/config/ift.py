"""``alignflow ift``: its schema (the SFT schema plus ``ift.*``)."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field
from alignflow.config.sft import SFTConfig


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
