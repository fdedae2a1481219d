"""What the `generate` and `chat` programs share: the sampling flags, loading a model directory (checkpoint and
processor side by side, as on the hub; also a Flax checkpoint or a `train` output directory) with clear errors,
and answering one conversation with streamed output."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any, TextIO

import numpy as np

from deepseek_vl_jax.cli_errors import UserError
from deepseek_vl_jax.cli_runtime import Status
from deepseek_vl_jax.quantization import cli as quantize_cli

CliError = UserError  # the older name

DEFAULT_MAX_NEW_TOKENS = 512  # cap of the default: what is left of the model's positions, at most this
FLAG_NAMES = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
              "repetition_penalty": "--repetition-penalty", "max_new_tokens": "--max-new-tokens"}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory: HF (config.json, safetensors, tokenizer and processor files), a "
                             "converted Flax checkpoint, or a `train` output directory (its latest checkpoint)")
    parser.add_argument("--processor", metavar="DIR", help="processor directory if not the model directory")
    parser.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory to fold into the model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="weights and compute dtype (default float32: XLA's CPU bfloat16 dots are slow; "
                             "float16 for GPUs)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help=f"most tokens to generate, >= 1 (default: what the prompt leaves of the model's "
                             f"positions, at most {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 decodes greedily; a finite T > 0 samples with this temperature")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling mass in (0, 1], when sampling; 1: off")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="keep the K >= 0 most likely tokens, when sampling; 0: off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                        help="transformers' repetition penalty, a finite R > 0; 1: off")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same answer)")
    quantize_cli.add_arguments(parser)


def check_sampling_flags(args: argparse.Namespace) -> None:
    """The CLI's ranges: --temperature 0 is greedy, otherwise the library's (generation.validation)."""
    from deepseek_vl_jax.generation.validation import check_sampling

    t = args.temperature
    greedy = isinstance(t, float) and math.isfinite(t) and t == 0.0
    try:
        check_sampling(1.0 if greedy else t, args.top_k, args.top_p, args.repetition_penalty,
                       1 if args.max_new_tokens is None else args.max_new_tokens, names=FLAG_NAMES)
    except ValueError as e:
        raise UserError(str(e).replace("(with do_sample; the CLI's 0 means greedy)", "(or 0: greedy)")) from None


def check_image(path: str) -> str:
    """Raise UserError unless `path` is an image file (its header only: the processor decodes it, once)."""
    from PIL import Image, UnidentifiedImageError

    if not path:
        raise UserError("no image path given: /image PATH (or --image PATH) names a picture file")
    if not os.path.isfile(path):
        raise UserError(f"cannot read image {path!r}: no such file")
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 — the header is read and checked
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image file {path!r}: {type(e).__name__}: {e}") from e
    return path


def check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise UserError(f"model directory {path!r} does not exist; --model names a directory with config.json")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path!r} is not a model directory: it has no config.json (pass an HF directory, a "
                        "converted Flax checkpoint or a `train` output directory)")


@dataclasses.dataclass
class Session:
    """A loaded model + processor and the sampling settings from the command line."""

    model: Any
    processor: Any
    sampling: dict
    eos: tuple[int, ...]
    max_new_tokens: int | None = None  # None: what is left of the positions, at most DEFAULT_MAX_NEW_TOKENS
    status: Status = dataclasses.field(default_factory=Status)
    store: Any = None  # a program_cache.ProgramStore (the CLI's cache on), or None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Session":
        from deepseek_vl_jax import cli_runtime, load_pretrained
        from deepseek_vl_jax.processing import ProcessorError, load_processor

        check_model_dir(args.model)
        check_sampling_flags(args)
        status = Status()
        status(f"loading {args.model} ...")
        store = cli_runtime.program_store(getattr(args, "no_compile_cache", False))
        try:
            processor = load_processor(args.processor or args.model)
        except ProcessorError as e:
            raise UserError(f"cannot load the processor: {e}") from e
        try:
            model = load_pretrained(args.model, dtype=args.dtype, progress=False,
                                    quantize=quantize_cli.from_args(args), adapter=getattr(args, "adapter", None),
                                    abstract_fn=store and store.abstract_params)
        except (ValueError, OSError) as e:
            raise UserError(f"cannot load the model {args.model!r}: {e}") from e
        if processor.image_token_id != model.config.image_token_id:
            raise UserError(f"the processor's image token id {processor.image_token_id} differs from the model's "
                            f"{model.config.image_token_id}; pass the matching --processor")
        sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature if args.temperature > 0 else 1.0,
                        top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                        seed=args.seed)
        from deepseek_vl_jax.generation.inputs import resolve_eos

        eos = set(resolve_eos(None, model.config.text.eos_token_id))
        if processor.eos_token_id is not None:
            eos.add(processor.eos_token_id)  # the chat format ends an answer with the tokenizer's eos
        status.clear()
        return cls(model, processor, sampling, tuple(sorted(eos)), args.max_new_tokens, status, store)

    @property
    def positions(self) -> int:
        return self.model.config.text.max_position_embeddings

    def budget(self, prompt_tokens: int) -> int:
        """max_new_tokens for a prompt of `prompt_tokens`; UserError when it does not fit."""
        left = self.positions - prompt_tokens
        if self.max_new_tokens is None:
            if left < 1:
                raise UserError(f"the prompt has {prompt_tokens} tokens and fills the model's "
                                f"max_position_embeddings={self.positions}; shorten it or attach fewer images")
            return min(left, DEFAULT_MAX_NEW_TOKENS)
        if self.max_new_tokens > left:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} does not fit: the prompt has {prompt_tokens} "
                            f"tokens of the model's max_position_embeddings={self.positions}; use --max-new-tokens "
                            f"{max(left, 1)} or less{'' if left >= 1 else ' and a shorter prompt'} (or leave it out)")
        return self.max_new_tokens

    def prompt_length(self, messages: list[dict]) -> int:
        batch = self.processor(messages, add_generation_prompt=True, padding_side="left")
        return int(np.asarray(batch["attention_mask"]).sum())

    def answer(self, messages: list[dict], out: TextIO) -> str:
        """Stream the assistant's answer to `messages` into `out`; return the answer text (without the eos)."""
        from deepseek_vl_jax.generation.generate import generate
        from deepseek_vl_jax.generation.streamer import TextStreamer

        batch = self.processor(messages, add_generation_prompt=True, padding_side="left")
        budget = self.budget(int(np.asarray(batch["attention_mask"]).sum()))
        streamer = TextStreamer(self.processor, skip_special_tokens=True, stop_ids=self.eos, file=out)
        status = self.status
        status("thinking (the first run of a prompt size compiles; later runs load it from the cache) ...")

        class _Clearing:  # erase the status line before the first token is printed
            def put(self, tokens):
                status.clear()
                streamer.put(tokens)

            def end(self):
                status.clear()
                streamer.end()

        try:
            tokens = generate(self.model, batch, eos_token_id=self.eos, streamer=_Clearing(), max_new_tokens=budget,
                              programs=self.store and self.store.programs, **self.sampling)[0]
        finally:
            status.clear()
        ends = np.flatnonzero(np.isin(tokens, self.eos))
        tokens = tokens[:ends[0]] if len(ends) else tokens
        return self.processor.decode(tokens, skip_special_tokens=True)


def user_message(text: str, images: list[str]) -> dict:
    """DeepSeek-VL chat format: the user's content is the images, then the text."""
    return {"role": "user", "content": [*({"type": "image", "path": p} for p in images), {"type": "text", "text": text}]}
