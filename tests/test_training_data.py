"""The data pipeline: bad rows with line numbers (skip and fail), collation and padding, host sharding and exact
resumption of the grain iterator."""

import json
import os

import numpy as np
import pytest

from deepseek_vl_jax.processing import load_processor
from deepseek_vl_jax.training import data as D
from deepseek_vl_jax.training.config import BadRows, DataConfig

import test_training_helpers as H


@pytest.fixture(scope="module")
def processor():
    return load_processor(H.model_dir())


def shapes(rows=4, accum=1, max_images=1, buckets=(32, 64, 96)):
    return D.Shapes(accum=accum, rows=rows, max_images=max_images, image_shape=(3, 32, 32), high_res_shape=None,
                    buckets=buckets, pad_id=0)


def bad_dataset(tmp_path):
    d = str(tmp_path / "data")
    outside = str(tmp_path / "outside.png")
    H.write_image(outside, 1)
    user_last = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    missing = json.dumps({"messages": H.chat("images/nope.png", "q", "a")})
    escape = json.dumps({"messages": H.chat("../outside.png", "q", "a")})
    bad = {3: "{not json", 5: user_last, 7: missing, 9: escape, 11: json.dumps([1, 2])}
    return H.write_dataset(d, n=8, bad_lines=bad)


def test_bad_rows_skip_reports_line_numbers(tmp_path, caplog):
    path = bad_dataset(tmp_path)
    rows = D.read_rows(path, 1, BadRows.SKIP)
    assert [e.line for e in rows.bad] == [3, 5, 7, 9, 11]
    reasons = [e.reason for e in rows.bad]
    assert "not valid JSON" in reasons[0]
    assert "no assistant turn" in reasons[1]
    assert "not found" in reasons[2]
    assert "outside the data directory" in reasons[3]
    assert '"messages"' in reasons[4]
    assert len(rows.rows) == 8
    assert all(r.line not in (3, 5, 7, 9, 11) for r in rows.rows)
    assert f"{path}:7" in caplog.text  # reported, with file and line


def test_bad_rows_fail_mode_raises_with_line(tmp_path):
    path = bad_dataset(tmp_path)
    with pytest.raises(D.BadRowError) as info:
        D.read_rows(path, 1, BadRows.FAIL)
    assert info.value.line == 3
    assert f"{path}:3" in str(info.value)


