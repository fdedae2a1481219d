import json

import pytest

from deepseek_vl_jax import ConfigError, ModelConfig, RopeConfig
from deepseek_vl_jax.common import ModelType

import hf_fixtures as F


def test_parses_transformers_config_both_types():
    for hybrid in (False, True):
        d = F.make_config(hybrid=hybrid, tie=False).to_dict()
        cfg = ModelConfig.from_hf(d)
        assert cfg.model_type == (ModelType.DEEPSEEK_VL_HYBRID if hybrid else ModelType.DEEPSEEK_VL)
        assert cfg.text.num_key_value_heads == 2 and cfg.text.head_dim == 16
        assert cfg.vision.num_patches == 16 and cfg.num_image_tokens == 16
        assert cfg.tie_word_embeddings is False and cfg.image_token_id == F.IMAGE_TOKEN
        assert (cfg.high_res is not None) == hybrid
        if hybrid:
            assert cfg.high_res.global_attn_indexes == (1, 2) and cfg.high_res.window_size == 3
        hash(cfg)  # frozen and hashable: usable as a static jit argument


def test_old_and_new_spellings_agree():
    new = F.make_config(text={"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    new = new.to_dict()
    new["dtype"] = "bfloat16"
    old = json.loads(json.dumps(new))
    t = old["text_config"]
    del t["rope_parameters"]
    t["rope_theta"] = 5e5
    t["rope_scaling"] = {"type": "linear", "factor": 2.0}
    del old["dtype"]
    old["torch_dtype"] = "bfloat16"
    a, b = ModelConfig.from_hf(new), ModelConfig.from_hf(old)
    assert a == b
    assert a.text.rope == RopeConfig(rope_type="linear", theta=5e5, factor=2.0)
    assert a.checkpoint_dtype == "bfloat16"


def test_unknown_model_type_is_a_clear_error():
    d = F.make_config().to_dict()
    d["model_type"] = "llava"
    with pytest.raises(ConfigError, match="unknown model_type 'llava'"):
        ModelConfig.from_hf(d)


def test_missing_fields_are_clear_errors():
    d = F.make_config().to_dict()
    del d["text_config"]["hidden_size"]
    with pytest.raises(ConfigError, match=r"text_config: missing required field\(s\) \['hidden_size'\]"):
        ModelConfig.from_hf(d)
    d = F.make_config(hybrid=True).to_dict()
    del d["high_res_vision_config"]
    with pytest.raises(ConfigError, match="no high_res_vision_config"):
        ModelConfig.from_hf(d)
    d = F.make_config().to_dict()
    del d["vision_config"]
    with pytest.raises(ConfigError, match="no vision_config"):
        ModelConfig.from_hf(d)


def test_bad_values_are_clear_errors(tmp_path):
    d = F.make_config().to_dict()
    d["text_config"]["num_key_value_heads"] = 3
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf(d)
    d = F.make_config().to_dict()
    d["text_config"]["hidden_act"] = "swiglu9"
    with pytest.raises(ConfigError, match="unsupported activation 'swiglu9'"):
        ModelConfig.from_hf(d)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path / "nowhere")
