"""Sampling parameters and the logits processors of the rollout engines.

Every processor is a pure function on a ``(B, V)`` logits tensor that stays on the logits' device: no
``.item()``, no Python loop over rows, so a decode step never waits for the device. Masked-out tokens get
``-inf``. The order in which :func:`process_logits` applies them is the one Hugging Face ``generate`` uses:
repetition penalty, temperature, top-k, top-p, min-p.

The sampling noise comes from one ``torch.Generator`` per call, or, with ``SamplingParams.seeds``, from a
counter-based hash of (row key, decode step, token id) (section "keyed noise" below), which makes every row's
sample independent of the rest of the batch.

Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from alignflow.config import ConfigError, field


@dataclasses.dataclass
class SamplingParams:
    """How a rollout engine samples. Validated on construction (a bad value raises ``ConfigError``)."""

    n: int = field(1, doc="Samples per prompt; rows i*n .. i*n+n-1 of the result belong to prompt i.", range=(1, None))
    temperature: float = field(1.0, doc="Softmax temperature; 0 means greedy (argmax).", range=(0.0, None))
    top_p: float = field(
        1.0,
        doc="Nucleus sampling: keep the smallest set of most likely tokens whose probability "
        "reaches top_p (1 disables).",
        range=(0.0, 1.0),
    )
    top_k: int = field(0, doc="Keep only the k most likely tokens (0 disables).", range=(0, None))
    min_p: float = field(
        0.0, doc="Drop tokens whose probability is below min_p times the top token's (0 disables).", range=(0.0, 1.0)
    )
    repetition_penalty: float = field(
        1.0,
        doc="CTRL penalty on tokens already in prompt or response: positive "
        "logits are divided by it, negative ones multiplied (1 disables).",
        range=(0.0, None),
    )
    max_new_tokens: int = field(128, doc="Most tokens generated per row.", range=(1, None))
    stop_token_ids: list[int] = field(
        default_factory=list,
        doc="Token ids that end a row besides the EOS ids (the stopping token is kept in the response).",
    )
    stop_strings: list[str] = field(
        default_factory=list, doc="Strings that end a row when they appear in its decoded response (needs a tokenizer)."
    )
    seed: int | None = field(
        None,
        doc="Seed of the sampling generator; same seed and inputs give the same output. "
        "None draws one from torch's global generator.",
    )
    seeds: list[int] | None = field(
        None,
        doc="One seed per prompt; when set it replaces `seed`. Sample j of prompt i "
        "draws counter-based noise keyed by (seeds[i], j, decode step, token id), "
        "so a prompt's samples do not depend on the other prompts of the call, "
        "their order, or how prompts are split between calls or workers.",
    )
    logprobs: bool = field(
        False,
        doc="Also return sampling_logprobs: log-softmax(logits / temperature) at the "
        "chosen tokens (temperature 1 when greedy).",
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and the allowed values for the first bad field."""
        ints = ("n", "top_k", "max_new_tokens")
        floats = ("temperature", "top_p", "min_p", "repetition_penalty")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"SamplingParams.{name}: expected an integer, got {value!r}")
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ConfigError(f"SamplingParams.{name}: expected a number, got {value!r}")
        for f in dataclasses.fields(self):
            lo, hi = f.metadata.get("range") or (None, None)
            value = getattr(self, f.name)
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ConfigError(
                    f"SamplingParams.{f.name}: {value!r} is outside [{lo}, {'inf' if hi is None else hi}]"
                )
        if self.top_p <= 0.0:
            raise ConfigError(f"SamplingParams.top_p: must be in (0, 1] (1 disables), got {self.top_p!r}")
        if self.repetition_penalty <= 0.0:
            raise ConfigError(
                f"SamplingParams.repetition_penalty: must be > 0 (1 disables), got {self.repetition_penalty!r}"
            )
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ConfigError(
                f"SamplingParams.stop_token_ids: expected a list of non-negative token ids, got {self.stop_token_ids!r}"
            )
        if not isinstance(self.stop_strings, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop_strings
        ):
            raise ConfigError(
                f"SamplingParams.stop_strings: expected a list of non-empty strings, got {self.stop_strings!r}"
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"SamplingParams.seed: expected an integer or None, got {self.seed!r}")
        if not isinstance(self.logprobs, bool):
            raise ConfigError(f"SamplingParams.logprobs: expected true/false, got {self.logprobs!r}")
        if self.seeds is not None:
            if not isinstance(self.seeds, (list, tuple)) or not self.seeds:
                raise ConfigError(
                    f"SamplingParams.seeds: expected a non-empty list with one integer seed per prompt, "
                    f"or None, got {self.seeds!r:.80}"
                )
            for i, s in enumerate(self.seeds):
                if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                    raise ConfigError(f"SamplingParams.seeds[{i}]: expected an integer, got {s!r}")

    def check_seeds(self, prompts: int, who: str) -> None:
        """Raise ``ConfigError`` unless ``seeds`` is None or has exactly one seed per prompt (``who`` names the
        caller in the message)."""
        if self.seeds is not None and len(self.seeds) != prompts:
            raise ConfigError(
                f"{who}: SamplingParams.seeds has {len(self.seeds)} seeds for {prompts} prompts; give "
                f"exactly one seed per prompt (sample j of prompt i uses the stream (seeds[i], j))"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ----------------------------------------------------------------------------------------------- processors
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty (Keskar et al. 2019, the Hugging Face convention).

    For every token already present (``seen``, prompt + generated so far): a positive logit is divided by
    ``penalty``, a negative one multiplied by it, so ``penalty > 1`` always makes the token less likely.

    logits: (B, V) float; seen: (B, V) bool. Returns (B, V).
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # (B, V)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``: temperature > 0 (greedy decoding never calls this). (B, V) -> (B, V)."""
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th are kept); the rest become -inf.

    ``k <= 0`` or ``k >= V`` returns the logits unchanged. (B, V) -> (B, V).
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely tokens whose probability
    sums to at least ``p``; the rest become -inf.

    A token, taken in decreasing probability, is kept iff the probability of the tokens strictly before it is
    below ``p`` -- so the most likely token is always kept. ``p >= 1`` returns the logits unchanged. (B, V).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) exclusive cumulative probability
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def apply_top_p_sorted(logits: torch.Tensor, p: float) -> torch.Tensor:
    """:func:`apply_top_p` for logits already sorted in decreasing order along the last dim (e.g. the values of
    ``topk``): the same rule without the sort and the scatter back. (B, k) -> (B, k)."""
    if p >= 1.0:
        return logits
    probs = logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, k) exclusive cumulative probability
    return logits.masked_fill(mass_before >= p, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p filtering (Nguyen et al. 2024): drop tokens whose probability is below ``min_p`` times the most
    likely token's probability. ``min_p <= 0`` returns the logits unchanged. (B, V) -> (B, V).

    In log space: drop iff ``logit < max_logit + log(min_p)`` (the softmax normaliser cancels).
    """
    if min_p <= 0.0:
        return logits
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p)  # (B, 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """All configured processors in generate's order: repetition penalty, temperature, top-k, top-p, min-p.

    Greedy (temperature 0) applies only the repetition penalty: the truncations cannot change an argmax.
    logits: (B, V) float; seen: (B, V) bool, required when ``repetition_penalty != 1``.
    """
    if params.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("process_logits: repetition_penalty != 1 needs the `seen` (B, V) mask")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


def sample_from_logits(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    *,
    keys: torch.Tensor | None = None,
    step: int | torch.Tensor = 0,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """One categorical draw per row from ``softmax(logits)``, on-device and without a sync.

    Uses the exponential race: ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)`` i.i.d. is distributed as
    ``Categorical(p)`` (the same trick as the Gumbel-max, with one kernel fewer). -inf logits have p = 0 and
    are never chosen. logits: (B, V) -> (B,) long.

    The noise comes from ``generator`` (one stream for the whole batch, so a row's draw depends on the rows
    beside it) unless ``keys`` (B, 2), from :func:`sample_keys`, is given: then ``E`` is
    :func:`keyed_exponential` of (row key, ``step``, column id), a function of the row's own key only.
    ``columns`` gives the ids that key the columns, (V,) or (B, V); default ``arange(V)``.
    """
    if keys is not None and columns is None and _fused_ok(logits):
        return _fused_keyed_draw(logits, keys, step)
    probs = logits.softmax(dim=-1)  # (B, V)
    if keys is not None:
        if columns is None:
            columns = torch.arange(logits.shape[-1], device=logits.device)  # (V,)
        race = keyed_exponential(keys, step, columns)  # (B, V) float32, > 0: no clamp needed
        return (probs.float() / race).argmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    race.clamp_(min=torch.finfo(race.dtype).tiny)  # an exact 0 would make 0/0 = nan for masked tokens
    return (probs / race).argmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen: torch.Tensor | None = None,
    *,
    keys: torch.Tensor | None = None,
    step: int | torch.Tensor = 0,
) -> torch.Tensor:
    """The next token of each row under ``params``: argmax when greedy, else a draw from the processed logits.

    With ``0 < top_k < V`` the top-k candidates are taken first and top-p / min-p / the draw run on the
    ``(B, k)`` candidates only: the same distribution as :func:`process_logits` over the full vocabulary
    (the softmax over the survivors is unchanged; only exact ties with the k-th logit may differ), without
    sorting or drawing noise for all V tokens. logits: (B, V) float -> (B,) long.

    ``keys`` (B, 2) and ``step``: per-row counter-based noise (see :func:`sample_from_logits`). On the
    candidate path the noise is keyed by the candidate's *token id*, not its position among the candidates:
    a token gets the same noise whatever ``top_k`` is and however ties at the k-th logit are ordered, so
    with the same keys the candidate path and the full-vocabulary path pick the same token whenever their
    processed distributions agree.
    """
    if params.greedy or not 0 < params.top_k < logits.shape[-1]:
        processed = process_logits(logits, params, seen)  # (B, V)
        if params.greedy:
            return processed.argmax(dim=-1)
        return sample_from_logits(processed, generator, keys=keys, step=step)
    if params.repetition_penalty != 1.0:
        assert seen is not None, "sample_tokens: repetition_penalty != 1 needs the `seen` (B, V) mask"
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature != 1.0:
        logits = apply_temperature(logits, params.temperature)
    values, index = logits.topk(params.top_k, dim=-1)  # (B, k) each, sorted descending
    values = apply_min_p(apply_top_p_sorted(values, params.top_p), params.min_p)
    choice = sample_from_logits(values, generator, keys=keys, step=step, columns=index)  # (B,) position
    return index.gather(-1, choice[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------- keyed noise
# Counter-based sampling noise: every draw is a pure function of (row key, decode step, column id), so a row's
# samples do not depend on which rows share its batch, on their order, or on rows leaving the batch.
#
# The mixing function is Wellons' "lowbias32" (found by his hash-prospector search): two xorshift-multiply
# rounds on 32 bits, a bijection of [0, 2**32) whose measured avalanche bias is about 0.17 (each output bit
# flips with probability within a fraction of a percent of 1/2 when one input bit flips). The 32-bit words live
# in int64 tensors, each op followed by a mask, so everything is plain device-agnostic torch arithmetic with
# no reliance on integer overflow: a product x * c with x < 2**32 and c < 2**31 is below 2**63. The second
# multiplier is above 2**31, so it is applied as c = 2**31 + c' : x * c = x * c' + (x & 1) * 2**31 (mod 2**32).
#
# Per row and step (cheap, (B,) tensors): h = mix(mix(mix(k0) ^ k1) ^ step), where (k0, k1) is the row's 64-bit
# key. Per column (the (B, V) part, one mix per element): x = mix(h ^ mix(column ^ _COLUMN_SALT)). Why this is
# uniform enough for sampling: for a fixed row and step the map column -> x is injective (composition of
# bijections), so the V draws of a row are V distinct 32-bit values; a hash with near-ideal avalanche makes
# them indistinguishable from independent uniforms for tests of the size a sampler sees (tested: Exp(1) mean
# and Kolmogorov-Smirnov distance, correlations across rows/steps/columns, chi-square of sampled tokens).
# Mixing the column id before the xor keeps two row-steps whose states differ by d from sharing a whole
# permuted noise vector (with a plain h ^ column they would whenever d < V); they now share about V**2 / 2**32
# values at unrelated columns.
#
# Uniform: the top 23 bits k of x give u = (k + 0.5) / 2**23, exact in float32 and strictly inside (0, 1), so
# E = -log(u) lies in [6e-8, 16.6]: Exp(1) discretised to 2**23 equiprobable levels (cut off beyond 16.6, a tail
# of probability 6e-8), a difference from exact exponential noise far below anything a sampler can resolve.
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_LOWBIAS_M1, _LOWBIAS_M2 = 0x7FEB352D, 0x846CA68B  # lowbias32 multipliers (the second one is >= 2**31)
_COLUMN_SALT = 0x5BD1E995  # xored into column ids before mixing: column 0 must not map to mix(0) = 0


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32) and a constant ``c`` in [0, 2**32); every intermediate
    stays below 2**63."""
    if c < 1 << 31:
        return (x * c).bitwise_and_(_MASK32)
    return (x * (c - (1 << 31))).add_(x.bitwise_and(1).bitwise_left_shift_(31)).bitwise_and_(_MASK32)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit words: a bijection of [0, 2**32) with good avalanche."""
    x = x.bitwise_xor(x.bitwise_right_shift(16))
    x = _mul32(x, _LOWBIAS_M1)
    x.bitwise_xor_(x.bitwise_right_shift(15))
    x = _mul32(x, _LOWBIAS_M2)
    return x.bitwise_xor_(x.bitwise_right_shift(16))


def _splitmix64(z: int) -> int:
    """SplitMix64's output function (Steele et al. 2014) on a Python int mod 2**64: a bijection with good
    avalanche, used on the host to turn (seed, sample index) into a 64-bit row key."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_keys(seeds: Sequence[int], n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Row keys for ``n`` samples of each prompt: row ``i*n + j`` gets the key of the stream ``(seeds[i], j)``.

    key = splitmix64(splitmix64(seed mod 2**64) xor j), split into two 32-bit words. Computed once per call on
    the host (O(rows) integer ops). Returns (len(seeds) * n, 2) int64 with values in [0, 2**32).
    """
    words = []
    for seed in seeds:
        base = _splitmix64(int(seed) & _MASK64)
        for j in range(n):
            key = _splitmix64(base ^ j)
            words.append((key & _MASK32, key >> 32))
    return torch.tensor(words, dtype=torch.long, device=device)


def keyed_uniform_bits(keys: torch.Tensor, step: int | torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash of (row key, step, column) described above. keys: (B, 2) int64; step: an int or (B,)
    int64 in [0, 2**32); columns: (C,) or (B, C) int64 ids in [0, 2**32). Returns (B, C) int64 in [0, 2**32)."""
    h = mix32(mix32(keys[:, 0]).bitwise_xor_(keys[:, 1]))  # (B,)
    h = mix32(h.bitwise_xor_(step))  # (B,) state of this row at this step
    c = mix32(columns.long().bitwise_xor(_COLUMN_SALT))  # (C,) or (B, C)
    return mix32(c.bitwise_xor(h[:, None]))  # (B, C)


