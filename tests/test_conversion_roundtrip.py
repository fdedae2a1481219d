"""HF -> Flax (`convert`) -> HF (`export`) is bit-identical, and every step gives transformers' logits.

Checkpoints are built here with transformers (both model types, tied and untied heads, single and sharded files).
"""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import deepseek_vl_jax as D
import hf_fixtures as F
from deepseek_vl_jax.conversion import convert, export, flax_checkpoint, orbax_io
from deepseek_vl_jax.processing import load_processor
from deepseek_vl_jax.safetensors_io import INDEX_FILE, SINGLE_FILE
from test_conversion_helpers import make_hf_dir, tensor_differences, weight_files

SHARD = "50KB"
CASES = {  # name: (hybrid, tie, max_shard_size)
    "vl-tied-single": (False, True, None),
    "vl-untied-sharded": (False, False, SHARD),
    "hybrid-tied-sharded": (True, True, SHARD),
    "hybrid-untied-single": (True, False, None),
}


@pytest.fixture(scope="module")
def trip(tmp_path_factory):
    """name -> (hf config, torch model, hf dir, flax dir, exported dir)."""
    cache = {}

    def get(name):
        if name not in cache:
            hybrid, tie, shard = CASES[name]
            root = tmp_path_factory.mktemp(name)
            cfg, model, hf = make_hf_dir(root / "hf", hybrid, tie, shard, seed=len(cache))
            convert(hf, root / "flax", progress=False)
            export(root / "flax", root / "back", max_shard_size=shard or "5GB", progress=False)
            cache[name] = (cfg, model, hf, str(root / "flax"), str(root / "back"))
        return cache[name]

    return get


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_is_bit_identical(trip, name):
    cfg, model, hf, flax, back = trip(name)
    assert tensor_differences(hf, back) == []
    files = weight_files(back)
    if CASES[name][2]:
        assert len(files) > 2 and files == weight_files(hf)  # same shard names as save_pretrained
        assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        with open(os.path.join(back, INDEX_FILE)) as f, open(os.path.join(hf, INDEX_FILE)) as g:
            ours, theirs = json.load(f), json.load(g)
        assert set(ours["weight_map"]) == set(theirs["weight_map"])
        assert ours["metadata"] == theirs["metadata"]  # total_size and total_parameters
    else:
        assert files == [SINGLE_FILE] and not os.path.exists(os.path.join(back, INDEX_FILE))
    for file in files:
        assert _header(os.path.join(back, file))["__metadata__"] == {"format": "pt"}
    # transformers omits the tied head; so do we
    assert any("lm_head.weight" in _header(os.path.join(back, f)) for f in files) == (not CASES[name][1])
    with open(os.path.join(hf, "config.json")) as f, open(os.path.join(back, "config.json")) as g:
        assert json.load(f) == json.load(g)
    for aux in ("tokenizer.json", "processor_config.json", "generation_config.json", "chat_template.jinja"):
        assert os.path.exists(os.path.join(flax, aux)) and os.path.exists(os.path.join(back, aux)), aux


@pytest.mark.parametrize("name", sorted(CASES))
def test_exported_directory_loads_in_transformers(trip, name):
    cfg, model, hf, flax, back = trip(name)
    cls = type(model)
    reloaded = cls.from_pretrained(back).eval()
    inputs = F.make_inputs(cfg, rows=((1, 0), (0, 2)))
    np.testing.assert_array_equal(F.torch_logits(reloaded, inputs), F.torch_logits(model, inputs))


def _forward(model):
    """One jitted forward for any param tree of `model`'s architecture (one compile for both checkpoints)."""
    fn = jax.jit(lambda params, ids, mask, pv, hpv: model.module.apply({"params": params}, ids, mask, pv, hpv))
    return lambda params, inputs: np.asarray(fn(params, inputs["input_ids"], inputs["attention_mask"],
                                                inputs["pixel_values"], inputs.get("high_res_pixel_values")))


