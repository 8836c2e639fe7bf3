"""The chat format: MiniMind-3's template rendered by render_chat byte for byte (the expected texts
are data here, so the test also fails if both drift), MiniMind-3's added tokens at its ids, chat
records (tools, tool calls, tool turns, reasoning) checked and encoded with the loss mask on what the
assistant writes, and the parser of what the model writes, whole or streamed.

    python -m pytest tests/test_chat_template.py -q
"""
import json
import random
import re

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from conftest import qa, run
from data import check_conversation
from prepare import SYSTEM_PROMPTS
from tokenizer import (ADDED_TOKENS, CHAT_TEMPLATE, EMPTY_THINK, ReplyParser, TokenDecoder, Tokenizer, chat_segments,
                       parse_reply, render_chat, token_bytes)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "查询城市天气",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "current time", "parameters": {}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}

# name: (messages, keyword arguments of render_chat / apply_chat_template, the text MiniMind-3's template gives)
W = ('{"type": "function", "function": {"name": "get_weather", "description": "查询城市天气", "parameters": '
     '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}')
C = '{"type": "function", "function": {"name": "now", "description": "current time", "parameters": {}}}'
TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_RULES = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call><|im_end|>\n")
CASES = {
    "user, generation prompt, thinking off": (
        [{"role": "user", "content": "你好"}], {"add_generation_prompt": True},
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    "user, generation prompt, thinking on": (
        [{"role": "user", "content": "你好"}], {"add_generation_prompt": True, "open_thinking": True},
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n<think>\n"),
    "system, multi-turn": (
        [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}], {},
        "<|im_start|>system\n你是助手。<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n"),
    "empty system message, no generation prompt": (
        [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}], {},
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"),
    "a system message after the first turn": (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
         {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
        {"add_generation_prompt": True},
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    "tools, with a system message": (
        [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "北京天气？"}],
        {"tools": [WEATHER, CLOCK], "add_generation_prompt": True},
        f"<|im_start|>system\n你是助手。\n\n{TOOLS_INTRO}\n{W}\n{C}{TOOLS_RULES}<|im_start|>user\n北京天气？<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    "tools, without a system message, thinking on": (
        [{"role": "user", "content": "What time is it?"}],
        {"tools": [CLOCK], "add_generation_prompt": True, "open_thinking": True},
        f"<|im_start|>system\n{TOOLS_INTRO}\n{C}{TOOLS_RULES}<|im_start|>user\nWhat time is it?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"),
    "tool calls, tool responses, reasoning": (
        [{"role": "user", "content": "北京和上海天气？"},
         {"role": "assistant", "content": "", "tool_calls": [CALL, {"name": "get_weather", "arguments": {"city": "上海"}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3}"},
         {"role": "tool", "content": "{\"temp\": 9}"},
         {"role": "assistant", "content": "北京3度，上海9度。", "reasoning_content": "\n两个结果都到了。\n"}],
        {"tools": [WEATHER]},
        f"<|im_start|>system\n{TOOLS_INTRO}\n{W}{TOOLS_RULES}<|im_start|>user\n北京和上海天气？<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n</tool_call>\n"
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"上海\"}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"temp\": 3}\n</tool_response>\n"
        "<tool_response>\n{\"temp\": 9}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n两个结果都到了。\n</think>\n\n北京3度，上海9度。<|im_end|>\n"),
    "text before a tool call, null content": (
        [{"role": "user", "content": "Weather?"},
         {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]},
         {"role": "tool", "content": "sunny"},
         {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "now", "arguments": {}}}]}],
        {"tools": [WEATHER, CLOCK]},
        f"<|im_start|>system\n{TOOLS_INTRO}\n{W}\n{C}{TOOLS_RULES}<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nLet me check.\n"
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n"
        "</tool_call><|im_end|>\n"),
    "reasoning inside the content": (
        [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>\n想一想\n</think>\n\n2"},
         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "only the end</think>4"},
         {"role": "user", "content": "3+3?"},
         {"role": "assistant", "content": "<think>ignored</think>6", "reasoning_content": "the field wins"}], {},
        "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n<think>\n想一想\n</think>\n\n2<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nonly the end\n</think>\n\n4<|im_end|>\n"
        "<|im_start|>user\n3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nthe field wins\n</think>\n\n<think>ignored</think>6<|im_end|>\n"),
}
# MiniMind-3's model/tokenizer.json
MINIMIND3_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|object_ref_start|>": 3,
                 "<tts_text_bos_single>": 20, "<tool_call>": 21, "</tool_call>": 22, "<tool_response>": 23,
                 "</tool_response>": 24, "<think>": 25, "</think>": 26, "<|buffer1|>": 27, "<|buffer9|>": 35}


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


