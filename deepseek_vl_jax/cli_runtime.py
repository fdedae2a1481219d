"""What every `deepseek-vl-jax` run shares besides errors: JAX's persistent compilation cache and a status line.

The cache is on by default for the CLI, in `$DEEPSEEK_VL_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/deepseek-vl-jax/jax`,
else `~/.cache/deepseek-vl-jax/jax`; `--no-compile-cache` or DEEPSEEK_VL_JAX_COMPILE_CACHE=0 turns it off. A repeat
run then loads its programs from disk instead of compiling them. Under the same switch, `program_store()` keeps
the model's parameter shapes and the exported generation programs in its `programs` subdirectory
(`program_cache`), so a repeat run does not trace the model either. Library users opt in with
`enable_compile_cache()` and `program_cache.ProgramStore`; the library itself never turns them on.
"""

from __future__ import annotations

import os
import sys

CACHE_DIR_ENV = "DEEPSEEK_VL_JAX_CACHE_DIR"
CACHE_SWITCH_ENV = "DEEPSEEK_VL_JAX_COMPILE_CACHE"
HIT_EVENT = "/jax/compilation_cache/cache_hits"
MISS_EVENT = "/jax/compilation_cache/cache_misses"


def default_cache_dir() -> str:
    if os.environ.get(CACHE_DIR_ENV):
        return os.environ[CACHE_DIR_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deepseek-vl-jax", "jax")


def cache_wanted(flag_off: bool = False) -> bool:
    return not flag_off and os.environ.get(CACHE_SWITCH_ENV, "1").lower() not in ("0", "false", "no", "off")


def program_store(flag_off: bool = False):
    """The CLI's `program_cache.ProgramStore` (in `default_cache_dir()/programs`), or None when the cache is off."""
    if not cache_wanted(flag_off):
        return None
    from deepseek_vl_jax.program_cache import ProgramStore

    return ProgramStore(os.path.join(default_cache_dir(), "programs"))


def enable_compile_cache(directory: str | None = None) -> str | None:
    """Point JAX's persistent compilation cache at `directory` (default: `default_cache_dir()`), caching every
    program however small. Returns the directory, or None when it cannot be created (then nothing changes: an
    unwritable cache directory must not stop a run)."""
    import jax

    directory = directory or default_cache_dir()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


class CacheCounter:
    """Counts persistent-cache hits and misses from JAX's monitoring events (while registered)."""

    def __init__(self):
        self.hits = self.misses = 0

    def __call__(self, event: str, **_) -> None:
        if event == HIT_EVENT:
            self.hits += 1
        elif event == MISS_EVENT:
            self.misses += 1

    def register(self) -> "CacheCounter":
        from jax import monitoring

        monitoring.register_event_listener(self)
        return self


class Status:
    """A one-line status on stderr ("loading model ...", "compiling ..."), overwritten in place on a terminal and
    erased before the answer is printed; silent when stderr is not a terminal (logs stay clean)."""

    def __init__(self, stream=None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.shown = 0

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        self.clear()
        self.stream.write(text)
        self.stream.flush()
        self.shown = len(text)

    def clear(self) -> None:
        if self.enabled and self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()
            self.shown = 0