def _assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["vl-tied-single", "hybrid-untied-single"])
def test_converted_directory_loads_like_the_hf_one(trip, name):
    cfg, model, hf, flax, back = trip(name)
    inputs = F.make_inputs(cfg, rows=((1, 0), (0, 2)))
    a = D.load_pretrained(hf, progress=False)
    b = D.load_pretrained(flax, progress=False)
    _assert_same_params(a.params, b.params)
    forward = _forward(a)
    got = forward(b.params, inputs)
    np.testing.assert_array_equal(got, forward(a.params, inputs))
    # and both agree with transformers
    want = F.torch_logits(model, inputs, F.mask_positions(inputs["attention_mask"]))
    assert F.max_rel_err(got, want, inputs["attention_mask"]) <= 1e-5
    assert load_processor(flax).tokenizer is not None  # the processor files came along


def test_bfloat16_conversion(trip, tmp_path):
    cfg, model, hf, flax, back = trip("vl-untied-sharded")
    dst = tmp_path / "bf16"
    marker = convert(hf, dst, dtype="bfloat16", progress=False)
    assert marker["dtype"] == "bfloat16"
    with open(dst / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    stored = orbax_io.leaf_metadata(dst / flax_checkpoint.PARAMS)
    assert {d.name for _, d in stored.values()} == {"bfloat16"}
    assert marker["nbytes"] * 2 == flax_checkpoint.read_marker(flax)["nbytes"]  # half the float32 bytes
    inputs = F.make_inputs(cfg, rows=((1, 0), (0, 2)))
    a = D.load_pretrained(hf, dtype="bfloat16", progress=False)
    b = D.load_pretrained(dst, dtype="bfloat16", progress=False)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(b.params))
    _assert_same_params(a.params, b.params)  # the same rounding as casting at load time
    forward = _forward(a)
    np.testing.assert_array_equal(forward(b.params, inputs), forward(a.params, inputs))
    # restoring a bfloat16 checkpoint as float32 upcasts exactly
    c = D.load_pretrained(dst, dtype="float32", progress=False)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(c.params))
    np.testing.assert_array_equal(np.asarray(c.params["aligner"]["linear2"]["kernel"]),
                                  np.asarray(b.params["aligner"]["linear2"]["kernel"]).astype(np.float32))
    # exported as bfloat16 safetensors that transformers loads in bfloat16, with close logits
    assert export(dst, tmp_path / "bf16_hf", progress=False) == [SINGLE_FILE]
    header = _header(tmp_path / "bf16_hf" / SINGLE_FILE)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    reloaded = transformers.DeepseekVLForConditionalGeneration.from_pretrained(tmp_path / "bf16_hf")
    assert str(reloaded.dtype) == "torch.bfloat16"
    want = F.torch_logits(model, inputs)
    assert F.max_rel_err(F.torch_logits(reloaded.float(), inputs), want, inputs["attention_mask"]) < 0.05
    # export can also change the dtype back
    export(dst, tmp_path / "f32_hf", dtype="float32", progress=False)
    with open(tmp_path / "f32_hf" / "config.json") as f:
        assert json.load(f)["dtype"] == "float32"


@pytest.mark.parametrize("shape", [(1, 1), (3, 300), (257, 129)])
@pytest.mark.parametrize("src,dst", [("float32", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16"),
                                     ("int8", "int8")])
def test_fast_transpose_equals_numpy(shape, src, dst):
    from deepseek_vl_jax import common
    from deepseek_vl_jax.conversion.fast_mapping import transpose_into, transpose_into_numpy

    x = (np.random.default_rng(0).standard_normal(shape) * 10).astype(common.to_dtype(src) if src != "int8"
                                                                     else np.int8)
    want = x.T.astype(common.to_dtype(dst) if dst != "int8" else np.int8)
    for fn in (transpose_into, transpose_into_numpy):
        got = fn(x, np.empty(shape[::-1], want.dtype))
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
