"""`deepseek-vl-jax serve`: an OpenAI-compatible server for a model directory (checkpoint and processor)."""

from __future__ import annotations

import argparse
import os
import sys

from deepseek_vl_jax.generation.session import CliError
from deepseek_vl_jax.quantization import cli as quantize_cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="HF model directory, converted Flax checkpoint or `train` output directory")
    parser.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory to fold into the model")
    parser.add_argument("--processor", metavar="DIR", help="processor directory if not the model directory")
    parser.add_argument("--served-model-name", metavar="NAME", help="the model name clients send (default: the "
                        "directory's name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="weights and compute dtype (default float32)")
    quantize_cli.add_arguments(parser)
    parser.add_argument("--max-batch", type=int, default=8, help="decode slots (requests decoded together)")
    parser.add_argument("--max-seq-len", type=int, help="positions per slot, prompt + answer (default: the model's)")
    parser.add_argument("--prefill-chunk", type=int, default=64,
                        help="prompt tokens per prefill call; also the prefix cache's block size")
    parser.add_argument("--mesh", metavar="data=..,fsdp=..,tensor=..", help="shard over a device mesh, e.g. tensor=4")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--allowed-media-dir", metavar="DIR", help="allow file:// image URLs below this directory")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    parser.add_argument("--max-images", type=int, default=8, help="images per request")
    parser.add_argument("--image-cache-mb", type=int, default=256)
    parser.add_argument("--prefix-cache-mb", type=int, default=1024, help="0 disables the prefix cache")
    parser.add_argument("--prefill-budget", type=int, default=4096,
                        help="prompt tokens admitted and prefilled between two decode steps (at least one request): "
                             "large admits a burst at once (throughput, time to first token), small interleaves "
                             "prefill with decoding (lower inter-token latency p99)")
    parser.add_argument("--decode-steps", type=int, default=1,
                        help="decode steps per program call (default 1): more cuts per-step host work, but a new "
                             "request waits up to that many steps to start and tokens stream that many at a time")
    parser.add_argument("--warmup", action="store_true", help="compile every program before accepting requests")


def parse_mesh(text: str) -> dict:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in sizes:
            raise CliError(f"--mesh {text!r}: expected NAME=SIZE items with NAME one of data, fsdp, tensor")
        try:
            sizes[key.strip()] = int(value)
        except ValueError:
            raise CliError(f"--mesh {text!r}: {value!r} is not an integer") from None
    return sizes


def build(args: argparse.Namespace):
    """(engine, server config) from the command line; raises CliError on bad arguments."""
    from deepseek_vl_jax import load_pretrained, sharding
    from deepseek_vl_jax.processing import load_processor
    from deepseek_vl_jax.serving.app import ServerConfig
    from deepseek_vl_jax.serving.engine import Engine, EngineConfig
    from deepseek_vl_jax.serving.media import MediaLimits

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise CliError(f"{args.model!r} is not a model directory: it has no config.json")
    for name in ("max_batch", "prefill_chunk", "max_queue", "max_images", "prefill_budget", "decode_steps"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.allowed_media_dir is not None and not os.path.isdir(args.allowed_media_dir):
        raise CliError(f"--allowed-media-dir {args.allowed_media_dir!r} is not a directory")
    mesh = None
    if args.mesh:
        try:
            mesh = sharding.make_mesh(**parse_mesh(args.mesh))
        except ValueError as e:
            raise CliError(f"--mesh {args.mesh!r}: {e}") from None
    try:
        processor = load_processor(args.processor or args.model)
        model = load_pretrained(args.model, dtype=args.dtype, mesh=mesh, progress=sys.stderr.isatty(),
                                quantize=quantize_cli.from_args(args), adapter=args.adapter)
    except (ValueError, OSError) as e:
        raise CliError(f"cannot load the model: {e}") from None
    engine = Engine(model, processor, EngineConfig(
        max_batch=args.max_batch, max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk,
        max_queue=args.max_queue, image_cache_bytes=args.image_cache_mb << 20,
        prefix_cache_bytes=args.prefix_cache_mb << 20, prefix_cache=args.prefix_cache_mb > 0,
        prefill_budget=args.prefill_budget, decode_steps=args.decode_steps))
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    limits = MediaLimits(max_images=args.max_images, allowed_media_dir=args.allowed_media_dir)
    return engine, ServerConfig(model_names=(name,), api_key=args.api_key, media=limits)


def run(args: argparse.Namespace) -> int:
    try:
        engine, config = build(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from deepseek_vl_jax.serving.app import create_app
    from deepseek_vl_jax.serving.server import bind

    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    if args.warmup:
        count = engine.warmup()
        print(f"warm-up: {count} programs compiled", file=sys.stderr)
    engine.start()
    print(f"serving {config.model_names[0]!r} on http://{args.host}:{sock.getsockname()[1]}", file=sys.stderr)
    try:
        uvicorn.Server(uvicorn.Config(create_app(engine, config), log_level="info")).run(sockets=[sock])
    finally:
        engine.stop()
    return 0
