"""An OpenAI-compatible HTTP server for a minimind checkpoint.

    python serve.py --ckpt out/sft                          # http://127.0.0.1:8000/v1, chat page at /
    python serve.py --ckpt out/sft --port 8000 --api-key sk-mine --host 0.0.0.0
    python serve.py --ckpt out/sft --cors https://my.site   # let that site's pages call the API

    POST /v1/chat/completions   chat (chat template), JSON or streamed server-sent events
    POST /v1/completions        raw continuation of a prompt (bos + prompt tokens)
    GET  /v1/models             the one model served
    GET  /health                liveness, active and queued requests, totals
    GET  /                      the chat page, ui/chat.html (off with --no-ui)

Design:
- HTTP is FastAPI on uvicorn (asyncio), as in vLLM, SGLang and MiniMind's own API server: uvicorn
  does connections, keep-alive, chunked bodies, the listen backlog, a cap on open connections; a
  connection that has not sent a request's headers within --read-timeout is closed.
- Request bodies are OpenAI's schema as pydantic models, parsed by pydantic's JSON parser: every
  field its type (no "10" for 10), every number finite and in range, nesting bounded, strings valid
  UTF-8 without lone surrogates; unknown fields are ignored, as OpenAI does. Anything else is a 4xx
  with OpenAI's error body {"error": {"message", "type", "param", "code"}}, never a 5xx.
- A body is capped while it is read, whatever its framing (Content-Length or chunked); a prompt too
  large for the context is refused by its size before it is tokenized.
- One engine thread (engine.Engine) owns the model and decodes every active request together
  (continuous batching). The event loop awaits each request's events through an asyncio.Queue fed
  from the engine thread (loop.call_soon_threadsafe). Tokenizing runs in a worker thread;
  detokenizing (whole UTF-8 characters only) and stop strings (held back until they can no longer
  match) on the loop. A client that disconnects cancels its row at the next decode step.
"""
import argparse
import asyncio
import hmac
import json
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from checkpoint import add_model_args, load_from_args
from engine import Engine, GenRequest
from minimind import SamplingParams
from tokenizer import TokenDecoder, token_bytes

MAX_BODY = 4 << 20  # bytes of a request body
DRAIN_BYTES, DRAIN_SECONDS = 64 << 20, 2.0  # what of an oversized body is read and dropped before the 413
MAX_STOP, MAX_STOP_CHARS = 16, 256  # stop strings per request, characters per stop string
UI_PAGE = Path(__file__).resolve().parent / "ui" / "chat.html"


# -----------------------------------------------------------------------------
# errors: OpenAI's body, a 4xx for anything the client sent

class APIError(Exception):
    """An error answered as OpenAI's JSON."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _param(loc: tuple) -> Optional[str]:
    """("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number", "too_short",
                "too_long", "literal_error", "value_error"}


def invalid(e: ValidationError) -> APIError:
    """A pydantic validation error -> 400 naming the first offending field (never echoing its value)."""
    err = e.errors(include_url=False, include_input=False, include_context=True)[0]
    kind, param = err["type"], _param(err["loc"])
    if kind == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request ({err['msg']}).", None,
                        "invalid_json")
    if param is None:
        return APIError(400, f"The request body must be a JSON object ({err['msg']}).", None, "invalid_json")
    msg = str(err["ctx"]["error"]) if kind == "value_error" else err["msg"]
    code = ("missing_required_parameter" if kind == "missing" else
            "invalid_value" if kind in RANGE_ERRORS else "invalid_type")
    return APIError(400, f"Invalid '{param}': {msg}.", param, code)


# -----------------------------------------------------------------------------
# the request schema (OpenAI's, with vLLM's top_k, repetition_penalty and ignore_eos)

class Schema(BaseModel):
    """Types are strict (no "10" for 10, no 1 for true), numbers finite, unknown fields ignored, and a
    null field is a field not given."""
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(Schema):
    include_usage: bool = False


ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class Message(Schema):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = Field(None, validate_default=True)  # a string or a list of text parts

    @field_validator("content")
    @classmethod
    def _text(cls, c, info):
        if c is None and info.data.get("role") == "assistant":
            return ""
        if isinstance(c, str):
            return c
        if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in c):
            return "\n".join(p["text"] for p in c)
        raise ValueError('must be a string or a list of text parts, {"type": "text", "text": "..."}')


