"""The server through the official `openai` client over a real uvicorn socket on 127.0.0.1: answers equal
`deepseek_vl_jax.generate` (greedy) on the same chat for both model types with one and two images, sync and async,
streamed and not; usage counts equal the processor's; stop strings and n as OpenAI's; log-probabilities equal the
full forward's; the API key; a client that disconnects mid-stream frees its slot."""

import asyncio
import time

import httpx
import numpy as np
import openai
import pytest

from deepseek_vl_jax.generation import generate
from deepseek_vl_jax.serving import ServerConfig, create_app
from deepseek_vl_jax.serving.server import BackgroundServer

import serving_fixtures as S

NAME = "tiny"
MAX = 12


@pytest.fixture(scope="module")
def server(serving_engine):
    servers = {}

    def get(kind, api_key=None):
        if (kind, api_key) not in servers:
            engine = serving_engine(kind, 16 if kind == "vl" else 4)
            app = create_app(engine, ServerConfig(model_names=(NAME,), api_key=api_key))
            servers[kind, api_key] = (BackgroundServer(app).__enter__(), engine)
        return servers[kind, api_key]

    yield get
    for s, _ in servers.values():
        s.__exit__(None, None, None)


def chat(images, text="Describe the picture."):
    content = [{"type": "image_url", "image_url": {"url": S.image_data_url(seed)}} for seed in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


IMAGE_SETS = ((1,), (2, 3))
_REFERENCES = {}


def reference(serving_models, kind, images, text="Describe the picture."):
    """(answer text, completion tokens, prompt tokens, the chat's processor batch) from `generate` (greedy, MAX
    new tokens) on the processor's left-padded batch of the chats with IMAGE_SETS' images (one compilation)."""
    _, model, proc = serving_models(kind)
    if kind not in _REFERENCES:
        msgs = [[{"role": "user", "content": [*({"type": "image", "image": S.pil_image(s)} for s in ims),
                                              {"type": "text", "text": text}]}] for ims in IMAGE_SETS]
        out = {}
        batch = proc(msgs, add_generation_prompt=True, padding_side="left")
        rows = generate(model, batch, max_new_tokens=MAX, eos_token_id=proc.eos_token_id)
        for row, key in enumerate(IMAGE_SETS):
            one = proc(msgs[row], add_generation_prompt=True)
            tokens = rows[row]
            ends = np.flatnonzero(tokens == proc.eos_token_id)
            kept = tokens[:ends[0]] if len(ends) else tokens
            count = int(ends[0]) + 1 if len(ends) else MAX
            out[key] = (proc.decode(kept, skip_special_tokens=True), count, one["input_ids"].shape[1], one)
        _REFERENCES[kind] = out
    return _REFERENCES[kind][tuple(images)]


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_openai_client_answers_equal_generate(server, serving_models, kind):
    srv, _ = server(kind)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    for images in IMAGE_SETS:
        want, count, prompt_tokens, _ = reference(serving_models, kind, images)
        assert len(want) > 3
        r = client.chat.completions.create(model=NAME, messages=chat(images), max_tokens=MAX, temperature=0)
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason == ("length" if count == MAX else "stop")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, count)
        assert r.usage.total_tokens == prompt_tokens + count

        async def streamed():
            aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
            stream = await aclient.chat.completions.create(
                model=NAME, messages=chat(images), max_completion_tokens=MAX, temperature=0, stream=True,
                stream_options={"include_usage": True})
            parts, finish, usage = [], None, None
            async for c in stream:
                if c.usage is not None:
                    usage = c.usage
                for ch in c.choices:
                    parts.append(ch.delta.content or "")
                    finish = ch.finish_reason or finish
            await aclient.close()
            return "".join(parts), finish, usage

        text, finish, usage = asyncio.run(streamed())
        assert text == want and finish == r.choices[0].finish_reason
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, count)
        # sync streaming without usage
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=NAME, messages=chat(images), max_tokens=MAX, temperature=0, stream=True) if c.choices]
        assert "".join(parts) == want
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]


