"""QDHF: the triplet loss and the MAP-Elites archive by hand, the task's judge, and diversity against best-of-n."""

import pytest
import torch

from alignflow.algorithms.qdhf import cell_index, coverage, map_elites, spread, triplet_loss
from alignflow.config import QDHFConfig, load_config
from alignflow.data.formats import DataError
from alignflow.tasks import similarity
from alignflow.trainers.qdhf import train_qdhf


def test_triplet_loss_by_hand():
    """ref (0, 0), x1 (1, 0), x2 (0, 0.5): delta = 1 - 0.25 = 0.75. y = +1 (x2 judged nearer): max(0, 0.05 - 0.75)
    = 0; y = -1: max(0, 0.05 + 0.75) = 0.8. A correctly separated triplet with a margin above 0.05 costs 0."""
    ref, x1, x2 = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    loss, m = triplet_loss(ref, x1, x2, torch.tensor([1.0]))
    assert float(loss) == 0.0 and float(m["qdhf/triplet_accuracy"]) == 1.0
    loss, m = triplet_loss(ref, x1, x2, torch.tensor([-1.0]))
    assert float(loss) == pytest.approx(0.8) and float(m["qdhf/triplet_accuracy"]) == 0.0


def test_archive_keeps_the_best_of_each_cell():
    """Grid of 2 x 2 cells over [0, 1]^2; flat cell = 2 * row + column. Points 0 and 1 share cell 0 (quality 1 < 3:
    point 1 is the elite), point 2 is in cell 3, point 3 (outside the range) goes to the edge cell 1."""
    desc = torch.tensor([[0.1, 0.1], [0.2, 0.3], [0.9, 0.9], [-5.0, 7.0]])
    lo, hi = torch.zeros(2), torch.ones(2)
    assert cell_index(desc, lo, hi, 2).tolist() == [0, 0, 3, 1]
    assert map_elites(desc, torch.tensor([1.0, 3.0, 0.0, 2.0]), lo, hi, 2) == [1, 3, 2]
    assert coverage(desc, lo, hi, 2) == 3
    assert spread(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0) and spread(desc[:1]) == 0.0


def test_the_judge_prefers_the_nearer_review():
    """Measures: ref 0, x1 at distance 1, x2 at distance 0.5 -> +1. "the plot was truly wonderful ." is 6 tokens:
    length 6 / 48, and a positive tone above the middle 0.5."""
    m = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.5]])
    idx, y = similarity.judge_triplets(m, 50, 0)
    for (r, a, b), lab in zip(idx.tolist(), y.tolist(), strict=True):
        assert lab == (1.0 if (m[r] - m[b]).norm() < (m[r] - m[a]).norm() else -1.0)
    t = similarity.true_measures(["Review : the plot"], [" was truly wonderful ."])
    assert 0.5 < float(t[0, 0]) <= 1.0 and float(t[0, 1]) == pytest.approx(6 / 48)
    assert float(similarity.bow_features(["Review : the plot"], [" was truly wonderful ."]).sum()) == 6


def _qdhf(reviews_task, tmp_path, *extra):
    return load_config(
        QDHFConfig,
        None,
        [
            f"qdhf.data_path={reviews_task.rated_path}",
            f"train.output_dir={tmp_path}",
            "train.progress=false",
            "qdhf.quality_quantile=0.5",
            *extra,
        ],
    )


def test_qdhf_selection_is_more_diverse_than_best_of_n(reviews_task, tmp_path):
    """The fixture task's 600 rated responses; 1000 judgements, 200 Adam steps at lr 1e-2; candidates = the better
    half by gold reward; 5 x 5 cells. Measured here: QDHF's 25 elites occupy 5 cells of the judge's (tone, length)
    grid with spread 0.204 at mean gold 1.83; best-of-25 occupies 3 cells, spread 0.151, gold 1.94 (the candidates
    average 0.83). On the default task's 4000 responses the two are level (4 cells each, spread 0.134 against
    0.139, gold 1.98 against 1.99; docs/qdhf.md)."""
    ev = train_qdhf(_qdhf(reviews_task, tmp_path)).eval
    assert ev["eval/qdhf/coverage"] > ev["eval/best_of_n/coverage"], ev
    assert ev["eval/qdhf/spread"] > ev["eval/best_of_n/spread"], ev
    assert ev["eval/qdhf/quality"] > ev["eval/candidates/quality"] + 0.5, ev


def test_qdhf_bad_pool_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Review : the plot"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, row 1: field 'completions' missing or empty"):
        train_qdhf(load_config(QDHFConfig, None, [f"qdhf.data_path={bad}", f"train.output_dir={tmp_path / 'o'}"]))
