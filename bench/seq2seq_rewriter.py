"""How useful is a trained seq2seq rewriter as a token-level reward model? (docs/seq2seq_rm.md, issue 13 item 7)

Reads the rewriter that ``alignflow sft --config configs/seq2seq_sft.yaml`` wrote and the held-out rewrite rows of
its task (``rewrite_eval.jsonl``: openings never seen in training; half the rows show a damaged copy of a review,
half the review itself). Each row's response is rewritten greedily and its tokens get
``edit_token_rewards(response, rewrite)`` (the defaults keep 0, delete -1, replace -1, insert -0.5). Reported:

* copy rate: undamaged rows whose rewrite is the response itself (all token rewards 0);
* repair rate: damaged rows whose rewrite is the undamaged review; untouched rate: damaged rows left as they are;
* mean sequence reward (sum of token rewards) of undamaged and of damaged responses, their mean length, and the
  mean reward per token (the sum over the length, so a gap that only comes from length shows up as equal);
* where the reward falls in damaged responses: the damaged tokens are those the true repair edits
  (``edit_token_rewards(response, original) != 0``); the mean token reward on them and on the other (clean)
  tokens, and the share of clean tokens with a negative reward (false alarms);
* paired: for each damaged row, the original review is rewritten too; the share of rows where the original scores
  strictly higher than its damaged copy (same opening, lengths differing only by the damage).

With ``--ppo METRICS`` the gold reward, the seq2seq reward and the response length of a PPO run
(``alignflow rl --config configs/seq2seq_ppo.yaml``'s metrics.jsonl) are added, first third of the steps against
the last third. Run from the repository root, after the two commands of docs/seq2seq_rm.md::

    python bench/seq2seq_rewriter.py --ppo runs/seq2seq_ppo/metrics.jsonl   # -> bench/results/seq2seq_rewriter.*
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from alignflow.rewards.seq2seq import Rewriter, edit_token_rewards
from alignflow.tasks.common import read_jsonl
from alignflow.tasks.reviews_rewrite import rewrite_prompt

ROOT = Path(__file__).resolve().parents[1]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def score_rows(rewriter: Rewriter, rows: list, batch: int = 64) -> dict:
    """Rewrite every row's response (and each damaged row's original) and collect the measures (module doc)."""
    tok = rewriter.tokenizer

    def ids(text: str) -> list:
        return tok(text, add_special_tokens=False).input_ids

    damaged = [r for r in rows if r["response"].strip() != r["completion"].strip()]
    texts = [r["prompt"] for r in rows] + [rewrite_prompt(r["source_prompt"], r["completion"]) for r in damaged]
    outs = []
    for i in range(0, len(texts), batch):
        outs += rewriter.rewrite(texts[i : i + batch])
    rewrites, originals = outs[: len(rows)], outs[len(rows) :]
    m = {"clean": [], "damaged": []}
    hit, miss, paired = [], [], []
    for r, out in zip(rows, rewrites, strict=True):
        resp, want = ids(r["response"]), ids(r["completion"])
        values = edit_token_rewards(resp, ids(out))
        kind = "clean" if resp == want else "damaged"
        m[kind].append({"exact": ids(out) == want, "same": ids(out) == resp, "sum": sum(values), "len": len(resp)})
        if kind == "damaged":
            truth = edit_token_rewards(resp, want)
            hit += [v for v, t in zip(values, truth, strict=True) if t != 0]
            miss += [v for v, t in zip(values, truth, strict=True) if t == 0]
    for r, out in zip(damaged, originals, strict=True):
        orig = ids(r["completion"])
        paired.append(sum(edit_token_rewards(orig, ids(out))))
    dmg_sums = [d["sum"] for d in m["damaged"]]
    return {
        "rows": len(rows),
        "undamaged_rows": len(m["clean"]),
        "damaged_rows": len(m["damaged"]),
        "copy_rate": _mean(d["exact"] for d in m["clean"]),
        "repair_rate": _mean(d["exact"] for d in m["damaged"]),
        "damaged_untouched_rate": _mean(d["same"] for d in m["damaged"]),
        "seq_reward_undamaged": _mean(d["sum"] for d in m["clean"]),
        "seq_reward_damaged": _mean(dmg_sums),
        "len_undamaged": _mean(d["len"] for d in m["clean"]),
        "len_damaged": _mean(d["len"] for d in m["damaged"]),
        "per_token_undamaged": _mean(d["sum"] / max(d["len"], 1) for d in m["clean"]),
        "per_token_damaged": _mean(d["sum"] / max(d["len"], 1) for d in m["damaged"]),
        "token_reward_on_damage": _mean(hit),
        "token_reward_on_clean_of_damaged": _mean(miss),
        "false_alarm_rate": _mean(v < 0 for v in miss),
        "paired_original_above_damaged": _mean(o > d for o, d in zip(paired, dmg_sums, strict=True)),
        "seq_reward_originals_of_damaged": _mean(paired),
    }


def ppo_summary(path: Path) -> dict:
    """First third against last third of a PPO run's logged gold reward, seq2seq reward and response length."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    out = {"steps": len(rows)}
    for key in ("rollout/reward_gold_mean", "rollout/reward_seq2seq_mean", "rollout/response_len"):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        k = max(len(vals) // 3, 1)
        if vals:
            out[key] = {"first_third": _mean(vals[:k]), "last_third": _mean(vals[-k:])}
    return out


def write_report(res: dict, out: Path) -> str:
    r = res["rewriter"]
    lines = [
        "# Seq2seq rewriter on the reviews task (bench/seq2seq_rewriter.py)",
        "",
        f"Rewriter `{res['model']}`, {r['rows']} held-out rows ({r['undamaged_rows']} undamaged, "
        f"{r['damaged_rows']} damaged), greedy, {res['seconds']:.1f} s.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| copy rate (undamaged rewritten unchanged) | {r['copy_rate']:.3f} |",
        f"| repair rate (damaged rewritten to the original) | {r['repair_rate']:.3f} |",
        f"| damaged left untouched | {r['damaged_untouched_rate']:.3f} |",
        f"| sequence reward, undamaged / damaged | {r['seq_reward_undamaged']:.2f} / {r['seq_reward_damaged']:.2f} |",
        f"| response length, undamaged / damaged | {r['len_undamaged']:.1f} / {r['len_damaged']:.1f} |",
        f"| reward per token, undamaged / damaged | {r['per_token_undamaged']:.3f} / {r['per_token_damaged']:.3f} |",
        f"| damaged rows: token reward on damaged / clean tokens | {r['token_reward_on_damage']:.3f} / "
        f"{r['token_reward_on_clean_of_damaged']:.3f} |",
        f"| damaged rows: clean tokens with a negative reward | {r['false_alarm_rate']:.3f} |",
        f"| original scores above its damaged copy (paired) | {r['paired_original_above_damaged']:.3f} |",
    ]
    for key, v in (res.get("ppo") or {}).items():
        if isinstance(v, dict):
            lines.append(f"| PPO `{key}`, first / last third | {v['first_third']:.3f} / {v['last_third']:.3f} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/seq2seq_sft/model", help="the rewriter (alignflow sft output)")
    ap.add_argument("--eval", default="runs/seq2seq_sft/task/rewrite_eval.jsonl", help="held-out rewrite rows")
    ap.add_argument("--rows", type=int, default=200, help="how many held-out rows")
    ap.add_argument("--ppo", default="", help="metrics.jsonl of a seq2seq PPO run (optional)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "seq2seq_rewriter"), help="output stem")
    args = ap.parse_args(argv)
    for p in (args.model, args.eval, args.ppo):
        if p and not Path(p).exists():
            print(f"seq2seq_rewriter: {p} not found; run the commands of docs/seq2seq_rm.md first", file=sys.stderr)
            return 2
    t0 = time.time()
    rows = read_jsonl(args.eval)[: args.rows]
    res = {"model": args.model, "eval": args.eval, "rewriter": score_rows(Rewriter.from_path(args.model), rows)}
    if args.ppo:
        res["ppo"] = ppo_summary(Path(args.ppo))
    res["seconds"] = time.time() - t0
    print(write_report(res, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
