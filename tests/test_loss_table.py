"""The preference-loss table (alignflow.algorithms.preference_table): a loss registered as one row runs through
``alignflow po`` with nothing else touched, and the trainers' format and reference decisions come from the row."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch.nn.functional as F

from alignflow.algorithms.preference import PrefInputs, reduce_rows
from alignflow.algorithms.preference_table import PREFERENCE_LOSSES, LossSpec, loss_spec
from alignflow.cli import main
from alignflow.config import ConfigError, OnlinePOConfig, POLossConfig, from_dict
from alignflow.tasks.common import read_jsonl, write_jsonl
from alignflow.trainers import online_po as iterative

CALLS: list[dict] = []


def toy_loss(inputs: PrefInputs, *, beta: float = 1.0, reduction: str = "mean", weights=None):
    """A loss no trainer knows, a smooth hinge on the DPO log-ratio gap h_i: ``l_i = log(1 + exp(1 - β·h_i))``.

    At the first step the policy is the reference (dropout off), so h_i = 0 and every row's loss is
    log(1 + e) = 1.31326...; the loss falls as h grows (its derivative in h, -β·σ(1 - βh), is negative everywhere).
    """
    pc, pr, rc, rr = inputs.need(
        "toy_loss", "policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"
    )
    h = (pc - rc) - (pr - rr)  # (B,)
    losses = F.softplus(1.0 - beta * h)
    value = float(reduce_rows(losses.detach(), reduction, weights).sum())
    CALLS.append(
        {
            "beta": beta,
            "reduction": reduction,
            "value": value,
            "fields": sorted(f.name for f in dataclasses.fields(inputs) if getattr(inputs, f.name) is not None),
        }
    )
    return reduce_rows(losses, reduction, weights), {"pref/margin": F.softplus(h).mean().detach()}


TOY = LossSpec(
    toy_loss, ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"), title="toy"
)


def _po_args(task, out, *extra: str) -> list[str]:
    """``alignflow po`` on 16 of the task's pairs with the task's tiny model: every step trains on the same 16 rows,
    so the loss the steps report must fall."""
    data = out.parent / f"{out.name}-pairs.jsonl"
    write_jsonl(data, read_jsonl(task.pairs_path)[:16])
    return [
        "po",
        f"model.name_or_path={task.model_dir}",
        f"model.tokenizer={task.tokenizer_dir}",
        f"data.path={data}",
        "data.max_len=64",
        "data.eval_fraction=0.0",
        "optim.lr=1e-3",
        "optim.scheduler=constant",
        "optim.warmup_ratio=0.0",
        f"train.output_dir={out}",
        "train.batch_size=16",
        "train.max_steps=6",
        "train.progress=false",
        *extra,
    ]


def test_a_loss_registered_in_the_table_runs_through_alignflow_po(reviews_task, tmp_path, monkeypatch, capsys):
    """One row added to the table (here by the test) is a valid ``loss.name``, gets its hyper-parameter from
    ``loss.beta``, is fed its reference log-probs, starts at the hand-derived loss log(1 + e) and learns."""
    monkeypatch.setitem(PREFERENCE_LOSSES, "toy", TOY)
    CALLS.clear()
    assert main(_po_args(reviews_task, tmp_path / "run", "loss.name=toy", "loss.beta=0.5")) == 0
    means = [c["value"] for c in CALLS if c["reduction"] == "mean"]  # one per step: the step's metrics
    assert len(means) == 6 and all(c["beta"] == 0.5 for c in CALLS)
    assert means[0] == pytest.approx(math.log(1 + math.e), abs=1e-5)  # h = 0 at the first step
    assert means[-1] < means[0] - 0.05, means
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(CALLS[0]["fields"])
    assert main(["po", "--help"]) == 0 and "toy (toy)" in capsys.readouterr().out
    assert main(_po_args(reviews_task, tmp_path / "run2", "loss.name=toy", "loss.gamma=1.0")) == 2
    assert (
        "loss.gamma=1.0 is not a hyper-parameter of loss 'toy' (its hyper-parameters: beta)" in capsys.readouterr().err
    )


def test_an_unknown_loss_name_lists_the_table(reviews_task, tmp_path, capsys):
    assert main(_po_args(reviews_task, tmp_path / "run", "loss.name=dp")) == 2
    assert f"loss.name: 'dp' is not one of {', '.join(PREFERENCE_LOSSES)}" in capsys.readouterr().err


def test_online_po_reads_pairing_and_reference_from_the_row(monkeypatch):
    """An unpaired loss is refused by online_po's pair rounds, and APO refuses a loss without a reference, by the
    row's fields alone (the names are new to the trainer)."""
    monkeypatch.setitem(PREFERENCE_LOSSES, "toy_unpaired", dataclasses.replace(TOY, data="unpaired"))
    monkeypatch.setitem(PREFERENCE_LOSSES, "toy_free", dataclasses.replace(TOY, reference=False))
    unpaired = from_dict(OnlinePOConfig, {"loss": {"name": "toy_unpaired"}})
    with pytest.raises(ConfigError, match="toy_unpaired trains on unpaired rows.*pairwise loss \\(dpo, "):
        iterative._check(unpaired)
    free = from_dict(OnlinePOConfig, {"loss": {"name": "toy_free"}, "online": {"method": "apo"}})
    with pytest.raises(ConfigError, match="apo extrapolates the reference, but loss.name=toy_free uses none"):
        iterative._check(free)


def test_every_row_is_consistent():
    """Each row's config keys are fields of the ``loss`` section, its extra inputs and format are known, and a
    bad row is refused when it is written."""
    keys = {f.name for f in dataclasses.fields(POLossConfig)}
    for name, spec in PREFERENCE_LOSSES.items():
        assert set(spec.config_fields()) <= keys, name
        assert loss_spec(name) is spec
    assert "bc_steps" in loss_spec("cpl").config_fields() and loss_spec("kto").accepts == ("unpaired", "preference")
    with pytest.raises(ValueError, match="LossSpec.data='pairs' is not one of preference, ranked, unpaired"):
        LossSpec(toy_loss, (), data="pairs")
    with pytest.raises(ValueError, match="LossSpec.extra \\['z0'\\]"):
        LossSpec(toy_loss, (), extra=("z0",))
