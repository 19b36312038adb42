"""The preference-loss table: one :class:`LossSpec` row per loss, read by every preference trainer.

A row says everything a trainer needs to run a loss without knowing its name: the pure function (in
:mod:`alignflow.algorithms.preference`), the row format it trains on, whether it needs reference log-probs, the
extra inputs a trainer must prepare, and its ``loss.*`` config keys. ``alignflow po``, ``online_po`` and ``mpo``
branch only on these fields; the valid ``loss.name`` values and the CLI's list of losses are the table's keys.

Adding a loss is one function, one row here, one preset, one docs page and its tests (docs/design.md, "How to add
a method"). Data formats (the ``data`` field):

* ``preference``: (prompt, chosen, rejected) pairs;
* ``ranked``: a prompt and n >= 2 responses, best first (a pair is a ranked list of two, so pairs are read as well);
* ``unpaired``: (prompt, completion, desirable?) rows; pairs are turned into two such rows (chosen desirable).

Extra inputs (the ``extra`` field), each prepared by the trainer:

* ``mismatched``: each row gets a fixed mismatched completion of another row, its reference log-prob is cached
  with the rest, and the step's mean log-ratio over them is passed to the loss as ``z0`` (KTO's reference point);
* ``token_rewards``: per-token rewards of the reference under contrastive prompts (T-REG); the policy forward
  then also returns per-token log-probs;
* ``previous``: log-probs under the previous iterate (INPO); a single offline run uses the reference;
* ``scores``: each pair's score difference from the data's ``margin`` (REFUEL: required);
* ``optional_scores``: the same when the data has margins, else none (PRO's temperatures);
* ``users``: learned user embeddings (P-DPO): the rows' ``user`` field picks a user's soft prompt, and each pair is
  laid out after its user's and after the generic one (``user_conditioned``; ``alignflow.trainers.po_users``).
"""

from __future__ import annotations

import dataclasses
import inspect

from alignflow.algorithms import preference as P
from alignflow.algorithms.personal import p_dpo_rows_loss
from alignflow.algorithms.preference import PreferenceLoss
from alignflow.config import ConfigError

