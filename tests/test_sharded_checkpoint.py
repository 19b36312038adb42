"""Sharded checkpoints (FSDP2 + torch.distributed.checkpoint) on 2 gloo ranks: resharding 2 -> 1 -> 2, atomicity, the
one-process layout into a sharded model, and the consolidated Hugging Face export.

Spawning ranks costs seconds here, so there is one spawn (2 ranks) and the world-1 parts run in this process
(``single_rank_group``). A tiny Llama (tied and untied embeddings) trains one step with AdamW on 1 rank; its full
weights, optimiser state and scheduler are the reference every load is compared with, exactly: 1 rank -> one
process without a group -> 2 ranks -> 1 rank again, and the one-process layout -> 2 ranks. The 2 ranks also record
the logits, export the model, and try a save that fails on rank 0 only.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from alignflow.config import OptimConfig
from alignflow.distributed.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignflow.trainers.loop import build_optimizer, build_scheduler
from tests.dist_helpers import run_ranks, single_rank_group

OPTIM = OptimConfig(lr=1e-2, warmup_ratio=0.5)
TIES = (True, False)


# ----------------------------------------------------------------------------------------------- building blocks
def _model(tie: bool, seed: int, sharded: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg)
    if sharded:
        from alignflow.distributed.shard import shard

        shard(model)
    opt = build_optimizer(model, OPTIM)
    return model, opt, build_scheduler(opt, OPTIM, total_steps=10)


def _train_step(model, opt, sched) -> None:
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(7))  # the same batch on every rank
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _snapshot(model, opt, sched) -> tuple[dict, dict]:
    """Full (gathered) tensors of model + optimiser, and the non-tensor values (param groups, scheduler)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    )
    flat = {f"model.{k}": v for k, v in msd.items()} | {f"optim.{k}": v for k, v in osd.items()}
    tensors = {k: v.detach().clone().contiguous() for k, v in flat.items() if torch.is_tensor(v)}
    plain = {k: v for k, v in flat.items() if not torch.is_tensor(v)}
    plain["scheduler"] = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    return tensors, json.loads(json.dumps(plain))


def _assert_same_state(model, opt, sched, ref_dir) -> None:
    tensors, plain = _snapshot(model, opt, sched)
    ref = load_file(str(ref_dir / "ref.safetensors"))
    assert set(tensors) == set(ref)
    for k, v in tensors.items():
        assert torch.equal(v, ref[k]), k
    assert plain == json.loads((ref_dir / "ref.json").read_text())
    assert any(k.endswith("exp_avg_sq") for k in tensors) and opt.state  # the optimiser state is non-trivial


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0} | {f"w{i}": i for i in range(1, 64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


IDS = torch.arange(20).remainder(64).view(2, 10)


# ----------------------------------------------------------------------------------------------- the chain
def _save_on_one(root):
    """In this process, world 1: train one step sharded, save; then a plain model (no process group) loads that
    and saves the one-process layout."""
    for tie in TIES:
        d = root / f"tie{int(tie)}"
        with single_rank_group():
            model, opt, sched = _model(tie, seed=0, sharded=True)
            _train_step(model, opt, sched)
            save_checkpoint(d / "one" / "checkpoints" / "step-1", model, opt, sched, {"step": 1})
            tensors, plain = _snapshot(model, opt, sched)
        save_file(tensors, str(d / "ref.safetensors"))
        (d / "ref.json").write_text(json.dumps(plain))
        model, opt, sched = _model(tie, seed=3, sharded=False)  # other init: everything must come from disk
        assert load_checkpoint(d / "one" / "checkpoints" / "step-1", model, opt, sched)["step"] == 1
        _assert_same_state(model, opt, sched, d)
        save_checkpoint(d / "plain" / "checkpoints" / "step-1", model, opt, sched, {"step": 1})


def _on_two(rank, world, root):
    """2 ranks: load the plain and the 1-rank checkpoints, save on 2, export, then a save that fails on rank 0."""
    from alignflow.distributed.save import save_model

    out = {"draws": [], "errors": {}}
    for tie in TIES:
        d = root / f"tie{int(tie)}"
        model, opt, sched = _model(tie, seed=2, sharded=True)
        assert load_checkpoint(d / "plain" / "checkpoints" / "step-1", model, opt, sched)["step"] == 1
        _assert_same_state(model, opt, sched, d)
        model, opt, sched = _model(tie, seed=1, sharded=True)
        assert load_checkpoint(latest_checkpoint(d / "one"), model, opt, sched)["step"] == 1
        out["draws"].append(torch.rand(1).item())  # the RNG as restored (rank 1 had none saved)
        _assert_same_state(model, opt, sched, d)
        save_checkpoint(d / "two" / "checkpoints" / "step-1", model, opt, sched, {"step": 1})
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=IDS).logits  # collective forward: both ranks
        if rank == 0:
            save_file({"logits": logits}, str(d / "logits.safetensors"))
        save_model(model, _tokenizer(), d / "export")
        try:  # state that is not JSON: rank 0 fails after every rank wrote its shards
            save_checkpoint(d / "two" / "checkpoints" / "step-2", model, opt, sched, {"step": 2, "bad": object()})
            out["errors"][tie] = None
        except Exception as e:  # noqa: BLE001 -- the test checks what each rank raised
            out["errors"][tie] = f"{type(e).__name__}: {e}"
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """save on 1 rank -> load in one process without a group -> save (one-process layout); both -> load on 2 ranks
    -> save on 2 (-> loaded on 1 rank again by the reshard test). Every load is checked against the full state."""
    root = tmp_path_factory.mktemp("sharded")
    _save_on_one(root)
    return root, run_ranks(_on_two, 2, root)


# ----------------------------------------------------------------------------------------------- tests
def test_reshard_one_to_two_to_one(chain):
    root, outs = chain
    for i, tie in enumerate(TIES):
        d = root / f"tie{int(tie)}"
        with single_rank_group():
            model, opt, sched = _model(tie, seed=4, sharded=True)
            assert load_checkpoint(d / "two" / "checkpoints" / "step-1", model, opt, sched)["step"] == 1
            _assert_same_state(model, opt, sched, d)
        model, opt, sched = _model(tie, seed=5, sharded=False)
        load_checkpoint(d / "two" / "checkpoints" / "step-1", model, opt, sched)
        _assert_same_state(model, opt, sched, d)
        # RNG: rank 0 continues rank 0's saved stream; rank 1 (none saved on 1 rank) gets a stream of its own
        gen = torch.Generator()
        gen.set_state(load_file(str(d / "one" / "checkpoints" / "step-1" / "rng" / "rank-0.safetensors"))["torch"])
        assert outs[0]["draws"][i] == torch.rand(1, generator=gen).item() != outs[1]["draws"][i]


def test_files_are_safetensors_and_json_one_shard_per_rank(chain):
    root, _ = chain
    step = root / "tie1" / "two" / "checkpoints" / "step-1"
    files = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file())
    assert files == [
        "nontensor.json",
        "rng/rank-0.safetensors",
        "rng/rank-1.safetensors",
        "sharded/shard-00001-model-00001-of-00001.safetensors",
        "sharded/shard-00002-model-00001-of-00001.safetensors",
        "trainer_state.json",
    ]
    # the tied output embedding is stored once (under its source name), its optimiser state too
    keys = set().union(*(load_file(str(f)).keys() for f in (step / "sharded").iterdir()))
    assert "model.model.embed_tokens.weight" in keys and not any("lm_head" in k for k in keys)


