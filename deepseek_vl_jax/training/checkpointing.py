"""The training output directory and its Orbax checkpoints.

    OUT/
      config.json            the model's HF-form config (copied from --model)
      tokenizer.json, ...    the processor files (so OUT is a complete model directory for `export`)
      train_config.json      the resolved TrainConfig of the run
      metrics.jsonl          one JSON object per step;  eval.jsonl  one per evaluation
      tensorboard/           event files
      checkpoints/<step>/    Orbax CheckpointManager items:
          params     (StandardSave)  the trainable parameters (LoRA adapters, trainable towers), the float32
                                     master copy; a run that trains every tower: every parameter
          opt_state  (StandardSave)  optimizer state of the trainable towers
          data_iter  (grain)         one JSON file per process: that host's iterator position
          meta       (JsonSave)      step, train config, process count, and with frozen parameters (LoRA, QLoRA,
                                     frozen towers) `base`: the model directory they are loaded from again and a
                                     fingerprint of their bits (`conversion.frozen_base`)

So a LoRA checkpoint of the 7B model is its adapters and their Adam moments (megabytes), not a copy of the base.
Checkpoints of the older layout (every parameter, a QLoRA base's QTensors as `<path>/q_values` + `q_scales`) and
no `base` record restore as before.

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

from deepseek_vl_jax import hf_mapping, quantization
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


def save(mgr: ocp.CheckpointManager, step: int, state, iterator_state: dict, meta: dict, force: bool = False,
         params=None) -> bool:
    """Save `state` (its `params`, or just the given subset: the trainable ones, with `meta["base"]` naming the
    rest)."""
    args = ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(quantization.to_checkpoint_tree(state.params if params is None else params)),
        OPT_STATE: ocp.args.StandardSave(state.opt_state),
        DATA_ITER: grain.checkpoint.CheckpointSave(IteratorSnapshot(iterator_state)),
        META: ocp.args.JsonSave(meta),
    })
    return mgr.save(step, args=args, force=force)


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, Any, dict, dict]:
    """(params, opt_state, iterator state, meta) of checkpoint `step`, arrays placed as `abstract_state`'s
    shardings say."""
    leaves = {p: quantization.LeafPlan(x.scheme, x.group_size, x.axis)
              for p, x in hf_mapping._flatten(abstract_state.params) if isinstance(x, quantization.QTensor)}
    args = ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(quantization.to_checkpoint_tree(abstract_state.params)),
        OPT_STATE: ocp.args.StandardRestore(abstract_state.opt_state),
        DATA_ITER: grain.checkpoint.CheckpointRestore(IteratorSnapshot()),
        META: ocp.args.JsonRestore(),
    })
    out = mgr.restore(step, args=args)
    return (quantization.from_checkpoint_tree(out[PARAMS], leaves), out[OPT_STATE], out[DATA_ITER].state,
            out[META])


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


# ------------------------------------------------------------------------------------------------ resume checks
# Train-config keys whose change does not alter the numbers of a resumed run.
HARMLESS = ("log_every", "eval_every", "checkpoint.", "logging.", "data.num_threads", "data.prefetch",
            "data.bad_rows")
CHANGES_FILE = "config_changes.jsonl"


class ResumeError(ValueError):
    """A resume whose settings differ from the checkpoint's in a way that breaks exactness."""


def file_fingerprint(path: str) -> dict:
    """Size and SHA-256 of a data file (what decides whether a resumed run reads the same rows). Hashed by
    process 0 alone and sent to the others (a collective: every process calls it), so a start on many hosts reads
    the file for its hash once."""
    import hashlib

    import numpy as np

    digest = np.zeros(32, np.uint8)
    if jax.process_index() == 0:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = np.frombuffer(h.digest(), np.uint8)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        digest = np.asarray(multihost_utils.broadcast_one_to_all(digest), np.uint8)
    return {"bytes": os.path.getsize(path), "sha256": bytes(digest).hex()}


def run_fingerprint(model_dir: str, data_path: str, mesh_shape: dict) -> dict:
    """What besides the train config decides a run's numbers: the model's config, the data, the mesh shape."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        model = json.load(f)
    return {"model": model, "data": file_fingerprint(data_path), "mesh": {k: int(v) for k, v in mesh_shape.items()}}


def latest_meta(out_dir: str) -> tuple[int, dict] | None:
    """(step, meta) of the newest finished checkpoint in OUT, or None (read from disk, nothing created)."""
    root = os.path.join(out_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    steps = sorted((int(d) for d in os.listdir(root) if d.isdigit()), reverse=True)
    for step in steps:
        file = os.path.join(root, str(step), META, "metadata")
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                return step, json.load(f)
    return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _schedule_uses_steps(train_config: dict) -> bool:
    opt = train_config.get("optimizer", {})
    return not (opt.get("warmup_steps", 0) == 0 and opt.get("min_learning_rate_ratio") == 1.0)


def setting_changes(saved: dict, new: dict) -> list[str]:
    """The differences between a checkpoint's meta and a new run's that change the numbers, e.g.
    ["data.batch_size: 4 -> 2", "data file: sha256 1a2b... -> 3c4d..."]."""
    changes = []
    old_cfg, new_cfg = _flat(saved.get("train_config", {})), _flat(new["train_config"])
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key.startswith(HARMLESS) or key == "description" or old_cfg.get(key) == new_cfg.get(key):
            continue
        if key == "steps" and not (_schedule_uses_steps(saved.get("train_config", {}))
                                   or _schedule_uses_steps(new["train_config"])):
            continue  # a constant learning rate: more or fewer steps continue the same run
        changes.append(f"{key}: {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}")
    old_fp, new_fp = saved.get("fingerprint"), new.get("fingerprint")
    if old_fp and new_fp:
        if old_fp["model"] != new_fp["model"]:
            keys = sorted(k for k in set(_flat(old_fp["model"])) | set(_flat(new_fp["model"]))
                          if _flat(old_fp["model"]).get(k) != _flat(new_fp["model"]).get(k))
            changes.append(f"model config.json differs in {', '.join(keys[:6])}")
        if old_fp["data"] != new_fp["data"]:
            changes.append(f"data file: {old_fp['data']['bytes']} bytes sha256 {old_fp['data']['sha256'][:12]} -> "
                           f"{new_fp['data']['bytes']} bytes sha256 {new_fp['data']['sha256'][:12]}")
        if old_fp["mesh"] != new_fp["mesh"]:
            changes.append(f"mesh: {old_fp['mesh']} -> {new_fp['mesh']}")
    return changes


def record_changes(out_dir: str, step: int, changes: list[str]) -> None:
    """Append the accepted changes of a resume to OUT/config_changes.jsonl (process 0 only)."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(out_dir, CHANGES_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps({"resumed_at_step": step, "changes": changes}) + "\n")
