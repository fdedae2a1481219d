"""Sharded, resumable training of DeepSeek-VL: configs, the grain data pipeline, AdamW on chosen towers, the train
step, FLOPs/MFU, checkpoints, metrics, and the `train` / `evaluate` programs."""

from deepseek_vl_jax.training.config import (
    BadRows, CheckpointConfig, DataConfig, LoggingConfig, MeshConfig, OptimizerConfig, RuntimeConfig, TrainableConfig,
    TrainConfig, TrainConfigError, load_config,
)
from deepseek_vl_jax.training.data import BadRowError
from deepseek_vl_jax.training.loop import TrainResult, train
from deepseek_vl_jax.training.step import TrainState

__all__ = [
    "BadRowError", "BadRows", "CheckpointConfig", "DataConfig", "LoggingConfig", "MeshConfig", "OptimizerConfig",
    "RuntimeConfig", "TrainConfig", "TrainConfigError", "TrainResult", "TrainState", "TrainableConfig", "load_config",
    "train",
]
