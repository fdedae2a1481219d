"""Reduced-size look-alikes of the published deepseek-ai directories, saved from the reference's own state_dict.

`make_original_dir(path, kind)` writes what deepseek-ai/deepseek-vl-1.3b-chat ("1.3b") or deepseek-vl-7b-chat
("7b") hold, at tiny sizes: `config.json` with the published structure (`multi_modality`; `vision_config` /
`aligner_config` with `cls` + `params`, pixel_mean / pixel_std in the tower params, per tower for the hybrid;
`language_config` relying on LlamaConfig's defaults for bos/eos), `preprocessor_config.json` (`VLMImageProcessor`,
`do_normalize: false`) and `processor_config.json` (`VLChatProcessor`) as published, a tokenizer with DeepSeek's
special tokens and neither a pad token nor a chat template, and the weights: float16 in one file (1.3b), bfloat16
in three shards plus `model.safetensors.index.json` (7b). Every tensor the original model holds is saved, the dead
ones included (SigLIP's `attn_pool.*`; the hybrid's `high_layer_norm` / `low_layer_norm`); the published key lists
(`published_keys_*.txt`, from /work/shared/real-checkpoints) fix the set.

`load_reference(path)` builds the reference from `config.json` and loads the tensors with `strict=True` (in
float32: every stored value is exact), as the original's `from_pretrained` would.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file, save_file

import processing_fixtures as PF
from original_reference.models import MultiModalityCausalLM

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]
VOCAB = 640  # the tiny tokenizer has ~606 tokens
TEXT = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=512, vocab_size=VOCAB)
# SigLIP at 32 px / patch 8 (16 image tokens); SAM at 64 px / patch 8 with 3x3 windows (padded), global blocks 1, 2
SIGLIP = dict(width=32, layers=2, heads=2, patch_size=8, mlp_ratio=2.5)
SAM = dict(width=24, layers=3, heads=2, patch_size=8, window_size=3, global_attn_indexes=[1, 2], prompt_embed_dim=8,
           downsample_channels=[16, 32])
NUM_IMAGE_TOKENS = 16


def original_config(kind: str) -> dict:
    low = {"image_size": 32, "model_name": "siglip_large_patch16_384", "pixel_mean": HALF, "pixel_std": HALF,
           "select_feature": "same", "select_layer": -1, **SIGLIP}
    if kind == "1.3b":
        vision = {"cls": "CLIPVisionTower", "model_type": "vision", "params": low}
        aligner = {"depth": 2, "input_dim": 32, "n_embed": 64, "projector_type": "mlp_gelu"}
        dtype = "float16"
    else:
        high = {"ckpt_path": "", "image_size": 64, "model_name": "sam_b_downsample", "output_dim": 32,
                "pixel_mean": CLIP_MEAN, "pixel_std": CLIP_STD, "select_feature": "same", "select_layer": -1, **SAM}
        vision = {"cls": "HybridVisionTower", "model_type": "vision", "params": {
            "concat_type": "tuple", "freeze_high": True, "freeze_low": True, "high_res_cfg": high,
            "low_res_cfg": {"ckpt_path": "", "output_dim": 32, **low}}}
        aligner = {"depth": 2, "input_dim": 32, "n_embed": 64, "projector_type": "low_high_hybrid_split_mlp_gelu"}
        dtype = "bfloat16"
    return {"aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": aligner},
            "architectures": ["MultiModalityCausalLM"],
            "language_config": {**TEXT, "model_type": "llama", "torch_dtype": dtype},
            "model_type": "multi_modality", "torch_dtype": dtype, "transformers_version": "4.38.2",
            "vision_config": vision}


def preprocessor_config(kind: str) -> dict:
    mean, std, size = (HALF, HALF, 32) if kind == "1.3b" else (CLIP_MEAN, CLIP_STD, 64)
    return {"background_color": [int(x * 255) for x in mean], "do_normalize": False, "image_mean": mean,
            "image_processor_type": "VLMImageProcessor", "image_size": size, "image_std": std, "min_size": 14,
            "processor_class": "VLChatProcessor", "rescale_factor": 0.00392156862745098}


PROCESSOR_CONFIG = {"add_special_token": False, "ignore_id": -100, "image_tag": "<image_placeholder>",
                    "mask_prompt": True, "num_image_tokens": NUM_IMAGE_TOKENS, "processor_class": "VLChatProcessor",
                    "sft_format": "deepseek"}


def build_model(kind: str, seed: int = 0) -> MultiModalityCausalLM:
    """The reference with every parameter set from a seeded generator: the original builds its towers with
    `weight_init="skip"` (some tensors left uninitialised, to be loaded), so nothing of the construction is kept.
    Norm scales 1 + noise, matrices scaled by 1/sqrt(fan_in), everything else (biases, position tables, the SAM
    rel_pos and alpha, SigLIP's pooling latent, embeddings) noise: no zero can hide a mapping mistake."""
    torch.manual_seed(seed)
    model = MultiModalityCausalLM(original_config(kind)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                is_norm = "norm" in type(module).__name__.lower() or "Norm" in type(module).__name__
                if is_norm and name == "weight":
                    p.copy_(1 + 0.1 * noise)
                elif name == "weight" and p.dim() >= 2 and not isinstance(module, torch.nn.Embedding):
                    p.copy_(noise / p[0].numel() ** 0.5)
                else:
                    p.copy_(0.1 * noise if p.dim() < 2 or isinstance(module, torch.nn.Embedding) else 0.5 * noise)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model


def _write_tokenizer(path: str) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=PF.build_tokenizer_object(), bos_token=PF.BOS, eos_token=PF.EOS,
                                  unk_token=None, add_bos_token=True, add_eos_token=False,
                                  clean_up_tokenization_spaces=False, model_max_length=16384)
    tok.save_pretrained(path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.pop("chat_template", None)
    cfg["tokenizer_class"] = "LlamaTokenizerFast"  # as published
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    if os.path.exists(os.path.join(path, "chat_template.jinja")):
        os.remove(os.path.join(path, "chat_template.jinja"))


def _save_weights(path: str, state: dict, shards: int) -> None:
    names = sorted(state)
    if shards == 1:
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    total = sum(t.numel() * t.element_size() for t in state.values())
    groups, size = [[]], 0
    for name in names:  # contiguous groups of about total / shards bytes
        if size >= (len(groups)) * total / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        size += state[name].numel() * state[name].element_size()
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in group}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in group})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def make_original_dir(path, kind: str, seed: int = 0) -> str:
    """Write a reduced-size original directory of `kind` ("1.3b" or "7b") at `path`; returns the path."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model = build_model(kind, seed)
    dtype = torch.float16 if kind == "1.3b" else torch.bfloat16
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    _save_weights(path, state, shards=1 if kind == "1.3b" else 3)
    for name, data in (("config.json", original_config(kind)), ("preprocessor_config.json", preprocessor_config(kind)),
                       ("processor_config.json", PROCESSOR_CONFIG)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(data, f, indent=2)
    _write_tokenizer(path)
    return path


def read_state(path: str) -> dict:
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return load_file(os.path.join(path, "model.safetensors"))
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    return {k: v for file in files for k, v in load_file(os.path.join(path, file)).items()}


def load_reference(path: str) -> MultiModalityCausalLM:
    with open(os.path.join(path, "config.json")) as f:
        model = MultiModalityCausalLM(json.load(f)).eval()
    model.load_state_dict({k: v.float() for k, v in read_state(path).items()}, strict=True)
    return model


def normalized_keys(keys) -> set[str]:
    """Key names with block / layer numbers replaced by N (the published lists have more layers)."""
    return {re.sub(r"\.(blocks|layers)\.\d+\.", r".\1.N.", k) for k in keys}


def published_keys(kind: str) -> set[str]:
    """The published key list of `kind`, normalised (copied from /work/shared/real-checkpoints/keys_orig_*.tsv)."""
    with open(os.path.join(os.path.dirname(__file__), f"published_keys_{kind}.txt")) as f:
        return {line.strip() for line in f if line.strip() and not line.startswith("#")}
