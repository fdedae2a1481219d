"""Parity of deepseek_vl_jax.rope with transformers 5.23.0 LlamaRotaryEmbedding (float32, CPU).

Tolerance: cos/sin and rotated q/k must match HF to max abs error <= 1e-6 (ATOL below); inverse frequencies
to within 1 float32 ulp.
"""

import copy
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from deepseek_vl_jax.rope import ROPE_TYPES, RopeConfig, apply_rope, rope_cos_sin, rope_inv_freq

ATOL = 1e-6
HIDDEN, HEADS, HEAD_DIM = 64, 4, 16
MAX_POS = 64

SHORT = (1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8)
LONG = (1.0, 1.5, 2.2, 3.5, 5.0, 8.0, 12.5, 20.0)

# (id, rope_parameters (new spelling, without rope_theta), rope_theta, list of sequence lengths to test)
CASES = [
    ("default", {"rope_type": "default"}, 10000.0, [40]),
    ("default-theta5e5", {"rope_type": "default"}, 500000.0, [150]),
    ("linear-2", {"rope_type": "linear", "factor": 2.0}, 10000.0, [100]),
    ("linear-4-theta1e6", {"rope_type": "linear", "factor": 4}, 1e6, [100]),
    ("dynamic-2", {"rope_type": "dynamic", "factor": 2.0}, 10000.0, [40, 64, 65, 150]),
    ("dynamic-4", {"rope_type": "dynamic", "factor": 4.0}, 10000.0, [30, 90, 200]),
    # yarn with a realistic pretraining length so that the correction range (and so beta/truncate) matters
    ("yarn-4", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}, 10000.0, [300],
     4096),
    (
        "yarn-mscale",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "mscale": 0.707,
         "mscale_all_dim": 1.0},
        10000.0,
        [300],
        4096,
    ),
    (
        "yarn-mscale-equal",
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512, "mscale": 1.0,
         "mscale_all_dim": 1.0},
        50000.0,
        [200],
        4096,
    ),
    (
        "yarn-attn-factor-no-truncate-betas",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "attention_factor": 1.25,
         "truncate": False, "beta_fast": 16.0, "beta_slow": 2.0},
        10000.0,
        [300],
        4096,
    ),
    ("yarn-no-truncate", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                          "truncate": False}, 10000.0, [300], 4096),
    # `factor: null` -> derived as max_position_embeddings / original_max_position_embeddings = 4
    ("yarn-factor-null", {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16}, 10000.0,
     [64]),
    # original_max_position_embeddings filled from max_position_embeddings by the standardisation -> factor vs 1
    ("yarn-omp-default", {"rope_type": "yarn", "factor": 2.0}, 10000.0, [64]),
    (
        "llama3-a",
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 1024},
        10000.0,
        [120],
    ),
    (
        "llama3-b",
        {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
         "original_max_position_embeddings": 256},
        10000.0,
        [120],
    ),
    (
        "longrope-derived",
        {"rope_type": "longrope", "short_factor": list(SHORT), "long_factor": list(LONG),
         "original_max_position_embeddings": 32},
        10000.0,
        [20, 32, 33, 60],
    ),
    (
        "longrope-explicit",
        {"rope_type": "longrope", "short_factor": list(SHORT), "long_factor": list(LONG),
         "original_max_position_embeddings": 16, "factor": 4.0, "attention_factor": 1.1},
        10000.0,
        [16, 17, 64],
    ),
]


CASE = {c[0]: c for c in CASES}


def hf_config(rope_parameters, theta, max_pos=MAX_POS, **extra):
    params = dict(copy.deepcopy(rope_parameters), rope_theta=theta)
    return LlamaConfig(
        vocab_size=32, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=HEADS, head_dim=HEAD_DIM, max_position_embeddings=max_pos,
        rope_parameters=params, **extra,
    )


def hf_cos_sin(module, pos):
    with torch.no_grad():
        cos, sin = module(torch.zeros(1, dtype=torch.float32), torch.from_numpy(np.asarray(pos, np.int64)))
    return cos.numpy(), sin.numpy()


def positions_for(seq_len):
    """[2, seq_len]: a plain row reaching seq_len - 1 and a left-padded row (HF style: pads get position 1)."""
    row0 = np.arange(seq_len)
    pad = min(5, seq_len - 1)
    row1 = np.concatenate([np.ones(pad, np.int64), np.arange(seq_len - pad)])
    return np.stack([row0, row1]).astype(np.int32)


