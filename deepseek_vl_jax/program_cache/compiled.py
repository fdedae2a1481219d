"""Generation programs (`generation.loop.programs`) compiled once and kept on disk, so that a fresh process runs
them without tracing, lowering or compiling the model again.

Each program (generate, prefill, step) is compiled per argument signature (tree structure, shapes, dtypes, the
static generated-buffer length) on its first use and stored as a serialized executable
(`jax.experimental.serialize_executable`): loading one costs ~0.1 s. XLA:CPU cannot serialize every executable
(a sort's comparator, as top-k / top-p sampling uses, is not serializable); such a program is stored with
`jax.export` instead, as StableHLO that each process still lowers and compiles (JAX's compilation cache then
saves the compilation), ~0.4 CPU-s more per run on the shipped model. From the first run on, a run with the cache on
executes what the store holds, so a repeat run computes exactly what the first did.

An executable holds machine code for this CPU and jaxlib: the key names both (`store.fingerprint`), and as with
JAX's own compilation cache the directory must be the user's own (loading a file runs code from it). Anything
that keeps an entry from being made, read or called (an unsupported tree, a stale, truncated or corrupt file)
falls back, silently, to the jitted program.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Callable

from deepseek_vl_jax.program_cache.store import COUNTS, Store

EXECUTABLE, EXPORTED = ".executable", ".jaxexport"
_MISSING = object()
_REGISTERED: list = []


def _register_nodes() -> None:
    """Teach jax.export the pytree nodes of the generation programs' arguments and results (once)."""
    if _REGISTERED:
        return
    from jax import export

    from deepseek_vl_jax.generation import loop, sampling, stopping
    from deepseek_vl_jax.quantization.qtensor import QTensor, Scheme

    plain = (lambda aux: json.dumps(list(aux)).encode(), lambda data: tuple(json.loads(data)))
    qtensor = (lambda aux: json.dumps([aux[0].value, *aux[1:]]).encode(),
               lambda data: (lambda a: (Scheme(a[0]), *a[1:]))(json.loads(data)))
    for cls, (encode, decode) in ((sampling.SamplingParams, plain), (loop.StopParams, plain),
                                  (loop.DecodeState, plain), (stopping.StopTables, plain), (QTensor, qtensor)):
        try:
            export.register_pytree_node_serialization(cls, serialized_name=f"{cls.__module__}.{cls.__qualname__}",
                                                      serialize_auxdata=encode, deserialize_auxdata=decode)
        except ValueError:  # registered already (by another user of the same classes)
            pass
    _REGISTERED.append(True)


_HITS: list = []  # [count] of JAX compilation-cache hits, once the listener is registered


def _cache_hits() -> int:
    if not _HITS:
        from jax import monitoring

        _HITS.append(0)

        def listen(event: str, **_) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                _HITS[0] += 1

        monitoring.register_event_listener(listen)
    return _HITS[0]


def _signature(leaves) -> tuple:
    import jax

    out = []
    for x in leaves:
        aval = jax.typeof(x)
        out.append((tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False))))
    return tuple(out)


