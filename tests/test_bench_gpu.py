"""``bench/bench_gpu.py --smoke``: the GPU benchmark's code end to end on CPU (tiny shape), both sides of every
workload, without Ray or vLLM."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_reports_every_workload(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_gpu.py"),
            "--smoke",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["workloads"]) == {"grpo", "gen", "sft", "dpo"}
    assert report["smoke"] and report["machine"]["trl"] and report["machine"]["torch"]
    for name, w in report["workloads"].items():
        af, base = w["sides"]["alignflow"], w["sides"][w["baseline"]]
        assert "error" not in af and "error" not in base, (name, af.get("error"), base.get("error"))
        assert af[w["metric"]] > 0 and base[w["metric"]] > 0, name
        assert w["ratio"] > 0 and abs(w["ratio"] - af[w["metric"]] / base[w["metric"]]) < 1e-9, name
        assert af["peak_mem_mb"] > 0 and base["peak_mem_mb"] > 0, name
    grpo = report["workloads"]["grpo"]["sides"]
    for side in ("alignflow", "trl"):  # identical workload: same prompts, same completion count per step
        s = grpo[side]
        assert s["completions"] == 4 * 4 and 0 < s["gen_share"] < 1 and s["update_s"] > 0 and s["update_mfu"] > 0
        assert s["train_tokens"] > s["tokens"]  # prompt + response tokens > response tokens
    md = out.with_suffix(".md").read_text()
    assert "| grpo | completions/s |" in md and "| dpo | pairs/s |" in md
