"""quantization.qtensor: the closed-form error bound of each scheme on random and adversarial tensors, the int4
packing, and clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_vl_jax import quantization as Q


def _check_bound(w, qt, dtype=np.float32):
    got = np.asarray(Q.dequantize(qt, jnp.float32))
    assert got.shape == w.shape
    err = np.abs(got - w.astype(np.float32))
    bound = Q.error_bound(w, qt)
    # the bound itself is computed in float32: allow its own rounding (a few ulps of the weight)
    slack = 4 * np.finfo(np.float32).eps * np.abs(w.astype(np.float32))
    assert (err <= bound + slack).all(), float((err - bound).max())
    return err, bound


@pytest.mark.parametrize("scheme,group", [("int8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("scale_dtype", [np.float32, jnp.bfloat16])
def test_random_tensors_within_bound(scheme, group, scale_dtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 256, 96)).astype(np.float32)  # stacked [L, in, out]
    qt = Q.quantize(w, scheme, group or 128, scale_dtype=scale_dtype)
    assert qt.shape == w.shape and qt.scales.dtype == np.dtype(scale_dtype)
    err, bound = _check_bound(w, qt)
    # the bound is tight: rounding to the grid uses most of the half step somewhere
    assert err.max() > 0.9 * (bound.max() / 2 if scale_dtype is np.float32 else 0)
    # and the scale is the closed form absmax / qmax of each channel (int8) or group (int4)
    g = 1 if scheme == "int8" else 256 // group
    absmax = np.abs(w.reshape(2, g, 256 // g, 96)).max(axis=2)
    np.testing.assert_array_equal(np.asarray(qt.scales), (absmax / Q.QMAX[Q.Scheme(scheme)]).astype(scale_dtype))


def test_float32_scales_error_is_half_a_step():
    """With float32 scales the clipping term vanishes: |error| <= scale / 2 exactly as on paper."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    for scheme in ("int8", "int4"):
        qt = Q.quantize(w, scheme, 64)
        s = np.repeat(np.asarray(qt.scales), 128 // qt.scales.shape[0], axis=0)
        err = np.abs(np.asarray(Q.dequantize(qt)) - w)
        assert (err <= s / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_outlier_column_and_zero_group(scheme):
    """An outlier column only coarsens its own channel (int8) / the groups it is in (int4); an all-zero group (and
    an all-zero channel) comes back exactly zero, with no division by zero."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((128, 32)).astype(np.float32) * 0.01
    w[:, 5] *= 1e4  # outlier output column
    w[7, 9] = 300.0  # outlier input row inside one group of column 9
    w[:32, 3] = 0.0  # all-zero first group of column 3
    w[:, 11] = 0.0  # all-zero channel
    qt = Q.quantize(w, scheme, 32)
    err, bound = _check_bound(w, qt)
    back = np.asarray(Q.dequantize(qt))
    assert (back[:, 11] == 0).all() and np.isfinite(back).all()
    if scheme == "int4":
        assert (back[:32, 3] == 0).all()
        # column 9's other groups keep their fine step: the outlier's group alone pays for it
        assert err[32:, 9].max() <= 0.01 * 4 / 7
    # the other columns keep their own fine scale
    assert err[:, [0, 1, 2]].max() <= np.abs(w[:, [0, 1, 2]]).max() / Q.QMAX[Q.Scheme(scheme)] / 2 * 1.0001
    scales = np.asarray(qt.scales)
    assert scales[:, 5].min() > 100 * scales[:, 0].max()  # the outlier column's step is coarse, and its own
    assert err[:, 5].max() > 0.5 * bound[:, 5].max() / 2  # ...and the error really is of that size


def test_int4_packing_roundtrip_and_layout():
    q = np.arange(-8, 8, dtype=np.int8).reshape(16, 1).repeat(3, axis=1)  # [in=16, out=3]
    packed = Q.pack_int4(q, -2)
    assert packed.shape == (8, 3) and packed.dtype == np.uint8
    assert packed[0, 0] == ((-8 & 0xF) | ((-7 & 0xF) << 4))  # element 2i low nibble, 2i + 1 high
    np.testing.assert_array_equal(np.asarray(Q.unpack_int4(jnp.asarray(packed), -2)), q)
    emb = q.T.copy()  # reduced axis last
    np.testing.assert_array_equal(np.asarray(Q.unpack_int4(jnp.asarray(Q.pack_int4(emb, -1)), -1)), emb)


def test_embedding_rows_quantized_per_row():
    w = np.random.default_rng(3).standard_normal((50, 64)).astype(np.float32)
    w[4] *= 100
    qt = Q.quantize(w, "int8", axis=-1)
    assert qt.scales.shape == (50, 1)
    _check_bound(w, qt)
    ids = jnp.asarray([[4, 0, 49]])
    np.testing.assert_array_equal(np.asarray(Q.embed_lookup(ids, qt, jnp.float32)),
                                  np.asarray(Q.dequantize(qt))[np.asarray(ids)])
    h = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3, 64)).astype(np.float32))  # tied LM head
    want = np.einsum("btd,vd->btv", np.asarray(h, np.float64), np.asarray(Q.dequantize(qt), np.float64))
    np.testing.assert_allclose(np.asarray(Q.embed_attend(h, qt, jnp.float32)), want, rtol=1e-5, atol=1e-4)


def test_quantized_matmul_equals_dequantized_matmul():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((3, 5, 64)).astype(np.float32))
    for scheme in ("int8", "int4"):
        qt = Q.quantize(w, scheme, 16)
        want = np.einsum("bti,io->bto", np.asarray(x, np.float64), np.asarray(Q.dequantize(qt), np.float64))
        np.testing.assert_allclose(np.asarray(Q.dense(x, qt, jnp.float32)), want, rtol=1e-5, atol=1e-5)


def test_clear_errors():
    w = np.zeros((96, 8), np.float32)
    with pytest.raises(Q.QuantizationError, match="unknown quantization scheme 'int3'; expected one of int8, int4"):
        Q.quantize(w, "int3")
    with pytest.raises(Q.QuantizationError, match="group size 64 does not divide the input width 96 of w.*32"):
        Q.quantize(w, "int4", 64, what="w")
    with pytest.raises(Q.QuantizationError, match="positive even"):
        Q.QuantizeConfig("int4", 7)
    with pytest.raises(Q.QuantizationError, match="unknown quantization settings"):
        Q.QuantizeConfig.create({"scheme": "int8", "groups": 3})
