"""Optimizer: frozen towers get no optimizer state, the weight-decay mask, the schedule; FLOP counting; the
TensorBoard writer."""

import jax
import numpy as np
import pytest
from flax.core import meta

from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.pretrained import abstract_params, load_pretrained
from deepseek_vl_jax.training import flops, metrics, optimizer as O, state as S
from deepseek_vl_jax.training.config import OptimizerConfig, TrainableConfig

import hf_fixtures as F


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    cfg = F.make_config(hybrid=True, tie=False)
    return F.save(F.make_model(cfg, seed=2), tmp_path_factory.mktemp("hybrid_opt"))


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("trainable", [
    TrainableConfig(vision=False, high_res=False, aligner=True, language=False),  # stage 1
    TrainableConfig(vision=False, high_res=False, aligner=True, language=True),  # stage 2
    TrainableConfig(vision=True, high_res=False, aligner=True, language=True),  # stage 3
])
def test_frozen_towers_have_no_optimizer_state(hybrid_dir, trainable):
    params = load_pretrained(hybrid_dir, progress=False).params
    tx = O.make_optimizer(OptimizerConfig(weight_decay=0.1), 10)
    state = S.create(params, tx, trainable)
    train, frozen = O.split(params, trainable)
    assert set(train) == set(trainable.collections()) & set(params)
    adam = state.opt_state[1][0]
    assert set(adam.mu) == set(adam.nu) == set(train)
    # Adam's two moments for the trainable parameters, two int32 step counters, nothing else
    assert nbytes(state.opt_state) == 2 * nbytes(train) + 2 * 4
    assert len(jax.tree.leaves(state.opt_state)) == 2 * len(jax.tree.leaves(train)) + 2
    assert nbytes(frozen) > 0


def test_weight_decay_mask(hybrid_dir):
    shapes = meta.unbox(abstract_params(ModelConfig.from_pretrained(hybrid_dir)))
    mask = dict(jax.tree_util.tree_leaves_with_path(O.decay_mask(shapes)))
    by_name = {tuple(k.key for k in path): v for path, v in mask.items()}
    decayed = {p for p, v in by_name.items() if v}
    assert ("language_model", "layers", "self_attn", "q_proj", "kernel") in decayed
    assert ("language_model", "lm_head", "kernel") in decayed
    assert ("high_res_vision_model", "neck", "conv2", "kernel") in decayed  # convolutions decay too
    for p, v in by_name.items():
        if p[-1] in ("scale", "bias", "embedding", "position_embedding", "pos_embed", "rel_pos_h", "rel_pos_w",
                     "high_res_vision_alpha"):
            assert not v, p
    assert not by_name[("language_model", "embed_tokens", "embedding")]
    with_emb = jax.tree_util.tree_leaves_with_path(O.decay_mask(shapes, decay_embeddings=True))
    assert dict((tuple(k.key for k in p), v) for p, v in with_emb)[("language_model", "embed_tokens", "embedding")]


def test_schedule_warmup_then_cosine():
    opt = OptimizerConfig(learning_rate=1.0, warmup_steps=4, min_learning_rate_ratio=0.1)
    s = O.learning_rate_schedule(opt, 20)
    np.testing.assert_allclose([float(s(i)) for i in (0, 2, 4)], [0.0, 0.5, 1.0], atol=1e-6)
    mid = 4 + 8
    np.testing.assert_allclose(float(s(mid)), 0.1 + 0.9 * 0.5, atol=1e-6)  # half-way down the cosine
    np.testing.assert_allclose(float(s(20)), 0.1, atol=1e-6)
    flat = O.learning_rate_schedule(OptimizerConfig(learning_rate=2.0, min_learning_rate_ratio=1.0), 5)
    assert [float(flat(i)) for i in range(5)] == [2.0] * 5