def test_too_many_images_is_a_bad_row(tmp_path):
    d = str(tmp_path)
    H.write_image(os.path.join(d, "a.png"), 0)
    two = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "image", "image": "a.png"},
                                        {"type": "text", "text": "q"}]},
           {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]
    path = os.path.join(d, "x.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"messages": H.chat("a.png", "q", "a")}) + "\n" + json.dumps({"messages": two}) + "\n")
    rows = D.read_rows(path, 1, BadRows.SKIP)
    assert [e.line for e in rows.bad] == [2] and "max_images_per_row" in rows.bad[0].reason
    assert len(D.read_rows(path, 2, BadRows.SKIP).rows) == 2


def test_rows_failing_at_processing_time(tmp_path, processor):
    """A corrupt image and a row over max_length are only found when processed: skip -> padding row (and the
    line reported), fail -> an error naming the line."""
    d = str(tmp_path)
    path = H.write_dataset(d, n=4)
    with open(os.path.join(d, "images/0_2.png"), "wb") as f:
        f.write(b"this is not a png")
    rows = D.read_rows(path, 1, BadRows.SKIP)
    assert not rows.bad
    skip = D.ExampleLoader(processor, path, DataConfig(bad_rows="skip", max_length=96))
    batch = D._load_batch(rows.rows, skip, shapes())
    assert batch["skipped_lines"].tolist() == [3]
    assert (batch["labels"][0, 2] == -100).all() and batch["attention_mask"][0, 2].sum() == 1
    assert (batch["labels"][0, 0] != -100).any()
    fail = D.ExampleLoader(processor, path, DataConfig(bad_rows="fail", max_length=96))
    with pytest.raises(D.BadRowError, match=r"train.jsonl:3: ImageLoadError"):
        fail(rows.rows[2])
    short = D.ExampleLoader(processor, path, DataConfig(bad_rows="fail", max_length=8))
    with pytest.raises(D.BadRowError, match=r"train.jsonl:1: PromptTooLongError"):
        short(rows.rows[0])


def test_collate_layout(tmp_path, processor):
    path = H.write_dataset(str(tmp_path), n=4)
    rows = D.read_rows(path, 1, BadRows.FAIL).rows
    loader = D.ExampleLoader(processor, path, DataConfig())
    examples = [loader(r) for r in rows]
    s = shapes(rows=2, accum=2)
    batch = D.collate(examples, s)
    longest = max(len(e["input_ids"]) for e in examples)
    t = D.bucket_for(longest, s.buckets)
    assert batch["input_ids"].shape == (2, 2, t) and batch["pixel_values"].shape == (2, 2, 3, 32, 32)
    for k, e in enumerate(examples):
        i, r = divmod(k, 2)
        n = len(e["input_ids"])
        np.testing.assert_array_equal(batch["input_ids"][i, r, :n], e["input_ids"])
        np.testing.assert_array_equal(batch["labels"][i, r, :n], e["labels"])
        assert (batch["labels"][i, r, n:] == -100).all() and (batch["attention_mask"][i, r, n:] == 0).all()
        if "pixel_values" in e:  # rows 0 and 2 have an image, in their own slot
            np.testing.assert_array_equal(batch["pixel_values"][i, r], e["pixel_values"][0])
        else:
            assert not batch["pixel_values"][i, r].any()
    # only the assistant's answer and the eos are learned
    learned = examples[0]["labels"][examples[0]["labels"] != -100]
    assert processor.decode(learned) == " " + H.ANSWERS[0] + processor.eos_token
    padded = D.pad_length(batch, t + 32, 0)
    assert padded["input_ids"].shape[-1] == t + 32 and (padded["labels"][..., t:] == -100).all()


def _take(it, n):
    out = []
    for _ in range(n):
        b = next(it)
        b.pop("skipped_lines")
        out.append(b)
    return out


def test_host_shards_and_exact_resume(tmp_path, processor):
    path = H.write_dataset(str(tmp_path), n=10)
    rows = D.read_rows(path, 1, BadRows.FAIL)
    cfg = DataConfig(batch_size=4, num_threads=1, prefetch=1, seed=3)
    loader = D.ExampleLoader(processor, path, cfg)
    one = D.iterate(D.train_dataset(rows, loader, shapes(rows=4), cfg, slice(0, 4)), cfg)
    halves = [D.iterate(D.train_dataset(rows, loader, shapes(rows=2), cfg, s), cfg) for s in (slice(0, 2), slice(2, 4))]
    full = _take(one, 5)  # 20 rows: two epochs, reshuffled
    parts = [_take(h, 5) for h in halves]
    for k in range(5):
        a, b = parts[0][k], parts[1][k]
        t = full[k]["input_ids"].shape[-1]
        joined = np.concatenate([D.pad_length(a, t, 0)["input_ids"], D.pad_length(b, t, 0)["input_ids"]], axis=1)
        np.testing.assert_array_equal(joined[..., :t], full[k]["input_ids"])
    first_epoch = [tuple(x) for b in full[:2] for x in b["input_ids"][0]] + [tuple(x) for x in full[2]["input_ids"][0, :2]]
    assert len(set(first_epoch)) == 10  # every row once per epoch
    # resume: a new iterator set to a saved state continues with exactly the next batches
    it = D.iterate(D.train_dataset(rows, loader, shapes(rows=4), cfg, slice(0, 4)), cfg)
    _take(it, 2)
    state = it.get_state()
    fresh = D.iterate(D.train_dataset(rows, loader, shapes(rows=4), cfg, slice(0, 4)), cfg)
    fresh.set_state(state)
    for want, got in zip(full[2:], _take(fresh, 3)):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])


def test_eval_dataset_pads_last_batch(tmp_path, processor):
    path = H.write_dataset(str(tmp_path), n=5)
    rows = D.read_rows(path, 1, BadRows.FAIL)
    loader = D.ExampleLoader(processor, path, DataConfig())
    batches = _take(D.iterate(D.eval_dataset(rows, loader, shapes(rows=4), 4, slice(0, 4)), DataConfig()), 2)
    assert (batches[1]["labels"][0, 1:] == -100).all()  # 3 padding rows
    assert (batches[1]["labels"][0, 0] != -100).any()


def test_cli_fail_mode_stops_before_training(tmp_path, capsys):
    from deepseek_vl_jax.cli import main

    path = bad_dataset(tmp_path)
    out = str(tmp_path / "out")
    args = ["train", "--model", H.model_dir(), "--data", path, "--output", out, "--config", "stage3",
            "--set", "data.bad_rows=fail", "--set", "logging.progress=false", "--distributed", "off"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: not valid JSON" in err
    assert not os.path.exists(os.path.join(out, "checkpoints"))
    assert main(args[:-6] + ["--set", "data.bad_rows=nope"]) == 2  # config errors are reported too
