"""An OpenAI-compatible HTTP server for a minimind checkpoint.

    python serve.py --ckpt out/sft                          # http://127.0.0.1:8000/v1, chat page at /
    python serve.py --ckpt out/sft --port 8000 --api-key sk-mine --host 0.0.0.0 --allowed-hosts my.box
    python serve.py --ckpt out/sft --cors https://my.site   # let that site's pages call the API

    POST /v1/chat/completions   chat (chat template), JSON or streamed server-sent events
    POST /v1/completions        raw continuation of a prompt (bos + prompt tokens)
    GET  /v1/models             the one model served
    GET  /health                liveness, active and queued requests, totals
    GET  /                      the chat page, ui/chat.html (off with --no-ui)

Chat (MiniMind-3's chat template, tokenizer.render_chat; what MiniMind's own server accepts too):
- messages: roles system, developer (= system), user, assistant, tool. An assistant message may
  carry `tool_calls` ([{id, type: "function", function: {name, arguments: JSON text or object}}],
  content then null or "") and `reasoning_content` (its thinking, rendered in its think block); a
  tool message (`content`, `tool_call_id`) answers the assistant's calls: it must follow an
  assistant message with tool_calls or another tool message. The template shows neither ids nor names.
- tools: OpenAI function tools [{type: "function", function: {name, description, parameters}}],
  listed as sent in the system turn. tool_choice: "none" leaves them out of the prompt; "auto"
  (the default), "required" and a named function {type: "function", function: {name}} put them in
  (the named one must be among them). Nothing forces a call: the model is asked, not constrained,
  as in vLLM without guided decoding. parallel_tool_calls is accepted and ignored.
- thinking: `open_thinking` (MiniMind's server), or chat_template_kwargs.open_thinking (MiniMind's
  template switch) or chat_template_kwargs.enable_thinking (Qwen3's); any one true opens a think
  block at the end of the prompt, else the prompt ends with an empty one. Other template kwargs
  are ignored.
- The reply is parsed as vLLM's reasoning and tool parsers do (tokenizer.ReplyParser): the think
  block becomes message.reasoning_content (streamed as delta.reasoning_content), each
  <tool_call>{"name", "arguments"}</tool_call> an entry of message.tool_calls (streamed whole, one
  delta per call: {index, id, type, function: {name, arguments}}; a block whose JSON does not parse
  stays in the content), the rest message.content (null when the reply only calls tools).
  Tool calls are parsed whatever the request (as MiniMind's server does). finish_reason is
  "tool_calls" when the reply called a tool and ended with eos. Stop strings cut the content only:
  the thinking and the calls are not searched.
- logprobs are refused on chat (see /v1/completions).

Completions:
- prompt: a string (bos + its tokens) or a list of token ids (as given), or either in a one-item list.
- echo: the answer's text begins with the prompt (decoded tokens for an id prompt).
- logprobs: 0..20, OpenAI's legacy object {tokens, token_logprobs, top_logprobs, text_offset} for
  the completion's tokens (eos included when the completion ended there, named as it is), after
  the prompt's with echo (the first has no logprob: None). Raw model probabilities (no
  temperature, top-k/p or penalties) from one forward pass over prompt + completion
  (scoring.token_logprobs), run by the engine thread between two decode steps (Engine.call), never
  beside one: decoding pauses for it. top_logprobs: the n most likely tokens at each position.
  Streamed with logprobs, the answer comes as one chunk once scored.
- max_tokens 0 with echo: nothing is generated, the prompt alone is answered (and scored with
  logprobs). lm-evaluation-harness's local-completions sends max_tokens 1, echo and logprobs 1 as
  token ids and reads token_logprobs[context:-1]: the eos row keeps that right when the one token
  generated is eos.

Design:
- HTTP is FastAPI on uvicorn (asyncio), as in vLLM, SGLang and MiniMind's own API server: uvicorn
  does connections, keep-alive, chunked bodies, the listen backlog, a cap on open connections; a
  connection that has not sent a request's headers within --read-timeout is closed.
- Request bodies are OpenAI's schema as pydantic models, parsed by pydantic's JSON parser: every
  field its type (no "10" for 10), every number finite and in range, nesting bounded, strings valid
  UTF-8 without lone surrogates; unknown fields are ignored, as OpenAI does. Anything else is a 4xx
  with OpenAI's error body {"error": {"message", "type", "param", "code"}}, never a 5xx.
- Pages of other sites: the Host header must name the server (localhost, 127.0.0.1, [::1] or --host
  at the port bound; --allowed-hosts adds names), against DNS rebinding (400 otherwise), and an API
  POST must be application/json (415 otherwise): a page may send text/plain without a preflight.
- A body is capped while it is read, whatever its framing (Content-Length or chunked); a prompt too
  large for the context is refused by its size before it is tokenized.
- One engine thread (engine.Engine) owns the model and decodes every active request together
  (continuous batching). The event loop awaits each request's events through an asyncio.Queue fed
  from the engine thread (loop.call_soon_threadsafe). Tokenizing runs in a worker thread;
  detokenizing (whole UTF-8 characters only) and stop strings (held back until they can no longer
  match) on the loop. A client that disconnects cancels its row at the next decode step. A stream
  that fails past its first chunk ends with OpenAI's error event and [DONE].
- OpenAI's wire format (schemas, error bodies, stop strings, answer and chunk shapes) is
  openai_format.py; this file is the routes, the middleware and the server.
"""
import argparse
import asyncio
import contextlib
import hmac
import logging
import socket
import sys
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Optional

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from checkpoint import add_model_args, load_or_exit
from engine import Engine, GenRequest
from openai_format import (APIError, ChatCompletionRequest, ChatOut, CompletionBase, CompletionRequest, TextOut,
                           chat_message, chunk, conversation, invalid, sse, usage, usage_chunk)