def test_failed_save_leaves_previous_checkpoint_latest(chain):
    root, outs = chain
    for tie in TIES:
        assert "not JSON serializable" in outs[0]["errors"][tie]  # rank 0's own error
        assert "failed on rank(s) [0]" in outs[1]["errors"][tie]  # rank 1 learns of it and raises too
        ckpts = root / f"tie{int(tie)}" / "two" / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-1"]  # no step-2, no step-2.tmp
        assert latest_checkpoint(ckpts.parent).name == "step-1"


@pytest.mark.parametrize("tie", TIES)
def test_export_hf_loads_and_matches_logits(chain, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = chain
    d = root / f"tie{int(tie)}"
    config = json.loads((d / "export" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is tie
    stored = load_file(str(d / "export" / "model.safetensors"))
    assert ("lm_head.weight" in stored) is not tie  # a tied head is stored once, as the input embedding

    model = AutoModelForCausalLM.from_pretrained(d / "export").eval()
    ref = load_file(str(d / "ref.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[f"model.{k}"]), k
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tie
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    torch.testing.assert_close(logits, load_file(str(d / "logits.safetensors"))["logits"], rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(d / "export")("w5 w7")["input_ids"] == [5, 7]


def _lora(seed: int, sharded: bool):
    from peft import LoraConfig, get_peft_model

    model, _, _ = _model(True, seed=0, sharded=False)  # the same frozen base every time
    torch.manual_seed(seed)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )  # random A and B: seed-dependent
    if sharded:
        from alignflow.distributed.shard import shard

        shard(model)
    opt = build_optimizer(model, OPTIM)
    return model, opt, build_scheduler(opt, OPTIM, total_steps=10)


def test_lora_sharded_checkpoint_and_export_hold_the_adapters(tmp_path):
    """LoRA on a sharded model: the checkpoint stores the adapters (and their optimiser state) only -- not the
    frozen base, not the frozen tied head -- and reloads them; the export is a peft adapter directory."""
    from peft import PeftModel

    from alignflow.distributed.save import save_model

    with single_rank_group():
        model, opt, sched = _lora(seed=1, sharded=True)
        _train_step(model, opt, sched)
        save_checkpoint(tmp_path / "step-1", model, opt, sched, {"step": 1})
        save_model(model, None, tmp_path / "export")
        with torch.no_grad():
            logits = model.eval()(input_ids=IDS).logits
        model2, opt2, sched2 = _lora(seed=2, sharded=True)
        load_checkpoint(tmp_path / "step-1", model2, opt2, sched2)
        before, after = _snapshot(model, opt, sched)[0], _snapshot(model2, opt2, sched2)[0]
        assert before.keys() == after.keys() and [k for k in before if not torch.equal(before[k], after[k])] == []
    keys = set(load_file(str(next((tmp_path / "step-1" / "sharded").iterdir()))))
    assert keys and all("lora_" in k for k in keys), sorted(keys)[:3]
    assert sorted(p.name for p in (tmp_path / "export").iterdir() if p.suffix != ".md") == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base, _, _ = _model(True, seed=0, sharded=False)
    with torch.no_grad():
        exported = PeftModel.from_pretrained(base, tmp_path / "export").eval()(input_ids=IDS).logits
    torch.testing.assert_close(exported, logits, rtol=1e-5, atol=1e-5)


def _fail_on_one(rank, world):
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank one broke")
    dist.barrier()  # rank 0 waits for a rank that is gone: it fails in turn, or run_ranks stops it


def test_run_ranks_reports_the_failing_rank():
    from tests.dist_helpers import RankFailed

    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2 raised.*_fail_on_one.*ValueError: rank one broke"):
        run_ranks(_fail_on_one, 2, timeout=60)
