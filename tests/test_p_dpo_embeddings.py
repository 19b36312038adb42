"""P-DPO with learned user embeddings (docs/p_dpo.md): the soft prompts e_i = e_0 + o_i, the p_dpo loss row by hand,
the user field's errors, saving and loading, and a personalised policy against one-size DPO."""

import math
from pathlib import Path

import pytest
import torch

from alignflow.algorithms.personal import p_dpo_loss, p_dpo_rows_loss
from alignflow.algorithms.preference import PrefInputs
from alignflow.config import ConfigError, POConfig, load_config
from alignflow.data.formats import DataError
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.models.sequences import sequence_logps
from alignflow.models.user_embeddings import (
    UserPromptEmbedding,
    attach_user_embeddings,
    load_user_embeddings,
    prefix,
    user_prompt,
)
from alignflow.tasks import users
from alignflow.tasks.common import read_jsonl, write_jsonl
from alignflow.trainers.po import train_po
from alignflow.trainers.po_users import check_user_rows

ROOT = Path(__file__).resolve().parents[1]


def _pref(pc, pr, rc, rr, flag=None) -> PrefInputs:
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return PrefInputs(
        policy_chosen_logps=t(pc),
        policy_rejected_logps=t(pr),
        ref_chosen_logps=t(rc),
        ref_rejected_logps=t(rr),
        user_conditioned=None if flag is None else t(flag),
    )


def test_p_dpo_rows_loss_by_hand():
    """One pair, beta 1. After the user's prompt: h = (-1 - -2) - (-3 - -3) = 1, l_u = log(1 + e^-1) = 0.313262;
    after the generic prompt: h = 0, l_g = log 2 = 0.693147. alpha 0.75: L = 0.75 * 0.313262 + 0.25 * 0.693147 =
    0.408233. The row loss gives each row 2 * alpha * l_u and 2 * (1 - alpha) * l_g; their mean over the two rows is L,
    and their sum (reduction sum) is 2L. alpha 0 is DPO on the generic rows: log 2."""
    rows = _pref([-1.0, -2.0], [-3.0, -2.0], [-2.0, -2.0], [-3.0, -2.0], flag=[1.0, 0.0])
    lu, lg = math.log1p(math.exp(-1.0)), math.log(2.0)
    loss, m = p_dpo_rows_loss(rows, alpha=0.75, beta=1.0)
    assert float(loss) == pytest.approx(0.75 * lu + 0.25 * lg, abs=1e-6)
    assert float(loss) == pytest.approx(0.408233, abs=1e-6)
    assert float(p_dpo_rows_loss(rows, alpha=0.75, beta=1.0, reduction="sum")[0]) == pytest.approx(
        2 * 0.408233, abs=1e-5
    )
    assert float(m["p_dpo/user_loss"]) == pytest.approx(lu, abs=1e-6)
    assert float(m["p_dpo/generic_loss"]) == pytest.approx(lg, abs=1e-6)
    assert float(m["p_dpo/user_accuracy"]) == 1.0 and float(m["p_dpo/generic_accuracy"]) == 0.0
    assert float(p_dpo_rows_loss(rows, alpha=0.0, beta=1.0)[0]) == pytest.approx(lg, abs=1e-6)
    user, generic = _pref([-1.0], [-3.0], [-2.0], [-3.0]), _pref([-2.0], [-2.0], [-2.0], [-2.0])
    assert float(p_dpo_loss(user, generic, alpha=0.75, beta=1.0)[0]) == pytest.approx(float(loss), abs=1e-6)
    with pytest.raises(ValueError, match="alpha=1.5"):
        p_dpo_rows_loss(rows, alpha=1.5)


