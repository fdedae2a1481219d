"""The forward's outputs beyond logits, as transformers' `DeepseekVL(Hybrid)ForConditionalGeneration` returns them:
per-layer hidden states, attention probabilities, the aligned image features, the loss with labels, the logits of
the last positions only, `inputs_embeds` instead of `input_ids`, explicit positions.

A separate program from the plain forward (`Model.__call__` without these options): the decoder sows its per-layer
outputs into the `hidden_states` / `attentions` collections only when they are mutable, so the plain forward traces
as before. Shapes: B batch, T length, D width, L layers, N heads, V vocabulary, N_img images x P tokens each.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from deepseek_vl_jax import common, multimodal
from deepseek_vl_jax.model import DeepseekVL


@struct.dataclass
class CausalLMOutput:
    """What `Model.__call__(..., return_dict=True)` returns (None where not asked for).

    logits [B, T, V] float32 ([B, k, V] with logits_to_keep=k); loss: float32 scalar (with labels);
    hidden_states: L + 1 arrays [B, T, D]: the embeddings, each layer's output, the last after the final norm;
    attentions: L arrays [B, N, T, T] (softmax probabilities); image_hidden_states [N_img * P, D] (aligned features).
    """

    logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None
    image_hidden_states: jax.Array | None = None

    def __getitem__(self, key: str) -> Any:  # out["logits"], as transformers' ModelOutput allows
        return getattr(self, key)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """transformers' `ForCausalLMLoss`: logits [B, T, V] at t predict labels [B, T] at t + 1; mean cross-entropy in
    float32 over the targets that are not -100 (NaN when there are none, as torch)."""
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], common.IGNORE_INDEX)], axis=1)
    valid = targets != common.IGNORE_INDEX
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.sum(valid)


def keep_last(hidden: jax.Array, logits_to_keep) -> jax.Array:
    """transformers' `slice_logits_to_keep`: 0 keeps all, k > 0 the last k positions, an index array those."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, jnp.asarray(logits_to_keep)]


def forward(module: DeepseekVL, params, input_ids, inputs_embeds, attention_mask, pixel_values, high_res_pixel_values,
            position_ids, labels, *, output_hidden_states: bool, output_attentions: bool,
            logits_to_keep) -> CausalLMOutput:
    """The full forward with outputs. Exactly one of input_ids [B, T] / inputs_embeds [B, T, D]; with inputs_embeds,
    the image positions are where a row equals the image token's embedding (as transformers finds them)."""
    c = module.config
    apply = functools.partial(module.apply, {"params": params})
    if inputs_embeds is None:
        embeds = apply(input_ids, method=lambda m, ids: m.language_model.embed(ids))
        is_image = input_ids == c.image_token_id
    else:
        embeds = inputs_embeds.astype(common.to_dtype(c.dtype))
        image_row = apply(jnp.full((1, 1), c.image_token_id, jnp.int32),
                          method=lambda m, ids: m.language_model.embed(ids))[0, 0]
        is_image = jnp.all(embeds == image_row, axis=-1)
    features = None
    if pixel_values is not None:
        features = apply(pixel_values, high_res_pixel_values, method="encode_images")
        embeds = multimodal.merge_at(embeds, is_image, features)
    if position_ids is None:
        position_ids = multimodal.positions_from_mask(attention_mask)
    mutable = [name for name, on in ((common.HIDDEN_STATES, output_hidden_states),
                                     (common.ATTENTIONS, output_attentions)) if on]
    (hidden, _), sown = module.apply({"params": params}, embeds, position_ids,
                                     multimodal.causal_mask(attention_mask), method="decode", mutable=mutable)
    logits = apply(keep_last(hidden, logits_to_keep), method="logits")
    hidden_states = attentions = None
    if output_hidden_states:
        per_layer = jax.tree.leaves(sown[common.HIDDEN_STATES])[0]  # [L, B, T, D]: each block's output
        hidden_states = (embeds, *(per_layer[i] for i in range(per_layer.shape[0] - 1)), hidden)
    if output_attentions:
        probs = jax.tree.leaves(sown[common.ATTENTIONS])[0]  # [L, B, N, T, T]
        attentions = tuple(probs[i] for i in range(probs.shape[0]))
    return CausalLMOutput(
        logits=logits, loss=None if labels is None else causal_lm_loss(logits, labels),
        hidden_states=hidden_states, attentions=attentions,
        image_hidden_states=None if features is None else features.reshape(-1, features.shape[-1]))
