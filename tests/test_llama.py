"""LLaMA decoder parity with transformers' LlamaForCausalLM (float32; max rel error <= 1e-5 of the largest logit),
including grouped-query attention, biases, untied heads and every RoPE scaling type."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.core import meta

from deepseek_vl_jax import multimodal
from deepseek_vl_jax.config import TextConfig
from deepseek_vl_jax.hf_mapping import hf_to_flax
from deepseek_vl_jax.llama import LlamaForCausalLM
from deepseek_vl_jax.rope import rope_cos_sin

import hf_fixtures as F

TOL = 1e-5

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8, "rope_theta": 500000.0},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                 "long_factor": [2.0 + 0.5 * i for i in range(8)], "original_max_position_embeddings": 8,
                 "rope_theta": 10000.0},
}


def _run(text: dict, tie: bool, seq: int = 12, padding: str = "right", seed: int = 0):
    kw = {**F.TEXT, **text, "tie_word_embeddings": tie}
    torch.manual_seed(seed)
    ref = F.perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval(), seed)
    cfg = TextConfig.from_hf(transformers.LlamaConfig(**kw).to_dict())
    module = LlamaForCausalLM(cfg, tie)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(2, seq))
    mask = np.ones((2, seq), np.int64)
    if padding == "right":
        mask[1, seq - 4:] = 0
    else:
        mask[1, :4] = 0
    positions = F.mask_positions(mask)

    def forward(m, ids, mask, positions):
        embeds = m.embed(ids)
        cos, sin = rope_cos_sin(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, positions)
        hidden, _ = m(embeds, cos, sin, multimodal.causal_mask(mask))
        return m.logits(hidden)

    template = meta.unbox(jax.eval_shape(
        lambda r: module.init(r, ids, mask, positions, method=forward), jax.random.key(0))["params"])
    tensors = {}
    for k, v in ref.state_dict().items():
        if k == "lm_head.weight" and tie:
            continue
        tensors[k if k == "lm_head.weight" else "model.language_model." + k[len("model."):]] = v.numpy()
    params = hf_to_flax(tensors, {"language_model": template})["language_model"]
    got = module.apply({"params": params}, ids, mask, positions, method=forward)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   position_ids=torch.from_numpy(positions)).logits.numpy()
    return got, want, mask


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_every_rope_type_matches(rope):
    # Sequence 20 > original_max_position_embeddings (8): the scaled regimes of yarn/llama3/longrope are exercised.
    got, want, mask = _run({"rope_parameters": ROPES[rope], "max_position_embeddings": 16}, tie=True, seq=20)
    assert F.max_rel_err(got, want, mask) <= TOL


@pytest.mark.parametrize("padding", ["right", "left"])
def test_gqa_untied_with_biases(padding):
    got, want, mask = _run({"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1}, tie=False,
                           padding=padding)
    assert F.max_rel_err(got, want, mask) <= TOL


def test_head_dim_differs_from_hidden_over_heads():
    got, want, mask = _run({"head_dim": 24, "num_key_value_heads": 4}, tie=True)
    assert F.max_rel_err(got, want, mask) <= TOL


def test_scanned_params_have_a_layer_axis_and_logical_names():
    cfg = TextConfig.from_hf(F.TEXT)
    module = LlamaForCausalLM(cfg, False)
    def forward(m, x):
        hidden, _ = m(x, jnp.zeros((1, 2, 16)), jnp.zeros((1, 2, 16)), jnp.ones((1, 1, 2, 2), bool))
        return m.logits(hidden)

    boxed = jax.eval_shape(lambda r: module.init(r, jnp.zeros((1, 2, cfg.hidden_size)), method=forward),
                           jax.random.key(0))["params"]
    q = boxed["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.value.shape == (2, 64, 64)
    assert q.names == ("layers", "embed", "heads")
    assert boxed["lm_head"]["kernel"].names == ("embed", "vocab")