def keyed_exponential(keys: torch.Tensor, step: int | torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise, ``-log(u)`` with ``u = (top 23 bits of the hash + 0.5) / 2**23``: (B, C) float32 in
    [6e-8, 16.6], on the device of ``keys``. See the section comment for the construction."""
    u = keyed_uniform_bits(keys, step, columns).bitwise_right_shift_(9).float()  # (B, C) integers < 2**23
    return u.add_(0.5).mul_(2.0**-23).log_().neg_()


# ----------------------------------------------------------------------------------------------- fused draw
# On a GPU the keyed draw above is ~20 elementwise passes over a (B, V) int64 tensor: at B = 256 and V = 152k
# that is ~8 GB of memory traffic per decode step, more than the model's own step. torch.compile fuses the whole
# draw (softmax, the (B, V) half of the hash, the exponential race and the argmax) into a few kernels that read
# the logits once and write (B,) ids; the (B,) and (V,) halves of the hash stay eager (cheap). Same function,
# same numbers up to the rounding of `log` inside the fused kernel. Used for large CUDA batches only (compiling
# costs seconds once per process); any compile failure falls back to the eager draw with one warning.
USE_COMPILE = True
FUSE_MIN_ELEMENTS = 1 << 22  # B * V from which the fused draw pays for its compilation
FUSE_DEVICES = ("cuda",)  # tests add "cpu" to run the fused draw where no GPU is
_FUSED: dict[Any, Any] = {}  # (V, device): mixed column ids; "fn": the compiled draw; "broken": compiling failed


def _fused_ok(logits: torch.Tensor) -> bool:
    return (
        USE_COMPILE
        and logits.device.type in FUSE_DEVICES
        and logits.numel() >= FUSE_MIN_ELEMENTS
        and _FUSED.get("broken") is None
    )


def _race_argmax(logits: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """argmax_v softmax(logits)_v / E_v with E = keyed_exponential's noise: h (B,) row-step states, c (V,) mixed
    column ids (see keyed_uniform_bits). (B, V) -> (B,)."""
    probs = logits.softmax(dim=-1)  # (B, V)
    u = mix32(c[None, :].bitwise_xor(h[:, None])).bitwise_right_shift(9).float()  # (B, V) integers < 2**23
    race = u.add(0.5).mul(2.0**-23).log().neg()
    return (probs.float() / race).argmax(dim=-1)


def _fused_keyed_draw(logits: torch.Tensor, keys: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    h = mix32(mix32(keys[:, 0]).bitwise_xor_(keys[:, 1]))  # (B,)
    h = mix32(h.bitwise_xor_(step))  # (B,) as in keyed_uniform_bits
    V = logits.shape[-1]
    key = (V, logits.device)
    if key not in _FUSED:  # the (V,) half of the hash, once per vocabulary and device
        _FUSED[key] = mix32(torch.arange(V, device=logits.device).bitwise_xor(_COLUMN_SALT))
    if "fn" not in _FUSED:
        _FUSED["fn"] = torch.compile(_race_argmax, dynamic=True)
    try:
        draw: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = _FUSED["fn"]
        return draw(logits, h, _FUSED[key])
    except Exception as err:  # noqa: BLE001 - any compiler failure: the eager draw is the same function
        import warnings

        warnings.warn(
            f"fused sampling could not be compiled ({type(err).__name__}: {err}); using the eager draw", stacklevel=2
        )
        _FUSED["broken"] = True
        return _race_argmax(logits, h, _FUSED[key])


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)[b, tokens[b]]``, with T = 1 when ``temperature`` is 0 (greedy).

    These are the sampling log-probs a training forward reproduces by dividing its logits by the same T; they
    do not include the repetition penalty or the top-k/top-p/min-p truncation. logits: (B, V); tokens: (B,).
    """
    t = temperature if temperature > 0 else 1.0
    scaled = logits / t if t != 1.0 else logits
    return scaled.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)  # (B,)


def presence_mask(token_ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which tokens occur in each row of ``token_ids`` (B, T) at positions where ``mask`` is 1."""
    rows = token_ids.shape[0]
    index = token_ids.masked_fill(mask == 0, vocab_size)  # (B, T): masked positions land in a spare column
    seen = torch.zeros(rows, vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    seen.scatter_(1, index, True)
    return seen[:, :vocab_size].contiguous()
