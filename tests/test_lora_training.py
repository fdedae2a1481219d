"""LoRA training through the real loop (8 simulated devices, fsdp x tensor): the base stays bit-identical, the
optimizer state holds only the adapters and the trainable aligner (bytes counted), export --merge / --adapter load
in transformers / peft with the same logits, 8 devices = 1 device and an interrupted run resumes exactly; QLoRA
from the shipped model on `quantization`'s int4 QTensors: the loss goes down, the base stays int4 (the same bytes
as `load_pretrained(quantize=)`), the state holds no float copy of it (bytes counted by dtype), `--merge` loads in
transformers with the same logits, and a run from a quantized converted checkpoint equals it and resumes exactly."""

import os

import jax
import numpy as np
import pytest

from deepseek_vl_jax import lora, quantization
from deepseek_vl_jax.pretrained import load_pretrained
from deepseek_vl_jax.training import loop, train

import test_training_helpers as H

LORA = {"rank": 4, "alpha": 8.0}
SECTIONS = dict(steps=4, trainable={"vision": False, "aligner": True, "language": False}, lora=LORA,
                optimizer={"min_learning_rate_ratio": 1.0}, checkpoint={"every": 2, "keep": 5, "async_save": False})


@pytest.fixture(scope="module")
def data():
    d = H.scratch("lora_data")
    return H.model_dir(), H.write_dataset(d, n=8)


@pytest.fixture(scope="module")
def straight(data):
    model, path = data
    out = H.scratch("lora_straight")
    result = train(H.tiny_config(**SECTIONS), model, path, out)
    result.out = out
    return result


def test_base_bit_identical_and_adapters_train(data, straight):
    before = load_pretrained(data[0], progress=False).params
    after = jax.device_get(straight.state.params)
    for tower in ("vision_model", "language_model"):
        for a, b in zip(jax.tree.leaves(before[tower]), jax.tree.leaves(after[tower])):
            np.testing.assert_array_equal(np.asarray(a), b)
    assert all(np.abs(np.asarray(a) - b).max() > 0
               for a, b in zip(jax.tree.leaves(before["aligner"]), jax.tree.leaves(after["aligner"])))
    paths = lora.adapter_paths(after)
    assert len(paths) == 7 and all(p[:2] == ("language_model", "layers") for p in paths)
    for p in paths:  # B starts at zero; it moved
        assert np.abs(lora.adapters.get_path(after["lora"], p)["lora_b"]).max() > 0
    assert straight.losses[-1] < straight.losses[0]


def test_optimizer_state_holds_only_adapters_and_aligner(straight):
    params = straight.state.params
    trained_n, trained_bytes = lora.count({"lora": params["lora"], "aligner": params["aligner"]})
    total_n, _ = lora.count(params)
    _, opt_bytes = lora.count(straight.state.opt_state)
    moments = straight.state.opt_state[1][0]
    assert set(moments.mu) == {"lora", "aligner"}
    # mu and nu: one float32 per trained parameter each; the rest are the step counters (int32 scalars)
    assert 2 * trained_bytes <= opt_bytes <= 2 * trained_bytes + 16, (opt_bytes, trained_bytes)
    assert trained_n < total_n / 4


def _inputs(model_dir):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 100, size=(2, 12))
    ids[0, 2:6] = cfg.image_token_id  # one image of 4 tokens in row 0
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    pixels = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def test_export_merge_and_adapter_load_in_transformers_and_peft(data, straight):
    import peft
    import torch
    import transformers
    from deepseek_vl_jax.cli import main
    from deepseek_vl_jax.model import DeepseekVL

    model_dir = data[0]
    merged, adapter = H.scratch("lora_merged") + "/hf", H.scratch("lora_adapter") + "/peft"
    assert main(["export", straight.out, merged, "--merge", "--no-progress"]) == 0
    assert main(["export", straight.out, adapter, "--adapter", "--no-progress"]) == 0
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    x = _inputs(model_dir)
    params = jax.device_get(straight.state.params)
    config = load_pretrained(model_dir, progress=False).config
    args = [jax.numpy.asarray(x[k]) for k in ("input_ids", "attention_mask", "pixel_values")]
    ours = np.asarray(lora.apply(DeepseekVL(config), params, *args, config=H.tiny_config(**SECTIONS).lora))
    tx = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        hf = transformers.DeepseekVLForConditionalGeneration.from_pretrained(merged).eval()
        got_merged = hf(**tx).logits.numpy()
        base = transformers.DeepseekVLForConditionalGeneration.from_pretrained(model_dir).eval()
        got_peft = peft.PeftModel.from_pretrained(base, adapter).eval()(**tx).logits.numpy()
    for got in (got_merged, got_peft):
        assert H.F.max_rel_err(got, ours, x["attention_mask"]) <= 1e-5
    # and back: the adapter folded in by load_pretrained
    back = np.asarray(load_pretrained(model_dir, progress=False, adapter=adapter)(**x))
    assert H.F.max_rel_err(back, ours, x["attention_mask"]) <= 1e-5
    assert main(["export", straight.out, H.scratch("lora_plain") + "/hf", "--no-progress"]) == 2  # user error: names the flags