def test_soft_prompts_are_generic_plus_offset_and_reach_the_embedding(reviews_task):
    """id V + u*K + k looks up e_0[k] + o_u[k]; o_0 = 0 is the generic user, which an unseen user gets; ids below V
    are the model's own embeddings; the user's gradient reaches e_0 and o_u only."""
    model = load_causal_lm_cpu(reviews_task)
    base = model.get_input_embeddings()
    emb = attach_user_embeddings(model, ["fan", "critic"], k=2)
    assert isinstance(model.get_input_embeddings(), UserPromptEmbedding)
    v = emb.vocab
    assert emb.soft_ids("critic") == [v + 4, v + 5] and emb.soft_ids(None) == emb.soft_ids("bob") == [v, v + 1]
    with torch.no_grad():
        emb.offsets[1] = 1.0  # critic's offset
    out = emb(torch.tensor([[3, v + 1, v + 5]]))
    assert torch.equal(out[0, 0], base.weight[3])
    assert torch.equal(out[0, 1], emb.generic[1])
    assert torch.allclose(out[0, 2], emb.generic[1] + 1.0)
    emb(torch.tensor([[v + 4]])).sum().backward()
    assert emb.offsets.grad[1].abs().sum() > 0 and emb.offsets.grad[0].abs().sum() == 0
    assert prefix([1, 7, 8], [0, 0, 1], [v], bos=1) == ([1, v, 7, 8], [0, 0, 0, 1])


def load_causal_lm_cpu(task):
    from alignflow.config import ModelConfig

    return load_causal_lm(ModelConfig(name_or_path=str(task.model_dir), tokenizer=str(task.tokenizer_dir)), "cpu")


def test_user_field_errors_name_file_row_and_field(tmp_path, reviews_task):
    path, row = tmp_path / "pairs.jsonl", {"prompt": "Review : the plot", "chosen": POS, "rejected": NEG}
    write_jsonl(path, [row | {"user": "fan"}, row])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'user': missing"):
        check_user_rows(str(path), "train", [])
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'user': 'fan' is not one of loss.users \(critic\)"):
        check_user_rows(str(path), "train", ["critic"])
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [row | {"user": "fan"}] * 2)
    cfg = load_config(
        POConfig,
        None,
        [
            f"model.name_or_path={reviews_task.model_dir}",
            f"model.tokenizer={reviews_task.tokenizer_dir}",
            f"data.path={good}",
            f"train.output_dir={tmp_path / 'run'}",
            "loss.name=p_dpo",
            "loss.alpha=1.5",
        ],
    )
    with pytest.raises(ConfigError, match=r"loss.alpha=1.5: .* in \[0, 1\]"):
        train_po(cfg)
    cfg.loss.alpha, cfg.train.output_dir, cfg.data.path = 0.5, str(tmp_path / "run2"), str(path)
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'user'"):
        train_po(cfg)


# ------------------------------------------------------------------------------------------ learning
POS, NEG = " was truly wonderful .", " was truly awful ."
TWO = ("fan", "critic")  # they disagree on sentiment: fan's gold prefers POS, critic's NEG


def _user_rows(prompts: list[str]) -> list[dict]:
    """Each prompt once per user; the chosen response is the one the user's gold scores higher."""
    out = []
    for p in prompts:
        for u in TWO:
            g_pos, g_neg = users.user_gold(u, [p, p], [POS, NEG])
            chosen, rejected = (POS, NEG) if g_pos > g_neg else (NEG, POS)
            out.append({"prompt": p, "chosen": chosen, "rejected": rejected, "user": u})
    return out


def _train(task, sft, tmp_path, loss: str, steps: int):
    cfg = load_config(
        POConfig,
        None,
        [
            f"model.name_or_path={sft}",
            f"data.path={tmp_path / 'pairs.jsonl'}",
            f"data.eval_path={tmp_path / 'eval.jsonl'}",
            f"train.output_dir={tmp_path / loss}",
            "train.progress=false",
            f"train.max_steps={steps}",
            "train.batch_size=32",
            "train.num_threads=1",
            "optim.lr=3e-3",
            "optim.scheduler=constant",
            "loss.beta=0.1",
            f"loss.name={loss}",
        ],
    )
    return train_po(cfg)


