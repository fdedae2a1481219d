"""OpenAI's chat-completions schema: request validation into `ChatRequest` (every problem an `ApiError` carrying
OpenAI's error JSON), and the response / stream-chunk objects."""

from __future__ import annotations

import dataclasses
import json
import math
import time

from deepseek_vl_jax.serving.engine import Options

ROLES = ("system", "user", "assistant")
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An error answered with `{"error": {"message", "type", "param", "code"}}` and an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ChatRequest:
    model: str
    messages: list[dict]  # role + content items: {"type": "text", "text"} / {"type": "image_url", "url"}
    options: Options
    stream: bool = False
    include_usage: bool = False


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _get(body: dict, name: str, kind: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    ok = {"int": _is_int, "number": _is_number, "bool": lambda x: isinstance(x, bool),
          "str": lambda x: isinstance(x, str), "dict": lambda x: isinstance(x, dict)}[kind](value)
    if not ok:
        raise _bad(f"'{name}' must be {'an' if kind == 'int' else 'a'} {kind}, got {type(value).__name__}", name,
                   "invalid_type")
    return value


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_json")
    return body


def _messages(value) -> list[dict]:
    if not isinstance(value, list):
        raise _bad(f"'messages' must be a list, got {type(value).__name__}", "messages", "invalid_type")
    if not value:
        raise _bad("'messages' must not be empty", "messages")
    out = []
    for i, m in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{param} must be an object, got {type(m).__name__}", param, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r:.40}", f"{param}.role")
        content = m.get("content")
        if isinstance(content, str):
            items = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            items = [_item(x, f"{param}.content[{j}]", role) for j, x in enumerate(content)]
        else:
            raise _bad(f"{param}.content must be a string or a list of parts, got {type(content).__name__}",
                       f"{param}.content", "invalid_type")
        out.append({"role": role, "content": items})
    if out[-1]["role"] == "assistant":
        raise _bad("the last message must be a user or system message", f"messages[{len(out) - 1}].role")
    return out


def _item(x, param: str, role: str) -> dict:
    if not isinstance(x, dict):
        raise _bad(f"{param} must be an object, got {type(x).__name__}", param, "invalid_type")
    kind = x.get("type")
    if kind == "text":
        if not isinstance(x.get("text"), str):
            raise _bad(f"{param}.text must be a string", f"{param}.text", "invalid_type")
        return {"type": "text", "text": x["text"]}
    if kind == "image_url":
        if role != "user":
            raise _bad(f"{param}: images are only allowed in user messages", param)
        image = x.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(url, str) or not url:
            raise _bad(f"{param}.image_url.url must be a non-empty string", f"{param}.image_url.url", "invalid_type")
        return {"type": "image_url", "url": url}
    raise _bad(f"{param}.type must be 'text' or 'image_url', got {kind!r:.40}", f"{param}.type")


def parse_request(body: dict, model_names: tuple[str, ...], max_n: int) -> ChatRequest:
    """Validate a chat-completions request body (values are checked here; lengths against the model's positions
    and image contents later)."""
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("'model' must be a string naming the served model", "model", "invalid_type")
    if model not in model_names:
        raise ApiError(404, f"the model {model!r:.80} does not exist; this server serves {', '.join(model_names)}",
                       "model", "model_not_found")
    messages = _messages(body.get("messages"))
    max_tokens = _get(body, "max_completion_tokens", "int", _get(body, "max_tokens", "int"))
    if max_tokens is not None and max_tokens < 1:
        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise _bad(f"'{param}' must be at least 1, got {max_tokens}", param)
    temperature = _get(body, "temperature", "number", 1.0)
    if not 0 <= temperature <= 2:
        raise _bad(f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    top_p = _get(body, "top_p", "number", 1.0)
    if not 0 < top_p <= 1:
        raise _bad(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _get(body, "top_k", "int", 0)
    if top_k < -1:
        raise _bad(f"'top_k' must be >= 0 (0 or -1: off), got {top_k}", "top_k")
    seed = _get(body, "seed", "int")
    if seed is not None and not -(1 << 63) <= seed < (1 << 64):
        raise _bad("'seed' must fit in 64 bits", "seed")
    n = _get(body, "n", "int", 1)
    if not 1 <= n <= max_n:
        raise _bad(f"'n' must be between 1 and the server's {max_n} slots, got {n}", "n")
    stop = body.get("stop")
    stop = [] if stop is None else ([stop] if isinstance(stop, str) else stop)
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("'stop' must be a non-empty string or a list of them", "stop", "invalid_type")
    if len(stop) > MAX_STOP:
        raise _bad(f"'stop' takes at most {MAX_STOP} strings, got {len(stop)}", "stop")
    logprobs = _get(body, "logprobs", "bool", False)
    top_logprobs = _get(body, "top_logprobs", "int", 0)
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise _bad(f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {top_logprobs}", "top_logprobs")
    if top_logprobs and not logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    stream = _get(body, "stream", "bool", False)
    stream_options = _get(body, "stream_options", "dict", {})
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad("'stream_options.include_usage' must be a bool", "stream_options.include_usage", "invalid_type")
    options = Options(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                      top_k=max(top_k, 0), seed=None if seed is None else seed % (1 << 32), stop=tuple(stop), n=n,
                      logprobs=logprobs, top_logprobs=top_logprobs)
    return ChatRequest(model, messages, options, stream, include_usage)


def completion(request_id: str, model: str, choices: list[dict], usage: dict, logprobs: bool) -> dict:
    """The non-streamed response. choices: per choice {"text", "finish_reason", "logprobs"}."""
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                     "logprobs": {"content": c["logprobs"]} if logprobs else None,
                     "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)],
        "usage": usage,
    }


def chunk(request_id: str, model: str, created: int, choices: list[dict], usage: dict | None = None) -> str:
    """One SSE event of a streamed response."""
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def models(names: tuple[str, ...], created: int) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "deepseek-vl-jax"}
                                       for n in names]}


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    return ApiError(0, message, None, code, type_).body()

