"""Write the synthetic VQA set: PNG pictures and JSONL chats (train and held-out splits), seeded."""

from __future__ import annotations

import json
import os

import numpy as np

from deepseek_vl_jax.synthetic.questions import DESCRIBE, ask, ask_several, describe
from deepseek_vl_jax.synthetic.scenes import draw, random_scene


def chat(image: str, question: str, answer: str | None = None) -> list[dict]:
    """A chat in the processor's format: the user shows one picture and asks; the assistant answers."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def write_split(directory: str, name: str, count: int, seed: int, captions: bool = False,
                questions_per_image: int = 1) -> str:
    """`count` pictures into `directory/images/name/`, their rows into `directory/name.jsonl`. Returns the JSONL path.

    captions=True: every row asks for a description of the whole picture (dense supervision for pre-training);
    otherwise each picture gets `questions_per_image` rows, one-word questions of different kinds."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(directory, "images", name)
    os.makedirs(image_dir, exist_ok=True)
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            scene = random_scene(rng)
            if captions:
                rows = [("describe", DESCRIBE, describe(scene))]
            elif questions_per_image == 1:
                rows = [ask(scene, rng)]
            else:
                rows = ask_several(scene, rng, questions_per_image)
            rel = f"images/{name}/{i:06d}.png"
            draw(scene).save(os.path.join(directory, rel))
            for kind, question, answer in rows:
                f.write(json.dumps({"messages": chat(rel, question, answer), "kind": kind}) + "\n")
    return path


def write_dataset(directory: str, train: int = 6000, heldout: int = 300, seed: int = 0,
                  pretrain: int = 0, questions_per_image: int = 1) -> dict[str, str]:
    """The splits, from independent seeds (the held-out pictures are never seen in training): `pretrain` (captions,
    when pretrain > 0), `train` (`train` pictures, `questions_per_image` questions each) and `heldout` (one
    question per picture)."""
    os.makedirs(directory, exist_ok=True)
    out = {"train": write_split(directory, "train", train, seed, questions_per_image=questions_per_image),
           "heldout": write_split(directory, "heldout", heldout, seed + 1_000_003)}
    if pretrain:
        out["pretrain"] = write_split(directory, "pretrain", pretrain, seed + 2_000_003, captions=True)
    return out
