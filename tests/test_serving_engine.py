"""The engine without HTTP: batch invariance (a request's tokens and log-probabilities are the same alone, beside 15
others, joining mid-way, and through the prefix cache; seeded sampling too), the image-aware prefix cache (the next
turn of a chat reuses the first turn's blocks, the same text with another image reuses nothing past the text before
the image), a bounded program count, and tensor-parallel serving on the 8-device mesh equal to one device."""

import dataclasses
import queue
import threading
import time

import numpy as np
import pytest

from deepseek_vl_jax.serving import Engine, Options, Prompt, caches, turns
from deepseek_vl_jax.serving.caches import image_runs
from deepseek_vl_jax.serving.metrics import read

import serving_fixtures as S

TEXTS = ["Describe the picture.", "What is in it?", "Tell me a long story about the colours you see here.",
         "Hi", "Count the objects, then name each one of them in order."]


def prompt(proc, images, text, history=()):
    content = [*({"type": "image", "image": S.pil_image(s)} for s in images), {"type": "text", "text": text}]
    return Prompt.from_batch(proc([*history, {"role": "user", "content": content}], add_generation_prompt=True))


def requests(proc):
    """16 different requests: 0, 1 or 2 images, different texts and max_tokens; two of them sampled with a seed."""
    out = []
    for i in range(16):
        images = [(i * 7 + k) % 5 for k in range(i % 3)]
        opts = Options(max_tokens=6 + (i * 5) % 17, temperature=0.0, logprobs=True)
        if i in (3, 10):
            opts = Options(max_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=100 + i, logprobs=True)
        out.append((prompt(proc, images, TEXTS[i % len(TEXTS)]), opts))
    return out