_rope_cos_sin_jit = jax.jit(rope_cos_sin, static_argnums=(0, 1, 2))
_apply_rope_jit = jax.jit(apply_rope)
_rope_inv_freq_jit = jax.jit(rope_inv_freq, static_argnums=(0, 1, 2))


def inv_freq(rope, head_dim, max_pos, pos):
    inv, scaling = _rope_inv_freq_jit(rope, head_dim, max_pos, jnp.asarray(pos))
    return np.asarray(inv), float(scaling)


def ours(rope, pos, max_pos=MAX_POS):
    cos, sin = _rope_cos_sin_jit(rope, HEAD_DIM, max_pos, jnp.asarray(pos))
    return np.asarray(cos), np.asarray(sin)


def assert_close(a, b, what):
    err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    assert err <= ATOL, f"{what}: max abs err {err:.3g} > {ATOL}"


def test_rope_types_listed():
    assert ROPE_TYPES == ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
    assert {c[1]["rope_type"] for c in CASES} == set(ROPE_TYPES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cos_sin_match_hf(case):
    _, params, theta, seq_lens, *rest = case
    max_pos = rest[0] if rest else MAX_POS
    config = hf_config(params, theta, max_pos=max_pos)
    rope = RopeConfig.from_hf(config.to_dict())
    assert rope.rope_type == params["rope_type"]
    for seq_len in seq_lens:
        module = LlamaRotaryEmbedding(config)  # fresh module per call (dynamic is stateful)
        pos = positions_for(seq_len)
        hf_cos, hf_sin = hf_cos_sin(module, pos)
        cos, sin = ours(rope, pos, max_pos)
        assert cos.shape == sin.shape == (2, seq_len, HEAD_DIM)
        assert cos.dtype == np.float32
        assert_close(cos, hf_cos, f"cos L={seq_len}")
        assert_close(sin, hf_sin, f"sin L={seq_len}")
        inv, scaling = inv_freq(rope, HEAD_DIM, max_pos, pos)
        np.testing.assert_array_max_ulp(np.asarray(inv), module.inv_freq.numpy(), maxulp=1)
        assert scaling == pytest.approx(module.attention_scaling, rel=1e-7)  # returned as float32


def test_cases_are_discriminative():
    """Guards against vacuous parity: the cases above really exercise mscale, beta/truncate, long factors and
    NTK growth (each of these settings changes the output by far more than the tolerance)."""
    def parsed(name):
        _, params, theta, _, *rest = CASE[name]
        return RopeConfig.from_hf(hf_config(params, theta, max_pos=rest[0] if rest else MAX_POS).to_dict())

    def scale(name):
        return inv_freq(parsed(name), HEAD_DIM, 4096, np.arange(4)[None])[1]

    def cos(rope, length=300, max_pos=4096):
        return ours(rope, positions_for(length), max_pos)[0]

    assert scale("yarn-4") == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert scale("yarn-mscale") == pytest.approx((0.1 * 0.707 * math.log(4) + 1) / (0.1 * math.log(4) + 1))
    assert scale("yarn-mscale-equal") == 1.0
    assert scale("yarn-attn-factor-no-truncate-betas") == pytest.approx(1.25)
    yarn = parsed("yarn-4")
    assert np.max(np.abs(cos(yarn) - cos(dataclasses.replace(yarn, truncate=False)))) > 1e-3
    assert np.max(np.abs(cos(yarn) - cos(dataclasses.replace(yarn, beta_fast=16.0, beta_slow=2.0)))) > 1e-3
    assert np.max(np.abs(cos(yarn) / scale("yarn-4") - cos(RopeConfig(rope_type="linear", factor=4.0)))) > 1e-3
    llama3 = parsed("llama3-a")
    assert np.max(np.abs(cos(llama3) - cos(dataclasses.replace(llama3, high_freq_factor=8.0)))) > 1e-3
    longrope = parsed("longrope-derived")
    assert inv_freq(longrope, HEAD_DIM, MAX_POS, np.arange(4)[None])[1] == pytest.approx(
        math.sqrt(1 + math.log(2) / math.log(32)))
    short = inv_freq(longrope, HEAD_DIM, MAX_POS, np.arange(32)[None])[0]
    long = inv_freq(longrope, HEAD_DIM, MAX_POS, np.arange(33)[None])[0]
    assert not np.allclose(short, long)
    dyn = RopeConfig(rope_type="dynamic", factor=2.0)
    base = inv_freq(dyn, HEAD_DIM, MAX_POS, np.arange(64)[None])[0]
    grown = inv_freq(dyn, HEAD_DIM, MAX_POS, np.arange(65)[None])[0]
    assert float(grown[-1]) < float(base[-1])


def test_real_size_inv_freq_within_one_ulp():
    """Full-size heads (DeepSeek-VL: head_dim 128, theta 10000) and other thetas: inv_freq within 1 ulp of HF."""
    for theta in (10000.0, 500000.0, 1e6, 12345.6):
        for head_dim in (64, 96, 128):
            config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                 num_hidden_layers=1, intermediate_size=8, vocab_size=8,
                                 rope_parameters={"rope_type": "default", "rope_theta": theta})
            hf_inv = LlamaRotaryEmbedding(config).inv_freq.numpy()
            inv, _ = inv_freq(RopeConfig(theta=theta), head_dim, 2048, np.zeros((1, 1), np.int32))
            np.testing.assert_array_max_ulp(np.asarray(inv), hf_inv, maxulp=1)
            if theta == 10000.0 and head_dim in (64, 128):  # the DeepSeek-VL settings are bit exact
                np.testing.assert_array_equal(np.asarray(inv), hf_inv)


