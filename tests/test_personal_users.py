"""Users with different tastes on the reviews task, P-DPO and VPL: hand-derived maths and the papers' directions."""

import json
import math

import pytest
import torch

from alignflow.algorithms.personal import p_dpo_loss
from alignflow.algorithms.preference import PrefInputs, dpo_loss
from alignflow.algorithms.vpl import VPLRewardModel, gaussian_kl, kl_anneal, reparameterise, vpl_loss
from alignflow.config import POConfig, load_config
from alignflow.data.formats import DataError
from alignflow.tasks import reviews, users
from alignflow.tasks.common import read_jsonl
from alignflow.trainers.po import train_po
from alignflow.trainers.vpl import train_vpl
from tests.helpers import vpl_config

PROMPT, RESPONSE = "Review : the plot", " was truly wonderful ."


# ------------------------------------------------------------------------------------------ users
def test_user_gold_weights_the_task_terms():
    """fan = the task's gold; critic = gold - 2 * sentiment (its sentiment weight is -1 instead of 1); stickler =
    0.2 * sentiment + 2 * fluency + 2 * variety + length. Tags before the prompt are not part of the review."""
    c = reviews.attribute_ratings(PROMPT, RESPONSE)
    (fan,) = users.user_gold("fan", [users.tag_prompt(PROMPT, "fan")], [RESPONSE])
    (critic,) = users.user_gold("critic", [PROMPT], [RESPONSE])
    (stickler,) = users.user_gold("stickler", [users.tag_prompt(PROMPT, None)], [RESPONSE])
    assert fan == pytest.approx(reviews.gold_reward([PROMPT], [RESPONSE])[0])
    assert critic == pytest.approx(fan - 2 * c["sentiment"])
    assert c["sentiment"] > 0 and critic < 0 < fan
    expected = 0.2 * c["sentiment"] + 2 * c["fluency"] + 2 * c["variety"] + c["length"]
    assert stickler == pytest.approx(expected)


def test_tags_and_p_dpo_rows():
    assert users.tag_prompt(PROMPT, "critic") == "we sadly Review : the plot"
    assert users.tag_prompt(PROMPT, None) == "we Review : the plot"
    assert users.strip_tags("we sadly Review : the plot") == PROMPT
    assert users.p_dpo_copies(0.5) == (1, 1) and users.p_dpo_copies(0.75) == (3, 1) and users.p_dpo_copies(1) == (1, 0)
    with pytest.raises(ValueError, match="multiple of 1/8"):
        users.p_dpo_copies(0.3)
    row = {"prompt": PROMPT, "chosen": " a", "rejected": " b", "user": "fan"}
    out = users.p_dpo_rows([row], 0.75)
    assert [r["prompt"] for r in out] == ["we happily Review : the plot"] * 3 + ["we Review : the plot"]
    with pytest.raises(DataError, match="row 0: field 'user': 'bob' is not one of fan, critic, stickler"):
        users.p_dpo_rows([row | {"user": "bob"}])


def test_the_task_writes_user_files(reviews_task):
    """Users take turns; held-out pairs are ordered by the noise-free user gold; fan and critic disagree on most."""
    paths = users.paths(reviews_task.dir)
    train, held = read_jsonl(paths["user_pairs"]), read_jsonl(paths["user_eval"])
    assert [r["user"] for r in train[:4]] == ["fan", "critic", "stickler", "fan"]
    for r in held:
        gc, gr = users.user_gold(r["user"], [r["prompt"]] * 2, [r["chosen"], r["rejected"]])
        assert gc > gr
    fan = [r for r in held if r["user"] == "fan"]
    agree = [
        a > b
        for a, b in zip(
            *(
                users.user_gold("critic", [r["prompt"] for r in fan], [r[s] for r in fan])
                for s in ("chosen", "rejected")
            ),
            strict=True,
        )
    ]
    assert sum(agree) / len(agree) < 0.5
    assert len(read_jsonl(paths["p_dpo_pairs"])) == 2 * len(train)
    assert read_jsonl(paths["p_dpo_eval"])[0]["prompt"].startswith("we happily Review :")


