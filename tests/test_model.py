"""End-to-end logits parity with transformers' DeepseekVL(Hybrid)ForConditionalGeneration on the same weights.

float32 on CPU; tolerance: max |ours - theirs| <= 1e-5 x max |theirs| over the non-padding positions.
Reference checkpoints are built here with transformers (random init, every weight perturbed, save_pretrained).
"""

import numpy as np
import pytest

import deepseek_vl_jax as D
from deepseek_vl_jax import multimodal

import hf_fixtures as F

TOL = 1e-5

CASES = {
    # name: (hybrid, text overrides, tie)
    "vl-gqa-tied": (False, {}, True),
    "vl-mha-untied": (False, {"num_key_value_heads": 4}, False),
    "vl-linear-rope": (False, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, True),
    "vl-dynamic-rope": (False, {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
                                "max_position_embeddings": 32}, True),
    "vl-yarn-rope": (False, {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                 "original_max_position_embeddings": 16}}, True),
    "vl-llama3-rope": (False, {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "rope_theta": 5e5,
                                                   "original_max_position_embeddings": 16}}, True),
    "vl-longrope": (False, {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                "long_factor": [2.0 + 0.3 * i for i in range(8)],
                                                "original_max_position_embeddings": 16}}, True),
    "hybrid-gqa-untied": (True, {}, False),
    "hybrid-tied": (True, {"num_key_value_heads": 1}, True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            hybrid, text, tie = CASES[name]
            cfg = F.make_config(hybrid=hybrid, text=text, tie=tie)
            ref = F.make_model(cfg, seed=len(cache))
            path = F.save(ref, tmp_path_factory.mktemp(name))
            cache[name] = (cfg, ref, D.load_pretrained(path, progress=False))
        return cache[name]

    return get


def _compare(cfg, ref, model, inputs):
    want = F.torch_logits(ref, inputs, F.mask_positions(inputs["attention_mask"]))
    got = np.asarray(model(**inputs))
    assert got.shape == want.shape
    err = F.max_rel_err(got, want, inputs["attention_mask"])
    assert err <= TOL, err
    return got


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_images_in_one_row_one_in_another(checkpoints, name):
    cfg, ref, model = checkpoints(name)
    inputs = F.make_inputs(cfg, rows=((2, 0), (1, 3)), padding="right")
    _compare(cfg, ref, model, inputs)


@pytest.mark.parametrize("name", ["vl-gqa-tied", "hybrid-gqa-untied"])
def test_left_padding_and_text_only(checkpoints, name):
    cfg, ref, model = checkpoints(name)
    _compare(cfg, ref, model, F.make_inputs(cfg, rows=((1, 0), (0, 6)), padding="left"))
    _compare(cfg, ref, model, F.make_inputs(cfg, rows=((0, 0), (0, 4)), padding="right"))


def test_image_features_land_in_image_token_runs(checkpoints):
    """Images are consumed in row-major order: swapping the two images changes exactly the rows that hold them."""
    cfg, ref, model = checkpoints("vl-gqa-tied")
    inputs = F.make_inputs(cfg, rows=((1, 0), (1, 0)))
    swapped = dict(inputs, pixel_values=inputs["pixel_values"][::-1].copy())
    a, b = np.asarray(model(**inputs)), np.asarray(model(**swapped))
    for r in range(2):
        alone = np.asarray(model(**{k: v[r:r + 1] for k, v in inputs.items()}))[0]
        np.testing.assert_allclose(a[r], alone, rtol=0, atol=1e-4)
    assert np.abs(a - b).max() > 1e-3


def test_row_alone_equals_row_in_left_padded_batch(checkpoints):
    cfg, ref, model = checkpoints("vl-gqa-tied")
    batch = F.make_inputs(cfg, rows=((1, 0), (0, 9)), padding="left")
    alone = {k: v[:1] for k, v in batch.items()}
    keep = batch["attention_mask"][0].astype(bool)
    alone = {"input_ids": alone["input_ids"][:, keep], "attention_mask": alone["attention_mask"][:, keep],
             "pixel_values": batch["pixel_values"]}
    got = np.asarray(model(**batch))[0][keep]
    np.testing.assert_allclose(got, np.asarray(model(**alone))[0], rtol=0, atol=1e-4)


def test_image_count_mismatch_is_a_clear_error(checkpoints):
    cfg, ref, model = checkpoints("vl-gqa-tied")
    inputs = F.make_inputs(cfg, rows=((1, 0), (1, 0)))
    with pytest.raises(D.ImageTokenError, match=r"hold 32 image tokens .* but 1 image\(s\) x 16 tokens = 16"):
        model(**dict(inputs, pixel_values=inputs["pixel_values"][:1]))
    with pytest.raises(D.ImageTokenError, match="hold 32 image tokens"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def test_hybrid_requires_high_res_pixels(checkpoints):
    cfg, ref, model = checkpoints("hybrid-tied")
    inputs = F.make_inputs(cfg, rows=((1, 0),))
    with pytest.raises(ValueError, match="needs high_res_pixel_values"):
        model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    with pytest.raises(ValueError, match="channels"):
        model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"][:, :, :8])


def test_merge_image_embeddings_closed_form():
    embeds = np.zeros((2, 4, 1), np.float32)
    ids = np.array([[9, 7, 7, 9], [7, 9, 9, 7]])
    feats = np.arange(1, 5, dtype=np.float32).reshape(2, 2, 1)
    out = np.asarray(multimodal.merge_image_embeddings(embeds, ids, feats, 7))[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 0], [3, 0, 0, 4]])
    np.testing.assert_array_equal(np.asarray(multimodal.positions_from_mask(np.array([[0, 0, 1, 1], [1, 1, 1, 0]]))),
                                  [[0, 0, 0, 1], [0, 1, 2, 2]])


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policy_changes_memory_not_math(checkpoints, policy):
    """Gradients with rematerialisation equal gradients without (the policy is a config field)."""
    import jax
    import jax.numpy as jnp

    from deepseek_vl_jax.model import DeepseekVL

    cfg, ref, model = checkpoints("vl-gqa-tied")
    inputs = F.make_inputs(cfg, rows=((1, 0),))
    args = (jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"]),
            jnp.asarray(inputs["pixel_values"]))

    def loss(params, module):
        return jnp.mean(module.apply({"params": params}, *args) ** 2)

    plain = jax.grad(loss)(model.params, DeepseekVL(model.config))
    remat = jax.grad(loss)(model.params, DeepseekVL(model.config.replace(remat_policy=policy)))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_with_float32_params(checkpoints):
    """The TPU/GPU mode: float32 master params, bfloat16 matmuls, float32 norms/softmax/logits."""
    from deepseek_vl_jax.pretrained import Model

    cfg, ref, model = checkpoints("hybrid-gqa-untied")
    inputs = F.make_inputs(cfg, rows=((1, 0), (0, 2)))
    mixed = Model(model.config.replace(dtype="bfloat16"), model.params)
    got = np.asarray(mixed(**inputs))
    assert got.dtype == np.float32
    want = np.asarray(model(**inputs))
    err = F.max_rel_err(got, want, inputs["attention_mask"])
    assert 1e-6 < err < 0.05, err  # really computed in bfloat16, and still right