@pytest.mark.parametrize(
    "schedule",
    [
        [100] + list(range(101, 110)),  # prefill beyond max positions, then one token at a time
        [50] + list(range(51, 70)),  # prefill below, decoding crosses max_position_embeddings (64)
        [64, 65, 66, 130, 131],
    ],
    ids=["prefill-above", "cross", "jumps"],
)
def test_dynamic_generation_monotonic(schedule):
    config = hf_config({"rope_type": "dynamic", "factor": 2.0}, 10000.0)
    rope = RopeConfig.from_hf(config.to_dict())
    module = LlamaRotaryEmbedding(config)  # one stateful module across all calls
    step = jax.jit(rope_cos_sin, static_argnums=(0, 1, 2))
    prev = None
    for i, seq_len in enumerate(schedule):
        if i == 0:
            pos = positions_for(seq_len)
        else:
            pos = np.full((2, 1), seq_len - 1, np.int32)
            pos[1, 0] -= 3  # left-padded row is behind; the batch max still drives the update
        hf_cos, hf_sin = hf_cos_sin(module, pos)
        cos, sin = step(rope, HEAD_DIM, MAX_POS, jnp.asarray(pos))
        assert_close(cos, hf_cos, f"cos step {i} L={seq_len}")
        assert_close(sin, hf_sin, f"sin step {i} L={seq_len}")
        if prev is not None and seq_len > MAX_POS:
            # the frequencies really change from call to call once beyond max positions
            assert not np.array_equal(module.inv_freq.numpy(), prev)
        prev = module.inv_freq.numpy().copy()


def test_dynamic_non_monotonic_is_stateless():
    """Documented deviation: after growing to 150, a call of length 100 gets length-100 frequencies (a fresh
    HF module), whereas HF's stateful module keeps the length-150 ones."""
    config = hf_config({"rope_type": "dynamic", "factor": 2.0}, 10000.0)
    rope = RopeConfig.from_hf(config.to_dict())
    stateful = LlamaRotaryEmbedding(config)
    hf_cos_sin(stateful, positions_for(150))
    pos = positions_for(100)
    kept_cos, _ = hf_cos_sin(stateful, pos)
    fresh_cos, fresh_sin = hf_cos_sin(LlamaRotaryEmbedding(config), pos)
    cos, sin = ours(rope, pos)
    assert_close(cos, fresh_cos, "cos vs fresh")
    assert_close(sin, fresh_sin, "sin vs fresh")
    assert np.max(np.abs(cos - kept_cos)) > 1e-3
    # shorter than max positions after growth: HF resets, so both agree again
    pos = positions_for(30)
    hf_cos, _ = hf_cos_sin(stateful, pos)
    assert_close(ours(rope, pos)[0], hf_cos, "cos after reset")


