"""generate's stopping and scoring options against transformers' generate on the same weights (float32):
min_new_tokens, stop_strings (with the tokenizer), num_return_sequences, return_dict log-probabilities with
top_logprobs, finish reasons; and the stop-string matcher against transformers' `StopStringCriteria`.

Sampling: torch's RNG is not JAX's, so sampled tokens cannot be compared. What is compared instead: (1) sampling
with a degenerate distribution (top_k=1: the draw is forced) gives transformers' tokens for min_new_tokens,
stop_strings and num_return_sequences; (2) for real seeded sampling (temperature, top-k, top-p, several sequences
per prompt) the log-probabilities of the tokens we drew equal transformers' own processors (its warpers) applied to
its model's logits on the same tokens (teacher forcing), and every drawn token lies in that distribution's support.
"""

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.stopping_criteria import StopStringCriteria

from deepseek_vl_jax import generation as G
from deepseek_vl_jax.generation import stopping

import hf_fixtures as F
import processing_fixtures as PF

NEW = 16
PAD = 0
LOGPROB_TOL = 2e-5  # absolute, on log-probabilities of magnitude ~1-10 (measured: ~2e-6)


def torch_inputs(inputs):
    return {k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}


def hf_generate(ref, inputs, new=NEW, **kw):
    with torch.no_grad():
        out = ref.generate(**torch_inputs(inputs), max_new_tokens=new, **kw)
    if hasattr(out, "sequences"):
        return out
    return out[:, inputs["input_ids"].shape[1]:].numpy()


def pad_to(tokens, n, pad=PAD):
    return np.concatenate([tokens, np.full((tokens.shape[0], n - tokens.shape[1]), pad, tokens.dtype)], 1)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "forced-sample"])
def test_min_new_tokens_matches_transformers(generation_checkpoints, sample):
    cfg, ref, model, _ = generation_checkpoints("vl")
    inputs = F.make_inputs(cfg, rows=((1, 0), (1, 2)), padding="left")
    free = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=-1)
    eos = int(free[0, 1])  # row 0 would stop at its second token
    kw = dict(do_sample=True, top_k=1) if sample else dict(do_sample=False)
    for m in (0, 6):
        want = hf_generate(ref, inputs, eos_token_id=eos, pad_token_id=PAD, min_new_tokens=m, **kw)
        got = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD, min_new_tokens=m,
                         seed=3, **kw)
        np.testing.assert_array_equal(got, pad_to(want, NEW))
        if m == 0:
            assert got[0, 1] == eos and (got[0, 2:] == PAD).all()
        else:
            assert eos not in got[:, :m] and not np.array_equal(got[0, :m], free[0, :m])


def stop_string_across(pieces: list[bytes], overhang: bool) -> str:
    """A stop string made of the end of one multi-byte token and the start (or all) of the next, valid UTF-8."""
    for a in range(1, len(pieces) - 1):
        first, second = pieces[a], pieces[a + 1]
        if len(first) >= 2 and len(second) >= 2:
            candidate = first[1:] + (second[:-1] if overhang else second)
            try:
                text = candidate.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                return text
    raise AssertionError(f"no token pair to build a stop string from: {pieces}")


