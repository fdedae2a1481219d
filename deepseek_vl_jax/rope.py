"""Rotary position embeddings for the LLaMA decoder.

Numerical reference: transformers 5.23.0 ``LlamaRotaryEmbedding`` + ``modeling_rope_utils.py``
(``ROPE_INIT_FUNCTIONS``, ``dynamic_rope_update`` and the config standardisation of
``RotaryEmbeddingConfigMixin``).

How the numbers are reproduced
------------------------------
HF computes the inverse frequencies with a sequence of float32 torch ops in which Python scalars are first
rounded to float32, ``scalar / tensor`` is evaluated as ``tensor.reciprocal() * scalar`` and every op rounds
to float32. Everything that depends only on the (static) config is reproduced here in NumPy with exactly
that op sequence, at trace time, so it becomes a constant of the compiled program. The one transcendental
op, float32 ``pow``, is evaluated correctly rounded (float64 then rounded to float32). Torch's CPU vector
``pow`` is only *faithfully* rounded: on a sweep of thetas and head dims about 1.4% of its results were one
float32 ulp away from the correctly rounded value (with theta=10000 and head_dim 16/32/64/128 all entries agree
bit for bit; head_dim 96 has one 1-ulp entry). A 1-ulp frequency difference changes an angle ``p * inv_freq``
by ~6e-8 relative, i.e. ~1e-5 absolute at angle 200; it is a property of torch's kernel, not of the formula.

The only value-dependent parts ('dynamic' and 'longrope', which look at ``max(position_ids) + 1``) are
selected over the traced sequence length (``jnp.where`` / ``lax.cond``), so :func:`rope_cos_sin` is jittable
with traced positions and needs no ``[T, T]`` work. The dynamic-NTK recompute beyond max_position_embeddings
contains one step HF evaluates as a float64 pow; it runs as a tiny host callback (``jax.pure_callback``, only
taken when the sequence is longer than max_position_embeddings) so that this step matches bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ROPE_TYPES", "RopeConfig", "rope_cos_sin", "apply_rope", "rope_inv_freq"]

ROPE_TYPES: tuple[str, ...] = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")

# HF's `RotaryEmbeddingConfigMixin.default_theta`.
_DEFAULT_THETA = 10000.0
# HF's `LlamaConfig.max_position_embeddings` default (used when a text config omits the key).
_DEFAULT_MAX_POSITION_EMBEDDINGS = 2048
# Rope types whose pretraining length HF fills in from `max_position_embeddings` during standardisation.
_NEEDS_ORIGINAL_MAX = ("llama3", "yarn", "longrope")
# Required keys per rope type, as in HF's `_validate_<type>_rope_parameters` (`rope_type`, `rope_theta` and
# `original_max_position_embeddings` are always filled in by the standardisation, so they never go missing).
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
# Keys whose value may not be null either (HF would crash with a TypeError while computing the frequencies).
# yarn/longrope accept `factor: null` and derive it as max_position_embeddings / original_max_position_embeddings.
_NON_NULL_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": (),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Static, hashable RoPE parameters (usable as a `jax.jit` static argument).

    `None` means "not given" and takes HF's default: `original_max_position_embeddings` ->
    `max_position_embeddings` (passed to :func:`rope_cos_sin`); yarn/longrope `factor` -> max / original max;
    `beta_fast` -> 32, `beta_slow` -> 1 (HF uses `or`, so 0 also means the default); `truncate` -> True;
    `attention_factor` -> derived from `factor` (and `mscale`/`mscale_all_dim` for yarn).
    """

    rope_type: str = "default"
    theta: float = _DEFAULT_THETA
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"Unsupported rope type {self.rope_type!r}; supported rope types are: {', '.join(ROPE_TYPES)}"
            )
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(float(v) for v in value))

    @classmethod
    def from_hf(cls, text_config: Mapping[str, Any]) -> "RopeConfig":
        """Parse from an HF LLaMA text config dict, standardising it like transformers 5.23.0.

        Accepts the newer spelling (`rope_parameters` dict with `rope_type`, `rope_theta`, ...) and the older one
        (top-level `rope_theta` + `rope_scaling` dict with `type` or `rope_type`; `rope_scaling` may be null).
        HF's precedence rules are reproduced:

        * a truthy `rope_scaling` replaces `rope_parameters`; `rope_theta` inside the dict beats the top-level
          `rope_theta`, which beats the default 10000; `rope_type` beats the legacy `type`;
        * for llama3/yarn/longrope `original_max_position_embeddings` is, in order: the *top-level* key of that
          name (HF gives it priority when the rope module re-standardises the config), the key inside the rope
          dict, `max_position_embeddings` (default 2048);
        * yarn `truncate: null` given explicitly means *no* truncation (HF reads it with `.get("truncate", True)`),
          so it is stored as `False`; an absent key means True.

        Raises ValueError on an unknown rope type (naming it and listing the supported ones), on a missing
        required key (naming it) and on `partial_rotary_factor != 1` for a non-default type (HF then builds
        cos/sin narrower than head_dim and LLaMA's `apply_rotary_pos_emb` fails; for 'default' HF ignores it).
        The input dict is not modified (HF mutates the dict it is given).
        """
        if hasattr(text_config, "to_dict") and not isinstance(text_config, Mapping):
            text_config = text_config.to_dict()
        cfg = dict(text_config)
        rope_scaling = cfg.get("rope_scaling")
        params = dict(rope_scaling or cfg.get("rope_parameters") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", _DEFAULT_THETA))
        top_partial = cfg.get("partial_rotary_factor")
        if top_partial is not None:
            params.setdefault("partial_rotary_factor", top_partial)
        params.setdefault("rope_type", params.get("type", "default"))
        rope_type = params["rope_type"]
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"Unsupported rope type {rope_type!r}; supported rope types are: {', '.join(ROPE_TYPES)}"
            )
        if rope_type in _NEEDS_ORIGINAL_MAX:
            if cfg.get("original_max_position_embeddings") is not None:
                params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
            else:
                params.setdefault(
                    "original_max_position_embeddings",
                    cfg.get("max_position_embeddings", _DEFAULT_MAX_POSITION_EMBEDDINGS),
                )
        for key in _REQUIRED_KEYS[rope_type]:
            if key not in params:
                raise ValueError(f"Missing required key {key!r} in the RoPE parameters for rope_type={rope_type!r}")
        for key in _NON_NULL_KEYS[rope_type]:
            if params[key] is None:
                raise ValueError(f"RoPE parameter {key!r} must not be null for rope_type={rope_type!r}")
        if params["rope_theta"] is None:
            raise ValueError("RoPE parameter 'rope_theta' must not be null")
        partial = params.get("partial_rotary_factor")
        if rope_type != "default" and partial is not None and float(partial) != 1.0:
            raise ValueError(
                f"partial_rotary_factor={partial} is not supported for LLaMA with rope_type={rope_type!r} "
                "(LLaMA rotates the whole head; HF's LLaMA attention fails for this config too)"
            )

        def opt_float(key):
            value = params.get(key)
            return None if value is None else float(value)

        def opt_tuple(key):
            value = params.get(key)
            return None if value is None else tuple(float(v) for v in value)

        truncate = None
        if rope_type == "yarn" and "truncate" in params:
            truncate = bool(params["truncate"])  # explicit null -> False, as HF's truthiness test
        omp = params.get("original_max_position_embeddings") if rope_type in _NEEDS_ORIGINAL_MAX else None
        keep = {
            "default": (),
            "linear": ("factor",),
            "dynamic": ("factor",),
            "yarn": ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
            "longrope": ("factor", "attention_factor"),
        }[rope_type]
        kwargs = {key: opt_float(key) for key in keep}
        if rope_type == "longrope":
            kwargs["short_factor"] = opt_tuple("short_factor")
            kwargs["long_factor"] = opt_tuple("long_factor")
        return cls(
            rope_type=rope_type,
            theta=float(params["rope_theta"]),
            original_max_position_embeddings=None if omp is None else int(omp),
            truncate=truncate,
            **kwargs,
        )