# ------------------------------------------------------------------------------------------ P-DPO
def _pref(pc, pr, rc, rr) -> PrefInputs:
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return PrefInputs(
        policy_chosen_logps=t(pc), policy_rejected_logps=t(pr), ref_chosen_logps=t(rc), ref_rejected_logps=t(rr)
    )


def test_p_dpo_loss_by_hand():
    """User half: h = (-1 + 2) - (-3 + 2) = 2, beta 0.5 -> softplus(-1) = log(1 + e^-1) = 0.31326; generic half:
    h = 0 -> log 2 = 0.69315. alpha = 0.5: 0.5 * 0.31326 + 0.5 * 0.69315 = 0.50320; alpha = 0 is DPO on the
    generic rows."""
    user, generic = _pref([-1.0], [-3.0], [-2.0], [-2.0]), _pref([-2.0], [-2.0], [-2.0], [-2.0])
    loss, m = p_dpo_loss(user, generic, alpha=0.5, beta=0.5)
    assert float(loss) == pytest.approx(0.5 * math.log1p(math.exp(-1)) + 0.5 * math.log(2), abs=1e-5)
    assert float(loss) == pytest.approx(0.50320, abs=1e-5)
    assert float(m["p_dpo/generic_loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(p_dpo_loss(user, generic, alpha=0.0, beta=0.5)[0]) == pytest.approx(math.log(2), abs=1e-6)


def test_p_dpo_rows_make_dpo_the_p_dpo_loss():
    """DPO's mean over the rows p_dpo_rows writes (alpha 0.75: 3 user copies, 1 generic) is p_dpo_loss."""
    user, generic = (
        _pref([-1.0, -4.0], [-3.0, -2.0], [-2.0, -3.0], [-2.0, -2.5]),
        _pref([-2.0, -1.0], [-2.5, -2.0], [-2.0, -1.5], [-2.0, -2.2]),
    )
    k_user, k_generic = users.p_dpo_copies(0.75)
    rows = PrefInputs(
        **{
            f: torch.cat([getattr(user, f)] * k_user + [getattr(generic, f)] * k_generic)
            for f in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
        }
    )
    expected, _ = p_dpo_loss(user, generic, alpha=0.75, beta=0.1)
    assert float(dpo_loss(rows, beta=0.1)[0]) == pytest.approx(float(expected), abs=1e-6)


def _po(reviews_task, sft, tmp_path, name: str, train: str, held: str):
    cfg = load_config(
        POConfig,
        None,
        [
            f"model.name_or_path={sft}",
            f"data.path={reviews_task.dir / train}",
            f"data.eval_path={reviews_task.dir / held}",
            f"train.output_dir={tmp_path / name}",
            "train.progress=false",
            "train.max_steps=40",
            "train.batch_size=32",
            "train.num_threads=1",
            "optim.lr=1e-3",
            "optim.scheduler=constant",
            "loss.beta=0.1",
        ],
    )
    return train_po(cfg).eval["eval/accuracy"]


def test_p_dpo_orders_held_out_user_pairs_better_than_one_size_dpo(reviews_task, reviews_sft, tmp_path):
    """From the 60-step SFT model, 40 steps of 32 rows (lr 1e-3, beta 0.1): DPO on the 300 user pairs without tags
    against P-DPO (alpha 0.5) on their tagged copies; accuracy of the implicit reward beta * (LP - LP_ref) on the
    held-out pairs ordered by each user's noise-free gold (for P-DPO, after the user's tag). Measured here: 0.564
    (DPO) against 0.581 (P-DPO). The gap is small against its noise (about 0.02 on 300 held-out pairs); other
    settings measured: 1200 pairs, 150 steps at lr 2e-3: 0.587 against 0.617; 300 steps: 0.579 against 0.602; beta
    0.5: 0.604 against 0.560 (the other way)."""
    dpo = _po(reviews_task, reviews_sft, tmp_path, "dpo", "user_pairs.jsonl", "user_eval.jsonl")
    p_dpo = _po(reviews_task, reviews_sft, tmp_path, "p_dpo", "p_dpo_pairs.jsonl", "p_dpo_eval.jsonl")
    assert p_dpo > dpo, (dpo, p_dpo)


# ------------------------------------------------------------------------------------------ VPL
def test_vpl_maths_by_hand():
    """KL(N([1, 0], diag[1, 4]) || N(0, I)) = 0.5 * ((1 + 1 - 1 - 0) + (0 + 4 - 1 - log 4)) = 1.30685;
    z = mu + sigma * eps = 1 + 2 * 0.5 = 2; latent 0 with r_w = 1, r_l = 0 is BT: softplus(-1) = 0.31326 and the KL
    term is 0; the KL weight rises linearly: 0.01 * 25 / 50 = 0.005."""
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    assert float(gaussian_kl(mu, logvar)[0]) == pytest.approx(0.5 * (1 + 3 - math.log(4)), abs=1e-5)
    assert float(reparameterise(torch.tensor([1.0]), torch.tensor([math.log(4.0)]), torch.tensor([0.5]))) == 2.0
    empty = torch.zeros(1, 0)
    loss, m = vpl_loss(torch.tensor([1.0]), torch.tensor([0.0]), empty, empty, kl_weight=5.0)
    assert float(loss) == pytest.approx(0.31326, abs=1e-5) and float(m["vpl/kl"]) == 0.0
    loss, _ = vpl_loss(torch.tensor([1.0]), torch.tensor([0.0]), mu, logvar, kl_weight=2.0)
    assert float(loss) == pytest.approx(0.31326 + 2 * 1.30685, abs=1e-4)
    assert kl_anneal(25, 0.01, 50) == pytest.approx(0.005) and kl_anneal(80, 0.01, 50) == 0.01


def test_vpl_model_shapes_and_clamped_mean():
    torch.manual_seed(0)
    model = VPLRewardModel(dim=4, hidden=8, latent=3)
    mu, logvar = model.posterior(100 * torch.randn(5, 2, 8))  # 5 users, 2 context pairs, [e_w; e_l]
    assert mu.shape == logvar.shape == (5, 3) and float(mu.detach().abs().max()) <= 1.0
    assert model.reward(torch.randn(5, 4), mu).shape == (5,)
    plain = VPLRewardModel(dim=4, latent=0)
    mu0, _ = plain.posterior(torch.randn(5, 2, 8))
    assert mu0.shape == (5, 0) and plain.reward(torch.randn(5, 4), mu0).shape == (5,)


def _vpl(reviews_task, tmp_path, latent: int, *extra: str) -> dict:
    cfg = vpl_config(reviews_task, tmp_path / f"vpl{latent}", "train.max_steps=300", f"vpl.latent={latent}", *extra)
    return train_vpl(cfg).eval


def test_vpl_is_more_accurate_per_user_than_plain_bt(reviews_task, tmp_path):
    """On the task's four attribute ratings (vpl.embedding=task_ratings), 300 steps of 64 pairs from the 300 user
    pairs: held-out accuracy averaged over the three users, VPL (latent 8, 4 context pairs) against the same decoder
    without a latent (plain BT). Measured here: 0.937 against 0.774; BT cannot please the fan and the critic at once
    (critic 0.62), VPL reads the critic from 4 of its pairs (1.0). On the 60-step SFT model's mean hidden state
    (32 wide) neither learns the users' order (BT 0.544, VPL 0.540 on these pairs; docs/vpl.md)."""
    bt = _vpl(reviews_task, tmp_path, 0, "vpl.embedding=task_ratings")
    vpl = _vpl(reviews_task, tmp_path, 8, "vpl.embedding=task_ratings")
    assert vpl["eval/accuracy"] > bt["eval/accuracy"] + 0.1, (bt, vpl)
    assert vpl["eval/accuracy/critic"] > bt["eval/accuracy/critic"], (bt, vpl)


def test_vpl_bad_rows_are_one_line_errors(reviews_task, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": PROMPT, "chosen": " a", "rejected": " b"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, row 1: field 'user' missing or not a string"):
        _vpl(reviews_task, tmp_path, 8, f"data.path={bad}")
    few = tmp_path / "few.jsonl"
    few.write_text(json.dumps({"prompt": PROMPT, "chosen": " a", "rejected": " b", "user": "fan"}) + "\n")
    with pytest.raises(DataError, match=r"user 'fan' has 1 pairs; vpl.context_pairs \+ 1 = 5 needed"):
        _vpl(reviews_task, tmp_path / "b", 8, f"data.path={few}")