# -----------------------------------------------------------------------------
# the template

@pytest.mark.parametrize("name", CASES)
def test_render_chat_is_minimind3s_template(name, hf):
    messages, kw, expected = CASES[name]
    assert render_chat(messages, **kw) == expected
    assert hf.apply_chat_template(messages, tokenize=False, **kw) == expected  # the template saved with the tokenizer
    assert "".join(t for t, _ in chat_segments(messages, **kw)) == expected


def test_the_thinking_switch_has_both_names(tokenizer_dir):
    messages, kw, expected = CASES["user, generation prompt, thinking on"]
    assert render_chat(messages, add_generation_prompt=True, enable_thinking=True) == expected  # Qwen3's name
    tok = Tokenizer(tokenizer_dir)
    assert tok.encode_chat(messages, enable_thinking=True) == tok.encode_chat(messages, open_thinking=True) \
        == tok.encode(expected)
    assert tok.encode_chat(messages) == tok.encode(CASES["user, generation prompt, thinking off"][2])


def test_segments_train_exactly_what_the_assistant_writes():
    messages, kw, expected = CASES["tool calls, tool responses, reasoning"]
    segs = chat_segments(messages, **kw)
    assert [t for t, trained in segs if trained] == [
        EMPTY_THINK + "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n</tool_call>\n"
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"上海\"}}\n</tool_call><|im_end|>",
        "<think>\n两个结果都到了。\n</think>\n\n北京3度，上海9度。<|im_end|>"]
    assert all(t.endswith("<|im_start|>assistant\n") for t, trained in segs[:-1] if not trained)
    assert segs[-1] == ("\n", False)


# -----------------------------------------------------------------------------
# the tokenizer

def test_tokenizer_has_minimind3s_added_tokens_and_loads_in_transformers(tokenizer_dir, hf):
    tok = Tokenizer(tokenizer_dir)
    assert len(ADDED_TOKENS) == 36 and [t for t, _ in ADDED_TOKENS[:3]] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for token, i in MINIMIND3_IDS.items():
        assert tok.tok.token_to_id(token) == i and hf.convert_tokens_to_ids(token) == i and tok.encode(token) == [i]
    for i, (token, special) in enumerate(ADDED_TOKENS):
        assert hf.added_tokens_decoder[i].content == token and hf.added_tokens_decoder[i].special == special
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0) and hf.chat_template == CHAT_TEMPLATE
    text = CASES["tool calls, tool responses, reasoning"][2]
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    # the think and tool tags survive skipping the special tokens, as in MiniMind-3
    ids = tok.encode("<think>\nhm\n</think>\n\nok<tool_call>{}</tool_call><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True) \
        == "<think>\nhm\n</think>\n\nok<tool_call>{}</tool_call>"
    dec = TokenDecoder(tok)
    assert "".join(dec.feed(t) for t in ids) + dec.flush() == "<think>\nhm\n</think>\n\nok<tool_call>{}</tool_call>"


def test_a_tokenizer_with_only_the_three_old_special_tokens_still_works(tmp_path):
    hf_tok = HFTokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    hf_tok.train_from_iterator(["小明喜欢数学。The cat reads the sea."] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf_tok.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    messages, kw, expected = CASES["tool calls, tool responses, reasoning"]
    ids = tok.encode_chat(messages, add_generation_prompt=False, **kw)
    assert tok.decode(ids) == expected and len(tok.encode("<think>")) > 1  # the tags are plain text here
    assert tok.decode(ids, skip_special_tokens=True) == expected.replace("<|im_start|>", "").replace("<|im_end|>", "")
    # pieces encoded one by one give the tokens of the whole text here too
    assert sum((tok.encode(t) for t, _ in chat_segments(messages, **kw)), []) == ids


# -----------------------------------------------------------------------------
# chat records: checked, encoded, masked

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# a tool-use record in MiniMind's layout: tools (JSON text) on the system message, tool_calls as JSON text
MINIMIND_RECORD = {"conversations": [
    {"role": "system", "content": "", "tools": json.dumps([WEATHER], ensure_ascii=False)},
    {"role": "user", "content": "北京天气？"},
    {"role": "assistant", "content": "", "tool_calls": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}}],
                                                                  ensure_ascii=False)},
    {"role": "tool", "content": "{\"temp\": 3}"},
    {"role": "assistant", "content": "北京3度。", "reasoning_content": "查到了。"},
]}
# the same conversation in OpenAI's layout
OPENAI_RECORD = {"tools": [WEATHER], "conversations": [
    {"role": "system", "content": ""}, {"role": "user", "content": "北京天气？"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3}"},
    {"role": "assistant", "content": "<think>\n查到了。\n</think>\n\n北京3度。"},
]}


