"""The LM head and cross-entropy of a training step: over learned positions only, chunked, and fused with its own
gradient.

In SFT most positions learn nothing (image tokens, prompts: 91% of `benchmarks/bench_train.py`'s batch), yet the LM
head over them was the largest cost of a LoRA step (35% of its op time at vocab 102400). So each row's learned
positions are gathered to its front (`targets_first`, row-local: no data moves between batch shards) and the head
runs chunk by chunk, a chunk holding no learned position skipped (`lax.cond`).

The skipping cannot sit under autodiff: `lax.cond`'s partial evaluation makes the skipping branch return zeros for
the other branch's residuals (the [D, V] head kernel, written once per skipped chunk). So `head_loss` is a
`custom_vjp` whose forward pass computes each chunk's loss together with its gradients (of the hidden states, and of
the head's parameters only when they train), and whose backward pass just scales them: the logits are made once,
never recomputed, and at most one chunk's [B, C, V] exists at a time.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.custom_derivatives import CustomVJPPrimal

from deepseek_vl_jax.common import IGNORE_INDEX


def targets_first(hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """hidden [B, T, D], targets [B, T] with each row's learned positions (target not -100) moved to its front, in
    order."""
    order = jnp.argsort(targets == IGNORE_INDEX, axis=1, stable=True)
    return jnp.take_along_axis(hidden, order[..., None], axis=1), jnp.take_along_axis(targets, order, axis=1)


def _chunk_ce(apply: Callable, variables, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """Summed float32 cross-entropy of apply(variables, hidden [B, C, D]) -> logits [B, C, V] against targets."""
    valid = targets != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(apply(variables, hidden), jnp.where(valid, targets, 0))
    return jnp.sum(jnp.where(valid, ce, 0.0))


def _chunks(t: int, chunk: int):
    return [(s, min(s + chunk, t)) for s in range(0, t, chunk)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def head_loss(apply: Callable, variables, hidden: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """Summed cross-entropy of the head `apply(variables, h [B, C, D]) -> logits [B, C, V] float32` over hidden
    [B, T, D] against targets [B, T] (-100: not learned), `chunk` positions at a time, chunks without a learned
    position skipped. Put the learned positions first (`targets_first`) so that most chunks are."""
    total = jnp.float32(0.0)
    for s, e in _chunks(hidden.shape[1], chunk):
        h, tg = hidden[:, s:e], targets[:, s:e]
        total = total + jax.lax.cond(jnp.any(tg != IGNORE_INDEX), lambda h, tg: _chunk_ce(apply, variables, h, tg),
                                     lambda h, tg: jnp.float32(0.0), h, tg)
    return total


def _head_loss_fwd(apply, variables, hidden, targets, chunk):
    leaves, treedef = jax.tree.flatten(variables, is_leaf=lambda x: isinstance(x, CustomVJPPrimal))
    values = [p.value for p in leaves]
    trains = [i for i, p in enumerate(leaves) if p.perturbed]
    hidden, targets = hidden.value, targets.value

    def ce(train, h, tg):
        full = list(values)
        for i, x in zip(trains, train):
            full[i] = x
        return _chunk_ce(apply, jax.tree.unflatten(treedef, full), h, tg)

    grad = jax.value_and_grad(ce, argnums=(0, 1))
    acc = [jnp.zeros(values[i].shape, jnp.float32) for i in trains]
    total, dhidden = jnp.float32(0.0), []
    for s, e in _chunks(hidden.shape[1], chunk):
        h, tg = hidden[:, s:e], targets[:, s:e]

        def on(acc, h, tg):
            loss, (dw, dh) = grad([values[i] for i in trains], h, tg)
            return loss, dh, [a + d.astype(jnp.float32) for a, d in zip(acc, dw)]

        def off(acc, h, tg):
            return jnp.float32(0.0), jnp.zeros_like(h), acc

        loss, dh, acc = jax.lax.cond(jnp.any(tg != IGNORE_INDEX), on, off, acc, h, tg)
        total, dhidden = total + loss, dhidden + [dh]
    grads = [None] * len(leaves)  # the frozen leaves' (None: no cotangent)
    for i, a in zip(trains, acc):
        grads[i] = a.astype(values[i].dtype)
    return total, (jax.tree.unflatten(treedef, grads), jnp.concatenate(dhidden, axis=1))


def _head_loss_bwd(apply, chunk, res, g):
    grads, dhidden = res
    return jax.tree.map(lambda a: a * g.astype(a.dtype), grads), dhidden * g.astype(dhidden.dtype), None


head_loss.defvjp(_head_loss_fwd, _head_loss_bwd, symbolic_zeros=True)
