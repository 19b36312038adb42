"""PF-PPO (policy filtration): the filters and the reliability buckets by hand, the config keys, the preset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignflow.algorithms.filtration import (
    bucket_accuracy,
    filter_best,
    filter_best_random,
    filter_best_worst,
    filter_range,
    select_rows,
)
from alignflow.config import ConfigError, RLConfig, load_config
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rl_algos import resolve
from tests.test_online_rl import rl_cfg

ROOT = Path(__file__).resolve().parents[1]
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1])
SCORES = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.0, 0.0])


def test_best_worst_by_hand():
    """Group 0 (scores 1, 3, 2, 3): the best is the FIRST maximum (row 1), the worst the last minimum (row 0).
    Group 1 (0, 0): all equal, so first maximum = row 4 and last minimum = row 5: still two distinct rows."""
    assert filter_best_worst(SCORES, GROUPS).tolist() == [0, 1, 4, 5]


def test_best_only_by_hand():
    """Group 0 (scores 1, 3, 2, 3): the first maximum, row 1; group 1 (0, 0): its first row, 4. One row per
    prompt, in row order; select_rows("best") is the same."""
    assert filter_best(SCORES, GROUPS).tolist() == [1, 4]
    assert select_rows("best", SCORES, GROUPS).tolist() == [1, 4]
    assert filter_best(torch.tensor([0.5, 2.0, -1.0]), torch.tensor([7, 3, 3])).tolist() == [0, 1]


def test_best_random_keeps_the_best_and_one_uniform_other():
    """Group 0 keeps row 1 and one of rows 0, 2, 3 (each with probability 1/3); group 1 keeps row 4 and row 5
    (its only other row). Over 600 seeded draws each of rows 0, 2, 3 comes up 200 ± 45 times (≈ 4 std)."""
    counts = {0: 0, 2: 0, 3: 0}
    for seed in range(600):
        kept = filter_best_random(SCORES, GROUPS, torch.Generator().manual_seed(seed)).tolist()
        assert len(kept) == 4 and 1 in kept and 4 in kept and 5 in kept
        counts[next(r for r in kept if r in counts)] += 1
    assert all(abs(c - 200) < 45 for c in counts.values()), counts


def test_range_drops_the_middle():
    """Scores 0..4: torch.quantile gives q(0.25) = 1 and q(0.75) = 3, so rows with 1 < s < 3 (only row 2) go."""
    assert filter_range(torch.arange(5.0), 0.25, 0.75).tolist() == [0, 1, 3, 4]
    assert select_rows("none", torch.arange(3.0), torch.arange(3)).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="low <= high"):
        filter_range(torch.arange(5.0), 0.8, 0.2)


def test_bucket_accuracy_by_hand():
    """One group, proxy (1, 2, 3, 4), gold (1, 2, 4, 3), 2 buckets split at the median 2.5: rows 0, 1 below, 2, 3
    above. Low bucket: every pair of row 0 or 1 with another row is ordered alike (6 of 6). High bucket: row 2 vs 3
    has proxy 3 < 4 but gold 4 > 3, wrong both ways; the other 4 pairs are right: 4 / 6."""
    out = bucket_accuracy(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 2, 4, 3]), torch.zeros(4), 2)
    assert out[0] == (1.0, 6)
    assert out[1][1] == 6 and out[1][0] == pytest.approx(4 / 6)
    # a gold tie makes no pair; a bucket without pairs reports NaN
    empty = bucket_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 5.0]), torch.zeros(2), 2)
    assert all(math.isnan(a) and n == 0 for a, n in empty)


def test_filter_keys_are_checked(reviews_task, tmp_path):
    with pytest.raises(ConfigError, match="rollout.n must be >= 2"):
        resolve(
            rl_cfg(
                reviews_task,
                tmp_path,
                algo={"name": "ppo", "sample_filter": "best_worst"},
                rollout={"n": 1},
                train={"batch_size": 2},
            )
        )
    with pytest.raises(ConfigError, match="keeps the best of each prompt's samples: rollout.n must be >= 2"):
        resolve(
            rl_cfg(
                reviews_task,
                tmp_path,
                algo={"name": "ppo", "sample_filter": "best"},
                rollout={"n": 1},
                train={"batch_size": 2},
            )
        )
    with pytest.raises(ConfigError, match="algo.filter_range"):
        resolve(
            rl_cfg(reviews_task, tmp_path, algo={"name": "ppo", "sample_filter": "range", "filter_range": [0.9, 0.1]})
        )
    assert (
        resolve(rl_cfg(reviews_task, tmp_path, algo={"name": "pf_ppo"}, rollout={"n": 4})).sample_filter
        == "best_random"
    )
    assert resolve(rl_cfg(reviews_task, tmp_path, algo={"name": "ppo"})).sample_filter == "none"


def test_pf_ppo_preset_trains_on_two_samples_per_prompt(reviews_task, tmp_path):
    """configs/pf_ppo.yaml for one step on the tiny model: 2 of the n = 4 samples per prompt are kept, and with
    the gold reward as the training reward every reliability bucket orders pairs exactly like the gold (1.0)."""
    cfg = load_config(
        RLConfig,
        ROOT / "configs" / "pf_ppo.yaml",
        [
            f"model.name_or_path={reviews_task.model_dir}",
            f"model.tokenizer={reviews_task.tokenizer_dir}",
            f"data.path={reviews_task.prompts_path}",
            f"data.eval_path={reviews_task.eval_prompts_path}",
            "rollout.prompts_per_step=3",
            "rollout.max_new_tokens=6",
            "rollout.eval_prompts=2",
            "reward.models=[]",
            "reward.task={gold: 1.0}",
            f"train.output_dir={tmp_path}",
            "train.max_steps=1",
            "train.batch_size=6",
            "train.progress=false",
        ],
    )
    (m,) = train_rl(cfg).history
    assert m["pf/kept_frac"] == pytest.approx(0.5)
    accs = [m[k] for k in m if k.startswith("pf/rm_acc_bucket")]
    assert accs and all(a == 1.0 for a in accs)
    assert math.isfinite(m["policy/policy_loss"]) and math.isfinite(m["critic/value_loss"])
