"""The published architectures, checked by `jax.eval_shape` (allocating nothing): parameter counts and every
tensor shape equal transformers' for the same configs (built on torch's meta device, also without memory)."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax.core import meta

from deepseek_vl_jax import hf_mapping
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.pretrained import abstract_params

SIGLIP_L_384 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=384, patch_size=16, vision_use_head=False)
LLM_1_3B = dict(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=16384)
LLM_7B = dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384)
SAM_B_1024 = dict(hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12,
                  image_size=1024, patch_size=16, window_size=14, global_attn_indexes=[2, 5, 8, 11], mlp_dim=3072)

ARCHS = {
    "deepseek-vl-1.3b": (transformers.DeepseekVLConfig, dict(text_config=LLM_1_3B, vision_config=SIGLIP_L_384,
                                                             tie_word_embeddings=False)),
    "deepseek-vl-7b-hybrid": (transformers.DeepseekVLHybridConfig,
                              dict(text_config=LLM_7B, vision_config=SIGLIP_L_384,
                                   high_res_vision_config=SAM_B_1024, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_parameter_counts_and_shapes_equal_transformers(name):
    cls, kw = ARCHS[name]
    hf_config = cls(**kw)
    model_cls = (transformers.DeepseekVLHybridForConditionalGeneration if "hybrid" in name
                 else transformers.DeepseekVLForConditionalGeneration)
    with torch.device("meta"):
        ref = model_cls(hf_config)
    hf_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    hf_count = sum(p.numel() for p in ref.parameters())

    config = ModelConfig.from_hf(hf_config.to_dict())
    shapes = meta.unbox(abstract_params(config))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert ours == hf_count
    # Every HF tensor has a Flax leaf of the right (mapped) shape, and nothing is left over.
    hf_mapping.check(hf_mapping.entries(shapes), hf_shapes)
    expected = {"deepseek-vl-1.3b": (1.9e9, 2.1e9), "deepseek-vl-7b-hybrid": (7.2e9, 7.4e9)}[name]
    assert expected[0] < ours < expected[1], ours
