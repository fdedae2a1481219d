"""The HTTP layer (Starlette, served by uvicorn): validates, translates to the engine's `Prompt` / `Options`, and
answers or streams (server-sent events) in OpenAI's format. It holds no model state of its own.

Routes: POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics. With an API key every route needs
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from deepseek_vl_jax.processing import ProcessorError
from deepseek_vl_jax.serving import protocol
from deepseek_vl_jax.serving.engine import Engine, Prompt, QueueFull, TooLong
from deepseek_vl_jax.serving.media import MediaLimits, load_image
from deepseek_vl_jax.serving.protocol import ApiError

DISCONNECT_POLL_S = 0.05  # how often a non-streaming request checks that its client is still there


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_names: tuple[str, ...]
    api_key: str | None = None
    max_body_bytes: int = 32 << 20
    media: MediaLimits = MediaLimits()
    retry_after_seconds: int = 1


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body is over the {limit} byte limit", None, "body_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_big
    return bytes(body)


def create_app(engine: Engine, config: ServerConfig) -> Starlette:
    processor = engine.processor
    started = int(time.time())

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None,
                           "invalid_api_key", "authentication_error")

    def build_prompt(chat: protocol.ChatRequest) -> Prompt:
        """Load the images and run the processor (in a worker thread: image fetching and decoding block)."""
        images = [(i, j, item) for i, m in enumerate(chat.messages) for j, item in enumerate(m["content"])
                  if item["type"] == "image_url"]
        if len(images) > config.media.max_images:
            raise ApiError(400, f"the request has {len(images)} images, more than this server's limit of "
                           f"{config.media.max_images}", "messages", "too_many_images")
        messages = []
        for i, m in enumerate(chat.messages):
            content = []
            for j, item in enumerate(m["content"]):
                if item["type"] == "text":
                    content.append(item)
                else:
                    param = f"messages[{i}].content[{j}].image_url"
                    content.append({"type": "image", "image": load_image(item["url"], config.media, param)})
            messages.append({"role": m["role"], "content": content})
        try:
            return Prompt.from_chat(processor, messages)  # also: how the next turn starts (answer KV caching)
        except ProcessorError as e:
            raise ApiError(400, f"cannot process the messages: {e}", "messages", "invalid_value") from None

    def timed(kind, fn, *args):
        if engine.timeline is None:
            return fn(*args)
        with engine.timeline.span(kind):
            return fn(*args)

    async def chat_completions(request: Request) -> Response:
        try:
            authorize(request)
            body = protocol.parse_json(await _read_body(request, config.max_body_bytes))
            chat = protocol.parse_request(body, config.model_names, engine.config.max_batch)
            prompt = await asyncio.to_thread(timed, "build_prompt", build_prompt, chat)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            try:
                rid = engine.submit(prompt, chat.options, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
            except QueueFull as e:
                raise ApiError(429, f"the server is busy ({e}); retry later", None, "queue_full",
                               "rate_limit_error", {"Retry-After": str(config.retry_after_seconds)}) from None
            except TooLong as e:
                raise ApiError(400, str(e), "max_tokens", "context_length_exceeded") from None
            except ValueError as e:
                raise ApiError(400, str(e), "messages", "invalid_value") from None
        except ApiError as e:
            return _error(e)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - the server stays up and answers in OpenAI's format
            return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error",
                                   "server_error"))
        name = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return StreamingResponse(_stream(engine, rid, name, chat, len(prompt.ids), events),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return await _collect(request, rid, name, chat, len(prompt.ids), events)
        finally:
            engine.cancel(rid)  # a no-op once finished; frees the slots if the client went away

    async def list_models(request: Request) -> Response:
        try:
            authorize(request)
        except ApiError as e:
            return _error(e)
        return JSONResponse(protocol.models(config.model_names, started))

    async def health(request: Request) -> Response:
        try:
            authorize(request)
        except ApiError as e:
            return _error(e)
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)
        return JSONResponse({"status": "ok", **engine.state()})

    async def metrics(request: Request) -> Response:
        try:
            authorize(request)
        except ApiError as e:
            return _error(e)
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        return _error(ApiError(status, f"{request.method} {request.url.path}: not found or method not allowed",
                               None, "not_found"))

    async def server_error(request: Request, exc) -> Response:
        return _error(ApiError(500, f"internal error: {type(exc).__name__}", None, "internal_error", "server_error"))

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", list_models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, 500: server_error})


async def _collect(request, rid, name, chat, prompt_tokens, events) -> Response:
    """Wait for every choice's end; a client that goes away meanwhile gets nothing (the caller then cancels)."""
    n = chat.options.n
    out = [{"text": "", "logprobs": [], "finish_reason": None, "tokens": 0} for _ in range(n)]
    checked = time.monotonic()
    while any(o["finish_reason"] is None for o in out):
        try:
            e = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            e = None
        if time.monotonic() - checked >= DISCONNECT_POLL_S:  # also while tokens keep coming
            checked = time.monotonic()
            if await request.is_disconnected():
                return Response(status_code=499)
        if e is None:
            continue
        if e.finish_reason == "error":
            return _error(ApiError(500, "the engine failed while generating", None, "internal_error", "server_error"))
        o = out[e.choice]
        o["text"] += e.text
        o["tokens"] += len(e.tokens)
        o["logprobs"] += e.logprobs or []
        o["finish_reason"] = e.finish_reason
    usage = protocol.usage(prompt_tokens, sum(o["tokens"] for o in out))
    return JSONResponse(protocol.completion(name, chat.model, out, usage, chat.options.logprobs))


async def _stream(engine, rid, name, chat, prompt_tokens, events):
    created = int(time.time())
    n = chat.options.n
    finished, completion_tokens = [False] * n, 0
    try:
        yield protocol.chunk(name, chat.model, created, [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(n)])
        while not all(finished):
            e = await events.get()
            if e.finish_reason == "error":
                yield f"data: {json.dumps(protocol.error_body('the engine failed', 'server_error'))}\n\n"
                return
            completion_tokens += len(e.tokens)
            finished[e.choice] = e.finish_reason is not None
            if not e.text and not e.logprobs and e.finish_reason is None:
                continue
            choice = {"index": e.choice, "delta": {"content": e.text} if e.text else {},
                      "logprobs": {"content": e.logprobs} if e.logprobs else None, "finish_reason": e.finish_reason}
            yield protocol.chunk(name, chat.model, created, [choice])
        if chat.include_usage:
            yield protocol.chunk(name, chat.model, created, [], protocol.usage(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        if not all(finished):
            engine.cancel(rid)
