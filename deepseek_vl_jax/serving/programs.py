"""The engine's jitted programs, each over fixed shapes so a running server compiles a bounded set:

- `encode`: one image -> its features [P, D] (pixel values [1, 3, H, W], and [1, 3, Hh, Wh] for the hybrid model);
- `chunk`: C prompt tokens of each of R requests (R in 2, 4, .., >= B: one program per R and chunk length), each
  written into its slot's cache row at slots [start, start + C) (the rows are gathered to be read; only each row's
  C-slot block is written back; attention reads the rows' 64-slot blocks up to the furthest row's start, not all S
  slots: `block_attention`), and a token picked from each row's last logits (a request's first token, from its
  last chunk); a piece of at most C/4 tokens (the few before or after an image's
  run) runs as a C/4-token chunk, which costs ~1/3 of a full one;
- `decode`: up to N decode steps (N = --decode-steps) over all B slots at once, each slot at its own position, with
  per-slot sampling; eos and the token limit are checked on the device (a finished row masks itself; the loop ends
  early once no row is active), so the host reads N steps' tokens in one copy and admits new requests between calls;
- `save_block` / `load_block`: copy C cache slots of one row out to / back from the prefix cache.

Shapes: B slots (--max-batch), S cache slots per row (--max-seq-len rounded up to a multiple of C, plus C), C the prefill chunk, K kv
heads, H head dim, D hidden size, V vocabulary, L layers. The cache is `kv_cache.init_cache(text, B, S)`: one row per
slot, its tokens contiguous from slot 0 (slot index = position), the layout a ragged/paged attention kernel reads.

Batch invariance by construction: `decode` runs each slot's row through the same fixed-shape step, vmapped (no
reduction crosses slots), in a loop whose every iteration is that same step (a token does not depend on which of the
N iterations computed it), and the prompt is always computed in chunks of at most C tokens whose starts depend only on
the content before them (`caches.boundaries`), so the KV of a prefix is bitwise the same whether it was computed now
or restored from the prefix cache. `chunk` runs one request row's computation for each of its R rows in turn
(`lax.map`), so every dot a row makes has that one row's shapes whatever R is and whatever the other rows hold:
under `vmap` the rows' dots had R * C rows, and XLA:CPU's kernels give a row other bits at other row counts on a
native AVX2 host (CI's AMD EPYC; reproduced under `qemu-x86_64 -cpu EPYC-Rome`), though not on the AVX-512 hosts
measured before (tests/test_serving_prefill_rows.py). A padding row computes nothing (`lax.cond`), so a request
alone runs beside one at no cost; a row reads only its own attention blocks.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_vl_jax import multimodal
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.generation import kv_cache, loop, row_dots, sampling
from deepseek_vl_jax.model import DeepseekVL
from deepseek_vl_jax.quantization import quantized_layers
from deepseek_vl_jax.serving import block_attention

TOP_LOGPROBS = 20  # OpenAI's maximum top_logprobs; always computed, the host keeps what a request asked for
_SAMPLER = sampling.Sampler(do_sample=True, temperature=True, top_k=True, top_p=True)


@struct.dataclass
class SlotParams:
    """Per-slot sampling values [B]: greedy rows take the argmax of the raw logits; the others sample with
    temperature, top-k (V = off) and top-p from the key fold_in(fold_in(key(seed), choice), counter)."""

    greedy: jax.Array  # bool
    temperature: jax.Array  # float32
    top_k: jax.Array  # int32
    top_p: jax.Array  # float32
    seed: jax.Array  # uint32
    choice: jax.Array  # int32
    counter: jax.Array  # int32: index of the token being sampled


@struct.dataclass
class Picked:
    """Per-row results: the token [B], its log-probability [B] and the top log-probabilities [B, TOP_LOGPROBS]."""

    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def _pick_row(logits, greedy, temperature, top_k, top_p, seed, choice, counter) -> Picked:
    """One row: logits [V] -> token, log-probabilities of the raw distribution."""
    logits = logits.astype(jnp.float32)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), choice), counter)
    sp = sampling.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                 repetition_penalty=jnp.float32(1.0))
    token = jax.lax.cond(greedy, lambda: jnp.argmax(logits).astype(jnp.int32),
                         lambda: sampling.sample(_SAMPLER, sp, logits[None], key)[0])
    logprobs = jax.nn.log_softmax(logits)
    top_lp, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    return Picked(token=token, logprob=logprobs[token], top_ids=top_ids.astype(jnp.int32), top_logprobs=top_lp)


@struct.dataclass
class DecodeState:
    """Per-slot decode state [B], kept on the device from one `decode` call to the next: the token to feed, its
    cache slot, the index of the token to sample (the sampler's counter), how many tokens the row may still make, and
    whether it is running."""

    token: jax.Array  # int32
    position: jax.Array  # int32
    counter: jax.Array  # int32
    remaining: jax.Array  # int32
    active: jax.Array  # bool

    @classmethod
    def idle(cls, slots: int) -> "DecodeState":
        z = np.zeros(slots, np.int32)
        return cls(token=z, position=z, counter=z, remaining=z, active=np.zeros(slots, bool))


def pick(logits: jax.Array, p: SlotParams) -> Picked:
    """logits [B, V] -> per-row `Picked` (vmapped: no computation crosses rows)."""
    return jax.vmap(_pick_row)(logits, p.greedy, p.temperature, p.top_k, p.top_p, p.seed, p.choice, p.counter)


def _batch_axis(cache) -> int:
    return 1 if kv_cache.is_stacked(cache) else 0


def _row(cache, slot):
    """One slot's cache row, batch axis kept (size 1)."""
    axis = _batch_axis(cache)
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=axis), cache)


