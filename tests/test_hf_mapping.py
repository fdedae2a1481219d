"""The HF <-> Flax mapping table: names, transforms, both directions, and the mismatch report."""

import numpy as np
import pytest

from deepseek_vl_jax import hf_mapping as M


def _template():
    r = np.random.default_rng(0)
    return {
        "language_model": {
            "embed_tokens": {"embedding": r.standard_normal((10, 4))},
            "layers": {"self_attn": {"q_proj": {"kernel": r.standard_normal((3, 4, 6))}},
                       "input_layernorm": {"scale": r.standard_normal((3, 4))}},
            "lm_head": {"kernel": r.standard_normal((4, 10))},
        },
        "vision_model": {
            "patch_embedding": {"kernel": r.standard_normal((2, 2, 3, 5))},
            "position_embedding": r.standard_normal((4, 5)),
            "head": {"in_proj_kernel": r.standard_normal((5, 15))},
        },
        "high_res_vision_model": {"layers_1": {"attn": {"rel_pos_h": r.standard_normal((5, 2))}}},
        "high_res_vision_alpha": r.standard_normal((1,)),
    }


def test_names_and_layouts():
    hf = M.flax_to_hf(_template())
    t = _template()
    assert set(hf) == {
        "model.language_model.embed_tokens.weight", "lm_head.weight",
        *(f"model.language_model.layers.{i}.self_attn.q_proj.weight" for i in range(3)),
        *(f"model.language_model.layers.{i}.input_layernorm.weight" for i in range(3)),
        "model.vision_model.embeddings.patch_embedding.weight",
        "model.vision_model.embeddings.position_embedding.weight",
        "model.vision_model.head.attention.in_proj_weight",
        "model.high_res_vision_model.vision_encoder.layers.1.attn.rel_pos_h",
        "model.high_res_vision_alpha",
    }
    np.testing.assert_array_equal(hf["model.language_model.layers.2.self_attn.q_proj.weight"],
                                  t["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"][2].T)
    np.testing.assert_array_equal(hf["model.vision_model.embeddings.patch_embedding.weight"],
                                  t["vision_model"]["patch_embedding"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(hf["lm_head.weight"], t["language_model"]["lm_head"]["kernel"].T)
    np.testing.assert_array_equal(hf["model.vision_model.head.attention.in_proj_weight"],
                                  t["vision_model"]["head"]["in_proj_kernel"].T)


def test_round_trip_is_exact():
    t = _template()
    back = M.hf_to_flax(M.flax_to_hf(t), t)
    for (p, a), (q, b) in zip(M._flatten(t), M._flatten(back)):
        assert p == q
        np.testing.assert_array_equal(a, b)


def test_mismatches_are_all_named():
    t = _template()
    hf = M.flax_to_hf(t)
    del hf["lm_head.weight"]
    hf["model.bogus"] = np.zeros(1)
    hf["model.high_res_vision_alpha"] = np.zeros(2)
    with pytest.raises(M.MappingError) as e:
        M.hf_to_flax(hf, t)
    msg = str(e.value)
    assert "missing tensors: lm_head.weight" in msg
    assert "unexpected tensors: model.bogus" in msg
    assert "model.high_res_vision_alpha: checkpoint (2,), model expects (1,)" in msg