class Interrupt(Exception):
    pass


def interrupted_then_resumed(monkeypatch, run):
    """run() stopped after step 3 (checkpoint 2 written, step 3 lost), then run() again: (the first run's losses by
    step, the resumed run)."""
    real_log, seen = loop.MetricsLogger.log, {}

    def log(self, step, record, kind="train"):
        real_log(self, step, record, kind)
        seen[step] = record["loss"]
        if step == 3:
            raise Interrupt

    monkeypatch.setattr(loop.MetricsLogger, "log", log)
    with pytest.raises(Interrupt):
        run()
    monkeypatch.setattr(loop.MetricsLogger, "log", real_log)
    return seen, run()


def test_one_device_interrupted_and_resumed_equals_eight_devices(data, straight, monkeypatch):
    """On one device: stopped after step 3 (checkpoint 2 written, step 3 lost), then resumed: the resumed step 3 is
    bit-identical to the lost one, and every loss and adapter equals the 8-device (fsdp x tensor) run's."""
    model, path = data
    out = H.scratch("lora_resume")
    cfg = H.tiny_config(**{**SECTIONS, "mesh": {"data": 1, "fsdp": 1, "tensor": 1}})
    seen, resumed = interrupted_then_resumed(monkeypatch, lambda: train(cfg, model, path, out,
                                                                        devices=jax.devices()[:1]))
    assert resumed.start_step == 2 and resumed.steps == [3, 4]
    assert resumed.losses[0] == seen[3]  # bit-identical
    np.testing.assert_allclose([seen[1], seen[2], *resumed.losses], straight.losses, rtol=2e-5)
    a = straight.state.params["lora"]["language_model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert a.addressable_shards[0].data.shape != a.shape  # the adapters really are sharded (by the rules table)
    # Adam moves each element by ~lr a step, normalised by its own gradient's RMS, so an element whose gradient is
    # near float32 noise moves by a noise-dominated fraction of lr. Nearly every element agrees to 2e-5 of its
    # leaf's scale; the few such elements (measured: 1 of 768, off by 4.1e-6 = 0.4% of one step) within 1% of a step.
    lr = cfg.optimizer.learning_rate
    for x, y in zip(jax.tree.leaves(jax.device_get(resumed.state.params["lora"])),
                    jax.tree.leaves(jax.device_get(straight.state.params["lora"]))):
        diff = np.abs(x - y)
        assert diff.max() <= 1e-2 * lr, diff.max()
        assert np.mean(diff > 2e-5 * np.abs(y).max()) <= 0.005, np.mean(diff > 2e-5 * np.abs(y).max())


QLORA = dict(steps=4, trainable={"vision": False, "aligner": False, "language": False},
             lora={"rank": 8, "alpha": 16.0, "quantize": "int4", "group_size": 32},
             optimizer={"learning_rate": 3e-3, "min_learning_rate_ratio": 1.0},
             data={"batch_size": 8, "max_length": 96, "length_buckets": [96]},
             checkpoint={"every": 2, "keep": 5, "async_save": False})
QUANTIZE = {"scheme": "int4", "group_size": 32}


@pytest.fixture(scope="module")
def qlora():
    from deepseek_vl_jax.synthetic.dataset import write_split

    model = os.path.join(H.REPO, "models", "deepseek-vl-tiny")
    rows = write_split(H.scratch("qlora_data"), "train", 16, seed=5)
    out = H.scratch("qlora_out")
    result = train(H.tiny_config(**QLORA), model, rows, out)
    result.model, result.rows, result.out = model, rows, out
    return result


def test_qlora_trains_from_shipped_model_and_base_stays_int4(qlora):
    assert np.mean(qlora.losses[-2:]) < 0.8 * qlora.losses[0], qlora.losses
    base = load_pretrained(qlora.model, progress=False, quantize=QUANTIZE).params
    up = qlora.state.params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.values.addressable_shards[0].data.shape != up.values.shape  # sharded by the rules table
    params = jax.device_get(qlora.state.params)
    assert len(lora.adapter_paths(params)) == 7
    for path in lora.adapter_paths(params):
        got, want = (lora.adapters.get_path(p, path)["kernel"] for p in (params, base))
        assert isinstance(got, quantization.QTensor) and got.values.dtype == np.uint8 and got.group_size == 32
        np.testing.assert_array_equal(got.values, want.values)  # frozen: the same bytes
        np.testing.assert_array_equal(got.scales, want.scales)
    _, opt_bytes = lora.count(qlora.state.opt_state)
    assert opt_bytes <= 2 * lora.count(params["lora"])[1] + 16


def test_qlora_state_holds_no_float_copy_of_the_base(qlora):
    """Every float byte of the train state is accounted for: the base's unquantized leaves (embeddings, norms,
    vision towers, aligner), the int4 kernels' scales, and the adapters with their two Adam moments."""
    float_model = load_pretrained(qlora.model, progress=False).params
    kernels = [lora.adapters.get_path(float_model, p)["kernel"] for p in lora.adapter_paths(qlora.state.params)]
    kernel_bytes = sum(k.nbytes for k in kernels)
    by_dtype: dict = {}
    for x in jax.tree.leaves((qlora.state.params, qlora.state.opt_state)):
        by_dtype[np.dtype(x.dtype)] = by_dtype.get(np.dtype(x.dtype), 0) + x.nbytes
    scales = [lora.adapters.get_path(qlora.state.params, p)["kernel"].scales for p in
              lora.adapter_paths(qlora.state.params)]
    adapters = lora.count(qlora.state.params["lora"])[1]
    want = lora.count(float_model)[1] - kernel_bytes + sum(s.nbytes for s in scales) + 3 * adapters
    assert by_dtype[np.dtype(np.float32)] == want, (by_dtype, want)
    assert by_dtype[np.dtype(np.uint8)] == kernel_bytes // 8  # int4: two to a byte
    assert set(by_dtype) <= {np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.int32)}
    assert by_dtype.get(np.dtype(np.int32), 0) <= 16  # step counters


