"""The CPU decode forms of the quantized matmuls (quantization.ops: the default whole-kernel form with int4 as two
nibble planes, `planes_dot`; the block loop `blocked_dot`; the tied head's `blocked_attend`) against the whole-kernel
form of the prompt and a float64 reference, the same through generate, and what the compiled programs hold, counted,
not timed: the default decode step adds at most 1.5 (int8) / 3 (int4) kernels per quantized layer to the float32
step, the block loop's temporaries are a fraction of one layer's float kernels, and a prompt's cached attention
holds one query block's logits (layers.cached_attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_vl_jax as D
from deepseek_vl_jax import layers
from deepseek_vl_jax import quantization as Q
from deepseek_vl_jax.generation import kv_cache, loop, sampling, weights
from deepseek_vl_jax.generation.inputs import MAX_EOS, place, prepare_inputs
from deepseek_vl_jax.quantization import ops

import hf_fixtures as F

# Measured: both forms are within 1.1e-6 of the float64 product (max |error| / max |y|, K <= 256, an outlier column).
MATMUL_RTOL = 3e-6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 6-layer tiny DeepSeek-VL (hidden 128, intermediate 256, tied embeddings), as int8 with its embeddings and
    tied head quantized too, and as int4 (group 32)."""
    cfg = F.make_config(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                                  num_attention_heads=4, num_key_value_heads=2), tie=True)
    path = F.save(F.make_model(cfg, seed=5), tmp_path_factory.mktemp("ops"))
    quantize = {"int8": Q.QuantizeConfig("int8", embeddings=True), "int4": Q.QuantizeConfig("int4", 32),
                "float32": None}
    return cfg, {k: D.load_pretrained(path, progress=False, quantize=q) for k, q in quantize.items()}


def _whole_form(monkeypatch):
    monkeypatch.setattr(ops, "BLOCKED_ROWS", 0)
    loop.programs.cache_clear()  # the generation programs retrace with the prompt's whole-kernel form


def _blocked_form(monkeypatch):
    monkeypatch.setattr(ops, "DECODE_FORM", ops.DecodeForm.BLOCKED)
    loop.programs.cache_clear()


def _split_decoder(monkeypatch):
    monkeypatch.setattr(weights, "split_on", lambda model: True)
    loop.programs.cache_clear()


def _rel(a, ref):
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("scheme,group,k,rows", [("int8", 0, 96, 1), ("int8", 0, 256, 4), ("int4", 32, 96, 4),
                                                  ("int4", 128, 256, 1)])
def test_decode_forms_equal_the_whole_form(scheme, group, k, rows, monkeypatch):
    rng = np.random.default_rng(k + rows)
    w = rng.standard_normal((k, 80)).astype(np.float32)
    w[:, 3] *= 40  # an outlier column
    qt = jax.tree.map(jnp.asarray, Q.quantize(w, scheme, group or 128))
    x = jnp.asarray(rng.standard_normal((rows, 1, k)).astype(np.float32))
    ref = np.asarray(x, np.float64) @ np.asarray(Q.dequantize(qt), np.float64)
    dense = lambda: jax.jit(lambda x, q: Q.dense(x, q, jnp.float32))
    assert not ops._blocked(x, qt, 0) and "while" not in dense().lower(x, qt).as_text()  # the default: no loop
    default = dense()(x, qt)
    monkeypatch.setattr(ops, "DECODE_FORM", ops.DecodeForm.BLOCKED)
    assert ops._blocked(x, qt, 0) and "while" in dense().lower(x, qt).as_text()  # the block loop
    blocked = dense()(x, qt)
    monkeypatch.setattr(ops, "BLOCKED_ROWS", 0)
    whole = dense()(x, qt)
    for y in (default, blocked, whole):
        assert _rel(y, ref) < MATMUL_RTOL and y.shape == (rows, 1, 80)


