"""The original deepseek-ai checkpoint layout <-> transformers' key names, as a table of rules that run both ways.

Specification: transformers' `convert_deepseek_vl_weights_to_hf.py` and `convert_deepseek_vl_hybrid_weights_to_hf.py`
(ORIGINAL_TO_CONVERTED_KEY_MAPPING + `update_state_dict`): rename, split SigLIP's fused `qkv` into q/k/v
(three equal row blocks), squeeze SigLIP's `[1, N, C]` position table to `[N, C]`. The scripts target transformers'
module names of the time (`model.vision_model.vision_model.embeddings...`); transformers 5 saves the SigLIP tower
as `model.vision_model.embeddings...`, which is what the HF column below uses (`hf_mapping` reads those names).

`OriginalCheckpoint` presents an original checkpoint under HF names, lazily (one tensor at a time), so the HF ->
Flax path converts it unchanged. `to_original_layout` writes an HF checkpoint in the original layout (used to test
the converter; also a way to hand weights back to the original code).

Keys the original model never uses are dropped, and reported: SigLIP's `attn_pool.*` (the original builds timm's
ViT with `ignore_head=True`; transformers' model has no head either), the hybrid's `vision_model.high_layer_norm.*`
and `low_layer_norm.*` (built by `HybridVisionTower`, never used in its forward; both are in the published 7B files)
and `language_model.lm_head.weight` when the language model ties it to the embeddings. A `downsamples_hd.*` copy
of the projection (commented out in the original code) is accepted only if equal to `downsamples.*`: transformers'
model has one projection for both high-resolution paths, so a different copy could not be represented.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re

import numpy as np

from deepseek_vl_jax.hf_mapping import MappingError
from deepseek_vl_jax.safetensors_io import CheckpointReader

SIGLIP_VL = "vision_model.vision_tower"
SIGLIP_HYBRID = "vision_model.vision_tower_low.vision_tower"
SAM = "vision_model.vision_tower_high.vision_tower"
HF_SIGLIP = "model.vision_model"
HF_SAM = "model.high_res_vision_model.vision_encoder"
HF_LM_HEAD = "lm_head.weight"
HF_EMBED = "model.language_model.embed_tokens.weight"


class Kind(enum.Enum):
    COPY = "copy"
    SQUEEZE = "squeeze"  # original [1, N, C] <-> HF [N, C]
    QKV = "qkv"  # original fused [3C, ...] <-> HF q, k, v [C, ...] each
    DROP = "drop"  # unused by the original model: dropped, reported
    SAME_AS = "same_as"  # a duplicate that must equal another original tensor (named by `hf`)


@dataclasses.dataclass(frozen=True)
class Rule:
    original: str  # template: {i} {n} layer/digit, {p} weight|bias, {hw} h|w, {rest} anything
    hf: str  # template; {qkv} for the three split keys; for SAME_AS the original key it duplicates
    kind: Kind = Kind.COPY
    why: str = ""


_SLOTS = {"i": r"\d+", "n": r"\d+", "p": r"weight|bias", "hw": r"h|w", "rest": r".+", "qkv": r"q|k|v"}


def _regex(template: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>{_SLOTS[m.group(1)]})"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + "$")


def rules(hybrid: bool, siglip: str | None = None) -> list[Rule]:
    """The table for one model type. `siglip`: the SigLIP prefix (default: the model type's)."""
    s = siglip or (SIGLIP_HYBRID if hybrid else SIGLIP_VL)
    enc = f"{HF_SIGLIP}.encoder.layers.{{i}}"
    out = [
        Rule(f"{s}.pos_embed", f"{HF_SIGLIP}.embeddings.position_embedding.weight", Kind.SQUEEZE),
        Rule(f"{s}.patch_embed.proj.{{p}}", f"{HF_SIGLIP}.embeddings.patch_embedding.{{p}}"),
        Rule(f"{s}.blocks.{{i}}.attn.qkv.{{p}}", f"{enc}.self_attn.{{qkv}}_proj.{{p}}", Kind.QKV),
        Rule(f"{s}.blocks.{{i}}.attn.proj.{{p}}", f"{enc}.self_attn.out_proj.{{p}}"),
        Rule(f"{s}.blocks.{{i}}.norm{{n}}.{{p}}", f"{enc}.layer_norm{{n}}.{{p}}"),
        Rule(f"{s}.blocks.{{i}}.mlp.fc{{n}}.{{p}}", f"{enc}.mlp.fc{{n}}.{{p}}"),
        Rule(f"{s}.norm.{{p}}", f"{HF_SIGLIP}.post_layernorm.{{p}}"),
        Rule(f"{s}.attn_pool.{{rest}}", "", Kind.DROP, "SigLIP pooling head, unused (original: ignore_head=True)"),
        Rule("language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq", "", Kind.DROP,
             "rotary buffer, recomputed from the config"),
        Rule("language_model.model.{rest}", "model.language_model.{rest}"),
        Rule("language_model.lm_head.weight", HF_LM_HEAD),
    ]
    if not hybrid:
        return out + [
            Rule("aligner.layers.0.{p}", "model.aligner.linear1.{p}"),
            Rule("aligner.layers.2.{p}", "model.aligner.linear2.{p}"),
        ]
    blk = f"{HF_SAM}.layers.{{i}}"
    neck = {"0": ("conv1", "weight"), "1": ("layer_norm1", "{p}"), "2": ("conv2", "weight"),
            "3": ("layer_norm2", "{p}")}
    out += [
        Rule("aligner.high_up_proj.{p}", "model.aligner.high_res_vision_proj.{p}"),
        Rule("aligner.low_up_proj.{p}", "model.aligner.vision_proj.{p}"),
        Rule("aligner.layers.1.{p}", "model.aligner.proj.{p}"),
        Rule(f"{SAM}.pos_embed", f"{HF_SAM}.pos_embed"),
        Rule(f"{SAM}.patch_embed.proj.{{p}}", f"{HF_SAM}.patch_embed.projection.{{p}}"),
        Rule(f"{SAM}.blocks.{{i}}.norm{{n}}.{{p}}", f"{blk}.layer_norm{{n}}.{{p}}"),
        Rule(f"{SAM}.blocks.{{i}}.attn.rel_pos_{{hw}}", f"{blk}.attn.rel_pos_{{hw}}"),
        Rule(f"{SAM}.blocks.{{i}}.attn.qkv.{{p}}", f"{blk}.attn.qkv.{{p}}"),
        Rule(f"{SAM}.blocks.{{i}}.attn.proj.{{p}}", f"{blk}.attn.proj.{{p}}"),
        Rule(f"{SAM}.blocks.{{i}}.mlp.lin{{n}}.{{p}}", f"{blk}.mlp.lin{{n}}.{{p}}"),
        *[Rule(f"{SAM}.neck.{k}.{leaf}", f"{HF_SAM}.neck.{name}.{leaf}") for k, (name, leaf) in neck.items()],
        *[Rule(f"{SAM}.neck_hd.{k}.{leaf}", f"model.high_res_vision_neck.{name}.{leaf}")
          for k, (name, leaf) in neck.items()],
        Rule(f"{SAM}.downsamples.0.weight", "model.high_res_vision_proj.conv1.weight"),
        Rule(f"{SAM}.downsamples.1.weight", "model.high_res_vision_proj.conv2.weight"),
        Rule(f"{SAM}.hd_alpha_downsamples", "model.high_res_vision_alpha"),
        Rule("vision_model.high_layer_norm.{p}", "", Kind.DROP,
             "LayerNorm built by the original HybridVisionTower, never used in its forward"),
        Rule("vision_model.low_layer_norm.{p}", "", Kind.DROP,
             "LayerNorm built by the original HybridVisionTower, never used in its forward"),
        Rule(f"{SAM}.downsamples_hd.{{n}}.weight", f"{SAM}.downsamples.{{n}}.weight", Kind.SAME_AS,
             "copy of the shared projection (transformers has one projection for both paths)"),
    ]
    return out


def _fill(template: str, groups: dict) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: groups[m.group(1)], template)


