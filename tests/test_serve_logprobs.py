"""serve.py /v1/completions `logprobs` and `echo` against the model's own forward pass, through
the official `openai` client and raw HTTP; the scoring runs on the engine thread (Engine.call)
beside live streams; lm-evaluation-harness's `local-completions` model scores a small local
multiple-choice task through the server, item by item as scoring.loglikelihoods does.

    python -m pytest tests/test_serve_logprobs.py -q
"""
import glob
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

import scoring
import serve
from conftest import ROOT
from engine import Engine, GenRequest
from minimind import SamplingParams
from sample import stream_tokens
from test_serve import KEY, health, openai_client, start_server
from tokenizer import token_bytes

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "科学家研究"


@pytest.fixture(scope="module")
def server(random_ckpt, tmp_path_factory):
    with start_server(random_ckpt, tmp_path_factory.mktemp("logprobs") / "stderr.txt") as (port, _):
        yield port


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def forward(model, ids):
    """(T, V) log-probabilities of one forward pass: row i is the distribution of ids[i + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)


def greedy_ids(model, ids, n, eos_id=None):
    return list(stream_tokens(model, ids, n, eos_id=eos_id, temperature=0))


def check_logprobs(lp, model, tok, ids, first, top_n):
    """`lp` (the choice's logprobs) reports tokens ids[first:] of a sequence, as its forward pass scores them."""
    table = token_bytes(tok)
    names = {i: b.decode() for i, b in enumerate(token_bytes(tok, skip_special_tokens=False)) if not table[i]}
    assert names[tok.bos_id] == "<|im_start|>" and names[tok.eos_id] == "<|im_end|>"
    want = forward(model, ids)
    assert lp.tokens == [names.get(t) or scoring.token_text(table[t]) for t in ids[first:]]
    for k, i in enumerate(range(first, len(ids))):
        if i == 0:
            assert lp.token_logprobs[k] is None and lp.top_logprobs[k] is None
            continue
        assert lp.token_logprobs[k] == pytest.approx(want[i - 1, ids[i]].item(), abs=1e-4)
        top = want[i - 1].topk(top_n)
        expect = {names.get(t) or scoring.token_text(table[t]): v for t, v in zip(top.indices.tolist(),
                                                                                 top.values.tolist())}
        assert lp.top_logprobs[k] == pytest.approx(expect, abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset)


@pytest.mark.parametrize("echo", [False, True])
def test_logprobs_equal_the_forward_pass(client, loaded, echo):
    model, tok = loaded
    prompt = [tok.bos_id] + tok.encode(PROMPT)
    completion = greedy_ids(model, prompt, 10)
    r = client.completions.create(model="minimind", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3,
                                  echo=echo, extra_body={"ignore_eos": True})
    c = r.choices[0]
    text = tok.decode(completion, skip_special_tokens=True)
    assert c.text == (PROMPT if echo else "") + text and c.finish_reason == "length"
    check_logprobs(c.logprobs, model, tok, prompt + completion, 0 if echo else len(prompt), 3)
    assert c.logprobs.text_offset[0] == (0 if echo else len(PROMPT))
    assert c.logprobs.text_offset[len(prompt) if echo else 0] == len(PROMPT)
    # the sampled (greedy) token is the most likely one, exactly: lm-eval's is_greedy test
    greedy = c.logprobs.token_logprobs[len(prompt) if echo else 0:]
    assert all(lp == max(top.values()) for lp, top in zip(greedy, c.logprobs.top_logprobs[-len(greedy):]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 10)


def test_max_tokens_zero_scores_the_prompt(client, loaded):
    """Token ids in, nothing generated: the prompt's text and every token's log-probability (the
    first has none); logprobs 0 gives no alternatives."""
    model, tok = loaded
    ids = tok.encode("老师写了一封信。我们看见大海。")
    r = client.completions.create(model="minimind", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    c = r.choices[0]
    assert c.text == tok.decode(ids) and c.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[1:] == [{}] * (len(ids) - 1)
    want = forward(model, ids)
    assert c.logprobs.token_logprobs[1:] == pytest.approx([want[i - 1, ids[i]].item() for i in range(1, len(ids))],
                                                          abs=1e-4)
    assert c.logprobs.text_offset[0] == 0 and len(c.logprobs.tokens) == len(ids)
    r = client.completions.create(model="minimind", prompt=[ids], max_tokens=0, echo=True)  # no logprobs
    assert r.choices[0].text == tok.decode(ids) and r.choices[0].logprobs is None
    r = client.completions.create(model="minimind", prompt=ids, max_tokens=2, logprobs=1,  # no echo
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].logprobs.text_offset[0] == len(tok.decode(ids)) and len(r.choices[0].logprobs.tokens) == 2


def test_streamed_echo_and_logprobs(client):
    kw = dict(model="minimind", prompt=PROMPT, max_tokens=8, temperature=0, echo=True, extra_body={"ignore_eos": True})
    whole = client.completions.create(logprobs=2, **kw).choices[0]
    chunks = list(client.completions.create(logprobs=2, stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].text == whole.text and chunks[0].choices[0].logprobs == whole.logprobs
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None, "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    chunks = list(client.completions.create(stream=True, **kw))  # echo alone streams as it comes, prompt first
    assert chunks[0].choices[0].text == PROMPT and "".join(c.choices[0].text for c in chunks) == whole.text


def test_eos_ends_the_reported_tokens(loaded):
    """A completion that ends with eos reports it as its last token (OpenAI's <|endoftext|>): with
    max_tokens 1 + echo, as lm-eval's local-completions sends, token_logprobs[context:-1] is then
    still the continuation's. Here the engine takes the model's greedy next tokens for eos."""
    model, tok = loaded
    ids = tok.encode("小明喜欢")
    nxt = greedy_ids(model, ids, 3)
    for eos in (nxt[0], nxt[2]):
        n = nxt.index(eos) + 1
        engine = Engine(model, eos).start()
        try:
            http = TestClient(serve.make_app(engine, tok, context=256))
            for max_tokens in (n, 5):
                r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": max_tokens, "echo": True,
                                                       "logprobs": 1, "temperature": 0}).json()
                c = r["choices"][0]
                assert c["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == n
                assert len(c["logprobs"]["tokens"]) == len(ids) + n
                lp = forward(model, ids + nxt[:n])
                assert c["logprobs"]["token_logprobs"][-1] == pytest.approx(lp[-2, eos].item(), abs=1e-4)
                assert c["text"] == tok.decode(ids + nxt[:n - 1])  # eos stands for no text
        finally:
            engine.stop()


def test_engine_call_runs_between_decode_steps(loaded):
    """Engine.call runs work on the engine thread while requests are decoding, without changing them."""
    model, tok = loaded
    engine = Engine(model, tok.eos_id, max_batch=2)
    prompt = [tok.bos_id] + tok.encode("老师写了一封信。")

    def make():
        return GenRequest(prompt=prompt, max_tokens=200, params=SamplingParams(temperature=0), ignore_eos=True)

    alone = make()
    engine.start()
    try:
        engine.submit(alone)
        tokens = [alone.events.get(timeout=60) for _ in range(201)]
        busy = make()
        engine.submit(busy)
        busy.events.get(timeout=60)  # decoding has begun
        seen = engine.call(lambda: (threading.current_thread().name, len(engine.rows))).result(timeout=60)
        assert seen == ("engine", 1)
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0).result(timeout=60)
        rest = [busy.events.get(timeout=60) for _ in range(200)]
        assert [tokens[0]] + rest == tokens  # the same tokens as without the calls
        assert engine.call(lambda: "idle").result(timeout=5) == "idle"  # an idle engine wakes for it
    finally:
        engine.stop()


def test_logprobs_beside_live_streams(server, client):
    """Scoring requests arriving while streams decode: every stream and every score is what it is alone."""
    streams = [dict(model="minimind", prompt=p, max_tokens=900, temperature=0, extra_body={"ignore_eos": True})
               for p in ("小明喜欢", "The cat reads", "我们看见大海。")]
    scores = [dict(model="minimind", prompt=p, max_tokens=3, temperature=0, echo=True, logprobs=2,
                   extra_body={"ignore_eos": True}) for p in ("老师写了", "A student", "这只猫", "科学家研究数学")]
    alone = [client.completions.create(**kw).choices[0].text for kw in streams]
    alone_scores = [client.completions.create(**kw).choices[0].logprobs for kw in scores]
    texts, scored, errors = [None] * len(streams), [None] * len(scores), []

    def stream(i):
        try:
            texts[i] = "".join(c.choices[0].text for c in client.completions.create(stream=True, **streams[i]))
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while health(server)["active"] < len(streams) and time.monotonic() < deadline:  # all of them decoding
        time.sleep(0.01)
    busy = []
    for i, kw in enumerate(scores):
        scored[i] = client.completions.create(**kw).choices[0].logprobs
        busy.append(health(server)["active"])
    for t in threads:
        t.join(timeout=120)
    assert not errors and min(busy) == len(streams), (errors, busy)  # the streams were decoding all along
    assert texts == alone
    for got, want in zip(scored, alone_scores):
        assert got.tokens == want.tokens and got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-5)


# -----------------------------------------------------------------------------
# lm-evaluation-harness's local-completions against the server

LM_EVAL = all(importlib.util.find_spec(m) for m in ("lm_eval", "tenacity", "aiohttp"))
TASK = """task: minimind_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
target_delimiter: "{delimiter}"
metric_list:
  - metric: acc
"""


@pytest.mark.skipif(not LM_EVAL, reason="needs lm-eval with its API extras (tenacity, aiohttp)")
def test_lm_eval_local_completions_matches_scoring(server, random_ckpt, loaded, tmp_path):
    """lm-eval sends token ids (no bos), max_tokens 1, echo, logprobs 1 and sums
    token_logprobs[context:-1]: its per-choice log-likelihoods and greedy flags must be
    scoring.loglikelihoods' on the same (context, continuation) split, within 1e-4."""
    model, tok = loaded
    # a choice the model would write itself: its greedy tokens after a question, if they come back
    # as themselves when lm-eval encodes question + choice (a random model writes byte soup)
    greedy = {}
    for q in ("科学家研究", "小明喜欢", "The cat", "老师写了一封信。", "我们看见大海。", "A student"):
        ids = greedy_ids(model, tok.encode(q), 3)
        if scoring.encode_pair(tok.encode, q, tok.decode(ids))[1] == ids:
            greedy = {"question": q, "choices": [tok.decode(ids), "数学。", "the sea"], "answer": 0}
            break
    assert greedy, "no question whose greedy answer tokenizes back to itself"
    items = [greedy,
             {"question": "小明喜欢什么？", "choices": ["一本书", "大海", "春天的花"], "answer": 1},
             {"question": "The cat reads ", "choices": ["the book.", "a letter."], "answer": 1}]  # a trailing space
    task = tmp_path / "task"
    task.mkdir()
    (task / "items.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
    (task / "task.yaml").write_text(TASK.format(items=task / "items.jsonl", delimiter=""))
    tokenizer = max(glob.glob(str(random_ckpt / "ckpt_*" / "tokenizer")))
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    args = ["-m", "lm_eval", "--model", "local-completions", "--tasks", "minimind_tiny_mc", "--include_path",
            str(task), "--log_samples", "--output_path", str(tmp_path / "out"), "--model_args",
            (f"model=minimind,base_url=http://127.0.0.1:{server}/v1/completions,tokenizer_backend=huggingface,"
             f"tokenizer={tokenizer},max_retries=1")]
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_*.jsonl")
               for line in f.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(items)))
    flags = []
    for s in samples:
        doc = s["doc"]
        pairs = [scoring.encode_pair(tok.encode, doc["question"], c) for c in doc["choices"]]
        want = scoring.loglikelihoods(model, pairs, context=1024)
        got = [(float(resp[0][0]), resp[0][1] in (True, "True")) for resp in s["resps"]]
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4), doc
        assert [g[1] for g in got] == [w[1] for w in want], doc
        flags += [w[1] for w in want]
    assert any(flags) and not all(flags)  # both sides of the greedy test were taken