def test_qlora_merge_export_loads_in_transformers(qlora):
    import torch
    import transformers
    from deepseek_vl_jax.cli import main
    from deepseek_vl_jax.model import DeepseekVL

    merged = H.scratch("qlora_merged") + "/hf"
    assert main(["export", qlora.out, merged, "--merge", "--no-progress"]) == 0
    config = load_pretrained(qlora.model, progress=False).config
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 400, size=(2, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    ours = np.asarray(lora.apply(DeepseekVL(config), jax.device_get(qlora.state.params), jax.numpy.asarray(ids),
                                 jax.numpy.asarray(mask), config=H.tiny_config(**QLORA).lora))
    with torch.no_grad():
        hf = transformers.DeepseekVLForConditionalGeneration.from_pretrained(merged).eval()
        got = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert H.F.max_rel_err(got, ours, mask) <= 1e-5


def test_qlora_from_a_quantized_converted_checkpoint_equals_it_and_resumes_exactly(qlora, monkeypatch):
    """`convert --quantize int4` then QLoRA on it, on one device: the same int4 base, so the losses of the 8-device
    (fsdp x tensor, sharded QTensors) run that quantized on load; stopped after step 3 and resumed (from checkpoint
    2, QTensors in the quantization layout): bit-identical. Settings that do not name the checkpoint's quantization
    are refused in one line."""
    from deepseek_vl_jax.cli import main

    converted = H.scratch("qlora_converted") + "/int4"
    assert main(["convert", qlora.model, converted, "--quantize", "int4", "--group-size", "32", "--no-progress"]) == 0
    out = H.scratch("qlora_resume")
    one = H.tiny_config(**{**QLORA, "mesh": {"data": 1, "fsdp": 1, "tensor": 1}})
    seen, resumed = interrupted_then_resumed(monkeypatch, lambda: train(one, converted, qlora.rows, out,
                                                                        devices=jax.devices()[:1]))
    assert resumed.start_step == 2 and resumed.losses[0] == seen[3]  # bit-identical
    np.testing.assert_allclose([seen[1], seen[2], *resumed.losses], qlora.losses, rtol=0,
                               atol=2e-5 * max(qlora.losses))  # the last loss is ~1e-3: relative to the scale
    wrong = H.tiny_config(**{**QLORA, "lora": {**QLORA["lora"], "quantize": "int8"}})
    with pytest.raises(lora.LoraError, match="quantized checkpoint .*lora.quantize=int4 lora.group_size=32"):
        train(wrong, converted, qlora.rows, H.scratch("qlora_wrong"))


def test_qlora_step_keeps_no_float_copy_of_the_base_for_backward(qlora):
    """The compiled QLoRA step's temporaries are those of LoRA on the float base: the input gradient dequantizes
    each frozen kernel again instead of keeping it (stacked over the scan, a float copy of the decoder)."""
    import jax.numpy as jnp
    from deepseek_vl_jax.model import DeepseekVL
    from deepseek_vl_jax.training import optimizer as opt_lib
    from deepseek_vl_jax.training import state as state_lib
    from deepseek_vl_jax.training import step as step_lib

    cfg = H.tiny_config(**QLORA)
    tx, schedule = opt_lib.make_optimizer(cfg.optimizer, cfg.steps), opt_lib.learning_rate_schedule(cfg.optimizer, 4)
    batch = {k: jnp.ones((1, 8, 96), jnp.int32) for k in ("input_ids", "attention_mask", "labels")}
    temps = {}
    for quantize in (None, QUANTIZE):
        model = load_pretrained(qlora.model, progress=False, quantize=quantize)
        state = state_lib.create(state_lib.add_lora(model.params, cfg.lora, cfg.trainable, jax.random.key(0)), tx,
                                 cfg.trainable)
        step, _ = step_lib.compile_steps(DeepseekVL(model.config), tx, cfg.trainable, schedule, lora=cfg.lora)
        temps[quantize is None] = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    float_model = load_pretrained(qlora.model, progress=False).params
    decoder = sum(lora.adapters.get_path(float_model, p)["kernel"].nbytes for p in lora.adapter_paths(qlora.state.params))
    assert temps[False] - temps[True] < decoder / 4, (temps, decoder)


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_checkpoint_holds_the_trained_leaves_and_a_record_of_the_base(data, straight):
    """A LoRA checkpoint's params item is the adapters and the trained aligner (bytes on disk), not the base; its
    meta names the base and fingerprints its bits; resuming it (nothing left to train) gives the run's state back
    bit for bit, the base reloaded from --model."""
    from deepseek_vl_jax.conversion import frozen_base, orbax_io

    step_dir = os.path.join(straight.out, "checkpoints", "4")
    params = jax.device_get(straight.state.params)
    _, trained = lora.count({"lora": params["lora"], "aligner": params["aligner"]})
    _, base = lora.count({k: v for k, v in params.items() if k not in ("lora", "aligner")})
    stored = orbax_io.leaf_metadata(os.path.join(step_dir, "params"))
    assert {p[0] for p in stored} == {"lora", "aligner"}
    assert sum(int(np.prod(s)) * d.itemsize for s, d in stored.values()) == trained
    opt = orbax_io.leaf_metadata(os.path.join(step_dir, "opt_state"))
    assert 2 * trained <= sum(int(np.prod(s)) * d.itemsize for s, d in opt.values()) <= 2 * trained + 16
    # measured: 105-134 kB on disk for 59 kB of leaves (Orbax's metadata varies); the base (686 kB here, ~14 GB
    # for the 7B model) is not there
    on_disk = _dir_bytes(os.path.join(step_dir, "params"))
    assert on_disk < base / 2, (on_disk, trained, base)
    rec = frozen_base.read_record(straight.out, 4)
    assert rec["path"] == os.path.abspath(data[0]) and rec["collections"] == ["language_model", "vision_model"]
    assert rec["fingerprint"] == frozen_base.fingerprint(
        {k: v for k, v in load_pretrained(data[0], progress=False).params.items() if k in rec["collections"]})
    again = train(H.tiny_config(**SECTIONS), data[0], data[1], straight.out)
    assert again.start_step == 4 and again.steps == []
    for a, b in zip(jax.tree.leaves(jax.device_get(again.state)), jax.tree.leaves(jax.device_get(straight.state))):
        np.testing.assert_array_equal(a, b)


def test_a_changed_base_is_refused_in_one_line(data, straight, tmp_path):
    """The run's base copied elsewhere (its checkpoints' records pointing there): export works; then one weight of
    the base changes (same shapes, same config.json): resume and export are refused, naming both."""
    import json
    import re
    import shutil

    import safetensors.numpy
    from deepseek_vl_jax.cli import main
    from deepseek_vl_jax.training import checkpointing

    model, out = str(tmp_path / "model"), str(tmp_path / "out")
    shutil.copytree(data[0], model)
    shutil.copytree(straight.out, out)
    for step in os.listdir(os.path.join(out, "checkpoints")):
        file = os.path.join(out, "checkpoints", step, "meta", "metadata")
        if os.path.isfile(file):
            with open(file) as f:
                meta = json.load(f)
            meta["base"]["path"] = model
            with open(file, "w") as f:
                json.dump(meta, f)
    assert main(["export", out, str(tmp_path / "merged"), "--merge", "--no-progress"]) == 0
    (weights,) = [f for f in os.listdir(model) if f.endswith(".safetensors")]
    tensors = safetensors.numpy.load_file(os.path.join(model, weights))
    name = next(k for k in sorted(tensors) if "layers.0.mlp.up_proj" in k)
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] += 1e-3
    safetensors.numpy.save_file(tensors, os.path.join(model, weights), metadata={"format": "pt"})
    with pytest.raises(checkpointing.ResumeError) as e:
        train(H.tiny_config(**{**SECTIONS, "steps": 5}), model, data[1], out)
    message = str(e.value)
    assert "\n" not in message and f"checkpoint 4 in {out} was trained on the frozen base {model}" in message
    assert len(re.findall(r"fingerprint (now )?[0-9a-f]{12}", message)) == 2, message
    assert main(["export", out, str(tmp_path / "merged2"), "--merge", "--no-progress"]) == 2


