"""MA-RLHF (ma_ppo) against token-level PPO at the same budget on the reviews task's tiny model (CPU, minutes).

The workload of bench/seed_methods.py (the 1-layer, 32-wide model after 60 SFT steps, the gold reward as the
training reward, 12 RL steps of 32 prompts x 1, beta 0.05, 2 PPO epochs, mini-batches of 16, actor lr 1e-3, critic
lr 3e-3); measured after training: the mean gold reward of 4 samples on each of 48 held-out prompts, and the KL of
the last step. Runs: token PPO (``noptx``), fixed 3- and 5-token macros, randomized n-gram, perplexity and
phrase-chunk (``ma_parse``) macros.

    python bench/ma_ppo.py [runs] [seed]      # prints one line per run; numbers in bench/results/ma_ppo.md
"""

from __future__ import annotations

import sys

import seed_methods

seed_methods.RUNS |= {
    name: dict(algo={"name": "ma_ppo", "ppo_epochs": 2, "macro": macro})
    for name, macro in {
        "ma_fixed3": {"rule": "fixed", "n": 3},
        "ma_fixed5": {"rule": "fixed", "n": 5},
        "ma_random": {"rule": "random"},
        "ma_perplexity": {"rule": "perplexity"},
        "ma_parse": {"rule": "parse"},
    }.items()
}

if __name__ == "__main__":
    runs = sys.argv[1] if len(sys.argv) > 1 else "noptx,ma_fixed3,ma_fixed5,ma_random,ma_perplexity"
    seed_methods.main(runs, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
