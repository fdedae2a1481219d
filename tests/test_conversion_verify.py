"""`deepseek-vl-jax verify`: passes on a faithful pair (HF dir vs its converted Flax dir), fails naming the module
whose weights were altered."""

import shutil

import numpy as np
import pytest

from deepseek_vl_jax import cli
from deepseek_vl_jax.conversion import convert, verify
from test_conversion_helpers import edit_tensor, make_hf_dir

SAM_QKV = "model.high_res_vision_model.vision_encoder.layers.1.attn.qkv.weight"
DECODER_MLP = "model.language_model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    cfg, model, hf = make_hf_dir(root / "hf", hybrid=True, tie=False, processor=False, seed=5)
    convert(hf, root / "flax", progress=False)
    return hf, str(root / "flax"), root


def test_faithful_pair_passes(pair, capsys):
    hf, flax, _ = pair
    assert cli.main(["verify", flax, hf]) == 0
    out = capsys.readouterr().out
    for module in ("SigLIP", "SAM", "neck/projection", "aligner", "decoder hidden", "logits"):
        assert module in out
    assert "all modules within the thresholds" in out


@pytest.mark.parametrize("key,module", [(SAM_QKV, "SAM"), (DECODER_MLP, "decoder hidden")])
def test_altered_tensor_fails_naming_its_module(pair, capsys, key, module):
    hf, flax, root = pair
    altered = shutil.copytree(hf, root / f"altered-{module.replace(' ', '_')}")
    edit_tensor(altered, key, lambda x: x * np.float32(1.01))
    assert cli.main(["verify", str(altered), flax]) == 1
    out = capsys.readouterr().out
    assert f"first divergence: {module}" in out
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert rows["SigLIP"].endswith("ok") and rows["logits"].endswith("FAIL")


def test_compare_rows_are_in_pipeline_order(pair):
    hf, flax, _ = pair
    a, b = verify.load(hf), verify.load(flax)
    rows = verify.compare(a, b)
    assert [r.module for r in rows] == list(verify.ORDER)
    assert all(r.max_abs == 0.0 for r in rows) and rows[-1].kl_max == 0.0
