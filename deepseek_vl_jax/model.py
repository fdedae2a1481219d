"""The joined vision-language model: vision tower(s) -> aligner -> image features scattered into the image-token
positions -> LLaMA decoder -> logits. One Flax module for DeepSeek-VL and DeepSeek-VL-Hybrid.

Top-level parameter names mirror transformers' (`vision_model`, `aligner`, `language_model`, and for the hybrid
model `high_res_vision_model`, `high_res_vision_neck`, `high_res_vision_proj`, `high_res_vision_alpha`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_vl_jax import common, multimodal
from deepseek_vl_jax.aligner import HybridAligner, MlpAligner
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.llama import LlamaForCausalLM, apply_layers
from deepseek_vl_jax.rope import rope_cos_sin
from deepseek_vl_jax.siglip import SiglipVisionModel


class DeepseekVL(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        dtype, pdtype = common.to_dtype(c.dtype), common.to_dtype(c.param_dtype)
        self.vision_model = SiglipVisionModel(c.vision, dtype, pdtype, c.remat_policy)
        self.language_model = LlamaForCausalLM(c.text, c.tie_word_embeddings, dtype, pdtype, c.remat_policy)
        if c.is_hybrid:
            from deepseek_vl_jax.high_res import HighResProjection
            from deepseek_vl_jax.sam import SamNeck, SamVisionEncoder

            self.high_res_vision_model = SamVisionEncoder(c.high_res, dtype, pdtype)
            self.high_res_vision_neck = SamNeck(c.high_res, dtype, pdtype)
            self.high_res_vision_proj = HighResProjection(
                c.high_res, c.vision.image_size // c.vision.patch_size, dtype, pdtype)
            self.high_res_vision_alpha = self.param(
                "high_res_vision_alpha", nn.with_logical_partitioning(nn.initializers.zeros_init(), (common.SCALAR,)),
                (1,), pdtype)
            self.aligner = HybridAligner(c.text.hidden_size, dtype, pdtype)
        else:
            self.aligner = MlpAligner(c.text.hidden_size, dtype, pdtype)

    def high_res_features(self, high_res_pixel_values: jax.Array) -> jax.Array:
        """[N, 3, Hh, Wh] -> [N, P, 4 * output_channels]: SAM neck output projected, plus alpha times the hidden
        state after the first global-attention layer through the separate neck and the same projection."""
        from deepseek_vl_jax.high_res import fuse_high_res

        index = self.config.high_res.global_attn_indexes[0]
        neck_out, hidden = self.high_res_vision_model(high_res_pixel_values, keep_hidden=(index + 1,))
        last = self.high_res_vision_proj(neck_out)
        global_ = self.high_res_vision_proj(self.high_res_vision_neck(hidden[0]))
        return fuse_high_res(last, global_, self.high_res_vision_alpha)

    def encode_images(self, pixel_values: jax.Array, high_res_pixel_values: jax.Array | None = None,
                      vision_layers=None) -> jax.Array:
        """pixel_values [N, 3, H, W] (and [N, 3, Hh, Wh] for the hybrid model) -> image features [N, P, D].
        vision_layers: None, or SigLIP's per-block params (`SiglipVisionModel`'s `layers_params`)."""
        low, _ = self.vision_model(pixel_values, vision_layers)
        if not self.config.is_hybrid:
            return self.aligner(low)
        return self.aligner(low, self.high_res_features(high_res_pixel_values))

    def embed(self, input_ids, pixel_values=None, high_res_pixel_values=None, vision_layers=None) -> jax.Array:
        """Token embeddings [B, T, D] with image features in the image-token positions."""
        embeds = self.language_model.embed(input_ids)
        if pixel_values is not None:
            feats = self.encode_images(pixel_values, high_res_pixel_values, vision_layers)
            embeds = multimodal.merge_image_embeddings(embeds, input_ids, feats, self.config.image_token_id)
        return embeds

    def rope(self, positions: jax.Array):
        t = self.config.text
        dtype = common.to_dtype(self.config.dtype)
        return rope_cos_sin(t.rope, t.head_dim, t.max_position_embeddings, positions, dtype)

    def decode(self, embeds, positions, mask, cache=None, cache_index=0):
        """Run the decoder on embeddings: returns (hidden [B, T, D], cache)."""
        cos, sin = self.rope(positions)
        return self.language_model(embeds, cos, sin, mask, cache, cache_index)

    def decode_layers(self, embeds, positions, mask, layers, caches=None, cache_index=0):
        """`decode` over per-layer parameters and caches (see `llama.apply_layers`): the params given to `apply`
        need no `language_model.layers`. layers: per-layer param trees; caches: None or per-layer (k, v)
        [B, S, K, H]. Returns (hidden [B, T, D], caches)."""
        c = self.config
        cos, sin = self.rope(positions)
        x, caches = apply_layers(c.text, common.to_dtype(c.dtype), common.to_dtype(c.param_dtype), layers, embeds,
                                 cos, sin, mask, caches, cache_index)
        return self.language_model.final_norm(x), caches

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_model.logits(hidden)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, high_res_pixel_values=None,
                 positions=None) -> jax.Array:
        """Full forward without a cache. input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = padding);
        pixel_values [N, 3, H, W]. Returns logits [B, T, V] in float32."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if positions is None:
            positions = multimodal.positions_from_mask(attention_mask)
        embeds = self.embed(input_ids, pixel_values, high_res_pixel_values)
        hidden, _ = self.decode(embeds, positions, multimodal.causal_mask(attention_mask))
        return self.logits(hidden)
