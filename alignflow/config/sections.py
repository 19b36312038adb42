"""Config sections several commands share: the model, data, optimiser, training loop, built-in task, rollout,
reward sources (rule, model, remote, judge), hub, Ray and placement sections."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import check_betas, check_device, check_micro_batch_tokens, field


# ----------------------------------------------------------------------------------------------- sections
@dataclasses.dataclass
class LoraConfig:
    enabled: bool = field(False, doc="Train LoRA adapters (peft) instead of all weights.")
    r: int = field(16, doc="LoRA rank.", range=(1, None))
    alpha: int = field(32, doc="LoRA scaling numerator (alpha / r scales the update).", range=(1, None))
    dropout: float = field(0.0, doc="Dropout on the LoRA input.", range=(0.0, 1.0))
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        doc="Module names that get adapters ('all-linear' as one item for every linear layer).",
    )


@dataclasses.dataclass
class ModelConfig:
    name_or_path: str = field(
        "",
        doc="Hugging Face hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or local directory. "
        "Empty: use the built-in task's tiny model; builtin:sft: the built-in task's SFT model (built on first use).",
    )
    tokenizer: str = field("", doc="Tokenizer path or hub id; empty means the same as name_or_path.")
    dtype: str = field(
        "float32", doc="Parameter dtype for loading.", choices=("float32", "bfloat16", "float16", "auto")
    )
    attn_implementation: str = field(
        "sdpa", doc="Attention kernel passed to transformers.", choices=("sdpa", "eager", "flash_attention_2")
    )
    gradient_checkpointing: bool = field(False, doc="Recompute activations in backward to save memory.")
    trust_remote_code: bool = field(False, doc="Allow model code from the hub repository (off unless you trust it).")
    revision: str = field("main", doc="Hub revision (branch, tag or commit).")
    lora: LoraConfig = field(default_factory=LoraConfig, doc="LoRA adapters.")


@dataclasses.dataclass
class DataConfig:
    path: str = field(
        "",
        doc="Training data: .jsonl/.json/.parquet/.csv file, a save_to_disk directory, or a hub "
        "dataset id. Empty: generate the built-in task's data.",
    )
    split: str = field("train", doc="Split name for datasets that have splits.")
    format: str = field(
        "auto",
        doc="Row format; 'auto' infers it from the fields of the first row.",
        choices=("auto", "lm", "prompt", "prompt_completion", "preference", "ranked", "unpaired", "rated"),
    )
    eval_path: str = field("", doc="Held-out data; empty means hold out eval_fraction of the training rows.")
    eval_fraction: float = field(
        0.05, doc="Fraction of rows held out for evaluation when eval_path is empty.", range=(0.0, 0.5)
    )
    max_prompt_len: int = field(
        256, doc="Prompt tokens kept (the LEFT end is cut: the most recent turns survive).", range=(1, None)
    )
    max_len: int = field(512, doc="Total tokens kept per sequence (the response's right end is cut).", range=(2, None))
    on_bad_row: str = field(
        "error",
        doc="What to do with a malformed row: stop with a report, or skip it and report the count and first examples.",
        choices=("error", "skip"),
    )
    completion_only: bool = field(True, doc="SFT: loss on response tokens only (prompt tokens masked).")
    chat_template: str = field(
        "",
        doc="Chat template for conversational rows: a Jinja template, or the path of a "
        "file holding one; it replaces the tokenizer's (and is saved with the "
        "model). Empty: the tokenizer's own.",
    )


@dataclasses.dataclass
class OptimConfig:
    lr: float = field(1e-5, doc="Peak learning rate.", range=(0.0, None))
    weight_decay: float = field(0.0, doc="AdamW decoupled weight decay.", range=(0.0, None))
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999], doc="AdamW (beta1, beta2), each in [0, 1).", check=check_betas
    )
    eps: float = field(1e-8, doc="AdamW epsilon.", range=(0.0, None))
    scheduler: str = field(
        "cosine", doc="Learning-rate schedule after warm-up.", choices=("constant", "linear", "cosine")
    )
    warmup_ratio: float = field(0.0, doc="Fraction of total steps spent warming up linearly from 0.", range=(0.0, 1.0))
    min_lr_ratio: float = field(0.0, doc="Final learning rate as a fraction of lr (cosine/linear).", range=(0.0, 1.0))
    max_grad_norm: float = field(
        1.0, doc="Clip the global gradient norm to this; 0 disables clipping.", range=(0.0, None)
    )


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = field("runs/run", doc="Run directory: checkpoints, metrics.jsonl, report.")
    seed: int = field(0, doc="Seed for data order, initialisation and sampling.")
    batch_size: int = field(
        32, doc="Rows (sequences or pairs) per optimiser step: the algorithmic batch size.", range=(1, None)
    )
    micro_batch_tokens: int = field(
        0,
        doc="Token budget of one forward/backward pass (performance knob only; "
        "the loss does not depend on it). 0 picks one for the device: 8192 "
        "on a CPU, 16384 on a GPU.",
        check=check_micro_batch_tokens,
    )
    epochs: float = field(1.0, doc="Passes over the training data (used when max_steps is 0).", range=(0.0, None))
    max_steps: int = field(0, doc="Optimiser steps; 0 means derive from epochs.", range=(0, None))
    packing: bool = field(
        True,
        doc="Pack several sequences into padding-free rows (laid end to end, attention "
        "per sequence: no pad token, no mask; models without that support get them "
        "padded); False pads length-sorted micro-batches. Same loss either way.",
    )
    mixed_precision: str = field(
        "auto",
        doc="Autocast dtype: auto = bf16 on a CUDA device that supports it, else none.",
        choices=("auto", "none", "bf16", "fp16"),
    )
    device: str = field("auto", doc="Device: auto = cuda when available, else cpu.", check=check_device)
    log_every: int = field(10, doc="Log metrics every N optimiser steps.", range=(1, None))
    eval_every: int = field(0, doc="Evaluate every N steps; 0 evaluates at the end only.", range=(0, None))
    save_every: int = field(
        500,
        doc="Checkpoint (checkpoints/step-N) every N steps and after the last step; 0 "
        "saves after the last step only. Ctrl-C also checkpoints.",
        range=(0, None),
    )
    save_total_limit: int = field(
        0,
        doc="Keep only the newest N checkpoints (older ones are deleted after each save); 0 keeps all.",
        range=(0, None),
    )
    resume: bool = field(False, doc="Resume from the latest checkpoint in output_dir when there is one.")
    overwrite: bool = field(
        False,
        doc="Let this run replace an earlier run's results in output_dir (model/, "
        "metrics.jsonl, checkpoints/); without it such a directory is refused "
        "unless resume finds a checkpoint to go on from.",
    )
    on_nonfinite: str = field(
        "error", doc="Non-finite loss or gradient: stop with a diagnostic, or skip the step.", choices=("error", "skip")
    )
    progress: bool = field(True, doc="Show a progress bar.")
    num_threads: int = field(0, doc="torch CPU threads; 0 keeps torch's default.", range=(0, None))
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        doc="Experiment trackers fed with the logged metrics: tensorboard, wandb, mlflow (any of "
        "them; [] for metrics.jsonl only). wandb and mlflow are the extras "
        "alignflow[wandb] / alignflow[mlflow].",
    )


@dataclasses.dataclass
class TaskConfig:
    name: str = field(
        "reviews",
        doc="Built-in task used when model/data paths are empty (calculator: multi-turn with a tool, see env.task).",
        choices=("reviews", "arithmetic", "calculator", "code", "bandit"),
    )
    seed: int = field(0, doc="Seed for the task's grammar, data and model initialisation.")
    num_sft: int = field(4000, doc="Rows of SFT corpus generated.", range=(1, None))
    num_pairs: int = field(2000, doc="Preference pairs generated.", range=(1, None))
    label_noise: float = field(
        1.0,
        doc="Bradley-Terry temperature of preference labels (higher = noisier; 0 = "
        "always pick the higher gold reward).",
        range=(0.0, None),
    )
    hidden_size: int = field(128, doc="Tiny Llama hidden size.", range=(8, None))
    num_layers: int = field(2, doc="Tiny Llama layers.", range=(1, None))
    num_heads: int = field(4, doc="Tiny Llama attention heads.", range=(1, None))
    intermediate_size: int = field(512, doc="Tiny Llama MLP width.", range=(8, None))
    max_operand: int = field(
        0,
        doc="arithmetic: largest operand of + and - and of the first factor of * (the second "
        "is at most 9); 0 = 99. 9 (255 problems) is a range the tiny model learns. "
        "calculator: operands with its digit count up to it (99: 10..99); 0 = 6 digits.",
        range=(0, None),
    )
    sft_steps: int = field(
        0,
        doc="model.name_or_path=builtin:sft: SFT steps of the task's tiny model (built once, "
        "cached beside the run directory); 0 = the task's own default.",
        range=(0, None),
    )


@dataclasses.dataclass
class RewardConfig:
    loss: str = field(
        "bt",
        doc="Reward loss: Bradley-Terry on pairs, or regression on rated attributes.",
        choices=("bt", "regression"),
    )
    use_margin: bool = field(True, doc="Subtract the row's 'margin' inside the BT sigmoid (Llama 2) when present.")
    num_objectives: int = field(
        1,
        doc="Attributes scored (multi-objective head, ArmoRM stage 1): 1 = as many as the "
        "rated data has; more needs rated data with that many attributes.",
        range=(1, None),
    )
    gating: bool = field(False, doc="Learn a prompt-conditioned gate over objectives (ArmoRM stage 2).")
    ensemble_size: int = field(1, doc="k reward models trained from different seeds (Coste et al.).", range=(1, None))
    ensemble_mode: str = field(
        "heads",
        doc="'heads': k independently seeded heads on one backbone; 'models': k independent models.",
        choices=("heads", "models"),
    )
    aggregation: str = field(
        "mean",
        doc="How ensemble scores combine: mean, worst-case (min), uncertainty-weighted (mean - lambda * variance).",
        choices=("mean", "min", "uwo"),
    )
    uwo_lambda: float = field(0.5, doc="Variance weight of the uncertainty-weighted aggregation.", range=(0.0, None))


@dataclasses.dataclass
class HubConfig:
    push: bool = field(
        False,
        doc="Upload the run's final model/ directory to the Hub when the run ends (token from "
        "HF_TOKEN or `huggingface-cli login`).",
    )
    repo_id: str = field("", doc="Hub repository, e.g. my-name/my-model (created when missing); needed with push.")
    private: bool = field(False, doc="Create the repository as private.")
    revision: str = field("", doc="Branch to upload to; empty: the repository's default branch.")


@dataclasses.dataclass
class RolloutConfig:
    prompts_per_step: int = field(
        16, doc="Prompts per RL step; the rollout batch is prompts_per_step * n rows.", range=(1, None)
    )
    n: int = field(4, doc="Samples per prompt (the group size G of GRPO/RLOO/DAPO).", range=(1, None))
    temperature: float = field(
        1.0, doc="Sampling temperature; log-probs for training use the same temperature.", range=(1e-6, None)
    )
    top_p: float = field(1.0, doc="Nucleus sampling mass (1 disables).", range=(1e-6, 1.0))
    top_k: int = field(0, doc="Top-k sampling (0 disables).", range=(0, None))
    max_new_tokens: int = field(
        64, doc="Generation budget per response (L_max of DAPO, L of Dr. GRPO).", range=(1, None)
    )
    stop_strings: list[str] = field(default_factory=list, doc="Strings that end a response (besides EOS).")
    eval_prompts: int = field(
        64,
        doc="Held-out prompts decoded greedily at each evaluation (eval/reward_mean); 0 disables evaluation.",
        range=(0, None),
    )
    backend: str = field(
        "builtin",
        doc="Rollout engine: builtin (HFEngine on the actor's weights in place, CPU or "
        "GPU) or vllm (GPU only, pip install 'alignflow[vllm]'; the actor's weights "
        "are pushed to it before each generation). See docs/vllm.md.",
        choices=("builtin", "vllm"),
    )
    gpu_memory_utilization: float = field(
        0.5,
        doc="backend=vllm: fraction of the GPU's memory vLLM may take for its "
        "weights and KV cache (leave room for training when colocated).",
        range=(0.01, 1.0),
    )
    tensor_parallel_size: int = field(
        1, doc="backend=vllm: GPUs per vLLM engine (tensor parallelism).", range=(1, None)
    )
    enable_sleep_mode: bool = field(
        True,
        doc="backend=vllm: release the engine's GPU memory (weights and KV cache) "
        "after each generation, while the actor trains.",
    )
    enable_prefix_caching: bool = field(
        True,
        doc="backend=vllm: vLLM's automatic prefix caching: a request reuses the KV blocks of an earlier "
        "request's matching prefix (the samples of one prompt; each turn of a multi-turn episode reuses the "
        "conversation so far).",
    )
    max_model_len: int = field(
        0,
        doc="backend=vllm: longest prompt + response (tokens) the engine plans its KV cache "
        "for; 0 = the model config's maximum.",
        range=(0, None),
    )
    dtype: str = field(
        "bfloat16",
        doc="backend=vllm: dtype of the engine's weights and activations (auto = the model config's).",
        choices=("auto", "bfloat16", "float16", "float32"),
    )


@dataclasses.dataclass
class RemoteRewardConfig:
    """A reward served over HTTP (docs/remote_rewards.md): POST {"prompts": [...], "responses": [...]} ->
    {"rewards": [...]}, one finite number per row."""

    url: str = field(
        "", doc="Endpoint URL, e.g. http://127.0.0.1:8000/score (alignflow serve); empty: no remote reward."
    )
    weight: float = field(1.0, doc="Weight of the remote reward term.")
    batch_size: int = field(64, doc="Rows per request.", range=(1, None))
    timeout_s: float = field(
        30.0,
        doc="Seconds allowed per request (connecting, sending and reading the whole reply); past it the attempt fails.",
        range=(1e-3, None),
    )
    retries: int = field(
        2,
        doc="Further attempts after a connection error, a timeout or a 5xx/429 reply (a "
        "malformed reply is never retried).",
        range=(0, None),
    )
    fields: list[str] = field(
        default_factory=list,
        doc="Row fields sent with each batch, one list per field "
        "(e.g. [reference] for a served preference model or "
        "pairwise judge).",
    )


@dataclasses.dataclass
class JudgeConfig:
    """An LLM judge as a reward (docs/judges.md): a local causal LM (model) or an OpenAI-compatible endpoint (url)."""

    model: str = field("", doc="Local judge: causal-LM directory or hub id, generating through the rollout engine.")
    backend: str = field(
        "hf",
        doc="Local judge: hf generates with alignflow's engine over the Hugging Face model; vllm loads the "
        "model into its own vLLM engine (pip install 'alignflow[vllm]').",
        choices=("hf", "vllm"),
    )
    gpu_memory_utilization: float = field(
        0.3, doc="backend=vllm: the judge engine's share of GPU memory.", range=(1e-3, 1.0)
    )
    dtype: str = field(
        "bfloat16",
        doc="backend=vllm: the judge engine's weights dtype.",
        choices=("bfloat16", "float16", "float32", "auto"),
    )
    url: str = field("", doc="Endpoint judge: OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
    endpoint_model: str = field("", doc="Model name sent to the endpoint; its key is read from $OPENAI_API_KEY.")
    template: str = field(
        "pointwise",
        doc="pointwise: Score 1-10 -> (N-1)/9; pairwise: Verdict A/B against the "
        "row's anchor_field; principle: Answer Yes/No per principle (RLBFF).",
        choices=("pointwise", "pairwise", "principle"),
    )
    principles: list[str] = field(
        default_factory=list,
        doc="template=principle: the principles (a row's 'principles' or 'principle' field replaces them).",
    )
    anchor_field: str = field("reference", doc="template=pairwise: the row field holding the response to beat.")
    both_orders: bool = field(True, doc="template=pairwise: judge (response, anchor) and (anchor, response).")
    weight: float = field(1.0, doc="Weight of the judge term.")
    max_new_tokens: int = field(256, doc="Most tokens of a judge's answer.", range=(1, None))
    batch_size: int = field(32, doc="Questions per backend call.", range=(1, None))
    on_parse_failure: str = field(
        "error",
        doc="No verdict after the retries: error stops the run naming the row; "
        "fallback scores the verdict judge.fallback (counted in "
        "reward/errors).",
        choices=("error", "fallback"),
    )
    fallback: float = field(0.0, doc="Value of an unparsed verdict with on_parse_failure=fallback.")
    parse_retries: int = field(0, doc="Times an unparsed question is asked again, sampled.", range=(0, None))
    retry_temperature: float = field(0.7, doc="Sampling temperature of those retries.", range=(0.0, None))
    timeout_s: float = field(60.0, doc="Endpoint: seconds per request attempt.", range=(1e-3, None))
    retries: int = field(2, doc="Endpoint: further attempts after a connection error, timeout or 5xx.", range=(0, None))
    question: str = field(
        "",
        doc="The judge's question in place of the template's own: {prompt}, {response} (pointwise, principle), "
        "{a}, {b} (pairwise), {principle}, {lo}, {hi}; e.g. '{prompt}{a} {prompt}{b}' for the reviews judge.",
    )
    chat_template: bool = field(
        True, doc="Local judge: render the question with its tokenizer's chat template (false: as plain text)."
    )
    verdict: str = field(
        "text",
        doc="text: parse the verdict line of the judge's answer; logprob (local judge): p_k = softmax of lk, the "
        "log-probability of verdict_words[k] after the question; the value is p_1 (pairwise: first wins; "
        "principle: yes) or the expected score sum_k p_k k/(K-1) (pointwise, words from lowest to highest).",
        choices=("text", "logprob"),
    )
    verdict_words: list[str] = field(
        default_factory=list,
        doc="verdict=logprob: the continuations scored; empty: the template's own (Verdict: A / B; Answer: Yes / "
        "No; Score: 1 .. Score: 10).",
    )


@dataclasses.dataclass
class PairwiseRewardConfig:
    """Pairwise RLHF (docs/pairwise_rlhf.md): each sample compared with the others of its group, or with an
    anchor response, by a pairwise preference model (alignflow pm) or by the pairwise LLM judge of reward.judge."""

    model: str = field("", doc="Pairwise preference-model directory written by alignflow pm; empty: no model.")
    judge: bool = field(
        False,
        doc="Compare with reward.judge (template pairwise) instead of a preference model; the judge then "
        "gives no pointwise term of its own.",
    )
    anchor: str = field(
        "group",
        doc="group: P[i, j] between the samples of a prompt, value = win rate; reference: P(y > anchor) with "
        "the row field anchor_field; greedy: P(y > anchor) with the current policy's greedy response.",
        choices=("group", "reference", "greedy"),
    )
    anchor_field: str = field("reference", doc="anchor=reference: the row field holding the anchor response.")
    center: bool = field(
        False, doc="anchor=reference/greedy, algo.advantage=pairwise: advantage p - mean_group(p), not p - 1/2."
    )
    normalize: bool = field(
        False,
        doc="anchor=group, algo.advantage=pairwise: Think-RM's scale, (1/G) sum_j d_ij / RMS of the margins "
        "d = P - 1/2 (GRPO's z-score when d_ij = r_i - r_j), instead of the raw win rate - 1/2.",
    )
    weight: float = field(1.0, doc="Weight of the pairwise term (the win rate, or P(y > anchor)) in the reward.")


@dataclasses.dataclass
class Seq2SeqRewardConfig:
    """A seq2seq reward model (docs/seq2seq_rm.md): a causal LM rewrites each response; token rewards from the
    edit alignment of the response with the rewrite, placed on the response's tokens."""

    model: str = field("", doc="Rewriter: causal-LM directory (e.g. alignflow sft on rewrite data); empty: off.")
    template: str = field(
        "{prompt} {response} {prompt}",
        doc="The rewriter's input; {prompt} and {response} are filled in, its greedy continuation is the rewrite.",
    )
    max_new_tokens: int = field(64, doc="Most tokens of a rewrite.", range=(1, None))
    keep: float = field(0.0, doc="Reward of a response token the rewrite keeps.")
    delete: float = field(-1.0, doc="Reward of a token the rewrite drops.")
    replace: float = field(-1.0, doc="Reward of a token the rewrite replaces.")
    insert: float = field(-0.5, doc="Added to the token before a place where the rewrite inserts tokens.")
    weight: float = field(1.0, doc="Weight of the seq2seq term (on every token reward).")


