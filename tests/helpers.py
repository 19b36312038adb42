"""Shared test fixtures' builders: a tiny built-in task on disk, built once per session."""

from pathlib import Path

from alignflow.config import TaskConfig
from alignflow.tasks import build_task


def tiny_task(root: Path, name: str = "reviews", **kw):
    cfg = TaskConfig(
        name=name,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        num_sft=kw.pop("num_sft", 400),
        num_pairs=kw.pop("num_pairs", 300),
        **kw,
    )
    return build_task(name, cfg, root / f"task-{name}")


def vpl_config(task, out: Path, *extra: str):
    """A VPLConfig training on the task's user pairs into ``out`` (one thread, no progress bar), ``extra`` overrides
    on top (steps, latent, embedding)."""
    from alignflow.config import VPLConfig, load_config

    paths = [f"model.name_or_path={task.model_dir}", f"model.tokenizer={task.tokenizer_dir}"]
    paths += [f"data.path={task.dir / 'user_pairs.jsonl'}", f"data.eval_path={task.dir / 'user_eval.jsonl'}"]
    return load_config(
        VPLConfig, None, [*paths, f"train.output_dir={out}", "train.progress=false", "train.num_threads=1", *extra]
    )


def token_table_llama(tok, hidden: int, head, positions: int = 64, rms_eps: float = 1e-6):
    """A one-layer Llama whose next-token logits depend on the current token only: attention and MLP outputs are
    zeroed, the embedding of token k is the one-hot e_k (``hidden`` >= the vocabulary), so the final hidden state
    is e_k scaled by the RMS norm (x / rms(x) = sqrt(hidden) e_k), and the untied head is ``head`` (V, hidden):
    logit[next] = sqrt(hidden) * head[next, k]. Used to give a judge hand-set answers or probabilities."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
        rms_norm_eps=rms_eps,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(len(tok), hidden))
        model.lm_head.weight.copy_(head)
    return model
