"""Broken inputs fail with one clear message and leave nothing at DST; interrupted runs leave nothing at DST."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import deepseek_vl_jax as D
from deepseek_vl_jax import cli, hf_mapping
from deepseek_vl_jax.config import ConfigError, ModelConfig
from deepseek_vl_jax.conversion import DestinationExistsError, atomic, convert, export, flax_checkpoint
from deepseek_vl_jax.pretrained import abstract_params
from deepseek_vl_jax.safetensors_io import INDEX_FILE, write_safetensors
from flax.core import meta
import hf_fixtures as F
from test_conversion_helpers import edit_tensor, make_hf_dir


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    cfg, model, path = make_hf_dir(tmp_path_factory.mktemp("src") / "hf", hybrid=False, tie=False,
                                   max_shard_size="50KB", processor=False)
    return path


def _copy(src, dst):
    return str(shutil.copytree(src, dst))


def _nothing_at(dst):
    parent, name = os.path.split(os.path.abspath(dst))
    return not os.path.exists(dst) and not [e for e in os.listdir(parent) if e.startswith(f".{name}.")]


def _shard_of(directory, key):
    with open(os.path.join(directory, INDEX_FILE)) as f:
        return os.path.join(directory, json.load(f)["weight_map"][key])


def test_missing_shard(sharded, tmp_path):
    src = _copy(sharded, tmp_path / "src")
    os.remove(_shard_of(src, "model.language_model.norm.weight"))
    with pytest.raises(D.CheckpointError, match=r"shard file\(s\) listed in model.safetensors.index.json are "
                                                r"missing: \['model-000\d\d-of-000\d\d.safetensors'\]"):
        convert(src, tmp_path / "out", progress=False)
    assert _nothing_at(tmp_path / "out")


def test_truncated_file(sharded, tmp_path):
    src = _copy(sharded, tmp_path / "src")
    path = _shard_of(src, "model.language_model.embed_tokens.weight")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(D.CheckpointError, match=r"truncated: tensor 'model.language_model.embed_tokens.weight'"):
        convert(src, tmp_path / "out", progress=False)
    assert _nothing_at(tmp_path / "out")


def test_mismatched_shape(sharded, tmp_path):
    src = _copy(sharded, tmp_path / "src")
    edit_tensor(src, "model.aligner.linear2.weight", lambda x: x[:, :-1].copy())
    with pytest.raises(D.MappingError, match=r"shape mismatches: model.aligner.linear2.weight: checkpoint "
                                             r"\(64, 63\), model expects \(64, 64\)"):
        convert(src, tmp_path / "out", progress=False)
    assert _nothing_at(tmp_path / "out")


def test_unknown_key(sharded, tmp_path):
    src = _copy(sharded, tmp_path / "src")
    path = _shard_of(src, "model.language_model.norm.weight")
    from deepseek_vl_jax.safetensors_io import SafetensorsFile
    f = SafetensorsFile(path)
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    write_safetensors(path, {**tensors, "model.language_model.extra.weight": np.ones(3, np.float32)})
    with open(os.path.join(src, INDEX_FILE)) as f:
        index = json.load(f)
    index["weight_map"]["model.language_model.extra.weight"] = os.path.basename(path)
    with open(os.path.join(src, INDEX_FILE), "w") as f:
        json.dump(index, f)
    with pytest.raises(D.MappingError, match=r"unexpected tensors: model.language_model.extra.weight"):
        convert(src, tmp_path / "out", progress=False)
    assert _nothing_at(tmp_path / "out")


def test_unknown_model_type(sharded, tmp_path, capsys):
    src = _copy(sharded, tmp_path / "src")
    with open(os.path.join(src, "config.json")) as f:
        c = json.load(f)
    c["model_type"] = "llava"
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(c, f)
    with pytest.raises(ConfigError, match=r"unknown model_type 'llava'"):
        convert(src, tmp_path / "out", progress=False)
    assert _nothing_at(tmp_path / "out")
    # the command prints one line and exits non-zero
    assert cli.main(["convert", src, str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model_type 'llava'") and "Traceback" not in err
    assert _nothing_at(tmp_path / "out")


def test_existing_destination_needs_force(sharded, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(DestinationExistsError, match="--force"):
        convert(sharded, dst, progress=False)
    assert os.listdir(dst) == ["keep.txt"]
    # a failing forced run keeps the old directory
    broken = _copy(sharded, tmp_path / "broken")
    os.remove(_shard_of(broken, "model.language_model.norm.weight"))
    with pytest.raises(D.CheckpointError):
        convert(broken, dst, force=True, progress=False)
    assert os.listdir(dst) == ["keep.txt"]
    convert(sharded, dst, force=True, progress=False)
    assert flax_checkpoint.is_flax_checkpoint(dst) and not (dst / "keep.txt").exists()
    assert _nothing_at(tmp_path / "nothing")  # and no temporary siblings were left
    assert not [e for e in os.listdir(tmp_path) if ".partial-" in e or ".replaced-" in e]


def test_export_errors(sharded, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a Flax checkpoint"):
        export(sharded, tmp_path / "out", progress=False)
    assert _nothing_at(tmp_path / "out")
    # save_flax_checkpoint checks the tree against the config before writing anything
    with open(os.path.join(sharded, "config.json")) as f:
        config_dict = json.load(f)
    shapes = meta.unbox(abstract_params(ModelConfig.from_hf(config_dict)))
    params = __import__("jax").tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    params["aligner"]["linear1"]["kernel"] = np.zeros((3, 3), np.float32)
    del params["language_model"]["norm"]
    with pytest.raises(hf_mapping.MappingError, match=r"missing parameters: language_model/norm/scale; shape "
                                                      r"mismatches: aligner/linear1/kernel: params \(3, 3\)"):
        flax_checkpoint.save_flax_checkpoint(tmp_path / "flax", config_dict, params)
    assert _nothing_at(tmp_path / "flax")


def _big_checkpoint(directory) -> str:
    """~600 MB of float32 in transformers' layout, written directly (building it with torch would be slow). Not
    zeros: zarr skips chunks equal to the fill value, which would make the conversion too quick to interrupt."""
    cfg = F.make_config(text=dict(vocab_size=64000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=8), tie=False)
    os.makedirs(directory)
    cfg.save_pretrained(directory)
    table = hf_mapping.entries(meta.unbox(abstract_params(ModelConfig.from_pretrained(directory))))
    block = np.random.default_rng(0).standard_normal(2**20).astype(np.float32)
    tensors = {k: np.resize(block, e.hf_shape()) for e in table for k in e.hf_keys}
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"})
    return str(directory)


def test_kill_9_midway_leaves_nothing_at_destination(tmp_path):
    src = _big_checkpoint(tmp_path / "big")
    dst = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "deepseek_vl_jax.cli", "convert", src, str(dst), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    partial = []
    while time.time() < deadline and proc.poll() is None:
        partial = [e for e in os.listdir(tmp_path) if e.startswith(".out.partial-")]
        if partial:
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"convert ended before it could be stopped: {proc.stderr.read().decode()[-2000:]}"
    # freeze it while it writes, then kill -9: deterministic "midway"
    os.kill(proc.pid, signal.SIGSTOP)
    assert partial and not dst.exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not dst.exists()
    left = [e for e in os.listdir(tmp_path) if e.startswith(".out.partial-")]
    assert left == partial  # the documented leftover: a clearly temporary name
    assert atomic.stale_siblings(str(dst)) == [str(tmp_path / left[0])]
    # the next run removes it and succeeds
    convert(src, dst, progress=False)
    assert flax_checkpoint.is_flax_checkpoint(dst)
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".out.")]