def prompt(proc, texts, image):
    chats = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": t}]}]
             for t in texts]
    return proc(chats, add_generation_prompt=True, padding_side="left")


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "forced-sample"])
def test_stop_strings_match_transformers(chat_checkpoints, sample):
    ref, model, proc, hf_proc, _ = chat_checkpoints("vl")
    batch = prompt(proc, ["Describe this image.", "What is it?"], PF.random_image(40, 56, seed=1))
    free = G.generate(model, batch, max_new_tokens=NEW, eos_token_id=-1)
    texts = stopping.token_bytes(proc, model.config.text.vocab_size)
    # Row 0: a string from inside one token to inside the next (overhangs on both sides); row 1: from inside one
    # token to the end of the next. Both whole characters (a byte-level token may hold half of one).
    strings = [stop_string_across([texts[t] for t in free[0]], overhang=True),
               stop_string_across([texts[t] for t in free[1]], overhang=False)]
    kw = dict(do_sample=True, top_k=1) if sample else dict(do_sample=False)
    want = hf_generate(ref, batch, eos_token_id=-1, pad_token_id=PAD, stop_strings=strings,
                       tokenizer=hf_proc.tokenizer, **kw)
    got = G.generate(model, batch, max_new_tokens=NEW, eos_token_id=-1, pad_token_id=PAD, stop_strings=strings,
                     tokenizer=proc, return_dict=True, **kw)
    assert want.shape[1] < NEW  # transformers stopped early
    np.testing.assert_array_equal(got.sequences, pad_to(want, NEW))
    assert got.finish_reasons == ["stop", "stop"]
    for r in range(2):
        n = got.lengths[r]
        assert (got.sequences[r, n:] == PAD).all()
        assert any(s in proc.decode(got.sequences[r, :n]) for s in strings)
    # Without the tokenizer: a clear error before anything runs.
    with pytest.raises(ValueError, match="tokenizer=processor"):
        G.generate(model, batch, max_new_tokens=NEW, stop_strings=strings)


def test_stop_string_matcher_equals_transformers(chat_checkpoints):
    """transformers' StopStringCriteria and ours on the same random token windows (prompt-like tails included)."""
    _, model, proc, hf_proc, _ = chat_checkpoints("vl")
    vocab = model.config.text.vocab_size
    texts = stopping.token_bytes(proc, vocab)
    strings = ["the", " cat", "o", "，世", "User:"]
    hf = StopStringCriteria(hf_proc.tokenizer, strings)
    tables = stopping.stop_tables(texts, strings)
    rng = np.random.default_rng(0)
    words = [proc.tokenizer.encode(w, add_special_tokens=False).ids
             for w in ("the cat", "other", "你好，世界", "User: hi", "a dog", "stop", "to", "th", "e c")]
    rows = []
    for _ in range(300):
        row = [int(t) for t in rng.integers(0, proc.tokenizer.get_vocab_size(), 2)]
        row += [int(t) for w in rng.choice(len(words), 4) for t in words[w]]
        row = row[:len(row) - int(rng.integers(0, 3))]  # often ending inside a word
        rows.append(row[-int(rng.integers(2, len(row) + 1)):])
    width = max(map(len, rows))
    hf_hits = np.array([bool(hf(torch.tensor([r]), None)[0]) for r in rows])
    assert 40 < hf_hits.sum() < 260, hf_hits.sum()  # both outcomes well represented
    w = tables.window
    window = np.full((len(rows), max(w, width)), stopping.NEVER, np.int32)
    for i, r in enumerate(rows):
        window[i, window.shape[1] - len(r):] = r
    ours = np.asarray(stopping.stop_string_hit(tables, window[:, -w:]))
    np.testing.assert_array_equal(ours, hf_hits)


def test_stop_string_matcher_documented_cases():
    """transformers' StopStringCriteria docstring: what stops on "stop" and what does not."""
    vocab = ["st", "op", "stop", "opera", "sto", "pper", "las", "topper", "s", "to", "pped", "at", "tion", "x",
             "xstopx"]
    tables = stopping.stop_tables([v.encode() for v in vocab], ["stop"])
    ids = {v: i for i, v in enumerate(vocab)}
    cases = {("st", "op"): True, ("stop",): True, ("st", "opera"): True, ("sto", "pper"): True,
             ("las", "topper"): True, ("s", "to", "pped"): True, ("x", "stop"): True, ("x", "pper"): False,
             ("stop", "at"): False, ("st", "op", "at"): False, ("st", "opera", "tion"): False, ("x", "to"): False, ("xstopx",): True,
             ("stop", "xstopx"): True}
    w = tables.window
    window = np.full((len(cases), w), stopping.NEVER, np.int32)
    for i, seq in enumerate(cases):
        window[i, w - len(seq):] = [ids[t] for t in seq]
    np.testing.assert_array_equal(np.asarray(stopping.stop_string_hit(tables, window)), list(cases.values()))


