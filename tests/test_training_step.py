"""The loss and its gradients against transformers + torch autograd, and one sharded train step (fsdp x tensor over
8 devices) against the same step on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.core import meta

from deepseek_vl_jax import hf_mapping, sharding
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.model import DeepseekVL
from deepseek_vl_jax.pretrained import abstract_params, load_pretrained
from deepseek_vl_jax.training import loop, optimizer as O, state as S, step as ST
from deepseek_vl_jax.training.config import OptimizerConfig, TrainableConfig

import hf_fixtures as F


def make_labels(inputs, seed=0):
    """Learned targets on some text tokens only: never on padding, images or the first two tokens."""
    rng = np.random.default_rng(seed)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = np.where(mask == 1, ids, -100)
    labels[:, :2] = -100
    labels[ids == F.IMAGE_TOKEN] = -100
    labels[rng.random(ids.shape) < 0.3] = -100
    return labels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = F.make_config(tie=False)
    ref = F.make_model(cfg, seed=5)
    path = F.save(ref, tmp_path_factory.mktemp("tiny_train"))
    inputs = F.make_inputs(cfg, rows=((1, 0), (1, 3)), text_len=6)  # one image per row, right padded
    inputs["labels"] = make_labels(inputs)
    return ref, path, inputs


@pytest.mark.parametrize("chunk", [None, 8], ids=["one_chunk", "chunks_of_8"])
def test_loss_and_grads_match_transformers(tiny, chunk, monkeypatch):
    """chunks_of_8: the LM head runs over chunks of 8 positions, the learned ones first and the rest skipped
    (`training.head_loss`); one_chunk: all positions in one chunk."""
    ref, path, inputs = tiny
    if chunk:
        monkeypatch.setattr(ST, "LOSS_CHUNK_BYTES", 4 * inputs["input_ids"].shape[0] * F.TEXT["vocab_size"] * chunk)
        learned = (ST.shifted_targets(inputs["labels"]) != -100).sum(1)
        assert learned.max() <= chunk < inputs["input_ids"].shape[1] - 2 * chunk  # later chunks skipped
    model = load_pretrained(path, progress=False)
    module = DeepseekVL(model.config)
    batch = {k: jnp.asarray(v, jnp.int32 if v.dtype.kind == "i" else jnp.float32) for k, v in inputs.items()}

    ref.zero_grad()
    out = ref(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    out.loss.backward()
    want_loss = float(out.loss.detach())
    want = {name: p.grad.numpy() for name, p in ref.named_parameters() if p.grad is not None}

    loss, grads = jax.jit(jax.value_and_grad(lambda p: ST.mean_loss(module, p, batch)))(model.params)
    assert abs(float(loss) - want_loss) <= 1e-5 * abs(want_loss), (float(loss), want_loss)

    grads = jax.device_get(grads)
    flat = dict(hf_mapping._flatten(grads))
    table = hf_mapping.entries(grads)
    assert len(table) == len(flat) and all(k in want for e in table for k in e.hf_keys)
    top = max(float(np.abs(g).max()) for g in want.values())
    checked = 0
    for e in table:
        expected = hf_mapping.to_flax(e, want.__getitem__)
        # relative to the tensor's own scale; the key biases' true gradient is 0 (softmax ignores a per-query
        # shift), so their float noise is judged against the largest gradient instead
        scale = max(float(np.abs(expected).max()), 1e-4 * top)
        err = float(np.abs(flat[e.path] - expected).max()) / scale
        assert err <= 1e-4, (e.path, err)
        checked += int(np.abs(expected).max() > 1e-4 * top)
    assert checked >= len(table) - 4  # nearly every gradient is non-zero, so the comparison has teeth


def _step_inputs(inputs):
    return {k: np.asarray(v)[None].astype(np.int32 if v.dtype.kind == "i" else np.float32)
            for k, v in inputs.items()}


def test_sharded_step_equals_single_device(tiny):
    ref, path, inputs = tiny
    rows = dict(inputs)
    for k in rows:  # 4 rows so the batch divides over fsdp = 4
        rows[k] = np.concatenate([rows[k], rows[k][::-1]], axis=0)
    host = _step_inputs(rows)
    config = ModelConfig.from_pretrained(path)
    module = DeepseekVL(config)
    trainable = TrainableConfig()
    opt = OptimizerConfig(learning_rate=1e-3, weight_decay=0.1, clip_grad_norm=0.5)
    tx, schedule = O.make_optimizer(opt, 10), O.learning_rate_schedule(opt, 10)

    single = S.create(load_pretrained(path, progress=False).params, tx, trainable)
    step1, _ = ST.compile_steps(module, tx, trainable, schedule)
    want_state, want = step1(single, {k: jnp.asarray(v) for k, v in host.items()})

    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    shardings = S.shardings(config, tx, trainable, mesh)
    state = S.create(load_pretrained(path, mesh=mesh, progress=False).params, tx, trainable, shardings)
    q = state.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    mu = state.opt_state[1][0].mu["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape != q.shape  # really split
    assert mu.sharding == q.sharding  # the moments live where their parameter lives
    batch_sh = {k: loop.batch_sharding(mesh, v.ndim) for k, v in host.items()}
    step8, _ = ST.compile_steps(module, tx, trainable, schedule, mesh, shardings, batch_sh)
    with jax.set_mesh(mesh), sharding.axis_rules(mesh):
        got_state, got = step8(state, loop.to_global(host, mesh, 4))
    assert state.params["aligner"]["linear1"]["kernel"].is_deleted()  # the state was donated

    for k in ("loss", "grad_norm", "learning_rate", "tokens"):
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=2e-5, err_msg=k)
    grads = jax.tree.map(lambda m: np.asarray(m) / (1 - opt.b1), want_state.opt_state[1][0].mu)
    assert jax.tree.structure(grads) == jax.tree.structure(want_state.params)
    for path_, a, b, g in zip(jax.tree_util.tree_leaves_with_path(want_state.params),
                              jax.tree.leaves(want_state.params), jax.tree.leaves(got_state.params),
                              jax.tree.leaves(grads)):
        a, b = np.asarray(a), np.asarray(b)
        if "k_proj" in str(path_[0]) and "bias" in str(path_[0]):
            continue  # true gradient 0 (softmax ignores a per-query shift): Adam's g / (|g| + eps) amplifies noise
        # One Adam step moves a weight by lr * g / (|g| + eps): the two layouts must agree far more closely than
        # a step (1% of lr), except where |g| is small enough for the gradient's summation-order noise (bounded
        # by the moments check below: 1e-5 of the largest gradient) to move g / (|g| + eps), which it does by up
        # to lr * eps * noise / (|g| + eps)^2.
        noise = 1e-5 * np.abs(g).max()
        atol = 1e-2 * opt.learning_rate + opt.learning_rate * opt.eps * noise / (np.abs(g) + opt.eps) ** 2
        assert np.all(np.abs(b - a) <= atol), (str(path_[0]), np.abs(b - a).max(), np.abs(g).min())
    assert int(got_state.step) == 1
    for (path_, a), b in zip(jax.tree_util.tree_leaves_with_path(want_state.opt_state),
                             jax.tree.leaves(got_state.opt_state)):
        if "k_proj" in str(path_) and "bias" in str(path_):
            continue  # float noise around a true 0, see above
        a, b = np.asarray(a), np.asarray(b)  # the moments hold the (clipped) gradients element by element
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max(), err_msg=str(path_))


def test_abstract_state_matches_created(tiny):
    _, path, _ = tiny
    config = ModelConfig.from_pretrained(path)
    trainable = TrainableConfig(vision=False)
    tx = O.make_optimizer(OptimizerConfig(), 10)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = S.shardings(config, tx, trainable, mesh)
    target = S.abstract(config, tx, trainable, shardings)
    shapes = meta.unbox(abstract_params(config))
    assert jax.tree.structure(target.params) == jax.tree.structure(shapes)
    assert "vision_model" not in target.opt_state[1][0].mu


def test_gradient_accumulation_equals_one_big_batch(tiny):
    """2 micro-batches of 2 rows = 1 batch of 4 rows: the loss is token-weighted over the whole step (rows hold
    different numbers of targets), so the update is the same."""
    ref, path, _ = tiny
    inputs = F.make_inputs(ref.config, rows=((0, 0), (0, 5), (0, 1), (0, 3)), text_len=6, seed=3)  # text only
    inputs["labels"] = make_labels(inputs, seed=1)
    host = _step_inputs(inputs)  # [1, 4, T]
    split = {k: v.reshape(2, 2, *v.shape[2:]) for k, v in host.items()}  # [2, 2, T]
    config = ModelConfig.from_pretrained(path)
    module = DeepseekVL(config)
    trainable = TrainableConfig()
    opt = OptimizerConfig(learning_rate=1e-3, clip_grad_norm=None)
    tx, schedule = O.make_optimizer(opt, 10), O.learning_rate_schedule(opt, 10)
    params = load_pretrained(path, progress=False).params
    copy = jax.tree.map(jnp.copy, params)  # each step donates its state
    step, _ = ST.compile_steps(module, tx, trainable, schedule)
    one_state, one = step(S.create(params, tx, trainable), {k: jnp.asarray(v) for k, v in host.items()})
    two_state, two = step(S.create(copy, tx, trainable), {k: jnp.asarray(v) for k, v in split.items()})
    for k in ("loss", "grad_norm", "tokens", "target_tokens"):
        np.testing.assert_allclose(float(two[k]), float(one[k]), rtol=1e-5, err_msg=k)
    per_row = (ST.shifted_targets(host["labels"][0]) != -100).sum(-1)
    assert len(set(np.asarray(per_row).tolist())) > 1  # a plain mean of micro-batch means would differ
    for a, b in zip(jax.tree.leaves(one_state.opt_state), jax.tree.leaves(two_state.opt_state)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())


def test_hybrid_loss_matches_transformers(tmp_path):
    """The hybrid model's loss (SAM path included, images merged row by row) equals transformers'."""
    cfg = F.make_config(hybrid=True, tie=False)
    ref = F.make_model(cfg, seed=7)
    path = F.save(ref, tmp_path)
    inputs = F.make_inputs(cfg, rows=((1, 0), (1, 2)), text_len=5, seed=4)
    inputs["labels"] = make_labels(inputs, seed=2)
    with torch.no_grad():
        want = float(ref(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).loss)
    model = load_pretrained(path, progress=False)
    batch = {k: jnp.asarray(v, jnp.int32 if v.dtype.kind == "i" else jnp.float32) for k, v in inputs.items()}
    got = float(jax.jit(lambda p: ST.mean_loss(DeepseekVL(model.config), p, batch))(model.params))
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)
