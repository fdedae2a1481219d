"""The sampler on its own, driven by fake logits: closed-form top-k / top-p sets, temperature statistics,
transformers' logits processors on random logits, seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from deepseek_vl_jax.generation import sampling

S = sampling


def kept(logits) -> set[int]:
    return set(np.flatnonzero(np.isfinite(np.asarray(logits)[0])).tolist())


def test_top_k_keeps_exactly_the_k_largest_and_ties():
    logits = jnp.array([[0.0, 4.0, 1.0, 3.0, 2.0]])
    assert kept(S.top_k_filter(logits, jnp.int32(2))) == {1, 3}
    assert kept(S.top_k_filter(logits, jnp.int32(1))) == {1}
    assert kept(S.top_k_filter(logits, jnp.int32(99))) == {0, 1, 2, 3, 4}  # k > V keeps all (torch clamps too)
    ties = jnp.array([[1.0, 3.0, 3.0, 0.0]])
    assert kept(S.top_k_filter(ties, jnp.int32(1))) == {1, 2}  # the k-th value's ties survive, as in HF
    np.testing.assert_array_equal(np.asarray(S.top_k_filter(logits, jnp.int32(2)))[0, [1, 3]], [4.0, 3.0])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.asarray(np.log(probs), jnp.float32)
    assert kept(S.top_p_filter(logits, jnp.float32(0.45))) == {1}
    assert kept(S.top_p_filter(logits, jnp.float32(0.7))) == {1, 3}
    assert kept(S.top_p_filter(logits, jnp.float32(0.9))) == {1, 2, 3}
    assert kept(S.top_p_filter(logits, jnp.float32(0.99))) == {0, 1, 2, 3}
    assert kept(S.top_p_filter(logits, jnp.float32(0.0))) == {1}  # always keeps the most likely
    assert kept(S.top_p_filter(logits, jnp.float32(1.0))) == {0, 1, 2, 3}


def test_repetition_penalty_closed_form():
    logits = jnp.array([[2.0, -2.0, 3.0, -1.0]])
    seen = S.mark_seen(jnp.zeros((1, 4), bool), jnp.array([[0, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(seen), [[True, True, False, False]])
    np.testing.assert_allclose(np.asarray(S.repetition_penalty(logits, seen, jnp.float32(2.0))),
                               [[1.0, -4.0, 3.0, -1.0]])
    masked = S.mark_seen(jnp.zeros((1, 4), bool), jnp.array([[2, 3]]), jnp.array([[0, 1]]))
    np.testing.assert_array_equal(np.asarray(masked), [[False, False, False, True]])


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (1.0, 0, 0.9, 1.0), (0.7, 0, 1.0, 1.3), (1.3, 10, 1.0, 1.0), (0.5, 50, 0.8, 1.2), (2.0, 0, 0.3, 0.8),
    (1.0, 1, 1.0, 1.0), (0.9, 30, 0.95, 1.5),
])
def test_processors_match_transformers_on_random_logits(temperature, top_k, top_p, penalty):
    rng = np.random.default_rng(int(temperature * 100 + top_k + top_p * 10))
    b, v = 4, 300
    logits = (rng.standard_normal((b, v)) * 3).astype(np.float32)
    ids = rng.integers(0, v, size=(b, 12))
    want = torch.from_numpy(logits.copy())
    tids = torch.from_numpy(ids)
    procs = []
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty))
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    for p in procs:
        want = p(tids, want)
    want = want.numpy()
    sampler = S.Sampler.create(True, temperature, top_k, top_p, penalty)
    params = S.SamplingParams.create(temperature, top_k, top_p, penalty)
    seen = S.mark_seen(jnp.zeros((b, v), bool), jnp.asarray(ids))
    got = np.asarray(S.process_logits(sampler, params, jnp.asarray(logits), seen))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    assert np.isfinite(got).sum(-1).min() >= 1
    if top_k or top_p < 1:
        assert (~np.isfinite(got)).any()  # the filters removed something
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6)


def test_greedy_applies_only_the_repetition_penalty():
    logits = jnp.array([[1.0, 5.0, 4.0], [0.0, 1.0, 2.0]])
    seen = jnp.array([[False, True, False], [False, False, False]])
    greedy = S.Sampler.create(False, 0.5, 1, 0.1, 2.0)
    assert greedy == S.Sampler(repetition_penalty=True)
    params = S.SamplingParams.create(0.5, 1, 0.1, 2.0)
    np.testing.assert_array_equal(np.asarray(S.sample(greedy, params, logits, jax.random.key(0), seen)), [2, 2])


def test_temperature_scales_the_distribution():
    logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))
    n = 40000
    batch = jnp.broadcast_to(logits, (n, 3))
    for t in (0.5, 1.0, 2.0):
        sampler = S.Sampler.create(True, t, 0, 1.0, 1.0)
        draws = np.asarray(S.sample(sampler, S.SamplingParams.create(temperature=t), batch, jax.random.key(1)))
        freq = np.bincount(draws, minlength=3) / n
        want = np.asarray(jax.nn.softmax(logits / t))
        np.testing.assert_allclose(freq, want, atol=0.01)


def test_top_k_and_top_p_sample_only_kept_tokens_in_proportion():
    logits = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.07, 0.03]))
    n = 40000
    batch = jnp.broadcast_to(logits, (n, 5))
    sampler = S.Sampler.create(True, 1.0, 2, 1.0, 1.0)
    draws = np.asarray(S.sample(sampler, S.SamplingParams.create(top_k=2), batch, jax.random.key(2)))
    freq = np.bincount(draws, minlength=5) / n
    np.testing.assert_allclose(freq, [4 / 7, 3 / 7, 0, 0, 0], atol=0.01)
    sampler = S.Sampler.create(True, 1.0, 0, 0.85, 1.0)  # keeps {0, 1, 2} (mass 0.9 >= 0.85)
    draws = np.asarray(S.sample(sampler, S.SamplingParams.create(top_p=0.85), batch, jax.random.key(3)))
    freq = np.bincount(draws, minlength=5) / n
    np.testing.assert_allclose(freq, [4 / 9, 3 / 9, 2 / 9, 0, 0], atol=0.01)


def test_seed_reproduces_and_different_seeds_differ():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((8, 100)), jnp.float32)
    sampler = S.Sampler.create(True, 1.0, 0, 1.0, 1.0)
    params = S.SamplingParams.create()
    a = np.asarray(S.sample(sampler, params, logits, jax.random.key(5)))
    b = np.asarray(S.sample(sampler, params, logits, jax.random.key(5)))
    c = np.asarray(S.sample(sampler, params, logits, jax.random.key(6)))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_invalid_values():
    with pytest.raises(ValueError, match="repetition_penalty"):
        S.Sampler.create(False, 1.0, 0, 1.0, 0.0)
    with pytest.raises(ValueError, match="top_k"):
        S.Sampler.create(True, 1.0, -1, 1.0, 1.0)
    assert S.Sampler.create(False, 0.0, 0, 1.0, 1.0) == S.Sampler()  # temperature is ignored when greedy
