"""`deepseek-vl-jax init`: a new model with random weights, written as an HF directory through this project's own
Flax checkpoint + export path, with a processor's files and special-token ids (the start of a from-scratch run)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax

from deepseek_vl_jax.config import ConfigError, ModelConfig
from deepseek_vl_jax.conversion.export import export
from deepseek_vl_jax.conversion.flax_checkpoint import save_flax_checkpoint
from deepseek_vl_jax.pretrained import init_params


def with_processor_ids(config: dict, processor) -> dict:
    """Fill the image/bos/eos/pad token ids from the processor; the vocabulary must cover its tokenizer."""
    config = json.loads(json.dumps(config))
    if not isinstance(config.get("text_config", {}).get("vocab_size"), int):
        raise ConfigError("the config's text_config has no integer vocab_size")
    vocab = processor.tokenizer.get_vocab_size()
    if config["text_config"]["vocab_size"] < vocab:
        raise ConfigError(f"text_config.vocab_size {config['text_config']['vocab_size']} is smaller than the "
                          f"tokenizer's {vocab} tokens; set it to at least {vocab} in the --config file")
    config["image_token_id"] = processor.image_token_id
    for key in ("bos", "eos", "pad"):
        config["text_config"][f"{key}_token_id"] = getattr(processor, f"{key}_token_id")
    return config


def read_config_file(config_file: str) -> dict:
    if not os.path.isfile(config_file):
        raise ConfigError(f"--config {config_file}: no such file; give an HF-form config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {config_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("text_config"), dict):
        raise ConfigError(f"--config {config_file}: an HF DeepSeek-VL config needs a \"text_config\" object")
    return config


def init_model(config_file: str, processor_dir: str, dst: str, seed: int = 0, force: bool = False) -> str:
    from deepseek_vl_jax.conversion.atomic import check_destination
    from deepseek_vl_jax.processing import load_processor

    check_destination(os.path.abspath(dst), force)
    config = read_config_file(config_file)
    config = with_processor_ids(config, load_processor(processor_dir))
    ModelConfig.from_hf(config)  # a bad config fails here, before any work
    params = init_params(ModelConfig.from_hf(config), jax.random.key(seed))
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(dst)) or ".") as tmp:
        flax_dir = os.path.join(tmp, "flax")
        save_flax_checkpoint(flax_dir, config, params, processor_src=processor_dir)
        export(flax_dir, dst, force=force, progress=False)
    return dst


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the HF directory to write (must not exist unless --force)")
    p.add_argument("--config", required=True, help="an HF-form config.json (deepseek_vl or deepseek_vl_hybrid)")
    p.add_argument("--processor", required=True, help="a processor directory (tokenizer, image settings, template)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--force", action="store_true", help="replace an existing output (once the new one is complete)")


def run(args: argparse.Namespace) -> int:
    init_model(args.config, args.processor, args.output, args.seed, args.force)
    print(f"wrote a randomly initialised model to {args.output}")
    return 0
