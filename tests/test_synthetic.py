"""The synthetic VQA set: deterministic, unambiguous answers, and a processor directory both stacks load."""

import json
import os

import numpy as np
import pytest

from deepseek_vl_jax.cli import main
from deepseek_vl_jax.processing import load_processor
from deepseek_vl_jax.synthetic import COLORS, ask, draw, random_scene
from deepseek_vl_jax.synthetic.questions import _candidates


def test_answers_are_true_of_the_picture():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = random_scene(rng)
        img = np.asarray(draw(scene))
        for kind, question, answer in _candidates(scene):
            if kind == "color":
                shape = next(s for s in scene.shapes if question.endswith(f"the {s.kind}?"))
                assert answer == shape.color
                x, y = int(shape.x * img.shape[1]), int(shape.y * img.shape[0] + 2)
                # The pixel at the shape's centre has the answer's colour.
                assert tuple(img[y, x]) == COLORS[answer]
            if kind == "count":
                assert answer == ("zero", "one", "two", "three")[len(scene.shapes)]
            if kind == "side":
                assert answer in ("left", "right")


def test_cli_writes_deterministic_splits_and_a_processor(tmp_path):
    for out in ("a", "b"):
        assert main(["synthetic", str(tmp_path / out), "--train", "20", "--heldout", "5", "--seed", "3"]) == 0
    a = (tmp_path / "a" / "train.jsonl").read_text()
    assert a == (tmp_path / "b" / "train.jsonl").read_text()
    assert (tmp_path / "a" / "images" / "train" / "000019.png").read_bytes() == \
        (tmp_path / "b" / "images" / "train" / "000019.png").read_bytes()
    rows = [json.loads(line) for line in a.splitlines()]
    assert len(rows) == 20 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    held = [json.loads(line) for line in (tmp_path / "a" / "heldout.jsonl").read_text().splitlines()]
    assert {r["messages"][0]["content"][0]["image"] for r in held}.isdisjoint(
        {r["messages"][0]["content"][0]["image"] for r in rows})

    proc = load_processor(tmp_path / "a" / "processor")
    chat = rows[0]["messages"]
    chat[0]["content"][0]["image"] = os.path.join(tmp_path, "a", chat[0]["content"][0]["image"])
    ex = proc.training_example(chat)
    learned = ex["input_ids"][ex["labels"] != -100]
    assert proc.decode(learned) == " " + chat[1]["content"][0]["text"] + proc.eos_token
    assert ex["pixel_values"].shape == (1, 3, 64, 64)
    assert int((ex["input_ids"] == proc.image_token_id).sum()) == 64


def test_transformers_reads_the_processor_identically(tmp_path):
    from transformers import AutoProcessor

    main(["synthetic", str(tmp_path), "--train", "30", "--heldout", "2"])
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()[:3]]
    chats = []
    for r in rows:
        m = r["messages"][:1]
        m[0]["content"][0]["image"] = os.path.join(tmp_path, m[0]["content"][0]["image"])
        chats.append(m)
    ours = load_processor(tmp_path / "processor")(chats, padding_side="left")
    ref = AutoProcessor.from_pretrained(str(tmp_path / "processor"), backend="pil")
    ref.tokenizer.padding_side = "left"
    theirs = ref.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                     padding=True, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_allclose(ours["pixel_values"], theirs["pixel_values"], atol=1e-6)


