"""Quantized Flax checkpoints (quantization.checkpoint, `convert --quantize`): restore equals quantize-on-load bit
for bit, sharded restore equals one device, and clear errors for settings that cannot apply."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import deepseek_vl_jax as D
from deepseek_vl_jax import hf_mapping, sharding
from deepseek_vl_jax import quantization as Q
from deepseek_vl_jax.cli import main
from deepseek_vl_jax.conversion import flax_checkpoint, orbax_io

import hf_fixtures as F

ALL = {"scheme": "int4", "group_size": 16, "lm_head": True, "embeddings": True, "vision": True}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    cfg = F.make_config(hybrid=True, tie=False)
    path = F.save(F.make_model(cfg, seed=5), tmp_path_factory.mktemp("hf"))
    return cfg, path


def _leaves(params):
    return dict(hf_mapping._flatten(Q.to_checkpoint_tree(params)))


def _assert_bitwise(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        x, y = np.asarray(la[k]), np.asarray(lb[k])
        assert x.dtype == y.dtype, k
        np.testing.assert_array_equal(x, y, err_msg="/".join(k))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_converted_checkpoint_restores_what_quantize_on_load_gives(source, tmp_path, scheme):
    cfg, path = source
    dst = str(tmp_path / "q")
    args = ["convert", path, dst, "--dtype", "float32", "--quantize", scheme, "--group-size", "32", "--no-progress"]
    assert main(args) == 0
    marker = flax_checkpoint.read_marker(dst)
    assert marker["quantization"] == {"scheme": scheme, "group_size": 32, "lm_head": False, "embeddings": False,
                                      "vision": False}
    stored = {"/".join(k): d for k, (_, d) in orbax_io.leaf_metadata(os.path.join(dst, "params")).items()}
    values = stored["language_model/layers/self_attn/q_proj/kernel/q_values"]
    assert values == (np.int8 if scheme == "int8" else np.uint8)
    restored = D.load_pretrained(dst, progress=False)
    on_load = D.load_pretrained(path, progress=False, quantize={"scheme": scheme, "group_size": 32})
    _assert_bitwise(restored.params, on_load.params)
    # the same settings again are fine (nothing re-quantized), a different scheme is refused
    _assert_bitwise(D.load_pretrained(dst, progress=False, quantize={"scheme": scheme, "group_size": 32}).params,
                    on_load.params)
    other = "int4" if scheme == "int8" else "int8"
    with pytest.raises(Q.QuantizationError, match=f"already quantized \\({scheme}.*requested quantization "
                                                  f"\\({other}.*conflicts"):
        D.load_pretrained(dst, progress=False, quantize=other)


def test_everything_quantized_sharded_restore_equals_one_device(source, tmp_path):
    cfg, path = source
    dst = str(tmp_path / "q")
    D.convert(path, dst, dtype="float32", quantize=ALL, progress=False)
    one = D.load_pretrained(dst, progress=False)
    _assert_bitwise(one.params, D.load_pretrained(path, progress=False, quantize=ALL).params)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    many = D.load_pretrained(dst, progress=False, mesh=mesh)
    gate = many.params["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert gate.values.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert gate.values.addressable_shards[0].data.shape != gate.values.shape
    _assert_bitwise(many.params, one.params)
    # a float Flax checkpoint quantized while restoring gives the same bits too
    flt = str(tmp_path / "float")
    D.convert(path, flt, dtype="float32", progress=False)
    _assert_bitwise(D.load_pretrained(flt, progress=False, quantize=ALL).params, one.params)


def test_clear_errors(source, tmp_path, capsys):
    cfg, path = source
    dst = str(tmp_path / "bad")
    assert main(["convert", path, dst, "--quantize", "int4", "--group-size", "48", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: int4 group size 48 does not divide the input width") and "\n" not in err
    assert not os.path.exists(dst)  # nothing half-written
    assert main(["convert", path, dst, "--quantize", "int3"]) == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_generate_cli_conflicting_quantize_is_one_line(source, tmp_path):
    """The generation CLIs take --quantize; a conflicting one on a quantized checkpoint is a one-line error."""
    cfg, path = source
    import shutil

    model_dir = str(tmp_path / "demo-q")
    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "deepseek-vl-tiny")
    D.convert(demo, model_dir, quantize="int8", progress=False)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-m", "deepseek_vl_jax.cli", "generate", "--model", model_dir,
                          "--prompt", "hi", "--quantize", "int4", "--max-new-tokens", "2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-1000:]
    assert out.stderr.strip().startswith("error: cannot load the model") and "conflicts" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    shutil.rmtree(model_dir)


def test_export_dequantizes(source, tmp_path, capsys):
    """`export` of a quantized checkpoint writes float HF tensors, says so, and each tensor is the original HF one
    within the scheme's closed-form bound (int4: half a step, absmax / 14 of its group at most; int8: absmax / 254
    of its channel); tensors left unquantized (norms, biases) are the originals exactly."""
    from safetensors.numpy import load_file

    cfg, path = source
    original = load_file(os.path.join(path, "model.safetensors"))
    for spec, qmax in ((ALL, 7), ("int8", 127)):
        qdst, hf = str(tmp_path / f"q{qmax}"), str(tmp_path / f"hf{qmax}")
        D.convert(path, qdst, quantize=spec, progress=False)
        capsys.readouterr()
        assert main(["export", qdst, hf, "--no-progress"]) == 0
        out = capsys.readouterr().out.strip()
        scheme = "int4" if qmax == 7 else "int8"
        assert out == f"wrote {hf} (dequantized from {scheme}: float weights that keep its rounding error)"
        got = load_file(os.path.join(hf, "model.safetensors"))
        assert got.keys() == original.keys()
        changed = 0
        for k, x in got.items():
            w = original[k].astype(np.float32)
            assert x.shape == w.shape and x.dtype == np.float32, k
            err = np.abs(x - w).max()
            assert err <= np.abs(w).max() / (2 * qmax) * (1 + 1e-6), (k, err)
            if w.ndim == 1:
                np.testing.assert_array_equal(x, w, err_msg=k)
            changed += bool(err)
        assert changed >= 7 * cfg.text_config.num_hidden_layers  # every decoder linear layer went through it
