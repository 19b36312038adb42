"""Model merging (SALSA, Balanced Actor Initialization): hand-derived interpolation, ``alignflow merge_models``,
and the merged directory as an RL run's KL reference."""

import json

import pytest
import torch

from alignflow.cli import main
from alignflow.config import ModelConfig, RLConfig, from_dict
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.models.merging import check_merge_weights, interpolate_state_dicts


def test_interpolation_by_hand():
    """w = (0.25, 0.75):  W = 0.25 [[1, 2], [3, 4]] + 0.75 [[3, 6], [7, 0]] = [[2.5, 5], [6, 1]];
    b = 0.25 (0, 10) + 0.75 (4, -10) = (3, -5). The integer buffer (equal in both) is copied; a bf16 tensor
    0.25 * 1 + 0.75 * 3 = 2.5 stays bf16."""
    a = {
        "W": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "b": torch.tensor([0.0, 10.0]),
        "pos": torch.tensor([0, 1]),
        "h": torch.tensor([1.0], dtype=torch.bfloat16),
    }
    b = {
        "W": torch.tensor([[3.0, 6.0], [7.0, 0.0]]),
        "b": torch.tensor([4.0, -10.0]),
        "pos": torch.tensor([0, 1]),
        "h": torch.tensor([3.0], dtype=torch.bfloat16),
    }
    out = interpolate_state_dicts([a, b], [0.25, 0.75])
    assert torch.equal(out["W"], torch.tensor([[2.5, 5.0], [6.0, 1.0]]))
    assert torch.equal(out["b"], torch.tensor([3.0, -5.0]))
    assert torch.equal(out["pos"], a["pos"]) and out["pos"] is not a["pos"]
    assert out["h"].dtype == torch.bfloat16 and out["h"].item() == 2.5
    assert torch.equal(interpolate_state_dicts([a, b])["W"], torch.tensor([[2.0, 4.0], [5.0, 2.0]]))  # equal


@pytest.mark.parametrize(
    "weights, message",
    [
        ([0.5], "1 weights given for 2"),
        ([0.7, 0.7], "sum to 1"),
        ([1.5, -0.5], ">= 0"),
        ([float("nan"), 1.0], "finite"),
    ],
)
def test_bad_weights_are_errors(weights, message):
    with pytest.raises(ValueError, match=message):
        check_merge_weights(weights, 2)


def test_other_architectures_are_errors_naming_the_model():
    a = {"W": torch.zeros(2, 2), "pos": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match=r"B: tensor 'W' is \(3, 2\)"):
        interpolate_state_dicts([a, {"W": torch.zeros(3, 2), "pos": a["pos"]}], names=["A", "B"])
    with pytest.raises(ValueError, match=r"B does not have the architecture of A: tensors missing \['pos'\]"):
        interpolate_state_dicts([a, {"W": torch.zeros(2, 2)}], names=["A", "B"])
    with pytest.raises(ValueError, match="non-float tensor 'pos'"):
        interpolate_state_dicts([a, {"W": torch.zeros(2, 2), "pos": torch.tensor([1, 0])}], names=["A", "B"])


@pytest.fixture()
def two_models(reviews_task, tmp_path):
    """The task's tiny model (A) and a copy with every float weight shifted by N(0, 0.1) (B), with the tokenizer."""
    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    paths = []
    for i in range(2):
        model = load_causal_lm(ModelConfig(name_or_path=str(reviews_task.model_dir)))
        if i:
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(tmp_path / f"m{i}")
        tok.save_pretrained(tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}"))
    return paths


def _params(path):
    return dict(load_causal_lm(ModelConfig(name_or_path=path)).named_parameters())


def test_merge_models_command_and_merged_reference(two_models, tmp_path):
    """``alignflow merge_models`` writes 0.25 A + 0.75 B; an RL run with ref_model=DIR loads it as the reference
    while the actor starts from A."""
    out = tmp_path / "merged"
    rc = main(["merge_models", f"models=[{two_models[0]},{two_models[1]}]", "weights=[0.25,0.75]", f"output={out}"])
    assert rc == 0
    a, b, m = _params(two_models[0]), _params(two_models[1]), _params(str(out))
    for name, p in m.items():
        assert torch.allclose(p, 0.25 * a[name] + 0.75 * b[name], atol=1e-6), name
    assert json.loads((out / "merge.json").read_text())["weights"] == [0.25, 0.75]

    from alignflow.trainers.rl_algos import resolve
    from alignflow.trainers.rl_setup import role_objects

    cfg = from_dict(
        RLConfig, {"model": {"name_or_path": two_models[0]}, "ref_model": str(out), "reward": {"task": {"gold": 1.0}}}
    )
    roles = role_objects(cfg, resolve(cfg), torch.device("cpu"), 1, load_tokenizer(two_models[0]), ("actor", "ref"))
    ref = dict(roles["ref"].model.named_parameters())
    actor = dict(roles["actor"].model.named_parameters())
    name = next(iter(m))
    assert torch.equal(ref[name], m[name]) and torch.equal(actor[name], a[name])


def test_merge_models_user_errors_are_one_line(two_models, tmp_path, capsys):
    assert main(["merge_models", f"models=[{two_models[0]}]", f"output={tmp_path / 'x'}"]) == 2
    assert "at least two model directories" in capsys.readouterr().err
    assert (
        main(
            [
                "merge_models",
                f"models=[{two_models[0]},{two_models[1]}]",
                "weights=[0.6,0.6]",
                f"output={tmp_path / 'x'}",
            ]
        )
        == 2
    )
    assert "weights=[0.6, 0.6]: merge weights must sum to 1" in capsys.readouterr().err
    assert main(["merge_models", f"models=[{two_models[0]},{two_models[1]}]", f"output={two_models[0]}"]) == 2
    assert "is one of the input models" in capsys.readouterr().err