def test_logprobs_equal_the_full_forward(server, serving_models):
    srv, _ = server("vl")
    _, model, _ = serving_models("vl")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(model=NAME, messages=chat([1]), max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=5)
    _, _, _, batch = reference(serving_models, "vl", [1])
    logits = np.asarray(model(**batch))[0, -1].astype(np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    first = r.choices[0].logprobs.content[0]
    top = np.argsort(-logp)[:5]
    assert len(first.top_logprobs) == 5
    np.testing.assert_allclose([t.logprob for t in first.top_logprobs], logp[top], atol=2e-5)
    assert first.logprob == first.top_logprobs[0].logprob  # greedy picks the most likely token
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens


def test_stop_strings_and_n(server, serving_models):
    srv, _ = server("vl")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    want, _, _, _ = reference(serving_models, "vl", [1])
    stop = want[4:6]
    cut = want[:want.find(stop)]
    r = client.chat.completions.create(model=NAME, messages=chat([1]), max_tokens=MAX, temperature=0,
                                       stop=[stop, "never-there"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=chat([1]), max_tokens=MAX, temperature=0, stop=stop, stream=True) if c.choices]
    assert "".join(parts) == cut
    # n: greedy choices are all the answer; sampled choices with a seed reproduce and differ from each other
    r = client.chat.completions.create(model=NAME, messages=chat([1]), max_tokens=MAX, temperature=0, n=2)
    assert [c.message.content for c in r.choices] == [want, want] and [c.index for c in r.choices] == [0, 1]
    kw = dict(model=NAME, messages=chat([1]), max_tokens=MAX, temperature=1.0, top_p=0.95, n=3, seed=11)
    a, b = (client.chat.completions.create(**kw) for _ in range(2))
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices] and len(set(texts)) == 3
    assert a.usage.completion_tokens <= 3 * MAX and a.usage.prompt_tokens == r.usage.prompt_tokens


def test_api_key(server):
    srv, _ = server("vl", api_key="sekrit")
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=NAME, messages=chat([]), max_tokens=2)
    for path in ("/v1/models", "/health", "/metrics"):
        r = httpx.get(srv.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0)
    r = good.chat.completions.create(model=NAME, messages=chat([]), max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_disconnect_frees_the_slot(server):
    srv, engine = server("vl")
    body = {"model": NAME, "messages": chat([1]), "max_tokens": 150, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            data = (line for line in r.iter_lines() if line.startswith("data:"))
            next(data)
            next(data)  # the role chunk and a first token: the request holds a slot now
            assert engine.state()["running"] == 1
    deadline = time.monotonic() + 5
    while engine.state()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.state()["running"] == 0


def test_non_streaming_disconnect_frees_the_slot(server):
    """A non-streaming client that closes its connection mid-answer: the request is cancelled (its slot freed, no
    finish counted) long before it could have reached max_tokens."""
    import json
    import socket
    from urllib.parse import urlparse

    from deepseek_vl_jax.serving.metrics import read

    srv, engine = server("vl")
    finished = lambda: sum(read(engine.metrics.render().decode(), f'dsvl_requests_total{{finish_reason="{r}"}}')
                           for r in ("stop", "length"))
    before, tokens_before = finished(), read(engine.metrics.render().decode(), "dsvl_output_tokens")
    limit = 180
    body = json.dumps({"model": NAME, "messages": chat([1]), "max_tokens": limit, "temperature": 0}).encode()
    url = urlparse(srv.url)
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.monotonic() + 30
    while not engine.state()["running"] and time.monotonic() < deadline:
        time.sleep(0.002)
    assert engine.state()["running"] == 1
    sock.close()
    while engine.state()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.state()["running"] == 0
    assert finished() == before  # cancelled, not finished
    assert read(engine.metrics.render().decode(), "dsvl_output_tokens") - tokens_before < limit