@dataclasses.dataclass
class DiversityRewardConfig:
    """QDHF inside RL (docs/qdhf.md): a bonus for samples whose learned QDHF descriptor is new."""

    descriptor: str = field(
        "",
        doc="A finished alignflow qdhf run directory (its descriptor.json), or builtin:qdhf (fitted on the built-in "
        "reviews task on first use, cached beside the run like builtin:sft); empty: no diversity term.",
    )
    mode: str = field(
        "group",
        doc="group: mean descriptor distance to the other samples of the prompt (archive widths); archive: 1 when "
        "the sample's MAP-Elites cell was empty so far in the run, else 0.",
        choices=("group", "archive"),
    )
    weight: float = field(1.0, doc="Weight of the diversity term in the reward (0: measured and logged only).")


@dataclasses.dataclass
class VPLRewardConfig:
    """A VPL reward model (alignflow vpl; docs/vpl.md): r(e(x, y), z_u), z_u inferred from a few of user u's labelled
    pairs; a row's user is its prompt row's user field."""

    model: str = field("", doc="Directory of an alignflow vpl run (vpl.json, vpl.safetensors); empty: off.")
    context: str = field(
        "", doc="User pairs (prompt, chosen, rejected, user) the latents are inferred from; empty: the run's pairs."
    )
    context_pairs: int = field(
        0,
        doc="Pairs per user read (the user's first ones in the file); 0: as many as the model was trained with.",
        range=(0, None),
    )
    user_field: str = field("user", doc="The prompt rows' field naming each row's user.")
    weight: float = field(1.0, doc="Weight of the VPL term (each user's part, vpl_<user>, carries it).")