def test_apply_rope_matches_hf():
    rng = np.random.default_rng(0)
    for params, theta in [({"rope_type": "default"}, 10000.0), (CASE["yarn-mscale"][1], 10000.0),
                          (CASE["longrope-derived"][1], 10000.0)]:
        config = hf_config(params, theta)
        rope = RopeConfig.from_hf(config.to_dict())
        pos = positions_for(48)
        hf_cos, hf_sin = hf_cos_sin(LlamaRotaryEmbedding(config), pos)
        q = rng.standard_normal((2, 48, HEADS, HEAD_DIM)).astype(np.float32)
        k = rng.standard_normal((2, 48, 2, HEAD_DIM)).astype(np.float32)
        hq, hk = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2),
                                      torch.from_numpy(hf_cos), torch.from_numpy(hf_sin))
        cos, sin = _rope_cos_sin_jit(rope, HEAD_DIM, MAX_POS, jnp.asarray(pos))
        oq, ok = _apply_rope_jit(jnp.asarray(q), cos, sin), _apply_rope_jit(jnp.asarray(k), cos, sin)
        assert oq.shape == q.shape and ok.shape == k.shape
        assert_close(oq, hq.transpose(1, 2).numpy(), "q")
        assert_close(ok, hk.transpose(1, 2).numpy(), "k")
        assert np.max(np.abs(np.asarray(oq) - q)) > 0.1  # rotation did something


def test_apply_rope_keeps_dtype():
    x = jnp.ones((1, 3, 2, HEAD_DIM), jnp.bfloat16)
    fn = jax.jit(rope_cos_sin, static_argnums=(0, 1, 2, 4))
    cos, sin = fn(RopeConfig(), HEAD_DIM, MAX_POS, jnp.arange(3)[None], jnp.bfloat16)
    assert cos.dtype == jnp.bfloat16
    assert _apply_rope_jit(x, cos, sin).dtype == jnp.bfloat16
    c32, s32 = fn(RopeConfig(), HEAD_DIM, MAX_POS, jnp.arange(3)[None], jnp.float32)
    out = _apply_rope_jit(x, c32, s32)
    assert out.dtype == jnp.bfloat16
    # cos/sin are cast to bf16 before use, like HF: same result as bf16 cos/sin
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(_apply_rope_jit(x, cos, sin), np.float32))
    with pytest.raises(ValueError, match="head dim"):
        apply_rope(jnp.ones((1, 3, 2, 8)), c32, s32)


OLD_STYLE = {
    "default": {"rope_scaling": None},
    "linear": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "dynamic": {"rope_scaling": {"type": "dynamic", "factor": 3.0}},
    "yarn": {"rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                              "original_max_position_embeddings": 16, "mscale": 0.707, "mscale_all_dim": 1.0,
                              "beta_fast": 16, "truncate": False}},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    "longrope": {"rope_scaling": {"type": "longrope", "short_factor": list(SHORT), "long_factor": list(LONG)}},
}


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_from_hf_old_and_new_spelling_agree(rope_type):
    old = {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "max_position_embeddings": MAX_POS,
           "rope_theta": 20000.0, **copy.deepcopy(OLD_STYLE[rope_type])}
    old_snapshot = copy.deepcopy(old)
    from_old = RopeConfig.from_hf(old)
    assert old == old_snapshot  # input not mutated
    scaling = copy.deepcopy(OLD_STYLE[rope_type]["rope_scaling"]) or {}
    scaling.pop("type", None)
    new_params = {"rope_type": rope_type, "rope_theta": 20000.0, **scaling}
    config = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, max_position_embeddings=MAX_POS,
                         num_hidden_layers=1, intermediate_size=8, vocab_size=8, rope_parameters=new_params)
    from_new = RopeConfig.from_hf(config.to_dict())
    assert from_old == from_new
    assert from_new.rope_type == rope_type and from_new.theta == 20000.0
    hash(from_new)
    # and the parsed config reproduces HF's module built from the old spelling
    hf_old = LlamaConfig(num_hidden_layers=1, intermediate_size=8, vocab_size=8, **copy.deepcopy(old))
    pos = positions_for(90)
    hf_cos, hf_sin = hf_cos_sin(LlamaRotaryEmbedding(hf_old), pos)
    cos, sin = ours(from_old, pos)
    assert_close(cos, hf_cos, "cos")
    assert_close(sin, hf_sin, "sin")


