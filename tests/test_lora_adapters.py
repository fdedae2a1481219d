"""LoRA over the unchanged model, both model types: zero-initialised adapters give the base logits exactly; a LoRA
model's logits (adapters applied on the fly, inside the scanned decoder with remat) equal the merged model's; the
QLoRA base (`quantization`'s int8 / int4 QTensors, vision towers too) gives the merged (dequantized) model's
logits; LoRA dropout is keyed and reaches every tower; bad targets
are named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_vl_jax import lora, quantization
from deepseek_vl_jax.model import DeepseekVL
from deepseek_vl_jax.pretrained import abstract_params, load_pretrained

import hf_fixtures as F

TARGETS = lora.LANGUAGE_TARGETS + (r"vision_model/layers/(self_attn|mlp)/.*", r"aligner/.*")
HYBRID_TARGETS = (r"high_res_vision_model/layers_\d+/(attn/(qkv|proj)|mlp/lin1)", r"aligner/high_res_vision_proj")


@pytest.fixture(scope="module", params=["vl", "hybrid"])
def case(request, tmp_path_factory):
    hybrid = request.param == "hybrid"
    cfg = F.make_config(hybrid=hybrid)
    path = F.save(F.make_model(cfg, seed=2), tmp_path_factory.mktemp(request.param))
    model = load_pretrained(path, progress=False, remat_policy="full" if hybrid else "none")
    inputs = {k: jnp.asarray(v) for k, v in F.make_inputs(cfg, rows=((1, 0), (1, 2))).items()}
    targets = TARGETS + (HYBRID_TARGETS if hybrid else ())
    return model, inputs, lora.LoraConfig(rank=4, alpha=8.0, targets=targets)


_JITS = {}


def forward(model, params, inputs, config=None):
    """Jitted once per (model, config): trees of the same structure reuse the compiled program."""
    key = (model.config, config)
    if key not in _JITS:
        module = DeepseekVL(model.config)
        if config is None:
            _JITS[key] = jax.jit(lambda p, a: module.apply({"params": p}, *a))
        else:
            _JITS[key] = jax.jit(lambda p, a: lora.apply(module, p, *a, config=config))
    args = [inputs.get(k) for k in ("input_ids", "attention_mask", "pixel_values", "high_res_pixel_values")]
    return np.asarray(_JITS[key](params, args))


def test_zero_adapters_give_the_base_exactly(case):
    model, inputs, config = case
    params = lora.add_adapters(model.params, config, jax.random.key(0))
    assert len(lora.adapter_paths(params)) >= 12
    np.testing.assert_array_equal(forward(model, params, inputs, config), forward(model, model.params, inputs))


def test_lora_logits_equal_merged_logits(case):
    model, inputs, config = case
    params = lora.adapters.add_adapters(model.params, config, jax.random.key(1), zero_b=False)
    got = forward(model, params, inputs, config)
    merged = forward(model, lora.merge(params, config), inputs)
    base = forward(model, model.params, inputs)
    assert F.max_rel_err(got, base) > 0.05  # the adapters matter
    assert F.max_rel_err(got, merged) <= 1e-5


def test_quantized_base(case):
    model, inputs, config = case
    hybrid = model.config.is_hybrid
    qconfig = quantization.QuantizeConfig("int8", vision=True) if hybrid else quantization.QuantizeConfig("int4", 16)
    base = quantization.quantize_params(model.params, abstract_params(model.config), qconfig, np.float32)
    params = lora.adapters.add_adapters(base, config, jax.random.key(1), zero_b=False)
    kernels = {"/".join(p): lora.adapters.get_path(params, p)["kernel"] for p in lora.adapter_paths(params)}
    quantized = {k for k, v in kernels.items() if isinstance(v, quantization.QTensor)}
    assert {k for k in kernels if k.startswith("language_model/")} <= quantized
    assert hybrid == any(k.startswith(("vision_model/", "high_res_vision_model/", "aligner/")) for k in quantized)
    assert all(kernels[k].values.dtype == (np.int8 if hybrid else np.uint8) for k in quantized)
    got = forward(model, params, inputs, config)
    assert F.max_rel_err(got, forward(model, lora.merge(params, config), inputs)) <= 1e-5


def test_bad_target_is_named(case):
    model, _, _ = case
    with pytest.raises(lora.LoraError, match="language_model/layers/self_attn/qq_proj.*matches no Dense"):
        lora.targets(model.params, lora.LoraConfig(rank=2, targets=("language_model/layers/self_attn/qq_proj",)))


def test_dropout_is_keyed_and_reaches_every_scanned_tower(case):
    model, inputs, config = case
    from deepseek_vl_jax.training import step as ST

    config = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.3, targets=config.targets)
    params = lora.adapters.add_adapters(model.params, config, jax.random.key(1), zero_b=False)
    f = jax.jit(lambda p, r: ST.logits(DeepseekVL(model.config), p, inputs, config, r))
    a, b, c = (np.asarray(f(params, jax.random.key(k))) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b)  # the same key, the same masks (exact resume)
    assert np.abs(a - c).max() > 1e-2 and np.abs(a - forward(model, params, inputs, config)).max() > 1e-2
