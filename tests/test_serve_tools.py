"""serve.py chat with tools and thinking, through the official `openai` client: tool calls in
message.tool_calls and as streamed deltas, finish_reason "tool_calls", reasoning_content from the
think block, tool results sent back, stop strings on the content only.

A random model writes neither think blocks nor tool calls, so the server here serves a checkpoint
fine-tuned for a minute (train.py --mode sft on generated conversations with tools) to answer a
weather question with a fixed <tool_call>, to think first when asked to, and to turn a tool result
into an answer. Its replies go through the real path: template, engine, detokenizer, ReplyParser.

    python -m pytest tests/test_serve_tools.py -q
"""
import json
import random
from pathlib import Path

import openai
import pytest

from checkpoint import load_for_inference
from conftest import ANSWERS, ONE_THREAD, prepare_data, qa, run
from openai_format import ChatOut
from test_serve import greedy, openai_client, start_server
from tokenizer import parse_reply

pytestmark = pytest.mark.usefixtures("one_thread")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "查询城市的天气",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
THOUGHT = "用户想知道天气，我调用工具。"
ASK, ASK_THINKING = "北京天气怎么样？", "想一想，北京天气如何？"  # answered with a call; thought over first
RESULT, ANSWER = "晴，25度", "北京今天晴，25度。"  # a tool result and the answer made of it


