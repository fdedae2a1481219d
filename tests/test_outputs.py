"""The forward's outputs against transformers on the same weights (float32): hidden states per layer, attention
probabilities, image_hidden_states, logits_to_keep, the loss with labels, explicit position_ids, inputs_embeds,
get_image_features; the plain call still returns the logits from its own program.

Tolerance: max |ours - theirs| / max |theirs| <= 1e-5 over the non-padding positions (measured: ~1e-6).
The tiny checkpoints come from the session fixture `generation_checkpoints` (tests/conftest.py).
"""

import contextlib

import numpy as np
import pytest
import torch

import hf_fixtures as F

TOL = 1e-5


@contextlib.contextmanager
def eager(ref):
    """transformers returns attention probabilities only from its eager attention."""
    before = ref.config._attn_implementation
    ref.set_attn_implementation("eager")
    try:
        yield
    finally:
        ref.set_attn_implementation(before)


def hf_forward(ref, inputs, **kw):
    args = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    args.update({k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in kw.items()})
    with torch.no_grad():
        return ref(**args)


def rel(ours, ref, mask=None):
    return F.max_rel_err(np.asarray(ours), ref.float().numpy() if torch.is_tensor(ref) else ref, mask)


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_every_output_matches_transformers(generation_checkpoints, kind):
    cfg, ref, model, _ = generation_checkpoints(kind)
    inputs = F.make_inputs(cfg, rows=((1, 0), (1, 3)), padding="right")
    mask = inputs["attention_mask"]
    positions = F.mask_positions(mask)
    labels = np.where(mask == 1, inputs["input_ids"], -100)
    labels[:, :3] = -100  # a prompt part that is not learned
    with eager(ref):
        want = hf_forward(ref, inputs, position_ids=positions, labels=labels, output_hidden_states=True,
                          output_attentions=True)
    got = model(**inputs, labels=labels, output_hidden_states=True, output_attentions=True)
    assert rel(got.logits, want.logits, mask) <= TOL
    assert abs(float(got.loss) - float(want.loss)) <= TOL * abs(float(want.loss))
    L = cfg.text_config.num_hidden_layers
    assert len(got.hidden_states) == len(want.hidden_states) == L + 1
    for ours, theirs in zip(got.hidden_states, want.hidden_states):
        assert ours.shape == tuple(theirs.shape) and rel(ours, theirs, mask) <= TOL
    assert len(got.attentions) == len(want.attentions) == L
    for ours, theirs in zip(got.attentions, want.attentions):
        assert ours.shape == tuple(theirs.shape)
        real = mask.astype(bool)[:, None, :, None] & np.ones(ours.shape, bool)  # queries that are real tokens
        assert rel(np.asarray(ours)[real], theirs.numpy()[real]) <= TOL
    assert got.image_hidden_states.shape == tuple(want.image_hidden_states.shape)
    assert rel(got.image_hidden_states, want.image_hidden_states) <= TOL
    # The plain call is unchanged: logits alone, equal to the outputs' logits.
    np.testing.assert_allclose(np.asarray(model(**inputs)), np.asarray(got.logits), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_logits_to_keep_position_ids_and_image_features(generation_checkpoints, kind):
    cfg, ref, model, _ = generation_checkpoints(kind)
    inputs = F.make_inputs(cfg, rows=((1, 2), (1, 0)), padding="left")
    positions = np.broadcast_to(np.arange(inputs["input_ids"].shape[1]) + 3, inputs["input_ids"].shape).copy()
    want = hf_forward(ref, inputs, position_ids=positions, logits_to_keep=2)
    got = model(**inputs, position_ids=positions, logits_to_keep=2)
    assert got.logits.shape == tuple(want.logits.shape) == (2, 2, cfg.text_config.vocab_size)
    assert rel(got.logits, want.logits) <= TOL
    hr = inputs.get("high_res_pixel_values")
    kw = {} if hr is None else {"high_res_pixel_values": torch.from_numpy(hr)}
    with torch.no_grad():
        theirs = ref.model.get_image_features(torch.from_numpy(inputs["pixel_values"]), **kw).pooler_output
    ours = model.get_image_features(inputs["pixel_values"], hr)
    assert ours.shape == tuple(theirs.shape) and rel(ours, theirs) <= TOL


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_inputs_embeds_equals_input_ids(generation_checkpoints, kind):
    cfg, ref, model, _ = generation_checkpoints(kind)
    inputs = F.make_inputs(cfg, rows=((1, 1), (1, 0)), padding="right")
    ids = inputs.pop("input_ids")
    embeds = np.asarray(model.embed_tokens(ids))
    with torch.no_grad():
        np.testing.assert_allclose(embeds, ref.get_input_embeddings()(torch.from_numpy(ids)).numpy(), atol=1e-6)
    by_ids = model(input_ids=ids, **inputs, return_dict=True)
    by_embeds = model(inputs_embeds=embeds, **inputs, output_hidden_states=True)
    mask = inputs["attention_mask"]
    assert F.max_rel_err(by_embeds.logits, by_ids.logits, mask) <= TOL
    want = hf_forward(ref, inputs, inputs_embeds=embeds, position_ids=F.mask_positions(mask))
    assert rel(by_embeds.logits, want.logits, mask) <= TOL
    assert rel(by_embeds.image_hidden_states, by_ids.image_hidden_states) <= TOL


def test_bad_option_combinations_are_refused(generation_checkpoints):
    cfg, _, model, _ = generation_checkpoints("vl")
    inputs = F.make_inputs(cfg, rows=((1, 0),))
    ids = inputs["input_ids"]
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(inputs_embeds=np.zeros(ids.shape + (cfg.text_config.hidden_size,)), **inputs)
    with pytest.raises(ValueError, match="logits_to_keep=0 with labels"):
        model(**inputs, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="labels shape"):
        model(**inputs, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="image tokens"):  # the image count is checked on the embeddings too
        model(inputs_embeds=np.asarray(model.embed_tokens(ids)), attention_mask=inputs["attention_mask"])
