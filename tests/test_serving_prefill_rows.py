"""The batched prefill: the engine's `chunk` program over R request rows gives a row the same bits (its KV and its
picked token's log-probabilities) for every R the engine runs (2, 4, 8, 16) and whatever the other rows hold (other
requests, padding), on both model types; padding rows write nothing. And through the engine: a request's answer is
the same alone (beside a padding row) as in one batched prefill with 1, 3 or 15 others, or joining while they run."""

import dataclasses
import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_vl_jax.serving import Options, programs
from deepseek_vl_jax.serving.timeline import Timeline

from test_serving_engine import TEXTS, collect, prompt, same


def _random_cache(engine, seed):
    """A cache of the engine's shapes holding random values (a prefix the chunk attends to)."""
    leaves, tree = jax.tree.flatten(engine.programs.init_cache(stacked=engine.params["layers"] is None))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _row(cache, slot):
    axis = 1 if isinstance(cache[0], jax.Array) else 0
    return [np.take(np.asarray(x), slot, axis=axis) for x in jax.tree.leaves(cache)]


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_a_row_gets_the_same_bits_for_any_row_count_and_neighbours(serving_engine, kind):
    engine = serving_engine(kind, 16)
    s, d = engine.shapes, engine.model.config.text.hidden_size
    c, vocab = s.chunk, engine.model.config.text.vocab_size
    assert s.row_buckets == (2, 4, 8, 16)
    rng = np.random.default_rng(0)

    def piece(slot, start, m):
        image = rng.random(m) < 0.5  # image features at some positions, token embeddings at the others
        return slot, rng.integers(3, vocab, m).astype(np.int32), rng.normal(size=(m, d)).astype(np.float32), \
            image, start

    target = piece(5, 2 * c, c - 3)  # the third block of a prompt (attends to 2C cached slots), 3 slots empty
    sampled = programs.SlotParams(*(np.asarray([x], t) for x, t in zip(
        (False, 0.9, 40, 0.9, 7, 0, 0), (bool, np.float32, np.int32, np.float32, np.uint32, np.int32, np.int32))))
    base = _random_cache(engine, 1)
    got = []
    for r in s.row_buckets:
        for neighbours in ("padding", "requests"):
            for at in sorted({0, r - 1}):
                others = [piece(slot, int(rng.integers(0, 4)) * c, int(rng.integers(1, c + 1)))
                          for slot in (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)[:r - 1]]
                rows = others if neighbours == "requests" else [None] * (r - 1)
                rows = rows[:at] + [target] + rows[at:]  # None: a padding row
                for greedy in (True, False):  # the same row greedy and sampled (seed 7)
                    params = engine._slot_params([None] * r)
                    if not greedy:
                        params = jax.tree.map(lambda p, x: np.concatenate([p[:at], x, p[at + 1:]]), params, sampled)
                    cache = jax.tree.map(jnp.copy, base)
                    cache, picked = _call(engine, cache, c, rows, r, params)
                    written = {p[0] for p in rows if p is not None}
                    for slot in range(16):  # padding rows and rows of other slots write nothing
                        if slot not in written:
                            assert all(np.array_equal(a, b) for a, b in zip(_row(base, slot), _row(cache, slot)))
                    got.append((greedy, _row(cache, target[0]), jax.tree.map(lambda x: np.asarray(x)[at], picked)))
    traces, scratch = engine.programs.traces["chunk"], jax.tree.map(jnp.copy, base)
    for r in s.row_buckets:  # the engine's own calls run the programs checked above: nothing new is compiled
        scratch = engine._chunk_call("check", c, [], [], rows=r, cache=scratch)
    assert engine.programs.traces["chunk"] == traces
    for greedy in (True, False):
        runs = [g for g in got if g[0] == greedy]
        kv, pk = runs[0][1], runs[0][2]
        assert not all(np.array_equal(a, b) for a, b in zip(kv, _row(base, target[0])))  # the chunk wrote its KV
        for _, kv2, pk2 in runs[1:]:
            assert all(np.array_equal(a, b) for a, b in zip(kv, kv2))  # bitwise
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pk), jax.tree.leaves(pk2)))


def _call(engine, cache, c, rows, r, params):
    """The chunk program on `cache` over r rows (None: padding), sampled with params [r]."""
    slots = np.full(r, engine.shapes.slots, np.int32)
    ids, im = np.zeros((r, c), np.int32), np.zeros((r, c), bool)
    feats = np.zeros((r, c, engine.model.config.text.hidden_size), np.float32)
    starts, valid = np.zeros(r, np.int32), np.ones(r, np.int32)
    for i, row in enumerate(rows):
        if row is None:
            continue
        slot, pid, pf, pim, start = row
        m = len(pid)
        slots[i], starts[i], valid[i] = slot, start, m
        ids[i, :m], feats[i, :m], im[i, :m] = pid, pf, pim
    arrays = (jnp.asarray(x) for x in (slots, ids, feats, im, starts, valid))  # as the engine passes them
    return engine.programs.chunk(engine.params, cache, *arrays, params)


def test_batched_prefill_alone_or_beside_1_3_15_others_or_joining(serving_engine, serving_models):
    """A greedy and a seeded sampled request answer bitwise the same (tokens, log-probabilities) alone and when a
    burst admits them with 1, 3 or 15 others into one batched prefill (the timeline shows the 2-, 4- and 16-row
    programs ran), or when they join while the others prefill and decode."""
    engine = serving_engine("vl", 16)
    _, _, proc = serving_models("vl")
    mine = [(prompt(proc, [3], "Describe the picture."), Options(max_tokens=9, temperature=0.0, logprobs=True)),
            (prompt(proc, [4], "What is in it?"), Options(max_tokens=9, temperature=0.9, top_k=40, top_p=0.9, seed=5,
                                                          logprobs=True))]
    others = [(prompt(proc, [i % 5] * (1 + i % 2), TEXTS[i % len(TEXTS)]), Options(max_tokens=4 + i % 7,
                                                                                   temperature=0.0))
              for i in range(15)]
    alone = [engine.generate(*r)[0] for r in mine]
    config = engine.config
    engine.config = dataclasses.replace(config, prefix_cache=False)
    engine.timeline = Timeline()
    try:
        for k, (m, with_others) in enumerate([(m, w) for w in (1, 3, 15) for m in range(2)]):
            out = [queue.Queue() for _ in range(1 + with_others)]
            with engine._lock:  # the engine thread sees the whole burst at once: one batched prefill
                engine.submit(*mine[m], out[0].put)
                for i in range(with_others):
                    engine.submit(*others[(i + k) % 15], out[1 + i].put)
            same(alone[m], collect(out[0]))
            for q in out[1:]:
                collect(q)
        kinds = {kind for kind, *_ in engine.timeline.spans}
        for r in (2, 4, 16):
            assert any(kind.startswith(f"prefill_chunk[R={r},") for kind in kinds), (r, kinds)
        for m in range(2):  # joining: the others are admitted first, mine arrives while they prefill or decode
            out = [queue.Queue() for _ in range(16)]
            for i in range(15):
                engine.submit(*others[i], out[1 + i].put)
            threading.Event().wait(0.01 * (1 + m))
            engine.submit(*mine[m], out[0].put)
            same(alone[m], collect(out[0]))
            for q in out[1:]:
                collect(q)
    finally:
        engine.timeline = None
        engine.config = config
    assert engine.state()["running"] == 0
