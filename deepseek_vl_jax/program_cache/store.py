"""The files of the program cache: one file per entry, named by the SHA-256 of its key, written atomically.

A key is a JSON text that names everything the entry depends on: what it is (kind, model config, static options,
argument shapes and dtypes) and the `fingerprint()` of the software that made it (jax, jaxlib, flax versions, the
devices, the relevant JAX flags, and a hash of this package's own source files, so that any edit of the code
invalidates every entry). A file holds a magic line, its key and the payload; a file whose magic or key differs
(a hash collision, another version, a truncated or corrupt write) reads as missing.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import tempfile

MAGIC = b"deepseek-vl-jax program cache v1\n"

# what the cache did in this process: shapes_loaded / shapes_saved / programs_loaded / programs_saved /
# programs_traced (no usable entry could be made: the plain jitted program ran) / rejected (a file read as corrupt)
COUNTS: collections.Counter = collections.Counter()


def counts() -> dict[str, int]:
    return dict(COUNTS)


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """SHA-256 over this package's Python files (paths and contents)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for base, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(base, name)
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def cpu_identity() -> str:
    """The host CPU's model and instruction-set flags (XLA:CPU compiles for them), hashed."""
    import platform

    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")) and line not in lines:
                    lines.append(line)
    except OSError:
        pass
    text = "".join(lines) or f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _fixed_fingerprint() -> dict:
    import flax
    import jax
    import jaxlib

    devices = jax.devices()
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "source": source_hash(),
            "platform": devices[0].platform, "device_kind": devices[0].device_kind, "devices": len(devices),
            "platform_version": devices[0].client.platform_version, "cpu": cpu_identity(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def fingerprint() -> dict:
    """The software and hardware an entry was made with, and the JAX flags that change a program (imports jax)."""
    import jax

    return {**_fixed_fingerprint(), "x64": bool(jax.config.jax_enable_x64),
            "matmul_precision": str(jax.config.jax_default_matmul_precision)}


class Store:
    """Entries under `directory` (created on the first write). Reads and writes never raise: a failing read is a
    miss, a failing write (read-only or full disk) leaves nothing behind and is forgotten."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)

    def key(self, kind: str, **parts) -> str:
        return json.dumps({"kind": kind, **parts, "software": fingerprint()}, sort_keys=True, default=str)

    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(key.encode()).hexdigest()[:40] + suffix)

    def read(self, key: str, suffix: str) -> bytes | None:
        try:
            with open(self._path(key, suffix), "rb") as f:
                data = f.read()
        except OSError:
            return None
        head = MAGIC + key.encode() + b"\n"
        if not data.startswith(head):
            COUNTS["rejected"] += 1
            return None
        return data[len(head):]

    def remove(self, key: str, suffix: str) -> None:
        """Delete an entry (a rejected file, or one in the other format), if it exists."""
        try:
            os.unlink(self._path(key, suffix))
        except OSError:
            pass

    def write(self, key: str, suffix: str, payload: bytes) -> bool:
        tmp = None
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + key.encode() + b"\n")
                f.write(payload)
            os.replace(tmp, self._path(key, suffix))
            return True
        except OSError:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return False