class Program:
    """A `loop.Programs` field called as a stored program. `traced(*args)` is the jitted original (its last
    argument static when `static`; `donate`: the argument numbers it donates)."""

    def __init__(self, store: Store, kind: str, ident: str, traced: Callable, static: bool = False,
                 donate: tuple[int, ...] = ()):
        self.store, self.kind, self.ident, self.traced = store, kind, ident, traced
        self.static, self.donate = static, donate
        self.memo: dict = {}  # signature -> [callable, checked, key] or None (use `traced`)

    def __call__(self, *args):
        import jax

        dynamic, static = (args[:-1], args[-1]) if self.static else (args, None)
        leaves, treedef = jax.tree.flatten(dynamic)
        sig = (treedef, static, _signature(leaves))
        entry = self.memo.get(sig, _MISSING)
        if entry is _MISSING:
            entry = self.memo[sig] = self._entry(dynamic, static, treedef, sig[2])
        if entry is None:
            return self.traced(*args)
        if entry[1]:
            return entry[0](*dynamic)
        try:  # the first call checks the arguments against the executable's and runs it: a failure falls back
            out = jax.block_until_ready(entry[0](*dynamic))
        except Exception:  # noqa: BLE001
            COUNTS["rejected"] += 1
            self.memo[sig] = None
            self.store.remove(entry[2], EXECUTABLE)
            self.store.remove(entry[2], EXPORTED)
            return self.traced(*args)
        entry[1] = True
        return out

    def _entry(self, dynamic, static, treedef, signature) -> list | None:
        import jax
        from jax import export
        from jax.experimental import serialize_executable

        options = self._options(dynamic, static)
        key = self.store.key(f"program:{self.kind}", ident=self.ident, static=static, tree=str(treedef),
                             avals=signature, **({"options": sorted(options.items())} if options else {}))
        data = self.store.read(key, EXECUTABLE)
        if data is not None:
            try:
                devices = sorted({d for x in jax.tree.leaves(dynamic) for d in x.devices()}, key=lambda d: d.id)
                compiled = serialize_executable.deserialize_and_load(*pickle.loads(data), execution_devices=devices)
                COUNTS["programs_loaded"] += 1
                return [compiled, False, key]
            except Exception:  # noqa: BLE001 — a corrupt or foreign file: compile again
                COUNTS["rejected"] += 1
                self.store.remove(key, EXECUTABLE)
        data = self.store.read(key, EXPORTED)
        if data is not None:
            try:
                _register_nodes()
                call = self._exported_compiled(export.deserialize(bytearray(data)), options, dynamic)
                COUNTS["programs_loaded"] += 1
                return [call, False, key]
            except Exception:  # noqa: BLE001
                COUNTS["rejected"] += 1
                self.store.remove(key, EXPORTED)
        hits = _cache_hits()
        try:
            compiled = self._named(key, static, options).lower(*dynamic).compile()
        except Exception:  # noqa: BLE001 — the jitted program reports its own errors
            COUNTS["programs_traced"] += 1
            return None
        try:
            if _cache_hits() != hits:  # XLA:CPU re-serializes a cache-loaded executable incompletely
                raise ValueError("loaded from JAX's compilation cache")
            payload = pickle.dumps(serialize_executable.serialize(compiled))
        except Exception:  # noqa: BLE001 — not serializable: keep it as StableHLO
            return self._export(key, dynamic, static, options) or [compiled, False, key]
        if self.store.write(key, EXECUTABLE, payload):
            COUNTS["programs_saved"] += 1
            self.store.remove(key, EXPORTED)
        return [compiled, False, key]

    def _options(self, dynamic, static) -> dict | None:
        """The compiler options `loop.programs` compiles this signature with (per batch size, `loop.ByRows`)."""
        from deepseek_vl_jax.generation import loop

        options = getattr(self.traced, "options", None)
        if options is None:
            return loop.compiler_options()
        return options(*dynamic, *(() if static is None else (static,)))

    def _named(self, key: str, static, options: dict | None):
        """The program jitted under a name unique to its key: JAX's compilation cache holds no other program's
        executable under it, so the compilation is this program's own (see `_cache_hits`)."""
        import hashlib

        import jax

        traced = getattr(self.traced, "__wrapped__", self.traced)  # the function under `loop.programs`' jit: a
        # nested jit cannot carry compiler options, so this one jit takes them

        def program(*args):
            return traced(*args, *(() if static is None else (static,)))

        program.__name__ = program.__qualname__ = f"{self.kind}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        return jax.jit(program, donate_argnums=self.donate, compiler_options=options)

    def _export(self, key, dynamic, static, options: dict | None) -> list | None:
        """Store the program as jax.export StableHLO and call it so; None when it cannot be exported."""
        from jax import export

        _register_nodes()
        try:
            exp = export.export(self._named(key, static, options))(*dynamic)
            payload = bytes(exp.serialize())
            compiled = self._exported_compiled(exp, options, dynamic)
        except Exception:  # noqa: BLE001 — e.g. a tree node jax.export cannot serialize
            return None
        if self.store.write(key, EXPORTED, payload):
            COUNTS["programs_saved"] += 1
            self.store.remove(key, EXECUTABLE)
        return [compiled, False, key]

    def _exported_compiled(self, exp, options: dict | None, dynamic):
        """The exported program compiled for `dynamic`'s signature with `options`: the same kind of executable
        (a `Compiled`) whichever way the program was obtained, so a caller (or test) reads one kind."""
        import jax

        return jax.jit(exp.call, donate_argnums=self.donate, compiler_options=options).lower(*dynamic).compile()


class SplitProgram:
    """A `loop.SplitGenerate` called as stored programs: the stored one-program form (`whole`), or where the
    policy splits a call, the stored prefill and then the stored decode loop."""

    def __init__(self, split, whole: Program, prefill: Program, decode: Program):
        self.split, self.whole, self.prefill, self.decode = split, whole, prefill, decode

    def __call__(self, *args):
        return self.split.run(self.whole, self.prefill, self.decode, *args)


def programs(store: Store, progs: Any, ident: str):
    """`progs` (a `loop.Programs`) with each field called as a stored program."""
    from deepseek_vl_jax.generation import loop

    prefill = Program(store, "prefill", ident, progs.prefill, static=True)
    step = Program(store, "step", ident, progs.step, donate=(1,))
    generate = Program(store, "generate", ident, getattr(progs.generate, "whole", progs.generate), static=True)
    if progs.decode is None or not hasattr(progs.generate, "splits"):
        return loop.Programs(generate=generate, prefill=prefill, step=step)
    decode = Program(store, "decode", ident, progs.decode, donate=(1,))
    return loop.Programs(generate=SplitProgram(progs.generate, generate, prefill, decode), prefill=prefill,
                         step=step, decode=decode)
