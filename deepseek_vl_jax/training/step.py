"""The loss, the train step (gradient accumulation, clipping, AdamW on the trainable towers only) and the eval step.

Batch arrays carry a leading micro-batch axis A (1 without accumulation): input_ids / attention_mask / labels
[A, B, T], pixel_values [A, B * M, 3, S, S] (and high_res_pixel_values), M image slots per row. The batch axis B
is sharded over (data, fsdp).

Loss: transformers' `ForCausalLMLoss`: logits at position t predict labels[t + 1]; cross-entropy in float32 summed
over targets that are not -100, divided by the number of such targets in the whole optimizer step (all micro-batches
together), i.e. a token-weighted mean, the same as one big batch.

Memory and time: the logits [B, T, V] (float32; at vocab 102400 the largest activation of the step) never exist
whole, and positions without a target get none: `training.head_loss` runs the head chunk by chunk (a chunk is as
many positions as make `LOSS_CHUNK_BYTES` of float32 logits, at least 8) over each row's learned positions only,
computing each chunk's gradient as it goes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from deepseek_vl_jax import multimodal
from deepseek_vl_jax import lora as lora_lib
from deepseek_vl_jax.common import IGNORE_INDEX
from deepseek_vl_jax.model import DeepseekVL
from deepseek_vl_jax.training import head_loss
from deepseek_vl_jax.training import optimizer as opt_lib
from deepseek_vl_jax.training.config import TrainableConfig

Batch = dict[str, jax.Array]
LOSS_CHUNK_BYTES = 32 * 2**20  # float32 logits per loss chunk (B x C x V)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # every parameter (trainable and frozen), the float32 master copy
    opt_state: Any  # the optimizer state of the trainable towers only


def merge_rows(embeds: jax.Array, input_ids: jax.Array, features: jax.Array, image_token_id: int) -> jax.Array:
    """Per-row scatter of image features: embeds [B, T, D], input_ids [B, T], features [B, K, D] (row b's image
    slots flattened). The k-th image token of row b takes features[b, k]. Row-local, so it never moves data
    between batch shards (unlike a batch-global scatter) and padded image slots are simply never read."""
    is_image = input_ids == image_token_id
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features.astype(embeds.dtype), index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, embeds)


def _hidden(module: DeepseekVL, input_ids, attention_mask, pixel_values=None, high_res_pixel_values=None):
    """The final-norm hidden states [B, T, D]."""
    embeds = module.language_model.embed(input_ids)
    if pixel_values is not None:
        b = input_ids.shape[0]
        feats = module.encode_images(pixel_values, high_res_pixel_values)  # [B * M, P, D]
        feats = feats.reshape(b, -1, feats.shape[-1])
        embeds = merge_rows(embeds, input_ids, feats, module.config.image_token_id)
    positions = multimodal.positions_from_mask(attention_mask)
    hidden, _ = module.decode(embeds, positions, multimodal.causal_mask(attention_mask))
    return hidden


def _logits(module: DeepseekVL, input_ids, attention_mask, pixel_values=None, high_res_pixel_values=None):
    return module.logits(_hidden(module, input_ids, attention_mask, pixel_values, high_res_pixel_values))


def _loss_sum(module: DeepseekVL, input_ids, attention_mask, pixel_values, high_res_pixel_values, targets):
    hidden = _hidden(module, input_ids, attention_mask, pixel_values, high_res_pixel_values)
    hidden, targets = head_loss.targets_first(hidden, targets)
    b = hidden.shape[0]
    chunk = max(8, LOSS_CHUNK_BYTES // (4 * b * module.config.text.vocab_size) // 8 * 8)
    lm = module.language_model
    name = "embed_tokens" if lm.tie_word_embeddings else "lm_head"
    head = lm.clone(parent=None)  # applied to the head's parameters alone (interceptors stay active)
    variables = {"params": {name: lm.variables["params"][name]}}
    return head_loss.head_loss(_HeadApply(head), variables, hidden, targets, chunk)


class _HeadApply:
    """(variables, hidden [B, C, D]) -> logits [B, C, V] float32 of an unbound LlamaForCausalLM (hashable by the
    module: a static argument of `head_loss`)."""

    def __init__(self, lm):
        self.lm = lm

    def __call__(self, variables, hidden):
        return self.lm.apply(variables, hidden, method=type(self.lm).logits)

    def __hash__(self):
        return hash(self.lm)

    def __eq__(self, other):
        return isinstance(other, _HeadApply) and other.lm == self.lm


def logits(module: DeepseekVL, params, batch: Batch, lora: lora_lib.LoraConfig | None = None,
           dropout_rng: jax.Array | None = None) -> jax.Array:
    """One micro-batch (no leading A axis) -> logits [B, T, V] float32. With `lora`, params may hold adapters and
    a quantized base (`deepseek_vl_jax.lora`); `dropout_rng` turns LoRA dropout on."""
    args = (batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch.get("high_res_pixel_values"))
    if lora is not None and lora.enabled:
        rngs = {"dropout": dropout_rng} if dropout_rng is not None and lora.dropout else None
        return lora_lib.apply(module, params, *args, config=lora, method=_logits, rngs=rngs)
    return module.apply({"params": params}, *args, method=_logits)


def shifted_targets(labels: jax.Array) -> jax.Array:
    """labels [..., T] -> targets [..., T]: position t predicts labels[t + 1]; the last position predicts nothing."""
    pad = jnp.full(labels.shape[:-1] + (1,), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[..., 1:], pad], axis=-1)


def target_count(labels: jax.Array) -> jax.Array:
    return jnp.sum(shifted_targets(labels) != IGNORE_INDEX).astype(jnp.float32)


def loss_sum(module: DeepseekVL, params, batch: Batch, lora=None, dropout_rng=None) -> jax.Array:
    """Summed float32 cross-entropy over the learned targets of one micro-batch (logits made chunk by chunk)."""
    args = (batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch.get("high_res_pixel_values"),
            shifted_targets(batch["labels"]))
    if lora is not None and lora.enabled:
        rngs = {"dropout": dropout_rng} if dropout_rng is not None and lora.dropout else None
        return lora_lib.apply(module, params, *args, config=lora, method=_loss_sum, rngs=rngs)
    return module.apply({"params": params}, *args, method=_loss_sum)


def mean_loss(module: DeepseekVL, params, batch: Batch, lora=None) -> jax.Array:
    """transformers' loss for one micro-batch: mean over learned targets."""
    return loss_sum(module, params, batch, lora) / jnp.maximum(target_count(batch["labels"]), 1.0)


