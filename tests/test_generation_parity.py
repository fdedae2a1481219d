"""Generation against transformers: greedy tokens equal to `generate` of DeepseekVL(Hybrid)ForConditionalGeneration
on the same weights (batch of two chats with different numbers of images, left padding), eos handling, the
repetition penalty.

The tiny checkpoints come from the session fixture `generation_checkpoints` (tests/conftest.py).
"""

import dataclasses

import numpy as np
import pytest
import torch

import deepseek_vl_jax as D
from deepseek_vl_jax import generation as G
from deepseek_vl_jax.generation import inputs as inputs_mod

import hf_fixtures as F

NEW = 16
PAD = 0


def hf_generate(ref, inputs, **kw):
    with torch.no_grad():
        out = ref.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, max_new_tokens=NEW,
                           do_sample=False, **kw)
    return out[:, inputs["input_ids"].shape[1]:].numpy()


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_greedy_matches_transformers(generation_checkpoints, kind):
    cfg, ref, model, _ = generation_checkpoints(kind)
    inputs = F.make_inputs(cfg, rows=((2, 0), (1, 3)), padding="left")
    want = hf_generate(ref, inputs, eos_token_id=-1, pad_token_id=PAD)
    got = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=-1, pad_token_id=PAD)
    assert want.shape == (2, NEW)  # no early stop
    assert all(len(set(row)) >= 5 for row in want.tolist()), want  # the comparison is not trivial
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_eos_stops_each_row_and_pads(generation_checkpoints, kind):
    cfg, ref, model, _ = generation_checkpoints(kind)
    inputs = F.make_inputs(cfg, rows=((2, 0), (1, 3)), padding="left")
    free = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=-1, pad_token_id=PAD)
    # eos = a token row 0 emits at step >= 3 for the first time (row 1 may or may not emit it).
    i = next(i for i in range(3, NEW) if free[0, i] not in free[0, :i] and free[0, i] != PAD)
    eos = int(free[0, i])
    want = hf_generate(ref, inputs, eos_token_id=eos, pad_token_id=PAD)
    got = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)
    assert (got[:, want.shape[1]:] == PAD).all()
    assert got[0, i] == eos and (got[0, i + 1:] == PAD).all() and (got[0, :i] == free[0, :i]).all()
    # Two eos ids, one from each row: every row stops, and the loop stops early (the streamer sees fewer steps).
    j = next(j for j in range(2, NEW) if free[1, j] not in free[1, :j] and free[1, j] not in (PAD, eos))
    eos2 = (eos, int(free[1, j]))
    want = hf_generate(ref, inputs, eos_token_id=list(eos2), pad_token_id=PAD)
    collector = G.TokenCollector()
    got = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=eos2, pad_token_id=PAD, streamer=collector)
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)
    last = max(int(np.argmax(np.isin(got[r], eos2))) for r in range(2))
    assert len(collector.steps) == last + 1 < NEW and collector.ended
    np.testing.assert_array_equal(np.stack(collector.steps, 1), got[:, :last + 1])
    # -1 disables stopping: the same tokens as without any eos.
    np.testing.assert_array_equal(G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=[]), free)


def test_default_eos_is_the_models(generation_checkpoints):
    cfg, ref, model, _ = generation_checkpoints("vl")
    assert inputs_mod.resolve_eos(None, model.config.text.eos_token_id) == (cfg.text_config.eos_token_id,)
    assert inputs_mod.resolve_eos(None, (5, 7)) == (5, 7)
    assert inputs_mod.resolve_eos(-1, 2) == () and inputs_mod.resolve_eos([], 2) == ()
    inputs = F.make_inputs(cfg, rows=((1, 0),))
    free = G.generate(model, inputs, max_new_tokens=8, eos_token_id=-1)
    eos = int(free[0, 3])
    text = dataclasses.replace(model.config.text, eos_token_id=eos, pad_token_id=1)
    model2 = D.Model(model.config.replace(text=text), model.params)
    got = G.generate(model2, inputs, max_new_tokens=8)
    k = int(np.argmax(free[0] == eos))
    assert got[0, k] == eos and (got[0, k + 1:] == 1).all()


def test_repetition_penalty_matches_transformers(generation_checkpoints):
    cfg, ref, model, _ = generation_checkpoints("vl")
    inputs = F.make_inputs(cfg, rows=((1, 2),))  # one row: no padding (see the note in sampling.py)
    want = hf_generate(ref, inputs, eos_token_id=-1, pad_token_id=PAD, repetition_penalty=1.5)
    got = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=-1, repetition_penalty=1.5)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=-1))
