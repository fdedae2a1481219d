"""The LLaMA decoder: embeddings, scanned blocks (RMSNorm, half-split RoPE, grouped-query attention, gated MLP),
final norm and LM head (tied to the embeddings or not). Matches transformers' `LlamaModel` + `lm_head`.

The KV cache is an explicit pytree (keys [L, B, K, S, H], values [L, B, K, H, S]: the layouts XLA's attention dots
read without a transpose) that the stack takes and returns; it rides in the scan carry so each layer updates its slice in place (`lax.dynamic_update_slice`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_vl_jax import attention_grad, common, layers
from deepseek_vl_jax.config import TextConfig
from deepseek_vl_jax.rope import apply_rope


class LlamaAttention(nn.Module):
    """fused: one `qkv_proj` kernel [D, (N + 2K) * H] (q, k, v side by side) instead of three; see `fuse_layer`."""

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    fused: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_kv, cache_index):
        """x [B, T, D], cos/sin [B, T, H], mask bool [B, 1, T, S].

        cache_kv: None (attend over x itself, S = T) or (k [B, K, S, H], v [B, K, H, S]) of this layer as it is before
        this call: the new tokens attend over its valid slots and themselves (`layers.cached_attention`).
        Returns (out, new_kv): new_kv None, or the new tokens' (k [B, K, T, H], v [B, K, H, T]) for the caller to
        write at slot `cache_index` (made to depend on `out`, see `layers.after`).
        """
        c = self.config
        n, kh, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        b, t, _ = x.shape
        proj = lambda f, axes, name: layers.dense(f, axes, c.attention_bias, self.dtype, self.param_dtype, name)
        if self.fused:
            qkv = proj((n + 2 * kh) * h, (common.EMBED, common.HEADS), "qkv_proj")(x)
            q, k, v = jnp.split(qkv, [n * h, (n + kh) * h], axis=-1)
        else:
            q = proj(n * h, (common.EMBED, common.HEADS), "q_proj")(x)
            k = proj(kh * h, (common.EMBED, common.KV_HEADS), "k_proj")(x)
            v = proj(kh * h, (common.EMBED, common.KV_HEADS), "v_proj")(x)
        q, k, v = q.reshape(b, t, n, h), k.reshape(b, t, kh, h), v.reshape(b, t, kh, h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_kv is None and self.is_mutable_collection(common.ATTENTIONS):
            out, probs = layers.attention_with_probs(q, k, v, mask, h**-0.5)
            self.sow(common.ATTENTIONS, "probs", probs)
        elif cache_kv is None and jax.default_backend() == "cpu":  # (GPU: jax's attention may pick cuDNN's)
            out = attention_grad.causal_attention(q, k, v, mask, h**-0.5)  # its gradient keeps no probabilities
        elif cache_kv is None:
            out = layers.attention(q, k, v, mask=mask, scale=h**-0.5)
        else:
            ck, cv = cache_kv  # k [B, K, S, H], v [B, K, H, S]: the layouts the attention dots read as they are
            k, v = k.astype(ck.dtype), v.astype(cv.dtype)
            out = layers.cached_attention(q, k.astype(self.dtype), v.astype(self.dtype), ck.astype(self.dtype),
                                          cv.astype(self.dtype), mask, cache_index, h**-0.5)
            k, v = layers.after(k, out), layers.after(v, out)  # write the cache only once attention has read it
            new_kv = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1))
        out = out.reshape(b, t, n * h)
        out = proj(c.hidden_size, (common.HEADS, common.EMBED), "o_proj")(out)
        return out, (None if cache_kv is None else new_kv)


class LlamaMLP(nn.Module):
    """fused: one `gate_up_proj` kernel [D, 2F] (gate, up side by side) instead of two; see `fuse_layer`."""

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    fused: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.config
        proj = lambda f, axes, name: layers.dense(f, axes, c.mlp_bias, self.dtype, self.param_dtype, name)
        if self.fused:
            gate, up = jnp.split(proj(2 * c.intermediate_size, (common.EMBED, common.MLP), "gate_up_proj")(x), 2, -1)
        else:
            gate = proj(c.intermediate_size, (common.EMBED, common.MLP), "gate_proj")(x)
            up = proj(c.intermediate_size, (common.EMBED, common.MLP), "up_proj")(x)
        return proj(c.hidden_size, (common.MLP, common.EMBED), "down_proj")(common.ACTIVATIONS[c.hidden_act](gate) * up)


class LlamaBlock(nn.Module):
    """One decoder layer. Scan carry: (x, cache or None, layer index); broadcast: cos, sin, mask, cache_index."""

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    fused: bool = False

    @nn.compact
    def __call__(self, carry, cos, sin, mask, cache_index):
        x, cache, i = carry
        c = self.config
        x = layers.constrain(x, (common.BATCH, common.LENGTH, common.EMBED))
        cache_kv = None if cache is None else (cache[0][i], cache[1][i])
        y = layers.RMSNorm(c.rms_norm_eps, self.param_dtype, name="input_layernorm")(x)
        y, new_kv = LlamaAttention(c, self.dtype, self.param_dtype, self.fused, name="self_attn")(
            y, cos, sin, mask, cache_kv, cache_index)
        x = x + y
        y = layers.RMSNorm(c.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(c, self.dtype, self.param_dtype, self.fused, name="mlp")(y)
        if cache is not None:  # only the new slots are written, in place
            cache = (jax.lax.dynamic_update_slice(cache[0], new_kv[0][None], (i, 0, 0, cache_index, 0)),
                     jax.lax.dynamic_update_slice(cache[1], new_kv[1][None], (i, 0, 0, 0, cache_index)))
        self.sow(common.HIDDEN_STATES, "out", x)  # a no-op unless the collection is mutable (Model outputs)
        return (x, cache, i + 1), None


def apply_layers(config: TextConfig, dtype, param_dtype, layers, x, cos, sin, mask, caches=None, cache_index=0):
    """The decoder stack without the scan, for decoding: a Python loop over per-layer parameter trees.

    layers: a sequence of per-layer param trees (`params["layers"]` sliced along its leading axis, as they are or
    through `fuse_layer`); caches: None or a matching sequence of (k [B, K, S, H], v [B, K, H, S]).
    Same math as `LlamaForCausalLM.__call__` (before the final norm).
    Why: XLA:CPU copies each layer's weights out of the stacked array (a dynamic-slice it does not fuse into the
    dot) before using them, so a scanned decode step moves every weight byte three times; separate buffers don't.
    Returns (x [B, T, D], caches).
    """
    fused = bool(layers) and "qkv_proj" in layers[0]["self_attn"]
    block = LlamaBlock(config, dtype, param_dtype, fused, parent=None)  # unbound: applied to each layer's params
    out = []
    for i, p in enumerate(layers):
        cache = None if caches is None else (caches[i][0][None], caches[i][1][None])
        (x, cache, _), _ = block.apply({"params": p}, (x, cache, 0), cos, sin, mask, cache_index)
        out.append(None if cache is None else (cache[0][0], cache[1][0]))
    return x, (None if caches is None else tuple(out))


def fuse_layer(layer: dict) -> dict:
    """One layer's params with q/k/v and gate/up concatenated along their output axis (`fused` modules): one
    matrix-vector product instead of three (two) per decode step, which reads the weights closer to memory speed
    on CPU. Only for weights whose output axis is not sharded (the split would need communication otherwise)."""
    attn, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
    # tree-mapped, so a quantized kernel (values and scales, both with the output axis last) fuses the same way
    cat = lambda parts: {k: jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=-1), *[p[k] for p in parts])
                         for k in parts[0]}
    attn["qkv_proj"] = cat([attn.pop("q_proj"), attn.pop("k_proj"), attn.pop("v_proj")])
    mlp["gate_up_proj"] = cat([mlp.pop("gate_proj"), mlp.pop("up_proj")])
    return dict(layer, self_attn=attn, mlp=mlp)


class LlamaForCausalLM(nn.Module):
    """Embeddings, decoder stack, norm and LM head. Params: embed_tokens, layers (stacked), norm, lm_head."""

    config: TextConfig
    tie_word_embeddings: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: common.RematPolicy = common.RematPolicy.NONE

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (common.VOCAB, common.EMBED)))
        block = layers.remat(LlamaBlock, self.remat_policy)
        self.layers = nn.scan(
            block, variable_axes={"params": 0, common.HIDDEN_STATES: 0, common.ATTENTIONS: 0},
            split_rngs={"params": True, "dropout": True}, length=c.num_hidden_layers,
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            metadata_params={nn.PARTITION_NAME: common.LAYERS},
        )(c, self.dtype, self.param_dtype)
        self.norm = layers.RMSNorm(c.rms_norm_eps, self.param_dtype)
        if not self.tie_word_embeddings:
            self.lm_head = layers.dense(c.vocab_size, (common.EMBED, common.VOCAB), False, self.dtype,
                                        self.param_dtype, "lm_head")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, T] -> [B, T, D]."""
        return self.embed_tokens(input_ids)

    def __call__(self, embeds, cos, sin, mask, cache=None, cache_index=0):
        """embeds [B, T, D]; cos/sin [B, T, H] for the tokens' positions; mask bool [B, 1, T, S].

        cache: None, or (k [L, B, K, S, H], v [L, B, K, H, S]). Returns (hidden [B, T, D] after the final norm, cache).
        """
        (x, cache, _), _ = self.layers((embeds, cache, 0), cos, sin, mask, cache_index)
        return self.norm(x), cache

    def final_norm(self, x: jax.Array) -> jax.Array:
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, T, D] -> logits [B, T, V] in float32."""
        if self.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden.astype(self.dtype))
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)
