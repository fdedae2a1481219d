"""Generation with parameters sharded over the 8 simulated CPU devices (FSDP and tensor-parallel layouts of
`sharding.RULES`) gives the same tokens as on one device; the KV cache is sharded by batch and kv heads."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import deepseek_vl_jax as D
from deepseek_vl_jax import sharding
from deepseek_vl_jax.generation import generate, kv_cache, loop, sampling, weights
from deepseek_vl_jax.generation.inputs import place, prepare_inputs

import hf_fixtures as F

MESHES = {"fsdp": dict(data=1, fsdp=8, tensor=1), "tensor": dict(data=1, fsdp=2, tensor=4),
          "data-tensor": dict(data=2, fsdp=1, tensor=4)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = F.make_config(hybrid=True)
    ref = F.perturb(F.make_model(cfg, seed=5), seed=6, scale=0.2)
    path = F.save(ref, tmp_path_factory.mktemp("hybrid"))
    return cfg, path, D.load_pretrained(path, progress=False)


@pytest.mark.parametrize("layout", sorted(MESHES))
def test_sharded_generate_equals_one_device(checkpoint, layout):
    cfg, path, single = checkpoint
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh(**MESHES[layout])
    model = D.load_pretrained(path, mesh=mesh, progress=False)
    # the parameters really are spread over the mesh
    specs = {x.sharding.spec for x in jax.tree.leaves(model.params)}
    assert any(s != P() and any(a is not None for a in s) for s in specs)
    inputs = F.make_inputs(cfg, rows=((1, 0), (0, 4)), padding="left")
    kw = dict(max_new_tokens=12, eos_token_id=-1)
    want = generate(single, inputs, **kw)
    np.testing.assert_array_equal(generate(model, inputs, **kw), want)
    # the per-layer trees are views of the stacked weights: each shard aliases the stacked shard's memory
    # (SigLIP's blocks too)
    split = weights.generation_params(model)
    for tower, layer1 in (("language_model", split["layers"][1]), ("vision_model", split["vision_layers"][1])):
        q1 = layer1["self_attn"]["q_proj"]["kernel"]
        stacked = model.params[tower]["layers"]["self_attn"]["q_proj"]["kernel"]
        assert "layers" not in split["params"][tower]
        assert tuple(q1.sharding.spec) == tuple(stacked.sharding.spec)[1:]
        for view, whole in zip(q1.addressable_shards, stacked.addressable_shards):
            assert view.device == whole.device
            offset = view.data.unsafe_buffer_pointer() - whole.data.unsafe_buffer_pointer()
            assert offset == view.data.nbytes  # layer 1 starts one layer into the stacked buffer
    stacked = model.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    # q/k/v and gate/up fuse (new buffers, on request) unless tensor parallelism shards their output axis
    if layout == "fsdp":
        qkv = weights.split_layers(model.params, fuse=True)["layers"][0]["self_attn"]["qkv_proj"]["kernel"]
        assert tuple(qkv.sharding.spec) == tuple(stacked.sharding.spec)[1:] and "fsdp" in tuple(qkv.sharding.spec)
    else:
        with pytest.raises(ValueError, match="tensor parallelism"):
            weights.split_layers(model.params, fuse=True)
    if layout == "tensor":
        check_cache_is_sharded(model, inputs)
        sampled = dict(kw, do_sample=True, top_k=20, temperature=0.8, seed=3)
        np.testing.assert_array_equal(generate(model, inputs, **sampled), generate(single, inputs, **sampled))


def check_cache_is_sharded(model, batch):
    """The compiled prefill returns the cache laid out by `kv_cache.cache_sharding`: batch 2 over fsdp=2 (the 2 kv
    heads do not divide over tensor=4, so they are replicated)."""
    sampler, sp = sampling.Sampler(), sampling.SamplingParams.create()
    stop = loop.StopParams(eos=np.full((1,), -1, np.int32), pad=np.int32(0), max_new_tokens=np.int32(4))
    inputs, _ = prepare_inputs(model, batch, 4)
    progs = loop.programs(model.config, sampler, model.mesh)
    with jax.set_mesh(model.mesh), sharding.axis_rules(model.mesh):
        state = progs.prefill(weights.generation_params(model), place(inputs, model.mesh), jax.random.key(0), sp,
                              stop, 64)
    k = state.cache[0][0]  # layer 0 keys [B, K, S, H]
    assert len(state.cache) == model.config.text.num_hidden_layers
    assert tuple(k.sharding.spec)[:1] == ("fsdp",), k.sharding.spec
    assert k.addressable_shards[0].data.shape[0] == 1  # one row per fsdp shard
    # the split layer weights keep their parameters' sharding
    layer0 = weights.generation_params(model)["layers"][0]
    q = layer0["self_attn"]["q_proj"]["kernel"]
    stacked = model.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q.sharding.spec) == tuple(stacked.sharding.spec)[1:] and "tensor" in tuple(q.sharding.spec)


def test_cache_sharding_layout():
    text = D.TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4)

    def specs(mesh, batch):
        k, v = kv_cache.cache_sharding(mesh, text, batch=batch, length=128)
        return k.spec, v.spec

    tp = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    assert specs(tp, 4) == (P("fsdp", "tensor", None, None), P("fsdp", "tensor", None, None))
    # batch 3 does not divide over fsdp=2: replicated batch, heads still split
    assert specs(tp, 3) == (P(None, "tensor", None, None),) * 2
    dp = sharding.make_mesh(data=2, fsdp=4, tensor=1)
    assert specs(dp, 8) == (P(("data", "fsdp"), None, None, None),) * 2
    wide = sharding.make_mesh(data=1, fsdp=1, tensor=8)  # 4 kv heads do not split 8 ways: replicated
    assert specs(wide, 2) == (P(None, None, None, None),) * 2
    k, v = kv_cache.init_cache(text, 2, 128, np.float32)[0]
    assert k.shape == (2, 4, 128, 8) and v.shape == (2, 4, 8, 128)
