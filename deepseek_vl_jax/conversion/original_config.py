"""The original deepseek-ai `config.json` (remote-code `MultiModalityCausalLM`) <-> transformers' DeepSeek-VL config.

The original config names its parts (`vision_config` {cls, params}, `aligner_config` {cls, params},
`language_config` = a LlamaConfig dict that relies on LlamaConfig's defaults). The vision towers are given by
model name (`siglip_large_patch16_384`, `sam_b_downsample`) whose sizes live in the original code; they are
reproduced in SIGLIP_MODELS / SAM_MODELS below, and the result equals the configs that transformers' conversion
scripts (`convert_deepseek_vl_weights_to_hf.py`, `convert_deepseek_vl_hybrid_weights_to_hf.py`) hard-code for
deepseek-vl-1.3b-chat and deepseek-vl-7b-chat (SigLIP with exact `gelu` and no pooling head: the original builds
timm's ViT with `ignore_head=True`).

Extension (not in real checkpoints, needed for small test models): a tower's `params` may override the sizes with
the original code's field names (`width`, `layers`, `heads`, `patch_size`, `mlp_ratio` for SigLIP;
`width`, `layers`, `heads`, `patch_size`, `window_size`, `global_attn_indexes`, `prompt_embed_dim`,
`downsample_channels` for SAM) plus `mlp_dim` (exact MLP width, both towers) and a top-level `image_token_id`.
"""

from __future__ import annotations

import json
import os

from deepseek_vl_jax.config import ConfigError

ORIGINAL_MODEL_TYPE = "multi_modality"
VL_TOWER = "CLIPVisionTower"
HYBRID_TOWER = "HybridVisionTower"
VL_PROJECTOR = "mlp_gelu"
HYBRID_PROJECTOR = "low_high_hybrid_split_mlp_gelu"
DEFAULT_IMAGE_TOKEN_ID = 100015  # "<image_placeholder>" in the DeepSeek tokenizer (transformers' default too)
IMAGE_TOKEN = "<image_placeholder>"

# deepseek_vl/models/siglip_vit.py SigLIP_MODEL_CONFIG (sizes; timm ViT, exact GELU, LayerNorm eps 1e-6)
SIGLIP_MODELS = {
    "siglip_large_patch16_384": dict(width=1024, layers=24, heads=16, patch_size=16, mlp_ratio=4.0, image_size=384),
    "siglip_so400m_patch14_384": dict(width=1152, layers=27, heads=16, patch_size=14, mlp_dim=4304, image_size=384),
}
# deepseek_vl/models/sam.py model_name_to_cfg
SAM_MODELS = {
    "sam_b_downsample": dict(width=768, layers=12, heads=12, patch_size=16, window_size=14,
                             global_attn_indexes=[2, 5, 8, 11], prompt_embed_dim=256,
                             downsample_channels=[512, 1024], mlp_ratio=4.0, image_size=1024),
}
# transformers' LlamaConfig defaults: the original language_config states only what differs from them.
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                      rope_theta=10000.0, attention_bias=False, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
_NOT_TEXT = {"model_type", "torch_dtype", "dtype", "architectures", "_name_or_path", "transformers_version"}


def is_original_config(d: dict) -> bool:
    return d.get("model_type") == ORIGINAL_MODEL_TYPE or ("language_config" in d and "aligner_config" in d)


def _mlp(cfg: dict) -> int:
    return int(cfg["mlp_dim"]) if cfg.get("mlp_dim") else int(cfg["width"] * cfg["mlp_ratio"])


def _tower(params: dict, table: dict, what: str) -> dict:
    name = params.get("model_name")
    overrides = {k: params[k] for k in ("width", "layers", "heads", "patch_size", "mlp_ratio", "mlp_dim",
                                        "window_size", "global_attn_indexes", "prompt_embed_dim",
                                        "downsample_channels") if k in params}
    if name not in table and not {"width", "layers", "heads"} <= set(overrides):
        raise ConfigError(f"original {what}: unknown model_name {name!r} (known: {sorted(table)}) and no explicit "
                          f"width/layers/heads")
    cfg = {**table.get(name, {}), **overrides}
    if "mlp_dim" in overrides:
        cfg.pop("mlp_ratio", None)
    cfg["image_size"] = params.get("image_size", cfg.get("image_size"))
    return cfg


def _siglip(params: dict) -> dict:
    c = _tower(params, SIGLIP_MODELS, "SigLIP tower")
    select = params.get("select_layer", -1)
    # the original truncates the ViT: layers + select_layer + 1 for select_layer <= 0, else select_layer
    layers = min(c["layers"], c["layers"] + select + 1) if select <= 0 else min(c["layers"], select)
    return {"model_type": "siglip_vision_model", "hidden_size": c["width"], "intermediate_size": _mlp(c),
            "num_hidden_layers": layers, "num_attention_heads": c["heads"], "image_size": c["image_size"],
            "patch_size": c["patch_size"], "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
            "vision_use_head": False}


