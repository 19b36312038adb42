"""The demo end to end on a miniature configuration: every stage runs and the report holds its numbers."""

import json

from alignflow.config import DemoConfig, from_dict
from alignflow.recipes.demo import ceiling, run_demo
from alignflow.tasks.labels import label_pairs


def test_label_pairs_and_ceiling_hand_example():
    """Gold rewards 2 and 0 with noise 1: P(first preferred) = sigmoid(2) = 0.8808; ceiling = max(p, 1-p).
    With noise 0 the better response is always chosen and the ceiling is 1."""
    gold = lambda prompts, responses: [float(len(r)) for r in responses]  # longer response = better
    rows = label_pairs(["p"], [["aa", "", "b"]], gold, noise=0.0, seed=0)  # empty sample skipped: one pair
    assert rows == [{"prompt": "p", "chosen": "aa", "rejected": "b", "p_gold": 1.0}]
    noisy = label_pairs(["p"] * 200, [["aaa", "b"]] * 200, gold, noise=1.0, seed=0)
    assert abs(ceiling(noisy) - 0.880797) < 1e-6
    wins = sum(r["chosen"] == "aaa" for r in noisy) / len(noisy)
    assert 0.8 < wins < 0.95  # Bradley-Terry draws agree with sigmoid(2) = 0.88


def test_demo_runs_end_to_end(tmp_path):
    """Every stage runs on a miniature configuration; the report holds each stage's numbers and plots; SFT beats
    the untrained model on gold reward, and the RL stage raises the proxy (reward-model) score it optimises."""
    cfg = from_dict(
        DemoConfig,
        {
            "output_dir": str(tmp_path),
            "progress": False,
            "sft_steps": 150,
            "sft_lr": 1e-2,
            "num_prompts": 48,
            "samples_per_prompt": 4,
            "rm_steps": 10,
            "max_new_tokens": 24,
            "rl_steps": 6,
            "rl_eval_every": 3,
            "rl_lr": 3e-3,
            "rl_rows_per_step": 16,
            "task": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "num_sft": 600},
        },
    )
    summary = run_demo(cfg)
    report = (tmp_path / "report.md").read_text()
    for png in ("sft_loss.png", "rm_loss.png", "rm_accuracy.png", "rl_reward.png", "rl_kl.png", "rl_frontier.png"):
        assert (tmp_path / png).stat().st_size > 1000 and png in report
    pol = summary["policies"]
    assert pol["SFT model"]["eval/gold_reward"] > pol["untrained model"]["eval/gold_reward"] + 0.5
    assert 0.0 <= summary["rm"]["eval/accuracy"] <= 1.0 and 0.5 <= summary["rm_ceiling"] <= 1.0
    assert f"{summary['rm']['eval/accuracy']:.3f}" in report
    assert json.loads((tmp_path / "summary.json").read_text())["pairs"]["eval"] >= 1
    rl = summary["rl"]
    assert rl["eval_steps"] == [0, 3, 6] and len(rl["proxy_reward"]) == len(rl["kl"]) == 6
    assert rl["proxy_end"] > rl["proxy_start"]  # RL optimises the proxy
    assert 0.0 < rl["kl_max"] < 50.0  # the policy moved, and the KL penalty kept it near the SFT policy
    assert f"{rl['gold_end']:.3f}" in report and "PPO model" in report