# ----------------------------------------------------------------------------------------------------------
# float32 emulation of HF's torch op sequences (NumPy, trace time)
# ----------------------------------------------------------------------------------------------------------
_F32 = np.float32


def _pow32(base, exponent) -> np.ndarray:
    """float32 pow, correctly rounded (see module docstring)."""
    out = np.power(np.asarray(base, np.float32).astype(np.float64), np.asarray(exponent, np.float32).astype(np.float64))
    return out.astype(np.float32)


def _recip32(x) -> np.ndarray:
    return (_F32(1.0) / np.asarray(x, np.float32)).astype(np.float32)


def _rdiv32(scalar, x) -> np.ndarray:
    """torch `scalar / tensor` == `tensor.reciprocal() * scalar` (float32)."""
    return (_recip32(x) * _F32(scalar)).astype(np.float32)


def _exponents32(dim: int) -> np.ndarray:
    """torch `arange(0, dim, 2).float() / dim`."""
    return (np.arange(0, dim, 2).astype(np.float32) / _F32(dim)).astype(np.float32)


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """torch `1.0 / (base ** (arange(0, dim, 2).float() / dim))`."""
    return _recip32(_pow32(_F32(theta), _exponents32(dim)))


def _original_max(rope: RopeConfig, max_position_embeddings: int) -> int:
    omp = rope.original_max_position_embeddings
    return int(max_position_embeddings if omp is None else omp)


