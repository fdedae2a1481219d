"""load_pretrained: sharded files, meshes, and clear errors for broken checkpoints."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import deepseek_vl_jax as D
from deepseek_vl_jax import sharding
from deepseek_vl_jax.safetensors_io import INDEX_FILE, SINGLE_FILE

import hf_fixtures as F


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    cfg = F.make_config(hybrid=True, tie=False)
    ref = F.make_model(cfg, seed=3)
    single = F.save(ref, tmp_path_factory.mktemp("single"))
    sharded = F.save(ref, tmp_path_factory.mktemp("sharded"), max_shard_size="60KB")
    inputs = F.make_inputs(cfg, rows=((1, 0), (0, 3)))
    return cfg, ref, single, sharded, inputs


def test_sharded_checkpoint_equals_single_file(hybrid):
    cfg, ref, single, sharded, inputs = hybrid
    assert os.path.exists(os.path.join(sharded, INDEX_FILE))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    a = np.asarray(D.load_pretrained(single, progress=False)(**inputs))
    b = np.asarray(D.load_pretrained(sharded, progress=False)(**inputs))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2),
                                    dict(data=1, fsdp=2, tensor=4)])
def test_mesh_logits_equal_single_device(hybrid, layout):
    cfg, ref, single, sharded, inputs = hybrid
    want = np.asarray(D.load_pretrained(single, progress=False)(**inputs))
    mesh = sharding.make_mesh(**layout)
    model = D.load_pretrained(single, mesh=mesh, progress=False)
    q = model.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.mesh.shape == mesh.shape
    assert q.addressable_shards[0].data.shape != q.shape  # really split, not replicated
    got = np.asarray(model(**inputs))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_bfloat16_load_casts_params(hybrid):
    cfg, ref, single, sharded, inputs = hybrid
    model = D.load_pretrained(single, dtype="bfloat16", progress=False)
    leaves = jax.tree.leaves(model.params)
    assert all(x.dtype == jax.numpy.bfloat16 for x in leaves)
    want = F.torch_logits(ref, inputs, F.mask_positions(inputs["attention_mask"]))
    got = np.asarray(model(**inputs))
    # bfloat16 has ~3 significant digits; the answer must still be close (not garbage).
    assert F.max_rel_err(got, want, inputs["attention_mask"]) < 0.05


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_safetensors(path, edit):
    from deepseek_vl_jax.safetensors_io import SafetensorsFile, write_safetensors
    f = SafetensorsFile(path)
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    write_safetensors(path, edit(tensors), {"format": "pt"})


def test_missing_tensor(hybrid, tmp_path):
    d = _copy(hybrid[2], tmp_path / "m")
    _edit_safetensors(d / SINGLE_FILE, lambda t: {k: v for k, v in t.items() if "aligner.proj.weight" not in k})
    with pytest.raises(D.MappingError, match=r"missing tensors: model\.aligner\.proj\.weight"):
        D.load_pretrained(d, progress=False)


def test_unexpected_tensor(hybrid, tmp_path):
    d = _copy(hybrid[2], tmp_path / "u")
    _edit_safetensors(d / SINGLE_FILE, lambda t: {**t, "model.extra.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(D.MappingError, match=r"unexpected tensors: model\.extra\.weight"):
        D.load_pretrained(d, progress=False)


def test_shape_mismatch(hybrid, tmp_path):
    d = _copy(hybrid[2], tmp_path / "s")
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    _edit_safetensors(d / SINGLE_FILE, lambda t: {**t, key: np.zeros((3, 64), np.float32)})
    with pytest.raises(D.MappingError, match=r"shape mismatches: .*up_proj\.weight: checkpoint \(3, 64\), model "
                                             r"expects \(96, 64\)"):
        D.load_pretrained(d, progress=False)


def test_unknown_model_type(hybrid, tmp_path):
    d = _copy(hybrid[2], tmp_path / "t")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(D.ConfigError, match="unknown model_type 'qwen2_vl'"):
        D.load_pretrained(d, progress=False)


def test_truncated_file(hybrid, tmp_path):
    d = _copy(hybrid[2], tmp_path / "tr")
    path = d / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(D.CheckpointError, match=r"model\.safetensors: truncated"):
        D.load_pretrained(d, progress=False)
    path.write_bytes(b"\x05")
    with pytest.raises(D.CheckpointError, match="not a safetensors file"):
        D.load_pretrained(d, progress=False)


def test_missing_shard(hybrid, tmp_path):
    d = _copy(hybrid[3], tmp_path / "ms")
    shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[1]
    os.remove(d / shard)
    with pytest.raises(D.CheckpointError, match=f"missing: \\['{shard}'\\]"):
        D.load_pretrained(d, progress=False)
