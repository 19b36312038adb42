import os

os.environ["HF_HUB_OFFLINE"] = "1"

import signal

# Python installs its KeyboardInterrupt handler only when SIGINT is not ignored at start-up, and a shell starts
# background jobs (and pytest-xdist its workers) with SIGINT ignored: install it, so the Ctrl-C tests see what a
# user's terminal gives a run.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: N processes share the cores, one torch thread each
    import torch

    torch.set_num_threads(1)

import pytest


@pytest.fixture(scope="session")
def reviews_task(tmp_path_factory):
    """The built-in reviews task with a 1-layer, 32-wide model (built once per test session)."""
    from tests.helpers import tiny_task

    return tiny_task(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="session")
def reviews_sft(reviews_task, tmp_path_factory):
    """The reviews task's 1-layer, 32-wide model after 60 SFT steps (lr 3e-3, 32 rows, constant schedule): the
    starting policy of the RL, preference and offline-RL learning tests. Returns its model directory."""
    from alignflow.config import SFTConfig, from_dict
    from alignflow.trainers.sft import train_sft

    out = tmp_path_factory.mktemp("reviews-sft")
    train_sft(
        from_dict(
            SFTConfig,
            {
                "model": {"name_or_path": str(reviews_task.model_dir), "tokenizer": str(reviews_task.tokenizer_dir)},
                "data": {"path": str(reviews_task.sft_path), "max_len": 64, "eval_fraction": 0.0},
                "optim": {"lr": 3e-3, "scheduler": "constant"},
                "train": {"output_dir": str(out), "batch_size": 32, "max_steps": 60, "progress": False},
            },
        )
    )
    return out / "model"
