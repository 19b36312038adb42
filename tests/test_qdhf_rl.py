"""QDHF inside alignflow rl: the novelty bonuses, distinct-n and QD selection by hand, the descriptor file, and GRPO
with the diversity term keeping its samples more diverse than GRPO without it."""

import json

import pytest
import torch

from alignflow.algorithms.qdhf import archive_novelty, distinct_n, group_novelty, qd_select
from alignflow.batch import Batch
from alignflow.config import ConfigError, QDHFConfig, load_config
from alignflow.rewards.diversity import Descriptor, DiversityReward
from alignflow.trainers.qdhf import train_qdhf
from alignflow.trainers.rl import train_rl
from tests.test_online_rl import rl_cfg


def test_group_novelty_by_hand():
    """Group A: points 0, 3, 4 on the first axis, scale 2 -> 0, 1.5, 2: novelty of 0 = (1.5 + 2) / 2 = 1.75, of
    1.5 = (1.5 + 0.5) / 2 = 1.0, of 2 = (2 + 0.5) / 2 = 1.25. Group B (one sample): 0."""
    desc = torch.tensor([[0.0, 0.0], [3.0, 0.0], [9.0, 9.0], [4.0, 0.0]])
    out = group_novelty(desc, [[0, 1, 3], [2]], torch.tensor([2.0, 1.0]))
    assert out.tolist() == pytest.approx([1.75, 1.0, 0.0, 1.25])


def test_archive_novelty_keeps_cells_across_calls():
    """First batch: cells 3, 3, 5 are all empty before it -> 1, 1, 1. Second batch: 5 was seen, 7 was not -> 0, 1."""
    seen: set[int] = set()
    assert archive_novelty(torch.tensor([3, 3, 5]), seen).tolist() == [1.0, 1.0, 1.0]
    assert archive_novelty(torch.tensor([5, 7]), seen).tolist() == [0.0, 1.0] and seen == {3, 5, 7}


def test_distinct_n_and_qd_select_by_hand():
    """Bigrams of "a b a b" and "a b c": (a b), (b a), (a b), (a b), (b c) -> 3 distinct of 5 = 0.6.
    QD selection of 2 on a 2 x 2 grid over [0, 1]^2: samples 0, 1 share cell 0 (quality 5 and 4), sample 2 is in
    cell 3 (quality 1): the elites are 0 and 2 (best first: 0, 2); best-of-2 would be 0 and 1. k = 3 fills with 1."""
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(0.6) and distinct_n(["a"], 2) == 0.0
    desc, q = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.9, 0.9]]), torch.tensor([5.0, 4.0, 1.0])
    lo, hi = torch.zeros(2), torch.ones(2)
    assert qd_select(desc, q, lo, hi, 2, 2) == [0, 2] and qd_select(desc, q, lo, hi, 2, 3) == [0, 2, 1]


def _descriptor_file(tmp_path):
    """Words (good, bad), W = [[1, -1]] (K = 1), range [0, 2], 2 bins, prompt marker "Review :"."""
    path = tmp_path / "descriptor.json"
    blob = {"words": ["good", "bad"], "weight": [[1.0, -1.0]], "lo": [0.0], "hi": [2.0], "bins": 2}
    path.write_text(json.dumps(blob | {"prompt_prefix": "Review :"}))
    return path


def test_diversity_reward_by_hand(tmp_path):
    """Descriptors: "good good" 2, "bad" -1, "good" 1 (the prompt "Review : good" adds one good to each): 3, 0, 2.
    Group mode, scale 2: novelty of 3 = (1.5 + 0.5) / 2 = 1, of 0 = (1.5 + 1) / 2 = 1.25, of 2 = (0.5 + 1) / 2 =
    0.75. Cells over [0, 2] in 2 bins: 3 -> 1 (edge), 0 -> 0, 2 -> 1: the group occupies 2 cells. Archive mode: both
    cells are empty before the first batch (every sample 1), full before the second (every sample 0)."""
    _descriptor_file(tmp_path)
    reward = DiversityReward(Descriptor.load(tmp_path), "group")
    batch = Batch(meta={"prompt": ["Review : good"] * 3, "response": ["good good", "bad", "good"], "group": [7] * 3})
    assert reward(batch).tolist() == pytest.approx([1.0, 1.25, 0.75])
    assert reward.last_fields["metric/diversity/group_cells"].tolist() == [2.0, 2.0, 2.0]
    assert float(reward.last_fields["metric/diversity/group_spread"][0]) == pytest.approx(1.0)
    archive = DiversityReward(Descriptor.load(tmp_path), "archive")
    assert archive(batch).tolist() == [1.0, 1.0, 1.0] and archive.seen == {0, 1}
    assert archive(batch).tolist() == [0.0, 0.0, 0.0]


def test_a_missing_descriptor_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"reward.diversity.descriptor: .*descriptor.json not found"):
        Descriptor.load(tmp_path)
    (tmp_path / "descriptor.json").write_text('{"words": []}')
    with pytest.raises(ConfigError, match="has no field 'weight'"):
        Descriptor.load(tmp_path)


