"""serve.py: the real server in a subprocess, driven by the official `openai` client and raw HTTP;
the batching engine in-process.

    python -m pytest tests/test_serve.py -q
"""
import contextlib
import copy
import http.client
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from bench import bench_server
from conftest import ROOT
from engine import Engine, GenRequest
from minimind import SamplingParams
from openai_format import StopText
from sample import stream_tokens
import serve
from tokenizer import ReplyParser, TokenDecoder, parse_reply

KEY = "sk-test-key"
DEFAULT_MAX_TOKENS = 20
CONTEXT = 1024  # --context (the checkpoint was trained at 256): long enough to disconnect mid-generation


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(random_ckpt, tmp_path_factory):
    """The real server on a free loopback port; stops at teardown (or by itself after 10 minutes)."""
    with start_server(random_ckpt, tmp_path_factory.mktemp("server") / "stderr.txt") as (port, _):
        yield port


@contextlib.contextmanager
def start_server(ckpt, stderr_path, *flags):
    """serve.py on a free loopback port -> (port, process); stderr goes to a file (a pipe nobody reads
    could fill up and stall the server), which must hold no traceback when the server stops."""
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "serve.py", "--ckpt", str(ckpt), "--port", "0", "--api-key", KEY, "--quiet",
             "--max-tokens", str(DEFAULT_MAX_TOKENS), "--max-batch", "8", "--context", str(CONTEXT),
             "--shutdown-after", "600", *flags],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert "serving" in line, f"server did not start: {line!r} {Path(stderr_path).read_text()[-2000:]}"
        yield int(line.rsplit(":", 1)[1].split("/")[0]), proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "Traceback" not in Path(stderr_path).read_text(), Path(stderr_path).read_text()[-3000:]


