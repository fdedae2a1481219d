"""The original deepseek-ai layout: checkpoints made here by mapping transformers-made tiny checkpoints backwards
(`to_original_layout`) convert to exactly the params of their HF twins; full-size original configs map to exactly
transformers' tensor names and shapes; dropped, duplicated and unknown keys are handled clearly."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from flax.core import meta

import deepseek_vl_jax as D
import hf_fixtures as F
from deepseek_vl_jax import hf_mapping
from deepseek_vl_jax.config import ConfigError, ModelConfig
from deepseek_vl_jax.conversion import (convert, export, flax_checkpoint, hf_config_from_original, orbax_io,
                                        to_original_layout)
from deepseek_vl_jax.pretrained import abstract_params
from deepseek_vl_jax.safetensors_io import SINGLE_FILE, CheckpointReader, SafetensorsFile, write_safetensors
from test_conversion_helpers import GELU_VISION, make_hf_dir, tensor_differences

# deepseek-ai/deepseek-vl-1.3b-chat and deepseek-vl-7b-chat config.json (the parts the model reads)
ORIGINAL_1_3B = {
    "architectures": ["MultiModalityCausalLM"], "model_type": "multi_modality", "torch_dtype": "bfloat16",
    "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                       "params": {"depth": 2, "input_dim": 1024, "n_embed": 2048, "projector_type": "mlp_gelu"}},
    "language_config": {"hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 16384,
                        "model_type": "llama", "num_attention_heads": 16, "num_hidden_layers": 24,
                        "num_key_value_heads": 16, "torch_dtype": "bfloat16", "vocab_size": 102400},
    "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                      "params": {"image_size": 384, "model_name": "siglip_large_patch16_384",
                                 "select_feature": "same", "select_layer": -1}},
}
ORIGINAL_7B = {
    "architectures": ["MultiModalityCausalLM"], "model_type": "multi_modality", "torch_dtype": "float16",
    "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                       "params": {"depth": 2, "input_dim": 1024, "n_embed": 4096,
                                  "projector_type": "low_high_hybrid_split_mlp_gelu"}},
    "language_config": {"max_position_embeddings": 16384, "model_type": "llama", "num_hidden_layers": 30,
                        "torch_dtype": "float16", "vocab_size": 102400},
    "vision_config": {"cls": "HybridVisionTower", "model_type": "vision", "params": {
        "concat_type": "tuple", "freeze_high": False, "freeze_low": False,
        "high_res_cfg": {"ckpt_path": "", "image_size": 1024, "model_name": "sam_b_downsample", "output_dim": 1024,
                         "select_feature": "same", "select_layer": -1},
        "low_res_cfg": {"ckpt_path": "", "image_size": 384, "model_name": "siglip_large_patch16_384",
                        "output_dim": 1024, "select_feature": "same", "select_layer": -1}}},
}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """kind -> (hf config, torch model, hf dir, original dir, flax-from-original dir, flax-from-hf dir)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            root = tmp_path_factory.mktemp(kind)
            hybrid = kind == "hybrid"
            cfg, model, hf = make_hf_dir(root / "hf", hybrid, tie=not hybrid, vision=GELU_VISION, seed=7)
            orig = to_original_layout(hf, root / "orig")
            convert(orig, root / "flax_o", progress=False)
            convert(hf, root / "flax_h", progress=False)
            cache[kind] = (cfg, model, hf, orig, str(root / "flax_o"), str(root / "flax_h"))
        return cache[kind]

    return get


def _all_params(flax_dir):
    stored = orbax_io.leaf_metadata(os.path.join(flax_dir, flax_checkpoint.PARAMS))
    return orbax_io.restore_leaves_numpy(os.path.join(flax_dir, flax_checkpoint.PARAMS), sorted(stored))


def _add_tensors(directory, extra: dict):
    path = os.path.join(directory, SINGLE_FILE)
    f = SafetensorsFile(path)
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    write_safetensors(path, {**tensors, **extra}, {"format": "pt"})


