"""The decode loop against the full forward: prefill + step-by-step decode logits equal the full forward's, a row
alone equals the same row in a padded batch, streaming equals the compiled loop, bfloat16 weights, clear errors.

The tiny checkpoints come from the session fixture `generation_checkpoints` (tests/conftest.py).
"""

import jax
import numpy as np
import pytest

import deepseek_vl_jax as D
from deepseek_vl_jax import generation as G
from deepseek_vl_jax.generation import inputs as inputs_mod
from deepseek_vl_jax.generation import kv_cache, loop, sampling, weights

import hf_fixtures as F

NEW = 16
PAD = 0


@pytest.mark.parametrize("kind,layout", [("vl", "fused"), ("vl", "split"), ("vl", "scan"), ("hybrid", "fused")])
def test_prefill_then_decode_equals_full_forward(generation_checkpoints, kind, layout):
    """Decoder weights split per layer with q/k/v and gate/up fused (what CPU uses), split as they are, or scanned
    over the stacked weights (what TPU/GPU use, with a stacked cache)."""
    cfg, ref, model, _ = generation_checkpoints(kind)
    batch = F.make_inputs(cfg, rows=((1, 2), (2, 0)), padding="left")
    steps = 6
    inputs, _ = inputs_mod.prepare_inputs(model, batch, steps)
    module, gen_len = model.module, kv_cache.gen_buffer_length(steps)
    sampler = sampling.Sampler()
    sp = sampling.SamplingParams.create()
    stop = loop.StopParams(eos=np.full((1,), -1, np.int32), pad=np.int32(PAD), max_new_tokens=np.int32(steps))
    prompt_logits = jax.jit(lambda p, x: loop.prompt_logits(module, None, gen_len, p, x)[0])
    prefill = jax.jit(lambda p, x: loop.prefill(module, sampler, None, gen_len, p, x, jax.random.key(0), sp, stop))
    next_logits = jax.jit(lambda p, s: loop.next_logits(module, p, s)[0])
    step = jax.jit(lambda p, s: loop.decode_step(module, sampler, p, s, sp, stop))

    if layout == "scan":
        params = {"params": model.params, "layers": None, "vision_layers": None}
    else:
        params = weights.split_layers(model.params, fuse=layout == "fused")
        assert ("qkv_proj" in params["layers"][0]["self_attn"]) == (layout == "fused")
    got = [np.asarray(prompt_logits(params, inputs))]
    state = prefill(params, inputs)
    for _ in range(steps - 1):
        got.append(np.asarray(next_logits(params, state)))
        state = step(params, state)
    got = np.stack(got, 1)  # [B, steps, V]
    assert kv_cache.is_stacked(state.cache) == (layout == "scan")
    tokens = np.asarray(state.tokens)[:, :steps]
    np.testing.assert_array_equal(tokens[:, :steps - 1], got[:, :steps - 1].argmax(-1))

    full = dict(batch)
    full["input_ids"] = np.concatenate([batch["input_ids"], tokens[:, :steps - 1]], 1)
    full["attention_mask"] = np.concatenate([batch["attention_mask"], np.ones((2, steps - 1), np.int64)], 1)
    want = np.asarray(model(**full))[:, -steps:]
    assert F.max_rel_err(got, want) <= 1e-5


def test_row_alone_equals_row_in_padded_batch(generation_checkpoints):
    cfg, ref, model, _ = generation_checkpoints("vl")
    batch = F.make_inputs(cfg, rows=((1, 0), (0, 9), (2, 4)), padding="left")
    got = G.generate(model, batch, max_new_tokens=NEW, eos_token_id=-1)
    images = [0, 1, 1, 3]  # image index ranges per row
    for r in range(3):
        keep = batch["attention_mask"][r].astype(bool)
        alone = {"input_ids": batch["input_ids"][r:r + 1, keep], "attention_mask": batch["attention_mask"][r:r + 1, keep]}
        if images[r + 1] > images[r]:
            alone["pixel_values"] = batch["pixel_values"][images[r]:images[r + 1]]
        np.testing.assert_array_equal(G.generate(model, alone, max_new_tokens=NEW, eos_token_id=-1)[0], got[r])
    right = F.make_inputs(cfg, rows=((1, 0), (0, 9), (2, 4)), padding="right")
    np.testing.assert_array_equal(G.generate(model, right, max_new_tokens=NEW, eos_token_id=-1), got)


@pytest.mark.parametrize("do_sample", [False, True])
def test_streaming_equals_compiled_loop(generation_checkpoints, do_sample):
    cfg, ref, model, _ = generation_checkpoints("hybrid")
    inputs = F.make_inputs(cfg, rows=((1, 0), (0, 3)), padding="left")
    kw = dict(max_new_tokens=10, eos_token_id=-1, do_sample=do_sample, temperature=1.5, top_k=20, top_p=0.95,
              repetition_penalty=1.2, seed=4)
    got = G.generate(model, inputs, **kw)
    collector = G.TokenCollector()
    streamed = G.generate(model, inputs, streamer=collector, **kw)
    np.testing.assert_array_equal(streamed, got)
    np.testing.assert_array_equal(np.stack(collector.steps, 1), got)
    collected = []
    G.generate(model, inputs, streamer=collected.append, **kw)  # a plain callable works too
    np.testing.assert_array_equal(np.stack(collected, 1), got)


def test_bfloat16_weights(generation_checkpoints):
    cfg, ref, model, path = generation_checkpoints("vl")
    bf16 = D.load_pretrained(path, dtype="bfloat16", progress=False)
    assert jax.tree.leaves(bf16.params)[0].dtype == np.dtype("bfloat16")
    inputs = F.make_inputs(cfg, rows=((1, 0), (0, 3)), padding="left")
    f32_logits = np.asarray(model(**inputs))[:, -1]
    bf_logits = np.asarray(bf16(**inputs))[:, -1]
    assert F.max_rel_err(bf_logits, f32_logits) < 5e-2
    got = G.generate(bf16, inputs, max_new_tokens=NEW, eos_token_id=-1)
    assert got.dtype == np.int32 and got.shape == (2, NEW)
    # Judge the bf16 tokens with the float32 model (teacher forcing on them): each is the float32 argmax or a
    # near-tie of it (bf16 rounding may flip those), and most are the argmax itself.
    full = dict(inputs, input_ids=np.concatenate([inputs["input_ids"], got[:, :-1]], 1),
                attention_mask=np.concatenate([inputs["attention_mask"], np.ones((2, NEW - 1), np.int64)], 1))
    ref_logits = np.asarray(model(**full))[:, -NEW:]
    chosen = np.take_along_axis(ref_logits, got[..., None], -1)[..., 0]
    gap = ref_logits.max(-1) - chosen
    assert gap.max() <= 0.05 * np.abs(ref_logits).max(), gap
    assert (gap == 0).mean() >= 0.75, gap


def test_invalid_arguments_are_clear_errors(generation_checkpoints):
    cfg, ref, model, _ = generation_checkpoints("vl")
    inputs = F.make_inputs(cfg, rows=((1, 0),))
    limit = model.config.text.max_position_embeddings
    n = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"prompt of {n} tokens \+ max_new_tokens={limit} = {n + limit} .*"
                                         rf"max_position_embeddings={limit}"):
        G.generate(model, inputs, max_new_tokens=limit)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        G.generate(model, inputs, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        G.generate(model, inputs, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        G.generate(model, inputs, do_sample=True, temperature=0.0)
    with pytest.raises(D.ImageTokenError):
        G.generate(model, {k: v for k, v in inputs.items() if k != "pixel_values"})