@dataclasses.dataclass(frozen=True)
class _Source:
    original: str
    kind: Kind
    part: int = 0  # q, k, v = 0, 1, 2 for Kind.QKV


class OriginalCheckpoint:
    """An original-layout checkpoint seen under transformers' key names (`keys`, `shape`, `dtype`, `get`), lazily.

    Raises MappingError naming every key no rule matches, QKV tensors that do not split in three, position tables
    without their leading 1, and `downsamples_hd` copies that differ from `downsamples`. `dropped` lists the
    (key, reason) pairs left out. `tie_word_embeddings`: the language model ties its head (lm_head is dropped)."""

    def __init__(self, reader: CheckpointReader, hybrid: bool, tie_word_embeddings: bool):
        self.reader = reader
        keys = reader.keys()
        siglip = SIGLIP_HYBRID if any(k.startswith(SIGLIP_HYBRID + ".") for k in keys) else SIGLIP_VL
        table = [(r, _regex(r.original)) for r in rules(hybrid, siglip)]
        self.sources: dict[str, _Source] = {}
        self.dropped: list[tuple[str, str]] = []
        unknown, problems = [], []
        for key in keys:
            match = next(((r, m) for r, rx in table if (m := rx.match(key))), None)
            if match is None:
                unknown.append(key)
                continue
            rule, m = match
            g = m.groupdict()
            shape = reader.shape(key)
            if rule.kind == Kind.DROP:
                self.dropped.append((key, rule.why))
            elif rule.kind == Kind.SAME_AS:
                other = _fill(rule.hf, g)
                if other not in reader or not np.array_equal(reader.get(key), reader.get(other)):
                    problems.append(f"{key} differs from {other}: transformers' DeepSeek-VL-Hybrid has a single "
                                    f"projection for both high-resolution paths, so this checkpoint cannot be "
                                    f"converted without losing information")
                else:
                    self.dropped.append((key, rule.why))
            elif rule.kind == Kind.QKV:
                if shape[0] % 3:
                    problems.append(f"{key}: fused qkv with {shape[0]} rows does not split in three")
                for part, name in enumerate("qkv"):
                    self.sources[_fill(rule.hf, {**g, "qkv": name})] = _Source(key, Kind.QKV, part)
            elif rule.kind == Kind.SQUEEZE:
                if len(shape) != 3 or shape[0] != 1:
                    problems.append(f"{key}: expected a [1, N, C] position table, got {list(shape)}")
                self.sources[_fill(rule.hf, g)] = _Source(key, Kind.SQUEEZE)
            else:
                self.sources[_fill(rule.hf, g)] = _Source(key, Kind.COPY)
        if tie_word_embeddings and HF_LM_HEAD in self.sources:
            self.dropped.append((self.sources.pop(HF_LM_HEAD).original, "tied to the token embeddings"))
        if unknown:
            shown = ", ".join(sorted(unknown)[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
            problems.insert(0, f"unknown tensors (no rule of the original layout matches): {shown}")
        if problems:
            raise MappingError(f"{reader.directory}: " + "; ".join(problems))

    def keys(self) -> list[str]:
        return list(self.sources)

    def __contains__(self, key: str) -> bool:
        return key in self.sources

    def shape(self, key: str) -> tuple[int, ...]:
        s = self.sources[key]
        shape = tuple(self.reader.shape(s.original))
        if s.kind == Kind.QKV:
            return (shape[0] // 3,) + shape[1:]
        if s.kind == Kind.SQUEEZE:
            return shape[1:]
        return shape

    def dtype(self, key: str) -> np.dtype:
        return self.reader.dtype(self.sources[key].original)

    def get(self, key: str) -> np.ndarray:
        s = self.sources[key]
        x = self.reader.get(s.original)
        if s.kind == Kind.QKV:
            n = x.shape[0] // 3
            return x[s.part * n:(s.part + 1) * n]
        if s.kind == Kind.SQUEEZE:
            return x[0]
        return x


def to_original_keys(hf_keys: list[str], hybrid: bool) -> dict[str, list[str]]:
    """{original key: [HF keys it is made of]} (three for a fused qkv, in q, k, v order; one otherwise)."""
    table = [(r, _regex(r.hf)) for r in rules(hybrid) if r.kind in (Kind.COPY, Kind.SQUEEZE, Kind.QKV)]
    out: dict[str, list[str]] = {}
    for key in hf_keys:
        match = next(((r, m) for r, rx in table if (m := rx.match(key))), None)
        if match is None:
            raise MappingError(f"HF tensor {key!r} has no place in the original layout")
        rule, m = match
        g = m.groupdict()
        original = _fill(rule.original, g)
        if rule.kind == Kind.QKV:
            parts = [_fill(rule.hf, {**g, "qkv": q}) for q in "qkv"]
            missing = [p for p in parts if p not in hf_keys]
            if missing:
                raise MappingError(f"cannot fuse {original}: missing {missing}")
            out[original] = parts
        else:
            out[original] = [key]
    return out


def to_original_layout(src: str | os.PathLike, dst: str | os.PathLike, max_shard_size: int | str = "5GB",
                       force: bool = False) -> str:
    """Write the HF checkpoint directory `src` (transformers' layout) in the original deepseek-ai layout at `dst`:
    original key names, fused SigLIP qkv, `[1, N, C]` SigLIP position table, original-style `config.json`, plus
    the tokenizer/processor files. Streams one tensor at a time; atomic like `convert`."""
    from deepseek_vl_jax.conversion import atomic, flax_checkpoint, original_config
    from deepseek_vl_jax.conversion import safetensors_writer as sw

    src = os.fspath(src)
    with open(os.path.join(src, "config.json")) as f:
        hf_config = json.load(f)
    hybrid = hf_config.get("model_type") == "deepseek_vl_hybrid"
    config = original_config.original_config_from_hf(hf_config)
    reader = CheckpointReader(src)
    plan = to_original_keys(reader.keys(), hybrid)
    specs = []
    for original, parts in sorted(plan.items()):
        shape = tuple(reader.shape(parts[0]))
        if len(parts) == 3:
            shape = (3 * shape[0],) + shape[1:]
        elif original.endswith(".pos_embed") and not original.startswith(SAM):
            shape = (1,) + shape
        specs.append(sw.TensorSpec(original, shape, reader.dtype(parts[0])))

    def arrays():
        for s in specs:
            parts = [reader.get(k) for k in plan[s.name]]
            yield s.name, (np.concatenate(parts, axis=0) if len(parts) == 3 else parts[0].reshape(s.shape))

    with atomic.staged_directory(dst, force) as tmp:
        sw.write_checkpoint(tmp, specs, arrays(), max_shard_size)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        flax_checkpoint.copy_auxiliary_files(src, tmp)
    return os.fspath(dst)