def test_stop_sequences(generation_checkpoints):
    cfg, _, model, _ = generation_checkpoints("vl")
    inputs = F.make_inputs(cfg, rows=((1, 0), (1, 2)), padding="left")
    free = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=-1)
    seq0, seq1 = free[0, 3:6].tolist(), free[1, 7:9].tolist()
    got = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=-1, pad_token_id=PAD,
                     stop_sequences=[seq0, seq1], return_dict=True)
    for r in range(2):  # brute force: the first step at which the row's tokens end with one of the sequences
        row = free[r].tolist()
        end = next(i + 1 for i in range(NEW) if any(row[:i + 1][-len(s):] == s for s in (seq0, seq1)))
        assert got.lengths[r] == end and got.finish_reasons[r] == "stop"
        np.testing.assert_array_equal(got.sequences[r], row[:end] + [PAD] * (NEW - end))
    # Streaming runs the same options step by step: the same result, and it stops once both rows have ended.
    collector = G.TokenCollector()
    streamed = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=-1, pad_token_id=PAD,
                          stop_sequences=[seq0, seq1], return_dict=True, streamer=collector)
    np.testing.assert_array_equal(streamed.sequences, got.sequences)
    np.testing.assert_allclose(streamed.logprobs, got.logprobs, rtol=0, atol=1e-6)
    assert streamed.finish_reasons == got.finish_reasons and len(collector.steps) == max(got.lengths)


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_greedy_logprobs_match_transformers_scores(generation_checkpoints, kind):
    cfg, ref, model, _ = generation_checkpoints(kind)
    inputs = F.make_inputs(cfg, rows=((1, 0), (1, 3)), padding="left")
    free = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=-1)
    eos = int(free[1, 5])
    want = hf_generate(ref, inputs, eos_token_id=eos, pad_token_id=PAD, do_sample=False, output_scores=True,
                       output_logits=True, return_dict_in_generate=True, repetition_penalty=1.3)
    got = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD, return_dict=True,
                     top_logprobs=5, repetition_penalty=1.3)
    seqs = want.sequences[:, inputs["input_ids"].shape[1]:].numpy()
    np.testing.assert_array_equal(got.sequences, pad_to(seqs, NEW))
    scores = torch.log_softmax(torch.stack(want.scores, 1).float(), -1).numpy()  # [B, steps, V]
    for r in range(2):
        n = int(got.lengths[r])
        chosen = np.take_along_axis(scores[r, :n], seqs[r, :n, None], -1)[:, 0]
        np.testing.assert_allclose(got.logprobs[r, :n], chosen, rtol=0, atol=LOGPROB_TOL)
        top = -np.sort(-scores[r, :n], -1)[:, :5]
        np.testing.assert_allclose(got.top_logprobs[r, :n], top, rtol=0, atol=LOGPROB_TOL)
        np.testing.assert_array_equal(got.top_logprob_ids[r, :n, 0], seqs[r, :n])  # greedy: the argmax
    assert got.finish_reasons == ["length", "eos"] and got.lengths.tolist() == [NEW, int(np.argmax(seqs[1] == eos)) + 1]
    # output_logits: raw logits; without a repetition penalty our logprobs are their log-softmax.
    plain = G.generate(model, inputs, max_new_tokens=4, eos_token_id=-1, return_dict=True)
    want = hf_generate(ref, inputs, new=4, eos_token_id=-1, pad_token_id=PAD, do_sample=False, output_logits=True,
                       return_dict_in_generate=True)
    raw = torch.log_softmax(torch.stack(want.logits, 1).float(), -1).numpy()
    chosen = np.take_along_axis(raw, plain.sequences[..., None].astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(plain.logprobs, chosen, rtol=0, atol=LOGPROB_TOL)


def test_sampled_logprobs_equal_transformers_processors(generation_checkpoints):
    """num_return_sequences=3 seeded sampling with temperature, top-k and top-p: every drawn token's log-probability
    and top alternatives equal transformers' warpers on its own model's logits of the same tokens."""
    cfg, ref, model, _ = generation_checkpoints("vl")
    inputs = F.make_inputs(cfg, rows=((1, 0), (1, 3)), padding="left")
    n, temp, k, p = 3, 0.8, 40, 0.9
    got = G.generate(model, inputs, max_new_tokens=NEW, do_sample=True, temperature=temp, top_k=k, top_p=p,
                     seed=11, eos_token_id=-1, num_return_sequences=n, return_dict=True, top_logprobs=3)
    assert got.sequences.shape == (2 * n, NEW) and got.finish_reasons == ["length"] * (2 * n)
    assert len({tuple(r) for r in got.sequences[:n].tolist()}) > 1  # the copies of a prompt differ
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temp), TopKLogitsWarper(k), TopPLogitsWarper(p)])
    prompt_ids = np.repeat(inputs["input_ids"], n, 0)
    mask = np.repeat(inputs["attention_mask"], n, 0)
    full = {"input_ids": np.concatenate([prompt_ids, got.sequences], 1),
            "attention_mask": np.concatenate([mask, np.ones_like(got.sequences)], 1),
            "pixel_values": np.repeat(inputs["pixel_values"], n, 0)}  # one image per row
    logits = torch.from_numpy(F.torch_logits(ref, full, F.mask_positions(full["attention_mask"])))
    t = prompt_ids.shape[1]
    ids = torch.from_numpy(full["input_ids"])
    for i in range(NEW):
        scores = warpers(ids[:, :t + i], logits[:, t + i - 1].clone())
        logp = torch.log_softmax(scores, -1).numpy()
        chosen = logp[np.arange(2 * n), got.sequences[:, i]]
        assert np.isfinite(chosen).all()  # the drawn token is inside transformers' top-k / top-p support
        np.testing.assert_allclose(got.logprobs[:, i], chosen, rtol=0, atol=LOGPROB_TOL)
        np.testing.assert_allclose(got.top_logprobs[:, i], -np.sort(-logp, -1)[:, :3], rtol=0, atol=LOGPROB_TOL)