@dataclasses.dataclass
class RewardSourceConfig:
    """Reward sources, summed with weights: R = sum_j w_j * r_j."""

    task: dict[str, float] = field(
        default_factory=dict,
        doc="Built-in task rewards by name -> weight, e.g. "
        "{gold: 1.0} (reviews) or {accuracy: 1.0, format: 0.1} (arithmetic).",
    )
    functions: dict[str, float] = field(
        default_factory=dict,
        doc="Python rewards 'pkg.module:fn' or 'file.py:fn' -> "
        "weight; fn(prompts, responses, **row_fields) -> list[float].",
    )
    models: list[str] = field(default_factory=list, doc="Reward-model directories (k of them form an ensemble).")
    model_weight: float = field(1.0, doc="Weight of the reward-model term.")
    remote: RemoteRewardConfig = field(default_factory=RemoteRewardConfig, doc="A reward served over HTTP.")
    judge: JudgeConfig = field(default_factory=JudgeConfig, doc="An LLM judge as a reward.")
    pairwise: PairwiseRewardConfig = field(
        default_factory=PairwiseRewardConfig, doc="Pairwise preferences (a preference model or a pairwise judge)."
    )
    seq2seq: Seq2SeqRewardConfig = field(
        default_factory=Seq2SeqRewardConfig, doc="A rewriting (seq2seq) reward model giving token-level rewards."
    )
    vpl: VPLRewardConfig = field(
        default_factory=VPLRewardConfig, doc="A VPL reward model with per-user latents (personalised rewards)."
    )
    diversity: DiversityRewardConfig = field(
        default_factory=DiversityRewardConfig, doc="A QDHF diversity bonus from a learned descriptor (docs/qdhf.md)."
    )
    aggregation: str = field(
        "mean",
        doc="Ensemble aggregation of the reward models (Coste et al. 2024; brme: "
        "Yan et al. 2024, brme_lambda * mean + (1 - brme_lambda) * min).",
        choices=("mean", "min", "uwo", "brme"),
    )
    uwo_lambda: float = field(0.5, doc="Variance weight of the uwo aggregation.", range=(0.0, None))
    brme_lambda: float = field(
        0.5, doc="Nominal weight of the brme aggregation (1 = mean, 0 = worst case).", range=(0.0, 1.0)
    )
    timeout_s: float = field(10.0, doc="Seconds allowed per call of a Python reward.", range=(1e-3, None))
    executor: str = field(
        "thread", doc="Where Python rewards run ('process' can stop a stuck function).", choices=("thread", "process")
    )
    per_row: bool = field(
        False, doc="Call Python rewards once per row, each row with its own timeout (names a slow row; slower)."
    )
    on_error: str = field(
        "fail",
        doc="A Python reward that raises, times out or returns NaN/inf on a row: fail stops "
        "the run naming the function, the row and the cause; score gives the row "
        "reward.error_score and counts it (reward/errors, reward/timeouts, "
        "reward/nonfinite).",
        choices=("fail", "score"),
    )
    error_score: float = field(0.0, doc="Reward of a failed row when reward.on_error=score.")
    normalize: str = field(
        "none",
        doc="Running reward normalisation (PPO-max): (R - mean)/std, R/std, or none.",
        choices=("none", "running", "running_scale"),
    )
    clip: float = field(
        0.0, doc="Clip the (normalised) reward to [-clip, clip]; 0 disables (PPO-max: 10).", range=(0.0, None)
    )
    shaping: str = field(
        "none",
        doc="Shape R against the rewards r_ref of the reference policy's responses to the "
        "same prompt (docs/par.md): par = mean_m sigmoid(R - r_ref_m) (Preference As "
        "Reward), centered = R - mean_m r_ref_m, lsc = log sigmoid(R - 85th "
        "percentile of r_ref); none.",
        choices=("none", "par", "centered", "lsc"),
    )
    reference_samples: int = field(
        1,
        doc="shaping: M reference responses per prompt, sampled from the reference "
        "policy at rollout.temperature (scored once per prompt and cached).",
        range=(1, None),
    )
    reference_greedy: bool = field(
        False, doc="shaping: one greedy reference response per prompt instead of reference_samples sampled ones."
    )
    answer_after: str = field(
        "",
        doc="RLMT (docs/rlmt.md): the sources score only the text after this delimiter, e.g. </think>; "
        "empty: the whole response.",
    )
    answer_before: str = field("", doc="RLMT: ... cut at this delimiter after it, e.g. </response>; empty: none.")
    answer_strict: bool = field(False, doc="RLMT: a response without answer_after is scored as the text [NULL].")


