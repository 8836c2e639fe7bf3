"""An OpenAI-compatible HTTP server for a minimind checkpoint.

    python serve.py --ckpt out/sft                          # http://127.0.0.1:8000/v1
    python serve.py --ckpt out/sft --port 8000 --api-key sk-mine --host 0.0.0.0

    POST /v1/chat/completions   chat (chat template), JSON or streamed server-sent events
    POST /v1/completions        raw continuation of a prompt (bos + prompt tokens)
    GET  /v1/models             the one model served
    GET  /health                liveness, active and queued requests
    GET  /                      the chat page, ui/chat.html (off with --no-ui)

Design:
- HTTP is the standard library's ThreadingHTTPServer (a thread per connection, HTTP/1.1 keep-alive,
  chunked transfer for event streams): no dependency, and the work is in the model, not the parsing.
- One engine thread (engine.Engine) owns the model and decodes every active request together
  (continuous batching); sampling is minimind's one sampler, per request, so a request's tokens do
  not depend on what else is in the batch (a seed reproduces a sample, here and in sample.py).
- Request threads only validate, tokenize, and turn tokens into text (whole UTF-8 characters only;
  stop strings are held back until they can no longer match).
- Errors are OpenAI's JSON, {"error": {"message", "type", "param", "code"}}, with a 4xx status.
"""
import argparse
import hmac
import json
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from checkpoint import add_model_args, load_from_args
from engine import Engine, GenRequest
from minimind import SamplingParams
from tokenizer import TokenDecoder, token_bytes

MAX_BODY = 4 << 20  # bytes of a request body
MAX_STOP = 16  # stop strings per request
UI_PAGE = Path(__file__).resolve().parent / "ui" / "chat.html"


# -----------------------------------------------------------------------------
# requests: validation into GenRequest

