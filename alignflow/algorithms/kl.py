"""KL estimators, KL controllers and KL-shaped rewards (docs/online_rl.md, KL; docs/ppo.md).

Per-token estimators of KL(q‖p) from a sample a ~ q (Schulman 2020, "Approximating KL divergence",
http://joschu.net/blog/kl-approx.html). With ``logp = log q(a)`` (policy, the sampler) and ``ref_logp = log p(a)``
(reference), ``log r = ref_logp − logp``:

* k1 = −log r                unbiased, can be negative, high variance (standard choice *in the reward*);
* k2 = ½ (log r)²            biased, ≥ 0, low variance; as a loss its expected gradient is ∇KL(π_θ‖π_ref);
* k3 = (r − 1) − log r       unbiased, ≥ 0, low variance (GRPO's "unbiased estimator"); as a loss its expected
                             gradient is that of the forward KL(π_ref‖π_θ).

All take (B, T) tensors and return (B, T); masking is the caller's job (see :func:`kl_loss`,
:func:`kl_penalty_rewards`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignflow.algorithms.core import aggregate, masked_mean, zero_invalid
from alignflow.algorithms.safe_control import PIDController, entropy_gated_kl_coef

Tensor = torch.Tensor

# exp(±20) is still finite in float32 and bfloat16; wider log-ratios only occur for garbage positions or diverged runs.
_LOG_RATIO_CLAMP = 20.0


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp − ref_logp = −log r. Shapes (B, T) -> (B, T)."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½ (logp − ref_logp)². Shapes (B, T) -> (B, T)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(ref_logp − logp) − (ref_logp − logp) − 1 = (r − 1) − log r ≥ 0. Shapes (B, T) -> (B, T).

    ``log r`` is clamped to ±20 so that a far-off position cannot overflow ``exp``.
    """
    log_r = (ref_logp - logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(log_r) - log_r - 1.0


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def _estimator(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; valid choices: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name]


def kl_loss(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    estimator: str = "k3",
    agg: str = "token_mean",
    **agg_kwargs: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL penalty *in the loss* (GRPO, Shao et al. 2024): ``agg_t k(lp_θ, lp_ref)``; the caller multiplies by β.

    Gradients flow through ``logp`` (current policy); ``ref_logp`` is frozen. Shapes: logp, ref_logp, mask (B, T).
    ``agg`` and ``agg_kwargs`` (norm_len, global_tokens, global_seqs) go to :func:`aggregate`.
    Metrics: ``policy/kl_loss`` (the aggregated estimate).
    """
    per_token = _estimator(estimator)(zero_invalid(logp, mask), zero_invalid(ref_logp, mask))  # (B, T)
    loss = aggregate(per_token, mask, agg, **agg_kwargs)
    return loss, {"policy/kl_loss": loss.detach()}


def kl_penalty_rewards(
    rewards: Tensor, logp_old: Tensor, ref_logp: Tensor, mask: Tensor, beta: float, estimator: str = "k1"
) -> Tensor:
    """KL-shaped per-token reward (InstructGPT; docs/ppo.md): ``r_t = −β·k_t + 1[t = last]·R``.

    Args:
        rewards: (B,) sequence score R (reward model or verifier).
        logp_old, ref_logp: (B, T) log-probs of the sampled tokens under the sampling policy and the reference.
        mask: (B, T) response tokens; left or right padding, the score goes to each row's *last valid* token.
        beta: KL coefficient (a float, e.g. ``controller.value``). A negative beta gives Safe RLHF's cost shaping
            ``c_t = +β·k1_t + 1[t = last]·C``.
        estimator: a key of :data:`KL_ESTIMATORS`; k1 is the standard choice here.

    Returns (B, T) token rewards, 0 outside the mask, no gradient. A row with no valid token has no token to carry
    its score and comes back all zeros (such rows are padding).
    """
    if rewards.dim() != 1 or rewards.shape[0] != mask.shape[0]:
        raise ValueError(f"rewards must have shape (B,) = ({mask.shape[0]},); got {tuple(rewards.shape)}")
    with torch.no_grad():
        m = mask.bool()
        kl = _estimator(estimator)(logp_old, ref_logp)  # (B, T)
        token_rewards = torch.where(m, -beta * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
        T = m.shape[1]
        positions = torch.arange(T, device=m.device).expand_as(m)  # (B, T)
        last = torch.where(m, positions, -1).max(dim=1).values  # (B,); -1 for an all-masked row
        score = torch.where(last >= 0, rewards.to(token_rewards.dtype), 0.0)  # (B,)
        token_rewards = token_rewards.scatter_add(1, last.clamp(min=0)[:, None], score[:, None])  # (B, T)
    return token_rewards


def sequence_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: str = "k1") -> Tensor:
    """Observed KL fed to a KL controller: ``mean_i Σ_t m·k_t`` (sum over tokens, mean over rows). 0-dim, no grad."""
    with torch.no_grad():
        per_seq = torch.where(mask.bool(), _estimator(estimator)(logp, ref_logp), 0.0).sum(-1)  # (B,)
        return masked_mean(per_seq, mask.bool().any(-1))


# ----------------------------------------------------------------------------------------------- controllers
class FixedKLController:
    """Constant KL coefficient β. ``update`` does nothing; kept for a uniform interface."""

    def __init__(self, init: float = 0.05):
        if init < 0:
            raise ValueError(f"KL coefficient must be >= 0; got {init}")
        self.value = float(init)

    def update(self, current_kl: float, n_steps: int, entropy: float | None = None) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive β (Ziegler et al. 2019, "Fine-tuning LMs from human preferences", arXiv:1909.08593).

    After a batch with observed KL ``KL_t`` (see :func:`sequence_kl`):
    ``e_t = clip(KL_t / target − 1, −0.2, 0.2)``, ``β ← β·(1 + e_t·n_steps/horizon)`` (the library form used by
    trl/trlx/AlpacaFarm; the paper's ``K_β = 0.1`` corresponds to ``n_steps/horizon = 0.1``).
    Defaults: init 0.2, target 6, horizon 10000 (older TRL).
    """

    def __init__(self, init: float = 0.2, target: float = 6.0, horizon: float = 10000):
        if init < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"AdaptiveKLController needs init >= 0, target > 0, horizon > 0; "
                f"got init={init}, target={target}, horizon={horizon}"
            )
        self.value = float(init)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int, entropy: float | None = None) -> float:
        """Apply one update with the batch's KL and the number of samples (or steps) it covered; returns β."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class SafeKLController:
    """SAFE-style KL control (docs/safe_control.md): a PID law on the KL, gated by the policy's entropy.

    After a step with observed KL ``KL_t`` (:func:`sequence_kl`) and mean token entropy ``H_t``:

    * PID (``kp``, ``ki``, ``kd`` not all 0): ``β_pid = clamp(β_0 + kp·e + ki·Σe + kd·(e − e_prev), low, high)``
      with ``e = KL_t − target`` (:class:`~alignflow.algorithms.safe_control.PIDController`): a KL above the target
      raises β, one below lowers it; without gains ``β_pid = β_0``.
    * entropy gate (``entropy_target`` > 0): ``β = β_pid · max(floor, σ((H* − H_t)/width))``
      (:func:`~alignflow.algorithms.safe_control.entropy_gated_kl_coef`): the penalty is relaxed while the policy
      explores (high entropy) and restored as the entropy collapses below ``H*``. Without a target, ``β = β_pid``.

    ``value`` before the first update is ``β_0`` (no entropy measured yet).
    """

    def __init__(
        self,
        init: float,
        target: float,
        kp: float = 0.0,
        ki: float = 0.0,
        kd: float = 0.0,
        low: float = 1e-3,
        high: float = 1.0,
        entropy_target: float = 0.0,
        entropy_width: float = 0.5,
        entropy_floor: float = 0.1,
    ):
        if init <= 0 or not 0 < low <= high or not 0.0 <= entropy_floor <= 1.0 or entropy_width < 0:
            raise ValueError(
                "SafeKLController needs init > 0, 0 < low <= high, 0 <= entropy_floor <= 1 and entropy_width >= 0; "
                f"got init={init}, low={low}, high={high}, entropy_floor={entropy_floor}, entropy_width={entropy_width}"
            )
        self.pid = PIDController(target, kp, ki, kd, base=init, low=low, high=high, integral_limit=10.0 * high)
        self.use_pid = any((kp, ki, kd))
        self.base = float(init)
        self.entropy_target, self.entropy_width, self.entropy_floor = entropy_target, entropy_width, entropy_floor
        self.gate = 1.0
        self.value = float(init)

    def update(self, current_kl: float, n_steps: int, entropy: float | None = None) -> float:
        """Feed the step's KL (and entropy); returns the new β."""
        beta = self.pid.update(float(current_kl)) if self.use_pid else self.base
        if self.entropy_target > 0 and entropy is not None:
            gate = entropy_gated_kl_coef(1.0, entropy, self.entropy_target, self.entropy_width)
            self.gate = max(self.entropy_floor, gate)
        self.value = beta * self.gate
        return self.value

    def state_dict(self) -> dict[str, float]:
        pid = self.pid.state_dict()
        prev = pid["prev_error"]
        return {"value": self.value, "gate": self.gate, "integral": pid["integral"], "pid_value": pid["value"]} | (
            {} if prev is None else {"prev_error": prev}
        )

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.gate = float(state["value"]), float(state["gate"])
        prev = state.get("prev_error")
        self.pid.load_state_dict({"integral": state["integral"], "prev_error": prev, "value": state["pid_value"]})


KLController = FixedKLController | AdaptiveKLController | SafeKLController
KL_CONTROLLERS = {"fixed": FixedKLController, "adaptive": AdaptiveKLController, "safe": SafeKLController}


def make_kl_controller(
    kind: str, init: float, target: float | None = None, horizon: float | None = None, **safe: float
) -> KLController:
    """Build a controller from config values: ``kind`` is a key of :data:`KL_CONTROLLERS`; ``safe``: the keyword
    arguments of :class:`SafeKLController` (gains, bounds, entropy gate) for ``kind="safe"``."""
    if kind not in KL_CONTROLLERS:
        raise ValueError(f"unknown KL controller {kind!r}; valid choices: {sorted(KL_CONTROLLERS)}")
    if kind == "fixed":
        return FixedKLController(init)
    if kind == "safe":
        return SafeKLController(init, 6.0 if target is None else target, **safe)
    return AdaptiveKLController(init, 6.0 if target is None else target, 10000 if horizon is None else horizon)