@dataclasses.dataclass
class RoleResources:
    workers: int = field(
        0,
        doc="Ray workers (data-parallel ranks) for this role; 0 = the actor's count (colocated: always the actor's).",
        range=(0, None),
    )
    gpus_per_worker: float = field(0.0, doc="GPUs per worker (Ray num_gpus; fractions share a GPU).", range=(0.0, None))
    cpus_per_worker: float = field(1.0, doc="CPUs per worker (Ray num_cpus).", range=(0.0, None))


@dataclasses.dataclass
class ResourcesConfig:
    """Where the roles run (docs/design.md). ``actor.workers`` 0 or 1 with ``backend: auto`` runs everything in
    this process (LocalGroup); more workers (or ``backend: ray``) start Ray workers that form one torch.distributed
    group per worker set, each holding an FSDP2-sharded copy of its roles' models."""

    backend: str = field(
        "auto", doc="auto: Ray when actor.workers > 1, else this process; local; ray.", choices=("auto", "local", "ray")
    )
    placement: str = field(
        "colocated",
        doc="colocated: every model role (actor, rollout, ref, critic, reward models) "
        "on the same workers (the hybrid engine); split: the reference, the "
        "critic(s) and the reward models each on their own workers, whose calls "
        "then overlap.",
        choices=("colocated", "split"),
    )
    actor: RoleResources = field(default_factory=RoleResources, doc="Actor + rollout workers.")
    ref: RoleResources = field(default_factory=RoleResources, doc="Reference workers (split placement).")
    critic: RoleResources = field(
        default_factory=RoleResources, doc="Critic workers (split placement; Safe RLHF's cost critic shares them)."
    )
    reward: RoleResources = field(default_factory=RoleResources, doc="Reward/cost model workers (split placement).")
    cpu_offload: bool = field(
        False, doc="FSDP2 CPU offload of sharded parameters, gradients and optimiser state (GPU workers only)."
    )
    reshard_after_forward: bool = field(
        True, doc="Free each layer's gathered weights after its forward (ZeRO-3); False keeps them until the backward."
    )
    dist_timeout_s: float = field(
        600.0, doc="torch.distributed collective timeout; a hung rank fails after this.", range=(1.0, None)
    )
    max_restarts: int = field(
        3,
        doc="Times the run recreates its workers after one dies, resuming from the last "
        "checkpoint (train.save_every) before giving up.",
        range=(0, None),
    )


@dataclasses.dataclass
class RayConfig:
    address: str = field(
        "",
        doc="Ray cluster to attach to ('auto', 'ray://head:10001', ...); empty starts a local cluster in this process.",
    )
    namespace: str = field("alignflow", doc="Ray namespace of the run's actors.")
    num_cpus: int = field(0, doc="CPUs of a local cluster started here; 0 = Ray's default (all).", range=(0, None))