def test_several_questions_per_picture(tmp_path):
    """--questions-per-image 3: each training picture gets up to three rows of different kinds, all true of it (among
    the scene's candidates); the held-out split is the same as with one question per picture."""
    from deepseek_vl_jax.synthetic.questions import ask_several

    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = random_scene(rng)
        asked = ask_several(scene, rng, 3)
        assert len({k for k, _, _ in asked}) == len(asked) == min(3, len({k for k, _, _ in _candidates(scene)}))
        assert all(q in _candidates(scene) for q in asked)
    for out, n in (("one", "1"), ("three", "3")):
        assert main(["synthetic", str(tmp_path / out), "--train", "10", "--heldout", "5", "--questions-per-image", n,
                     "--seed", "3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "three" / "train.jsonl").read_text().splitlines()]
    images = [r["messages"][0]["content"][0]["image"] for r in rows]
    assert len(set(images)) == 10 and len(rows) == 30 and all(images.count(i) == 3 for i in set(images))
    assert (tmp_path / "one" / "heldout.jsonl").read_text() == (tmp_path / "three" / "heldout.jsonl").read_text()


def test_turns_name_each_shape_once(tmp_path):
    """--turns 4: each training picture is one chat whose questions are all true of it, name each shape (and the
    whole scene) at most once, and use up the scene's possible subjects or the turn budget; the processor labels
    every answer; the held-out split is unchanged."""
    from deepseek_vl_jax.synthetic.questions import _by_object, ask_turns

    rng = np.random.default_rng(2)
    lengths = set()
    for _ in range(300):
        scene = random_scene(rng)
        subject = {q: i for i, _, q, _ in _by_object(scene)}
        asked = ask_turns(scene, rng, 4)
        assert all(q in _candidates(scene) for q in asked)
        subjects = [subject[q] for _, q, _ in asked]
        assert len(set(subjects)) == len(subjects) and 1 <= len(asked) <= 4
        if len(asked) < 4:  # stopped early only because no question about a new subject was left
            assert {i for i, *_ in _by_object(scene)} <= set(subjects)
        lengths.add(len(asked))
    assert {2, 3, 4} <= lengths

    for out, turns in (("one", "1"), ("four", "4")):
        assert main(["synthetic", str(tmp_path / out), "--train", "12", "--heldout", "5", "--turns", turns,
                     "--seed", "3"]) == 0
    assert (tmp_path / "one" / "heldout.jsonl").read_text() == (tmp_path / "four" / "heldout.jsonl").read_text()
    rows = [json.loads(line) for line in (tmp_path / "four" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and max(len(r["kinds"]) for r in rows) > 1
    processor = load_processor(tmp_path / "four" / "processor")
    for r in rows:
        messages = r["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * len(r["kinds"])
        images = [c for m in messages for c in m["content"] if c["type"] == "image"]
        assert images == [messages[0]["content"][0]]
        messages[0]["content"][0]["image"] = str(tmp_path / "four" / images[0]["image"])
        example = processor.training_example(messages)
        labels = np.asarray(example["labels"])
        answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
        assert processor.decode(labels[labels >= 0]) == "".join(f" {a}<｜end▁of▁sentence｜>" for a in answers)


# Randomised drawing styles (synthetic/styles.py).

def _styled_scenes(family, n, seed):
    from deepseek_vl_jax.synthetic.styles import styled_scene

    rng = np.random.default_rng(seed)
    return [styled_scene(rng, family) for _ in range(n)]


def test_every_question_is_true_in_every_style():
    """In each family: every candidate question's answer is what the picture shows. The colour under each shape's
    centre is nearest to the answer's palette colour (jitter keeps names unambiguous); each shape lies wholly on its
    answer's side, clear of the centre line; shapes do not overlap; big and small sizes never meet; captions and
    counts name what is drawn."""
    from deepseek_vl_jax.synthetic.questions import NUMBERS, describe
    from deepseek_vl_jax.synthetic.styles import CENTRE_GAP, FAMILIES, SIZE_RANGES, draw_styled, nearest_color

    assert SIZE_RANGES["small"][1] < SIZE_RANGES["big"][0]
    for family in FAMILIES:
        for scene, style in _styled_scenes(family, 60, 7):
            img = np.asarray(draw_styled(scene, style))
            assert img.shape == (style.canvas, style.canvas, 3)
            for s in scene.shapes:
                x, y = int(s.x * style.canvas), int((s.y + 0.3 * s.radius) * style.canvas)  # inside a triangle too
                assert nearest_color(img[y, x]) == s.color, (family, s, img[y, x])
                if family != "grid":
                    lo, hi = s.x - s.radius, s.x + s.radius
                    assert (hi < 0.5 - CENTRE_GAP) if s.side == "left" else (lo > 0.5 + CENTRE_GAP)
                    assert 0 < lo and hi < 1 and 0 < s.y - s.radius and s.y + s.radius < 1
                    assert SIZE_RANGES[s.size][0] <= s.radius <= SIZE_RANGES[s.size][1]
                    # The other half of the picture, beyond the centre gap, has none of this shape's pixels: a
                    # column at the centre line shows only background.
                    col = img[:, style.canvas // 2].astype(float)
                    assert np.abs(col - col.mean(0)).max() < 60
            for a in scene.shapes:  # (the original grid layout lets big shapes in adjacent rows touch)
                for b in scene.shapes:
                    if a is not b and family != "grid":  # circumscribed circles apart
                        assert np.hypot(a.x - b.x, a.y - b.y) > 1.4 * (a.radius + b.radius)
            for kind, question, answer in _candidates(scene):
                if kind == "count":
                    assert answer == NUMBERS[len(scene.shapes)]
                elif kind == "side":
                    s = next(s for s in scene.shapes if question.startswith(f"Is the {s.color} {s.kind} on"))
                    assert answer == s.side
            assert describe(scene).count(" on the ") == len(scene.shapes)


def test_fine_detail_scenes_show_their_digits():
    """labels=True: every shape carries a digit, drawn inside it in its ink (black on yellow/orange, else white), and
    the "number" question about each shape answers that digit; the grid family has no fine-detail form."""
    from deepseek_vl_jax.synthetic.styles import DIGITS, draw_styled, styled_scene

    rng = np.random.default_rng(11)
    for family in ("solid", "noise", "gradient"):
        for _ in range(30):
            scene, style = styled_scene(rng, family, labels=True)
            img = np.asarray(draw_styled(scene, style)).astype(int)
            numbers = {q: a for k, q, a in _candidates(scene) if k == "number"}
            for s in scene.shapes:
                assert s.label in DIGITS
                q = f"What number is on the {s.color} {s.kind}?"
                assert q in numbers or sum(t.color == s.color and t.kind == s.kind for t in scene.shapes) > 1
                if q in numbers:
                    assert numbers[q] == s.label
                ink = 0 if s.color in ("yellow", "orange") else 255
                h = max(2, int(0.4 * s.radius * style.canvas))
                dy = int(0.38 * s.radius * style.canvas) if s.kind == "triangle" else 0
                cx, cy = int(s.x * style.canvas), int(s.y * style.canvas) + dy
                box = img[cy - h:cy + h, cx - h:cx + h]
                # Some pixel there is far from the fill, towards the ink (glyphs are anti-aliased and thin).
                towards = np.abs(box - ink).max(-1) < np.abs(np.asarray(COLORS[s.color]) - ink).max() - 100
                assert towards.any(), (family, s)
    with pytest.raises(ValueError, match="grid"):
        styled_scene(rng, "grid", labels=True)


def test_styles_are_deterministic_and_varied():
    from deepseek_vl_jax.synthetic.styles import draw_styled

    for family in ("solid", "noise", "gradient"):
        a, b = _styled_scenes(family, 20, 3), _styled_scenes(family, 20, 3)
        assert a == b
        assert all(np.array_equal(np.asarray(draw_styled(*x)), np.asarray(draw_styled(*y))) for x, y in zip(a, b))
        styles = [s for _, s in a]
        assert len({s.antialias for s in styles}) == 2 and len({s.colors for s in styles}) == 20
        if family != "gradient":
            assert len({s.canvas for s in styles}) > 2
    # The grid family is the original layout, bit for bit: the first demo model's held-out set is unchanged.
    rng = np.random.default_rng(5)
    assert [sc for sc, _ in _styled_scenes("grid", 10, 5)] == [random_scene(rng) for _ in range(10)]


def test_never_trained_family_only_in_its_own_heldout_split(tmp_path):
    """--styles grid,solid,noise --heldout-styles ...,gradient: every row records its style; the training, caption
    and mixed held-out rows use only the training families; heldout_gradient has only the unseen family (a canvas
    size and background no training row has); the splits are deterministic from the seed."""
    args = ["--train", "30", "--pretrain", "10", "--heldout", "12", "--turns", "3", "--seed", "4",
            "--styles", "grid,solid,noise", "--heldout-styles", "solid,gradient"]
    for out in ("a", "b"):
        assert main(["synthetic", str(tmp_path / out), *args]) == 0
    for name in ("train", "pretrain", "heldout", "heldout_solid", "heldout_gradient"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_text() == (tmp_path / "b" / f"{name}.jsonl").read_text()

    def styles(name):
        return [json.loads(line)["style"] for line in (tmp_path / "a" / f"{name}.jsonl").read_text().splitlines()]
    seen = styles("train") + styles("pretrain") + styles("heldout")
    assert {s["family"] for s in seen} == {"grid", "solid", "noise"}
    assert {s["family"] for s in styles("heldout_solid")} == {"solid"}
    unseen = styles("heldout_gradient")
    assert len(unseen) == 12 and {s["family"] for s in unseen} == {"gradient"}
    assert {s["background"] for s in unseen}.isdisjoint({s["background"] for s in seen})
    assert {s["canvas"] for s in unseen}.isdisjoint({s["canvas"] for s in seen})
    assert main(["synthetic", str(tmp_path / "c"), "--styles", "grid,dots"]) == 2


def test_scenes_of_at_least_two_shapes(tmp_path, capsys):
    """--min-shapes 2 (the demo's stage-6 set): every picture of every family holds two or three shapes, so every
    object question picks out one shape among others; the default still draws lone shapes too."""
    from deepseek_vl_jax.synthetic.dataset import write_split

    counts = {}
    for least in (1, 2):
        path = write_split(str(tmp_path / str(least)), "train", 60, 3, families=("grid", "solid", "noise"),
                           captions=True, min_shapes=least)
        captions = [json.loads(line)["messages"][1]["content"][0]["text"] for line in open(path)]
        counts[least] = {c.count(" on the ") for c in captions}
    assert counts == {1: {1, 2, 3}, 2: {2, 3}}
    assert main(["synthetic", str(tmp_path / "c"), "--min-shapes", "4"]) == 2
    assert "--min-shapes must be 1, 2 or 3" in capsys.readouterr().err


def test_a_split_of_one_question_kind(tmp_path):
    """kind="number": every row asks the digit on a shape (scenes that allow no such question are redrawn)."""
    from deepseek_vl_jax.synthetic.dataset import write_split
    from deepseek_vl_jax.synthetic.styles import DIGITS

    path = write_split(str(tmp_path), "numbers", 40, 5, families=("solid", "noise"), labels=True, kind="number")
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 40 and {r["kind"] for r in rows} == {"number"}
    assert all(r["messages"][1]["content"][0]["text"] in DIGITS for r in rows)
    assert all(r["messages"][0]["content"][1]["text"].startswith("What number is on the") for r in rows)


def test_fine_detail_set_writes_a_hybrid_processor_transformers_reads_identically(tmp_path):
    """--details --high-res-size 128 --tokenizer-from DIR: number questions, the donor's tokenizer unchanged, and a
    DeepSeek-VL-Hybrid processor whose ids and both pixel tensors transformers' AutoProcessor reproduces."""
    from transformers import AutoProcessor

    donor = tmp_path / "donor"
    assert main(["synthetic", str(donor), "--train", "10", "--heldout", "1"]) == 0
    out = tmp_path / "fine"
    assert main(["synthetic", str(out), "--train", "12", "--heldout", "4", "--turns", "4", "--details",
                 "--styles", "solid,noise", "--image-size", "64", "--patch-size", "16", "--high-res-size", "128",
                 "--tokenizer-from", str(donor / "processor")]) == 0
    assert (out / "processor" / "tokenizer.json").read_text() == (donor / "processor" / "tokenizer.json").read_text()
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert any("number" in r["kinds"] for r in rows)
    chats = []
    for r in rows[:3]:
        m = r["messages"][:1]
        m[0]["content"][0]["image"] = str(out / m[0]["content"][0]["image"])
        chats.append(m)
    ours = load_processor(out / "processor")(chats, padding_side="left")
    ref = AutoProcessor.from_pretrained(str(out / "processor"), backend="pil")
    assert type(ref).__name__ == "DeepseekVLHybridProcessor"
    ref.tokenizer.padding_side = "left"
    theirs = ref.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                     padding=True, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    assert ours["high_res_pixel_values"].shape == (3, 3, 128, 128) and ours["pixel_values"].shape == (3, 3, 64, 64)
    for key in ("pixel_values", "high_res_pixel_values"):
        np.testing.assert_array_equal(ours[key], theirs[key])  # bit-identical (measured)
    assert main(["synthetic", str(tmp_path / "bad"), "--details", "--styles", "grid"]) == 2


def test_chats_of_one_question_kind(tmp_path, capsys):
    """--train-kind side --turns 3 (the demo's stage-8 set): every training turn asks a side, each about a different
    shape and true of its scene; the held-out split keeps every kind; "number" needs fine-detail scenes."""
    from deepseek_vl_jax.synthetic.questions import ask_turns
    from deepseek_vl_jax.synthetic.styles import FAMILIES, styled_scene

    rng = np.random.default_rng(11)
    for i in range(60):
        scene, _ = styled_scene(rng, FAMILIES[i % len(FAMILIES)], min_shapes=2)
        asked = ask_turns(scene, rng, 3, "side")
        named = [q.removeprefix("Is the ").removesuffix(" on the left or the right?") for _, q, _ in asked]
        sides = {f"{s.color} {s.kind}": s.side for s in scene.shapes}
        unique = [n for n in sides if sum(f"{s.color} {s.kind}" == n for s in scene.shapes) == 1]
        assert {k for k, _, _ in asked} <= {"side"} and sorted(named) == sorted(unique)
        assert all(a == sides[n] for n, (_, _, a) in zip(named, asked))
    out = tmp_path / "side"
    assert main(["synthetic", str(out), "--train", "20", "--heldout", "30", "--turns", "3", "--min-shapes", "2",
                 "--train-kind", "side", "--styles", "grid,solid"]) == 0
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(set(r["kinds"]) == {"side"} and 1 <= len(r["kinds"]) <= 3 for r in rows)
    assert len({json.loads(line)["kind"] for line in (out / "heldout.jsonl").read_text().splitlines()}) > 2
    assert main(["synthetic", str(tmp_path / "n"), "--train-kind", "number"]) == 2
    assert "--train-kind number asks about the digits of --details scenes" in capsys.readouterr().err
