"""Multimodal glue as small pure functions: image-token checks, scattering image features into the placeholder
positions, positions and attention masks from the padding mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class ImageTokenError(ValueError):
    """The image placeholders in `input_ids` do not match the images given."""


def check_image_tokens(input_ids, num_images: int, tokens_per_image: int, image_token_id: int) -> None:
    """Host-side check (before jit) that the placeholders and the images agree; raises ImageTokenError."""
    n_tokens = int(np.sum(np.asarray(input_ids) == image_token_id))
    if n_tokens != num_images * tokens_per_image:
        raise ImageTokenError(
            f"image features and image tokens do not match: input_ids hold {n_tokens} image tokens (id "
            f"{image_token_id}) but {num_images} image(s) x {tokens_per_image} tokens = "
            f"{num_images * tokens_per_image} were given")


def merge_image_embeddings(embeds: jax.Array, input_ids: jax.Array, image_features: jax.Array,
                           image_token_id: int) -> jax.Array:
    """Scatter image features into the image-token positions (torch's `masked_scatter`).

    embeds [B, T, D]; input_ids [B, T]; image_features [N, P, D]. The i-th image token in row-major order over the
    batch takes the i-th feature vector of `image_features.reshape(-1, D)`, so image i fills the i-th run of P tokens.
    """
    return merge_at(embeds, input_ids == image_token_id, image_features)


def merge_at(embeds: jax.Array, is_image: jax.Array, image_features: jax.Array) -> jax.Array:
    """`merge_image_embeddings` with the placeholder positions given as a bool mask [B, T]."""
    feats = image_features.reshape(-1, image_features.shape[-1]).astype(embeds.dtype)
    index = jnp.cumsum(is_image.reshape(-1)) - 1
    index = jnp.clip(index, 0, feats.shape[0] - 1).reshape(is_image.shape)
    return jnp.where(is_image[..., None], feats[index], embeds)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions [B, T] = cumsum(mask) - 1 (0 at padding), so left- and right-padded rows both count from 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """Self-attention mask bool [B, 1, T, T]: causal and only onto non-padding keys."""
    t = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]


def cache_mask(key_valid: jax.Array, cache_index: jax.Array, t: int) -> jax.Array:
    """Mask bool [B, 1, T, S] for T new tokens written at cache slots [cache_index, cache_index + T).

    key_valid [B, S]: which cache slots hold real (non-padding) tokens, including the new ones.
    Query t sees slots s <= cache_index + t that are valid.
    """
    s = key_valid.shape[-1]
    query_slot = cache_index + jnp.arange(t)
    causal = jnp.arange(s)[None, :] <= query_slot[:, None]
    return causal[None, None] & key_valid.astype(bool)[:, None, None, :]
