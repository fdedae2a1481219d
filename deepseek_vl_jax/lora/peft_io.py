"""PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`), the format transformers + PEFT
users share, with the module names of transformers' `DeepseekVL*ForConditionalGeneration`:

    base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight   [r, in]   (= A[3].T)
    base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_B.weight   [out, r]  (= B[3].T)
    base_model.model.model.aligner.linear1.weight                                   fully trained towers
                                                                                   (PEFT's modules_to_save)

`peft.PeftModel.from_pretrained(hf_model, DIR)` loads what `save_adapter` writes, and `read_adapter` reads what
PEFT writes (plain LoRA on Linear layers; rsLoRA too).
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping

import numpy as np

from deepseek_vl_jax import hf_mapping
from deepseek_vl_jax.lora import adapters as A
from deepseek_vl_jax.lora.config import LoraConfig

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
LORA_KEYS = {A.LORA_A: "lora_A.weight", A.LORA_B: "lora_B.weight"}
# top-level collection -> transformers module names (PEFT modules_to_save) of a fully trained tower
SAVED_MODULES = {"vision_model": ("vision_model",), "aligner": ("aligner",), "language_model": ("language_model",)}


class AdapterError(ValueError):
    """An adapter directory that does not fit the model."""


def _module_name(path: A.Path) -> tuple[str, bool]:
    """HF module name template ('{i}' for the layer) of a Flax Dense module path, and whether it is stacked."""
    key, stacked = hf_mapping._hf_name(path + (A.KERNEL,))
    return key[: -len(".weight")], stacked


def target_regex(paths: list[A.Path]) -> str:
    """One regular expression PEFT full-matches against module names, selecting exactly `paths`' modules."""
    names = sorted({re.escape(_module_name(p)[0]).replace(re.escape("{i}"), r"\d+") for p in paths})
    return names[0] if len(names) == 1 else "(" + "|".join(names) + ")"


