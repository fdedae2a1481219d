"""One-row Dense layers as blocked dots (`generation.row_dots`): the values against float64 numpy (within a
tolerance measured, tighter than flax's own Dense's), exactly when the form applies (one row, CPU, a float kernel whose
input axis splits into the blocks, no mesh), and that the CPU generation and serving programs trace one-row
decode steps in it and batches without it. Read from the values and the traced HLO, not from timing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_vl_jax.generation import loop, row_dots, sampling
from test_generation_cpu_options import args, model  # noqa: F401 (the tiny model fixture and its program arguments)

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the form applies on XLA:CPU only")

# Measured over the shapes below, seeds 0-2, as |y - float64| / max|float64|: the blocks at most 2.2e-7, flax's
# Dense (one XLA dot) at most 1.3e-6 (K = 2816; the blocks' 16 partial sums add fewer terms each).
TOL = 3e-7
PLAIN_TOL = 1.5e-6
BATCHED_DOT = "batching_dims = [0] x [0]"


def dense(features: int, use_bias: bool, k: int, rows: tuple, seed: int = 0):
    module = nn.Dense(features, use_bias=use_bias)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*rows, k)).astype(np.float32)
    params = module.init(jax.random.key(seed), jnp.asarray(x))
    if use_bias:
        params = {"params": dict(params["params"], bias=jnp.asarray(rng.standard_normal(features), jnp.float32))}
    return module, params, x


def run(module, params, x, active: bool = True):
    def f(p, x):
        with row_dots.one_row_dots(active):
            return module.apply(p, x)
    fn = jax.jit(f)
    return np.asarray(fn(params, x)), fn.lower(params, x).as_text()


@pytest.mark.parametrize("k, n, rows, bias", [(64, 96, (1, 1), True), (96, 64, (1,), False),
                                              (1024, 2816, (1, 1), False), (2816, 1024, (1, 1), True)])
def test_one_row_values_equal_float64(k, n, rows, bias):
    for seed in range(3):
        module, params, x = dense(n, bias, k, rows, seed)
        got, hlo = run(module, params, x)
        assert BATCHED_DOT in hlo and got.shape == (*rows, n)
        p = params["params"]
        want = x.astype(np.float64) @ np.asarray(p["kernel"], np.float64)
        if bias:
            want = want + np.asarray(p["bias"], np.float64)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() / scale <= TOL
        plain, _ = run(module, params, x, active=False)
        assert np.abs(plain - want).max() / scale <= PLAIN_TOL


@pytest.mark.parametrize("k, rows", [(64, (1, 2)), (64, (2, 1)), (48, (1, 1)), (72, (1, 1))])
def test_other_calls_run_unchanged(k, rows):
    """Two rows, an input axis below 4 blocks (48) or not a multiple of them (72): flax's own Dense, bit for bit."""
    module, params, x = dense(32, True, k, rows)
    got, hlo = run(module, params, x)
    plain, plain_hlo = run(module, params, x, active=False)
    assert BATCHED_DOT not in hlo and hlo == plain_hlo
    np.testing.assert_array_equal(got, plain)


def test_bfloat16_partial_sums_add_in_float32():
    """A bfloat16 Dense: the blocks' products and their sum in float32, the result rounded once to bfloat16 — no
    further from float64 than flax's bfloat16 Dense."""
    module = nn.Dense(256, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = np.random.default_rng(1).standard_normal((1, 1024)).astype(np.float32)
    params = module.init(jax.random.key(1), jnp.asarray(x, jnp.bfloat16))
    xb = jnp.asarray(x, jnp.bfloat16)
    got, hlo = run(module, params, xb)
    plain, _ = run(module, params, xb, active=False)
    assert BATCHED_DOT in hlo and got.dtype == jnp.bfloat16
    want = np.asarray(xb, np.float64) @ np.asarray(params["params"]["kernel"], np.float64)
    err = lambda y: np.abs(np.asarray(y, np.float64) - want).max()
    assert err(got) <= err(plain)


def step_hlo(model, rows: int, enabled: bool, monkeypatch) -> str:
    """The traced decode-step program of `loop.programs` made with `row_dots.ENABLED` = enabled."""
    monkeypatch.setattr(row_dots, "ENABLED", enabled)
    loop.programs.cache_clear()
    progs = loop.programs(model.config, sampling.Sampler(), None)
    a = args(model, rows)
    text = progs.step.lower(a[0], progs.prefill(*a), a[3], a[4]).as_text()
    loop.programs.cache_clear()
    return text


def test_generation_programs_trace_one_row_steps_in_blocks(model, monkeypatch):
    """A batch-1 decode step: every Dense of the decoder (7 per layer) as a blocked dot (this model's LM head is
    its tied embedding table, unchanged; an untied one is a Dense like the others); a batch of 2: none;
    `row_dots.ENABLED` off: none (what the benchmarks time against)."""
    assert step_hlo(model, 1, True, monkeypatch).count(BATCHED_DOT) == 7 * 2
    assert step_hlo(model, 2, True, monkeypatch).count(BATCHED_DOT) == 0
    assert step_hlo(model, 1, False, monkeypatch).count(BATCHED_DOT) == 0
