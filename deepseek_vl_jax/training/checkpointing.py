"""The training output directory and its Orbax checkpoints.

    OUT/
      config.json            the model's HF-form config (copied from --model)
      tokenizer.json, ...    the processor files (so OUT is a complete model directory for `export`)
      train_config.json      the resolved TrainConfig of the run
      metrics.jsonl          one JSON object per step;  eval.jsonl  one per evaluation
      tensorboard/           event files
      checkpoints/<step>/    Orbax CheckpointManager items:
          params     (StandardSave)  every parameter, the float32 master copy
          opt_state  (StandardSave)  optimizer state of the trainable towers
          data_iter  (grain)         one JSON file per process: that host's iterator position
          meta       (JsonSave)      step, train config, process count

Saves are asynchronous (the arrays are copied to host memory before `save` returns, so the state can be donated to
the next step at once) and collective: every process calls `save` and writes its own shards.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import grain.checkpoint
import jax
import orbax.checkpoint as ocp

from deepseek_vl_jax.training.config import CheckpointConfig

CHECKPOINTS = "checkpoints"
PARAMS, OPT_STATE, DATA_ITER, META = "params", "opt_state", "data_iter", "meta"


class IteratorSnapshot:
    """A data-iterator position frozen at the step being saved, in the form grain's Orbax handler expects.

    The live iterator keeps prefetching while an asynchronous save runs, so the handler gets this snapshot
    instead of the iterator itself."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        pass


def manager(out_dir: str, config: CheckpointConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, enable_async_checkpointing=config.async_save,
                                           create=True)
    handlers = {PARAMS: ocp.StandardCheckpointHandler(), OPT_STATE: ocp.StandardCheckpointHandler(),
                DATA_ITER: grain.checkpoint.CheckpointHandler(), META: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.join(os.path.abspath(out_dir), CHECKPOINTS), options=options,
                                 item_handlers=handlers)


def save(mgr: ocp.CheckpointManager, step: int, state, iterator_state: dict, meta: dict, force: bool = False) -> bool:
    args = ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(state.params),
        OPT_STATE: ocp.args.StandardSave(state.opt_state),
        DATA_ITER: grain.checkpoint.CheckpointSave(IteratorSnapshot(iterator_state)),
        META: ocp.args.JsonSave(meta),
    })
    return mgr.save(step, args=args, force=force)


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, Any, dict, dict]:
    """(params, opt_state, iterator state, meta) of checkpoint `step`, arrays placed as `abstract_state`'s
    shardings say."""
    args = ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(abstract_state.params),
        OPT_STATE: ocp.args.StandardRestore(abstract_state.opt_state),
        DATA_ITER: grain.checkpoint.CheckpointRestore(IteratorSnapshot()),
        META: ocp.args.JsonRestore(),
    })
    out = mgr.restore(step, args=args)
    return out[PARAMS], out[OPT_STATE], out[DATA_ITER].state, out[META]


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (what Orbax restores into)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# Files of an HF model directory that make OUT a model directory too.
MODEL_FILES = ("config.json", "generation_config.json")


def prepare_output(out_dir: str, model_dir: str, processor, train_config: dict) -> None:
    """Write config.json, the processor files and train_config.json into OUT (process 0 only)."""
    os.makedirs(out_dir, exist_ok=True)
    if jax.process_index() != 0:
        return
    for name in MODEL_FILES:
        src = os.path.join(model_dir, name)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
            shutil.copyfile(src, os.path.join(out_dir, name))
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "train_config.json"), "w", encoding="utf-8") as f:
        json.dump(train_config, f, indent=2)
