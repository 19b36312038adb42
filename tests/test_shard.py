"""``shard()`` on 2 gloo ranks: fp32 and bf16 mixed precision give the gradients and the global grad norm of the
single-process fp32 step (fp32: to float rounding; bf16: to bf16 rounding); CPU offload is refused on a CPU model
(FSDP2 pins offloaded shards, which needs an accelerator) with a message naming the key."""

from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import run_ranks


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (1, 20), generator=g), [12, 8]


def _grads_on_rank(rank, world, mixed_precision, cpu_offload):
    """Rank r takes sequence r (padding-free, through the root unit), loss scaled by the world size as the roles do;
    returns the full gradients and the clipped global norm (rank 0)."""
    from torch.distributed.tensor import DTensor

    from alignflow.distributed.shard import shard, through_root
    from alignflow.models.logprobs import token_logprobs

    model = shard(_model(), mixed_precision=mixed_precision, cpu_offload=cpu_offload)
    ids, lens = _data()
    start = sum(lens[:rank])
    mine = ids[:, start : start + lens[rank]]
    lp, _ = through_root(model, lambda: token_logprobs(model, mine, seq_lens=[lens[rank]]))
    (lp.float().sum() * world).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    grads = {n: p.grad.full_tensor().float().tolist() for n, p in model.named_parameters()}  # plain lists: no
    return {"grads": grads, "norm": float(norm)} if rank == 0 else None  # shared-memory tensors across processes


@pytest.mark.parametrize("mixed_precision,cpu_offload,atol", [("none", False, 1e-5), ("bf16", False, 0.1)])
def test_sharded_step_matches_one_process(mixed_precision, cpu_offload, atol):
    from alignflow.models.logprobs import token_logprobs

    got = run_ranks(_grads_on_rank, 2, mixed_precision, cpu_offload)[0]
    model = _model()
    ids, lens = _data()
    token_logprobs(model, ids, seq_lens=lens)[0].sum().backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
    assert got["norm"] == pytest.approx(norm, rel=1e-5 if atol < 1e-3 else 2e-2)
    for n, p in model.named_parameters():
        scale = p.grad.abs().max().item() + 1e-6
        assert (torch.tensor(got["grads"][n]) - p.grad).abs().max().item() <= atol * scale, n


def _offload_on_cpu(rank, world):
    from alignflow.config import ConfigError
    from alignflow.distributed.shard import shard

    with pytest.raises(ConfigError, match="resources.cpu_offload"):
        shard(_model(), cpu_offload=True)
    return True


def test_cpu_offload_of_a_cpu_model_is_a_config_error():
    assert run_ranks(_offload_on_cpu, 2) == [True, True]
