"""The serving engine: a fixed pool of decode slots fed by a request queue (continuous batching), on the programs of
`programs.py`. It knows nothing of HTTP: the app (and the tests) submit `Prompt`s with `Options` and receive `Event`s.

One engine thread loops: drop cancelled requests (their slots are free at once), admit waiting requests into free
slots (images encoded or taken from the feature cache), run up to `prefill_budget` tokens of queued prefill chunks
(a prompt's first chunk restores its prefix from the prefix cache, its last picks the first token; requests that
arrive meanwhile are admitted between chunk calls and join them as rows), then dispatch
one `decode` call of up to N steps over all slots and, while it runs, hand each sequence the tokens of the previous
call (pipelined: the decode state stays on the device between calls), and finally put finished answers into the
prefix cache for the chat's next turn. eos, max_tokens and the cache's end stop a row on the device; the host checks
them again (the same rule) and stop strings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import queue
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np

from deepseek_vl_jax import sharding
from deepseek_vl_jax.generation import weights
from deepseek_vl_jax.generation.inputs import resolve_eos
from deepseek_vl_jax.serving import caches, programs, turns
from deepseek_vl_jax.serving.request import Event, Options, Prompt
from deepseek_vl_jax.serving.timeline import Timeline
from deepseek_vl_jax.serving.metrics import Metrics


class QueueFull(Exception):
    """More than `max_queue` requests are waiting."""


class TooLong(ValueError):
    """The prompt plus max_tokens exceeds the model's positions."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # decode slots B
    max_seq_len: int | None = None  # cache slots per row (default: the model's positions), rounded up to the chunk
    prefill_chunk: int = 64  # C: prompt tokens per prefill call; also the prefix cache's largest block
    max_queue: int = 64
    image_cache_bytes: int = 256 << 20
    prefix_cache_bytes: int = 1 << 30
    prefix_cache: bool = True
    cache_answers: bool = True  # at a request's end, prefill its answer as the next turn's prompt holds it (if known)
    # prompt tokens admitted, and prefilled (in chunks), between two decode steps. Large (the default) is prefill-first
    # admission, as vLLM's scheduler: a burst of requests is admitted and prefilled before the next step, so no decode
    # step runs over mostly empty slots (throughput, time to first token) but a running answer waits for the whole
    # burst's prefill (inter-token p99). Small interleaves prefill with decoding: smooth streams, more steps.
    prefill_budget: int = 4096
    # decode steps per program call (N). The host reads N steps' tokens at once and admits new requests (and sees
    # stop strings and cancellations) only between calls: larger N, less per-step host work and dispatch, but a new
    # request waits up to N steps for its prefill and tokens stream N at a time. eos and max_tokens stop a row on
    # the device; a stop string costs up to 2N wasted steps of its row. Answers do not depend on N. Default 1: with
    # the calls pipelined the host work already overlaps the model, and N = 4 or 8 was not measured faster.
    decode_steps: int = 1


@dataclasses.dataclass
class _Sequence:
    request: "_Request"
    choice: int
    slot: int = -1
    tokens: list = dataclasses.field(default_factory=list)
    emitted: str = ""
    position: int = 0  # the cache slot the last token will be fed at
    next_block: int = -1  # prefill: the next chunk to run (-1: not started)
    hit: int = 0  # prefill: blocks restored from the prefix cache
    on_device: bool = False  # decoding: its row of the device's DecodeState is this sequence's
    last_time: float = 0.0
    finish: str | None = None


@dataclasses.dataclass
class _Request:
    id: int
    prompt: Prompt
    options: Options
    sink: Callable[[Event], None]
    limit: int  # max tokens per choice
    seed: int
    arrival: float
    cancelled: bool = False
    sequences: list = dataclasses.field(default_factory=list)
    content: tuple = ()  # set at admission: (image hashes, image runs, features [n, D], is_image [n])
    blocks: tuple = ()  # set at admission: (prefill chunk boundaries, prefix-cache keys of the complete blocks)


