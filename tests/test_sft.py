"""SFT trainer: exact normalisation (1 x 8 == 8 x 1), packed == unpacked, resume == uninterrupted, it learns."""

import json

import pytest
import torch

from alignflow.config import SFTConfig, from_dict
from alignflow.models import load_causal_lm
from alignflow.trainers.sft import micro_batches, sft_examples, train_sft, train_step


def _cfg(task, out, **train):
    return from_dict(
        SFTConfig,
        {
            "model": {"name_or_path": str(task.model_dir), "tokenizer": str(task.tokenizer_dir)},
            "data": {"path": str(task.sft_path), "max_len": 96, "eval_fraction": 0.05},
            "optim": {"lr": 3e-3, "scheduler": "constant"},
            "train": {
                "output_dir": str(out),
                "batch_size": 8,
                "max_steps": 4,
                "progress": False,
                "log_every": 1,
                **train,
            },
        },
    )


def _examples(task, tok, n=8):
    rows = [json.loads(line) for line in open(task.sft_path)][:n]
    out = []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": p + c, "loss_mask": [0] * len(p) + [1] * len(c)})
    return sft_examples(out)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("packing", [True, False])
def test_accumulation_invariance_1x8_equals_8x1(reviews_task, tmp_path, packing):
    """One micro-batch of 8 rows and 8 micro-batches of 1 row (3 of one pack each when packing) give the same loss
    and the same gradient,
    because every micro-batch divides by the token count of the whole step."""
    from alignflow.models import load_tokenizer

    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    ex = _examples(reviews_task, tok)
    results = []
    for budget in (100_000, 16):  # 1 x 8, then budgets so small that every row is its own micro-batch
        cfg = _cfg(reviews_task, tmp_path, packing=packing, micro_batch_tokens=budget)
        mbs = micro_batches(ex, packing, cfg.data.max_len, budget, tok.pad_token_id)
        torch.manual_seed(0)
        model = load_causal_lm(cfg.model)
        metrics, _ = train_step(model, ex, cfg, tok.pad_token_id, torch.device("cpu"))
        results.append((len(mbs), metrics["loss"], _grads(model)))
    (n1, l1, g1), (n8, l8, g8) = results
    assert n1 == 1 and n8 == (3 if packing else 8)  # packing: 8 rows fill 3 packs of 96 tokens, one per micro-batch
    assert l1 == pytest.approx(l8, rel=1e-5)
    assert torch.allclose(g1, g8, atol=1e-6, rtol=1e-4)


def test_packed_loss_equals_unpacked_loss(reviews_task, tmp_path):
    from alignflow.models import load_tokenizer

    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    ex = _examples(reviews_task, tok)
    losses = []
    for packing in (True, False):
        cfg = _cfg(reviews_task, tmp_path, packing=packing)
        model = load_causal_lm(cfg.model)
        losses.append(train_step(model, ex, cfg, tok.pad_token_id, torch.device("cpu"))[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_resume_reproduces_uninterrupted_losses(reviews_task, tmp_path):
    full = train_sft(_cfg(reviews_task, tmp_path / "full", max_steps=6))
    train_sft(_cfg(reviews_task, tmp_path / "part", max_steps=6, save_every=3))
    # simulate a crash after step 3: drop the later checkpoint, then resume
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-6")
    resumed = train_sft(_cfg(reviews_task, tmp_path / "part", max_steps=6, resume=True))
    assert len(resumed.losses) == 3
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-5)


def test_sft_learns_the_reviews_language(reviews_task, tmp_path):
    """Held-out NLL drops well below the untrained model's (log V ~ 5.6 nats for a ~270-word vocabulary)."""
    cfg = _cfg(reviews_task, tmp_path, max_steps=40, eval_every=0)
    cfg.optim.lr = 5e-3
    cfg.train.batch_size = 16
    result = train_sft(cfg)
    first = result.losses[0]
    assert result.eval["eval/loss"] < 0.7 * first
    assert (tmp_path / "model" / "model.safetensors").exists()
    logged = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert any("train/loss" in r for r in logged) and any("eval/loss" in r for r in logged)


def test_nonfinite_loss_stops_with_step_and_term(reviews_task, tmp_path, monkeypatch):
    from alignflow.trainers import sft as sft_mod
    from alignflow.trainers.loop import NonFiniteError

    real = sft_mod.nll_sum

    def poisoned(model, mb, device):
        s, n = real(model, mb, device)
        return s * float("nan"), n

    monkeypatch.setattr(sft_mod, "nll_sum", poisoned)
    with pytest.raises(NonFiniteError, match="step 0.*nll"):
        train_sft(_cfg(reviews_task, tmp_path))
