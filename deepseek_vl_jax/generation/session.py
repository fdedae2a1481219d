"""What the `generate` and `chat` programs share: the sampling flags, loading a model directory (checkpoint and
processor side by side, as on the hub) with clear errors, and answering one conversation with streamed output."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, TextIO

import numpy as np

from deepseek_vl_jax.generation.generate import generate
from deepseek_vl_jax.generation.streamer import TextStreamer


class CliError(Exception):
    """A user-facing error: printed as `error: ...` with exit status 2, no traceback."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="HF checkpoint directory (config.json, safetensors, tokenizer and processor files)")
    parser.add_argument("--processor", metavar="DIR", help="processor directory if not the model directory")
    parser.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory to fold into the model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and compute dtype (default float32: XLA's CPU bfloat16 dots are slow)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) decodes greedily; > 0 samples with this temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (when sampling)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (when sampling; 0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def check_image(path: str) -> str:
    """Raise CliError unless `path` is a readable image."""
    from deepseek_vl_jax.processing import ImageLoadError, load_rgb_image

    if not os.path.isfile(path):
        raise CliError(f"cannot read image {path!r}: no such file")
    try:
        load_rgb_image(path)
    except ImageLoadError as e:
        raise CliError(str(e)) from e
    except OSError as e:
        raise CliError(f"cannot read image {path!r}: {e}") from e
    return path


@dataclasses.dataclass
class Session:
    """A loaded model + processor and the sampling settings from the command line."""

    model: Any
    processor: Any
    sampling: dict
    eos: tuple[int, ...]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Session":
        from deepseek_vl_jax import load_pretrained
        from deepseek_vl_jax.processing import ProcessorError, load_processor

        if not os.path.isdir(args.model):
            raise CliError(f"model directory {args.model!r} does not exist")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise CliError(f"{args.model!r} is not a model directory: it has no config.json")
        if args.max_new_tokens < 1:
            raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        try:
            processor = load_processor(args.processor or args.model)
        except ProcessorError as e:
            raise CliError(f"cannot load the processor: {e}") from e
        try:
            model = load_pretrained(args.model, dtype=args.dtype, progress=sys.stderr.isatty(),
                                    adapter=getattr(args, "adapter", None))
        except (ValueError, OSError) as e:
            raise CliError(f"cannot load the model: {e}") from e
        if processor.image_token_id != model.config.image_token_id:
            raise CliError(f"the processor's image token id {processor.image_token_id} differs from the model's "
                           f"{model.config.image_token_id}")
        sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature if args.temperature > 0 else 1.0,
                        top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                        seed=args.seed, max_new_tokens=args.max_new_tokens)
        from deepseek_vl_jax.generation.inputs import resolve_eos

        eos = set(resolve_eos(None, model.config.text.eos_token_id))
        if processor.eos_token_id is not None:
            eos.add(processor.eos_token_id)  # the chat format ends an answer with the tokenizer's eos
        return cls(model, processor, sampling, tuple(sorted(eos)))

    def answer(self, messages: list[dict], out: TextIO) -> str:
        """Stream the assistant's answer to `messages` into `out`; return the answer text (without the eos)."""
        batch = self.processor(messages, add_generation_prompt=True, padding_side="left")
        streamer = TextStreamer(self.processor, skip_special_tokens=True, stop_ids=self.eos, file=out)
        tokens = generate(self.model, batch, eos_token_id=self.eos, streamer=streamer, **self.sampling)[0]
        ends = np.flatnonzero(np.isin(tokens, self.eos))
        tokens = tokens[:ends[0]] if len(ends) else tokens
        return self.processor.decode(tokens, skip_special_tokens=True)


def user_message(text: str, images: list[str]) -> dict:
    """DeepSeek-VL chat format: the user's content is the images, then the text."""
    return {"role": "user", "content": [*({"type": "image", "path": p} for p in images), {"type": "text", "text": text}]}
