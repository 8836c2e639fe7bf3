"""serve.py against a hostile client: malformed, mistyped, non-finite, oversized, slow and abandoned
requests each get a 4xx in OpenAI's error shape (never a 5xx), and the streams beside them go on as
if nothing happened. The real server runs in a subprocess on 127.0.0.1.

    python -m pytest tests/test_serve_hostile.py -q
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
import serve
from test_serve import CONTEXT, KEY, start_server

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
ORIGIN = "https://chat.example"
READ_TIMEOUT = 4  # --read-timeout of this server: seconds to send a request's headers


@pytest.fixture(scope="module")
def served(random_ckpt, tmp_path_factory):
    """(port, pid) of a server with CORS for ORIGIN and a short header deadline."""
    with start_server(random_ckpt, tmp_path_factory.mktemp("hostile") / "stderr.txt", "--cors", ORIGIN,
                      "--read-timeout", str(READ_TIMEOUT)) as (port, proc):
        yield port, proc.pid


@pytest.fixture(scope="module")
def port(served):
    return served[0]


def request(port, method, path, body=b"", headers=None, timeout=30):
    """(status, headers, body bytes) of one request; body: bytes, or an iterable of chunks (sent chunked)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    chunked = not isinstance(body, (bytes, str))
    conn.request(method, path, body if method not in ("GET", "HEAD") or body else None,
                 {k: v for k, v in hdrs.items() if v is not None}, encode_chunked=chunked)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


def openai_error(data: bytes) -> dict:
    """The error object of OpenAI's error body; fails unless the body is exactly that shape."""
    obj = json.loads(data)
    assert set(obj) == {"error"} and set(obj["error"]) == {"message", "type", "param", "code"}, obj
    assert isinstance(obj["error"]["message"], str) and obj["error"]["message"]
    return obj["error"]


def post(port, path, body: dict, **kw):
    return request(port, "POST", path, json.dumps(body).encode(), **kw)


# -----------------------------------------------------------------------------
# the hostile cases: (id, method, path, body bytes or chunks, headers)

def _json(obj) -> bytes:
    return json.dumps(obj).encode()  # NaN and Infinity come out as the bare words json.loads accepts


def _with(path, base: dict, field: str, raw_value: bytes) -> bytes:
    """base with `field` set to raw JSON text (numbers no float can hold, NaN, ...)."""
    return _json({**base, field: "@@"}).replace(b'"@@"', raw_value)


BASE = {CHAT: {"messages": MSG, "max_tokens": 4}, COMP: {"prompt": "hi", "max_tokens": 4}}
INTS = ["max_tokens", "max_completion_tokens", "top_k", "seed", "n"]
FLOATS = ["temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"]
NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e308", b"-" + b"9" * 400]