class CompletionBase(Schema):
    """What both endpoints accept."""
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # -1 and 0: off; more than the vocabulary: off
    repetition_penalty: float = Field(1.0, ge=0.01, le=10)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    seed: Optional[int] = Field(None, ge=-2 ** 63, le=2 ** 63 - 1)
    stop: Any = Field(None, validate_default=True)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise ValueError("must be a string or a list of strings")
        if stop and (len(stop) > MAX_STOP or max(map(len, stop)) > MAX_STOP_CHARS):
            raise ValueError(f"at most {MAX_STOP} stop strings of at most {MAX_STOP_CHARS} characters each")
        return [s for s in stop or [] if s]

    @field_validator("logprobs", "echo", check_fields=False)
    @classmethod
    def _unsupported(cls, v):
        if v:
            raise ValueError("not supported by this server")
        return v

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty, seed=self.seed)


class ChatCompletionRequest(CompletionBase):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False


class CompletionRequest(CompletionBase):
    prompt: Any  # a string or a list of token ids (one prompt, possibly wrapped in a list)
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int = Field(1, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, p):
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str) or (isinstance(p, list) and p and all(type(t) is int for t in p)):
            return p
        raise ValueError("must be a string or a list of token ids (one prompt per request)")


# -----------------------------------------------------------------------------
# stop strings

class StopText:
    """Text in, text out, cut at the first stop string; text that may still become a stop string
    is held back until it cannot."""

    def __init__(self, stops: list):
        self.stops, self.buf, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[:min(hits)], "", True
            return out
        hold = 0  # longest tail of buf that begins some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:n]):
                    hold = n
                    break
        out = self.buf[:len(self.buf) - hold]
        self.buf = self.buf[len(out):]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


# -----------------------------------------------------------------------------
# HTTP: routes, body cap, errors

def _sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()) + b"\n\n"