class Engine:
    """Continuous batching over `config.max_batch` slots. `start()` runs the engine thread; `submit` queues a
    request; `cancel` drops one; `generate` is the blocking convenience the tests and benchmarks use."""

    def __init__(self, model, processor, config: EngineConfig = EngineConfig(), eos_token_ids: Sequence[int] = ()):
        self.model, self.processor, self.config = model, processor, config
        c = model.config
        chunk = config.prefill_chunk
        positions = c.text.max_position_embeddings
        seq = -(-(config.max_seq_len or positions) // chunk) * chunk
        self.max_positions = min(seq, positions)  # prompt + generated tokens
        seq += chunk  # room for the last prefill chunk's C slots
        self.shapes = programs.Shapes(slots=config.max_batch, seq_len=seq, chunk=chunk,
                                      decode_steps=config.decode_steps)
        self.programs = programs.Programs(c, model.mesh, self.shapes)
        self.params = weights.generation_params(model)
        eos = set(eos_token_ids) | set(resolve_eos(None, c.text.eos_token_id))
        if getattr(processor, "eos_token_id", None) is not None:
            eos.add(processor.eos_token_id)
        self.eos = frozenset(eos)
        self._eos = np.array(sorted(eos) or [-1], np.int32)
        self.tokens_per_image = c.num_image_tokens
        self.metrics = Metrics()
        self.image_cache = caches.ImageFeatureCache(config.image_cache_bytes)
        self.prefix_cache = caches.PrefixCache(config.prefix_cache_bytes)
        with self._mesh():
            self.cache = self.programs.init_cache(stacked=self.params["layers"] is None)
        self.slots: list[_Sequence | None] = [None] * config.max_batch
        self._state = programs.DecodeState.idle(config.max_batch)  # the device's, as the last `decode` call left it
        self._inflight: list[tuple] = []  # dispatched `decode` calls not read yet: (picked, valid, row -> sequence)
        self._answers: list[_Sequence] = []  # finished, their slots held until their answer's KV is cached
        self._prefilling: list[_Sequence] = []  # admitted, prompt not fully prefilled yet (first come first served)
        self._admit_budget = 0  # prompt tokens the current step may still admit
        self.waiting: list[_Request] = []
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None
        self.timeline: Timeline | None = None  # attach one to measure where the time goes (see timeline.py)

    # ------------------------------------------------------------------------------------------------ public API
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dsvl-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self, prompt: Prompt, options: Options) -> int:
        """Raise ValueError if the request cannot run; return its per-choice token limit."""
        n = len(prompt.ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        runs = caches.image_runs(prompt.ids, self.model.config.image_token_id, self.tokens_per_image)
        if len(runs) != len(prompt.images):
            raise ValueError(f"the prompt has {len(runs)} image token runs but {len(prompt.images)} images")
        if options.n > self.config.max_batch:
            raise ValueError(f"n={options.n} is more than the server's {self.config.max_batch} slots")
        room = self.max_positions - n
        if options.max_tokens is not None and n + options.max_tokens > self.max_positions:
            raise TooLong(f"the prompt has {n} tokens and max_tokens is {options.max_tokens}: {n} + "
                             f"{options.max_tokens} = {n + options.max_tokens} exceeds the model's "
                             f"{self.max_positions} positions")
        if room < 1:
            raise TooLong(f"the prompt has {n} tokens, which leaves no room in the model's {self.max_positions} "
                             f"positions")
        return room if options.max_tokens is None else options.max_tokens

    def submit(self, prompt: Prompt, options: Options, sink: Callable[[Event], None]) -> int:
        """Queue a request; `sink` gets its events (from the engine thread). Raises ValueError (bad request) or
        QueueFull. Returns the request id."""
        limit = self.check(prompt, options)
        seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "little")
        with self._lock:
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            request = _Request(next(self._ids), prompt, options, sink, limit, seed % (1 << 32), time.monotonic())
            request.sequences = [_Sequence(request, i) for i in range(options.n)]
            self.waiting.append(request)
            self.metrics.queue_depth.set(len(self.waiting))
            self._lock.notify_all()
        return request.id

    def cancel(self, request_id: int) -> None:
        """Drop a request (waiting or running); its slots are freed before the next step."""
        with self._lock:
            for r in self.waiting:
                if r.id == request_id:
                    r.cancelled = True
            for s in self.slots:  # a request whose answers are all out is not cancelled (its KV is being cached)
                if s is not None and s.request.id == request_id and s.finish is None:
                    s.request.cancelled = True
            self._lock.notify_all()

    def state(self) -> dict:
        with self._lock:
            return {"running": sum(s is not None and s.finish is None for s in self.slots),
                    "finishing": sum(s is not None and s.finish is not None for s in self.slots),
                    "waiting": len(self.waiting),
                    "slots": self.config.max_batch, "programs": self.programs.program_count(),
                    "prefix_blocks": len(self.prefix_cache), "images_cached": len(self.image_cache)}

    def generate(self, prompt: Prompt, options: Options = Options(), timeout: float = 600.0) -> list[dict]:
        """Blocking: run one request, return per choice {"text", "tokens", "logprobs", "finish_reason"}."""
        events: queue.Queue = queue.Queue()
        self.submit(prompt, options, events.put)
        out = [{"text": "", "tokens": [], "logprobs": [], "finish_reason": None} for _ in range(options.n)]
        while any(o["finish_reason"] is None for o in out):
            e = events.get(timeout=timeout)
            o = out[e.choice]
            o["text"] += e.text
            o["tokens"] += e.tokens
            o["logprobs"] += e.logprobs or []
            o["finish_reason"] = e.finish_reason
        return out

    def warmup(self) -> int:
        """Compile every program (a dummy request through prefill, a step and the prefix cache); returns the
        number of programs compiled. Starts the engine thread."""
        self.start()
        c = self.model.config
        p = self.tokens_per_image
        ids = np.full(self.shapes.chunk + 1 + p, 1 if c.image_token_id != 1 else 2, np.int32)
        ids[1:1 + p] = c.image_token_id
        v = c.vision
        pix = np.zeros((v.num_channels, v.image_size, v.image_size), np.float32)
        high = None
        if c.is_hybrid:
            h = c.high_res
            high = np.zeros((h.num_channels, h.image_size, h.image_size), np.float32)
        prompt = Prompt(ids, [(pix, high)])
        for _ in range(2):  # the second run restores the first's prefix block
            self.generate(prompt, Options(max_tokens=2, temperature=0.0))
        self.generate(prompt, Options(max_tokens=2, temperature=0.8, top_k=3, top_p=0.9, seed=0))
        with self._mesh():  # every (rows, chunk) program, on a scratch cache (the engine thread owns self.cache)
            scratch = self.programs.init_cache(stacked=self.params["layers"] is None)
            for r in self.shapes.row_buckets:
                for chunk in sorted({self.shapes.chunk, self.shapes.small_chunk}):
                    scratch = self._chunk_call("warmup", chunk, [], [], rows=r, cache=scratch)
            del scratch
        self.image_cache.entries.clear()
        self.image_cache.bytes = 0
        self.prefix_cache.entries.clear()
        self.prefix_cache.bytes = 0
        return self.programs.program_count()

    # ------------------------------------------------------------------------------------------------ the loop
    def _mesh(self) -> contextlib.AbstractContextManager:
        """`jax.set_mesh` + the logical axis rules (the model's activation constraints), or nothing off a mesh."""
        stack = contextlib.ExitStack()
        if self.model.mesh is not None:
            stack.enter_context(jax.set_mesh(self.model.mesh))
            stack.enter_context(sharding.axis_rules(self.model.mesh))
        return stack

    def _span(self, kind: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.timeline is None else self.timeline.span(kind)

    def _call(self, kind: str, fn, *args):
        """A program call; with a timeline, timed to its result."""
        return fn(*args) if self.timeline is None else self.timeline.run(kind, fn, *args)

    def _run(self) -> None:
        try:
            with self._mesh():
                while True:
                    with self._lock:
                        with self._span("idle"):
                            while not self._stop and not self.waiting and not self._inflight and \
                                all(s is None for s in self.slots):
                                self._lock.wait(0.5)
                        if self._stop:
                            return
                        self._drop_cancelled()
                        self._admit_budget = self.config.prefill_budget
                        admit = self._take_admissible()
                    for request in admit:
                        self._admit(request)
                    self._prefill(self.config.prefill_budget)
                    if any(self._running(s) for s in self.slots):
                        self._dispatch()  # the next N steps, before reading the previous call's tokens
                    if len(self._inflight) > 1 or (self._inflight and not any(map(self._running, self.slots))):
                        self._read(*self._inflight.pop(0))
                    if self._answers and self._answers_due():
                        self._cache_answers()
        except BaseException as e:  # noqa: BLE001 - reported to every waiting client, then re-raised in the thread
            self.error = e
            with self._lock:
                for s in [s for s in self.slots if s is not None and s.finish is None] + \
                        [q for r in self.waiting for q in r.sequences]:
                    s.request.sink(Event(s.choice, "", [], None, "error"))
            raise

    def _drop_cancelled(self) -> None:
        self.waiting = [r for r in self.waiting if not r.cancelled]
        self._prefilling = [q for q in self._prefilling if not q.request.cancelled]
        for i, s in enumerate(self.slots):
            if s is not None and s.request.cancelled:
                self.slots[i] = None
        self._update_gauges()

    def _take_admissible(self, first: bool = True) -> list[_Request]:
        """Take waiting requests (first come first served) while slots are free and their prompts fit what is left
        of the step's admission budget, `_admit_budget` (`first`: the first one whatever its length)."""
        free = sum(s is None for s in self.slots)
        taken = []
        while self.waiting and self.waiting[0].options.n <= free and ((first and not taken) or self._admit_budget > 0):
            r = self.waiting.pop(0)
            free -= r.options.n
            self._admit_budget -= len(r.prompt.ids) * r.options.n
            taken.append(r)
            for seq in r.sequences:  # reserve the slots now so `state()` sees them as running
                seq.slot = self.slots.index(None)
                self.slots[seq.slot] = seq
        self._update_gauges()
        return taken

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.running_slots.set(sum(s is not None and s.finish is None for s in self.slots))

    def _features(self, image: tuple[np.ndarray, np.ndarray | None]) -> tuple[str, np.ndarray]:
        with self._span("image_hash"):
            key = caches.pixel_hash(*image)
        feats = self.image_cache.get(key)
        if feats is not None:
            self.metrics.image_hits.inc()
            return key, feats
        pix, high = image
        put = lambda x: None if x is None else programs.replicated_put(self.model.mesh, np.asarray(x, np.float32)[None])
        feats = np.asarray(self._call("encode", self.programs.encode, self.params, put(pix), put(high)))
        self.metrics.images_encoded.inc()
        self.image_cache.put(key, feats)
        return key, feats

    def _admit(self, request: _Request) -> None:
        """Encode (or look up) the request's images and queue its sequences for prefill."""
        prompt, c = request.prompt, self.shapes.chunk
        hashes, feats = zip(*(self._features(im) for im in prompt.images)) if prompt.images else ((), ())
        runs = caches.image_runs(prompt.ids, self.model.config.image_token_id, self.tokens_per_image)
        n = len(prompt.ids)
        bounds = caches.boundaries(n, runs, c)
        keys = caches.block_keys(prompt.ids, hashes, runs, bounds) if self.config.prefix_cache else []
        slab = np.zeros((n, self.model.config.text.hidden_size), np.float32)
        for (s, e), f in zip(runs, feats):
            slab[s:e] = f
        is_image = np.zeros(n, bool)
        for s, e in runs:
            is_image[s:e] = True
        request.content = (hashes, runs, slab, is_image)
        request.blocks = (bounds, keys)
        self.metrics.prompt_tokens.inc(n * len(request.sequences))
        self._prefilling.extend(request.sequences)

    def _prefill(self, budget: int) -> None:
        """Run queued prefill chunks until `budget` prompt tokens ran (then the decode step runs, so a long prompt
        does not stall the running sequences). One `chunk` call runs the next block of up to R sequences: the first
        queued one's and those of the sequences after it (first come first served) whose block runs in the same
        chunk length. A sequence's first chunk restores the longest cached prefix (which the sequences before it may
        just have saved); its last gives its first token. Requests that arrived during a chunk call are admitted
        before the next (within what is left of the step's admission budget), so that a burst arriving while the first
        of it prefills joins that request's remaining chunks as rows of the same calls."""
        first = True
        while budget > 0:
            if not first and self.waiting and self._admit_budget > 0:
                with self._lock:
                    self._drop_cancelled()
                    admit = self._take_admissible(first=False)
                for request in admit:
                    self._admit(request)
            first = False
            self._prefilling = [q for q in self._prefilling if not q.request.cancelled]  # slots freed already
            if not self._prefilling:
                return
            group, pieces, length = [], [], None
            for seq in self._prefilling:
                if len(group) == self.shapes.row_buckets[-1]:
                    break
                if seq.next_block < 0:
                    self._restore(seq)
                c, piece = self._piece(seq.slot, seq.request.prompt.ids, *seq.request.content[2:],
                                       seq.request.blocks[0], seq.next_block)
                if length in (None, c):
                    length = c
                    group.append(seq)
                    pieces.append(piece)
            picked = self._chunk_call(f"prefill_chunk[R={self.shapes.rows_for(len(group))},C={length}]", length,
                                      pieces, group)
            budget -= sum(len(p[1]) for p in pieces)
            done = []
            for row, seq in enumerate(group):
                seq.next_block += 1
                if seq.next_block == len(seq.request.blocks[0]) - 1:
                    done.append(row)
            if not done:
                continue
            for row in done:
                seq = group[row]
                self._prefilling.remove(seq)
                bounds, keys = seq.request.blocks
                for j in range(seq.hit, len(keys)):
                    if keys[j] not in self.prefix_cache:
                        self.prefix_cache.put(keys[j], self._call("save_block", self.programs.save_block, self.cache,
                                                                  np.int32(seq.slot), np.int32(bounds[j])))
                seq.position = len(seq.request.prompt.ids)
            picked = jax.device_get(picked)
            with self._lock, self._span("emit"):
                self._emit([group[r] for r in done], picked, rows=done)

    def _restore(self, seq: _Sequence) -> None:
        """A sequence's first prefill step: load the longest cached prefix of its prompt into its row."""
        req = seq.request
        n, (_, runs, _, _), (bounds, keys) = len(req.prompt.ids), req.content, req.blocks
        hit = self.prefix_cache.longest_hit(keys, bounds, n, runs) if keys else 0
        for j in range(hit):  # in order: each block's C slots overwrite the previous one's unused tail
            block = self.prefix_cache.get(keys[j])
            self.cache = self._call("load_block", self.programs.load_block, self.cache, block, np.int32(seq.slot),
                                    np.int32(bounds[j]))
        if hit:
            self.metrics.prefix_hits.inc()
            self.metrics.prefix_hit_tokens.inc(bounds[hit])
        self.metrics.prefill_tokens.inc(n - bounds[hit])
        seq.hit = seq.next_block = hit

    def _piece(self, slot: int, ids: np.ndarray, slab: np.ndarray, is_image: np.ndarray, bounds, j: int):
        """Block [bounds[j], bounds[j + 1]) of ids [n] (features slab [n, D], is_image [n]) for row `slot`: (its
        chunk length, (slot, ids [m], feats [m, D], is_image [m], start))."""
        start = bounds[j]
        end = min(bounds[j + 1], len(ids))
        return (self.shapes.chunk_for(end - start),
                (slot, ids[start:end], slab[start:end], is_image[start:end], start))

    def _chunk_call(self, kind: str, c: int, pieces: list, seqs: Sequence[_Sequence | None], rows: int = 0,
                    cache=None):
        """One `chunk` call of c tokens a row over pieces (slot, ids [m], feats [m, D], is_image [m], start), padded
        to the row bucket (or `rows`) with rows that write nothing; seqs[i] samples row i's token. Updates
        `self.cache` (or runs on and returns `cache`); returns the device's `Picked` [R]."""
        r = rows or self.shapes.rows_for(len(pieces))
        arrays = programs.chunk_rows(self.shapes, c, self.model.config.text.hidden_size, pieces, r)
        params = self._slot_params(list(seqs) + [None] * (r - len(seqs)))
        out, picked = self._call(kind, self.programs.chunk, self.params, self.cache if cache is None else cache,
                                 *(programs.replicated_put(self.model.mesh, x) for x in arrays), params)
        if cache is not None:
            return out
        self.cache = out
        return picked

    def _answers_due(self) -> bool:
        """Answer caching is background work: it runs when nothing is being decoded or prefilled, or when a waiting
        request needs a slot that only a finished answer holds."""
        with self._lock:
            busy = self._prefilling or any(s is not None and s.finish is None for s in self.slots)
            starved = self.waiting and self.waiting[0].options.n > sum(s is None for s in self.slots)
            return not busy or bool(starved)

    def _cache_answers(self) -> None:
        """Put each finished sequence's answer into the prefix cache as the next turn's prompt will hold it, then
        free its slot. The blocks from the one holding the prompt's end are prefilled again as the next turn's
        prompt (not the decode steps' entries: a chunk rounds differently), so a hit equals a cold prefill."""
        while self._answers:
            s = self._answers.pop(0)
            req, c = s.request, self.shapes.chunk
            if not req.cancelled:
                try:
                    ids = np.asarray(req.prompt.next_turn(s.emitted), np.int32)[:self.max_positions]
                except Exception:  # noqa: BLE001 - a processor that cannot render the turn: nothing to cache
                    ids = req.prompt.ids
                hashes, runs, slab, is_image = req.content
                bounds = caches.boundaries(len(ids), runs, c)
                blocks = turns.answer_blocks(req.prompt.ids, ids, bounds, self.model.config.image_token_id)
                if blocks:
                    extra = len(ids) - len(slab)
                    slab = np.concatenate([slab, np.zeros((extra, slab.shape[1]), slab.dtype)])
                    is_image = np.concatenate([is_image, np.zeros(extra, bool)])
                    for j in blocks:  # in order: each block attends to the ones before it
                        c, piece = self._piece(s.slot, ids, slab, is_image, bounds, j)
                        self._chunk_call("answer_chunk", c, [piece], [None])
                    keys = caches.block_keys(ids, hashes, runs, bounds)
                    for j in blocks:
                        if keys[j] not in self.prefix_cache:
                            self.prefix_cache.put(keys[j], self._call("save_block", self.programs.save_block,
                                                                      self.cache, np.int32(s.slot),
                                                                      np.int32(bounds[j])))
                            self.metrics.answer_blocks.inc()
            with self._lock:
                if self.slots[s.slot] is s:
                    self.slots[s.slot] = None
                self._update_gauges()

    def _slot_params(self, seqs: Sequence[_Sequence | None]) -> programs.SlotParams:
        vocab = self.model.config.text.vocab_size
        rows = []
        for s in seqs:
            if s is None:
                rows.append((True, 1.0, vocab, 1.0, 0, 0, 0))
                continue
            o = s.request.options
            greedy = o.temperature == 0.0
            rows.append((greedy, 1.0 if greedy else o.temperature, o.top_k if o.top_k > 0 else vocab, o.top_p,
                         s.request.seed, s.choice, len(s.tokens)))
        g, t, k, p, seed, ch, cnt = zip(*rows)
        return programs.SlotParams(greedy=np.array(g), temperature=np.array(t, np.float32),
                                   top_k=np.array(k, np.int32), top_p=np.array(p, np.float32),
                                   seed=np.array(seed, np.uint32), choice=np.array(ch, np.int32),
                                   counter=np.array(cnt, np.int32))

    @staticmethod
    def _running(s: _Sequence | None) -> bool:
        return s is not None and bool(s.tokens) and s.finish is None and not s.request.cancelled

    def _dispatch(self) -> None:
        """Queue one `decode` call (N steps). A sequence new to decoding gets its row of the state from the host (its last
        token, position, count and limit); a row whose sequence ended on the host (a stop string, a cancellation, a
        freed slot) is switched off; the others continue from the device's state."""
        seqs = [s if self._running(s) else None for s in self.slots]
        override = np.zeros(len(seqs), bool)
        fresh = [np.zeros(len(seqs), np.int32) for _ in range(4)] + [np.zeros(len(seqs), bool)]
        for i, s in enumerate(seqs):
            if s is None or not s.on_device:
                override[i] = True
            if s is not None and not s.on_device:
                left = min(s.request.limit - len(s.tokens), self.max_positions - s.position)
                for a, v in zip(fresh, (s.tokens[-1], s.position, len(s.tokens), left, True)):
                    a[i] = v
                s.on_device = True
        fresh = programs.DecodeState(*fresh)
        self.cache, self._state, picked, valid = self._call(
            "decode", self.programs.decode, self.params, self.cache, self._state, override, fresh,
            self._slot_params(seqs), self._eos)
        self._inflight.append((picked, valid, seqs))

    def _read(self, picked: programs.Picked, valid, seqs: list[_Sequence | None]) -> None:
        """Hand each sequence of a `decode` call its tokens, step by step (one device-to-host copy per call)."""
        with self._span("read"):
            picked, valid = jax.device_get((picked, valid))
        with self._lock, self._span("emit"):
            for k in range(valid.shape[0]):
                live = [s for i, s in enumerate(seqs) if s is not None and valid[k, i] and self._running(s)]
                if not live:
                    continue
                for s in live:
                    s.position += 1
                self._emit(live, jax.tree.map(lambda x: x[k], picked), rows=[s.slot for s in live])

    def _emit(self, seqs: list[_Sequence], picked: programs.Picked, rows: list[int] | None = None) -> None:
        """Append each sequence's new token, check its stop conditions, send its event; free finished slots."""
        now = time.monotonic()
        rows = rows if rows is not None else list(range(len(seqs)))
        for s, r in zip(seqs, rows):
            req, o = s.request, s.request.options
            if req.cancelled:
                continue
            token = int(picked.token[r])
            s.tokens.append(token)
            if len(s.tokens) == 1:
                self.metrics.ttft.observe(now - req.arrival)
            else:
                self.metrics.itl.observe(now - s.last_time)
            s.last_time = now
            finish = None
            if token in self.eos:
                finish = "stop"
            elif len(s.tokens) >= req.limit or s.position >= self.max_positions:
                finish = "length"
            text, stopped = self._text(s, finish is not None)
            finish = "stop" if stopped else finish
            lp = None
            if o.logprobs:
                lp = [self._logprob_entry(token, float(picked.logprob[r]), picked.top_ids[r],
                                          picked.top_logprobs[r], o.top_logprobs)]
            s.finish = finish
            req.sink(Event(s.choice, text, [token], lp, finish))
            if finish is not None:
                self.metrics.requests.labels(finish).inc()
                if self.config.prefix_cache and self.config.cache_answers and req.prompt.next_turn is not None:
                    self._answers.append(s)  # the slot is freed once the answer's KV is cached
                elif self.slots[s.slot] is s:
                    self.slots[s.slot] = None
        self.metrics.tokens(len(seqs))
        self._update_gauges()

    def _text(self, s: _Sequence, final: bool) -> tuple[str, bool]:
        """The new text of a sequence (held back while a stop string or a UTF-8 character may be incomplete) and
        whether a stop string ended it."""
        ids = [t for t in s.tokens if t not in self.eos]
        full = self.processor.decode(ids, skip_special_tokens=True)
        stops = s.request.options.stop
        stopped = False
        if stops:
            begin = max(0, len(s.emitted) - max(map(len, stops)))
            hits = [i for i in (full.find(x, begin) for x in stops) if i >= 0]
            if hits:
                full, stopped, final = full[:min(hits)], True, True
        safe = full
        if not final:
            hold = max((len(x) - 1 for x in stops), default=0)
            safe = full[:len(full) - hold] if hold else full
            safe = safe.rstrip("\ufffd")
        if not safe.startswith(s.emitted):
            return "", stopped
        delta = safe[len(s.emitted):]
        s.emitted = safe
        return delta, stopped

    def _logprob_entry(self, token: int, logprob: float, top_ids, top_lps, k: int) -> dict:
        def entry(t, lp):
            text = self.processor.decode([int(t)])
            return {"token": text, "logprob": float(lp), "bytes": list(text.encode("utf-8"))}
        return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in zip(top_ids[:k], top_lps[:k])]}