def _sam(params: dict) -> dict:
    c = _tower(params, SAM_MODELS, "SAM tower")
    out = c["prompt_embed_dim"]
    if list(c["downsample_channels"]) != [2 * out, 4 * out]:
        raise ConfigError(f"original SAM tower: downsample_channels {c['downsample_channels']} unsupported; "
                          f"transformers' model has two stride-2 convs {out} -> {2 * out} -> {4 * out}")
    if params.get("select_layer", -1) != -1:
        raise ConfigError(f"original SAM tower: select_layer {params['select_layer']} unsupported (only -1)")
    return {"model_type": "sam_vision_model", "hidden_size": c["width"], "output_channels": out,
            "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"], "num_channels": 3,
            "image_size": c["image_size"], "patch_size": c["patch_size"], "hidden_act": "gelu",
            "layer_norm_eps": 1e-6, "qkv_bias": True, "mlp_dim": _mlp(c), "use_abs_pos": True, "use_rel_pos": True,
            "window_size": c["window_size"], "global_attn_indexes": list(c["global_attn_indexes"])}


def image_token_from_tokenizer(directory: str | os.PathLike | None) -> int | None:
    """The id of `<image_placeholder>` in a directory's tokenizer.json (added tokens), if there is one."""
    file = os.path.join(os.fspath(directory), "tokenizer.json") if directory else None
    if not file or not os.path.isfile(file):
        return None
    with open(file) as f:
        tok = json.load(f)
    for t in tok.get("added_tokens", []):
        if t.get("content") == IMAGE_TOKEN:
            return int(t["id"])
    return tok.get("model", {}).get("vocab", {}).get(IMAGE_TOKEN)


def tokenizer_special_ids(directory: str | os.PathLike | None) -> dict[str, int]:
    """{"bos_token_id", "eos_token_id", "pad_token_id"}: the ids of the tokens a directory's tokenizer_config.json
    (or special_tokens_map.json) names, looked up in its tokenizer.json; those it does not name are left out."""
    if not directory:
        return {}
    directory = os.fspath(directory)
    names: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        path = os.path.join(directory, file)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            for key in ("bos_token", "eos_token", "pad_token"):
                value = cfg.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    names[key] = value
    file = os.path.join(directory, "tokenizer.json")
    if not names or not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        tok = json.load(f)
    ids = {t.get("content"): int(t["id"]) for t in tok.get("added_tokens", [])}
    vocab = tok.get("model", {}).get("vocab", {})
    out = {}
    for key, token in names.items():
        found = ids.get(token, vocab.get(token) if isinstance(vocab, dict) else None)
        if found is not None:
            out[f"{key}_id"] = int(found)
    return out


def hf_config_from_original(d: dict, directory: str | os.PathLike | None = None) -> dict:
    """An HF `deepseek_vl` / `deepseek_vl_hybrid` config dict from an original config dict."""
    for key in ("language_config", "vision_config", "aligner_config"):
        if not isinstance(d.get(key), dict):
            raise ConfigError(f"original config has no {key}")
    vision, aligner = d["vision_config"], d["aligner_config"]
    tower, params = vision.get("cls"), vision.get("params", {})
    if tower not in (VL_TOWER, HYBRID_TOWER):
        raise ConfigError(f"original vision_config.cls {tower!r} unknown; this library reads {VL_TOWER} "
                          f"(deepseek-vl-1.3b) and {HYBRID_TOWER} (deepseek-vl-7b)")
    hybrid = tower == HYBRID_TOWER
    text = {**LLAMA_DEFAULTS, **{k: v for k, v in d["language_config"].items() if k not in _NOT_TEXT},
            "model_type": "llama"}
    tie = bool(text.pop("tie_word_embeddings"))
    # The original language_config relies on LlamaConfig's bos/eos (1, 2): ordinary tokens of DeepSeek's vocabulary.
    # The original code stops on and pads with the tokenizer's end of sentence (it has no pad token: eos pads).
    special, stated = tokenizer_special_ids(directory), d["language_config"]
    for key in ("bos_token_id", "eos_token_id"):
        if key not in stated and key in special:
            text[key] = special[key]
    if "pad_token_id" not in stated and ("pad_token_id" in special or "eos_token_id" in special):
        text["pad_token_id"] = special.get("pad_token_id", text["eos_token_id"])
    try:
        low = _siglip(params["low_res_cfg"] if hybrid else params)
        high = _sam(params["high_res_cfg"]) if hybrid else None
    except KeyError as e:
        raise ConfigError(f"original vision_config: missing field {e}") from e
    ap = aligner.get("params", {})
    want = HYBRID_PROJECTOR if hybrid else VL_PROJECTOR
    problems = []
    if ap.get("projector_type") != want:
        problems.append(f"projector_type {ap.get('projector_type')!r} (this tower needs {want!r})")
    if ap.get("depth", 2) != 2:
        problems.append(f"depth {ap.get('depth')} (only 2)")
    if ap.get("n_embed", text["hidden_size"]) != text["hidden_size"]:
        problems.append(f"n_embed {ap.get('n_embed')} != language hidden_size {text['hidden_size']}")
    if ap.get("input_dim", low["hidden_size"]) != low["hidden_size"]:
        problems.append(f"input_dim {ap.get('input_dim')} != SigLIP width {low['hidden_size']}")
    if problems:
        raise ConfigError("original aligner_config unsupported: " + "; ".join(problems))
    image_token = d.get("image_token_id") or image_token_from_tokenizer(directory) or DEFAULT_IMAGE_TOKEN_ID
    out = {
        "architectures": ["DeepseekVLHybridForConditionalGeneration" if hybrid
                          else "DeepseekVLForConditionalGeneration"],
        "model_type": "deepseek_vl_hybrid" if hybrid else "deepseek_vl",
        "text_config": text, "vision_config": low, "image_token_id": int(image_token),
        "tie_word_embeddings": tie,
    }
    if hybrid:
        out["high_res_vision_config"] = high
    dtype = d.get("torch_dtype") or d.get("dtype")
    if dtype:
        out["dtype"] = dtype
    return out