def _put_row(cache, row, slot):
    axis = _batch_axis(cache)
    return jax.tree.map(lambda x, r: jax.lax.dynamic_update_slice_in_dim(x, r, slot, axis=axis), cache, row)


def _length_axes(cache) -> tuple[int, int]:
    """The slot (length) axis of keys and values: k [.., K, S, H], v [.., K, H, S]."""
    k, v = (cache[0], cache[1]) if kv_cache.is_stacked(cache) else cache[0]
    return k.ndim - 2, v.ndim - 1


def _write_blocks(cache, blocks, slots, starts):
    """Write row r's block (blocks: the cache's tree, leaves [R, ...] with C slots on the length axis and no batch
    axis) at slots [starts[r], starts[r] + C) of cache row slots[r]; a row whose slot is out of range (padding,
    slot B) writes nothing. Only the blocks move, not the whole rows."""
    axis = _batch_axis(cache)
    ka, va = _length_axes(cache)

    def put(x, b, length):
        pos = starts[:, None] + jnp.arange(b.shape[length], dtype=starts.dtype)[None]  # [R, C]
        index = tuple(slots[:, None] if d == axis else (pos if d == length else slice(None)) for d in range(x.ndim))
        # the advanced indices (slot, position) are apart: the update's dims are [R, C, the other dims in order]
        return x.at[index].set(jnp.moveaxis(b, length, 1).astype(x.dtype), mode="drop")

    if kv_cache.is_stacked(cache):
        return put(cache[0], blocks[0], ka), put(cache[1], blocks[1], va)
    return tuple((put(k, bk, ka), put(v, bv, va)) for (k, v), (bk, bv) in zip(cache, blocks))


def _decoder(apply, params, embeds, positions, mask, cache, cache_index):
    """The decoder over per-layer weights (CPU) or scanned over the stacked ones (TPU/GPU)."""
    if params["layers"] is None:
        return apply(embeds, positions, mask, cache, cache_index, method="decode")
    return apply(embeds, positions, mask, params["layers"], cache, cache_index, method="decode_layers")