@torch.no_grad()
def _user_gold(model, tok, prompts: list[str], user: str, personal: bool) -> float:
    """The user's expected gold when the policy picks between POS and NEG with its own odds:
    sum_y p(y) gold_u(y), p = softmax over the two responses' log-probs (after the user's soft prompt if
    ``personal``)."""
    total = 0.0
    for p in prompts:
        ids = tok(p)["input_ids"]
        ids = user_prompt(model, ids, user, tok.bos_token_id) if personal else ids
        seqs = []
        for r in (POS, NEG):
            resp = tok(r, add_special_tokens=False)["input_ids"]
            seqs.append((ids + resp, [0] * len(ids) + [1] * len(resp)))
        lp = sequence_logps(model, seqs, "cpu", False)["logps"]
        prob = torch.softmax(lp.float(), 0)
        gold = torch.tensor(users.user_gold(user, [p, p], [POS, NEG]))
        total += float((prob * gold).sum())
    return total / len(prompts)


def test_personalised_policy_beats_one_size_dpo_on_per_user_gold(reviews_task, reviews_sft, tmp_path):
    """Fan and critic label the same (prompt, POS, NEG) pairs in opposite ways. One-size DPO sees each pair once
    each way and cannot move its odds for both; P-DPO gives each user a soft prompt. Per-user gold is the user's
    expected gold when the policy picks between POS and NEG with its own odds (held-out prompts); each policy is
    measured the way it is used (DPO on the plain prompt, P-DPO after the user's soft prompt). Saving and loading
    keeps the user embeddings: the reloaded model gives the same log-probs."""
    prompts = [r["prompt"] for r in read_jsonl(reviews_task.prompts_path)]
    write_jsonl(tmp_path / "pairs.jsonl", _user_rows(prompts[:64]))
    write_jsonl(tmp_path / "eval.jsonl", _user_rows(prompts[64:80]))
    held = [r["prompt"] for r in read_jsonl(reviews_task.eval_prompts_path)][:24]
    tok = load_tokenizer(str(reviews_sft))
    start = load_causal_lm_cpu_dir(reviews_sft)
    init = {u: _user_gold(start, tok, held, u, False) for u in TWO}
    dpo = _train(reviews_task, reviews_sft, tmp_path, "dpo", 60)
    p_dpo = _train(reviews_task, reviews_sft, tmp_path, "p_dpo", 60)
    one = {u: _user_gold(dpo.model.eval(), tok, held, u, False) for u in TWO}
    per = {u: _user_gold(p_dpo.model.eval(), tok, held, u, True) for u in TWO}
    print("per-user gold: init", init, "dpo", one, "p_dpo", per)
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    assert mean(per) > mean(one) + 0.5, (init, one, per)
    assert all(per[u] > one[u] for u in TWO), (one, per)
    reloaded = load_causal_lm_cpu_dir(tmp_path / "p_dpo" / "model")
    assert load_user_embeddings(reloaded, tmp_path / "p_dpo" / "model").users == list(TWO)
    assert _user_gold(reloaded.eval(), tok, held[:4], "critic", True) == pytest.approx(
        _user_gold(p_dpo.model, tok, held[:4], "critic", True), abs=1e-5
    )


def load_causal_lm_cpu_dir(path):
    from alignflow.config import ModelConfig

    return load_causal_lm(ModelConfig(name_or_path=str(path)), "cpu")


def test_online_po_refuses_p_dpo():
    from alignflow.config import OnlinePOConfig
    from alignflow.trainers.online_po import _check

    with pytest.raises(ConfigError, match="loss.name=p_dpo: online pairs carry no user"):
        _check(load_config(OnlinePOConfig, str(ROOT / "configs" / "online_dpo.yaml"), ["loss.name=p_dpo"]))