class APIError(Exception):
    """An error answered as OpenAI's JSON."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _get(body: dict, name: str, kind: str, default=None, lo=None, hi=None, lo_open: bool = False):
    """body[name] checked: kind is "number", "int", "bool" or "str"; None/missing -> default."""
    v = body.get(name)
    if v is None:
        return default
    ok = {"number": _is_num(v), "int": isinstance(v, int) and not isinstance(v, bool),
          "bool": isinstance(v, bool), "str": isinstance(v, str)}[kind]
    if not ok:
        raise APIError(400, f"'{name}' must be a {'boolean' if kind == 'bool' else kind}, got {json.dumps(v)[:50]}",
                       name, "invalid_type")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise APIError(400, f"'{name}' is {v}, it must be {'>' if lo_open else '>='} {lo}", name,
                       "integer_below_min_value" if kind == "int" else "invalid_value")
    if hi is not None and v > hi:
        raise APIError(400, f"'{name}' is {v}, it must be <= {hi}", name,
                       "integer_above_max_value" if kind == "int" else "invalid_value")
    return v


def _stops(body: dict) -> list:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' has {len(stop)} strings, at most {MAX_STOP} are allowed", "stop", "invalid_value")
    return [s for s in stop if s]


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None and m["role"] == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: text only
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                               f"messages[{i}].content", "invalid_value")
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                   f"messages[{i}].content", "invalid_type")


ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_messages(body: dict) -> list:
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(msgs, list):
        raise APIError(400, "'messages' must be an array", "messages", "invalid_type")
    if not msgs:
        raise APIError(400, "'messages' must not be empty", "messages", "empty_array")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLE_ALIASES:
            raise APIError(400, f"messages[{i}].role {json.dumps(role)[:40]} is not supported "
                           f"(expected one of {sorted(ROLE_ALIASES)})", f"messages[{i}].role", "invalid_value")
        out.append({"role": ROLE_ALIASES[role], "content": _content({**m, "role": ROLE_ALIASES[role]}, i)})
    return out


def parse_prompt(body: dict, tok, vocab: int) -> list:
    """/v1/completions prompt -> ids: a string, or one-element list of a string, or token ids."""
    p = body.get("prompt")
    if p is None:
        raise APIError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return [tok.bos_id] + tok.encode(p)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not all(0 <= t < vocab for t in p):
            raise APIError(400, f"'prompt' token ids must be in [0, {vocab})", "prompt", "invalid_value")
        return list(p)
    raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                   "prompt", "invalid_type")


def build_request(body: dict, prompt: list, context: int, default_max_tokens: int) -> GenRequest:
    """Sampling fields shared by both endpoints -> GenRequest (prompt and budget checked)."""
    n = _get(body, "n", "int", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", "n", "invalid_value")
    if _get(body, "logprobs", "bool" if "messages" in body else "int", None):
        raise APIError(400, "'logprobs' is not supported", "logprobs", "invalid_value")
    if "messages" not in body:
        if _get(body, "echo", "bool", False):
            raise APIError(400, "'echo' is not supported", "echo", "invalid_value")
        if _get(body, "best_of", "int", 1) != 1:
            raise APIError(400, "only best_of=1 is supported", "best_of", "invalid_value")
    P = len(prompt)
    if P >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, your prompt is "
                       f"{P} tokens, which leaves no room for a completion.", "messages" if "messages" in body
                       else "prompt", "context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, name, "int", None, lo=1)
    if max_tokens is None:
        max_tokens = min(default_max_tokens, context - P)
    elif P + max_tokens > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{P + max_tokens} tokens ({P} in the prompt, {max_tokens} for the completion).",
                       name, "context_length_exceeded")
    top_k = _get(body, "top_k", "int", 0, lo=-1)
    params = SamplingParams(
        temperature=float(_get(body, "temperature", "number", 1.0, lo=0, hi=2)),
        top_p=float(_get(body, "top_p", "number", 1.0, lo=0, hi=1, lo_open=True)),
        top_k=max(top_k, 0),
        repetition_penalty=float(_get(body, "repetition_penalty", "number", 1.0, lo=0, hi=10, lo_open=True)),
        frequency_penalty=float(_get(body, "frequency_penalty", "number", 0.0, lo=-2, hi=2)),
        presence_penalty=float(_get(body, "presence_penalty", "number", 0.0, lo=-2, hi=2)),
        seed=_get(body, "seed", "int", None))
    return GenRequest(prompt=prompt, max_tokens=max_tokens, params=params,
                      ignore_eos=_get(body, "ignore_eos", "bool", False))


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
# HTTP

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "minimind"
    timeout = 60  # seconds a socket read or write may stall (slow or vanished clients)
    app = None  # the App, set by make_server

    def log_message(self, fmt, *args):
        if not self.app.quiet:
            sys.stderr.write(f"{self.address_string()} - {fmt % args}\n")

    # --- plumbing
    def _send_json(self, status: int, obj: dict, close: bool = False):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _send_page(self, data: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: APIError, close: bool = False):
        if e.status == 401:
            close = True
        self._send_json(e.status, e.body(), close)

    def _read_body(self) -> dict:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = b""
            while True:
                try:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    raise APIError(400, "malformed chunked request body", None, "invalid_request") from None
                if size == 0:
                    self.rfile.readline()
                    break
                raw += self.rfile.read(size)
                self.rfile.readline()
                if len(raw) > MAX_BODY:
                    raise APIError(413, f"request body over {MAX_BODY} bytes", None, "request_too_large")
        else:
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise APIError(400, "bad Content-Length header", None, "invalid_request") from None
            if n > MAX_BODY or n < 0:
                raise APIError(413, f"request body over {MAX_BODY} bytes", None, "request_too_large")
            raw = self.rfile.read(n)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request ({e}).", None,
                           "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    def _check_key(self):
        key = self.app.api_key
        if not key:
            return
        got = self.headers.get("Authorization", "")
        got = got[7:] if got.startswith("Bearer ") else ""
        if not hmac.compare_digest(got.encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided.", None, "invalid_api_key")

    def _client_gone(self) -> bool:
        """True when the client closed its connection (EOF readable without blocking)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            return bool(r) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # --- routes
    def do_GET(self):
        try:
            path = self.path.split("?")[0].rstrip("/")
            if path == "/health":
                return self._send_json(200, {"status": "ok", **self.app.engine.load(), **self.app.engine.stats})
            if path == "" and self.app.ui and UI_PAGE.is_file():  # no key needed: the page asks on a 401
                return self._send_page(UI_PAGE.read_bytes())
            self._check_key()
            if path == "/v1/models":
                return self._send_json(200, {"object": "list", "data": [self.app.model_card()]})
            if path.startswith("/v1/models/"):
                if path[len("/v1/models/"):] == self.app.name:
                    return self._send_json(200, self.app.model_card())
                raise APIError(404, f"The model '{path[len('/v1/models/'):]}' does not exist", "model",
                               "model_not_found")
            raise APIError(404, f"no route GET {path}", None, "not_found")
        except APIError as e:
            self._error(e)

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            self._check_key()
            if path not in ("/v1/chat/completions", "/v1/completions"):
                self._read_body_quietly()
                raise APIError(404, f"no route POST {path}", None, "not_found")
            body = self._read_body()
            self._complete(body, chat=path == "/v1/chat/completions")
        except APIError as e:
            self._error(e, close=e.status == 413)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # a bug, not a bad request: say so instead of dropping the connection
            traceback.print_exc()
            try:
                self._error(APIError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error",
                                     "server_error"), close=True)
            except OSError:
                self.close_connection = True

    def _read_body_quietly(self):
        try:
            self._read_body()
        except APIError:
            pass

    def do_PUT(self):
        self._send_json(405, APIError(405, "method not allowed", None, "method_not_allowed").body(), close=True)

    do_DELETE = do_PATCH = do_PUT

    # --- completions
    def _complete(self, body: dict, chat: bool):
        app = self.app
        if chat:
            messages = parse_messages(body)
            prompt = app.tok.encode_chat(messages, add_generation_prompt=True)
        else:
            prompt = parse_prompt(body, app.tok, app.tok.vocab_size)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, "'model' must be a string", "model", "invalid_type")
        stream = _get(body, "stream", "bool", False)
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
        include_usage = bool(_get(opts or {}, "include_usage", "bool", False))
        stops = _stops(body)
        req = build_request(body, prompt, app.context, app.default_max_tokens if chat else app.default_max_tokens_raw)
        if not app.engine.submit(req):
            raise APIError(429, "The server is overloaded: too many requests are waiting. Retry later.", None,
                           "rate_limit_exceeded", "rate_limit_error")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": rid, "created": int(time.time()), "model": app.name}
        try:
            if stream:
                self._stream(req, stops, chat, meta, include_usage)
            else:
                self._whole(req, stops, chat, meta)
        finally:
            req.cancelled.set()  # a no-op when finished; frees the slot when the client left or a stop hit

    def _events(self, req: GenRequest, stops: list):
        """Yield ("text", str) pieces, then ("end", finish_reason, completion_tokens) or ("error", msg)."""
        dec, cut, n = TokenDecoder(self.app.tok, table=self.app.table), StopText(stops), 0
        checked = time.monotonic()
        while True:
            try:
                ev = req.events.get(timeout=0.1)
            except queue.Empty:
                ev = None
            if time.monotonic() - checked > 0.1:  # also while tokens flow: a JSON reply writes only at the end
                checked = time.monotonic()
                if self._client_gone():
                    req.cancelled.set()
                    raise BrokenPipeError("client closed the connection")
            if ev is None:
                continue
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
                text = cut.feed(dec.flush())
                text += cut.flush()
                if text:
                    yield ("text", text)
                yield ("end", ev[1], ev[2])
                return
            else:
                yield ev
                return

    def _whole(self, req, stops, chat, meta):
        parts, finish, n = [], None, 0
        for ev in self._events(req, stops):
            if ev[0] == "text":
                parts.append(ev[1])
            elif ev[0] == "end":
                finish, n = ev[1], ev[2]
            else:
                raise APIError(500, f"generation failed: {ev[1]}", None, "internal_error", "server_error")
        text = "".join(parts)
        usage = {"prompt_tokens": len(req.prompt), "completion_tokens": n, "total_tokens": len(req.prompt) + n}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            obj = {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = {**meta, "object": "text_completion", "choices": [choice], "usage": usage}
        self._send_json(200, obj)

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _sse(self, obj):
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode())
                    + b"\n\n")

    def _stream(self, req, stops, chat, meta, include_usage):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta=None, text=None, finish=None):
            if chat:
                c = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**meta, "object": kind, "choices": [c]}

        if chat:
            self._sse(chunk({"role": "assistant", "content": ""}))
        for ev in self._events(req, stops):
            if ev[0] == "text":
                self._sse(chunk({"content": ev[1]}, ev[1]))
            elif ev[0] == "end":
                self._sse(chunk({}, "", ev[1]))
                if include_usage:
                    n = ev[2]
                    usage = {"prompt_tokens": len(req.prompt), "completion_tokens": n,
                             "total_tokens": len(req.prompt) + n}
                    self._sse({**meta, "object": kind, "choices": [], "usage": usage})
            else:
                err = APIError(500, f"generation failed: {ev[1]}", None, "internal_error", "server_error")
                self._sse(err.body())
        self._sse(b"[DONE]")
        self._chunk(b"")  # end of the chunked body