def test_blocked_tied_head_equals_the_whole_form(monkeypatch):
    rng = np.random.default_rng(7)
    table = rng.standard_normal((1536, 64)).astype(np.float32)
    qt = jax.tree.map(jnp.asarray, Q.quantize(table, "int8", axis=-1))
    h = jnp.asarray(rng.standard_normal((2, 64)).astype(np.float32))
    ref = np.asarray(h, np.float64) @ np.asarray(Q.dequantize(qt), np.float64).T
    blocked = jax.jit(lambda h, q: Q.embed_attend(h, q, jnp.float32))(h, qt)
    monkeypatch.setattr(ops, "BLOCKED_ROWS", 0)
    whole = jax.jit(lambda h, q: Q.embed_attend(h, q, jnp.float32))(h, qt)
    assert _rel(blocked, ref) < MATMUL_RTOL and _rel(whole, ref) < MATMUL_RTOL


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_generate_with_each_decode_form_equals_the_whole_form(models, scheme, monkeypatch):
    """Same greedy tokens and log-probabilities to float32 noise (measured <= 2e-6): decode steps in the default
    form and in the block loop, against the prompt's whole-kernel form everywhere, with the decoder scanned (the
default for quantized layers)."""
    cfg, quantized = models
    model = quantized[scheme]
    batch = F.make_inputs(cfg, rows=((1, 0), (0, 4)), padding="left")
    run = lambda: D.generate(model, batch, max_new_tokens=6, eos_token_id=-1, return_dict=True)
    loop.programs.cache_clear()
    default = run()
    _blocked_form(monkeypatch)
    blocked = run()
    _whole_form(monkeypatch)
    whole = run()
    loop.programs.cache_clear()
    for got in (default, blocked):
        np.testing.assert_array_equal(got.sequences, whole.sequences)
        np.testing.assert_allclose(got.logprobs, whole.logprobs, rtol=0, atol=1e-5)


def _compiled_step(model, batch, max_new_tokens=8):
    """The compiled decode step (state donated) of `model` for `batch`."""
    c = model.config
    sampler = sampling.Sampler.create(False, 1.0, 0, 1.0, 1.0)
    sp = sampling.SamplingParams.create(1.0, 0, 1.0, 1.0)
    stop = loop.StopParams(eos=jnp.full((MAX_EOS,), -1, jnp.int32), pad=jnp.int32(0),
                           max_new_tokens=jnp.int32(max_new_tokens))
    progs = loop.programs(c, sampler, None)
    params = weights.generation_params(model)
    inputs = place(prepare_inputs(model, batch, max_new_tokens)[0], None)
    state = progs.prefill(params, inputs, jax.random.key(0), sp, stop, kv_cache.gen_buffer_length(max_new_tokens))
    return progs.step.lower(params, state, sp, stop).compile()


def _float_kernel_bytes(layer) -> int:
    """float32 bytes of one layer's Dense kernels (what a dequantized copy of that layer would take)."""
    leaves = jax.tree.leaves(layer, is_leaf=lambda x: isinstance(x, Q.QTensor))
    return sum(4 * int(np.prod(x.shape)) for x in leaves if isinstance(x, Q.QTensor))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_decode_step_temporaries_are_a_fraction_of_one_layer(models, scheme, monkeypatch):
    """The block loop: the step's temporaries stay below a quarter of ONE layer's float32 kernels (each block
    converts 64 rows); the default form needs at least one whole kernel in float32. The decoder split into
    per-layer trees (a scanned one adds its slices of the KV cache to the temporaries)."""
    cfg, quantized = models
    model = quantized[scheme]
    batch = F.make_inputs(cfg, rows=((1, 0),), padding="left")
    _split_decoder(monkeypatch)
    layer0 = weights.generation_params(model)["layers"][0]
    one_layer = _float_kernel_bytes(layer0)
    largest = max(4 * int(np.prod(x.shape)) for x in jax.tree.leaves(
        layer0, is_leaf=lambda x: isinstance(x, Q.QTensor)) if isinstance(x, Q.QTensor))
    loop.programs.cache_clear()
    whole = _compiled_step(model, batch).memory_analysis().temp_size_in_bytes
    _blocked_form(monkeypatch)
    blocked = _compiled_step(model, batch).memory_analysis().temp_size_in_bytes
    loop.programs.cache_clear()
    assert blocked < one_layer / 4, (blocked, one_layer)
    assert whole >= largest, (whole, largest)


