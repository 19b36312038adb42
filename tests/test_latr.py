"""LATR's decision rules by hand: which tokens branch, the edit distance, lookahead pruning, the mix ratio."""

from __future__ import annotations

import pytest
import torch

from alignflow.algorithms.latr import (
    branch_candidates,
    keep_branches,
    mix_ratio,
    normalized_edit_distance,
    tree_share,
)


def test_branch_candidates_by_hand():
    """p = (0.5, 0.3, 0.15, 0.05), sampled token 0, tau_abs 0.25, tau_rel 0.15: token 1 has 0.3 > 0.25 and
    0.5 - 0.3 = 0.2 > 0.15, so it branches; token 2 fails tau_abs. Sampled token 1 instead: token 0 is p_top itself
    (0.5 - 0.5 = 0, not > 0.15), so nothing branches. tau_abs >= 1 never branches."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert branch_candidates(p, sampled=0) == [1]
    assert branch_candidates(p, sampled=1) == []
    assert branch_candidates(p, sampled=0, tau_abs=1.0) == []
    assert branch_candidates(p, sampled=0, tau_rel=0.25) == []  # 0.2 is not > 0.25


def test_edit_distance_and_pruning_by_hand():
    """(1, 2, 3) vs (1, 3): one deletion, distance 1 / 3. (1, 2, 3, 4) vs (5, 6, 7, 8): 4 substitutions, 1.
    With tau_ed 0.4 the first child (1/3 < 0.4) is pruned and the second kept."""
    assert normalized_edit_distance([1, 2, 3], [1, 3]) == pytest.approx(1 / 3)
    assert normalized_edit_distance([1, 2, 3, 4], [5, 6, 7, 8]) == 1.0
    assert normalized_edit_distance([], []) == 0.0
    assert keep_branches([[1, 2, 3], [1, 2, 3, 4]], [[1, 3], [5, 6, 7, 8]], 0.4) == [False, True]


def test_mix_ratio_decays_linearly():
    """eta0 0.5 over 100 steps: 0.5 at step 0, 0.25 at 50, 0 from 100 on; of G = 8, round(0.25 * 8) = 2 from the
    tree. eta = 0 is plain sampling."""
    assert [mix_ratio(s, 0.5, 100) for s in (0, 50, 100, 150)] == [0.5, 0.25, 0.0, 0.0]
    assert tree_share(8, 0.25) == 2 and tree_share(8, 0.0) == 0 and tree_share(3, 0.5) == 2
    with pytest.raises(ValueError, match="eta0"):
        mix_ratio(0, 1.5, 10)