def _require(rope: RopeConfig, *names: str) -> None:
    for name in names:
        if getattr(rope, name) is None:
            raise ValueError(f"RopeConfig.{name} is required for rope_type={rope.rope_type!r}")


def _yarn(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    base = rope.theta
    omp = _original_max(rope, max_position_embeddings)
    factor = rope.factor
    if factor is None:
        factor = max_position_embeddings / omp
    attention_factor = rope.attention_factor
    mscale, mscale_all_dim = rope.mscale, rope.mscale_all_dim

    def get_mscale(scale, m=1):
        if scale <= 1:
            return 1.0
        return 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def find_correction_dim(num_rotations):
        return (dim * math.log(omp / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = find_correction_dim(beta_fast)
    high = find_correction_dim(beta_slow)
    truncate = True if rope.truncate is None else rope.truncate
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = (np.arange(dim // 2, dtype=np.float32) - _F32(low)).astype(np.float32) / _F32(high - low)
    ramp = np.clip(ramp.astype(np.float32), _F32(0), _F32(1))

    pos_freqs = _pow32(_F32(base), _exponents32(dim))
    inv_extrapolation = _recip32(pos_freqs)
    inv_interpolation = _recip32((_F32(factor) * pos_freqs).astype(np.float32))
    extrapolation_factor = (_F32(1) - ramp).astype(np.float32)
    one_minus = (_F32(1) - extrapolation_factor).astype(np.float32)
    inv = (inv_interpolation * one_minus).astype(np.float32) + (inv_extrapolation * extrapolation_factor).astype(
        np.float32
    )
    return inv.astype(np.float32), float(attention_factor)


def _longrope(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, np.ndarray, float]:
    _require(rope, "short_factor", "long_factor")
    omp = _original_max(rope, max_position_embeddings)
    factor = rope.factor
    if factor is None:
        factor = max_position_embeddings / omp
    attention_factor = rope.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(omp))
    pows = _pow32(_F32(rope.theta), _exponents32(dim))
    out = []
    for ext in (rope.short_factor, rope.long_factor):
        ext = np.asarray(ext, dtype=np.float64).astype(np.float32)
        if ext.shape != pows.shape:
            raise ValueError(f"longrope factors must have length head_dim // 2 = {dim // 2}, got {ext.shape[0]}")
        out.append(_recip32((ext * pows).astype(np.float32)))
    return out[0], out[1], float(attention_factor)


def _llama3(rope: RopeConfig, dim: int, max_position_embeddings: int) -> np.ndarray:
    _require(rope, "factor", "low_freq_factor", "high_freq_factor")
    inv = _default_inv_freq(rope.theta, dim)
    factor, low_ff, high_ff = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old = _original_max(rope, max_position_embeddings)
    low_wavelen = old / low_ff
    high_wavelen = old / high_ff
    wavelen = _rdiv32(2 * math.pi, inv)
    inv_llama = np.where(wavelen > _F32(low_wavelen), (inv / _F32(factor)).astype(np.float32), inv)
    smooth = ((_rdiv32(old, wavelen) - _F32(low_ff)).astype(np.float32) / _F32(high_ff - low_ff)).astype(np.float32)
    smoothed = (((_F32(1) - smooth).astype(np.float32) * inv_llama).astype(np.float32) / _F32(factor)).astype(
        np.float32
    ) + (smooth * inv_llama).astype(np.float32)
    medium = ~(wavelen < _F32(high_wavelen)) & ~(wavelen > _F32(low_wavelen))
    return np.where(medium, smoothed.astype(np.float32), inv_llama).astype(np.float32)


@functools.lru_cache(maxsize=256)
def _static_tables(rope: RopeConfig, head_dim: int, max_position_embeddings: int):
    """(inv_freq as HF's module holds it right after __init__, long inv_freq or None, attention scaling)."""
    dim = int(head_dim)
    if dim <= 0 or dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    rt = rope.rope_type
    if rt == "default":
        return _default_inv_freq(rope.theta, dim), None, 1.0
    if rt == "linear":
        _require(rope, "factor")
        return (_default_inv_freq(rope.theta, dim) / _F32(rope.factor)).astype(np.float32), None, 1.0
    if rt == "dynamic":
        _require(rope, "factor")
        # At init HF calls the init fn with seq_len=None -> max_position_embeddings, in Python floats.
        seq_len, factor = max_position_embeddings, rope.factor
        base = rope.theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim), None, 1.0
    if rt == "yarn":
        inv, scale = _yarn(rope, dim, max_position_embeddings)
        return inv, None, scale
    if rt == "llama3":
        return _llama3(rope, dim, max_position_embeddings), None, 1.0
    if rt == "longrope":
        return _longrope(rope, dim, max_position_embeddings)
    raise ValueError(f"Unsupported rope type {rt!r}; supported rope types are: {', '.join(ROPE_TYPES)}")


def _dynamic_grown_inv_freq_np(rope: RopeConfig, dim: int, max_position_embeddings: int, seq_len) -> np.ndarray:
    """HF's dynamic-NTK recompute for a tensor `seq_len` (int64 0-dim tensor), as float32 torch ops, in NumPy.

    `factor * seq_len / max - (factor - 1)` are float32 ops; the 0-dim `tensor ** (dim / (dim - 2))` goes through
    torch's scalar pow path, which evaluates `pow(float, double)` in double and rounds (verified bit exact);
    `base ** exponents` is a float32 vector pow.
    """
    factor = rope.factor
    s = _F32(max(int(seq_len), max_position_embeddings))
    a = _F32(_F32(factor) * s)
    a = _F32(a / _F32(max_position_embeddings))
    a = _F32(a - _F32(factor - 1))
    exponent = dim / (dim - 2)
    a = _F32(a * a) if exponent == 2.0 else _F32(np.float64(a) ** exponent)  # torch special-cases `** 2`
    base = _F32(_F32(rope.theta) * a)
    return _recip32(_pow32(base, _exponents32(dim)))


def _dynamic_grown_inv_freq(rope: RopeConfig, dim: int, max_position_embeddings: int, seq_len: jax.Array):
    """Traced version of :func:`_dynamic_grown_inv_freq_np` via a host callback.

    A host callback because HF evaluates one step as a double-precision pow of float32 values, which float32
    device arithmetic cannot reproduce to the last bit (and the resulting 1-ulp frequency differences grow with
    the position). It returns head_dim // 2 floats and only runs when the sequence is longer than
    max_position_embeddings (see `rope_inv_freq`).
    """

    def host(length):
        return _dynamic_grown_inv_freq_np(rope, dim, max_position_embeddings, np.asarray(length))

    return jax.pure_callback(
        host, jax.ShapeDtypeStruct((dim // 2,), jnp.float32), seq_len, vmap_method="sequential"
    )


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int, positions: jax.Array):
    """(inv_freq [head_dim // 2] float32, attention scaling) in effect for a call with these positions."""
    inv0, long_inv, scaling = _static_tables(rope, int(head_dim), int(max_position_embeddings))
    inv = jnp.asarray(inv0)
    if rope.rope_type in ("dynamic", "longrope"):
        seq_len = jnp.max(positions) + 1  # HF: torch.max(position_ids) + 1, over the whole batch
        if rope.rope_type == "dynamic":
            inv = jax.lax.cond(
                seq_len > max_position_embeddings,
                lambda n: _dynamic_grown_inv_freq(rope, int(head_dim), int(max_position_embeddings), n),
                lambda n: inv,
                seq_len,
            )
        else:
            omp = _original_max(rope, max_position_embeddings)
            inv = jnp.where(seq_len > omp, jnp.asarray(long_inv), inv)
    return inv, scaling


def rope_cos_sin(
    rope: RopeConfig,
    head_dim: int,
    max_position_embeddings: int,
    positions: jax.Array,
    dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, head_dim] for int positions [B, T] (any leading shape works).

    Half-split layout (`cat((freqs, freqs), -1)`), multiplied by the attention scaling (yarn/longrope mscale),
    computed in float32 and cast to `dtype`. Jittable with `rope`, `head_dim`, `max_position_embeddings`
    static and `positions` traced.

    Sequence-length dependent types. Like HF, the sequence length is `max(positions) + 1` over the whole batch:

    * 'longrope': short factors if that length <= original_max_position_embeddings, long factors otherwise
      (HF is stateless here too, so this matches every call).
    * 'dynamic': HF's module is *stateful*. With L0 = max_position_embeddings and `cached` = the largest length
      seen so far (initially L0), a call of length L recomputes the NTK-scaled frequencies for L when L > cached,
      resets to the original frequencies when L < L0 after having grown, and otherwise keeps whatever it holds.
      This function is stateless: original frequencies if L <= L0, NTK-scaled frequencies for L otherwise. That
      equals HF for every call of a monotonic sequence on one module (each call's max position >= the previous
      call's, e.g. prefill then one-token decoding steps), and for any call with L < L0. It differs only when,
      after growing to L1 > L0, a later call has L0 <= L2 < L1: HF keeps the L1 frequencies, this uses L2's.
      Left-padding offsets are irrelevant: only the maximum position counts.
    """
    positions = jnp.asarray(positions)
    inv, scaling = rope_inv_freq(rope, head_dim, max_position_embeddings, positions)
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb) * jnp.float32(scaling)
    sin = jnp.sin(emb) * jnp.float32(scaling)
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x` [B, T, N, H] with cos/sin [B, T, H]: `x * cos + rotate_half(x) * sin` in x's dtype.

    HF's rotate_half convention (`cat(-x2, x1)` over the two halves of the head); cos/sin are cast to x.dtype
    first, as HF's rotary module returns them in the activations' dtype.
    """
    if cos.shape[-1] != x.shape[-1] or sin.shape[-1] != x.shape[-1]:
        raise ValueError(f"cos/sin last dim {cos.shape[-1]} must equal the head dim {x.shape[-1]}")
    cos = cos.astype(x.dtype)[..., None, :]
    sin = sin.astype(x.dtype)[..., None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
