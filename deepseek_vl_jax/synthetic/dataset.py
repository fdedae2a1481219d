"""Write the synthetic VQA set: PNG pictures and JSONL chats (train and held-out splits), seeded."""

from __future__ import annotations

import json
import os

import numpy as np

from deepseek_vl_jax.synthetic.questions import DESCRIBE, ask, ask_several, ask_turns, describe
from deepseek_vl_jax.synthetic.scenes import draw, random_scene


def chat(image: str, question: str, answer: str | None = None) -> list[dict]:
    """A chat in the processor's format: the user shows one picture and asks; the assistant answers."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def conversation(image: str, turns: list[tuple[str, str]]) -> list[dict]:
    """Several (question, answer) turns about one picture, shown with the first question."""
    messages = chat(image, *turns[0])
    for question, answer in turns[1:]:
        messages += [{"role": "user", "content": [{"type": "text", "text": question}]},
                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return messages


def write_split(directory: str, name: str, count: int, seed: int, captions: bool = False,
                questions_per_image: int = 1, turns: int = 1) -> str:
    """`count` pictures into `directory/images/name/`, their rows into `directory/name.jsonl`. Returns the JSONL path.

    captions=True: every row asks for a description of the whole picture (dense supervision for pre-training);
    otherwise each picture gets `questions_per_image` rows, one-word questions of different kinds, or, with turns > 1,
    one row: a chat of up to `turns` questions (`questions.ask_turns`), labelled with the kind of each."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(directory, "images", name)
    os.makedirs(image_dir, exist_ok=True)
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            scene = random_scene(rng)
            rel = f"images/{name}/{i:06d}.png"
            if captions:
                records = [{"messages": chat(rel, DESCRIBE, describe(scene)), "kind": "describe"}]
            elif turns > 1:
                asked = ask_turns(scene, rng, turns)
                records = [{"messages": conversation(rel, [(q, a) for _, q, a in asked]),
                            "kinds": [k for k, _, _ in asked]}]
            else:
                asked = [ask(scene, rng)] if questions_per_image == 1 else ask_several(scene, rng, questions_per_image)
                records = [{"messages": chat(rel, q, a), "kind": k} for k, q, a in asked]
            draw(scene).save(os.path.join(directory, rel))
            for record in records:
                f.write(json.dumps(record) + "\n")
    return path


def write_dataset(directory: str, train: int = 6000, heldout: int = 300, seed: int = 0,
                  pretrain: int = 0, questions_per_image: int = 1, turns: int = 1) -> dict[str, str]:
    """The splits, from independent seeds (the held-out pictures are never seen in training): `pretrain` (captions,
    when pretrain > 0), `train` (`train` pictures, `questions_per_image` rows or `turns` turns each) and `heldout`
    (one question per picture)."""
    os.makedirs(directory, exist_ok=True)
    out = {"train": write_split(directory, "train", train, seed, questions_per_image=questions_per_image, turns=turns),
           "heldout": write_split(directory, "heldout", heldout, seed + 1_000_003)}
    if pretrain:
        out["pretrain"] = write_split(directory, "pretrain", pretrain, seed + 2_000_003, captions=True)
    return out