# Kernels (fusions) the decode step adds per quantized Dense over the float32 step, both with the decoder split into
# per-layer trees: int8 the convert of its kernel (the scale multiply fuses into the consumer), int4 the two nibble
# planes and x's even/odd split. Measured on this 6-layer model: 1.14 / 2.71; the block loop: 5.1 / 7.8 (and one
# while loop per layer).
EXTRA_KERNELS = {"int8": 1.5, "int4": 3.0}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_decode_step_adds_few_kernels_per_quantized_layer(models, scheme, monkeypatch):
    """XLA:CPU keeps runtime memory per compiled kernel whatever its size (~60-100 KB at the 0.45B shape,
    benchmarks/bench_quantize.py), so the decode step's kernel count is its memory: counted in the optimized HLO.
    By default a quantized decoder is scanned (`weights.quantized_decoder`): the step compiles one layer's kernels,
    so it has at least the other layers' 7 converts per layer fewer kernels than with the decoder split."""
    cfg, models_ = models
    batch = F.make_inputs(cfg, rows=((1, 0),), padding="left")
    n = cfg.text_config.num_hidden_layers
    fusions = lambda m: _compiled_step(m, batch).as_text().count(" fusion(")
    loop.programs.cache_clear()
    assert weights.generation_params(models_[scheme])["layers"] is None
    scanned = fusions(models_[scheme])
    _split_decoder(monkeypatch)
    dense = sum(isinstance(x, Q.QTensor) and x.ndim == 2 and x.axis == -2 for layer in
                weights.generation_params(models_[scheme])["layers"] for x in
                jax.tree.leaves(layer, is_leaf=lambda x: isinstance(x, Q.QTensor)))
    assert dense == 7 * n
    base, split = fusions(models_["float32"]), fusions(models_[scheme])
    _blocked_form(monkeypatch)
    blocked = fusions(models_[scheme])
    loop.programs.cache_clear()
    assert (split - base) / dense <= EXTRA_KERNELS[scheme] < (blocked - base) / dense, (base, split, blocked)
    assert scanned + 7 * (n - 1) <= split, (scanned, split)


def test_prompt_attention_holds_one_query_block():
    """cached_attention over a 512-token prompt equals float64 softmax attention, and its compiled temporaries are
    below ONE [B, N, T, S + T] float32 array (attending all queries at once holds at least two: logits and
    probabilities; measured 18.4 MB there, 5.2 MB here against 8.9 MB for one)."""
    b, t, n, kh, h, s = 1, 512, 4, 2, 16, 576
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((b, t, m, h)).astype(np.float32) for m in (n, kh, kh))
    k_cache = rng.standard_normal((b, kh, s, h)).astype(np.float32)
    v_cache = rng.standard_normal((b, kh, h, s)).astype(np.float32)
    valid = np.zeros((b, s), bool)
    valid[:, :40] = True  # 40 old slots, then the prompt written at slot 40
    valid[:, 40:40 + t] = True
    causal = np.arange(s)[None, :] <= (40 + np.arange(t))[:, None]
    mask = (valid[:, None, :] & causal[None])[:, None]  # [B, 1, T, S]
    fn = jax.jit(lambda *a: layers.cached_attention(*a, 40, h**-0.5))
    args = (q, k, v, k_cache, v_cache, mask)
    got = np.asarray(fn(*args))
    # float64 reference: the cache with the prompt's keys/values written at slots [40, 40 + t)
    keys = np.array(k_cache.transpose(0, 2, 1, 3), np.float64)  # [B, S, K, H]
    vals = np.array(v_cache.transpose(0, 3, 1, 2), np.float64)
    keys[:, 40:40 + t], vals[:, 40:40 + t] = k, v
    g = n // kh
    kk, vv = np.repeat(keys, g, axis=2), np.repeat(vals, g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), kk) * h**-0.5
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bnts,bsnh->btnh", p, vv)
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    all_logits = 4 * b * n * t * (s + t)
    assert temp < all_logits, (temp, all_logits)