def openai_client(port):
    """The official client for the server on `port`: no retries, so that an error shows as it is."""
    return openai.OpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def raw(port, method, path, body=None, headers=None):
    """(status, parsed JSON or text) of one raw HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, data, {k: v for k, v in hdrs.items() if v is not None})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


def health(port):
    return raw(port, "GET", "/health")[1]


def greedy(model, tok, ids, n):
    """(text, tokens) of a greedy continuation, in-process, stopping at eos."""
    dec, out, count = TokenDecoder(tok), [], 0
    for t in stream_tokens(model, ids, n, eos_id=tok.eos_id, temperature=0):
        count += 1
        if t == tok.eos_id:
            break
        out.append(dec.feed(t))
    return "".join(out) + dec.flush(), count


USER = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "小明喜欢什么？"}]


# -----------------------------------------------------------------------------
# the OpenAI client

def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["minimind"]
    assert models[0].owned_by == "minimind" and models[0].context_length == CONTEXT


def test_chat_matches_local_greedy(client, loaded):
    model, tok = loaded
    r = client.chat.completions.create(model="minimind", messages=USER, max_tokens=12, temperature=0)
    ids = tok.encode_chat(USER)
    text, n = greedy(model, tok, ids, 12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == parse_reply(text)[1]  # the reply's content: no think block, no calls
    assert r.choices[0].finish_reason == ("length" if n == 12 and text else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)


def test_chat_stream_equals_non_stream(client):
    kw = dict(model="minimind", messages=USER, max_tokens=15, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choice = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choice) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in with_choice][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choice[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert whole.usage.completion_tokens == 15 and whole.choices[0].finish_reason == "length"


def test_stream_wire_format_ends_with_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    body = {"messages": USER, "max_tokens": 5, "stream": True, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}",
                                                                   "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and "usage" not in last
    # the connection is kept alive for the next request
    conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert conn.getresponse().status == 200
    conn.close()


def test_stop_strings_cut_the_text(client):
    kw = dict(model="minimind", messages=USER, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    i = next(i for i in range(4, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    stop = full[i:i + 2]
    expect = full[:full.find(stop)]
    r = client.chat.completions.create(stop=[stop, "never-appears"], **kw)
    assert r.choices[0].message.content == expect and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    chunks = list(client.chat.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expect
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_continue_raw_text(client, loaded):
    model, tok = loaded
    ids = [tok.bos_id] + tok.encode("科学家研究")
    r = client.completions.create(model="minimind", prompt="科学家研究", max_tokens=10, temperature=0)
    text, n = greedy(model, tok, ids, 10)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    # OpenAI's default for /v1/completions is 16 tokens
    r = client.completions.create(model="minimind", prompt="科学家研究", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="minimind", prompt="科学家研究", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text


def test_default_max_tokens_and_seed(client):
    kw = dict(model="minimind", messages=USER, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(temperature=0, **kw)
    assert r.usage.completion_tokens == DEFAULT_MAX_TOKENS  # --max-tokens, not the whole context
    a, b, c = (client.chat.completions.create(temperature=1.0, top_p=0.95, seed=s, max_tokens=12, **kw)
               for s in (7, 7, 8))
    assert a.choices[0].message.content == b.choices[0].message.content != c.choices[0].message.content


def test_penalties_change_the_output(client):
    kw = dict(model="minimind", messages=USER, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kw).choices[0].message.content
    kw["extra_body"] = {"ignore_eos": True, "repetition_penalty": 3.0}
    assert client.chat.completions.create(**kw).choices[0].message.content != plain
    r = client.chat.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **kw)
    assert r.usage.completion_tokens == 20


def test_sample_py_and_the_server_draw_the_same_tokens(server, random_ckpt):
    """One sampler: sample.py and a server request with the same seed and settings (penalties
    included, temperature > 0) continue a prompt with the same tokens."""
    prompt, settings = "科学家研究", dict(temperature=1.3, top_k=60, top_p=0.95, repetition_penalty=1.2,
                                        frequency_penalty=0.7, presence_penalty=0.4)
    texts = []
    for seed in (1234, 99):
        flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(random_ckpt), "--prompt", prompt, "--seed",
                            str(seed), "--max-new-tokens", "24", *flags], cwd=ROOT, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)  # bytes: \r stays \r
        assert r.returncode == 0, r.stderr
        code, obj = raw(server, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 24, "seed": seed,
                                                            **settings})
        assert code == 200, obj
        assert r.stdout.decode() == prompt + obj["choices"][0]["text"] + "\n"
        texts.append(obj["choices"][0]["text"])
    assert texts[0] != texts[1] and len(texts[0]) > 5  # they are samples: another seed draws others


# -----------------------------------------------------------------------------
# bad requests: 4xx with OpenAI's error JSON, never a 500, the server keeps running

LONG = "0123456789" * 200  # ~2000 tokens (digits are single bytes here): beyond the context
MSG = [{"role": "user", "content": "hi"}]
BAD = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"\xff\xfe", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": "minimind"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "max_completion_tokens": 10 ** 6}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": 9}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": MSG, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": MSG, "stop": 5}, 400, "stop"),
    ("/v1/chat/completions", {"messages": MSG, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": MSG, "seed": "x"}, 400, "seed"),
    ("/v1/chat/completions", {"messages": MSG, "frequency_penalty": 5}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": MSG, "model": 3}, 400, "model"),
    ("/v1/chat/completions", {"messages": MSG, "stream_options": []}, 400, "stream_options"),
    ("/v1/completions", {"model": "minimind"}, 400, "prompt"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10 ** 9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/nowhere", {"messages": MSG}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_request(server, path, body, status, param):
    code, obj = raw(server, "POST", path, body)
    assert code == status, obj
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", KEY, f"Basic {KEY}"])
def test_wrong_api_key_is_401(server, auth):
    for method, path, body in (("POST", "/v1/chat/completions", {"messages": MSG}), ("GET", "/v1/models", None)):
        code, obj = raw(server, method, path, body, {"Authorization": auth})
        assert code == 401 and obj["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="nope", base_url=f"http://127.0.0.1:{server}/v1", max_retries=0).models.list()
    assert raw(server, "GET", "/health", headers={"Authorization": auth})[0] == 200  # probes need no key


def test_server_survives_bad_requests(server, client):
    assert health(server)["status"] == "ok"
    r = client.chat.completions.create(model="minimind", messages=MSG, max_tokens=3)
    assert r.usage.completion_tokens >= 1


# -----------------------------------------------------------------------------
# concurrency

def test_eight_concurrent_streams_are_answered_and_not_mixed(server, client):
    prompts = ["小明喜欢什么？", "The cat reads", "老师写了一封信", "我们看见大海。", "A student found the sea.",
               "科学家研究数学", "My friend likes", "这只猫"]
    reqs = [dict(model="minimind", messages=[{"role": "user", "content": p}], max_tokens=16,
                 extra_body={"ignore_eos": True},
                 **({"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "seed": 100 + i}))
            for i, p in enumerate(prompts)]
    alone = [client.chat.completions.create(**kw).choices[0].message.content for kw in reqs]
    before = health(server)
    results, errors = [None] * len(reqs), []

    def run(i):
        try:
            chunks = list(client.chat.completions.create(stream=True, **reqs[i]))
            results[i] = ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                          chunks[-1].choices[0].finish_reason)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert [r[0] for r in results] == alone  # each client got its own tokens, as if it were alone
    assert all(r[1] == "length" for r in results)
    assert wait_idle(server)
    after = health(server)
    tokens, steps = after["tokens"] - before["tokens"], after["steps"] - before["steps"]
    assert tokens == 16 * len(reqs)
    assert tokens / steps > 1.5  # decoded together, not one after another


def wait_idle(port, seconds=10.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        h = health(port)
        if h["active"] == 0 and h["queued"] == 0:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(server, stream):
    assert wait_idle(server)
    before = health(server)["tokens"]
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    body = {"messages": MSG, "max_tokens": CONTEXT - 60, "stream": stream, "ignore_eos": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}",
                                                                   "Content-Type": "application/json"})
    deadline = time.time() + 30
    while health(server)["active"] == 0 and time.time() < deadline:  # wait until it is decoding
        time.sleep(0.02)
    if stream:
        r = conn.getresponse()
        assert r.status == 200 and r.fp.readline()  # a first chunk arrived
    conn.sock.shutdown(2)
    conn.close()
    assert wait_idle(server)
    assert health(server)["tokens"] - before < CONTEXT - 60  # it stopped early: the slot is free


# -----------------------------------------------------------------------------
# pieces, in-process

GREEDY = SamplingParams(temperature=0)


def collect(req):
    toks = []
    while True:
        ev = req.events.get_nowait()
        if ev[0] == "token":
            toks.append(ev[1])
        else:
            return toks, ev


def drive(engine, steps=None):
    """Run the engine's loop body in this thread (deterministic): admit, step; until idle or `steps`."""
    n = 0
    while (engine.rows or not engine.queue.empty()) and (steps is None or n < steps):
        engine._admit()
        if engine.rows:
            engine._step()
        n += 1