@dataclasses.dataclass(frozen=True)
class Shapes:
    slots: int  # B
    seq_len: int  # S
    chunk: int  # C
    decode_steps: int = 1  # N: decode steps per `decode` call

    @property
    def attention_block(self) -> int:
        """Key slots per block of the programs' attention (`block_attention`): BLOCK, or the largest divisor of S
        below it."""
        return math.gcd(self.seq_len, block_attention.BLOCK)

    @property
    def small_chunk(self) -> int:
        """The chunk for a piece of at most C/4 tokens. Which chunk a piece runs in depends only on its length, which
        depends only on the content before it (`caches.boundaries`): a block's KV is still the same bits wherever it
        is computed."""
        return max(1, self.chunk // 4)

    def chunk_for(self, m: int) -> int:
        """The chunk size a piece of m prompt tokens runs in."""
        return self.small_chunk if m <= self.small_chunk else self.chunk

    @property
    def row_buckets(self) -> tuple[int, ...]:
        """The request-row counts R of the `chunk` programs: 2, 4, ... up to the first power of two >= B (a lone
        request runs beside a padding row, which computes nothing). The rows run in turn, so a row's dots do not
        depend on R; the LM head runs over all the largest bucket's rows at once (a fixed row count)."""
        out = [2]
        while out[-1] < self.slots:
            out.append(out[-1] * 2)
        return tuple(out)

    def rows_for(self, r: int) -> int:
        """The smallest row bucket holding r requests."""
        return next(b for b in self.row_buckets if b >= r)


class Programs:
    """The jitted programs for one model config, mesh and `Shapes`. `traces` counts compilations per program."""

    def __init__(self, config: ModelConfig, mesh: Mesh | None, shapes: Shapes, compiler_options: dict | None = None,
                 blocked: tuple[str, ...] = ("chunk",)):
        """compiler_options: XLA options of the chunk and decode programs; default `loop.compiler_options()` for
        decode, the ones `generate`'s decode compiles with (on CPU: YNNPACK's dot fusion off, 1.7x faster 16-row
        decode steps), and `generate`'s prompt options for the chunk (XLA's defaults: YNNPACK dots on). The chunk
        runs its rows in turn, so its dots have one row's C rows whatever R is, where YNNPACK is the faster
        (benchmarks/serve_chunk_forms.py, results/serve_chunk_forms_in_turn.json, 117M shape, C = 64: 0.60x the
        call time of the rows in turn with YNNPACK off at R = 16, 0.65x at R = 2).
        blocked: the programs ("chunk", "decode") whose attention reads only the cache blocks their rows use
        (`block_attention`); the others attend over all S slots, masked. Default the chunk programs only: on CPU a
        decode step in blocks was slower (each block of a one-query attention is a copied slice;
        benchmarks/serve_block_attention.py)."""
        self.config, self.mesh, self.shapes = config, mesh, shapes
        self.blocked = tuple(blocked)
        self.module = DeepseekVL(config)
        self.traces: collections.Counter = collections.Counter()
        opts = loop.compiler_options() if compiler_options is None else compiler_options
        chunk_opts = loop.compiler_options(prompt=True) if compiler_options is None else compiler_options
        self.encode = jax.jit(self._counted("encode", self._encode))
        self.chunk = jax.jit(self._counted("chunk", self._chunk), donate_argnums=1, compiler_options=chunk_opts)
        self.decode = jax.jit(self._counted("decode", self._decode), donate_argnums=1, compiler_options=opts)
        self.save_block = jax.jit(self._counted("save_block", self._save_block))
        self.load_block = jax.jit(self._counted("load_block", self._load_block), donate_argnums=0)

    def _counted(self, name, fn):
        one_row = self.mesh is None and row_dots.ENABLED

        @functools.wraps(fn)
        def wrapped(*args):
            self.traces[name] += 1
            # QTensor weights compute from them (a no-op for float ones); one-row Dense layers (a 1-slot decode, a
            # 1-token chunk) as `generate`'s do on CPU without a mesh
            with quantized_layers(), row_dots.one_row_dots(one_row):
                return fn(*args)
        return wrapped

    def _attention(self, program: str, starts) -> contextlib.AbstractContextManager:
        """The attention `program` traces with: in blocks up to the furthest of its rows' `starts` [R] (the slot
        each row's new tokens are written at), or the model's own."""
        if program not in self.blocked:
            return contextlib.nullcontext()
        bk = self.shapes.attention_block
        return block_attention.blocked(block_attention.block_count(starts, bk).max(), bk)

    def program_count(self) -> int:
        return sum(self.traces.values())

    def _apply(self, params):
        return functools.partial(self.module.apply, {"params": params["params"]})

    def _constrain(self, cache):
        return kv_cache.constrain_cache(cache, self.mesh, self.config.text)

    def init_cache(self, stacked: bool):
        """Zeros [B, K, S, H] / [B, K, H, S] per layer (or stacked), sharded by the rules table on a mesh."""
        s = self.shapes
        dtype = jnp.dtype(self.config.dtype)
        make = lambda: self._constrain(kv_cache.init_cache(self.config.text, s.slots, s.seq_len, dtype, stacked))
        return jax.jit(make)()

    def _encode(self, params, pixel_values, high_res_pixel_values):
        """pixel_values [1, 3, H, W] -> features [P, D]."""
        return self._apply(params)(pixel_values, high_res_pixel_values, params.get("vision_layers"),
                                   method="encode_images")[0]

    def _chunk_row(self, params, row, ids, feats, is_image, start, n_valid):
        """One request row: ids [C], feats [C, D] (image features where is_image [C]), written at slots
        [start, start + C) of `row` (one slot's cache, no batch axis); the first n_valid tokens are real. Returns
        (hidden state [D] at the last real token, row)."""
        apply = self._apply(params)
        axis = 1 if kv_cache.is_stacked(row) else 0
        row = jax.tree.map(lambda x: jnp.expand_dims(x, axis), row)
        c = ids.shape[0]
        embeds = apply(ids[None], method="embed")
        embeds = jnp.where(is_image[None, :, None], feats[None].astype(embeds.dtype), embeds)
        positions = (start + jnp.arange(c, dtype=jnp.int32))[None]
        key_valid = (jnp.arange(self.shapes.seq_len) < start + n_valid)[None]
        mask = multimodal.cache_mask(key_valid, start, c)
        hidden, row = _decoder(apply, params, embeds, positions, mask, row, start)
        last = jax.lax.dynamic_slice_in_dim(hidden, n_valid - 1, 1, axis=1)
        return last[0, 0], jax.tree.map(lambda x: jnp.squeeze(x, axis), row)

    def _chunk_block(self, params, row, ids, feats, is_image, start, n_valid):
        """`_chunk_row`, returning only the chunk's block of the written row: (hidden [D], per layer (k [K, C, H],
        v [K, H, C]) or stacked)."""
        last, row = self._chunk_row(params, row, ids, feats, is_image, start, n_valid)
        c = ids.shape[0]
        ka, va = _length_axes(row)  # of the row, which has no batch axis
        cut = lambda x, a: jax.lax.dynamic_slice_in_dim(x, start, c, axis=a)
        if kv_cache.is_stacked(row):
            return last, (cut(row[0], ka), cut(row[1], va))
        return last, tuple((cut(k, ka), cut(v, va)) for k, v in row)

    def _chunk(self, params, cache, slots, ids, feats, is_image, starts, n_valid, p: SlotParams):
        """R request rows at once (R in `Shapes.row_buckets`): row r's chunk ids [R, C], feats [R, C, D], is_image
        [R, C] is written at slots [starts[r], starts[r] + C) of cache row slots[r], its first n_valid[r] tokens
        real. A padding row has slot B (out of range: it computes and writes nothing). Returns (cache,
        Picked [R]: a token picked with p from each row's last real logits; a request's last chunk gives its first
        token)."""
        axis, b = _batch_axis(cache), self.shapes.slots

        def one(xs):  # one row, in turn (`lax.map`): every dot has the shapes of one row whatever R is
            slot, start = xs[0], xs[4]

            def run():
                row = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, slot, axis, False), cache)
                return self._chunk_block(params, row, *xs[1:])

            with self._attention("chunk", start[None]):  # the blocks this row reads, not its neighbours'
                skip = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run))
                return jax.lax.cond(slot < b, run, lambda: skip)  # a padding row reads and computes nothing

        last, blocks = jax.lax.map(one, (slots, ids, feats, is_image, starts, n_valid))
        cache = _write_blocks(cache, blocks, slots, starts)
        return self._constrain(cache), self._pick_last(params, last, p)

    def _pick_last(self, params, last, p: SlotParams):
        """Picked [R] from the rows' last hidden states [R, D]. The LM head and the sampler always run over the
        largest bucket's rows (the others padded): their dots take another form for few rows (on CPU, M = 2, 4 and
        M = 8, 16 differ by an ulp at the 117M shape)."""
        r, pad = last.shape[0], self.shapes.row_buckets[-1] - last.shape[0]
        edge = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")
        logits = self._apply(params)(edge(last)[:, None], method="logits")[:, 0]
        return jax.tree.map(lambda x: x[:r], pick(logits, jax.tree.map(edge, p)))

    def _step_row(self, params, row, token, position):
        """One slot: feed `token` at `position` (= its cache slot). row: the slot's cache without the batch axis."""
        apply = self._apply(params)
        axis = 1 if kv_cache.is_stacked(row) else 0
        row = jax.tree.map(lambda x: jnp.expand_dims(x, axis), row)
        key_valid = (jnp.arange(self.shapes.seq_len) <= position)[None]
        mask = multimodal.cache_mask(key_valid, position, 1)
        embeds = apply(token[None, None], method="embed")
        hidden, row = _decoder(apply, params, embeds, position[None, None], mask, row, position)
        return apply(hidden, method="logits")[0, 0], jax.tree.map(lambda x: jnp.squeeze(x, axis), row)

    def _decode(self, params, cache, state: DecodeState, override, fresh: DecodeState, p: SlotParams, eos):
        """Up to N steps over all B slots. state: the previous call's; rows where override [B] take `fresh` (newly
        admitted, or stopped by the host); eos [E] end tokens. Every slot runs each step (an inactive one at the last
        cache slot, which no position reads). Returns (cache, state, Picked [N, B], valid [N, B]: step k made a
        token for row b)."""
        s = self.shapes
        state = jax.tree.map(lambda a, b: jnp.where(override, b, a), state, fresh)
        axis = _batch_axis(cache)
        step = jax.vmap(functools.partial(self._step_row, params), in_axes=(axis, 0, 0), out_axes=(0, axis))
        shape = (s.decode_steps, s.slots)
        out = (Picked(token=jnp.zeros(shape, jnp.int32), logprob=jnp.zeros(shape, jnp.float32),
                      top_ids=jnp.zeros((*shape, TOP_LOGPROBS), jnp.int32),
                      top_logprobs=jnp.zeros((*shape, TOP_LOGPROBS), jnp.float32)), jnp.zeros(shape, bool))

        def body(carry):
            k, cache, st, out = carry
            with self._attention("decode", jnp.where(st.active, st.position, 0)):  # idle rows' blocks: unread
                logits, cache = step(cache, st.token, jnp.where(st.active, st.position, s.seq_len - 1))
            picked = pick(logits, p.replace(counter=st.counter))
            a = st.active
            done = (picked.token[:, None] == eos[None]).any(-1) | (st.remaining <= 1)
            st = DecodeState(token=jnp.where(a, picked.token, st.token), position=st.position + a,
                             counter=st.counter + a, remaining=st.remaining - a, active=a & ~done)
            out = jax.tree.map(lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, k, 0), out, (picked, a))
            return k + 1, self._constrain(cache), st, out

        cond = lambda carry: (carry[0] < s.decode_steps) & carry[2].active.any()
        _, cache, state, (picked, valid) = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, state, out))
        return cache, state, picked, valid

    def _save_block(self, cache, slot, start):
        """Slots [start, start + C) of row `slot`: per layer (k [K, C, H], v [K, H, C]) (or stacked [L, ...])."""
        ka, va = _length_axes(cache)
        axis = _batch_axis(cache)
        row = _row(cache, slot)
        cut = lambda x, a: jnp.squeeze(jax.lax.dynamic_slice_in_dim(x, start, self.shapes.chunk, axis=a), axis)
        if kv_cache.is_stacked(cache):
            return cut(row[0], ka), cut(row[1], va)
        return tuple((cut(k, ka), cut(v, va)) for k, v in row)

    def _load_block(self, cache, block, slot, start):
        """Write a `save_block` result back at slots [start, start + C) of row `slot`."""
        ka, va = _length_axes(cache)
        axis = _batch_axis(cache)
        put = lambda x, b, a: jax.lax.dynamic_update_slice(
            x, jnp.expand_dims(b, axis).astype(x.dtype),
            tuple(slot if d == axis else (start if d == a else 0) for d in range(x.ndim)))
        if kv_cache.is_stacked(cache):
            out = (put(cache[0], block[0], ka), put(cache[1], block[1], va))
        else:
            out = tuple((put(k, bk, ka), put(v, bv, va)) for (k, v), (bk, bv) in zip(cache, block))
        return self._constrain(out)


def chunk_rows(shapes: Shapes, c: int, hidden: int, pieces, rows: int) -> tuple[np.ndarray, ...]:
    """The host arrays of one `chunk` call of c tokens a row over pieces (slot, ids [m], feats [m, D], is_image [m],
    start), m <= c, padded to `rows` rows with padding rows (slot B, one valid token, writing nothing): (slots [R],
    ids [R, c], feats [R, c, D], is_image [R, c], starts [R], n_valid [R])."""
    slots = np.full(rows, shapes.slots, np.int32)
    ids, im = np.zeros((rows, c), np.int32), np.zeros((rows, c), bool)
    feats = np.zeros((rows, c, hidden), np.float32)
    starts, valid = np.zeros(rows, np.int32), np.ones(rows, np.int32)
    for i, (slot, pid, pf, pim, start) in enumerate(pieces):
        m = len(pid)
        slots[i], starts[i], valid[i] = slot, start, m
        ids[i, :m], feats[i, :m], im[i, :m] = pid, pf, pim
    return slots, ids, feats, im, starts, valid


def replicated_put(mesh: Mesh | None, x):
    """Host array -> device (replicated over the mesh)."""
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