def test_flops_formula_and_frozen_towers(hybrid_dir):
    config = ModelConfig.from_pretrained(hybrid_dir)
    t = config.text
    per_token = t.num_hidden_layers * (2 * t.hidden_size * t.num_attention_heads * t.head_dim
                                       + 2 * t.hidden_size * t.num_key_value_heads * t.head_dim
                                       + 3 * t.hidden_size * t.intermediate_size) + t.vocab_size * t.hidden_size
    lengths = [10, 30]
    attention = sum(t.num_hidden_layers * 4 * n * n * t.num_attention_heads * t.head_dim for n in lengths)
    text_only = flops.step_flops(config, TrainableConfig(), lengths, 0)
    assert text_only == pytest.approx(3 * (2 * per_token * 40 + attention))  # 6N per token + attention
    everything = TrainableConfig(vision=True, high_res=True)
    vision_fwd = flops.siglip_flops_forward(config) + flops.sam_flops_forward(config)
    full = flops.step_flops(config, everything, lengths, 2)
    frozen = flops.step_flops(config, TrainableConfig(vision=False, high_res=False), lengths, 2)
    assert full - frozen == pytest.approx(2 * 4 / 2 * vision_fwd)  # frozen towers: forward only (2x, not 6x)
    stage1 = flops.step_flops(config, TrainableConfig(vision=False, language=False), lengths, 0)
    assert stage1 == pytest.approx(2 * (2 * per_token * 40 + attention))  # frozen LM still back-propagates


def test_lora_flops_count_the_frozen_language_model_backward(hybrid_dir):
    """LoRA on the frozen language model: forward + input gradient of the whole decoder and head (4W per token),
    plus 6 r (I + O) per token for each adapted projection of each layer; towers before it: forward only."""
    from deepseek_vl_jax.lora import LoraConfig

    config = ModelConfig.from_pretrained(hybrid_dir)
    t = config.text
    d, f, q, kv = t.hidden_size, t.intermediate_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_token = t.num_hidden_layers * (2 * d * q + 2 * d * kv + 3 * d * f) + t.vocab_size * d
    lengths = [10, 30]
    attention = sum(t.num_hidden_layers * 4 * n * n * t.num_attention_heads * t.head_dim for n in lengths)
    r = 8
    widths = (d + q) + 2 * (d + kv) + (q + d) + 3 * (d + f)  # q, k, v, o, gate, up, down: I + O
    adapters = 6 * r * widths * t.num_hidden_layers * 40
    frozen = TrainableConfig(vision=False, high_res=False, aligner=False, language=False)
    lora = flops.step_flops(config, frozen, lengths, 0, LoraConfig(rank=r))
    assert lora == pytest.approx(4 / 2 * (2 * per_token * 40 + attention) + adapters)
    # with two images: the vision towers and aligner only run forward
    images = flops.step_flops(config, frozen, lengths, 2, LoraConfig(rank=r)) - lora
    fwd = flops.siglip_flops_forward(config) + flops.sam_flops_forward(config) + flops.aligner_flops_forward(config)
    assert images == pytest.approx(2 * fwd)
    # adapters on the aligner only: the aligner and the language model back-propagate, the vision towers do not
    aligner = LoraConfig(rank=r, targets=(r"aligner/.*",))
    got = flops.step_flops(config, frozen, lengths, 2, aligner)
    want = flops.step_flops(config, TrainableConfig(vision=False, high_res=False, aligner=True, language=False),
                            lengths, 2)
    aligner_w = flops.aligner_flops_forward(config) / 2 / config.num_image_tokens  # its weights
    assert got - flops.adapter_flops(config, aligner, lengths, 2) == pytest.approx(
        want - 2 * aligner_w * 2 * config.num_image_tokens)  # as training the aligner, less its weight gradient


def test_tensorboard_events_round_trip(tmp_path):
    w = metrics.EventWriter(str(tmp_path))
    w.scalars(1, {"train/loss": 2.5, "train/mfu": 0.25})
    w.scalars(2, {"train/loss": 2.0, "bad": float("nan")})
    w.close()
    assert metrics.read_events(w.path) == [(1, {"train/loss": 2.5, "train/mfu": 0.25}), (2, {"train/loss": 2.0})]
    assert metrics.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = bytearray(open(w.path, "rb").read())
    data[-6] ^= 0xFF
    open(w.path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        metrics.read_events(w.path)