def test_minimind_and_openai_records_render_alike():
    (a, tools), (b, openai_tools) = (check_conversation(MINIMIND_RECORD["conversations"]),
                                     check_conversation(OPENAI_RECORD["conversations"], OPENAI_RECORD["tools"]))
    assert tools == openai_tools == [WEATHER] and render_chat(a, tools=tools) == render_chat(b, tools=tools)
    assert "<think>\n查到了。\n</think>\n\n北京3度。" in render_chat(a, tools=tools)


@pytest.mark.parametrize("messages, tools, message", [
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], None, "message 0: unknown role 'robot'"),
    ({"role": "user", "content": "hi"}, None, "expected a non-empty list of messages"),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}], None, "message 0: empty content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], None, "message 1: empty content"),
    ([{"role": "user", "content": ["parts"]}, {"role": "assistant", "content": "x"}], None,
     "message 0: content must be a string"),
    ([{"role": "user", "content": "hi", "tool_calls": [CALL]}, {"role": "assistant", "content": "x"}], None,
     "message 0: only the assistant makes tool calls"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": "[{"}], None,
     "message 1: tool_calls is not valid JSON"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}], None,
     "message 1: tool call 0: expected a \"name\""),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], None,
     "message 1: tool call 0: arguments are not valid JSON"),
    ([{"role": "system", "content": "", "tools": [WEATHER]}, {"role": "assistant", "content": "x"}], [CLOCK],
     "message 0: tools belong on the record or on its one system message"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "nope", "tools is not valid JSON"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}, {"role": "tool", "content": "r"}], None,
     "the conversation does not end with an assistant turn"),
])
def test_malformed_chat_records_are_described(messages, tools, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_conversation(messages, tools)


def test_sft_mask_is_what_the_assistant_writes_token_by_token(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "sft.jsonl", [MINIMIND_RECORD])
    run(["prepare.py", "sft", "--input", src, "--tokenizer", tokenizer_dir, "--out", tmp_path / "d",
         "--val-fraction", "0", "--quiet"])
    tok = Tokenizer(tmp_path / "d" / "tokenizer")
    tokens = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16).tolist()
    mask = np.fromfile(tmp_path / "d" / "train.mask", dtype=np.uint8).tolist()
    messages, tools = check_conversation(MINIMIND_RECORD["conversations"])
    text = render_chat(messages, tools=tools)
    assert tokens == tok.encode(text[:-1])  # the whole conversation but the newline after the last <|im_end|>
    # the bytes the assistant writes: from after each "<|im_start|>assistant\n" through its <|im_end|>
    raw, trained = text.encode("utf-8"), set()
    for m in re.finditer(rb"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", raw, re.S):
        trained |= set(range(m.start(1), m.end(1)))
    table, at = token_bytes(tok, skip_special_tokens=False), 0
    for t, m in zip(tokens, mask):
        piece = table[t]
        assert raw[at:at + len(piece)] == piece
        assert m == (at in trained), f"token {tok.decode([t])!r} at byte {at}: mask {m}"
        assert all((b in trained) == m for b in range(at, at + len(piece)))  # no token straddles an edge
        at += len(piece)
    replies = [tok.decode([t for t, m in zip(tokens, mask) if m])]
    assert replies == ["<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}"
                       "\n</tool_call><|im_end|><think>\n查到了。\n</think>\n\n北京3度。<|im_end|>"]