def test_engine_joins_mid_flight(loaded):
    """Requests joining a running batch, with a shorter prompt (padded) and a longer one (the batch
    shifts right), decode exactly as they do alone; the batch shrinks back when they leave."""
    model, tok = loaded
    texts = ("小明", "老师写了一封信。", "我们看见大海。科学家研究数学。老师写了一封信。这只猫喜欢春天的花。")
    short, mid, long_ = ([tok.bos_id] + tok.encode(t) for t in texts)
    assert len(long_) > len(mid) + 5 > len(short) + 5
    engine = Engine(model, tok.eos_id, max_batch=4)
    reqs = lambda: [GenRequest(prompt=p, max_tokens=n, params=GREEDY, ignore_eos=True)  # noqa: E731
                    for p, n in ((mid, 30), (long_, 12), (short, 12))]
    expect = []
    for r in reqs():  # each alone
        engine.submit(r)
        drive(engine)
        expect.append(collect(r))
    assert [len(e[0]) for e in expect] == [30, 12, 12]
    a, b, c = reqs()
    engine.submit(a)
    drive(engine, steps=5)
    assert engine.cache.len == len(mid) + 5  # a's prompt and the 5 tokens sampled and fed so far
    engine.submit(b)
    engine.submit(c)
    engine._admit()
    assert engine.cache.len == len(long_) and engine.cache.pad.tolist() == [len(long_) - len(mid) - 5, 0,
                                                                             len(long_) - len(short)]
    drive(engine, steps=12)
    assert len(engine.rows) == 1 and engine.cache.pad.tolist() == [0]  # b, c left; their columns were trimmed
    drive(engine)
    assert [collect(r) for r in (a, b, c)] == expect
    assert expect[0][1] == ("end", "length", 30)
    assert engine.cache.batch_size == 0 and engine.rows == []