def hostile_cases():
    cases = []

    def add(name, body, path=CHAT, method="POST", headers=None):
        cases.append(pytest.param(method, path, body, headers, id=name))

    # non-finite and huge numbers in every numeric field
    for field in INTS + FLOATS:
        path = CHAT if field == "max_completion_tokens" else COMP if field == "seed" else CHAT
        for v in NON_FINITE:
            add(f"{field}={v[:12].decode()}", _with(path, BASE[path], field, v), path)
        if field != "top_k":  # top_k beyond the vocabulary is "off", a valid request
            add(f"{field}=2**64", _with(path, BASE[path], field, str(2 ** 64).encode()), path)
        add(f"{field}=-2**64", _with(path, BASE[path], field, str(-2 ** 64).encode()), path)
    for field, v in (("repetition_penalty", 1e-300), ("repetition_penalty", 0), ("repetition_penalty", -1),
                     ("top_p", 0), ("temperature", -1e-300), ("temperature", 2.0001), ("max_tokens", 0),
                     ("max_tokens", CONTEXT), ("top_k", -2)):
        add(f"{field}={v}", _json({**BASE[CHAT], field: v}))
    # every field mistyped
    wrong = {"int": ["1", 1.5, [1], {"a": 1}, True], "float": ["1", [1], {"a": 1}, True],
             "bool": ["true", 1, [], {}], "str": [3, [], {}, True]}
    for kind, fields in (("int", INTS), ("float", FLOATS), ("bool", ["stream", "ignore_eos", "logprobs"]),
                         ("str", ["model"])):
        for field in fields:
            for v in wrong[kind]:
                add(f"{field}:{json.dumps(v)}", _json({**BASE[CHAT], field: v}))
    for v in (5, [1], {"a": 1}, True, ["a"] * 17, ["x" * 300]):
        add(f"stop:{json.dumps(v)[:20]}", _json({**BASE[CHAT], "stop": v}))
    for v in ([], "x", 1, {"include_usage": "yes"}):
        add(f"stream_options:{json.dumps(v)}", _json({**BASE[CHAT], "stream": True, "stream_options": v}))
    for v in ("hi", [], ["hi"], [None], [[MSG]], {"role": "user"}, [{"role": "wizard", "content": "x"}],
              [{"content": "x"}], [{"role": 1, "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 5}],
              [{"role": "user", "content": [{"type": "image_url"}]}], [{"role": "user", "content": [5]}],
              [{"role": "user", "content": "x" * 3_000_000}], [{"role": "user", "content": ""}] * 50_000):
        add(f"messages:{json.dumps(v)[:30]}", _json({"messages": v}))
    add("messages missing", _json({"model": "minimind"}))
    for v in (42, [], [1.5], [True], [10 ** 9], [-1], [[1, 2], [3]], ["a", "b"], {"a": 1}, "x" * 3_000_000,
              list(range(5, 5 + CONTEXT))):
        add(f"prompt:{json.dumps(v)[:30]}", _json({"prompt": v}), COMP)
    for field, v in (("echo", "true"), ("echo", 1), ("best_of", 2), ("logprobs", 21), ("logprobs", -1),
                     ("logprobs", True), ("logprobs", 1.0), ("logprobs", "x"), ("prompt", None), ("max_tokens", 0),
                     ("max_tokens", -1)):
        add(f"completions {field}={v}", _json({"prompt": "hi", field: v}), COMP)
    add("completions max_tokens=0 echo, prompt the whole context", _json({"prompt": list(range(5, 5 + CONTEXT + 1)),
                                                                         "max_tokens": 0, "echo": True}), COMP)
    add("chat logprobs=true", _json({**BASE[CHAT], "logprobs": True}))
    # tools, tool calls, tool messages, thinking switches
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    for v in ("x", {"a": 1}, [1], [None], [{"function": {"name": "f"}}], [{"type": "code", "function": {"name": "f"}}],
              [{"type": "function"}], [{"type": "function", "function": {"name": ""}}],
              [{"type": "function", "function": {"name": 5}}], [{"type": "function", "function": {"name": "f" * 65}}],
              [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
              [{"type": "function", "function": {"name": "f", "description": 3}}], [tool] * 129):
        add(f"tools:{json.dumps(v)[:30]}", _json({**BASE[CHAT], "tools": v}))
    for v in ("always", 5, True, {"type": "function"}, {"type": "function", "function": {"name": 5}},
              {"type": "function", "function": {"name": "missing"}}, {"function": {"name": "get_weather"}}):
        add(f"tool_choice:{json.dumps(v)[:30]}", _json({**BASE[CHAT], "tools": [tool], "tool_choice": v}))
    add("tool_choice required without tools", _json({**BASE[CHAT], "tool_choice": "required"}))
    add("named tool_choice without tools", _json({**BASE[CHAT], "tool_choice": {"type": "function",
                                                                                "function": {"name": "f"}}}))
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    asked = {"role": "assistant", "content": None, "tool_calls": [call]}
    for v in ([{"role": "tool", "content": "sunny", "tool_call_id": "call_1"}],
              [*MSG, {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}],
              [*MSG, asked, {"role": "tool", "content": None, "tool_call_id": "call_1"}],
              [*MSG, asked, {"role": "tool", "content": 5}],
              [*MSG, asked, {"role": "tool", "content": "sunny", "tool_call_id": 1}],
              [{"role": "user", "content": "x", "tool_calls": [call]}],
              [*MSG, {"role": "assistant", "tool_calls": "x"}],
              [*MSG, {"role": "assistant", "tool_calls": [{"function": {"name": ""}}]}],
              [*MSG, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
              [*MSG, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}],
              [*MSG, {"role": "assistant", "tool_calls": [{"type": "code", "function": {"name": "f"}}]}],
              [*MSG, {"role": "assistant", "tool_calls": [{"id": 5, "function": {"name": "f"}}]}],
              [*MSG, {"role": "assistant", "content": "x", "reasoning_content": 5}],
              [*MSG, {"role": "assistant", "content": "x", "reasoning_content": ["x"]}]):
        add(f"messages:{json.dumps(v)[-40:]}", _json({"messages": v, "max_tokens": 4}))
    for field, v in (("open_thinking", "yes"), ("open_thinking", 1), ("chat_template_kwargs", "x"),
                     ("chat_template_kwargs", []), ("chat_template_kwargs", {"enable_thinking": "yes"}),
                     ("chat_template_kwargs", {"open_thinking": 1}), ("parallel_tool_calls", "no")):
        add(f"{field}={json.dumps(v)}", _json({**BASE[CHAT], field: v}))
    # bodies that are not a request object, or not JSON, or not text
    deep = b"[" * 100_000 + b"]" * 100_000
    for name, body in (("empty", b""), ("space", b"  "), ("null", b"null"), ("array", b"[]"), ("string", b'"s"'),
                       ("number", b"1"), ("true", b"true"), ("not json", b"{not json"), ("truncated", b'{"messages": '),
                       ("deep arrays", deep), ("deep in an unknown field", b'{"x": ' + deep + b', "messages": []}'),
                       ("deep objects", b'{"a": ' * 50_000 + b"1" + b"}" * 50_000),
                       ("deep messages", b'{"messages": ' + deep + b"}"),
                       ("bad utf-8", b"\xff\xfe"), ("bad utf-8 in a string", b'{"messages": [{"role": "user", '
                                                                              b'"content": "\xc3\x28"}]}'),
                       ("surrogate bytes", b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
                       ("overlong utf-8", b'{"messages": [{"role": "user", "content": "\xc0\xaf"}]}'),
                       ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
                       ("lone low surrogate", b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}'),
                       ("surrogate key", b'{"\\ud800": 1, "messages": []}'),
                       ("bad escape", b'{"messages": [{"role": "user", "content": "\\x41"}]}'),
                       ("short escape", b'{"messages": [{"role": "user", "content": "\\u12"}]}'),
                       ("raw control char", b'{"messages": [{"role": "user", "content": "a\x01b"}]}'),
                       ("trailing garbage", b'{"messages": []} xyz'),
                       ("oversized", b'{"messages": [], "pad": "' + b"x" * (4 << 20) + b'"}')):
        add(f"body {name}", body)
    add("body oversized chunked", iter([b'{"pad": "'] + [b"x" * 65536] * 80 + [b'"}']))
    add("body chunked bad json", iter([b'{"messages": ', b"[oops"]))
    # unknown methods and paths, missing key
    for method in ("PUT", "DELETE", "PATCH", "TRACE", "OPTIONS", "FOO"):
        for path in (CHAT, COMP, "/v1/models", "/health"):
            add(f"{method} {path}", b"", path, method)
    add("GET chat", b"", CHAT, "GET")
    add("POST models", b"{}", "/v1/models")
    for path in ("/v1/nowhere", "/v1", "/v1/chat", CHAT + "/extra", "/%2e%2e/etc/passwd", "/v1/models/other",
                 "/" + "a" * 8000, "/v1/completions%00"):
        add(f"path {path[:24]}", b"{}", path)
    for auth in (None, "Bearer wrong", KEY, f"Basic {KEY}", "Bearer " + "x" * 10_000):
        add(f"auth {str(auth)[:16]}", _json(BASE[CHAT]), CHAT, "POST", {"Authorization": auth})
    return cases


HOSTILE = hostile_cases()


@pytest.mark.parametrize("method, path, body, headers", HOSTILE)
def test_hostile_request_is_a_4xx_in_openai_shape(port, method, path, body, headers):
    status, _, data = request(port, method, path, body, headers)
    assert 400 <= status < 500, (status, data[:300])
    err = openai_error(data)
    assert err["type"] == "invalid_request_error"


def test_there_are_over_a_hundred_hostile_cases():
    assert len(HOSTILE) >= 100


def test_head_and_cors(port):
    assert request(port, "HEAD", CHAT)[0] == 405
    assert request(port, "HEAD", "/health")[0] == 200
    status, headers, _ = request(port, "OPTIONS", CHAT, headers={"Origin": ORIGIN,
                                                                 "Access-Control-Request-Method": "POST",
                                                                 "Access-Control-Request-Headers": "authorization"})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, data = post(port, CHAT, {"messages": MSG, "temperature": "x"}, headers={"Origin": ORIGIN})
    assert status == 400 and headers["access-control-allow-origin"] == ORIGIN  # errors carry CORS too
    status, headers, _ = request(port, "GET", "/health", headers={"Origin": "https://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_protocol_garbage_is_refused_and_the_server_goes_on(port):
    """Requests HTTP itself cannot parse are answered 4xx (by uvicorn, in plain text) or cut off."""
    for data in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                 b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(data)
                reply = s.recv(4096)
            except ConnectionError:
                reply = b""
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply[:100]
    assert request(port, "GET", "/health")[0] == 200


# -----------------------------------------------------------------------------
# other clients are not disturbed

def stream_text(port, body: dict, out: list, i: int):
    """Stream a chat completion; out[i] = (text, finish_reason, saw [DONE])."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", CHAT, json.dumps({**body, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    text, finish, done = [], None, False
    for line in r:
        if line == b"data: [DONE]\n":
            done = True
        elif line.startswith(b"data: {"):
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    conn.close()
    out[i] = ("".join(text), finish, done, r.status)


def run_streams(port, bodies: list, during=None) -> list:
    """Stream every body at once; `during()` runs meanwhile, in this thread."""
    out = [None] * len(bodies)
    threads = [threading.Thread(target=stream_text, args=(port, b, out, i)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    if during:
        during()
    for t in threads:
        t.join(timeout=120)
    return out


PROMPTS = ["小明喜欢什么？", "The cat reads", "老师写了一封信", "我们看见大海。"]


def test_poison_among_live_streams_changes_nothing(port):
    streams = [{"messages": [{"role": "user", "content": p}], "max_tokens": 600, "temperature": 0, "ignore_eos": True}
               for p in PROMPTS]
    clean = run_streams(port, streams)
    assert all(r[1:] == ("length", True, 200) and r[0] for r in clean), clean
    poison = [c.values for c in HOSTILE if c.values[1] in (CHAT, COMP) and c.values[0] == "POST"][::4]
    # valid but extreme requests, and one that leaves mid-stream, join the batch beside the streams
    extreme = [{**BASE[CHAT], **kw} for kw in ({"top_k": 10 ** 30, "temperature": 2}, {"repetition_penalty": 0.01},
                                              {"repetition_penalty": 10, "frequency_penalty": -2, "seed": -2 ** 63},
                                              {"top_p": 1e-300, "temperature": 1e-300, "max_tokens": 1},
                                              {"stop": ["a", "e", "的"], "presence_penalty": 2})]
    statuses, overlapped = [], []

    def active():
        return json.loads(request(port, "GET", "/health")[2])["active"]

    def attack():
        deadline = time.monotonic() + 30
        while active() < len(streams) and time.monotonic() < deadline:  # every stream is decoding
            time.sleep(0.01)
        for method, path, body, headers in poison:
            statuses.append(request(port, method, path, body, headers)[0])
        for body in extreme:
            statuses.append(post(port, CHAT, body)[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # a client that goes away
        conn.request("POST", CHAT, json.dumps({**BASE[CHAT], "max_tokens": 500, "stream": True}),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        conn.getresponse().fp.readline()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        overlapped.append(active() >= len(streams))  # the streams were decoding all along

    poisoned = run_streams(port, streams, attack)
    assert overlapped == [True], "the streams ended before the attack did: make them longer"
    assert len(statuses) == len(poison) + len(extreme) and all(s < 500 for s in statuses), statuses
    assert statuses[-len(extreme):] == [200] * len(extreme)
    assert [p[1:] for p in poisoned] == [c[1:] for c in clean]
    for p, c in zip(poisoned, clean):
        assert p[0] == c[0], next(i for i, (a, b) in enumerate(zip(p[0], c[0])) if a != b)


def test_64_simultaneous_streams_complete(port):
    bodies = [{"messages": [{"role": "user", "content": f"第{i}个问题"}], "max_tokens": 6, "ignore_eos": True,
               "temperature": 0.8, "seed": i} for i in range(64)]
    out = run_streams(port, bodies)
    assert all(r is not None and r[1:] == ("length", True, 200) for r in out), out


def test_trickling_connections_do_not_delay_others_and_are_closed(port):
    """200 clients sending their headers a byte at a time, 10 more their body: a normal request is
    answered as fast as ever, and they are cut off after --read-timeout (the body ones with a 408)."""
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
    bodies = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(10)]
    for s in bodies:
        s.send(head + f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n".encode())
    t0 = time.monotonic()
    try:
        for step in range(3):
            for s in socks:
                s.send(head[step:step + 1])
            for s in bodies:
                s.send(b"{")
            t = time.monotonic()
            status, _, _ = post(port, CHAT, {**BASE[CHAT], "max_tokens": 2})
            assert status == 200 and time.monotonic() - t < 1.0
            time.sleep(1.0)
        time.sleep(max(0.0, t0 + READ_TIMEOUT + 1.5 - time.monotonic()))
        closed = 0
        for s in socks:
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except ConnectionError:
                closed += 1
            except socket.timeout:
                pass
        assert closed == len(socks)
        for s in bodies:
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in reply, reply[:300]
    finally:
        for s in socks + bodies:
            s.close()


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_memory_stays_bounded_under_huge_bodies(served):
    port, pid = served
    post(port, CHAT, {**BASE[CHAT], "max_tokens": 2})  # warm up every code path first
    request(port, "POST", CHAT, iter([b"x" * (5 << 20)]))
    before = rss_kb(pid)

    def upload(i):
        chunks = (b"x" * (1 << 20) for _ in range(50))  # 50 MB, chunked
        try:
            status, _, data = request(port, "POST", CHAT, chunks)
            assert status == 413 and openai_error(data)["code"] == "request_too_large"
        except ConnectionError:  # the server stopped reading (DRAIN_SECONDS) and closed: fine too
            pass

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert rss_kb(pid) - before < 32 << 10  # KB: nothing near the 150 MB sent stayed
    assert request(port, "GET", "/health")[0] == 200


def test_busy_port_is_one_clear_line(random_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        r = subprocess.run([sys.executable, "serve.py", "--ckpt", str(random_ckpt), "--port", str(busy)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr == f"error: cannot listen on 127.0.0.1:{busy}: Address already in use\n"


# -----------------------------------------------------------------------------
# pages of other sites: DNS rebinding and simple cross-site POSTs

def test_a_host_that_is_not_the_server_is_refused(port):
    """A page of evil.example whose name is rebound to 127.0.0.1 reaches the server with its own name
    in Host: refused unless Host names the address bound (loopback names here) at its port."""
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", "localhost", f"127.0.0.2:{port}",
                 f"localhost.evil.example:{port}"):
        for method, path, body in (("GET", "/v1/models", b""), ("GET", "/", b""), ("GET", "/health", b""),
                                   ("POST", CHAT, json.dumps(BASE[CHAT]).encode())):
            status, _, data = request(port, method, path, body, headers={"Host": host})
            assert status == 400 and openai_error(data)["code"] == "invalid_host", (host, path, status, data[:200])
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}"):
        assert request(port, "GET", "/v1/models", headers={"Host": host})[0] == 200, host


def test_api_posts_must_be_json(port):
    """A page of any site may POST text/plain, a form or multipart without a CORS preflight (a
    "simple" request): the API answers 415 to any body not sent as application/json."""
    for path in (CHAT, COMP):
        body = json.dumps({**BASE[path], "max_tokens": 1}).encode()
        for ctype in ("text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x", "application/jsonx", None):
            status, _, data = request(port, "POST", path, body, headers={"Content-Type": ctype})
            assert status == 415 and openai_error(data)["code"] == "unsupported_media_type", (ctype, status)
        for ctype in ("application/json; charset=utf-8", "Application/JSON"):
            assert request(port, "POST", path, body, headers={"Content-Type": ctype})[0] == 200, ctype


def test_allowed_hosts():
    """--allowed-hosts adds names (any port; a name:port entry that port only); * turns the check off.
    A Host without a port is port 80."""
    hosts = serve.allowed_hosts("0.0.0.0", 8000, "my.box, 10.0.0.5:9000")
    ok = ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "0.0.0.0:8000", "my.box", "my.box:8000", "MY.BOX:1",
          "10.0.0.5:9000"]
    bad = ["localhost", "localhost:8001", "10.0.0.5", "10.0.0.5:8000", "evil.example:8000", "my.box.evil.example",
           "", "[::1]", "my.box:x"]
    assert [h for h in ok if not serve.host_allowed(h, hosts)] == []
    assert [h for h in bad if serve.host_allowed(h, hosts)] == []
    assert serve.host_allowed("localhost", serve.allowed_hosts("127.0.0.1", 80, ""))
    assert serve.host_allowed("[::]:8000", serve.allowed_hosts("::", 8000, ""))
    assert serve.allowed_hosts("127.0.0.1", 8000, "*") is None  # any Host
    assert "--allowed-hosts" in serve.build_parser().format_help()