def test_sft_data_options_are_seeded_and_off_by_default(tmp_path, tokenizer_dir):
    records = [{"conversations": qa("小明")} for _ in range(40)] + [MINIMIND_RECORD]
    src = write_jsonl(tmp_path / "sft.jsonl", records)

    def prepare(out, *flags):
        run(["prepare.py", "sft", "--input", src, "--tokenizer", tokenizer_dir, "--out", tmp_path / out,
             "--val-fraction", "0", "--quiet", *flags])
        d = tmp_path / out
        tokens = np.fromfile(d / "train.bin", dtype=np.uint16)
        offsets = np.fromfile(d / "train.idx", dtype=np.int64)
        tok = Tokenizer(d / "tokenizer")
        return [tok.decode(tokens[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])], d

    plain, d = prepare("plain")
    assert all(EMPTY_THINK in t and "<|im_start|>system" not in t for t in plain[:40])
    meta = json.loads((d / "meta.json").read_text())
    assert (meta["system_prompt_fraction"], meta["drop_empty_think_fraction"]) == (0, 0)
    every, _ = prepare("every", "--system-prompt-fraction", "1", "--drop-empty-think-fraction", "1")
    for text in every[:40]:
        assert re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)[1] in SYSTEM_PROMPTS
        assert EMPTY_THINK not in text and text.endswith("<|im_start|>assistant\n小明喜欢一本书。<|im_end|>")
    # the tool-use record gets no system prompt (as in MiniMind); its empty think block goes too
    assert every[40] == plain[40].replace(EMPTY_THINK, "")
    half, _ = prepare("half", "--system-prompt-fraction", "0.5", "--drop-empty-think-fraction", "0.5",
                      "--workers", "2", "--chunk-records", "7")
    with_system = sum("<|im_start|>system" in t for t in half[:40])
    without_think = sum(EMPTY_THINK not in t for t in half[:40])
    assert 8 <= with_system <= 32 and 8 <= without_think <= 32
    assert prepare("again", "--system-prompt-fraction", "0.5", "--drop-empty-think-fraction", "0.5",
                   "--workers", "1")[0] == half  # the draws depend on the seed and the record, not on the workers
    assert prepare("seed", "--system-prompt-fraction", "0.5", "--drop-empty-think-fraction", "0.5",
                   "--seed", "1")[0] != half


def test_dpo_pairs_go_through_the_same_renderer(tmp_path, tokenizer_dir):
    prompt = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "1+1?"}]
    pair = {"chosen": [*prompt, {"role": "assistant", "content": "2", "reasoning_content": "1加1。"}],
            "rejected": [*prompt, {"role": "assistant", "content": "<think>\n猜。\n</think>\n\n3"}]}
    src = write_jsonl(tmp_path / "dpo.jsonl", [pair])
    run(["prepare.py", "dpo", "--input", src, "--tokenizer", tokenizer_dir, "--out", tmp_path / "d",
         "--val-fraction", "0", "--quiet"])
    tok = Tokenizer(tmp_path / "d" / "tokenizer")
    tokens = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16).tolist()
    mask = np.fromfile(tmp_path / "d" / "train.mask", dtype=np.uint8)
    s, p, c, r = np.fromfile(tmp_path / "d" / "train.idx", dtype=np.int64).tolist()
    assert tok.decode(tokens[s:s + p]) == render_chat(prompt) + "<|im_start|>assistant\n" and not mask[:p].any()
    assert tok.decode(tokens[p:p + c]) == "<think>\n1加1。\n</think>\n\n2<|im_end|>" and mask[p:p + c].all()
    assert tok.decode(tokens[p + c:]) == "<think>\n猜。\n</think>\n\n3<|im_end|>" and mask[p + c:].all()


# -----------------------------------------------------------------------------
# what the model writes

def calls(*named):
    return [(name, args) for name, args in named]


def shape(reply):
    """parse_reply's result with each tool call as (name, arguments), checking the OpenAI shape."""
    reasoning, content, tool_calls = reply
    for c in tool_calls:
        assert set(c) == {"id", "type", "function"} and c["type"] == "function" and c["id"].startswith("call_")
    return reasoning, content, [(c["function"]["name"], c["function"]["arguments"]) for c in tool_calls]


