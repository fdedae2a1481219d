"""Stopping and scoring helpers as small pure functions (also for a server's engine): stop strings and stop token
sequences matched on device, the min_new_tokens eos mask, per-token log-probabilities with the top-k alternatives.

Stop strings follow transformers' `StopStringCriteria`: a row stops as soon as its text (prompt included) contains a
stop string whose end lies inside the last token (["st", "op"], ["st", "opera"], ["las", "topper"], [" dog"] for
"o" all stop; ["stop", "at"] does not: the string ended before the last token, which was checked then).
Matching is on UTF-8 bytes (a byte-level tokenizer's tokens may hold half a character). On host, `StopTables` holds
per token and stop string: whether some prefix of it ends with the string's last i bytes, i = min(prefix, string)
(`end`), whether it fits the string when r bytes of it remain to be matched from the back (`mid`, running off the
string's start allowed), its length.
On device, `stop_string_hit` walks back over the last W tokens (W = the longest string in bytes) for every start.
Shapes: B batch, W window, J stop strings, L longest string (bytes), V vocabulary (+1: a never-matching row).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

NEVER = -1  # window slots without a token (before the prompt's start): index of the never-matching row


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer) -> bool:
    decoder = tokenizer.decoder
    if decoder is None:
        return False
    state = decoder.__getstate__()
    return '"ByteLevel"' in (state.decode() if isinstance(state, bytes) else str(state))


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each token id in [0, vocab_size) yields when decoded (b"" for ids the tokenizer lacks).

    tokenizer: a `tokenizers.Tokenizer` (or a processor with `.tokenizer`). Byte-level tokens map through the byte
    alphabet; the rest (special tokens, other models) are decoded after a fixed prefix that is then cut off, so that
    decoders which drop a leading space or marker do not change the text (transformers' `clean_tokenizer_vocab`)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    decoder = _byte_decoder() if _is_byte_level(tokenizer) else None
    prefix = "abcdef"
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False).ids
    out = []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i)
        if token is None:
            out.append(b"")
        elif decoder is not None and all(ch in decoder for ch in token):
            out.append(bytes(decoder[ch] for ch in token))
        else:
            text = tokenizer.decode(prefix_ids + [i], skip_special_tokens=False)
            out.append(text[text.index(prefix) + len(prefix):].encode("utf-8") if prefix in text else b"")
    return out


@struct.dataclass
class StopTables:
    """end [V + 1, J, L] bool: a prefix of the token ends with string j's last i + 1 bytes (all of it, or the
    prefix is i + 1 long); mid [V + 1, J, L] bool: with
    r + 1 bytes of string j left to match (from its back), the token ends with them or is a part of them; length
    [V + 1] int32 (bytes); target [J] int32 (each string's length). Row V (= index -1) never matches."""

    end: jax.Array
    mid: jax.Array
    length: jax.Array
    target: jax.Array

    @property
    def window(self) -> int:
        return int(self.end.shape[-1])


def stop_tables(token_texts: Sequence[bytes], stop_strings: Sequence[str]) -> StopTables:
    """Host-side tables for `stop_string_hit` (numpy -> jax). J and L are rounded up (to powers of two, L >= 8) so
    that stop strings of similar length share one compilation; padded strings never match."""
    strings = [s.encode("utf-8") for s in stop_strings]
    if not strings or any(not s for s in strings):
        raise ValueError("stop_strings must be non-empty strings")
    n_j = 1 << (len(strings) - 1).bit_length()
    n_l = max(8, 1 << (max(map(len, strings)) - 1).bit_length())
    v = len(token_texts)
    end = np.zeros((v + 1, n_j, n_l), bool)
    mid = np.zeros((v + 1, n_j, n_l), bool)
    length = np.zeros((v + 1,), np.int32)
    target = np.full((n_j,), n_l + 1, np.int32)  # padded strings: longer than the window, never reached
    for j, s in enumerate(strings):
        target[j] = len(s)
    for t, tok in enumerate(token_texts):
        length[t] = min(len(tok), n_l + 1)
        if not tok:
            continue
        for j, s in enumerate(strings):
            if not set(tok) & set(s):
                continue
            for cut in range(1, len(tok) + 1):  # the string may end anywhere inside the last token
                m = min(cut, len(s))
                end[t, j, m - 1] |= tok[:cut].endswith(s[-m:])
            for r in range(1, len(s)):
                mid[t, j, r - 1] = s[r - len(tok):r] == tok if len(tok) <= r else tok[-r:] == s[:r]
    return StopTables(jnp.asarray(end), jnp.asarray(mid), jnp.asarray(length), jnp.asarray(target))


def stop_string_hit(tables: StopTables, window: jax.Array) -> jax.Array:
    """window [B, W] int32: each row's last W tokens (NEVER where there is none), the newest last -> bool [B]: a stop
    string overlaps the newest token."""
    w = window.shape[1]
    n_l = tables.window
    ids = jnp.where(window < 0, tables.length.shape[0] - 1, window)
    matched = jnp.broadcast_to(jnp.arange(1, n_l + 1, dtype=jnp.int32), tables.end.shape[1:])  # [J, L] start i
    alive = tables.end[ids[:, -1]] & (matched <= tables.target[:, None])  # [B, J, L]
    matched = jnp.broadcast_to(matched, alive.shape)
    hit = alive & (matched >= tables.target[:, None])
    for k in range(2, w + 1):  # walk back over the older tokens
        tok = ids[:, -k]
        remaining = jnp.clip(tables.target[None, :, None] - matched, 1, n_l) - 1
        fits = jnp.take_along_axis(tables.mid[tok], remaining, axis=-1)
        alive = alive & ~hit & fits
        matched = matched + tables.length[tok][:, None, None]
        hit = hit | (alive & (matched >= tables.target[:, None]))
    return jnp.any(hit, axis=(1, 2))


def stop_sequences_array(sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Token-id stop sequences -> [M, W] int32, right-aligned, -2 (matches anything) on the left."""
    sequences = [list(map(int, s)) for s in sequences]
    if not sequences or any(not s for s in sequences):
        raise ValueError("stop_sequences must be non-empty lists of token ids")
    w = max(map(len, sequences))
    out = np.full((len(sequences), w), -2, np.int32)
    for m, s in enumerate(sequences):
        out[m, w - len(s):] = s
    return out


def stop_sequence_hit(sequences: jax.Array, window: jax.Array) -> jax.Array:
    """sequences [M, W'] (from `stop_sequences_array`), window [B, W] (W >= W') -> bool [B]: the row ends with one."""
    tail = window[:, -sequences.shape[1]:]
    return jnp.any(jnp.all((tail[:, None, :] == sequences[None]) | (sequences[None] == -2), axis=-1), axis=-1)


def push(window: jax.Array, tokens: jax.Array) -> jax.Array:
    """window [B, W] shifted left by one, tokens [B] appended."""
    return jnp.concatenate([window[:, 1:], tokens[:, None].astype(window.dtype)], axis=1)


def suppress_eos(logits: jax.Array, eos: jax.Array, active: jax.Array) -> jax.Array:
    """transformers' `MinNewTokensLengthLogitsProcessor`: logits [B, V] of the eos ids eos [E] (-1 unused) set to
    -inf while `active` (a scalar: fewer than min_new_tokens generated so far)."""
    is_eos = jnp.any(jnp.arange(logits.shape[-1])[:, None] == eos[None, :], axis=-1)
    return jnp.where(active & is_eos, -jnp.inf, logits)


def token_logprobs(processed: jax.Array, tokens: jax.Array, k: int):
    """processed logits [B, V] (what the token was drawn from), tokens [B] -> (logprob [B], top ids [B, k], top
    logprobs [B, k]) of the log-softmax; top arrays None when k = 0."""
    logp = jax.nn.log_softmax(processed.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    if k == 0:
        return chosen, None, None
    top_lp, top_ids = jax.lax.top_k(logp, k)
    return chosen, top_ids.astype(jnp.int32), top_lp
