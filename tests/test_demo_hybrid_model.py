"""The tiny DeepSeek-VL-Hybrid shipped in models/deepseek-vl-hybrid-tiny (trained by
train/demo_hybrid/make_demo_hybrid_model.sh): it answers the ordinary questions about pictures in the training styles,
tells a shape filled with 1-px stripes (`synthetic/stripes.py`: visible at SAM's 128 px, averaged away at SigLIP's
64 px) from a plain one far better than the same model with its high-resolution tower's contribution removed (so the
tower is used), and loads the same in transformers."""

import os
import subprocess
import sys

import numpy as np
import pytest

import deepseek_vl_jax as D
from deepseek_vl_jax.synthetic.ablation import without_high_res
from deepseek_vl_jax.synthetic.dataset import write_split
from deepseek_vl_jax.synthetic.stripes import STRIPES, write_stripe_split
from deepseek_vl_jax.training import data as train_data
from deepseek_vl_jax.training.config import BadRows
from deepseek_vl_jax.training.evaluate import exact_match

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "models", "deepseek-vl-hybrid-tiny")
EXAMPLE = os.path.join(REPO, "examples", "shapes_striped.png")
HELDOUT_SEED = 1 + 1_000_003  # the recipe's seed 1 + make_data.HELDOUT_SEED: never seen in training
FAMILIES = ("solid", "noise")
PLAIN_THRESHOLD = 0.80  # ordinary questions on unstriped pictures in the training styles
STRIPES_THRESHOLD, STRIPES_MARGIN = 0.80, 0.20  # the ablation is near chance (1 in 2)
EXAMPLES = (("Are the shapes striped or plain?", "striped"), ("What color is the circle?", "blue"))


@pytest.fixture(scope="module")
def shipped():
    return D.load_pretrained(MODEL, progress=False), D.load_processor(MODEL)


def _read(path):
    return train_data.read_rows(path, 1, BadRows.FAIL).rows


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The recipe's `heldout_plain` split (ordinary questions, unstriped pictures), its first 200 rows."""
    return _read(write_split(str(tmp_path_factory.mktemp("plain")), "heldout_plain", 200, HELDOUT_SEED + 2,
                             families=FAMILIES))


def test_exact_match_on_ordinary_questions(shipped, plain):
    model, processor = shipped
    accuracy, records = exact_match(model, processor, plain, max_new_tokens=6, batch_size=50)
    wrong = [(r["reference"], r["prediction"]) for r in records if not r["correct"]][:10]
    assert accuracy >= PLAIN_THRESHOLD, (accuracy, wrong)


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    """The recipe's `heldout_stripes` split (every row asks whether a shape is striped), its first 100 rows."""
    return _read(write_stripe_split(str(tmp_path_factory.mktemp("stripes")), "heldout_stripes", 100,
                                    HELDOUT_SEED + 1, families=FAMILIES, kind=STRIPES))


def test_the_high_resolution_tower_sees_the_stripes(shipped, stripes):
    """The model tells striped from plain far better than its ablation (alpha and the SAM features zeroed), which
    is near chance (1 in 2): the answer comes through the high-resolution tower."""
    model, processor = shipped
    full, _ = exact_match(model, processor, stripes, max_new_tokens=6, batch_size=50)
    ablated, _ = exact_match(without_high_res(model), processor, stripes, max_new_tokens=6, batch_size=50)
    assert full >= STRIPES_THRESHOLD and full >= ablated + STRIPES_MARGIN, (full, ablated)


def test_transformers_gives_the_same_answers(shipped, plain, stripes):
    import torch
    from transformers import AutoProcessor, DeepseekVLHybridForConditionalGeneration

    model, processor = shipped
    chats = [r.messages[:-1] for r in plain[:4] + stripes[:4]]  # ordinary and fine-detail questions
    ours_in = processor(chats, padding_side="left")
    ours = np.asarray(D.generate(model, ours_in, max_new_tokens=6))
    ref = DeepseekVLHybridForConditionalGeneration.from_pretrained(MODEL).eval()
    hf_proc = AutoProcessor.from_pretrained(MODEL, backend="pil")
    hf_proc.tokenizer.padding_side = "left"
    batch = hf_proc.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        padding=True, return_tensors="pt")
    np.testing.assert_array_equal(ours_in["input_ids"], batch["input_ids"].numpy())
    for key in ("pixel_values", "high_res_pixel_values"):  # transformers' processor reads the same pictures
        np.testing.assert_allclose(ours_in[key], batch[key].numpy(), atol=1e-5)
    with torch.no_grad():
        out = ref.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=processor.pad_token_id)
    theirs = out[:, batch["input_ids"].shape[1]:].numpy()
    n = theirs.shape[1]
    np.testing.assert_array_equal(ours[:, :n], theirs)
    assert (ours[:, n:] == processor.pad_token_id).all()
    assert processor.batch_decode(ours, skip_special_tokens=True) == hf_proc.batch_decode(theirs,
                                                                                          skip_special_tokens=True)


def test_demo_command_reads_the_example_picture():
    """What scripts/demo.sh runs for the hybrid (examples/shapes_striped.png: a blue circle, a green triangle and a
    yellow square, all striped)."""
    cli = os.path.join(os.path.dirname(sys.executable), "deepseek-vl-jax")
    for question, answer in EXAMPLES:
        out = subprocess.run([cli, "generate", "--model", MODEL, "--image", EXAMPLE, "--prompt", question,
                              "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == answer, (question, out.stdout, out.stderr[-500:])