def test_engine_stops_at_eos_and_respects_cancel(loaded):
    model, tok = loaded
    engine = Engine(model, tok.eos_id, max_batch=2)
    p = [tok.bos_id] + tok.encode("小明")
    r = GenRequest(prompt=p, max_tokens=6, params=GREEDY, ignore_eos=True)
    engine.submit(r)
    drive(engine)
    toks, _ = collect(r)
    engine.eos_id = toks[3]  # pretend this token is eos: a request ends at its first occurrence, "stop"
    k = toks.index(toks[3])
    r = GenRequest(prompt=p, max_tokens=6, params=GREEDY)
    engine.submit(r)
    drive(engine)
    assert collect(r) == (toks[:k], ("end", "stop", k + 1))
    r, other = GenRequest(prompt=p, max_tokens=6, params=GREEDY), GenRequest(prompt=p, max_tokens=6, params=GREEDY)
    engine.submit(r)
    engine.submit(other)
    drive(engine, steps=2)
    r.cancelled.set()  # the client left: the row is dropped at the next step, the other one goes on
    drive(engine, steps=1)
    assert len(engine.rows) == 1 and engine.rows[0].req is other
    drive(engine)
    assert len(collect(other)[0]) == k
    r = GenRequest(prompt=p, max_tokens=6)
    r.cancelled.set()  # cancelled while queued: never decoded
    engine.submit(r)
    drive(engine)
    assert r.events.empty() and engine.load() == {"active": 0, "queued": 0}


def test_engine_failure_of_one_request_spares_the_others(loaded):
    model, tok = loaded
    engine = Engine(model, tok.eos_id, max_batch=4)
    p = [tok.bos_id] + tok.encode("小明")
    good = GenRequest(prompt=p, max_tokens=8, params=GREEDY, ignore_eos=True)
    bad = GenRequest(prompt=[10 ** 6], max_tokens=8)  # an id beyond the embedding: its prefill raises
    engine.submit(good)
    drive(engine, steps=2)
    engine.submit(bad)
    drive(engine)
    assert bad.events.get_nowait()[0] == "error"
    toks, end = collect(good)
    assert len(toks) == 8 and end == ("end", "length", 8)


def test_engine_row_with_non_finite_logits_leaves_alone(loaded):
    """A row whose logits turn NaN gets an error and leaves; the rows beside it decode exactly as alone."""
    model, tok = loaded
    poisoned = copy.deepcopy(model)
    poisoned.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie the head
    bad = tok.encode("春")[0]
    with torch.no_grad():
        poisoned.embed.weight[bad] = float("nan")  # any prompt holding this token gets NaN logits
    engine = Engine(poisoned, tok.eos_id, max_batch=4)
    good = [[tok.bos_id] + tok.encode(t) for t in ("小明", "The cat reads")]
    assert all(bad not in p for p in good)
    make = lambda: [GenRequest(prompt=good[0], max_tokens=10, params=GREEDY, ignore_eos=True),  # noqa: E731
                    GenRequest(prompt=good[1], max_tokens=10, params=SamplingParams(seed=5), ignore_eos=True)]
    alone = []
    for r in make():
        engine.submit(r)
        drive(engine)
        alone.append(collect(r))
    reqs = make()
    engine.submit(reqs[0])
    drive(engine, steps=3)
    poison = GenRequest(prompt=[tok.bos_id, bad, bad], max_tokens=10, params=GREEDY)
    engine.submit(poison)
    engine.submit(reqs[1])
    drive(engine)
    assert poison.events.get_nowait()[0] == "error" and poison.events.empty()
    assert [collect(r) for r in reqs] == alone