def test_num_return_sequences_matches_transformers_layout(generation_checkpoints):
    cfg, ref, model, _ = generation_checkpoints("hybrid")
    inputs = F.make_inputs(cfg, rows=((1, 0), (1, 3)), padding="left")
    want = hf_generate(ref, inputs, eos_token_id=-1, pad_token_id=PAD, do_sample=True, top_k=1,
                       num_return_sequences=2)
    got = G.generate(model, inputs, max_new_tokens=NEW, eos_token_id=-1, do_sample=True, top_k=1,
                     num_return_sequences=2)
    np.testing.assert_array_equal(got, want)
    two_images = F.make_inputs(cfg, rows=((2, 0), (1, 1)), padding="left")  # images travel with their rows
    expanded = G.generate(model, two_images, max_new_tokens=4, eos_token_id=-1, do_sample=True, top_k=1,
                          num_return_sequences=2)
    single = G.generate(model, two_images, max_new_tokens=4, eos_token_id=-1)
    np.testing.assert_array_equal(expanded, np.repeat(single, 2, 0))
    with pytest.raises(ValueError, match="needs do_sample=True"):
        G.generate(model, inputs, max_new_tokens=4, num_return_sequences=2)
    with pytest.raises(ValueError, match="return_dict=True"):
        G.generate(model, inputs, max_new_tokens=4, top_logprobs=2)
