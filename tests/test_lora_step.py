"""The LoRA train step under remat and gradient accumulation (the hybrid model: remat wraps the scanned SigLIP, SAM and
decoder blocks; LoRA on the decoder and SigLIP, the aligner fully trained, LoRA dropout on): every remat policy
gives the losses and gradients of no remat (the same dropout masks too), a QLoRA base as well; grad_accum_steps=2
gives the loss and gradients of one micro-batch of the whole batch. The step's optimizer is replaced by one that
keeps the gradients as its state, so the test reads exactly what `train_step` would hand to AdamW."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_vl_jax import lora
from deepseek_vl_jax.common import IGNORE_INDEX, RematPolicy
from deepseek_vl_jax.model import DeepseekVL
from deepseek_vl_jax.pretrained import load_pretrained
from deepseek_vl_jax.training import state as state_lib
from deepseek_vl_jax.training import step as step_lib
from deepseek_vl_jax.training.config import TrainableConfig

import hf_fixtures as F

TRAINABLE = TrainableConfig(vision=False, high_res=False, aligner=True, language=False)
TARGETS = lora.LANGUAGE_TARGETS + (r"vision_model/layers/(self_attn|mlp)/.*",)


def keep_gradients() -> optax.GradientTransformation:
    """An 'optimizer' whose state is the last gradients and whose updates are zero."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    cfg = F.make_config(hybrid=True)
    path = F.save(F.make_model(cfg, seed=3), tmp_path_factory.mktemp("hybrid"))
    model = load_pretrained(path, progress=False)
    rows = ((1, 0), (1, 3), (1, 1), (1, 5))  # one image each; different lengths, so different target counts
    x = F.make_inputs(cfg, rows=rows)
    ids = x["input_ids"]
    labels = np.where((ids == cfg.image_token_id) | (x["attention_mask"] == 0), IGNORE_INDEX, ids)
    labels = labels.astype(np.int32)
    labels[:, :3] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": x["attention_mask"], "labels": labels,
             "pixel_values": x["pixel_values"], "high_res_pixel_values": x["high_res_pixel_values"]}
    return path, model, {k: np.asarray(v) for k, v in batch.items()}


def micro_batches(batch: dict, accum: int) -> dict:
    """[B, ...] -> [A, B / A, ...] (one image slot per row, so pixel rows split like token rows)."""
    return {k: jnp.asarray(v.reshape(accum, v.shape[0] // accum, *v.shape[1:])) for k, v in batch.items()}


def step(model_config, params, batch, config, accum=1):
    """(loss, gradients of the trainable leaves) of one `train_step` at step 3 (dropout keys depend on it)."""
    tx = keep_gradients()
    state = state_lib.create(params, tx, TRAINABLE, step=3)
    fn = jax.jit(lambda s, b: step_lib.train_step(s, b, module=DeepseekVL(model_config), tx=tx, trainable=TRAINABLE,
                                                  schedule=lambda _: 0.0, lora=config))
    new, metrics = fn(state, micro_batches(batch, accum))
    return float(metrics["loss"]), jax.device_get(new.opt_state)


def assert_close(got, want, rtol, what):
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        scale = np.abs(w).max()
        assert scale > 0, path
        err = np.abs(g - w).max() / scale
        assert err <= rtol, (what, jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("quantize", [None, {"scheme": "int8"}], ids=["float", "qlora_int8"])
def test_every_remat_policy_gives_the_gradients_of_no_remat(case, quantize):
    path, model, batch = case
    config = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=TARGETS,
                             quantize=quantize["scheme"] if quantize else "none")
    base = model.params if quantize is None else load_pretrained(path, progress=False, quantize=quantize).params
    params = lora.adapters.add_adapters(base, config, jax.random.key(1), zero_b=False)
    policies = list(RematPolicy) if quantize is None else [RematPolicy.NONE, RematPolicy.FULL]
    results = {p: step(dataclasses.replace(model.config, remat_policy=p), params, batch, config) for p in policies}
    loss0, grads0 = results[RematPolicy.NONE]
    assert set(grads0) == {"lora", "aligner"} and len(lora.adapter_paths(grads0)) == 7 + 6
    # measured (vl model): every policy agrees with no remat to <= 8.6e-7 of each leaf's largest gradient (float32
    # reassociation in the recomputed forward), the loss exactly; another dropout mask is off by ~0.7 (below)
    for policy, (loss, grads) in results.items():
        assert abs(loss - loss0) <= 1e-6 * loss0, (policy, loss, loss0)
        assert_close(grads, grads0, 1e-5, policy)
    # dropout really is on: without it the gradients differ
    _, plain = step(model.config, params, batch, dataclasses.replace(config, dropout=0.0))
    assert np.abs(plain["lora"]["language_model"]["layers"]["mlp"]["up_proj"]["lora_a"]
                  - grads0["lora"]["language_model"]["layers"]["mlp"]["up_proj"]["lora_a"]).max() > 1e-3 * np.abs(
        plain["lora"]["language_model"]["layers"]["mlp"]["up_proj"]["lora_a"]).max()


def test_gradient_accumulation_equals_one_micro_batch(case):
    """grad_accum_steps=2 over [2, 2, T] = one step over [1, 4, T]: token-weighted over the whole step, though the
    two micro-batches have different numbers of targets (no dropout: its keys are per micro-batch)."""
    _, model, batch = case
    config = lora.LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    params = lora.adapters.add_adapters(model.params, config, jax.random.key(2), zero_b=False)
    counts = [(step_lib.shifted_targets(batch["labels"][i:i + 2]) != IGNORE_INDEX).sum() for i in (0, 2)]
    assert counts[0] != counts[1], counts
    loss1, grads1 = step(model.config, params, batch, config, accum=1)
    loss2, grads2 = step(model.config, params, batch, config, accum=2)
    # measured (vl model): <= 1.1e-6 of each leaf's largest gradient, the loss exactly
    assert abs(loss2 - loss1) <= 1e-6 * loss1, (loss1, loss2)
    assert_close(grads2, grads1, 1e-5, "accum")
