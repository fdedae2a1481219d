"""The rules table: logical names to mesh axes, uneven dimensions replicated, params created already sharded."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_vl_jax import sharding
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.pretrained import init_params

import hf_fixtures as F


def test_spec_for_rules_and_fallbacks():
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    assert sharding.spec_for(("embed", "heads"), (64, 64), mesh) == P("fsdp", "tensor")
    assert sharding.spec_for(("layers", "embed", "mlp"), (2, 64, 96), mesh) == P(None, "fsdp", "tensor")
    # 6 kv columns do not divide 4-way tensor parallelism: replicated rather than an error.
    assert sharding.spec_for(("embed", "kv_heads"), (64, 6), mesh) == P("fsdp", None)
    assert sharding.spec_for(("norm",), (64,), mesh) == P(None)
    assert sharding.spec_for(("batch", "length"), (8, 5), mesh) == P("fsdp", None)


def test_make_mesh_sizes():
    assert dict(sharding.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        sharding.make_mesh(data=2, fsdp=4, tensor=2)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.make_mesh(data=-1, fsdp=-1)


def test_init_params_are_created_sharded():
    config = ModelConfig.from_hf(F.make_config(hybrid=True, tie=False).to_dict())
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    params = init_params(config, jax.random.key(0), mesh)
    up = params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.sharding.spec == P(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (2, 32, 24)
    # Same values as an unsharded init from the same key.
    plain = init_params(config, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(up), np.asarray(plain["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]))