def test_chat_page_at_root(loaded, tmp_path, monkeypatch):
    model, tok = loaded
    engine = Engine(model, tok.eos_id)  # not started: the page needs no model
    monkeypatch.setattr(serve, "UI_PAGE", tmp_path / "chat.html")
    client = TestClient(serve.make_app(engine, tok, api_key=KEY))
    r = client.get("/")  # no page installed: OpenAI's 404
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    (tmp_path / "chat.html").write_text("<html>chat</html>")
    r = client.get("/")  # no key needed for the page itself
    assert r.status_code == 200 and r.text == "<html>chat</html>" and r.headers["content-type"].startswith("text/html")
    assert client.get("/v1/models").status_code == 401
    assert TestClient(serve.make_app(engine, tok, ui=False)).get("/").status_code == 404  # --no-ui


def test_stop_text_holds_back_partial_matches():
    s = StopText(["\nUser:", "END"])
    assert s.feed("Hello") == "Hello"
    assert s.feed(" wor\nUs") == " wor"  # "\nUs" may begin "\nUser:"
    assert s.feed("a") == "\nUsa"
    assert s.feed("xEN") == "x"
    assert s.feed("Dmore") == "" and s.stopped
    assert s.flush() == ""
    s = StopText(["END"])
    assert s.feed("abcE") == "abc" and s.flush() == "E"


def test_bench_server_reports_rates(tokenizer_dir):
    out = {}
    bench_server("cpu", out, clients=2, requests_per_client=1, max_tokens=4, tokenizer_dir=str(tokenizer_dir),
                 threads=1)
    s = out["server"]
    for mode in ("batched", "sequential"):
        assert s[mode]["requests"] == 2 and s[mode]["req_s"] > 0
        assert s[mode]["tok_s"] > 0 and s[mode]["ttft_ms"] >= 0


def test_a_failure_mid_stream_ends_with_an_error_event_and_done(loaded, monkeypatch):
    """A bug while the reply is parsed (ReplyParser.feed raising on a request's third piece, for the
    requests that think): the stream ends with OpenAI's error event and [DONE], not a cut connection;
    unstreamed, a 500 in OpenAI's shape; a stream beside it, and the next request, go on untouched."""
    model, tok = loaded
    init, feed = ReplyParser.__init__, ReplyParser.feed

    def flaky(self, text):
        self.pieces = getattr(self, "pieces", 0) + 1
        if self.pieces == 3 and getattr(self, "doomed", False):
            raise ValueError("a parser bug")
        return feed(self, text)

    def doomed_if_thinking(self, thinking=False):
        init(self, thinking)
        self.doomed = thinking

    monkeypatch.setattr(ReplyParser, "feed", flaky)
    monkeypatch.setattr(ReplyParser, "__init__", doomed_if_thinking)
    engine = Engine(model, tok.eos_id).start()
    try:
        with TestClient(serve.make_app(engine, tok), raise_server_exceptions=False) as http:
            body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 12, "ignore_eos": True,
                    "temperature": 0, "stream": True}
            healthy = []
            beside = threading.Thread(target=lambda: healthy.append(http.post("/v1/chat/completions", json=body)))
            beside.start()
            r = http.post("/v1/chat/completions", json={**body, "open_thinking": True})
            beside.join(timeout=60)
            events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
            assert r.status_code == 200 and events[-1] == "[DONE]", events[-3:]
            err = json.loads(events[-2])["error"]
            assert (err["type"], err["code"]) == ("server_error", "internal_error") and "ValueError" in err["message"]
            assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])
            # unstreamed: a clean 500
            r = http.post("/v1/chat/completions", json={**body, "open_thinking": True, "stream": False})
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
            # the stream beside it, and the next request, as if nothing had happened
            events = [e.removeprefix("data: ") for e in healthy[0].text.split("\n\n") if e]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
            r = http.post("/v1/chat/completions", json={**body, "stream": False})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12
            # the engine thread drops a finished row just after it posts the end: wait for it, briefly
            deadline = time.time() + 10
            while engine.load() != {"active": 0, "queued": 0} and time.time() < deadline:
                time.sleep(0.01)
            assert engine.load() == {"active": 0, "queued": 0}
    finally:
        engine.stop()