def test_an_old_checkpoint_of_every_parameter_still_resumes_and_exports(data, straight, tmp_path):
    """The layout before trainable-only checkpoints (every parameter in `params`, no base record): resumed, the
    same state as the run; exported --merge, the same files as the new layout's."""
    from deepseek_vl_jax.cli import main
    from deepseek_vl_jax.training import checkpointing

    import shutil

    import grain.checkpoint
    import orbax.checkpoint as ocp

    out = str(tmp_path / "old")
    shutil.copytree(straight.out, out, ignore=shutil.ignore_patterns("checkpoints"))
    src = checkpointing.manager(straight.out, H.tiny_config(**SECTIONS).checkpoint)
    meta = src.restore(4, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore(), data_iter=grain.checkpoint.CheckpointRestore(checkpointing.IteratorSnapshot())))
    src.close()
    old_meta = {k: v for k, v in meta["meta"].items() if k != "base"}
    mgr = checkpointing.manager(out, H.tiny_config(**SECTIONS).checkpoint)
    checkpointing.save(mgr, 4, straight.state, meta["data_iter"].state, old_meta, force=True)
    mgr.wait_until_finished()
    mgr.close()
    again = train(H.tiny_config(**SECTIONS), data[0], data[1], out)
    assert again.start_step == 4
    for a, b in zip(jax.tree.leaves(jax.device_get(again.state)), jax.tree.leaves(jax.device_get(straight.state))):
        np.testing.assert_array_equal(a, b)
    new, old = str(tmp_path / "new_hf"), str(tmp_path / "old_hf")
    assert main(["export", straight.out, new, "--merge", "--no-progress"]) == 0
    assert main(["export", out, old, "--merge", "--no-progress"]) == 0
    for name in sorted(os.listdir(new)):
        if name.endswith(".safetensors"):
            assert open(os.path.join(new, name), "rb").read() == open(os.path.join(old, name), "rb").read(), name
    # the old layout's params item held the base too: its stored array bytes are the new one's plus the base's
    # (counted from Orbax's array metadata: the bytes on disk also hold metadata whose size varies between runs)
    from deepseek_vl_jax.conversion import orbax_io

    _, base = lora.count({k: v for k, v in straight.state.params.items() if k not in ("lora", "aligner")})
    stored = [sum(int(np.prod(s)) * d.itemsize for s, d in orbax_io.leaf_metadata(
        os.path.join(d, "checkpoints", "4", "params")).values()) for d in (out, straight.out)]
    assert stored[0] - stored[1] == base, (stored, base)
