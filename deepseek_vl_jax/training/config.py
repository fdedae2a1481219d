"""Typed, frozen training configs, loaded from JSON (a path or a stage name) plus `--set key=value` overrides.

    TrainConfig
      steps, seed, eval_every, log_every
      mesh:       MeshConfig(data, fsdp, tensor)              one size may be -1 (= the remaining devices)
      model:      RuntimeConfig(dtype, param_dtype, remat_policy)
      trainable:  TrainableConfig(vision, high_res, aligner, language)
      optimizer:  OptimizerConfig(learning_rate, warmup_steps, min_learning_rate_ratio, b1, b2, eps, weight_decay,
                                  decay_embeddings, clip_grad_norm, grad_accum_steps)
      data:       DataConfig(batch_size, max_length, length_buckets, max_images_per_row, shuffle, seed, bad_rows,
                             num_threads, prefetch)
      checkpoint: CheckpointConfig(every, keep, async_save)
      logging:    LoggingConfig(tensorboard, progress, peak_flops_per_device)
      lora:       LoraConfig(rank, alpha, dropout, targets, quantize, group_size)   rank 0 = off

Every key is checked: an unknown key (a typo) is an error naming the valid keys.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

from deepseek_vl_jax.common import RematPolicy
from deepseek_vl_jax.lora.config import LoraConfig


class TrainConfigError(ValueError):
    """A training config that is malformed or inconsistent."""


class BadRows(str, enum.Enum):
    SKIP = "skip"  # report the row (with its line number) and leave it out
    FAIL = "fail"  # report the row and stop the run


# Tower name -> the top-level parameter collections it owns (names as in `DeepseekVL`).
TOWERS: dict[str, tuple[str, ...]] = {
    "vision": ("vision_model",),
    "high_res": ("high_res_vision_model", "high_res_vision_neck", "high_res_vision_proj", "high_res_vision_alpha"),
    "aligner": ("aligner",),
    "language": ("language_model",),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How the model computes: `dtype` of matmuls (bfloat16 on TPU), `param_dtype` of the master weights (keep
    float32: the optimizer updates them in float32), and what the backward pass recomputes."""

    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: RematPolicy = RematPolicy.NONE

    def __post_init__(self):
        object.__setattr__(self, "remat_policy", RematPolicy(self.remat_policy))


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
    """Which towers train. A frozen tower gets no gradient, no optimizer state and no weight update."""

    vision: bool = True  # SigLIP (`vision_model`)
    high_res: bool = False  # SAM + its neck, projection and alpha (hybrid model only)
    aligner: bool = True
    language: bool = True

    def collections(self) -> tuple[str, ...]:
        """The top-level parameter names that train."""
        return tuple(name for tower, names in TOWERS.items() if getattr(self, tower) for name in names)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up then cosine decay to `min_learning_rate_ratio * learning_rate` at the last step,
    global-norm gradient clipping, and `grad_accum_steps` micro-batches per optimizer step.

    Weight decay applies to matmul and convolution kernels only: never to norm scales, biases, the hybrid alpha,
    position/relative-position tables, and (unless `decay_embeddings`) not to the token embeddings either."""

    learning_rate: float = 2e-5
    warmup_steps: int = 0
    min_learning_rate_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_embeddings: bool = False
    clip_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`batch_size` rows per optimizer step (all hosts together; split into `grad_accum_steps` micro-batches).

    Rows are right-padded to the smallest of `length_buckets` that fits the longest row of the step (empty: powers
    of two and 1.5x powers of two from 64 up to `max_length`), so only a few shapes are ever compiled. Each row has
    room for `max_images_per_row` images (missing ones are zero images whose features no token uses)."""

    batch_size: int = 8
    max_length: int = 2048
    length_buckets: tuple[int, ...] = ()
    max_images_per_row: int = 1
    shuffle: bool = True
    seed: int = 0
    bad_rows: BadRows = BadRows.SKIP
    num_threads: int = 2  # grain warns when prefetch < num_threads
    prefetch: int = 2

    def __post_init__(self):
        object.__setattr__(self, "bad_rows", BadRows(self.bad_rows))
        object.__setattr__(self, "length_buckets", tuple(sorted(int(b) for b in self.length_buckets)))

    def buckets(self) -> tuple[int, ...]:
        if self.length_buckets:
            return tuple(b for b in self.length_buckets if b < self.max_length) + (self.max_length,)
        out, b = [], 64
        while b < self.max_length:
            out += [b, b * 3 // 2]
            b *= 2
        return tuple(x for x in out if x < self.max_length) + (self.max_length,)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000  # save every N steps (and at the last step)
    keep: int = 3  # keep the K most recent checkpoints
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True
    # Peak FLOP/s of one device for MFU (e.g. 197e12 for a TPU v5e in bfloat16). None: measured once with a large
    # float32 matmul on this device (meant for CPU).
    peak_flops_per_device: float | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: no periodic evaluation (even with --eval-data)
    mesh: MeshConfig = MeshConfig()
    model: RuntimeConfig = RuntimeConfig()
    trainable: TrainableConfig = TrainableConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    lora: LoraConfig = LoraConfig()

    def __post_init__(self):
        check(self)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return _to_jsonable(dataclasses.asdict(self))

    @property
    def micro_batch_size(self) -> int:
        return self.data.batch_size // self.optimizer.grad_accum_steps


def _finite(x) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check(c: TrainConfig) -> None:
    problems = []
    if c.steps < 1:
        problems.append(f"steps must be >= 1, got {c.steps}")
    if c.data.batch_size < 1 or c.optimizer.grad_accum_steps < 1:
        problems.append("data.batch_size and optimizer.grad_accum_steps must be >= 1")
    elif c.data.batch_size % c.optimizer.grad_accum_steps:
        problems.append(f"data.batch_size {c.data.batch_size} is not a multiple of optimizer.grad_accum_steps "
                        f"{c.optimizer.grad_accum_steps}")
    if not any(dataclasses.astuple(c.trainable)) and not c.lora.enabled:
        problems.append("trainable: nothing trains; set at least one tower to true (or lora.rank > 0)")
    if c.data.max_images_per_row < 0 or c.data.max_length < 2:
        problems.append("data.max_images_per_row must be >= 0 and data.max_length >= 2")
    if c.checkpoint.every < 1 or c.checkpoint.keep < 1:
        problems.append("checkpoint.every and checkpoint.keep must be >= 1")
    o = c.optimizer
    if not 0.0 <= o.min_learning_rate_ratio <= 1.0:
        problems.append("optimizer.min_learning_rate_ratio must be in [0, 1]")
    if not (_finite(o.learning_rate) and 0.0 < o.learning_rate <= 1.0):
        problems.append(f"optimizer.learning_rate (--learning-rate) must be a finite number in (0, 1], got "
                        f"{o.learning_rate!r}")
    for name in ("b1", "b2"):
        if not (_finite(getattr(o, name)) and 0.0 <= getattr(o, name) < 1.0):
            problems.append(f"optimizer.{name} must be in [0, 1), got {getattr(o, name)!r}")
    if not (_finite(o.eps) and o.eps > 0) or not (_finite(o.weight_decay) and o.weight_decay >= 0):
        problems.append(f"optimizer.eps must be > 0 and optimizer.weight_decay >= 0, got {o.eps!r} and "
                        f"{o.weight_decay!r}")
    if o.warmup_steps < 0:
        problems.append(f"optimizer.warmup_steps must be >= 0, got {o.warmup_steps}")
    if o.clip_grad_norm is not None and not (_finite(o.clip_grad_norm) and o.clip_grad_norm > 0):
        problems.append(f"optimizer.clip_grad_norm must be > 0 or null (off), got {o.clip_grad_norm!r}")
    if c.data.num_threads < 0 or c.data.prefetch < 0:
        problems.append("data.num_threads and data.prefetch must be >= 0")
    if "float16" in (c.model.dtype, c.model.param_dtype):
        problems.append("model.dtype float16 is not supported for training (its gradients overflow or vanish without "
                        "a loss scale, which this trainer does not have): use bfloat16 (same memory) or float32")
    if problems:
        raise TrainConfigError("; ".join(problems))


# ---------------------------------------------------------------------------------------------------- loading
STAGES_DIR = Path(__file__).resolve().parents[2] / "train" / "configs"
STAGE_ALIASES = {"stage1": "stage1_aligner", "stage2": "stage2_pretrain", "stage3": "stage3_sft"}


def _to_jsonable(x):
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _coerce(tp, value, where: str):
    """Convert a JSON value to the annotated field type (nested dataclasses, tuples, enums, optionals)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise TrainConfigError(f"{where}: expected an object, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise TrainConfigError(f"{where}: {value!r} is not one of {[m.value for m in tp]}") from None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, bool, str) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise TrainConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, d: Mapping[str, Any], where: str = "config"):
    """Build a (nested) config dataclass from a dict; unknown keys are errors."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names) - {"description"})
    if unknown:
        raise TrainConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {names}")
    kwargs = {k: _coerce(_field_type(cls, k), v, f"{where}.{k}") for k, v in d.items() if k != "description"}
    try:
        return cls(**kwargs)
    except TrainConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise TrainConfigError(f"{where}: {e}") from e


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A JSON file path, or a stage name (`stage1_aligner`, `stage2_pretrain`, `stage3_sft`, or `stage1`..)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = STAGE_ALIASES.get(str(name_or_path), str(name_or_path))
    candidate = STAGES_DIR / f"{name}.json"
    if candidate.is_file():
        return candidate
    stages = sorted(p.stem for p in STAGES_DIR.glob("*.json")) if STAGES_DIR.is_dir() else []
    raise TrainConfigError(f"no config file {str(name_or_path)!r} and no stage of that name (stages: {stages})")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optimizer.learning_rate=3e-4` -> (["optimizer", "learning_rate"], 3e-4); values are JSON, else strings."""
    if "=" not in item:
        raise TrainConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(d: dict, overrides: Sequence[str]) -> dict:
    d = json.loads(json.dumps(d))
    for item in overrides:
        keys, value = parse_override(item)
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"--set {item}: {k} is not a section")
        node[keys[-1]] = value
    return d


def load_config(name_or_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults <- the JSON file (or stage) <- `--set` overrides, validated."""
    d: dict = {}
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TrainConfigError(f"{path} is not valid JSON: {e}") from e
    return from_dict(TrainConfig, apply_overrides(d, overrides))
