"""Model paths a new user gives (issue 11): a run directory instead of its model/, a directory without a tokenizer,
a LoRA output as the next stage's model, ``alignflow merge``, and one line instead of transformers' table of
newly initialised weights."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignflow.cli import main
from alignflow.config import ModelConfig, SFTConfig, from_dict
from alignflow.distributed.save import save_model
from alignflow.models.loading import ModelLoadError, load_causal_lm, load_reward_model, load_tokenizer


@pytest.fixture(scope="module")
def lora_sft(reviews_task, tmp_path_factory):
    """Two LoRA SFT steps on the reviews task; its model/ holds only the adapter (and the tokenizer)."""
    from alignflow.trainers.sft import train_sft

    out = tmp_path_factory.mktemp("lora-sft")
    train_sft(
        from_dict(
            SFTConfig,
            {
                "model": {
                    "name_or_path": str(reviews_task.model_dir),
                    "tokenizer": str(reviews_task.tokenizer_dir),
                    "lora": {"enabled": True, "r": 4, "alpha": 8},
                },
                "data": {"path": str(reviews_task.sft_path), "max_len": 32, "eval_fraction": 0.0},
                "optim": {"lr": 1e-2, "scheduler": "constant"},
                "train": {"output_dir": str(out), "batch_size": 8, "max_steps": 2, "progress": False},
            },
        )
    )
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 6, 7, 8, 9]])


def test_a_run_directory_names_its_model_dir(lora_sft):
    message = (
        f"{lora_sft} is a run directory, not a model: its model is in {lora_sft / 'model'}; use "
        f"model.name_or_path={lora_sft / 'model'}"
    )
    with pytest.raises(ModelLoadError, match="^" + message.replace(".", r"\.") + "$"):
        load_causal_lm(ModelConfig(name_or_path=str(lora_sft)))
    with pytest.raises(ModelLoadError, match=r"is a run directory, not a model"):
        load_tokenizer(str(lora_sft))


def test_a_directory_without_tokenizer_files_says_so(reviews_task):
    """The task's model/ has weights but no tokenizer; transformers' own error talks about sentencepiece."""
    with pytest.raises(
        ModelLoadError,
        match=rf"^no tokenizer in {reviews_task.model_dir}: it has none of "
        r"tokenizer\.json, .*; set model\.tokenizer to",
    ):
        load_tokenizer(str(reviews_task.model_dir))


def test_a_lora_output_loads_as_base_plus_merged_adapter(lora_sft, reviews_task):
    """The merged model computes what the peft model computes (W + B A scaled, folded into W)."""
    from peft import PeftModel

    adapter = lora_sft / "model"
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(reviews_task.model_dir), adapter)
    merged = load_causal_lm(ModelConfig(name_or_path=str(adapter)))
    assert not hasattr(merged, "peft_config") and all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(logits(merged, IDS), logits(peft_model, IDS), rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(reviews_task.model_dir)
    assert not torch.allclose(logits(base, IDS), logits(merged, IDS))  # the adapter changed something
    assert load_tokenizer(str(adapter)).vocab_size == load_tokenizer(str(reviews_task.tokenizer_dir)).vocab_size


@pytest.mark.parametrize("lora", [False, True])
def test_the_next_stage_trains_from_a_lora_output(lora_sft, reviews_task, tmp_path, lora):
    """Before: 'optimizer got an empty parameter list' (transformers loaded the adapter frozen)."""
    from alignflow.trainers.sft import train_sft

    result = train_sft(
        from_dict(
            SFTConfig,
            {
                "model": {"name_or_path": str(lora_sft / "model"), "lora": {"enabled": lora, "r": 4}},
                "data": {"path": str(reviews_task.sft_path), "max_len": 32, "eval_fraction": 0.0},
                "train": {"output_dir": str(tmp_path), "batch_size": 8, "max_steps": 1, "progress": False},
            },
        )
    )
    assert (tmp_path / "model").is_dir() and result is not None


def test_alignflow_merge_writes_a_plain_model(lora_sft, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", f"adapter={lora_sft / 'model'}", f"output={out}"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)  # no peft needed to read it
    torch.testing.assert_close(
        logits(plain, IDS), logits(load_causal_lm(ModelConfig(name_or_path=str(lora_sft / "model"))), IDS)
    )
    assert (out / "tokenizer.json").exists()
    assert main(["merge", f"adapter={tmp_path}", f"output={tmp_path / 'x'}"]) == 2
    assert "has no adapter_config.json, so it is not a LoRA adapter directory" in capsys.readouterr().err


def test_a_reward_model_adapter_keeps_its_trained_head(reviews_task, tmp_path):
    cfg = ModelConfig(name_or_path=str(reviews_task.model_dir))
    cfg.lora.enabled = True
    rm = load_reward_model(cfg, num_labels=3, seed=0, pad_token_id=0)
    head = rm.base_model.model.score.modules_to_save["default"].weight
    with torch.no_grad():
        head.add_(1.0)  # "training"
    save_model(rm, load_tokenizer(str(reviews_task.tokenizer_dir)), tmp_path / "rm")
    loaded = load_reward_model(ModelConfig(name_or_path=str(tmp_path / "rm")), seed=5, pad_token_id=0)
    torch.testing.assert_close(loaded.score.weight, head.detach())  # 3 rows, kept, not re-seeded


def test_a_new_head_is_one_line_not_a_table(reviews_task, caplog, capfd):
    with caplog.at_level(logging.INFO, logger="alignflow.models.loading"):
        load_reward_model(ModelConfig(name_or_path=str(reviews_task.model_dir)), num_labels=2, seed=0, pad_token_id=0)
    lines = [r.getMessage() for r in caplog.records if "new score head" in r.getMessage()]
    assert lines == [
        f"reward model: new score head (2 x 32) on {reviews_task.model_dir}, row i seeded from seed "
        "0 + i; every other weight comes from the checkpoint"
    ]
    assert "LOAD REPORT" not in capfd.readouterr().err
