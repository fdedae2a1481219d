"""A per-user cache of what a fresh process would otherwise rebuild on every run: the model's abstract parameters
(shapes and logical axes: `shapes`) and the compiled generation programs, as serialized executables
(`compiled`).

    store = ProgramStore(directory)
    model = load_pretrained(path, abstract_fn=store.abstract_params)
    tokens = generate(model, batch, programs=store.programs)

Entries are keyed by everything they depend on, this package's source included (`store`); a missing, stale or
corrupt entry is made again, and whatever cannot be cached runs as without the cache. The CLI uses it beside
JAX's persistent compilation cache, under the same switch (`cli_runtime`); the library never turns it on.
"""

from __future__ import annotations

import os

from deepseek_vl_jax.program_cache.store import COUNTS, Store, counts

__all__ = ["COUNTS", "ProgramStore", "Store", "counts"]


class ProgramStore:
    """The cache in `directory`: `abstract_params(config)` for `load_pretrained(abstract_fn=)`, and
    `programs(config, sampler, mesh, extras)` for `generate(programs=)`."""

    def __init__(self, directory: str | os.PathLike):
        self.store = Store(directory)
        self._programs: dict = {}

    @property
    def directory(self) -> str:
        return self.store.directory

    def abstract_params(self, config):
        from deepseek_vl_jax.program_cache import shapes

        return shapes.abstract_params(self.store, config)

    def programs(self, config, sampler, mesh, extras):
        """`loop.programs(...)`, called as stored executables (off a mesh; on one: the jitted programs)."""
        from deepseek_vl_jax.generation import loop

        progs = loop.programs(config, sampler, mesh, extras)
        if mesh is not None:
            return progs
        key = (config, sampler, extras)
        if key not in self._programs:
            from deepseek_vl_jax.program_cache import compiled

            self._programs[key] = compiled.programs(self.store, progs, repr(key))
        return self._programs[key]