from scoring import openai_logprobs, token_logprobs
from tokenizer import TokenDecoder, render_chat, token_bytes

MAX_BODY = 4 << 20  # bytes of a request body
DRAIN_BYTES, DRAIN_SECONDS = 64 << 20, 2.0  # what of an oversized body is read and dropped before the 413
UI_PAGE = Path(__file__).resolve().parent / "ui" / "chat.html"
LOOPBACK = ("localhost", "127.0.0.1", "[::1]")  # Host names always answered (at the port bound)
LOG = logging.getLogger("uvicorn.error")  # uvicorn's own: its level, format and stream


# -----------------------------------------------------------------------------
# HTTP: routes, body cap, errors

class Routes:
    """The endpoints, and what they share: engine, tokenizer, model name and context, limits."""

    def __init__(self, engine: Engine, tok, name: str = "minimind", context: int = 2048,
                 api_key: Optional[str] = None, default_max_tokens: int = 512, read_timeout: float = 30.0):
        self.engine, self.tok, self.name, self.context = engine, tok, name, context
        self.api_key, self.read_timeout = api_key, read_timeout
        self.default_max_tokens = default_max_tokens
        self.default_max_tokens_raw = 16  # OpenAI's default for /v1/completions
        self.table = token_bytes(tok)  # token id -> bytes, shared by every TokenDecoder
        shown = token_bytes(tok, skip_special_tokens=False)
        # no token stands for more bytes than this: a text of n bytes is at least n / this tokens
        self.max_token_bytes = max(1, max(map(len, shown)))
        # logprobs show special tokens (bos, eos) by name, as OpenAI shows <|endoftext|>
        self.names = {i: b.decode("utf-8", "replace") for i, b in enumerate(shown) if b and not self.table[i]}
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
        messages, tools = conversation(r)
        thinking = r.thinking()
        text = render_chat(messages, tools=tools, add_generation_prompt=True, open_thinking=thinking)
        self._fits(len(text.encode()), 1, "messages")
        prompt = await run_in_threadpool(self.tok.encode_chat, messages, tools=tools, open_thinking=thinking)
        name = "max_completion_tokens" if r.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._budget(r, len(prompt), "messages", name, self.default_max_tokens)
        req, events, watcher = self._start(request, r, prompt, max_tokens)
        meta, out = self._meta("chatcmpl-"), ChatOut(r.stop, thinking)
        if r.stream:
            return StreamingResponse(self._stream(req, events, watcher, out, meta, r), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        with self._finally(req, watcher):
            got, finish, n, _ = await self._collect(req, events, out)
        if got is None:
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        choice = {"index": 0, "message": chat_message(got), "logprobs": None, "finish_reason": finish}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage(len(prompt), n)}

    async def completions(self, request: Request):
        self._authorize(request)
        r = await self._parse(request, CompletionRequest)
        if r.max_tokens == 0 and not r.echo:
            raise APIError(400, "Invalid 'max_tokens': 0 needs 'echo' (the prompt is then the whole answer).",
                           "max_tokens", "invalid_value")
        if isinstance(r.prompt, str):
            self._fits(len(r.prompt.encode()), 1, "prompt")
            prompt = [self.tok.bos_id] + await run_in_threadpool(self.tok.encode, r.prompt)
            prompt_text = r.prompt
        else:
            self._fits(0, len(r.prompt), "prompt")
            if not all(0 <= t < self.tok.vocab_size for t in r.prompt):
                raise APIError(400, f"'prompt' token ids must be in [0, {self.tok.vocab_size})", "prompt",
                               "invalid_value")
            prompt = r.prompt
            shown = r.echo or r.logprobs is not None  # the text, or its length for the offsets
            prompt_text = b"".join(self.table[t] for t in prompt).decode("utf-8", "replace") if shown else ""
        max_tokens = self._budget(r, len(prompt), "prompt", "max_tokens", self.default_max_tokens_raw)
        meta, out, echoed = self._meta("cmpl-"), TextOut(r.stop), prompt_text if r.echo else ""
        got, finish, n, ids = {}, "length", 0, []
        if max_tokens:
            req, events, watcher = self._start(request, r, prompt, max_tokens)
            if r.stream and r.logprobs is None:
                return StreamingResponse(self._stream(req, events, watcher, out, meta, r, echoed),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            with self._finally(req, watcher):
                got, finish, n, ids = await self._collect(req, events, out)
            if got is None:
                return Response(status_code=499)
        logprobs = None
        if r.logprobs is not None:
            logprobs = await self._logprobs(prompt, ids, r.logprobs, r.echo, len(prompt_text))
        choice = {"index": 0, "text": echoed + got.get("text", ""), "logprobs": logprobs, "finish_reason": finish}
        if r.stream:  # scored (or nothing generated): the whole answer in one chunk
            return StreamingResponse(self._replay(choice, meta, r, len(prompt), n), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return {**meta, "object": "text_completion", "choices": [choice], "usage": usage(len(prompt), n)}

    async def _logprobs(self, prompt: list, ids: list, top_n: int, echo: bool, prompt_chars: int) -> dict:
        """The choice's `logprobs` for the completion's tokens `ids` (eos too when it ended there),
        after the prompt's with echo: raw model probabilities from one forward pass over prompt +
        completion (scoring.token_logprobs), run by the engine thread between two decode steps so
        that it never overlaps the engine's own use of the model (Engine.call)."""
        work = partial(token_logprobs, self.engine.model, prompt + ids, self.context, top_n)
        try:
            logprobs, top = await asyncio.wrap_future(self.engine.call(work))
        except Exception as e:
            raise APIError(500, f"scoring failed: {type(e).__name__}: {e}", None, "internal_error",
                           "server_error") from None
        first = 0 if echo else len(prompt)
        return openai_logprobs(self.table, (prompt + ids)[first:], logprobs[first:], top[first:],
                               0 if echo else prompt_chars, self.names)

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
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            # a page of any site may POST text/plain or a form without asking (no CORS preflight): not here
            raise APIError(415, "The request body must be JSON, sent with 'Content-Type: application/json'.", None,
                           "unsupported_media_type")
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

    def _budget(self, r: CompletionBase, P: int, prompt_param: str, max_name: str, default: int) -> int:
        """Tokens the completion may have: the request's max_tokens (or max_completion_tokens), else
        `default` within the context; a prompt that leaves no room, or a request over the context, is a 400."""
        max_tokens = getattr(r, max_name)
        if P > self.context or (P == self.context and max_tokens != 0):  # 0: the prompt alone, scored
            e = self._too_long("your prompt is", P)
            e.param = prompt_param
            raise e
        if max_tokens is None:
            return min(default, self.context - P)
        if P + max_tokens > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                           f"requested {P + max_tokens} tokens ({P} in the prompt, {max_tokens} for the completion).",
                           max_name, "context_length_exceeded")
        return max_tokens

    def _start(self, request: Request, r: CompletionBase, prompt: list, max_tokens: int):
        """Hand a generation to the engine -> (its GenRequest, the queue of its events, the task that
        cancels it when the client disconnects); 429 when too many are waiting."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        req = GenRequest(prompt=prompt, max_tokens=max_tokens, params=r.sampling(), ignore_eos=r.ignore_eos,
                         emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        if not self.engine.submit(req):
            raise APIError(429, "The server is overloaded: too many requests are waiting. Retry later.", None,
                           "rate_limit_exceeded", "rate_limit_error")
        return req, events, asyncio.create_task(self._watch(request, req, events))

    @staticmethod
    @contextlib.contextmanager
    def _finally(req: GenRequest, watcher: asyncio.Task):
        """Whatever happens: stop watching the client, free the row (a no-op when it finished)."""
        try:
            yield
        finally:
            watcher.cancel()
            req.cancelled.set()

    def _meta(self, prefix: str) -> dict:
        return {"id": prefix + uuid.uuid4().hex[:24], "created": int(time.time()), "model": self.name}

    @staticmethod
    async def _watch(request: Request, req: GenRequest, events: asyncio.Queue):
        """Cancel the request's row when its client disconnects (the body is read: the next ASGI
        message is the disconnect, or comes once the response is complete)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        req.cancelled.set()
        events.put_nowait(("gone",))

    async def _answer(self, req: GenRequest, events: asyncio.Queue, out):
        """("delta", dict) pieces of the answer as `out` (TextOut, ChatOut) shapes them, then
        ("end", finish_reason, completion_tokens, token ids) -- the ids counted, eos included when
        the completion ended there --, ("error", message), or ("gone",) when the client left."""
        dec, ids = TokenDecoder(self.tok, table=self.table), []
        while True:
            ev = await events.get()
            if ev[0] == "token":
                ids.append(ev[1])
                for d in out.feed(dec.feed(ev[1])):
                    yield ("delta", d)
                if out.stopped:
                    req.cancelled.set()
                    yield ("end", "stop", len(ids), ids)
                    return
            elif ev[0] == "end":
                for d in out.feed(dec.flush()) + out.finish():
                    yield ("delta", d)
                yield ("end", out.finish_reason(ev[1]), ev[2], ids + [self.engine.eos_id] * (ev[1] == "stop"))
                return
            else:
                yield ev
                return

    async def _collect(self, req, events, out):
        """The whole answer -> (deltas merged: strings joined, tool calls listed; finish_reason,
        completion_tokens, token ids), or None first when the client left."""
        got = {}
        async for ev in self._answer(req, events, out):
            if ev[0] == "delta":
                for k, v in ev[1].items():
                    got[k] = got.get(k, [] if k == "tool_calls" else "") + v
            elif ev[0] == "end":
                return got, ev[1], ev[2], ev[3]
            elif ev[0] == "gone":
                return None, None, 0, []
            else:
                raise APIError(500, f"generation failed: {ev[1]}", None, "internal_error", "server_error")

    async def _stream(self, req, events, watcher, out, meta, r: CompletionBase, prefix: str = ""):
        """Server-sent events: a chunk per delta as it comes (chat: the role first; completions with
        echo: the prompt first), the finish reason, usage when asked, [DONE]."""
        chat, include_usage = isinstance(r, ChatCompletionRequest), bool(r.stream_options and
                                                                         r.stream_options.include_usage)
        with self._finally(req, watcher):
            if chat:
                yield chunk(meta, r, {"delta": {"role": "assistant", "content": ""}})
            if prefix:
                yield chunk(meta, r, {"text": prefix})
            try:
                async for ev in self._answer(req, events, out):
                    if ev[0] == "delta":
                        yield chunk(meta, r, {"delta": ev[1]} if chat else ev[1])
                    elif ev[0] == "end":
                        yield chunk(meta, r, {"finish_reason": ev[1], **({"delta": {}} if chat else {})})
                        if include_usage:
                            yield usage_chunk(meta, r, len(req.prompt), ev[2])
                    elif ev[0] == "gone":
                        return
                    else:
                        yield sse(APIError(500, f"generation failed: {ev[1]}", None, "internal_error",
                                           "server_error").body())
            except Exception as e:  # a bug past the 200: the stream still ends as OpenAI's do, with [DONE]
                LOG.exception("%s failed mid-stream", meta["id"])
                yield sse(bug(e).body())
            yield sse(b"[DONE]")

    async def _replay(self, choice: dict, meta: dict, r: CompletionBase, prompt_tokens: int, n: int):
        """A finished /v1/completions choice as a stream: its text and logprobs in one chunk, then
        the finish reason (usage when asked), [DONE]."""
        yield chunk(meta, r, {**choice, "finish_reason": None})
        yield chunk(meta, r, {"finish_reason": choice["finish_reason"]})
        if r.stream_options and r.stream_options.include_usage:
            yield usage_chunk(meta, r, prompt_tokens, n)
        yield sse(b"[DONE]")


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


