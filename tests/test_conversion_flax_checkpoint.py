"""The Flax checkpoint directory: `save_flax_checkpoint` / `restore_params` (dtypes, meshes), the stock-Orbax
format, and `export` from the training output layout (OUT/checkpoints/<step>/params, latest step)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import deepseek_vl_jax as D
from deepseek_vl_jax import sharding
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.conversion import (convert, export, flax_checkpoint, restore_params,
                                        save_flax_checkpoint)
from deepseek_vl_jax.safetensors_io import CheckpointReader
from test_conversion_helpers import make_hf_dir, tensor_differences


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("flaxckpt")
    cfg, model, hf = make_hf_dir(root / "hf", hybrid=False, tie=False, seed=11)
    with open(os.path.join(hf, "config.json")) as f:
        config_dict = json.load(f)
    return hf, config_dict, D.load_pretrained(hf, progress=False), root


def test_save_and_restore_with_mesh_and_dtype(source, tmp_path):
    hf, config_dict, model, _ = source
    dst = save_flax_checkpoint(tmp_path / "ckpt", config_dict, model.params, processor_src=hf)
    assert flax_checkpoint.is_flax_checkpoint(dst)
    assert {"tokenizer.json", "processor_config.json", "config.json"} <= set(os.listdir(dst))
    config = ModelConfig.from_pretrained(dst)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    restored = restore_params(dst, config, "bfloat16", mesh=mesh)
    want = sharding.param_shardings(flax_checkpoint.abstract(config), mesh)
    for got, expected, orig in zip(jax.tree.leaves(restored), jax.tree.leaves(want), jax.tree.leaves(model.params)):
        assert got.dtype == jnp.bfloat16 and got.sharding == expected
        np.testing.assert_array_equal(np.asarray(got), np.asarray(orig).astype(jnp.bfloat16))
    kernel = restored["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.addressable_shards[0].data.shape != kernel.shape  # really split
    # load_pretrained dispatches on the marker, onto the mesh
    loaded = D.load_pretrained(dst, mesh=mesh, progress=False)
    assert loaded.params["aligner"]["linear1"]["kernel"].sharding == want["aligner"]["linear1"]["kernel"]


def test_written_params_restore_with_stock_orbax(source, tmp_path):
    """The streaming writer must produce a standard Orbax PyTree checkpoint."""
    hf, config_dict, model, _ = source
    convert(hf, tmp_path / "flax", progress=False)
    with ocp.StandardCheckpointer() as ckptr:
        stock = ckptr.restore(tmp_path / "flax" / flax_checkpoint.PARAMS)
    assert jax.tree.structure(stock) == jax.tree.structure(model.params)
    for x, y in zip(jax.tree.leaves(stock), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_from_training_output_takes_the_latest_step(source, tmp_path):
    hf, config_dict, model, _ = source
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "config.json", "w") as f:
        json.dump(config_dict, f)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        (out / name).write_bytes(open(os.path.join(hf, name), "rb").read())
    (out / "metrics.jsonl").write_text('{"loss": 1.0}\n')  # training logs are not copied
    doubled = jax.tree.map(lambda x: x * 2, model.params)
    with ocp.CheckpointManager(out / "checkpoints") as manager:
        manager.save(10, args=ocp.args.Composite(params=ocp.args.StandardSave(doubled)))
        manager.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(model.params)), force=True)
        manager.wait_until_finished()
    assert sorted(os.listdir(out / "checkpoints")) == ["10", "5"]
    export(out, tmp_path / "hf_latest", progress=False)
    got = CheckpointReader(tmp_path / "hf_latest").get("model.aligner.linear1.weight")
    want = CheckpointReader(hf).get("model.aligner.linear1.weight")
    np.testing.assert_array_equal(got, want * 2)  # step 10, not 5
    files = set(os.listdir(tmp_path / "hf_latest"))
    assert {"tokenizer.json", "processor_config.json", "chat_template.jinja", "config.json"} <= files
    assert "metrics.jsonl" not in files
    export(out, tmp_path / "hf_step5", step=5, progress=False)
    assert tensor_differences(hf, tmp_path / "hf_step5") == []
    with pytest.raises(FileNotFoundError, match="asked for step 7"):
        export(out, tmp_path / "hf_step7", step=7, progress=False)
    # restore_params reads the training layout too
    config = ModelConfig.from_pretrained(out)
    p = restore_params(out, config)
    np.testing.assert_array_equal(np.asarray(p["aligner"]["linear1"]["kernel"]),
                                  np.asarray(doubled["aligner"]["linear1"]["kernel"]))
