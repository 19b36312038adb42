"""bench/pf_ppo_vs_ppo.py: its --quick run end to end (tiny sizes, numbers meaningless) and its row counts by hand."""

import importlib
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("pf_ppo_vs_ppo")


def test_kept_rows_by_hand():
    """32 generated rows as 8 prompts x 4: best_random and best_worst keep 2 per prompt (16), best 1 (8), PPO all."""
    m = _bench()
    assert [m.kept_rows(f, 32) for f in ("none", "best_random", "best_worst", "best")] == [32, 16, 16, 8]


def test_pf_ppo_vs_ppo_quick(tmp_path):
    m = _bench()
    out = tmp_path / "out"
    payload = m.main(["--quick", "--with-best", "--work", str(tmp_path / "w"), "--out", str(out)])
    saved = json.loads((out / "pf_ppo_vs_ppo.json").read_text())
    assert saved["columns"] == m.COLUMNS == payload["columns"]
    assert [r["run"] for r in saved["rows"]] == ["ppo", "pf_best_random", "pf_best_worst", "pf_best"]
    assert [r["prompts_x_n"] for r in saved["rows"]] == ["4x1", "1x4", "1x4", "1x4"]  # 4 generated rows each
    assert len(saved["meta"]["rm_bucket_accuracy"]) == m.BUCKETS
    assert {s["run"] for s in saved["meta"]["summary"]} == set(m.RUNS)
    assert "| " + " | ".join(m.COLUMNS) + " |" in (out / "pf_ppo_vs_ppo.md").read_text()
    assert (out / "pf_ppo_vs_ppo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