class App:
    """What the request handlers share: model name, tokenizer, engine, limits."""

    def __init__(self, engine: Engine, tok, name: str, context: int, api_key: Optional[str] = None,
                 default_max_tokens: int = 512, quiet: bool = False, ui: bool = True):
        self.engine, self.tok, self.name, self.context = engine, tok, name, context
        self.api_key, self.quiet, self.ui = api_key, quiet, ui
        self.default_max_tokens = default_max_tokens
        self.default_max_tokens_raw = 16  # OpenAI's default for /v1/completions
        self.table = token_bytes(tok)  # token id -> bytes, shared by every TokenDecoder
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "minimind",
                "context_length": self.context}


def make_server(model, tok, host: str = "127.0.0.1", port: int = 8000, name: str = "minimind", context: int = 2048,
                api_key: Optional[str] = None, max_batch: int = 8, max_queue: int = 64, default_max_tokens: int = 512,
                quiet: bool = False, ui: bool = True):
    """A ready (not yet serving) ThreadingHTTPServer with its engine started; `server.app` holds the rest.
    Serve with server.serve_forever(); stop with server.shutdown(), server.app.engine.stop()."""
    engine = Engine(model, tok.eos_id, max_batch, max_queue).start()
    app = App(engine, tok, name, context, api_key, default_max_tokens, quiet, ui)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.app = app
    return server


