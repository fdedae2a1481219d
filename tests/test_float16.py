"""float16 (`torch_dtype=torch.float16` in transformers): greedy tokens agree with transformers' float16 wherever
transformers' float16 agrees with its own float32; a float16 conversion loads and generates the same tokens;
training refuses float16 with a clear message (no loss scale)."""

import copy

import numpy as np
import pytest
import torch

import deepseek_vl_jax as D
from deepseek_vl_jax import generation as G
from deepseek_vl_jax.training import config as C

import hf_fixtures as F

NEW = 12


def hf_greedy(ref, inputs, dtype):
    kw = {k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}
    for k in ("pixel_values", "high_res_pixel_values"):
        if k in kw:
            kw[k] = kw[k].to(dtype)
    with torch.no_grad():
        out = ref.generate(**kw, max_new_tokens=NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:].numpy()


@pytest.fixture(scope="module")
def half_refs(generation_checkpoints):
    cache = {}

    def get(kind):
        if kind not in cache:
            cfg, ref, _, path = generation_checkpoints(kind)
            cache[kind] = (cfg, ref, copy.deepcopy(ref).half(), D.load_pretrained(path, dtype="float16",
                                                                                     progress=False), path)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_float16_greedy_agrees_with_transformers_float16(half_refs, kind):
    cfg, ref, ref16, model16, _ = half_refs(kind)
    assert model16.params["language_model"]["embed_tokens"]["embedding"].dtype == np.float16
    inputs = F.make_inputs(cfg, rows=((1, 0), (1, 3)), padding="left")
    want32, want16 = hf_greedy(ref, inputs, torch.float32), hf_greedy(ref16, inputs, torch.float16)
    got = G.generate(model16, inputs, max_new_tokens=NEW, eos_token_id=-1, pad_token_id=0)
    compared = 0
    for r in range(len(got)):
        agree = int(np.argmin(np.append(want16[r] == want32[r], False)))  # transformers' f16 = its f32 up to here
        np.testing.assert_array_equal(got[r, :agree], want16[r, :agree])
        compared += agree
    assert compared >= NEW  # enough tokens where the comparison means something


def test_float16_conversion_loads_and_generates_the_same(half_refs, tmp_path):
    cfg, _, _, model16, path = half_refs("vl")
    D.convert(path, tmp_path / "f16", dtype="float16")
    converted = D.load_pretrained(tmp_path / "f16", dtype="float16", progress=False)
    assert {x.dtype for x in jax_leaves(converted.params)} == {np.dtype(np.float16)}
    inputs = F.make_inputs(cfg, rows=((1, 2),))
    np.testing.assert_array_equal(G.generate(converted, inputs, max_new_tokens=NEW, eos_token_id=-1),
                                  G.generate(model16, inputs, max_new_tokens=NEW, eos_token_id=-1))


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_float16_training_is_refused():
    with pytest.raises(C.TrainConfigError, match="float16 is not supported for training.*bfloat16"):
        C.load_config(None, ["model.dtype=float16"])
    assert C.load_config(None, ["model.dtype=bfloat16"]).model.dtype == "bfloat16"
