"""Quantized models end to end (quantization.params + ops through load_pretrained and generate): logits against
transformers' float32 model, the forward computing exactly from the quantized weights, generation on both decoder
layouts, and 8 simulated devices against one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_vl_jax as D
from deepseek_vl_jax import hf_mapping, sharding
from deepseek_vl_jax import quantization as Q
from deepseek_vl_jax.generation import weights

import hf_fixtures as F

# Measured on these checkpoints (max |error| / max |logit|, top-1 agreement over 35 positions):
# int8 0.009 / 94% (vl), 0.012 / 100% (hybrid); int4 group 32: 0.20 / 63% (vl), 0.25 / 83% (hybrid). The tiny
# random models have nearly flat logits (max ~2), so int4's top-1 agreement here is a floor, not its quality:
# tests/test_quantization_demo.py measures that on a trained model.
BOUNDS = {"int8": (0.02, 0.9), "int4": (0.35, 0.55)}
SCHEMES = {"int8": Q.QuantizeConfig("int8"), "int4": Q.QuantizeConfig("int4", 32)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (hf config, transformers model, path, inputs, transformers float32 logits). The vl model has an
    untied LM head, the hybrid model tied embeddings."""
    out = {}
    for kind in ("vl", "hybrid"):
        cfg = F.make_config(hybrid=kind == "hybrid", tie=kind == "hybrid")
        ref = F.make_model(cfg, seed=3)
        path = F.save(ref, tmp_path_factory.mktemp(kind))
        inputs = F.make_inputs(cfg, rows=((1, 0), (0, 3)))
        out[kind] = (cfg, ref, path, inputs, F.torch_logits(ref, inputs, F.mask_positions(inputs["attention_mask"])))
    return out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_logits_against_transformers_float32(checkpoints, kind, scheme):
    cfg, ref, path, inputs, want = checkpoints[kind]
    model = D.load_pretrained(path, progress=False, quantize=SCHEMES[scheme])
    quantized = Q.describe(model.params)
    n_layers = cfg.text_config.num_hidden_layers
    assert len(quantized) == 7 and all(v == scheme for v in quantized.values())  # q/k/v/o, gate/up/down
    kernel = model.params["language_model"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert kernel.values.dtype == (jnp.int8 if scheme == "int8" else jnp.uint8) and kernel.shape[0] == n_layers
    got = np.asarray(model(**inputs))
    mask = inputs["attention_mask"].astype(bool)
    err, agree = F.max_rel_err(got, want, mask), (got.argmax(-1) == want.argmax(-1))[mask].mean()
    max_err, min_agree = BOUNDS[scheme]
    assert err < max_err and agree >= min_agree, (err, agree)
    assert err > 1e-4  # really quantized (float32 parity is ~1e-6)


def _dequantized(params):
    return jax.tree.map(lambda x: Q.dequantize(x, jnp.float32) if isinstance(x, Q.QTensor) else x, params,
                        is_leaf=lambda x: isinstance(x, Q.QTensor))


def test_forward_computes_from_the_quantized_weights(checkpoints):
    """Everything quantized (decoder, tied embeddings, both vision towers, aligner): the logits equal the unchanged
    float model's on the dequantized weights, so every quantized layer was routed through the interceptor with the
    right values and scales."""
    cfg, ref, path, inputs, _ = checkpoints["hybrid"]
    q = Q.QuantizeConfig("int4", 16, lm_head=True, embeddings=True, vision=True)
    model = D.load_pretrained(path, progress=False, quantize=q)
    names = Q.describe(model.params)
    assert names["language_model/embed_tokens/embedding"] == "int8"  # embeddings: int8 rows for either scheme
    for tower in ("vision_model", "high_res_vision_model", "aligner"):
        assert any(k.startswith(tower) for k in names), tower
    got = np.asarray(model(**inputs))
    want = np.asarray(D.Model(model.config, _dequantized(model.params))(**inputs))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_untied_lm_head_is_planned_on_request(checkpoints):
    cfg, ref, path, inputs, _ = checkpoints["vl"]
    from deepseek_vl_jax.config import ModelConfig
    from deepseek_vl_jax.pretrained import abstract_params

    abstract = abstract_params(ModelConfig.from_pretrained(path))
    head = ("language_model", "lm_head", "kernel")
    assert head not in Q.plan(abstract, Q.QuantizeConfig("int4", 32))
    assert Q.plan(abstract, Q.QuantizeConfig("int4", 32, lm_head=True))[head] == Q.LeafPlan(Q.Scheme.INT4, 32, -2)


def test_generate_on_both_decoder_layouts(checkpoints, monkeypatch):
    """Greedy generation with int4 weights equals the float model on the dequantized weights with the decoder
    scanned over the stacked quantized weights (the default for a quantized decoder, CPU included), and split into
    per-layer views (float weights on CPU) equals that."""
    cfg, ref, path, inputs, _ = checkpoints["vl"]
    model = D.load_pretrained(path, progress=False, quantize=SCHEMES["int4"])
    batch = F.make_inputs(cfg, rows=((1, 0), (0, 4)), padding="left")
    assert weights.generation_params(model)["layers"] is None
    got = D.generate(model, batch, max_new_tokens=8, eos_token_id=-1)
    want = D.generate(D.Model(model.config, _dequantized(model.params)), batch, max_new_tokens=8, eos_token_id=-1)
    np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(weights, "split_on", lambda model: True)
    # the per-layer trees are views of the stacked quantized arrays: no second copy
    stacked = model.params["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    layer1 = weights.generation_params(model)["layers"][1]["mlp"]["gate_proj"]["kernel"]
    for part in ("values", "scales"):
        a, b = getattr(layer1, part), getattr(stacked, part)
        assert a.unsafe_buffer_pointer() - b.unsafe_buffer_pointer() == a.nbytes
    np.testing.assert_array_equal(D.generate(model, batch, max_new_tokens=8, eos_token_id=-1), got)


def test_eight_devices_equal_one(checkpoints):
    """Values shard like their float parameter, scales alongside; the logits equal one device's."""
    cfg, ref, path, inputs, _ = checkpoints["hybrid"]
    q = Q.QuantizeConfig("int4", 16, lm_head=True, embeddings=True, vision=True)
    one = D.load_pretrained(path, progress=False, quantize=q)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    assert len(jax.devices()) == 8
    many = D.load_pretrained(path, progress=False, quantize=q, mesh=mesh)
    from deepseek_vl_jax.pretrained import abstract_params

    floats = sharding.param_shardings(abstract_params(many.config), mesh)  # where the float params would be
    gate = many.params["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    float_gate = floats["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert gate.values.sharding.spec == float_gate.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert gate.scales.sharding.spec[-1] == "tensor"  # scales [L, groups, out]: out sharded like the values
    assert gate.values.addressable_shards[0].data.shape != gate.values.shape
    for (p, a), (_, b) in zip(hf_mapping._flatten(Q.to_checkpoint_tree(many.params)),
                              hf_mapping._flatten(Q.to_checkpoint_tree(one.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg="/".join(p))
    want = np.asarray(one(**inputs))
    np.testing.assert_allclose(np.asarray(many(**inputs)), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_group_size_that_does_not_divide_is_refused_before_loading(checkpoints):
    cfg, ref, path, inputs, _ = checkpoints["vl"]
    with pytest.raises(Q.QuantizationError, match="group size 48 does not divide the input width 64 of "
                                                  "language_model/layers/"):
        D.load_pretrained(path, progress=False, quantize=Q.QuantizeConfig("int4", 48))
    with pytest.raises(Q.QuantizationError, match="unknown quantization scheme 'fp8'"):
        D.load_pretrained(path, progress=False, quantize="fp8")