def allowed_hosts(bound: str, port: int, more: str = "") -> Optional[frozenset]:
    """The Host headers HostCheck lets through: "name:port" for the loopback names and the address
    bound, at the port bound, and the entries of `more` ("a,b:8443": a at any port, b at 8443 only);
    None (any Host) when `more` has "*"."""
    extra = {h.strip().lower() for h in more.split(",") if h.strip()}
    if "*" in extra:
        return None
    bound = f"[{bound}]" if ":" in bound else bound  # an IPv6 address is bracketed in Host
    return frozenset({f"{name}:{port}" for name in (*LOOPBACK, bound.lower())} | extra)


def host_allowed(host: str, hosts: frozenset) -> bool:
    """Whether a Host header is among `hosts` (allowed_hosts'): its "name:port", or its name alone
    (an entry for any port). A Host without a port is port 80, as HTTP has it."""
    host = host.strip().lower()
    name, port = (host, "80") if host.endswith("]") or ":" not in host else host.rsplit(":", 1)
    return bool(name) and port.isdigit() and (f"{name}:{int(port)}" in hosts or name in hosts)


class HostCheck:
    """ASGI middleware: a request whose Host header names another server gets a 400 in OpenAI's
    shape before anything else runs. A page of any site can have its own name resolve to this
    address (DNS rebinding) and then call the server as if it were the page's own: its requests
    carry that name in Host, which is not one the server was started as."""

    def __init__(self, app, hosts: frozenset):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if not host_allowed(host, self.hosts):
                e = APIError(400, "The Host header does not name this server (serve.py --allowed-hosts adds names).",
                             None, "invalid_host")
                return await error_response(e)(scope, receive, send)
        await self.app(scope, receive, send)


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


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _api_error(request: Request, exc: APIError):
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException):
    """Starlette's own errors (unknown path, method not allowed) in OpenAI's shape."""
    what = f"{request.method} {request.url.path}"[:200]
    message, code = {404: (f"Unknown request URL: {what}.", "not_found"),
                     405: (f"Method not allowed: {what}.", "method_not_allowed")}.get(
        exc.status_code, (str(exc.detail), None))
    return error_response(APIError(exc.status_code, message, None, code, headers=exc.headers))