def _sizes_or_name(cfg: dict, table: dict, keys: tuple[str, ...]) -> dict:
    for name, known in table.items():
        if all(cfg.get(k) == known.get(k) for k in keys) and cfg.get("mlp_dim") == _mlp(known):
            return {"model_name": name}
    return {"model_name": "custom", **{k: val for k, val in cfg.items() if k != "image_size"}}


def original_config_from_hf(hf: dict) -> dict:
    """The inverse of `hf_config_from_original`. Raises ConfigError for HF configs the original code cannot
    express (e.g. SigLIP with the tanh GELU or with a pooling head, other norm epsilons)."""
    hybrid = hf.get("model_type") == "deepseek_vl_hybrid"
    v, t = hf["vision_config"], dict(hf["text_config"])
    bad = [f"vision_config.{k}={v.get(k)!r}" for k, want in (("hidden_act", "gelu"), ("vision_use_head", False),
                                                              ("layer_norm_eps", 1e-6)) if v.get(k, want) != want]
    if bad:
        raise ConfigError("not expressible in the original layout (its SigLIP is timm's ViT with exact GELU, "
                          "LayerNorm eps 1e-6 and no head): " + ", ".join(bad))
    siglip = {"width": v["hidden_size"], "layers": v["num_hidden_layers"], "heads": v["num_attention_heads"],
              "patch_size": v["patch_size"], "mlp_dim": v["intermediate_size"], "image_size": v["image_size"]}
    low = {**_sizes_or_name(siglip, SIGLIP_MODELS, ("width", "layers", "heads", "patch_size", "image_size")),
           "image_size": v["image_size"], "select_feature": "same", "select_layer": -1}
    rope = t.pop("rope_parameters", None)
    if rope and rope.get("rope_type", "default") == "default" and set(rope) <= {"rope_type", "rope_theta"}:
        t["rope_theta"] = rope.get("rope_theta", 10000.0)
    elif rope:
        t["rope_parameters"] = rope
    language = {k: val for k, val in t.items() if k not in _NOT_TEXT}
    language["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    d = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    language.update(model_type="llama", torch_dtype=d)
    hidden = t["hidden_size"]
    if hybrid:
        s = hf["high_res_vision_config"]
        sam = {"width": s["hidden_size"], "layers": s["num_hidden_layers"], "heads": s["num_attention_heads"],
               "patch_size": s["patch_size"], "window_size": s["window_size"],
               "global_attn_indexes": list(s["global_attn_indexes"]), "prompt_embed_dim": s["output_channels"],
               "downsample_channels": [2 * s["output_channels"], 4 * s["output_channels"]],
               "mlp_dim": s.get("mlp_dim") or int(s["hidden_size"] * s.get("mlp_ratio", 4.0)),
               "image_size": s["image_size"]}
        high = {**_sizes_or_name(sam, SAM_MODELS, ("width", "layers", "heads", "patch_size", "window_size",
                                                   "global_attn_indexes", "prompt_embed_dim", "image_size")),
                "image_size": s["image_size"], "select_feature": "same", "select_layer": -1,
                "output_dim": 4 * s["output_channels"]}
        vision = {"cls": HYBRID_TOWER, "model_type": "vision",
                  "params": {"concat_type": "tuple", "low_res_cfg": {**low, "output_dim": v["hidden_size"]},
                             "high_res_cfg": high}}
        aligner = {"projector_type": HYBRID_PROJECTOR, "depth": 2, "input_dim": v["hidden_size"], "n_embed": hidden}
    else:
        vision = {"cls": VL_TOWER, "model_type": "vision", "params": low}
        aligner = {"projector_type": VL_PROJECTOR, "depth": 2, "input_dim": v["hidden_size"], "n_embed": hidden}
    return {"architectures": ["MultiModalityCausalLM"], "model_type": ORIGINAL_MODEL_TYPE, "torch_dtype": d,
            "language_config": language, "vision_config": vision,
            "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": aligner},
            "image_token_id": hf.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID)}