def run_concurrently(engine, reqs, stagger):
    """Submit from 16 threads; request i waits stagger[i] seconds first (so some join mid-way)."""
    results = [None] * len(reqs)

    def client(i):
        time.sleep(stagger[i])
        results[i] = engine.generate(*reqs[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def same(a, b):
    assert a["tokens"] == b["tokens"] and a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
    assert [x["logprob"] for x in a["logprobs"]] == [x["logprob"] for x in b["logprobs"]]  # bitwise


def test_batch_invariance_cold_and_warm_prefix_cache(serving_engine, serving_models):
    engine = serving_engine("vl", 16)
    _, _, proc = serving_models("vl")
    reqs = requests(proc)
    programs = engine.warmup()  # compiles every program (and empties the caches)
    assert programs == 12, engine.programs.traces  # encode, C and C/4 chunks of 2, 4, 8, 16 rows, decode, save, load
    alone = []
    for r in reqs:  # one at a time, each into an otherwise idle engine (and no prefix cache hits beyond its own)
        engine.prefix_cache.entries.clear()
        engine.prefix_cache.bytes = 0
        alone.append(engine.generate(*r)[0])
    assert len({tuple(a["tokens"]) for a in alone}) > 8  # the requests really differ
    engine.prefix_cache.entries.clear()
    engine.prefix_cache.bytes = 0
    hits = read(engine.metrics.render().decode(), "dsvl_prefix_cache_hit_tokens")
    stagger = [0.0] * 8 + [0.02 * k for k in range(1, 9)]  # half arrive while the others decode
    for together in (run_concurrently(engine, reqs, stagger), run_concurrently(engine, reqs, stagger[::-1])):
        for a, t in zip(alone, together):
            same(a, t[0])
    # the second concurrent round ran with the prefix cache warm from the first
    assert read(engine.metrics.render().decode(), "dsvl_prefix_cache_hit_tokens") > hits
    assert engine.programs.program_count() == programs  # no new compilation for any length or image count
    assert engine.state()["running"] == 0


def test_prefix_cache_second_turn_and_other_image(serving_engine, serving_models):
    engine = serving_engine("vl", 16)
    _, _, proc = serving_models("vl")
    first = prompt(proc, [1], "Describe the picture.")
    answer = engine.generate(first, Options(max_tokens=8, temperature=0.0))[0]["text"]
    history = [{"role": "user", "content": [{"type": "image", "image": S.pil_image(1)},
                                            {"type": "text", "text": "Describe the picture."}]},
               {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    second = prompt(proc, [], "And what else?", history)
    second.images = first.images

    def counters():
        text = engine.metrics.render().decode()
        return {k: read(text, f"dsvl_{k}") for k in ("prefix_cache_hits", "prefix_cache_hit_tokens",
                                                      "prefill_tokens", "image_cache_hits", "images_encoded")}

    before = counters()
    got = engine.generate(second, Options(max_tokens=8, temperature=0.0, logprobs=True))[0]
    after = counters()
    reused = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    assert after["prefix_cache_hits"] == before["prefix_cache_hits"] + 1
    assert reused >= len(first.ids) - 16  # all of the first turn's full blocks
    assert after["prefill_tokens"] - before["prefill_tokens"] == len(second.ids) - reused
    assert after["images_encoded"] == before["images_encoded"]  # the image's features came from the cache
    # the same answer as without the cache
    engine.prefix_cache.entries.clear()
    engine.prefix_cache.bytes = 0
    same(got, engine.generate(second, Options(max_tokens=8, temperature=0.0, logprobs=True))[0])
    # same text, another image: only the blocks before the image's token run can be shared
    engine.generate(first, Options(max_tokens=2, temperature=0.0))
    other = prompt(proc, [4], "Describe the picture.")
    np.testing.assert_array_equal(other.ids, first.ids)  # same token ids, only the pixels differ
    start = image_runs(other.ids, engine.model.config.image_token_id, engine.tokens_per_image)[0][0]
    before = counters()
    got = engine.generate(other, Options(max_tokens=8, temperature=0.0, logprobs=True))[0]
    after = counters()
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] <= start
    engine.prefix_cache.entries.clear()
    engine.prefix_cache.bytes = 0
    same(got, engine.generate(other, Options(max_tokens=8, temperature=0.0, logprobs=True))[0])


def test_next_turn_reuses_the_answer(serving_engine, serving_models):
    """A request built with `Prompt.from_chat` caches its answer's KV at its end: the next turn (the answer rendered
    by the chat template, then a new message) prefills only what follows the last complete block of the answer,
    counted by /metrics, and answers exactly as with the caches emptied."""
    engine = serving_engine("vl", 16)
    _, _, proc = serving_models("vl")
    c = engine.shapes.chunk
    user = {"role": "user", "content": [{"type": "image", "image": S.pil_image(3)},
                                        {"type": "text", "text": "Describe the picture."}]}
    first = Prompt.from_chat(proc, [user])
    metric = lambda name: read(engine.metrics.render().decode(), f"dsvl_{name}")
    blocks = metric("answer_blocks_cached")
    answer = engine.generate(first, Options(max_tokens=40, temperature=0.0))[0]
    deadline = time.monotonic() + 30
    while engine.state()["finishing"] and time.monotonic() < deadline:  # the answer's KV is cached after its end
        time.sleep(0.01)
    assert engine.state()["finishing"] == 0 and engine.state()["running"] == 0
    assert metric("answer_blocks_cached") > blocks
    history = [user, {"role": "assistant", "content": [{"type": "text", "text": answer["text"]}]}]
    second = Prompt.from_chat(proc, [*history, {"role": "user", "content": [{"type": "text", "text": "And else?"}]}])
    turn = turns.next_turn_ids(proc, [user], answer["text"])
    np.testing.assert_array_equal(second.ids[:len(turn)], turn)  # the next prompt starts as predicted
    assert len(turn) >= len(first.ids) + c  # the answer fills at least one more block
    before = (metric("prefix_cache_hit_tokens"), metric("prefill_tokens"))
    got = engine.generate(second, Options(max_tokens=8, temperature=0.0, logprobs=True))[0]
    reused = metric("prefix_cache_hit_tokens") - before[0]
    assert reused > len(first.ids)  # past the first prompt: the answer's blocks were hit
    assert reused >= len(turn) - c  # everything but the answer's last partial block
    assert metric("prefill_tokens") - before[1] == len(second.ids) - reused
    engine.prefix_cache.entries.clear()
    engine.prefix_cache.bytes = 0
    engine.image_cache.entries.clear()
    engine.image_cache.bytes = 0
    same(got, engine.generate(second, Options(max_tokens=8, temperature=0.0, logprobs=True))[0])


def test_a_waiting_request_takes_a_slot_held_by_a_finished_answer(serving_engine, serving_models):
    """Answer caching waits while others decode, unless a waiting request needs the slot it holds: with 2 slots, one
    held by a finished answer and one decoding, a third request is admitted (the answer cached first) before the
    decoding one ends."""
    engine = serving_engine("vl", 2)
    _, _, proc = serving_models("vl")
    chat = lambda text: [{"role": "user", "content": [{"type": "text", "text": text}]}]
    metric = lambda name: read(engine.metrics.render().decode(), f"dsvl_{name}")
    reqs = [(Prompt.from_chat(proc, chat("Hi")), Options(max_tokens=20, temperature=0.0)),
            (Prompt.from_chat(proc, chat("Tell me a long story.")), Options(max_tokens=150, temperature=0.0)),
            (Prompt.from_chat(proc, chat("What is in it?")), Options(max_tokens=4, temperature=0.0))]
    alone = engine.generate(*reqs[2])[0]
    while engine.state()["finishing"]:
        time.sleep(0.01)
    blocks = metric("answer_blocks_cached")
    log, out = [], [queue.Queue() for _ in reqs]
    sink = lambda i: lambda e: (log.append((i, e.finish_reason)), out[i].put(e))
    engine.submit(*reqs[0], sink(0))
    engine.submit(*reqs[1], sink(1))
    got0 = collect(out[0])
    assert engine.state()["finishing"] == 1 and engine.state()["running"] == 1  # held while the other decodes
    engine.submit(*reqs[2], sink(2))
    got2, got1 = collect(out[2]), collect(out[1])
    assert log.index((2, got2["finish_reason"])) < log.index((1, got1["finish_reason"]))
    assert metric("answer_blocks_cached") > blocks and got0["finish_reason"] == "length"
    same(alone, got2)


def test_a_long_prefill_runs_between_decode_steps(serving_engine, serving_models):
    """With a budget of one chunk per decode step, a request joining with a long prompt is prefilled chunk by chunk
    while the running request keeps emitting tokens, and both answer exactly as alone."""
    engine = serving_engine("vl", 16)
    _, _, proc = serving_models("vl")
    short = (prompt(proc, [], "Hi"), Options(max_tokens=40, temperature=0.0, logprobs=True))
    long = (prompt(proc, [0, 1, 2], "Count the objects, then name each one of them in order."),
            Options(max_tokens=4, temperature=0.0, logprobs=True))
    alone = [engine.generate(*short)[0], engine.generate(*long)[0]]
    chunks = len(caches.boundaries(len(long[0].ids), image_runs(long[0].ids, engine.model.config.image_token_id,
                                                                 engine.tokens_per_image), engine.shapes.chunk)) - 1
    assert chunks >= 4
    config = engine.config
    engine.config = dataclasses.replace(config, prefill_budget=1, prefix_cache=False)
    try:
        log, out = [], [queue.Queue(), queue.Queue()]
        sink = lambda i: lambda e: (log.append(i), out[i].put(e))
        engine.submit(*short, sink(0))
        while not log:
            time.sleep(0.001)
        engine.submit(*long, sink(1))
        got = [collect(out[0]), collect(out[1])]
    finally:
        engine.config = config
    between = log[:log.index(1)].count(0) - 1  # the short request's tokens while the long one was prefilled
    assert between >= chunks - 1
    same(alone[0], got[0])
    same(alone[1], got[1])


def test_prefill_first_admits_a_burst_before_decoding(serving_engine, serving_models):
    """The prefill budget decides the schedule: with the default (large) budget a burst of requests is admitted and
    prefilled before the next decode step, so every request's first token comes before anyone's second; with a budget
    of one prompt the burst is admitted a request a step, so early requests decode while later ones prefill. Either
    way every answer equals its answer alone."""
    engine = serving_engine("vl", 16)
    _, _, proc = serving_models("vl")
    reqs = [(prompt(proc, [i % 5] * (i % 2), TEXTS[i % len(TEXTS)]), Options(max_tokens=5, temperature=0.0,
                                                                            logprobs=True)) for i in range(6)]
    alone = [engine.generate(*r)[0] for r in reqs]
    config = engine.config
    budget = max(len(p.ids) for p, _ in reqs)
    assert sum(len(p.ids) for p, _ in reqs) <= config.prefill_budget  # the default admits the whole burst
    orders = {}
    try:
        for name, cfg in (("default", config), ("one prompt", dataclasses.replace(config, prefill_budget=budget))):
            engine.config = dataclasses.replace(cfg, prefix_cache=False)
            log, out = [], [queue.Queue() for _ in reqs]
            sink = lambda i: lambda e: (log.append(i), out[i].put(e))
            with engine._lock:  # the engine thread sees the whole burst at once
                for i, r in enumerate(reqs):
                    engine.submit(*r, sink(i))
            got = [collect(q) for q in out]
            for a, b in zip(alone, got):
                same(a, b)
            orders[name] = log
    finally:
        engine.config = config
    first_seconds = lambda log: [k for k, i in enumerate(log) if log[:k].count(i) == 1]
    assert min(first_seconds(orders["default"])) >= len(reqs)  # all first tokens, then the decode steps
    assert min(first_seconds(orders["one prompt"])) < len(reqs) - 1  # a second token before the last first tokens


def collect(events):
    """One choice's events -> {"text", "tokens", "logprobs", "finish_reason"}."""
    o = {"text": "", "tokens": [], "logprobs": [], "finish_reason": None}
    while o["finish_reason"] is None:
        e = events.get(timeout=60)
        o["text"] += e.text
        o["tokens"] += e.tokens
        o["logprobs"] += e.logprobs or []
        o["finish_reason"] = e.finish_reason
    return o


def test_a_burst_arriving_during_a_prefill_joins_its_chunks(serving_engine, serving_models):
    """Requests that arrive while a request's first prefill chunk runs are admitted before its next chunk and run
    in the same chunk calls (one call holds rows of both), and every answer equals its answer alone."""
    engine = serving_engine("vl", 16)
    _, _, proc = serving_models("vl")
    first = (prompt(proc, [], TEXTS[2] + " " + TEXTS[4]), Options(max_tokens=4, temperature=0.0, logprobs=True))
    burst = [(prompt(proc, [], TEXTS[i] + " " + TEXTS[2]), Options(max_tokens=4, temperature=0.0, logprobs=True))
             for i in (0, 1, 4)]
    assert len(caches.boundaries(len(first[0].ids), [], engine.shapes.chunk)) - 1 >= 3  # several full chunks
    alone = [engine.generate(*r)[0] for r in [first] + burst]
    config, calls, out = engine.config, [], [queue.Queue() for _ in range(4)]
    real = engine._chunk_call

    def chunk_call(kind, c, pieces, seqs, **kw):  # the burst arrives while the first request's first chunk runs
        if seqs and seqs[0] is not None and kind.startswith("prefill"):
            calls.append({s.request.id for s in seqs})
            if len(calls) == 1:
                for i, r in enumerate(burst):
                    engine.submit(*r, out[i + 1].put)
        return real(kind, c, pieces, seqs, **kw)

    engine.config = dataclasses.replace(config, prefix_cache=False)
    engine._chunk_call = chunk_call
    try:
        rid = engine.submit(*first, out[0].put)
        got = [collect(q) for q in out]
    finally:
        engine._chunk_call = real
        engine.config = config
    assert calls[0] == {rid} and any(rid in ids and len(ids) > 1 for ids in calls[1:])
    for a, b in zip(alone, got):
        same(a, b)


def test_bad_lengths_name_both_numbers(serving_engine, serving_models):
    engine = serving_engine("vl", 16)
    _, _, proc = serving_models("vl")
    p = prompt(proc, [1], "Describe the picture.")
    with pytest.raises(ValueError, match=f"{len(p.ids)} tokens and max_tokens is 250"):
        engine.submit(p, Options(max_tokens=250), print)
    with pytest.raises(ValueError, match="n=17 is more than the server's 16 slots"):
        engine.submit(p, Options(n=17), print)


def test_tensor_parallel_equals_one_device(serving_engine, serving_models):
    _, _, proc = serving_models("vl")
    single = serving_engine("vl", 16)  # the engine the other tests use (compiled already)
    sharded = serving_engine("vl", 4, mesh=dict(data=1, fsdp=4, tensor=2))
    assert len({d for x in sharded.cache[0] for d in x.devices()}) == 8
    for images, text in (([1], "Describe the picture."), ([2, 3], "What is in it?")):
        p = prompt(proc, images, text)
        want = single.generate(p, Options(max_tokens=10, temperature=0.0, logprobs=True))[0]
        got = sharded.generate(p, Options(max_tokens=10, temperature=0.0, logprobs=True))[0]
        assert got["tokens"] == want["tokens"] and got["text"] == want["text"]
        np.testing.assert_allclose([x["logprob"] for x in got["logprobs"]],
                                   [x["logprob"] for x in want["logprobs"]], atol=1e-5)


def test_block_boundaries_and_keys():
    from deepseek_vl_jax.serving import caches

    runs = [(5, 21)]
    bounds = caches.boundaries(50, runs, 16)
    assert bounds == [0, 16, 21, 37, 53]  # every 16 tokens or at the image's end; the last chunk runs past 50
    assert [caches.usable_boundary(b, runs) for b in bounds] == [True, False, True, True, True]
    ids = np.arange(50)
    a = caches.block_keys(ids, ["img-a"], runs, bounds)
    b = caches.block_keys(ids, ["img-b"], runs, bounds)
    assert len(a) == 3 and a[0] != b[0] and a[2] != b[2]  # the image overlaps the first block: no key shared
    text_first = caches.block_keys(ids, ["img-a"], [(20, 36)], caches.boundaries(50, [(20, 36)], 16))
    other = caches.block_keys(ids, ["img-b"], [(20, 36)], caches.boundaries(50, [(20, 36)], 16))
    assert text_first[0] == other[0] and text_first[1] != other[1]  # only the text before the image is shared
    longer = caches.block_keys(np.arange(80), ["img-a"], runs, caches.boundaries(80, runs, 16))
    assert longer[:3] == a  # a longer prompt with the same prefix: the same keys


def test_multi_step_decode_any_phase_and_device_side_stops(serving_engine, serving_models):
    """With N = 4 decode steps per call (the next call dispatched before the previous one's tokens are read), a
    request that joins after the running one has made 1, 2, ..., N + 1 tokens (every phase of its N-step calls)
    answers bitwise as alone, and so does the running one; max_tokens not a multiple of N gives exactly that many
    tokens (the limit is checked on the device); the engine runs only its 12 programs; and the shared engine of one
    step a call gives the same answers."""
    one = serving_engine("vl", 16)
    _, _, proc = serving_models("vl")
    assert one.shapes.decode_steps == 1
    engine = Engine(one.model, proc, dataclasses.replace(one.config, decode_steps=4))
    k = engine.shapes.decode_steps
    try:
        programs = engine.warmup()
        engine.config = dataclasses.replace(engine.config, prefix_cache=False)
        long = (prompt(proc, [2], "Tell me a long story about the colours you see here."),
                Options(max_tokens=4 * k + 3, temperature=0.0, logprobs=True))
        late = [(prompt(proc, [j % 5] * (j % 2), TEXTS[j % len(TEXTS)]),
                 Options(max_tokens=k + 1 + j, temperature=0.0, logprobs=True)) for j in range(k + 1)]
        alone = [engine.generate(*r)[0] for r in [long, *late]]
        assert [len(a["tokens"]) for a in alone] == [long[1].max_tokens] + [o.max_tokens for _, o in late]
        for j, r in enumerate(late):
            log, out = [], [queue.Queue(), queue.Queue()]
            sink = lambda i: lambda e: (log.append(i), out[i].put(e))
            engine.submit(*long, sink(0))
            while log.count(0) < j + 1:  # the running request has made j + 1 tokens (its first from the prefill)
                time.sleep(0.0005)
            engine.submit(*r, sink(1))
            got = [collect(out[0]), collect(out[1])]
            same(alone[0], got[0])
            same(alone[1 + j], got[1])
        assert engine.programs.program_count() == programs == 12
    finally:
        engine.stop()
    for a, r in zip(alone, [long, *late]):
        same(a, one.generate(*r)[0])
