"""The training loop in-process: the loss goes down, frozen towers stay put, metrics / TensorBoard / eval files,
and checkpoints in the layout `export` reads."""

import glob
import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from deepseek_vl_jax.pretrained import load_pretrained
from deepseek_vl_jax.training import metrics, train

import test_training_helpers as H

KEYS = ("step", "loss", "grad_norm", "learning_rate", "tokens_per_s", "mfu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = H.model_dir()
    d = str(tmp_path_factory.mktemp("loop_data"))
    train_file = H.write_dataset(d, n=8, bad_lines={4: "{broken"})
    eval_file = H.write_dataset(d, n=5, seed=1, name="eval.jsonl")
    out = str(tmp_path_factory.mktemp("loop_out"))
    cfg = H.tiny_config(steps=5, eval_every=5, trainable={"vision": False},
                        data={"max_length": 64, "length_buckets": []}, checkpoint={"every": 2, "keep": 5})
    result = train(cfg, model, train_file, out, eval_path=eval_file)
    return model, out, cfg, result


def test_loss_goes_down_and_frozen_towers_stay(run):
    model, out, cfg, result = run
    assert result.steps == [1, 2, 3, 4, 5]
    assert all(math.isfinite(x) for x in result.losses)
    assert np.mean(result.losses[-2:]) < result.losses[0] - 0.3, result.losses
    before = load_pretrained(model, progress=False).params
    after = jax.device_get(result.state.params)
    for a, b in zip(jax.tree.leaves(before["vision_model"]), jax.tree.leaves(after["vision_model"])):
        np.testing.assert_array_equal(np.asarray(a), b)  # frozen: bit-identical
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(before["language_model"]),
                                                             jax.tree.leaves(after["language_model"]))]
    assert min(moved) > 0  # every language-model tensor trained
    assert "vision_model" not in result.state.opt_state[1][0].mu


def test_metrics_tensorboard_and_eval_files(run):
    _, out, cfg, result = run
    rows = H.read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert set(KEYS) <= set(r)
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["grad_norm"] > 0
    np.testing.assert_allclose([r["loss"] for r in rows], result.losses, rtol=1e-6)
    assert rows[0]["learning_rate"] == pytest.approx(cfg.optimizer.learning_rate)
    assert rows[-1]["learning_rate"] < rows[0]["learning_rate"]  # cosine decay
    evals = H.read_metrics(out, "eval.jsonl")
    assert [e["step"] for e in evals] == [5] and math.isfinite(evals[0]["loss"]) and evals[0]["tokens"] > 0
    (events,) = glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    scalars = metrics.read_events(events)
    assert [s for s, v in scalars if "train/loss" in v] == [1, 2, 3, 4, 5]
    assert any("eval/loss" in v for _, v in scalars)


def test_checkpoints_follow_the_export_layout(run):
    model, out, cfg, result = run
    for name in ("config.json", "tokenizer.json", "train_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    mgr = ocp.CheckpointManager(os.path.join(out, "checkpoints"))
    assert mgr.all_steps() == [2, 4, 5]
    restored = mgr.restore(5, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    # vision is frozen: the checkpoint holds the trained towers, and a record of the base for the rest
    want = {k: v for k, v in jax.device_get(result.state.params).items() if k != "vision_model"}
    assert sorted(restored) == sorted(want) == ["aligner", "language_model"]
    assert jax.tree.structure(restored) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(b), a)
    from deepseek_vl_jax.conversion import frozen_base
    assert frozen_base.read_record(out, 5)["collections"] == ["vision_model"]
    assert {"data_iter", "meta", "opt_state", "params"} <= set(os.listdir(os.path.join(out, "checkpoints", "5")))
    mgr.close()


def test_evaluate_exact_match_from_training_output(run, tmp_path):
    """`evaluate` loads the latest checkpoint of a training output; a reference equal to the greedy answer counts,
    a different one does not."""
    from deepseek_vl_jax.processing import load_processor
    from deepseek_vl_jax.training import data, evaluate
    from deepseek_vl_jax.training.config import BadRows

    _, out, _, result = run
    model = evaluate.load_model(out)
    for a, b in zip(jax.tree.leaves(jax.device_get(result.state.params)), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(b), a)
    processor = load_processor(out)
    path = H.write_dataset(str(tmp_path), n=3)
    rows = data.read_rows(path, 1, BadRows.FAIL).rows
    acc, records = evaluate.exact_match(model, processor, rows, max_new_tokens=4, batch_size=4)
    assert len(records) == 3 and [r["line"] for r in records] == [1, 2, 3]
    # make rows 1 and 3 reference exactly what the model answers (modulo spacing), row 2 something else
    for r, rec in zip(rows, records):
        want = "  " + rec["prediction"] + " " if rec["line"] != 2 else rec["prediction"] + " not this"
        r.messages[-1]["content"] = [{"type": "text", "text": want}]
    acc, records = evaluate.exact_match(model, processor, rows, max_new_tokens=4, batch_size=4)
    assert [r["correct"] for r in records] == [True, False, True]
    assert acc == pytest.approx(2 / 3)


def test_evaluate_counts_per_kind(tmp_path):
    """Rows labelled with a "kind" are tallied per kind by line number; unlabelled and blank lines are not."""
    from deepseek_vl_jax.training import evaluate

    path = tmp_path / "rows.jsonl"
    lines = [{"messages": [], "kind": "color"}, {"messages": []}, {"messages": [], "kind": "side"},
             {"messages": [], "kind": "color"}]
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" +
                    "\n".join(json.dumps(x) for x in lines[2:]) + "\n")
    records = [{"line": 1, "correct": True}, {"line": 2, "correct": True}, {"line": 4, "correct": False},
               {"line": 5, "correct": True}]
    assert evaluate.by_kind(str(path), records) == {"color": [2, 2], "side": [0, 1]}
    assert evaluate.by_kind(str(path), records[1:2]) == {}


def test_load_pretrained_and_generate_take_a_training_output(run, capsys):
    """Every command that takes a model takes a `train` output directory (its latest checkpoint)."""
    from deepseek_vl_jax import cli

    _, out, _, result = run
    model = load_pretrained(out, progress=False)
    for a, b in zip(jax.tree.leaves(jax.device_get(result.state.params)), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(b), a)
    assert cli.main(["generate", "--model", out, "--prompt", "What is this?", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")