def test_from_hf_defaults_and_precedence():
    # nothing given: default rope, theta 10000
    assert RopeConfig.from_hf({}) == RopeConfig()
    assert RopeConfig.from_hf({"rope_scaling": None, "rope_theta": 5.0}) == RopeConfig(theta=5.0)
    # rope_theta inside the dict beats the top-level one; rope_type beats legacy type
    parsed = RopeConfig.from_hf({"rope_theta": 1.0, "rope_scaling": {"type": "dynamic", "rope_type": "linear",
                                                                     "factor": 2, "rope_theta": 7.0}})
    assert parsed == RopeConfig(rope_type="linear", theta=7.0, factor=2.0)
    # original_max_position_embeddings for yarn/llama3/longrope defaults to max_position_embeddings (2048 if absent)
    assert RopeConfig.from_hf({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}) == RopeConfig(
        rope_type="yarn", factor=2.0, original_max_position_embeddings=2048)
    assert RopeConfig.from_hf({"max_position_embeddings": 77, "rope_scaling": {"type": "yarn", "factor": 2.0}}
                              ).original_max_position_embeddings == 77
    # explicit `truncate: null` disables truncation in HF
    assert RopeConfig.from_hf({"rope_scaling": {"type": "yarn", "factor": 2.0, "truncate": None}}).truncate is False
    # partial_rotary_factor is ignored by LLaMA's default rope
    assert RopeConfig.from_hf({"partial_rotary_factor": 0.5}) == RopeConfig()


def test_from_hf_top_level_original_max_position_embeddings_wins():
    """HF quirk: a top-level `original_max_position_embeddings` replaces the one in the rope dict once the rotary
    module re-standardises the config (to_dict() taken before that still shows the stale inner value)."""
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    config = hf_config(params, 10000.0, original_max_position_embeddings=16)
    rope = RopeConfig.from_hf(config.to_dict())
    assert rope.original_max_position_embeddings == 16
    module = LlamaRotaryEmbedding(config)
    assert config.rope_parameters["original_max_position_embeddings"] == 16
    pos = positions_for(60)
    hf_cos, _ = hf_cos_sin(module, pos)
    assert_close(ours(rope, pos)[0], hf_cos, "cos")


def test_from_hf_errors():
    with pytest.raises(ValueError, match=r"'foo'.*default, linear, dynamic, yarn, llama3, longrope"):
        RopeConfig.from_hf({"rope_parameters": {"rope_type": "foo"}})
    with pytest.raises(ValueError, match="'factor'"):
        RopeConfig.from_hf({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0}})
    with pytest.raises(ValueError, match="'factor'"):
        RopeConfig.from_hf({"rope_scaling": {"type": "dynamic"}})
    with pytest.raises(ValueError, match="'low_freq_factor'"):
        RopeConfig.from_hf({"rope_scaling": {"type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}})
    with pytest.raises(ValueError, match="'long_factor'"):
        RopeConfig.from_hf({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8}})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        RopeConfig.from_hf({"partial_rotary_factor": 0.5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="'bar'"):
        RopeConfig(rope_type="bar")
    # HF agrees that these are errors
    with pytest.raises(KeyError, match="factor"):
        LlamaConfig(rope_parameters={"rope_type": "linear"})


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in {
    "default", "linear-2", "dynamic-2", "yarn-mscale", "llama3-a", "longrope-derived"}], ids=lambda c: c[0])
def test_jit_with_traced_positions(case):
    _, params, theta, *_ = case
    config = hf_config(params, theta)
    rope = RopeConfig.from_hf(config.to_dict())
    traces = []

    def counted(*args):
        traces.append(1)
        return rope_cos_sin(*args)

    fn = jax.jit(counted, static_argnums=(0, 1, 2))
    # same shape, different values: one compilation must serve both sides of the dynamic/longrope thresholds
    pos_a = np.tile(np.arange(40, dtype=np.int32), (2, 1))
    pos_b = pos_a + 60
    for pos in (pos_a, pos_b):
        hf_cos, hf_sin = hf_cos_sin(LlamaRotaryEmbedding(config), pos)
        cos, sin = fn(rope, HEAD_DIM, MAX_POS, jnp.asarray(pos))
        assert_close(cos, hf_cos, "jit cos")
        assert_close(sin, hf_sin, "jit sin")
    assert len(traces) == 1
