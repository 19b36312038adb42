"""Multi-turn episodes (``env.*``) with the roles on Ray worker sets (``resources``): the rollout role's workers
run the episodes of their share of the prompt rows and the actor set trains on the gathered trajectories."""

from __future__ import annotations

import json

from alignflow.envs.counting_user import make_rows
from alignflow.tasks.common import write_jsonl
from alignflow.trainers.rl import train_rl
from tests.test_distributed import _assert_same_weights, _weights, cluster  # noqa: F401 (cluster: a fixture)
from tests.test_multiturn_vllm import counting, rl_cfg  # noqa: F401 (counting: a fixture)


def test_multiturn_grpo_step_on_two_workers_equals_one_process(cluster, counting, tmp_path):  # noqa: F811
    """One GRPO step of counting episodes (3 prompt rows x 2 episodes, the built-in engine) in one process and on
    two Ray workers (FSDP2, gloo): each episode's sampling seeds are keyed by its row's place in the step, not by
    the worker that runs it, so both runs play the same episodes (trajectories.jsonl line for line), get the same
    losses and leave the same weights."""
    task, model_dir, _ = counting
    write_jsonl(tmp_path / "rows.jsonl", make_rows(6, seed=4))
    runs = {}
    for name, workers in (("local", 1), ("ray", 2)):
        out = tmp_path / name
        out.mkdir()
        (out / "rows.jsonl").write_text((tmp_path / "rows.jsonl").read_text())
        cfg = rl_cfg(
            task,
            model_dir,
            out,
            rollout={"backend": "builtin", "prompts_per_step": 3, "n": 2, "eval_prompts": 0},
            train={"batch_size": 6, "max_steps": 1, "eval_every": 0, "num_threads": 1},
            resources={"actor": {"workers": workers}, "backend": "ray" if workers > 1 else "auto"},
        )
        runs[name] = train_rl(cfg).history[-1]
    lines = {n: (tmp_path / n / "trajectories.jsonl").read_text().splitlines() for n in runs}
    assert len(lines["ray"]) == 6 and lines["ray"] == lines["local"]
    assert any(json.loads(x)["turns"] > 1 for x in lines["ray"])
    for k in ("rollout/reward_mean", "episode/turns_mean", "policy/policy_loss", "policy/grad_norm"):
        assert abs(runs["ray"][k] - runs["local"][k]) <= 1e-4 * max(1.0, abs(runs["local"][k])), k
    _assert_same_weights(_weights(tmp_path / "local"), _weights(tmp_path / "ray"))