# -----------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    # network
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--model-name", default="minimind", help="model id reported by /v1/models and in responses")
    p.add_argument("--no-ui", action="store_true", help="do not serve the chat page (ui/chat.html) at /")
    # limits
    p.add_argument("--max-tokens", type=int, default=512,
                   help="chat completion length when a request gives no max_tokens (capped by the context)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most (more get 429)")
    p.add_argument("--shutdown-after", type=float, default=0, help="stop after this many seconds (tests); 0 = never")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ("max_tokens", "max_batch", "max_queue"):
        if getattr(args, flag) <= 0:
            sys.exit(f"error: --{flag.replace('_', '-')} must be positive")
    model, tok, device, context = load_from_args(args)
    server = make_server(model, tok, args.host, args.port, args.model_name, context, args.api_key, args.max_batch,
                         args.max_queue, args.max_tokens, args.quiet, not args.no_ui)
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {args.model_name} ({device}, context {context}) on http://{host}:{port}/v1", flush=True)
    if not args.no_ui:
        print(f"chat page: http://{host}:{port}/", flush=True)
    if args.shutdown_after > 0:
        timer = threading.Timer(args.shutdown_after, server.shutdown)
        timer.daemon = True
        timer.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.app.engine.stop()


if __name__ == "__main__":
    main()