DATA_FORMATS = ("preference", "ranked", "unpaired")
# the data-file formats a loss of each format trains on (the others are converted to it, see the module docstring)
ACCEPTS = {"preference": ("preference",), "ranked": ("ranked", "preference"), "unpaired": ("unpaired", "preference")}
EXTRA_INPUTS = ("mismatched", "token_rewards", "previous", "scores", "optional_scores", "users")
# keyword arguments of every loss that are not hyper-parameters (the trainer passes them)
CALL_ARGS = ("inputs", "reduction", "weights", "z0")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One preference loss, as the trainers read it.

    ``fn``: ``fn(inputs: PrefInputs, *, <hyper-parameters>, reduction, weights) -> (loss, metrics)``.
    ``inputs``: the PrefInputs fields it reads with its default hyper-parameters (a trainer computes only these).
    ``data``, ``reference``, ``extra``: see the module docstring. ``settings``: ``loss.*`` keys the trainer reads
    for this loss (not passed to ``fn``), e.g. T-REG's instructions. ``pretrain``: a loss run for the first
    ``loss.bc_steps`` optimiser steps before ``fn`` (CPL-BC). ``title``: how messages and the CLI name it.
    """

    fn: PreferenceLoss
    inputs: tuple[str, ...]
    data: str = "preference"
    reference: bool = True
    extra: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()
    pretrain: PreferenceLoss | None = None
    title: str = ""

    def __post_init__(self) -> None:
        if self.data not in DATA_FORMATS:
            raise ValueError(f"LossSpec.data={self.data!r} is not one of {', '.join(DATA_FORMATS)}")
        unknown = [e for e in self.extra if e not in EXTRA_INPUTS]
        if unknown:
            raise ValueError(f"LossSpec.extra {unknown} are not among {', '.join(EXTRA_INPUTS)}")

    @property
    def accepts(self) -> tuple[str, ...]:
        """Data-file formats ``alignflow po`` reads for this loss."""
        return ACCEPTS[self.data]

    @property
    def pairwise(self) -> bool:
        """Reads (chosen, rejected) pairs as they are (what online rounds build)."""
        return self.data != "unpaired"

    def hyper_parameters(self) -> tuple[str, ...]:
        """The keyword arguments of ``fn`` that ``loss.*`` may set."""
        return tuple(p for p in inspect.signature(self.fn).parameters if p not in CALL_ARGS)

    def config_fields(self) -> tuple[str, ...]:
        """Every ``loss.*`` key this loss reads: its hyper-parameters, its settings and, with a pre-training loss,
        ``bc_steps``."""
        return self.hyper_parameters() + self.settings + (("bc_steps",) if self.pretrain is not None else ())


_PAIR = ("policy_chosen_logps", "policy_rejected_logps")
_REF = ("ref_chosen_logps", "ref_rejected_logps")
_LEN = ("chosen_lengths", "rejected_lengths")
_TOKENS = (
    "policy_chosen_token_logps",
    "policy_rejected_token_logps",
    "chosen_token_rewards",
    "rejected_token_rewards",
    "chosen_mask",
    "rejected_mask",
)

PREFERENCE_LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(P.dpo_loss, _PAIR + _REF, title="DPO"),
    "cdpo": LossSpec(P.cdpo_loss, _PAIR + _REF, title="conservative DPO"),
    "robust_dpo": LossSpec(P.robust_dpo_loss, _PAIR + _REF, title="robust DPO"),
    "ipo": LossSpec(P.ipo_loss, _PAIR + _REF + _LEN, title="IPO"),
    "hinge": LossSpec(P.hinge_loss, _PAIR + _REF, title="hinge"),
    "simpo": LossSpec(P.simpo_loss, _PAIR + _LEN, reference=False, title="SimPO"),
    "orpo": LossSpec(P.orpo_loss, _PAIR + _LEN, reference=False, title="ORPO"),
    "kto": LossSpec(
        P.kto_loss,
        ("policy_logps", "ref_logps", "desirable", "policy_kl_logps", "ref_kl_logps"),
        data="unpaired",
        extra=("mismatched",),
        title="KTO",
    ),
    "cpl": LossSpec(P.cpl_loss, _PAIR, data="ranked", reference=False, pretrain=P.cpl_bc_loss, title="CPL"),
    "pro": LossSpec(P.pro_loss, _PAIR + _LEN, data="ranked", reference=False, extra=("optional_scores",), title="PRO"),
    "treg": LossSpec(
        P.treg_loss,
        _PAIR + _REF + _TOKENS,
        extra=("token_rewards",),
        settings=("treg_pos_instruction", "treg_neg_instruction"),
        title="T-REG",
    ),
    "inpo": LossSpec(
        P.inpo_loss, _PAIR + _REF + ("prev_chosen_logps", "prev_rejected_logps"), extra=("previous",), title="INPO"
    ),
    "refuel": LossSpec(
        P.refuel_loss, _PAIR + _REF + ("chosen_rewards", "rejected_rewards"), extra=("scores",), title="REFUEL"
    ),
    "p_dpo": LossSpec(
        p_dpo_rows_loss,
        _PAIR + _REF + ("user_conditioned",),
        extra=("users",),
        settings=("users", "user_tokens"),
        title="P-DPO",
    ),
}


def loss_spec(name: str, key: str = "loss.name") -> LossSpec:
    """The row of loss ``name``; a ConfigError naming ``key`` and the valid names otherwise."""
    spec = PREFERENCE_LOSSES.get(name)
    if spec is None:
        raise ConfigError(f"{key}: {name!r} is not one of {', '.join(PREFERENCE_LOSSES)}")
    return spec


def names_where(**fields: object) -> list[str]:
    """The losses whose row has these field values (properties too), in table order:
    ``names_where(pairwise=True)``."""
    return [n for n, s in PREFERENCE_LOSSES.items() if all(getattr(s, k) == v for k, v in fields.items())]