async def _bad_params(request: Request, exc: RequestValidationError):
    return error_response(APIError(400, f"Invalid request: {exc.errors()[0].get('msg', '')}", None, "invalid_value"))


def bug(exc: Exception) -> APIError:
    """A bug as OpenAI's 500: its type named, its message (which may quote anything) not."""
    return APIError(500, f"internal error: {type(exc).__name__}", None, "internal_error", "server_error")


async def _bug(request: Request, exc: Exception):
    """A bug before the response began: a 500 (the traceback is logged by the server)."""
    return error_response(bug(exc))


def make_app(engine: Engine, tok, name: str = "minimind", context: int = 2048, api_key: Optional[str] = None,
             default_max_tokens: int = 512, ui: bool = True, cors: tuple = (), max_body: int = MAX_BODY,
             read_timeout: float = 30.0, hosts: Optional[frozenset] = None) -> FastAPI:
    """The ASGI app; the engine is started (and stopped) by the caller. `hosts`: the Host headers
    answered (allowed_hosts), None for any."""
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
    if hosts is not None:
        app.add_middleware(HostCheck, hosts=hosts)
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


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0..65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}")
    return int(text)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    # network
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0 = all)")
    p.add_argument("--port", type=port_number, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="more names clients may send in the Host header, comma-separated (NAME: any port, "
                        "NAME:PORT: that one), or * for any; always allowed: localhost, 127.0.0.1, [::1] and --host "
                        "at the port bound (other names get 400: DNS rebinding)")
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
    hosts = allowed_hosts(args.host, sock.getsockname()[1], args.allowed_hosts)
    model, tok, device, context = load_or_exit(args.ckpt, args.device, args.dtype, args.kernels, args.context,
                                               args.rope_scaling, args.threads)
    engine = Engine(model, tok.eos_id, args.max_batch, args.max_queue, compile=args.compile).start()
    app = make_app(engine, tok, args.model_name, context, args.api_key, args.max_tokens, not args.no_ui,
                   tuple(args.cors), args.max_body, args.read_timeout, hosts)
    config = uvicorn.Config(app, http=type("H11", (H11,), {"header_timeout": args.read_timeout}),
                            ws="none", lifespan="off", backlog=args.backlog, limit_concurrency=args.max_connections,
                            timeout_keep_alive=args.keep_alive, timeout_graceful_shutdown=3,
                            log_level="error" if args.quiet else "info", access_log=not args.quiet)
    server = uvicorn.Server(config)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.allowed_hosts:
        print("note: requests are answered only when their Host is localhost, 127.0.0.1, [::1] or --host; "
              "--allowed-hosts NAME,... adds the names clients use (* any)", file=sys.stderr)
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
