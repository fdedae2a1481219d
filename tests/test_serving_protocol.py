"""Bad input through the app in process (httpx.ASGITransport): each case of the issue's table is a 4xx with OpenAI's
error JSON, the queue's back-pressure is a 429 with Retry-After, and after 500 random malformed requests a good
request still gets the right answer and no slot or queue entry leaked."""

import asyncio
import base64
import io
import json
import random

import httpx
import pytest

from deepseek_vl_jax.serving import Engine, EngineConfig, ServerConfig, create_app
from deepseek_vl_jax.serving.media import MediaLimits

import serving_fixtures as S

NAME = "tiny"
LIMITS = dict(max_images=3, max_image_bytes=20_000)
BODY_LIMIT = 200_000


def good(images=(1,), **kw):
    content = [{"type": "image_url", "image_url": {"url": S.image_data_url(s)}} for s in images]
    body = {"model": NAME, "messages": [{"role": "user", "content": content + [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 4, "temperature": 0}
    return {**body, **kw}


def post(app, bodies, headers=None):
    """POST each body (dict -> JSON, bytes as they are); returns the responses."""
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            out = []
            for b in bodies:
                content = b if isinstance(b, bytes) else json.dumps(b).encode()
                out.append(await client.post("/v1/chat/completions", content=content,
                                             headers={"content-type": "application/json", **(headers or {})}))
            return out
    return asyncio.run(go())


@pytest.fixture(scope="module")
def app(serving_engine, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    S.pil_image(1).save(media / "ok.png")
    outside = tmp_path_factory.mktemp("outside")
    S.pil_image(1).save(outside / "secret.png")
    engine = serving_engine("vl", 16)
    config = ServerConfig(model_names=(NAME,), max_body_bytes=BODY_LIMIT,
                          media=MediaLimits(allowed_media_dir=str(media), **LIMITS))
    return create_app(engine, config), engine, media, outside


def png_bytes(size):
    buf = io.BytesIO()
    S.pil_image(0, size, size).save(buf, format="PNG")
    return buf.getvalue()


def cases(media, outside):
    msg = lambda content: [{"role": "user", "content": content}]
    img = lambda url: {"type": "image_url", "image_url": {"url": url}}
    big = "data:image/png;base64," + base64.b64encode(png_bytes(200)).decode()
    return [
        ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "invalid_json", None),
        ("not an object", b"[1, 2]", 400, "invalid_json", None),
        ("max_tokens a string", good(max_tokens="4"), 400, "invalid_type", "max_tokens"),
        ("temperature a bool", good(temperature=True), 400, "invalid_type", "temperature"),
        ("messages a dict", good(messages={"role": "user"}), 400, "invalid_type", "messages"),
        ("unknown model", good(model="gpt-5"), 404, "model_not_found", "model"),
        ("empty messages", good(messages=[]), 400, "invalid_value", "messages"),
        ("bad role", good(messages=[{"role": "robot", "content": "x"}]), 400, "invalid_value", "messages[0].role"),
        ("image does not decode", good(messages=msg([img("data:image/png;base64," + base64.b64encode(
            b"not a png at all" * 4).decode())])), 400, "invalid_image", "messages[0].content[0].image_url"),
        ("base64 not base64", good(messages=msg([img("data:image/png;base64,@@@@")])), 400, "invalid_image", None),
        ("base64 over the size limit", good(messages=msg([img(big)])), 400, "invalid_image", None),
        ("file outside the media dir", good(messages=msg([img(f"file://{outside}/secret.png")])), 400,
         "invalid_image", None),
        ("file path with ..", good(messages=msg([img(f"file://{media}/../{outside.name}/secret.png")])), 400,
         "invalid_image", None),
        ("unsupported URL scheme", good(messages=msg([img("ftp://example.com/x.png")])), 400, "invalid_image", None),
        ("too many images", good(images=(1, 2, 3, 4)), 400, "too_many_images", "messages"),
        ("max_tokens 0", good(max_tokens=0), 400, "invalid_value", "max_tokens"),
        ("max_tokens beyond the positions", good(max_tokens=10_000), 400, "context_length_exceeded", "max_tokens"),
        ("temperature < 0", good(temperature=-0.5), 400, "invalid_value", "temperature"),
        ("top_p 0", good(top_p=0), 400, "invalid_value", "top_p"),
        ("top_p > 1", good(top_p=1.5), 400, "invalid_value", "top_p"),
        ("n > slots", good(n=17), 400, "invalid_value", "n"),
        ("five stop strings", good(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value", "stop"),
        ("top_logprobs without logprobs", good(top_logprobs=3), 400, "invalid_value", "top_logprobs"),
        ("body over the size limit", good(pad="x" * (BODY_LIMIT + 1)), 413, "body_too_large", None),
    ]


def test_malformed_input_table(app):
    app_, engine, media, outside = app
    table = cases(media, outside)
    responses = post(app_, [body for _, body, *_ in table])
    for (name, _, status, code, param), r in zip(table, responses):
        assert r.status_code == status, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], name
        assert error["code"] == code, (name, error)
        if param is not None:
            assert error["param"] == param, (name, error)
    assert "10000" in responses[16].json()["error"]["message"]  # names both numbers
    # the allowed directory works, and the server is still up
    ok = post(app_, [good(images=(), messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"file://{media}/ok.png"}}, {"type": "text", "text": "Hi"}]}])])[0]
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert engine.state()["running"] == 0


