"""Write the synthetic VQA set: PNG pictures and JSONL chats (train and held-out splits), seeded."""

from __future__ import annotations

import json
import os

import numpy as np

from deepseek_vl_jax.synthetic.questions import DESCRIBE, ask, ask_several, ask_turns, describe
from deepseek_vl_jax.synthetic.questions import _candidates as candidates
from deepseek_vl_jax.synthetic.styles import FAMILIES, draw_styled, styled_scene


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
                questions_per_image: int = 1, turns: int = 1, families: tuple[str, ...] = ("grid",),
                labels: bool = False, kind: str | None = None, min_shapes: int = 1) -> str:
    """`count` pictures into `directory/images/name/`, their rows into `directory/name.jsonl`. Returns the JSONL path.

    captions=True: every row asks for a description of the whole picture (dense supervision for pre-training);
    otherwise each picture gets `questions_per_image` rows, one-word questions of different kinds, or, with turns > 1,
    one row: a chat of up to `turns` questions (`questions.ask_turns`), labelled with the kind of each.
    Each picture is drawn in a style of one of `families` (`styles.FAMILIES`, drawn uniformly), recorded in its rows
    as "style"; the default, the grid layout alone, draws what this function always drew. labels=True: fine-detail
    scenes (a small digit inside each shape, and "number" questions about it). kind: every row asks a question of
    this kind, or with turns > 1 every turn does (e.g. "side": a turn per shape whose side can be asked).
    min_shapes: every scene has at least this many shapes (of at most 3), e.g. 2 for a set of scenes whose questions
    must pick out one shape among others."""
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"unknown style family {family!r}; choose from {', '.join(FAMILIES)}")
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(directory, "images", name)
    os.makedirs(image_dir, exist_ok=True)
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            family = families[int(rng.integers(len(families)))] if len(families) > 1 else families[0]
            scene, style = styled_scene(rng, family, labels, min_shapes)
            while kind and not any(k == kind for k, _, _ in candidates(scene)):  # e.g. two red circles: no number
                scene, style = styled_scene(rng, family, labels, min_shapes)
            rel = f"images/{name}/{i:06d}.png"
            if captions:
                records = [{"messages": chat(rel, DESCRIBE, describe(scene)), "kind": "describe"}]
            elif turns > 1:
                asked = ask_turns(scene, rng, turns, kind)
                records = [{"messages": conversation(rel, [(q, a) for _, q, a in asked]),
                            "kinds": [k for k, _, _ in asked]}]
            else:
                asked = ([ask(scene, rng, kind)] if questions_per_image == 1 or kind
                         else ask_several(scene, rng, questions_per_image))
                records = [{"messages": chat(rel, q, a), "kind": k} for k, q, a in asked]
            draw_styled(scene, style).save(os.path.join(directory, rel))
            for record in records:
                if families != ("grid",):
                    record["style"] = style.as_record()
                f.write(json.dumps(record) + "\n")
    return path


def write_dataset(directory: str, train: int = 6000, heldout: int = 300, seed: int = 0,
                  pretrain: int = 0, questions_per_image: int = 1, turns: int = 1,
                  families: tuple[str, ...] = ("grid",), heldout_families: tuple[str, ...] = (),
                  labels: bool = False, min_shapes: int = 1, train_kind: str | None = None) -> dict[str, str]:
    """The splits, from independent seeds (the held-out pictures are never seen in training): `pretrain` (captions,
    when pretrain > 0), `train` (`train` pictures, `questions_per_image` rows or `turns` turns each) and `heldout`
    (one question per picture), all drawn in the styles of `families`; and for each of `heldout_families`, a split
    `heldout_<family>` of `heldout` pictures in that family alone (a family not in `families` measures
    generalisation to a style never trained on). labels=True: fine-detail scenes in every split; min_shapes: the
    least number of shapes of every scene of every split; train_kind: every training question is of this kind."""
    os.makedirs(directory, exist_ok=True)
    out = {"train": write_split(directory, "train", train, seed, questions_per_image=questions_per_image, turns=turns,
                                families=families, labels=labels, kind=train_kind, min_shapes=min_shapes),
           "heldout": write_split(directory, "heldout", heldout, seed + 1_000_003, families=families, labels=labels,
                                  min_shapes=min_shapes)}
    if pretrain:
        out["pretrain"] = write_split(directory, "pretrain", pretrain, seed + 2_000_003, captions=True,
                                      families=families, labels=labels, min_shapes=min_shapes)
    for family in heldout_families:
        name = f"heldout_{family}"
        out[name] = write_split(directory, name, heldout, seed + 3_000_017 + 1009 * FAMILIES.index(family),
                                families=(family,), labels=labels, min_shapes=min_shapes)
    return out