def adapter_tensors(params: Mapping, towers: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """PEFT's state dict of `params`' adapters (numpy) and of the fully trained `towers` (collections)."""
    out = {}
    for path in A.adapter_paths(params):
        pair = A.get_path(params[A.ADAPTERS], path)
        name, stacked = _module_name(path)
        for leaf, suffix in LORA_KEYS.items():
            x = np.asarray(pair[leaf], np.float32)
            layers = enumerate(x) if stacked else [(None, x)]
            for i, m in layers:
                out[f"{PREFIX}{name.format(i=i)}.{suffix}"] = np.ascontiguousarray(m.T)
    for tower in towers:
        if tower not in SAVED_MODULES:
            raise AdapterError(f"a fully trained {tower!r} cannot go into a PEFT adapter (no single transformers "
                               "module holds it); export with --merge instead")
        full = hf_mapping.flax_to_hf({tower: params[tower]})
        out.update({PREFIX + k: v for k, v in full.items()})
    return out


def save_adapter(dst: str | os.PathLike, params: Mapping, config: LoraConfig, towers: tuple[str, ...] = (),
                 base_model: str | None = None) -> str:
    """Write a PEFT adapter directory (files written in place; `dst` is created)."""
    from safetensors.numpy import save_file

    paths = A.adapter_paths(params)
    if not paths:
        raise AdapterError("the params hold no LoRA adapters")
    modules = [m for t in towers for m in SAVED_MODULES.get(t, (t,))]
    cfg = {"peft_type": "LORA", "task_type": None, "r": config.rank, "lora_alpha": config.alpha,
           "lora_dropout": config.dropout, "target_modules": target_regex(paths), "modules_to_save": modules or None,
           "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
           "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
           "base_model_name_or_path": base_model}
    tensors = adapter_tensors(params, towers)
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(dst, ADAPTER_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return os.fspath(dst)


def read_config(directory: str | os.PathLike) -> dict:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise AdapterError(f"{directory}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    with open(path) as f:
        cfg = json.load(f)
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')!r} (only LORA)")
    if cfg.get("use_dora"):
        problems.append("use_dora")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("rank_pattern / alpha_pattern (one rank and alpha for every module)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias {cfg['bias']!r}")
    if problems:
        raise AdapterError(f"{path}: unsupported adapter setting(s): {', '.join(problems)}")
    return cfg


def read_adapter(directory: str | os.PathLike, base: Mapping) -> tuple[dict, LoraConfig]:
    """(params: `base` with the adapters' `lora` collection added and the saved towers replaced, its LoraConfig).
    Every tensor of the file must find its module in `base` with the right shape."""
    from safetensors.numpy import load_file

    cfg = read_config(directory)
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):  # scale alpha / sqrt(r), written as alpha' / r
        alpha = alpha * rank**0.5
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise AdapterError(f"{directory}: no {ADAPTER_WEIGHTS}")
    tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in load_file(weights).items()}

    # module name -> (flax path, layer index or None, kernel shape)
    modules = {}
    for path, leaf, stacked in A._dense_modules({k: v for k, v in base.items() if k != A.ADAPTERS}):
        name, _ = _module_name(path)
        shape = A._shape(leaf)
        for i in range(shape[0]) if stacked else [None]:
            modules[name.format(i=i)] = (path, i, shape)
    out = A._copy(dict(base))
    found: dict[A.Path, dict] = {}
    bad = []
    for key in sorted(k for k in tensors if ".lora_A." in k or ".lora_B." in k):
        module, suffix = re.match(r"(.*)\.(lora_[AB]\.weight)$", key).groups()
        if module not in modules:
            bad.append(f"{key}: no such Linear module in the model")
            continue
        path, i, shape = modules[module]
        leaf = A.LORA_A if suffix.startswith("lora_A") else A.LORA_B
        x = tensors.pop(key).T.astype(np.float32)
        want = (shape[-2], rank) if leaf == A.LORA_A else (rank, shape[-1])
        if tuple(x.shape) != want:
            bad.append(f"{key}: shape {tuple(x.T.shape)}, model expects {want[::-1]}")
            continue
        pair = found.setdefault(path, {})
        if i is None:
            pair[leaf] = x
        else:
            pair.setdefault(leaf, [None] * shape[0])[i] = x
    for path, pair in found.items():
        for leaf in (A.LORA_A, A.LORA_B):
            v = pair.get(leaf)
            if v is None or (isinstance(v, list) and any(m is None for m in v)):
                bad.append(f"{_module_name(path)[0]}: {LORA_KEYS[leaf]} missing (for some layers)")
            elif isinstance(v, list):
                pair[leaf] = np.stack(v)
        A.set_path(out, (A.ADAPTERS, *path), pair)
    if not found:
        bad.append("no lora_A / lora_B tensors")
    towers = {t for t, names in SAVED_MODULES.items() for n in names
              if any(k.startswith(f"model.{n}.") for k in tensors)}
    for tower in sorted(towers):
        part = {k: v for k, v in tensors.items() if k.startswith(f"model.{tower}.") or
                (tower == "language_model" and k == "lm_head.weight")}
        for k in part:
            tensors.pop(k)
        try:
            mapped = hf_mapping.hf_to_flax(part, {tower: base[tower]})[tower]
        except hf_mapping.MappingError as e:
            bad.append(f"saved module {tower}: {e}")
            continue
        out[tower] = mapped
    bad += [f"{k}: unexpected tensor" for k in sorted(tensors)]
    if bad:
        shown = "; ".join(bad[:6]) + (f"; ... ({len(bad)} in all)" if len(bad) > 6 else "")
        raise AdapterError(f"{weights} does not fit the model: {shown}")
    return out, LoraConfig(rank=rank, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                           targets=tuple("/".join(p) for p in found))


def merge_adapter(params: Mapping, directory: str | os.PathLike) -> dict:
    """A base model's params with the PEFT adapter at `directory` folded in (same shardings as `params`)."""
    import jax

    with_adapters, config = read_adapter(directory, params)
    merged = A.merge(jax.tree.map(lambda x: x, with_adapters), config)
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), dict(params))
    return jax.tree.map(lambda x, s: x if s is None else jax.device_put(x, s), merged, shardings)