def test_queue_full_is_429(serving_models):
    _, model, proc = serving_models("vl")
    idle = Engine(model, proc, EngineConfig(max_batch=2, prefill_chunk=16, max_seq_len=256, max_queue=1))  # not started
    app_ = create_app(idle, ServerConfig(model_names=(NAME,)))

    async def go():
        transport = httpx.ASGITransport(app=app_)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = asyncio.create_task(client.post("/v1/chat/completions", json=good(images=())))
            while not idle.waiting:
                await asyncio.sleep(0.01)
            second = await client.post("/v1/chat/completions", json=good(images=()))
            first.cancel()
            return second
    r = asyncio.run(go())
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"


MUTATIONS = [
    lambda b, r: b.update(model=r.choice([None, 3, "", "nope", ["tiny"]])),
    lambda b, r: b.update(messages=r.choice([None, [], "hi", [1], [{"role": "user"}], [{"content": "x"}],
                                             [{"role": "user", "content": [{"type": "audio"}]}],
                                             [{"role": "user", "content": 5}],
                                             [{"role": "assistant", "content": "only me"}]])),
    lambda b, r: b.update(max_tokens=r.choice([0, -3, "many", 1.5, True, 10 ** 9])),
    lambda b, r: b.update(temperature=r.choice([-1, -0.01, 2.5, "hot", [0]])),
    lambda b, r: b.update(top_p=r.choice([0, -0.2, 1.01, "1", {}])),
    lambda b, r: b.update(n=r.choice([0, -1, 17, 1000, "2", 2.0])),
    lambda b, r: b.update(stop=r.choice([["a"] * 5, 3, [""], [1, 2], {"x": 1}])),
    lambda b, r: b.update(top_logprobs=r.choice([-1, 21, "3"]), logprobs=r.choice([True, False])),
    lambda b, r: b.update(stream=r.choice(["yes", 1, []])),
    lambda b, r: b.update(top_k=r.choice([-2, "k", 1.5])),
    lambda b, r: b.update(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": r.choice(
        ["data:image/png;base64," + "".join(r.choice("abc+/=") for _ in range(r.randint(1, 64))),
         "data:text/plain;base64,aGk=", "file:///etc/passwd", "file://../../x.png", "nope://x", "", 7])}}]}]),
]


def fuzz_body(r: random.Random):
    if r.random() < 0.15:  # raw bytes: truncated or garbled JSON
        raw = json.dumps(good(images=())).encode()
        raw = raw[:r.randint(0, len(raw) - 1)] if r.random() < 0.5 else bytes(r.getrandbits(8) for _ in range(40))
        return raw
    body = good(images=())
    for m in r.sample(MUTATIONS, r.randint(1, 3)):
        m(body, r)
    return body


def test_fuzz_500_malformed_requests(app, serving_models):
    app_, engine, _, _ = app
    r = random.Random(0)
    bodies = [fuzz_body(r) for _ in range(500)]
    responses = post(app_, bodies)
    statuses = [x.status_code for x in responses]
    bad = [(b, x.status_code, x.text[:200]) for b, x in zip(bodies, responses) if not 400 <= x.status_code < 500]
    assert not bad, bad[:3]
    assert all(set(x.json()["error"]) == {"message", "type", "param", "code"} for x in responses)
    assert len(set(statuses)) >= 2 and len({x.json()["error"]["param"] for x in responses}) >= 8
    # still serving, the right answer, nothing leaked
    _, model, proc = serving_models("vl")
    want = engine.generate(*_good_prompt(proc))[0]["text"]
    got = post(app_, [good()])[0].json()["choices"][0]["message"]["content"]
    assert got == want
    assert engine.state()["running"] == 0 and engine.state()["waiting"] == 0


def _good_prompt(proc):
    from deepseek_vl_jax.serving import Options, Prompt

    msgs = [{"role": "user", "content": [{"type": "image", "image": S.pil_image(1)}, {"type": "text", "text": "Hi"}]}]
    return Prompt.from_batch(proc(msgs, add_generation_prompt=True)), Options(max_tokens=4, temperature=0.0)


def test_http_images_are_fetched_with_a_size_limit(app, tmp_path):
    import functools
    import http.server
    import threading

    app_, engine, _, _ = app
    S.pil_image(1).save(tmp_path / "ok.png")
    (tmp_path / "big.png").write_bytes(png_bytes(200))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        msg = lambda url: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                        {"type": "text", "text": "Hi"}]}]
        ok, big, missing = post(app_, [good(messages=msg(f"{base}/ok.png")), good(messages=msg(f"{base}/big.png")),
                                       good(messages=msg(f"{base}/missing.png"))])
    finally:
        httpd.shutdown()
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["message"]["content"] == post(app_, [good()])[0].json()["choices"][0][
        "message"]["content"]  # the same picture as a data URL: the same answer
    assert big.status_code == 400 and "byte limit" in big.json()["error"]["message"]
    assert missing.status_code == 400 and "HTTP 404" in missing.json()["error"]["message"]
