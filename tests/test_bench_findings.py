"""The paper-finding benches (bench/overoptimisation.py, rm_ensembles.py, par_hacking.py, dpo_vs_ppo_frontier.py,
remax_vs_ppo.py, vs_trl_gold.py): each ``--quick`` run end to end in this process (tiny sizes; one shared work
directory, so the task and SFT model are built once), checking the table's columns and the plot; and their small
maths by hand."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("findings")


def run_quick(name: str, work: Path, columns: list[str]) -> dict:
    out = work / "out"
    payload = bench(name).main(["--quick", "--work", str(work / "w"), "--out", str(out)])
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved["columns"] == columns == payload["columns"]
    assert saved["rows"] and all(set(columns) <= set(r) for r in saved["rows"])
    header = "| " + " | ".join(columns) + " |"
    assert header in (out / f"{name}.md").read_text()
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return saved


def test_overoptimisation_quick(work):
    cols = ["run", "seed", "step", "sqrt_kl", "kl", "proxy", "gold", "response_len"]
    saved = run_quick("overoptimisation", work, cols)
    assert [r["step"] for r in saved["rows"]] == [0, 1, 2]  # the SFT start, then every checkpoint
    assert {"alpha", "beta", "d_peak"} <= set(saved["meta"]["fit"])


def test_rm_ensembles_quick(work):
    cols = ["run", "seed", "step", "sqrt_kl", "kl", "proxy", "proxy_min", "gold", "response_len"]
    saved = run_quick("rm_ensembles", work, cols)
    assert [s["run"] for s in saved["meta"]["summary"]] == ["single", "mean", "min", "uwo"]
    assert (work / "w" / "ens-uwo-k2-s0" / "model").is_dir()


def test_par_hacking_quick(work):
    cols = ["run", "seed", "step", "sqrt_kl", "kl", "proxy", "gold", "response_len"]
    saved = run_quick("par_hacking", work, cols)
    assert [s["run"] for s in saved["meta"]["summary"]] == ["plain", "par"]
    logged = [json.loads(line) for line in (work / "w" / "par-par-m1-s0" / "metrics.jsonl").read_text().splitlines()]
    shaped = [r["shaping/shaped_reward_mean"] for r in logged if "shaping/shaped_reward_mean" in r]
    assert shaped and all(0.0 < v < 1.0 for v in shaped)  # PAR's reward is a mean of sigmoids
    plain = (work / "w" / "par-plain-m1-s0" / "metrics.jsonl").read_text()
    assert "shaping/" not in plain


def test_dpo_vs_ppo_frontier_quick(work):
    cols = ["method", "setting", "step", "final", "kl", "sqrt_kl", "gold", "proxy", "response_len", "train_s"]
    saved = run_quick("dpo_vs_ppo_frontier", work, cols)
    assert {r["method"] for r in saved["rows"] if r["final"]} == {"SFT", "DPO", "PPO"}


def test_remax_vs_ppo_quick(work):
    cols = ["algo", "steps", "train_s", "s_per_step", "steps_to_target", "s_to_target", "target"]
    cols += ["rss_growth_mb", "peak_rss_mb", "state_mb", "gold", "proxy", "kl"]
    saved = run_quick("remax_vs_ppo", work, cols)
    ppo, remax = saved["rows"]
    assert (ppo["algo"], remax["algo"]) == ("ppo", "remax")
    # ReMax keeps no critic: fewer live parameter + gradient + optimiser bytes than PPO
    assert 0 < remax["state_mb"] < ppo["state_mb"]


def test_vs_trl_gold_quick(work):
    pytest.importorskip("trl")
    cols = ["algo", "side", "step", "kl", "sqrt_kl", "gold", "gold_se", "response_len"]
    saved = run_quick("vs_trl_gold", work, cols)
    assert {(r["algo"], r["side"]) for r in saved["rows"]} == {
        (a, s) for a in ("grpo", "rloo", "dpo") for s in ("alignflow", "TRL")
    }
    assert len(saved["meta"]["summary"]) == 6
    for r in saved["meta"]["summary"]:  # equal KL: the smaller of the two sides' largest KL
        kls = [x["kl"] for x in saved["rows"] if x["algo"] == r["algo"]]
        assert r["equal_kl"] <= max(kls)


def test_fit_gao_recovers_a_known_curve():
    """Points on gold - gold_0 = 2d - d^2 at d = 1, 2 (gains 1 and 0): the normal equations give a = 5, b = 9,
    c = 17, p = 1, q = 1, det = 85 - 81 = 4, alpha = (17 - 9) / 4 = 2, gamma = (5 - 9) / 4 = -1 -> beta = 1,
    peak d* = alpha / (2 beta) = 1."""
    rows = [
        {"seed": 0, "step": 0, "gold": 5.0, "sqrt_kl": 0.0},
        {"seed": 0, "step": 1, "gold": 6.0, "sqrt_kl": 1.0},
        {"seed": 0, "step": 2, "gold": 5.0, "sqrt_kl": 2.0},
    ]
    fit = bench("overoptimisation").fit_gao(rows)
    assert fit == pytest.approx({"alpha": 2.0, "beta": 1.0, "d_peak": 1.0})


def test_gold_at_interpolates_in_step_order():
    """(sqrt_kl, gold) = (0, 1), (2, 3), (4, 0): gold@1 = 1 + 1/2 * 2 = 2; gold@3 = 3 + 1/2 * (0 - 3) = 1.5;
    4.5 is never reached -> nan."""
    rows = [{"step": i, "sqrt_kl": d, "gold": g} for i, (d, g) in enumerate([(0.0, 1.0), (2.0, 3.0), (4.0, 0.0)])]
    gold_at = bench("rm_ensembles").gold_at
    assert gold_at(rows, 1.0) == pytest.approx(2.0)
    assert gold_at(rows, 3.0) == pytest.approx(1.5)
    assert math.isnan(gold_at(rows, 4.5))


def test_matched_reward_steps_and_seconds():
    """Rewards 0, 2, 4 with a 5-step trailing mean -> 0, 1, 2; target 1 is first reached at step 2, after
    0.5 + 0.25 s of steps; target 3 never (-1, nan)."""
    m = bench("remax_vs_ppo")
    hist = [{"rollout/reward_mean": r, "perf/step_s": s} for r, s in [(0.0, 0.5), (2.0, 0.25), (4.0, 1.0)]]
    assert m.moving([0.0, 2.0, 4.0]) == [0.0, 1.0, 2.0]
    assert m.to_target(hist, 1.0) == (2, 0.75)
    steps, secs = m.to_target(hist, 3.0)
    assert steps == -1 and math.isnan(secs)