def test_original_layout_has_the_original_names_and_shapes(twins):
    cfg, model, hf, orig, _, _ = twins("hybrid")
    r = CheckpointReader(orig)
    v, low, high = cfg.vision_config, "vision_model.vision_tower_low.vision_tower", \
        "vision_model.vision_tower_high.vision_tower"
    n = (v.image_size // v.patch_size) ** 2
    assert r.shape(f"{low}.blocks.0.attn.qkv.weight") == (3 * v.hidden_size, v.hidden_size)  # fused
    assert r.shape(f"{low}.pos_embed") == (1, n, v.hidden_size)  # timm's [1, N, C]
    for key in (f"{high}.neck_hd.0.weight", f"{high}.downsamples.1.weight", f"{high}.hd_alpha_downsamples",
                "aligner.high_up_proj.weight", "aligner.low_up_proj.bias", "aligner.layers.1.weight",
                "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        assert key in r, key
    assert not any(k.startswith("model.") for k in r.keys())
    with open(os.path.join(orig, "config.json")) as f:
        c = json.load(f)
    assert c["model_type"] == "multi_modality" and c["vision_config"]["cls"] == "HybridVisionTower"
    assert c["aligner_config"]["params"]["projector_type"] == "low_high_hybrid_split_mlp_gelu"
    vl = CheckpointReader(twins("vl")[3])
    assert "vision_model.vision_tower.blocks.1.attn.qkv.bias" in vl and "aligner.layers.2.weight" in vl
    assert "language_model.lm_head.weight" not in vl  # tied


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_original_converts_to_the_params_of_its_hf_twin(twins, kind):
    cfg, model, hf, orig, flax_o, flax_h = twins(kind)
    a, b = _all_params(flax_o), _all_params(flax_h)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    with open(os.path.join(flax_o, "config.json")) as f, open(os.path.join(hf, "config.json")) as g:
        ours, theirs = json.load(f), json.load(g)
    assert ModelConfig.from_hf(ours) == ModelConfig.from_hf(theirs)
    assert flax_checkpoint.read_marker(flax_o)["source"]["layout"] == "original"


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_original_gives_the_logits_of_its_hf_twin(twins, kind):
    cfg, model, hf, orig, flax_o, _ = twins(kind)
    inputs = F.make_inputs(cfg, rows=((1, 0), (0, 2)))
    want = F.torch_logits(model, inputs, F.mask_positions(inputs["attention_mask"]))
    got = np.asarray(D.load_pretrained(flax_o, progress=False)(**inputs))
    assert F.max_rel_err(got, want, inputs["attention_mask"]) <= 1e-5


def test_original_exports_to_its_hf_twin(twins, tmp_path):
    cfg, model, hf, orig, flax_o, _ = twins("hybrid")
    export(flax_o, tmp_path / "hf", progress=False)
    assert tensor_differences(hf, tmp_path / "hf") == []
    reloaded = transformers.DeepseekVLHybridForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    inputs = F.make_inputs(cfg, rows=((1, 1),))
    np.testing.assert_array_equal(F.torch_logits(reloaded, inputs), F.torch_logits(model, inputs))


def test_unused_and_duplicate_keys_are_dropped_and_reported(twins, tmp_path):
    cfg, model, hf, orig, _, flax_h = twins("hybrid")
    src = shutil.copytree(orig, tmp_path / "orig")
    r = CheckpointReader(orig)
    high = "vision_model.vision_tower_high.vision_tower"
    extra = {"vision_model.vision_tower_low.vision_tower.attn_pool.latent": np.ones((1, 1, 48), np.float32),
             "vision_model.vision_tower_low.vision_tower.attn_pool.q.weight": np.ones((48, 48), np.float32),
             "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": np.ones((8,), np.float32),
             f"{high}.downsamples_hd.0.weight": np.array(r.get(f"{high}.downsamples.0.weight")),
             f"{high}.downsamples_hd.1.weight": np.array(r.get(f"{high}.downsamples.1.weight"))}
    del r
    _add_tensors(src, extra)
    marker = convert(src, tmp_path / "flax", progress=False)
    dropped = marker["source"]["dropped"]
    assert sorted(d.split(" ")[0] for d in dropped) == sorted(extra)
    a, b = _all_params(tmp_path / "flax"), _all_params(flax_h)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_distinct_hd_projection_cannot_be_converted(twins, tmp_path):
    cfg, model, hf, orig, _, _ = twins("hybrid")
    src = shutil.copytree(orig, tmp_path / "orig")
    high = "vision_model.vision_tower_high.vision_tower"
    w = np.array(CheckpointReader(orig).get(f"{high}.downsamples.0.weight"))
    _add_tensors(src, {f"{high}.downsamples_hd.0.weight": w + 1})
    with pytest.raises(D.MappingError, match=r"downsamples_hd\.0\.weight differs from .*downsamples\.0\.weight.*"
                                             r"single projection"):
        convert(src, tmp_path / "out", progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_unknown_original_key_is_an_error(twins, tmp_path):
    cfg, model, hf, orig, _, _ = twins("vl")
    src = shutil.copytree(orig, tmp_path / "orig")
    _add_tensors(src, {"vision_model.vision_tower.blocks.0.attn.q_norm.weight": np.ones((4,), np.float32)})
    with pytest.raises(D.MappingError, match=r"unknown tensors .*blocks\.0\.attn\.q_norm\.weight"):
        convert(src, tmp_path / "out", progress=False)
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ConfigError, match="layout"):
        convert(orig, tmp_path / "out", layout="hf", progress=False)


def test_to_original_refuses_what_the_original_cannot_express(tmp_path):
    _, _, hf = make_hf_dir(tmp_path / "hf", hybrid=False, tie=True, processor=False)  # SigLIP with tanh GELU
    with pytest.raises(ConfigError, match="hidden_act='gelu_pytorch_tanh'"):
        to_original_layout(hf, tmp_path / "orig")
    assert not os.path.exists(tmp_path / "orig")


@pytest.mark.parametrize("original", [ORIGINAL_1_3B, ORIGINAL_7B], ids=["1.3b", "7b"])
def test_full_size_original_config_gives_transformers_tensors(original):
    """Names and shapes from the original config equal those of transformers' model built from the config its
    conversion script hard-codes (on the meta device; nothing is allocated)."""
    hf = hf_config_from_original(original)
    hybrid = hf["model_type"] == "deepseek_vl_hybrid"
    # the values transformers' conversion scripts hard-code
    t, v = hf["text_config"], hf["vision_config"]
    assert (t["hidden_size"], t["max_position_embeddings"], t["vocab_size"]) == \
        ((4096, 16384, 102400) if hybrid else (2048, 16384, 102400))
    assert (t["num_hidden_layers"], t["num_attention_heads"]) == ((30, 32) if hybrid else (24, 16))
    assert t["intermediate_size"] == (11008 if hybrid else 5632)
    assert (v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["num_attention_heads"],
            v["image_size"], v["patch_size"], v["hidden_act"], v["vision_use_head"]) == \
        (1024, 4096, 24, 16, 384, 16, "gelu", False)
    if hybrid:
        h = hf["high_res_vision_config"]
        assert (h["hidden_size"], h["num_hidden_layers"], h["num_attention_heads"], h["image_size"],
                h["patch_size"], h["output_channels"], h["global_attn_indexes"], h["mlp_dim"]) == \
            (768, 12, 12, 1024, 16, 256, [2, 5, 8, 11], 3072)
    cls = transformers.DeepseekVLHybridForConditionalGeneration if hybrid \
        else transformers.DeepseekVLForConditionalGeneration
    config_cls = transformers.DeepseekVLHybridConfig if hybrid else transformers.DeepseekVLConfig
    with torch.device("meta"):
        ref = cls(config_cls(**{k: val for k, val in hf.items() if k not in ("architectures", "model_type")}))
    theirs = {k: tuple(p.shape) for k, p in ref.state_dict().items()}
    if hf["tie_word_embeddings"]:
        theirs.pop("lm_head.weight", None)
    table = hf_mapping.entries(meta.unbox(abstract_params(ModelConfig.from_hf(hf))))
    ours = {k: e.hf_shape() for e in table for k in e.hf_keys}
    assert ours == theirs


def test_chunked_large_tensor_transpose_is_exact(twins, tmp_path, monkeypatch):
    """Tensors over CHUNK_BYTES (32 MiB) are transposed in row chunks: with a tiny threshold every linear layer of
    a tiny checkpoint takes that path (chunks that do not divide the rows, every float dtype); same values."""
    import ml_dtypes

    from deepseek_vl_jax.conversion import fast_mapping

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
        src = rng.standard_normal((37, 53)).astype(dtype)
        monkeypatch.setattr(fast_mapping, "CHUNK_BYTES", 5 * 53 * np.dtype(dtype).itemsize + 1)  # 5 rows a chunk
        dst = np.empty((53, 37), np.float32)
        fast_mapping.transpose_into(src, dst)
        np.testing.assert_array_equal(dst, src.T.astype(np.float32))
    cfg, model, hf, orig, flax_o, _ = twins("vl")
    monkeypatch.setattr(fast_mapping, "CHUNK_BYTES", 300)
    convert(orig, tmp_path / "chunked", progress=False)
    a, b = _all_params(tmp_path / "chunked"), _all_params(flax_o)
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