PARSE = [
    # (reply text, thinking, (reasoning, content, [(name, arguments)]))
    ("用户问好。\n</think>\n\n你好！", True, ("用户问好。", "你好！", [])),
    ("<think>\n\n</think>\n\nHello", False, ("", "Hello", [])),
    ("  Hello, world.\n\n", False, ("", "Hello, world.", [])),
    ("先想想\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n</tool_call>",
     True, ("先想想", "", calls(("get_weather", "{\"city\": \"北京\"}")))),
    ("Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n"
     "<tool_call>\n{\"name\": \"b\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>", False,
     ("", "Let me check.", calls(("a", "{}"), ("b", "{\"x\": 1}")))),
    # malformed tool calls stay in the content as written
    ("<tool_call>\n{\"name\": \"a\", \"arguments\": {oops}\n</tool_call> and after", False,
     ("", "<tool_call>\n{\"name\": \"a\", \"arguments\": {oops}\n</tool_call> and after", [])),
    ("<tool_call>{\"arguments\": {}}</tool_call>", False, ("", "<tool_call>{\"arguments\": {}}</tool_call>", [])),
    ("text <tool_call>\n{\"name\": \"a\"", False, ("", "text <tool_call>\n{\"name\": \"a\"", [])),  # cut off
    ("a reasoning cut off by the token limit", True, ("a reasoning cut off by the token limit", "", [])),
    ("<think>opened by the model\n</think>\nanswer", False, ("opened by the model", "answer", [])),
    ("<thin", False, ("", "<thin", [])),
    ("", True, ("", "", [])),
]


# template debris a weak model writes after the prompt's empty think block: never shown, read the same streamed
DEBRIS = [
    ("no think block, a stray </think> is dropped", False, ("", "no think block, a stray  is dropped", [])),
    ("\n</think>\n\n你好！", False, ("", "你好！", [])),
    ("a <think> b </think> c </think> d", False, ("", "a  b  c  d", [])),
    ("  <think>late open\n</think>\nanswer", False, ("late open", "answer", [])),
    ("好的 <tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call> </think> end", False,
     ("", "好的   end", calls(("a", "{}")))),
    ("想</think>答</think>", True, ("想", "答", [])),
    ("<think>\nthe field wins\n</think>\n\n<think>ignored</think>6", False, ("the field wins", "ignored6", [])),
]


@pytest.mark.parametrize("text, thinking, expected", PARSE + DEBRIS)
def test_parse_reply(text, thinking, expected):
    assert shape(parse_reply(text, thinking)) == expected


def streamed(pieces, thinking):
    p = ReplyParser(thinking)
    events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
    assert all(k in ("reasoning", "content", "tool_call") for k, _ in events)
    kinds = [k for k, _ in events]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # the reasoning comes first
    return shape(("".join(v for k, v in events if k == "reasoning"), "".join(v for k, v in events if k == "content"),
                  [v for k, v in events if k == "tool_call"]))


@pytest.mark.parametrize("text, thinking, expected", PARSE + DEBRIS)
def test_streamed_replies_give_the_same_parts_however_they_are_split(text, thinking, expected):
    assert streamed(list(text), thinking) == expected  # one character at a time
    for cut in range(len(text) + 1):
        assert streamed([text[:cut], text[cut:]], thinking) == expected
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
        assert streamed([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])], thinking) == expected


def test_streamed_events_come_as_soon_as_they_are_certain():
    p = ReplyParser(thinking=True)
    assert p.feed("想") == [("reasoning", "想")]
    assert p.feed("一想\n</th") == [("reasoning", "一想")]  # the newline and the tag's start wait
    assert p.feed("ink>\n\n好的") == [("content", "好的")]
    assert p.feed("。<tool_") == [("content", "。")]
    assert p.feed("call>\n{\"name\": \"f\", \"arguments\": {}}\n") == []
    [(kind, call)] = p.feed("</tool_call>")
    assert kind == "tool_call" and call["function"] == {"name": "f", "arguments": "{}"}
    assert p.finish() == []


def test_chat_display_shows_the_reasoning_apart_and_the_tool_calls(capsys, random_ckpt):
    from sample import ReplyDisplay
    parser, show = ReplyParser(thinking=True), ReplyDisplay()
    for piece in ["想一", "想\n</th", "ink>\n\n好的", "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>"]:
        show(parser.feed(piece))
    show(parser.finish())
    assert capsys.readouterr().out == "[think] 想一想\n好的\n[tool call] f({\"x\": 1})"
    assert show.message["content"] == "好的" and show.message["reasoning_content"] == "想一想"
    assert [c["function"] for c in show.message["tool_calls"]] == [{"name": "f", "arguments": "{\"x\": 1}"}]
    # --think on: the prompt opens a think block, so the reply starts as reasoning
    r = run(["sample.py", "--ckpt", random_ckpt, "--chat", "--think", "on", "--max-new-tokens", "8",
             "--temperature", "0"], input="小明喜欢什么？\n")
    assert r.stdout.startswith("[think] ") and r.stdout.endswith("\n")