def make_tool_sft(path: Path, n: int = 400, seed: int = 0):
    """{"conversations", "tools"}: six in ten a weather question answered by CALL (after THOUGHT for
    ASK_THINKING), some going on with the tool's RESULT and the ANSWER; the rest plain questions."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            if rng.random() < 0.6:
                thinking = rng.random() < 0.5
                call = {"role": "assistant", "content": "", "tool_calls": [CALL],
                        **({"reasoning_content": THOUGHT} if thinking else {})}
                msgs = [{"role": "user", "content": ASK_THINKING if thinking else ASK}, call]
                if rng.random() < 0.4:
                    msgs += [{"role": "tool", "content": RESULT}, {"role": "assistant", "content": ANSWER}]
                record = {"conversations": msgs, "tools": TOOLS}
            else:
                record = {"conversations": qa(rng.choice(list(ANSWERS)))}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def tool_ckpt(tokenizer_dir, base_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tools")
    data = prepare_data("sft", make_tool_sft(tmp / "tools.jsonl"), tokenizer_dir, tmp / "sft")
    out = tmp / "run"
    run(["train.py", "--mode", "sft", "--init-from", base_ckpt, "--data", data, "--out", out, "--seq-len", "768",
         "--batch-size", "4", "--max-iters", "200", "--lr", "3e-3", "--eval-interval", "200", "--eval-iters", "2",
         "--save-interval", "200", "--log-interval", "50"], env=ONE_THREAD)
    return out


@pytest.fixture(scope="module")
def client(tool_ckpt, tmp_path_factory):
    """The openai client of a server of tool_ckpt."""
    with start_server(tool_ckpt, tmp_path_factory.mktemp("tool_server") / "stderr.txt") as (port, _):
        yield openai_client(port)


@pytest.fixture(scope="module")
def local(tool_ckpt):
    """(model, tokenizer) of the fine-tuned checkpoint, in-process."""
    model, tok, _, _ = load_for_inference(tool_ckpt, "cpu")
    return model, tok


def user(text):
    return [{"role": "user", "content": text}]


def expected(local, messages, tools=None, thinking=False, n=100):
    """parse_reply of the in-process greedy reply: (reasoning, content, [(name, arguments)])."""
    model, tok = local
    text, _ = greedy(model, tok, tok.encode_chat(messages, tools=tools, open_thinking=thinking), n)
    reasoning, content, calls = parse_reply(text, thinking)
    return reasoning, content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def got(message):
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    return getattr(message, "reasoning_content", None) or "", message.content or "", calls


def streamed(chunks):
    """(reasoning, content, [(name, arguments)], finish_reason) of a streamed chat completion; the
    tool call deltas are checked for the fields the web page and the openai client read."""
    reasoning, content, calls, finish = "", "", {}, None
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        reasoning += getattr(d, "reasoning_content", None) or ""
        content += d.content or ""
        for t in d.tool_calls or []:
            assert t.index == len(calls) and t.id.startswith("call_") and t.type == "function"
            calls[t.index] = (t.function.name, t.function.arguments)
        finish = c.choices[0].finish_reason or finish
    return reasoning, content, [calls[i] for i in sorted(calls)], finish


WEATHER_CALL = [("get_weather", json.dumps({"city": "北京"}, ensure_ascii=False))]


def test_tool_call_whole_and_streamed(client, local):
    kw = dict(model="minimind", messages=user(ASK), tools=TOOLS, max_tokens=100, temperature=0)
    r = client.chat.completions.create(**kw)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert m.content is None and m.tool_calls[0].id.startswith("call_") and m.tool_calls[0].type == "function"
    assert got(m) == ("", "", WEATHER_CALL) == expected(local, user(ASK), TOOLS)
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "北京"}
    assert r.usage.prompt_tokens == len(local[1].encode_chat(user(ASK), tools=TOOLS))
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert streamed(chunks) == ("", "", WEATHER_CALL, "tool_calls")


@pytest.mark.parametrize("switch", [{"chat_template_kwargs": {"enable_thinking": True}},
                                    {"chat_template_kwargs": {"open_thinking": True}}, {"open_thinking": True}],
                         ids=["enable_thinking", "kwargs open_thinking", "open_thinking"])
def test_thinking_gives_reasoning_content(client, local, switch):
    kw = dict(model="minimind", messages=user(ASK_THINKING), tools=TOOLS, max_tokens=100, temperature=0,
              extra_body=switch)
    r = client.chat.completions.create(**kw)
    assert got(r.choices[0].message) == (THOUGHT, "", WEATHER_CALL)
    assert got(r.choices[0].message) == expected(local, user(ASK_THINKING), TOOLS, thinking=True)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.usage.prompt_tokens == len(local[1].encode_chat(user(ASK_THINKING), tools=TOOLS, open_thinking=True))
    assert streamed(client.chat.completions.create(stream=True, **kw)) == (THOUGHT, "", WEATHER_CALL, "tool_calls")
    # off: the prompt ends with an empty think block, and the reply is the content
    off = {"chat_template_kwargs": {"enable_thinking": False, "open_thinking": False}, "open_thinking": False}
    r = client.chat.completions.create(**{**kw, "extra_body": off})
    assert r.usage.prompt_tokens == len(local[1].encode_chat(user(ASK_THINKING), tools=TOOLS))
    assert got(r.choices[0].message) == expected(local, user(ASK_THINKING), TOOLS)


def test_tool_result_sent_back_is_answered(client, local):
    first = client.chat.completions.create(model="minimind", messages=user(ASK), tools=TOOLS, max_tokens=100,
                                           temperature=0)
    call = first.choices[0].message
    # the assistant's message as the client got it (content null, tool_calls, extra fields), then the result
    messages = user(ASK) + [call.model_dump(exclude_none=True),
                            {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": RESULT}]
    kw = dict(model="minimind", messages=messages, tools=TOOLS, max_tokens=100, temperature=0)
    r = client.chat.completions.create(**kw)
    template = user(ASK) + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                            {"role": "tool", "content": RESULT}]
    assert r.usage.prompt_tokens == len(local[1].encode_chat(template, tools=TOOLS))
    assert got(r.choices[0].message) == ("", ANSWER, []) == expected(local, template, TOOLS)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    # stop strings cut the content ...
    cut = client.chat.completions.create(stop=["，"], **kw)
    assert got(cut.choices[0].message) == ("", ANSWER[:ANSWER.index("，")], [])
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < r.usage.completion_tokens
    assert streamed(client.chat.completions.create(stop=["，"], stream=True, **kw))[1:] == (
        ANSWER[:ANSWER.index("，")], [], "stop")


def test_stop_strings_leave_the_thinking_and_the_calls_alone(client):
    assert "，" in THOUGHT and "北" in WEATHER_CALL[0][1]
    kw = dict(model="minimind", messages=user(ASK_THINKING), tools=TOOLS, max_tokens=100, temperature=0,
              extra_body={"open_thinking": True}, stop=["，", "北"])
    r = client.chat.completions.create(**kw)
    assert got(r.choices[0].message) == (THOUGHT, "", WEATHER_CALL) and r.choices[0].finish_reason == "tool_calls"
    assert streamed(client.chat.completions.create(stream=True, **kw)) == (THOUGHT, "", WEATHER_CALL, "tool_calls")


def test_without_tools_the_reply_is_content(client, local):
    q = user("小明喜欢什么？")
    r = client.chat.completions.create(model="minimind", messages=q, max_tokens=60, temperature=0)
    reasoning, content, calls = got(r.choices[0].message)
    assert (reasoning, calls) == ("", []) and content and r.choices[0].finish_reason == "stop"
    assert (reasoning, content, calls) == expected(local, q)


def test_tool_choice(client, local):
    tok = local[1]
    kw = dict(model="minimind", messages=user(ASK), tools=TOOLS, max_tokens=1)
    with_tools, without = len(tok.encode_chat(user(ASK), tools=TOOLS)), len(tok.encode_chat(user(ASK)))
    for choice, n in (("none", without), ("auto", with_tools), ("required", with_tools),
                      ({"type": "function", "function": {"name": "get_weather"}}, with_tools)):
        assert client.chat.completions.create(tool_choice=choice, **kw).usage.prompt_tokens == n, choice
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "nope"}}, **kw)
    assert e.value.body["param"] == "tool_choice"


def test_tools_are_shown_as_sent(client, local):
    """The template shows each tool's JSON as the client wrote it: its key order, fields the server's
    schema does not name."""
    tool = {"function": {"parameters": {"type": "object"}, "name": "f", "x-extra": [1, 2]}, "type": "function"}
    r = client.chat.completions.create(model="minimind", messages=user(ASK), tools=[tool], max_tokens=1)
    assert r.usage.prompt_tokens == len(local[1].encode_chat(user(ASK), tools=[tool]))
    reordered = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert len(local[1].encode_chat(user(ASK), tools=[reordered])) != r.usage.prompt_tokens


# -----------------------------------------------------------------------------
# the reply shaper, in-process

REPLIES = [(f"<think>\n{THOUGHT}\n</think>\n\n前言。<tool_call>\n" + '{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            + '<tool_call>\n{"name": "b", "arguments": "{}"}\n</tool_call>结尾，完。', False),
           (f"{THOUGHT}\n</think>\n\n答案：是，对。", True),
           ("plain text, <tool_call>not json</tool_call> and more", False),
           ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>', False)]


@pytest.mark.parametrize("text, thinking", REPLIES)
def test_chat_out_adds_up_to_parse_reply_in_any_split(text, thinking):
    reasoning, content, calls = parse_reply(text, thinking)
    names = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    for split in ([text], list(text), [text[i:i + 3] for i in range(0, len(text), 3)]):
        out = ChatOut([], thinking)
        deltas = [d for piece in split for d in out.feed(piece)] + out.finish()
        assert "".join(d.get("reasoning_content", "") for d in deltas) == reasoning
        assert "".join(d.get("content", "") for d in deltas) == content
        tool = [t for d in deltas for t in d.get("tool_calls", [])]
        assert [t["index"] for t in tool] == list(range(len(calls)))
        assert [(t["function"]["name"], t["function"]["arguments"]) for t in tool] == names
        assert out.finish_reason("stop") == ("tool_calls" if calls else "stop")
        assert out.finish_reason("length") == "length"


def test_chat_out_stops_on_the_content_only():
    text, _ = REPLIES[0]
    out = ChatOut(["，", "a"], False)
    deltas = [d for ch in text for d in out.feed(ch)] + out.finish()
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THOUGHT  # holds "，"
    assert "".join(d.get("content", "") for d in deltas) == "前言。\n结尾"
    assert [t["function"]["name"] for d in deltas for t in d.get("tool_calls", [])] == ["a", "b"]  # "a" is a name
    assert out.stopped
