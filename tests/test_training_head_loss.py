"""`training.head_loss`: the learned positions gathered first, and the chunked LM-head loss with a tied head (the
embeddings) against transformers + torch autograd, in chunks most of which are skipped, for a full fine-tune
(the head's gradient computed in the forward pass) and with the head frozen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from deepseek_vl_jax.model import DeepseekVL
from deepseek_vl_jax.pretrained import load_pretrained
from deepseek_vl_jax.training import head_loss, step as ST

import hf_fixtures as F
from test_training_step import make_labels


def test_targets_first_keeps_each_rows_learned_positions_in_order():
    targets = jnp.array([[-100, 5, -100, 7, 9], [3, -100, -100, -100, 4]])
    hidden = jnp.arange(10, dtype=jnp.float32).reshape(2, 5, 1)
    h, t = head_loss.targets_first(hidden, targets)
    assert t.tolist() == [[5, 7, 9, -100, -100], [3, 4, -100, -100, -100]]
    assert h[..., 0].tolist() == [[1, 3, 4, 0, 2], [5, 9, 6, 7, 8]]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    cfg = F.make_config(tie=True)
    ref = F.make_model(cfg, seed=6)
    path = F.save(ref, tmp_path_factory.mktemp("tied_head"))
    inputs = F.make_inputs(cfg, rows=((1, 2), (1, 0)), text_len=5)
    inputs["labels"] = make_labels(inputs, seed=1)
    return ref, path, inputs


@pytest.mark.parametrize("head_trains", [True, False])
def test_tied_head_loss_and_grads_match_transformers_in_skipped_chunks(tied, head_trains, monkeypatch):
    ref, path, inputs = tied
    rows, t = inputs["input_ids"].shape
    monkeypatch.setattr(ST, "LOSS_CHUNK_BYTES", 4 * rows * F.TEXT["vocab_size"] * 8)
    assert (ST.shifted_targets(inputs["labels"]) != -100).sum(1).max() <= 8 < t - 8  # most chunks skipped
    ref.zero_grad()
    out = ref(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    out.loss.backward()
    embed = ref.model.language_model.embed_tokens.weight.grad.numpy()
    final_norm = ref.model.language_model.norm.weight.grad.numpy()

    model = load_pretrained(path, progress=False)
    module = DeepseekVL(model.config)
    batch = {k: jnp.asarray(v, jnp.int32 if v.dtype.kind == "i" else jnp.float32) for k, v in inputs.items()}
    lm = model.params["language_model"]
    head = {"embed_tokens": lm["embed_tokens"]} if head_trains else {}
    rest = {k: v for k, v in lm.items() if k not in head}

    def loss(train):
        params = {**model.params, "language_model": {**rest, **train}}
        return ST.mean_loss(module, params, batch)

    value, grads = jax.jit(jax.value_and_grad(loss))({**head, "norm": lm["norm"]})
    want = float(out.loss.detach())
    assert abs(float(value) - want) <= 1e-5 * want
    err = lambda got, want: float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
    assert err(grads["norm"]["scale"], final_norm) <= 1e-4  # reached through the head's hidden-state gradient
    if head_trains:  # the tied embeddings' gradient: from the head and from the input embedding lookup
        assert err(grads["embed_tokens"]["embedding"], embed) <= 1e-4
