"""Training configs: the stage files load with the paper's trainable towers; overrides, typos and bad values."""

import json

import pytest

from deepseek_vl_jax.training import config as C


@pytest.mark.parametrize("name, towers", [
    ("stage1_aligner", dict(vision=False, high_res=False, aligner=True, language=False)),
    ("stage2_pretrain", dict(vision=False, high_res=False, aligner=True, language=True)),
    ("stage3_sft", dict(vision=True, high_res=False, aligner=True, language=True)),
])
def test_stage_configs_load(name, towers):
    cfg = C.load_config(name)
    assert cfg.trainable == C.TrainableConfig(**towers)
    assert cfg.optimizer.clip_grad_norm == 1.0
    assert cfg.model.param_dtype == "float32"  # float32 master weights
    short = "stage" + name[5]
    assert C.load_config(short) == cfg


def test_collections_per_tower():
    t = C.TrainableConfig(vision=True, high_res=True, aligner=False, language=False)
    assert t.collections() == ("vision_model", "high_res_vision_model", "high_res_vision_neck",
                               "high_res_vision_proj", "high_res_vision_alpha")


def test_overrides_and_cli_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 10, "optimizer": {"learning_rate": 1e-4}}))
    cfg = C.load_config(path, ["optimizer.learning_rate=3e-4", "data.bad_rows=fail", "mesh.tensor=2",
                               "data.length_buckets=[128, 64]", "model.remat_policy=dots"])
    assert cfg.steps == 10
    assert cfg.optimizer.learning_rate == 3e-4
    assert cfg.data.bad_rows == C.BadRows.FAIL
    assert cfg.mesh.tensor == 2
    assert cfg.data.length_buckets == (64, 128)
    assert cfg.model.remat_policy.value == "dots"


def test_typos_and_bad_values_fail():
    with pytest.raises(C.TrainConfigError, match="learning_rat"):
        C.load_config(None, ["optimizer.learning_rat=1e-3"])
    with pytest.raises(C.TrainConfigError, match="bad_rows"):
        C.load_config(None, ["data.bad_rows=ignore"])
    with pytest.raises(C.TrainConfigError, match="multiple of"):
        C.load_config(None, ["data.batch_size=6", "optimizer.grad_accum_steps=4"])
    with pytest.raises(C.TrainConfigError, match="nothing trains"):
        C.load_config(None, ["trainable.vision=false", "trainable.aligner=false", "trainable.language=false"])
    with pytest.raises(C.TrainConfigError, match="stage"):
        C.load_config("stage9")
    with pytest.raises(C.TrainConfigError, match="expected int"):
        C.load_config(None, ["steps=\"ten\""])


def test_buckets():
    d = C.DataConfig(max_length=1000)
    assert d.buckets() == (64, 96, 128, 192, 256, 384, 512, 768, 1000)
    assert C.DataConfig(max_length=100, length_buckets=(32, 200)).buckets() == (32, 100)


def test_round_trip():
    cfg = C.load_config("stage3_sft")
    assert C.from_dict(C.TrainConfig, cfg.to_dict()) == cfg