def _micro(batch: Batch, i) -> Batch:
    return {k: v[i] for k, v in batch.items()}


def train_step(state: TrainState, batch: Batch, *, module: DeepseekVL, tx: optax.GradientTransformation,
               trainable: TrainableConfig, schedule: Callable, grad_shardings=None,
               lora: lora_lib.LoraConfig | None = None) -> tuple[TrainState, dict]:
    """One optimizer step over A micro-batches. Returns the new state and scalar metrics. With `lora`, only the
    adapters (and the trainable towers) get gradients; dropout keys derive from the step (resumes exactly)."""
    train, frozen = opt_lib.split(state.params, trainable)
    total = jnp.maximum(target_count(batch["labels"]), 1.0)
    accum = batch["input_ids"].shape[0]

    def grads_of(mb, i=0):
        dropout = lora is not None and lora.enabled and lora.dropout > 0
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), state.step), i) if dropout else None

        def f(p):
            s = loss_sum(module, opt_lib.merge(p, frozen), mb, lora, rng)
            return s / total, s
        (_, s), g = jax.value_and_grad(f, has_aux=True)(train)
        g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
        if grad_shardings is not None:
            g = jax.lax.with_sharding_constraint(g, grad_shardings)
        return g, s

    if accum == 1:
        grads, summed = grads_of(_micro(batch, 0))
    else:
        def body(carry, mb):
            g_acc, s_acc, i = carry
            g, s = grads_of(mb, i)
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, i + 1), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), train)
        if grad_shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
        (grads, summed, _), _ = jax.lax.scan(body, (zeros, jnp.float32(0.0), jnp.int32(0)), batch)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, train)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, train)
    train = optax.apply_updates(train, updates)
    metrics = {
        "loss": summed / total,
        "grad_norm": grad_norm,
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
        "target_tokens": total,
    }
    return TrainState(state.step + 1, opt_lib.merge(train, frozen), opt_state), metrics


def eval_step(params, batch: Batch, *, module: DeepseekVL, lora=None) -> dict:
    """Summed loss and target count of a batch (all A micro-batches), to be averaged over the eval set."""
    sums = [loss_sum(module, params, _micro(batch, i), lora) for i in range(batch["input_ids"].shape[0])]
    return {"loss_sum": sum(sums), "count": target_count(batch["labels"])}


def compile_steps(module: DeepseekVL, tx: optax.GradientTransformation, trainable: TrainableConfig,
                  schedule: Callable, mesh: Mesh | None = None, state_shardings=None, batch_shardings=None,
                  lora: lora_lib.LoraConfig | None = None):
    """(train_step, eval_step) jitted; with a mesh, state and batch shardings are pinned and the state donated."""
    grad_shardings = None
    if mesh is not None and state_shardings is not None:
        grad_shardings, _ = opt_lib.split(state_shardings.params, trainable)
    train = functools.partial(train_step, module=module, tx=tx, trainable=trainable, schedule=schedule,
                              grad_shardings=grad_shardings, lora=lora)
    evaluate = functools.partial(eval_step, module=module, lora=lora)
    if mesh is None:
        return jax.jit(train, donate_argnums=(0,)), jax.jit(evaluate)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    train_jit = jax.jit(train, in_shardings=(state_shardings, batch_shardings),
                        out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    eval_jit = jax.jit(evaluate, in_shardings=(state_shardings.params, batch_shardings), out_shardings=replicated)
    return train_jit, eval_jit