def _usage(prompt_tokens: int, n: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


class Routes:
    """The endpoints, and what they share: engine, tokenizer, model name and context, limits."""

    def __init__(self, engine: Engine, tok, name: str = "minimind", context: int = 2048,
                 api_key: Optional[str] = None, default_max_tokens: int = 512, read_timeout: float = 30.0):
        self.engine, self.tok, self.name, self.context = engine, tok, name, context
        self.api_key, self.read_timeout = api_key, read_timeout
        self.default_max_tokens = default_max_tokens
        self.default_max_tokens_raw = 16  # OpenAI's default for /v1/completions
        self.table = token_bytes(tok)  # token id -> bytes, shared by every TokenDecoder
        # no token stands for more bytes than this: a text of n bytes is at least n / this tokens
        self.max_token_bytes = max(1, max(map(len, token_bytes(tok, skip_special_tokens=False))))
        self.created = int(time.time())

    # --- plain routes
    async def health(self):
        return {"status": "ok", **self.engine.load(), **self.engine.stats}

    def _card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "minimind",
                "context_length": self.context}

    async def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [self._card()]}

    async def model(self, request: Request, model_id: str):
        self._authorize(request)
        if model_id != self.name:
            raise APIError(404, f"The model '{model_id[:100]}' does not exist", "model", "model_not_found")
        return self._card()

    async def page(self):
        if not UI_PAGE.is_file():
            raise APIError(404, "The chat page ui/chat.html is not installed", None, "not_found")
        return HTMLResponse(UI_PAGE.read_bytes(), headers={"Cache-Control": "no-cache"})

    # --- completions
    async def chat(self, request: Request):
        self._authorize(request)
        r = await self._parse(request, ChatCompletionRequest)
        messages = [{"role": ROLE_ALIASES[m.role], "content": m.content} for m in r.messages]
        self._fits(sum(len(m["content"].encode()) for m in messages), len(messages), "messages")
        prompt = await run_in_threadpool(self.tok.encode_chat, messages, True)
        name = "max_completion_tokens" if r.max_completion_tokens is not None else "max_tokens"
        return await self._generate(request, r, prompt, "messages", name, True)

    async def completions(self, request: Request):
        self._authorize(request)
        r = await self._parse(request, CompletionRequest)
        if isinstance(r.prompt, str):
            self._fits(len(r.prompt.encode()), 1, "prompt")
            prompt = [self.tok.bos_id] + await run_in_threadpool(self.tok.encode, r.prompt)
        else:
            self._fits(0, len(r.prompt), "prompt")
            if not all(0 <= t < self.tok.vocab_size for t in r.prompt):
                raise APIError(400, f"'prompt' token ids must be in [0, {self.tok.vocab_size})", "prompt",
                               "invalid_value")
            prompt = r.prompt
        return await self._generate(request, r, prompt, "prompt", "max_tokens", False)

    def _authorize(self, request: Request):
        if not self.api_key:
            return
        got = request.headers.get("authorization", "")
        got = got[7:] if got.startswith("Bearer ") else ""
        if not hmac.compare_digest(got.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", None, "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _parse(self, request: Request, schema):
        try:  # BodyLimit raises the 413 from here
            body = await asyncio.wait_for(request.body(), self.read_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"The request body did not arrive within {self.read_timeout:g} s.", None,
                           "request_timeout") from None
        except ClientDisconnect:  # or sent one HTTP could not parse: nobody to answer
            raise APIError(400, "The client went away while sending the body.", None, "client_disconnected") from None
        try:
            return schema.model_validate_json(body)
        except ValidationError as e:
            raise invalid(e) from None

    def _too_long(self, what: str, n: int) -> APIError:
        return APIError(400, f"This model's maximum context length is {self.context} tokens. However, {what} "
                        f"{n} tokens, which leaves no room for a completion.", None, "context_length_exceeded")

    def _fits(self, n_bytes: int, n_parts: int, param: str):
        """Refuse, before tokenizing, a prompt that cannot fit: every token stands for at most
        max_token_bytes bytes, and every part (message) is at least one token."""
        least = -(-n_bytes // self.max_token_bytes) + n_parts
        if least >= self.context:
            e = self._too_long("your prompt is at least", least)
            e.param = param
            raise e

    async def _generate(self, request: Request, r: CompletionBase, prompt: list, prompt_param: str, max_name: str,
                        chat: bool):
        P = len(prompt)
        if P >= self.context:
            e = self._too_long("your prompt is", P)
            e.param = prompt_param
            raise e
        max_tokens = getattr(r, max_name)
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens if chat else self.default_max_tokens_raw, self.context - P)
        elif P + max_tokens > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                           f"requested {P + max_tokens} tokens ({P} in the prompt, {max_tokens} for the completion).",
                           max_name, "context_length_exceeded")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        req = GenRequest(prompt=prompt, max_tokens=max_tokens, params=r.sampling(), ignore_eos=r.ignore_eos,
                         emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        if not self.engine.submit(req):
            raise APIError(429, "The server is overloaded: too many requests are waiting. Retry later.", None,
                           "rate_limit_exceeded", "rate_limit_error")
        watcher = asyncio.create_task(self._watch(request, req, events))
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": self.name}
        if r.stream:
            include_usage = bool(r.stream_options and r.stream_options.include_usage)
            return StreamingResponse(self._stream(req, events, watcher, r.stop, chat, meta, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return await self._whole(req, events, r.stop, chat, meta)
        finally:
            watcher.cancel()
            req.cancelled.set()  # a no-op when finished; frees the row when a stop string hit

    @staticmethod
    async def _watch(request: Request, req: GenRequest, events: asyncio.Queue):
        """Cancel the request's row when its client disconnects (the body is read: the next ASGI
        message is the disconnect, or comes once the response is complete)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        req.cancelled.set()
        events.put_nowait(("gone",))

    async def _texts(self, req: GenRequest, events: asyncio.Queue, stops: list):
        """("text", str) pieces, then ("end", finish_reason, completion_tokens), ("error", message),
        or ("gone",) when the client left."""
        dec, cut, n = TokenDecoder(self.tok, table=self.table), StopText(stops), 0
        while True:
            ev = await events.get()
            if ev[0] == "token":
                n += 1
                text = cut.feed(dec.feed(ev[1]))
                if text:
                    yield ("text", text)
                if cut.stopped:
                    req.cancelled.set()
                    yield ("end", "stop", n)
                    return
            elif ev[0] == "end":
                text = cut.feed(dec.flush()) + cut.flush()
                if text:
                    yield ("text", text)
                yield ev
                return
            else:
                yield ev
                return

    async def _whole(self, req, events, stops, chat, meta):
        parts, finish, n = [], None, 0
        async for ev in self._texts(req, events, stops):
            if ev[0] == "text":
                parts.append(ev[1])
            elif ev[0] == "end":
                finish, n = ev[1], ev[2]
            elif ev[0] == "gone":
                return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
            else:
                raise APIError(500, f"generation failed: {ev[1]}", None, "internal_error", "server_error")
        text, usage = "".join(parts), _usage(len(req.prompt), n)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}

    async def _stream(self, req, events, watcher, stops, chat, meta, include_usage):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({**meta, "object": kind, "choices": [c]})

        try:
            if chat:
                yield chunk(role=True)
            async for ev in self._texts(req, events, stops):
                if ev[0] == "text":
                    yield chunk(ev[1])
                elif ev[0] == "end":
                    yield chunk(finish=ev[1])
                    if include_usage:
                        yield _sse({**meta, "object": kind, "choices": [], "usage": _usage(len(req.prompt), ev[2])})
                elif ev[0] == "gone":
                    return
                else:
                    yield _sse(APIError(500, f"generation failed: {ev[1]}", None, "internal_error",
                                        "server_error").body())
            yield _sse(b"[DONE]")
        finally:
            watcher.cancel()
            req.cancelled.set()


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413, however it is framed
    (Content-Length or chunked), counted as it arrives so that nothing over the limit is kept. The
    413 is raised from the app's own read of the body (its error handler writes OpenAI's body).
    Before that, the rest of the body is read and dropped (DRAIN_BYTES, DRAIN_SECONDS at most) so that
    a client still sending gets to read the answer instead of a connection reset."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if message.get("more_body"):
                        await _drain(receive)
                    raise APIError(413, f"The request body is over {self.limit} bytes.", None, "request_too_large")
            return message

        await self.app(scope, limited, send)


async def _drain(receive):
    loop = asyncio.get_running_loop()
    deadline, n = loop.time() + DRAIN_SECONDS, 0
    while n < DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), deadline - loop.time())
        except asyncio.TimeoutError:
            return
        n += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return


async def _api_error(request: Request, exc: APIError):
    return exc.response()


async def _http_error(request: Request, exc: HTTPException):
    """Starlette's own errors (unknown path, method not allowed) in OpenAI's shape."""
    what = f"{request.method} {request.url.path}"[:200]
    message, code = {404: (f"Unknown request URL: {what}.", "not_found"),
                     405: (f"Method not allowed: {what}.", "method_not_allowed")}.get(
        exc.status_code, (str(exc.detail), None))
    return APIError(exc.status_code, message, None, code, headers=exc.headers).response()


async def _bad_params(request: Request, exc: RequestValidationError):
    return APIError(400, f"Invalid request: {exc.errors()[0].get('msg', '')}", None, "invalid_value").response()


async def _bug(request: Request, exc: Exception):
    """A bug: a 500 in OpenAI's shape (the traceback is logged by the server)."""
    return APIError(500, f"internal error: {type(exc).__name__}", None, "internal_error", "server_error").response()


def make_app(engine: Engine, tok, name: str = "minimind", context: int = 2048, api_key: Optional[str] = None,
             default_max_tokens: int = 512, ui: bool = True, cors: tuple = (), max_body: int = MAX_BODY,
             read_timeout: float = 30.0) -> FastAPI:
    """The ASGI app; the engine is started (and stopped) by the caller."""
    routes = Routes(engine, tok, name, context, api_key, default_max_tokens, read_timeout)
    app = FastAPI(title="minimind", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/health", routes.health, methods=["GET", "HEAD"])
    app.add_api_route("/v1/models", routes.models, methods=["GET", "HEAD"])
    app.add_api_route("/v1/models/{model_id:path}", routes.model, methods=["GET", "HEAD"])
    app.add_api_route("/v1/chat/completions", routes.chat, methods=["POST"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    if ui:  # no key needed: the page asks for one when the API answers 401
        app.add_api_route("/", routes.page, methods=["GET", "HEAD"])
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _bad_params)
    app.add_exception_handler(Exception, _bug)
    app.add_middleware(BodyLimit, limit=max_body)
    if cors:  # outermost: errors carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.state.routes = routes
    return app


# -----------------------------------------------------------------------------
# the server: uvicorn on a socket bound here

class H11(H11Protocol):
    """uvicorn's HTTP/1.1 with two changes:
    - a deadline for each request's headers, counted from the connection or from the previous
      response (uvicorn has none: a client trickling a byte a minute holds a connection forever);
    - when uvicorn itself answers 400 to a body HTTP cannot parse, the app's request counts as
      disconnected at once, so the app's own answer is dropped instead of hitting h11's state
      machine (uvicorn marks it only later, when the connection is gone)."""
    header_timeout = 30.0

    def send_400_response(self, msg: str):
        super().send_400_response(msg)
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()

    def connection_made(self, transport):
        super().connection_made(transport)
        self._deadline = None
        self._arm()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc):
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self):
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _expire(self):
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # no request has begun
            self.transport.close()


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket, or exit with one line saying why not (port in use, bad address)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        sys.exit(f"error: cannot listen on {host}:{port}: {e.strerror or e}")
    return sock


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    # network
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--model-name", default="minimind", help="model id reported by /v1/models and in responses")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="let pages from ORIGIN (e.g. https://my.site, or *) call the API; repeatable; default none")
    p.add_argument("--no-ui", action="store_true", help="do not serve the chat page ui/chat.html at /")
    # limits
    p.add_argument("--max-tokens", type=int, default=512,
                   help="chat completion length when a request gives no max_tokens (capped by the context)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most (more get 429)")
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections at most (more get 503 at once)")
    p.add_argument("--max-body", type=int, default=MAX_BODY, help="bytes of a request body at most (more get 413)")
    p.add_argument("--backlog", type=int, default=2048, help="connections waiting to be accepted at most")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client may take to send a request's headers, and again its body")
    p.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection stays open")
    p.add_argument("--shutdown-after", type=float, default=0, help="stop after this many seconds (tests); 0 = never")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile: the same tokens, faster steps, compiled before serving "
                        "(~10-60 s on a CPU; BENCHMARKS.md, decode)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ("max_tokens", "max_batch", "max_queue", "max_connections", "max_body", "backlog", "read_timeout",
                 "keep_alive"):
        if not getattr(args, flag) > 0:
            sys.exit(f"error: --{flag.replace('_', '-')} must be positive")
    sock = listen(args.host, args.port, args.backlog)  # before the model loads: a busy port fails at once
    model, tok, device, context = load_from_args(args)
    engine = Engine(model, tok.eos_id, args.max_batch, args.max_queue, compile=args.compile).start()
    app = make_app(engine, tok, args.model_name, context, args.api_key, args.max_tokens, not args.no_ui,
                   tuple(args.cors), args.max_body, args.read_timeout)
    config = uvicorn.Config(app, http=type("H11", (H11,), {"header_timeout": args.read_timeout}),
                            ws="none", lifespan="off", backlog=args.backlog, limit_concurrency=args.max_connections,
                            timeout_keep_alive=args.keep_alive, timeout_graceful_shutdown=3,
                            log_level="error" if args.quiet else "info", access_log=not args.quiet)
    server = uvicorn.Server(config)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"serving {args.model_name} ({device}, context {context}) on http://{host}:{port}/v1", flush=True)
    if args.shutdown_after > 0:
        timer = threading.Timer(args.shutdown_after, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