def test_grpo_with_the_diversity_term_keeps_samples_more_diverse(reviews_task, reviews_sft, tmp_path):
    """QDHF's descriptor fitted on the fixture task's 600 rated responses (1000 judgements, 200 steps); then GRPO
    from the 60-step SFT model, 10 steps of 8 prompts x 4 samples (24 new tokens, lr 2e-3, KL 0.04 as a loss),
    reward = gold + w * group novelty, w = 3 against w = 0 (the term is computed and logged, not optimised).
    Over the last 4 steps (measured, w = 3 against w = 0): group spread 0.431 against 0.353 archive widths, cells
    per group of 4 3.38 against 3.06, distinct bigrams 0.994 against 0.969, at sampled gold -1.13 against -1.23.
    At train.seed=1 (not tested): spread 0.404 against 0.393, distinct bigrams 0.991 against 0.961, gold -1.79
    against -1.42: the spread margin and the gold tolerance checked here hold at seed 0 only (docs/qdhf.md)."""
    qd = train_qdhf(
        load_config(
            QDHFConfig,
            None,
            [
                f"qdhf.data_path={reviews_task.rated_path}",
                f"train.output_dir={tmp_path / 'qdhf'}",
                "train.progress=false",
            ],
        )
    )
    runs = {}
    for w in (0.0, 3.0):
        cfg = rl_cfg(
            reviews_task,
            tmp_path / f"rl-{w}",
            reviews_sft,
            algo={"name": "grpo"},
            kl={"coef": 0.04, "placement": "loss", "estimator": "k3"},
            reward={"task": {"gold": 1.0}, "diversity": {"descriptor": str(qd.output_dir), "weight": w}},
            rollout={"prompts_per_step": 8, "n": 4, "max_new_tokens": 24, "eval_prompts": 0},
            optim={"lr": 2e-3},
            train={"batch_size": 32, "max_steps": 10},
        )
        hist = train_rl(cfg).history[-4:]
        runs[w] = {k: sum(h[k] for h in hist) / len(hist) for k in hist[0] if k.startswith("rollout/")}
    plain, diverse = runs[0.0], runs[3.0]
    assert diverse["rollout/diversity/group_spread"] > plain["rollout/diversity/group_spread"] + 0.05
    assert diverse["rollout/diversity/group_distinct_2"] > plain["rollout/diversity/group_distinct_2"]
    assert diverse["rollout/reward_gold_mean"] > plain["rollout/reward_gold_mean"] - 0.3  # comparable quality


def test_qd_selection_at_generation(reviews_task, reviews_sft, tmp_path):
    """qdhf.policy: the 60-step SFT model samples 12 responses for each of 16 held-out prompts; per prompt 4 are
    kept by MAP-Elites over the learned descriptors (quality = gold) and 4 by gold alone. Best-of-k has the highest
    mean quality of any k by construction. Measured: QD 3.44 cells of the judge's grid, spread 0.326, gold -1.26;
    best-of-4 3.56 cells, spread 0.343, gold -1.19: on this weak policy's samples (already spread over the
    judge's grid) the archive gains no diversity (docs/qdhf.md)."""
    ev = train_qdhf(
        load_config(
            QDHFConfig,
            None,
            [
                f"qdhf.data_path={reviews_task.rated_path}",
                f"train.output_dir={tmp_path}",
                "train.progress=false",
                f"qdhf.policy={reviews_sft}",
                "qdhf.samples=12",
                "qdhf.select=4",
                "qdhf.prompts=16",
                "qdhf.max_new_tokens=24",
            ],
        )
    ).eval
    assert ev["eval/gen_qd/k"] == ev["eval/gen_best_of_k/k"] == 4
    # best-of-k is the quality optimum of any k; strictly above QD's means the archive changed some prompt's choice
    assert ev["eval/gen_best_of_k/quality"] > ev["eval/gen_qd/quality"], ev


def test_the_archive_is_checkpointed_and_a_resumed_run_continues_it(reviews_task, tmp_path):
    """reward.diversity in archive mode: 2 GRPO steps, then a resumed run to step 4, give the same diversity reward
    at steps 3 and 4 as one uninterrupted 4-step run -- the occupied cells are in the checkpoint. Without them the
    resumed step 3 would find every cell empty again (its first sample in each cell rewarded 1)."""
    desc = tmp_path / "desc"
    desc.mkdir()
    blob = {"words": ["the", "was", "."], "weight": [[1.0, -1.0, 0.5]], "lo": [-2.0], "hi": [6.0], "bins": 16}
    (desc / "descriptor.json").write_text(json.dumps(blob | {"prompt_prefix": "Review :"}))

    def run(out, steps: int, resume: bool = False):
        return train_rl(
            rl_cfg(
                reviews_task,
                out,
                algo={"name": "grpo"},
                reward={"task": {"gold": 0.0}, "diversity": {"descriptor": str(desc), "mode": "archive"}},
                rollout={"prompts_per_step": 4, "n": 2, "max_new_tokens": 8, "eval_prompts": 0},
                optim={"lr": 1e-3, "scheduler": "constant"},
                train={"batch_size": 8, "max_steps": steps, "save_every": 1, "resume": resume},
            )
        ).history

    key = "rollout/reward_diversity_mean"
    full = [h[key] for h in run(tmp_path / "full", 4)]
    run(tmp_path / "cut", 2)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["reward_sources"]["diversity"]["seen"], state
    resumed = [h[key] for h in run(tmp_path / "cut", 4, resume=True)]
    assert resumed[-2:] == pytest.approx(full[2:], abs=1e-6) and full[0] == 1.0
