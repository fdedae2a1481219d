"""Training checkpoints that store only their trainable leaves, and the frozen base they were trained on.

A run with frozen parameters (LoRA / QLoRA, or frozen towers) saves in `checkpoints/<step>/params` only the leaves
that train (the `lora` adapters and the trainable towers); the frozen rest is the model directory the run started
from, recorded in the step's `meta` item:

    "base": {"path": "/abs/model/dir", "fingerprint": "<sha256 hex>", "collections": ["language_model", ...],
             "param_dtype": "float32", "dtype": "float32", "quantize": null | {QuantizeConfig.to_dict()}}

`fingerprint` hashes the frozen leaves' bits: each leaf's path, shape, dtype and two position-mixed 32-bit sums of
its words, computed where the leaves are (on device, sharded; integer sums, so the same whatever the sharding or the
host count), then SHA-256 over those. A resume, an export or `load_pretrained` of such a checkpoint loads the base
from `path` as the run did (dtype, QLoRA quantization) and refuses one whose fingerprint differs.

Checkpoints written before this layout hold every parameter and no `base` record; they are read as before.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_vl_jax import hf_mapping

BASE = "base"
META = "meta"


class BaseChangedError(ValueError):
    """The frozen base a checkpoint was trained on is no longer what its model directory holds."""


def _mix(x):
    """murmur3's 32-bit finaliser (uint32 -> uint32)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _words(x):
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(x.dtype).itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_sums(leaves):
    out = []
    for x in leaves:
        words = _words(x).reshape(-1)
        index = jax.lax.iota(jnp.uint32, words.size)
        out.append(jnp.stack([jnp.sum(_mix(words ^ _mix(index + jnp.uint32(seed))), dtype=jnp.uint32)
                              for seed in (0x9E3779B9, 0x7F4A7C15)]))
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(tree) -> str:
    """SHA-256 (hex) of a param tree's leaves (QTensors as their stored values and scales), bit for bit. A
    collective under multi-host (every process calls it with its shards of the same global arrays)."""
    from deepseek_vl_jax.quantization import to_checkpoint_tree

    flat = sorted(hf_mapping._flatten(to_checkpoint_tree(tree)))
    leaves = [x for _, x in flat]
    out_shardings = None
    named = [x.sharding for x in leaves if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)]
    if named:
        out_shardings = jax.sharding.NamedSharding(named[0].mesh, jax.sharding.PartitionSpec())
    sums = jax.jit(_leaf_sums, out_shardings=out_shardings)(leaves)
    sums = np.asarray(sums.addressable_data(0) if isinstance(sums, jax.Array) else sums)
    h = hashlib.sha256()
    for (path, x), s in zip(flat, sums):
        h.update(json.dumps(["/".join(path), list(x.shape), np.dtype(x.dtype).name, [int(v) for v in s]]).encode())
    return h.hexdigest()


def record(model_dir: str, frozen, param_dtype: str, dtype: str, quantize=None) -> dict:
    """The `base` record of a checkpoint whose frozen leaves are `frozen` (loaded from `model_dir`)."""
    return {"path": os.path.abspath(os.fspath(model_dir)), "fingerprint": fingerprint(frozen),
            "collections": sorted(frozen), "param_dtype": param_dtype, "dtype": dtype,
            "quantize": None if quantize is None else quantize.to_dict()}


def read_record(out_dir: str, step: int) -> dict | None:
    """The `base` record of training checkpoint `step` in OUT (None: a checkpoint of every parameter)."""
    from deepseek_vl_jax.checkpoint_kinds import TRAINING_CHECKPOINTS

    file = os.path.join(os.fspath(out_dir), TRAINING_CHECKPOINTS, str(step), META, "metadata")
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f).get(BASE)


def check(rec: dict, got: str, where: str, model_dir: str | None = None) -> None:
    """BaseChangedError (one line naming both) unless fingerprint `got` is the record's."""
    if got == rec["fingerprint"]:
        return
    now = os.path.abspath(model_dir) if model_dir is not None else rec["path"]
    was = f"{where} was trained on the frozen base {rec['path']} (fingerprint {rec['fingerprint'][:12]})"
    if now == rec["path"]:
        raise BaseChangedError(f"{was}, which has changed since (fingerprint now {got[:12]}): put the original base "
                               "back there, or start a new run (a new --output)")
    raise BaseChangedError(f"{was}, but --model {now} holds another (fingerprint {got[:12]}): resume with the "
                           "original base, or start a new run (a new --output)")


def frozen_part(params, rec: dict) -> dict:
    return {k: v for k, v in params.items() if k in rec["collections"]}


def load(rec: dict, where: str, mesh=None) -> dict:
    """The frozen collections of the base `rec` names, loaded as the run loaded them (sharded by the rules table
    with `mesh`) and checked against the fingerprint."""
    from deepseek_vl_jax.pretrained import load_pretrained

    if not os.path.isdir(rec["path"]):
        raise BaseChangedError(f"{where} was trained on the frozen base {rec['path']}, which is gone: put it back "
                               "there (the checkpoint holds only the trained leaves)")
    params = load_pretrained(rec["path"], dtype=rec["dtype"], param_dtype=rec["param_dtype"], mesh=mesh,
                             progress=False, quantize=rec["quantize"]).params
    frozen = frozen_part(params, rec)
    check(rec, fingerprint(frozen), where)
    return frozen


def _files(path: str) -> tuple:
    """(name, size, mtime) of every file under a directory: a loaded base is reused until one changes."""
    return tuple(sorted((os.path.relpath(os.path.join(d, f), path), st.st_size, st.st_mtime_ns)
                        for d, _, files in os.walk(path) for f in files
                        for st in [os.stat(os.path.join(d, f))]))


@functools.lru_cache(maxsize=1)
def _host_leaves(path: str, files: tuple, rec_json: str, where: str) -> dict:
    rec = json.loads(rec_json)
    frozen = jax.device_get(load(rec, where))
    from deepseek_vl_jax.quantization import to_checkpoint_tree

    return {p: np.asarray(x) for p, x in hf_mapping._flatten(to_checkpoint_tree(frozen))}


def host_leaves(rec: dict, where: str) -> dict:
    """{flat path: numpy array} of the base's frozen leaves in the checkpoint layout (QTensors as q_values /
    q_scales), checked against the fingerprint; kept for the next call while the base's files are unchanged (an
    export reads leaves group by group)."""
    return _host_leaves(rec["path"], _files(rec["path"]) if os.path.isdir(rec["path"]) else (),
                        json.dumps(rec, sort_keys=True), where)
