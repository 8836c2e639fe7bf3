"""Model output is hostile input: what a policy under RL writes reaches the tool sandbox, the answer
parser, the reward functions and the reply parser, and none of it may raise or take super-linear time.
Each reproduction below failed (an exception, a hang or a wrong value) before its fix; the property
test then throws random and adversarial text at every parser of model output, and the last test feeds
each one a 1 MB input with a time and memory bound.

    OMP_NUM_THREADS=1 python -m pytest tests/test_hostile_output.py -q
"""
import json
import sys
import time
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rl
from tokenizer import parse_reply, render_chat

DEEP = "<tool_call>" + "[" * 1000 + "</tool_call>"
CALC = '{"name": "calculator", "arguments": {"expression": %s}}'


def elapsed(fn, *a):
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


# -----------------------------------------------------------------------------
# reproductions

@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deep_brackets_are_an_invalid_call_not_a_recursion_error(depth):
    block = "<tool_call>" + "[" * depth + "</tool_call>"
    assert json.loads(rl.run_tool_call("[" * depth)) == {"error": "tool call is not valid JSON (nested too deeply)"}
    assert rl.check_tool_call(block, rl.schemas_of(None)) == (None, "tool call is not valid JSON (nested too deeply)")
    assert "nested too deeply" in rl.tool_response_message(block)["content"]
    assert rl.reward_tool_calls([], block, None) == -1.0
    total, parts = rl.compute_rewards(rl.parse_reward_specs("tool exact think"), [[]], [block], [{"answer": "1"}])
    assert total.tolist() == [-1.0] and parts["tool"].tolist() == [-1.0]
    assert parse_reply("hi " + block) == ("", "hi " + block, [])  # an unparsable call stays in the content


def test_deep_brackets_are_refused_whatever_the_recursion_limit():
    """inductor raises Python's recursion limit to 2,000 once it compiles (serve.py --compile), where
    json's parser would take 1,000 brackets and fail on the next character: the depth is checked
    first (rl.tools.json_depth), so the answer stays the same; brackets inside strings do not count."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(5000)
    try:
        assert rl.check_tool_call(DEEP, rl.schemas_of(None)) == (None, "tool call is not valid JSON (nested too deeply)")
        parens = "(" * 100 + "1" + ")" * 100
        call, error = rl.check_tool_call(CALC % json.dumps(parens), rl.schemas_of(None))
        assert error is None and call["arguments"]["expression"] == parens
    finally:
        sys.setrecursionlimit(limit)


class ScriptedModel(torch.nn.Module):
    """Writes the same scripted turn (a list of characters) in every row: turn k writes script[k]."""

    def __init__(self, script):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.script, self.turn = script, 0

    def generate_stream(self, idx, max_new_tokens, eos_id, **kw):
        ids = [ord(c) for c in self.script[self.turn]] + [eos_id]
        self.turn += 1
        for t in range(min(max_new_tokens, len(ids))):
            yield torch.full((idx.size(0),), ids[t], dtype=torch.long)


class CharTokenizer:
    pad_id, eos_id = 0, 1

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def encode_chat(self, messages, add_generation_prompt=True):
        return self.encode(render_chat(messages, add_generation_prompt=add_generation_prompt))


def test_a_rollout_survives_a_deeply_nested_tool_call():
    model = ScriptedModel([DEEP, "The answer is 1."])
    tok = CharTokenizer()
    ro = rl.rollout(model, tok, [tok.encode("q")] * 2, 4000, tools=rl.TOOLS, max_turns=2)
    assert ro.texts == [DEEP + "\nThe answer is 1."] * 2 and ro.tool_calls.tolist() == [1.0, 1.0]
    fed_back = tok.decode(ro.completion[0][ro.mask[0] == 0].tolist())  # the tool response (and no padding)
    assert "nested too deeply" in fed_back
    total, _ = rl.compute_rewards(rl.parse_reward_specs("exact tool"), [[]], ro.texts, [{"answer": "1"}], 2)
    assert total.tolist() == [0.0, 0.0]  # exact (+1) and an invalid call (-1)


def test_a_4301_digit_number_is_refused_not_an_attribute_error():
    result = json.loads(rl.run_tool_call(CALC % ("1" * 4301)))
    assert result["error"].startswith("tool call is not valid JSON (Exceeds the limit (4300 digits)")
    assert rl.reward_tool_calls([], f"<tool_call>{CALC % ('1' * 4301)}</tool_call>", None) == -1.0
    big = '{"name": "unit_convert", "arguments": {"value": %s, "from_unit": "m", "to_unit": "km"}}' % ("9" * 400)
    assert json.loads(rl.run_tool_call(big)) == {"error": "value must be a finite number"}


def test_record_schemas_that_are_not_dicts_do_not_crash():
    call = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    odd = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": 5},
                                                                          "required": [["x"]]}}}
    assert rl.reward_tool_calls([], call, {"tools": [odd]}) == 1.0  # a non-dict property: no constraint
    assert "f(x: any)" in rl.tools_system_prompt([odd], compact=True)
    assert rl.reward_tool_calls([], call, {"tools": [1, "x", {"function": 3}, {"name": 2}, odd]}) == 1.0
    assert rl.reward_tool_calls([], call, {"tools": "[" * 5000}) == -1.0  # unparsable: no tool known
    assert rl.reward_tool_calls([], call, {"tools": "[]"}) == -1.0 and rl.schemas_of({"tools": "[]"}) == \
        rl.schemas_of(None)  # empty: the built-in tools, as before
    record = {"conversations": [{"role": "user", "content": "q"}], "tools": "[" * 5000}
    assert rl.rollout_messages(record) == [{"role": "user", "content": "q"}]


def test_answer_markers_followed_by_newlines_take_linear_time():
    assert elapsed(rl.extract_answer, "答案" + "\n" * 600) < 0.2  # cubic before: 1.9 s here, 20 s+ at 2000
    assert elapsed(rl.extract_answer, "The answer:" + "\n" * 600) < 0.2
    assert rl.extract_answer("答案" + "\n" * 2000) == "答案"  # no answer after it: the last line
    assert rl.extract_answer("答案\n\n 是 : 42") == "42" and rl.extract_answer("answer is:\n 7") == "7"


def test_unclosed_tool_call_tags_take_linear_time():
    assert elapsed(rl.find_tool_calls, "<tool_call>" * 4000) < 0.2  # quadratic before: 3.7 s here
    assert rl.find_tool_calls("<tool_call>" * 20000) == []
    assert rl.find_tool_calls("a<tool_call> x </tool_call><tool_call><tool_call>y</tool_call><tool_call>z") == \
        ["x", "<tool_call>y"]


def test_reply_parser_takes_linear_time_in_tool_calls_and_whitespace():
    reply = "x" + ('<tool_call>{"name": "a", "arguments": {}}</tool_call>' + " " * 60) * 5000
    assert elapsed(parse_reply, reply) < 0.5  # quadratic before: 1.1 s (20 s at 20,000 calls)
    reasoning, content, calls = parse_reply(reply)
    assert (reasoning, content, len(calls)) == ("", "x", 5000)
    assert parse_reply("  <think> a </think>  b  " + " " * 5 + "c ") == ("a", "b       c", [])


def test_calculator_limit_counts_normalised_characters_and_reads_superscripts_as_powers():
    wide = "⒇*" * 65 + "⒇"  # 131 characters, 329 once NFKC writes each ⒇ as (20)
    with pytest.raises(rl.ToolError, match="too long"):
        rl.calculator(wide)
    assert rl.calculator("⒇*2") == "40"
    # NFKC alone reads 2² as 22: a superscript run is the exponent it shows
    assert [rl.calculator(e) for e in ("2²", "10⁻³", "(1+2)²", "2³²", "2^3")] == ["4", "0.001", "9", "4294967296", "8"]
    for e in ("2₂", "xⁿ", "²2"):
        with pytest.raises(rl.ToolError):
            rl.calculator(e)


# -----------------------------------------------------------------------------
# every parser of model output, on random and adversarial text

TOOLS_RECORD = {"answer": "Paris", "gt": ["Paris"], "tools": [t.schema() for t in rl.TOOLS.values()]}
RECORDS = [None, {"answer": "42"}, TOOLS_RECORD]
SPECS = rl.parse_reward_specs(" ".join(rl.REWARDS))


def parsers(records, each_reward: bool = True):
    """name -> fn(text) for every function that reads model output, the rewards once per record
    (each_reward=False: through compute_rewards only)."""
    out = {
        "find_tool_calls": rl.find_tool_calls,
        "check_tool_call": lambda s: rl.check_tool_call(s, rl.schemas_of(None)),
        "run_tool_call": rl.run_tool_call,
        "tool_response_message": rl.tool_response_message,
        "split_think": rl.split_think,
        "extract_answer": rl.extract_answer,
        "last_number": rl.last_number,
        "answers_match": lambda s: (rl.answers_match(s, "42"), rl.answers_match(s, "Paris"), rl.answers_match(s, s)),
        "compute_rewards": lambda s: rl.compute_rewards(SPECS, [[]] * len(records), [s] * len(records), records),
        "parse_reply": lambda s: (parse_reply(s), parse_reply(s, thinking=True)),
        "calculator": calculate,
    }
    for name, fn in rl.REWARDS.items() if each_reward else ():
        out[f"reward_{name}"] = lambda s, fn=fn: [fn([], s, r) for r in records]
    return out


def calculate(s):
    """The calculator refuses with ToolError (its documented way to say no); anything else escaping is a bug."""
    try:
        return rl.calculator(s)
    except rl.ToolError:
        return None


PARSERS = parsers(RECORDS)
FRAGMENTS = ["[", "]", "{", "}", '"', ":", ",", " ", "\n", "\t", "<tool_call>", "</tool_call>", "<think>", "</think>",
             "<tool_", "</tool_call", "答案", "答案是", "：", "answer is", "Answer:", "\\boxed{", "42", "-3.5", "1,234",
             "1" * 5000, "9" * 4301, "٣", "⒇", "²", "₂", "½", "1e999", "NaN", "Infinity", "**", "^", "×", "÷", "(", ")",
             '{"name": "calculator", "arguments": {"expression": "', '"}}', '{"name": "lookup", "arguments": {"key": ',
             '{"name": "unit_convert", "arguments": {"value": ', "[" * 1500, "{" * 1500, "\\u0000", "\ud7ff", "İ"]
hostile_text = st.one_of(st.text(max_size=200), st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=hostile_text)
def test_no_exception_escapes_any_parser(text):
    for name, fn in PARSERS.items():
        fn(text)  # any exception fails the example; hypothesis shrinks it and names the parser in the traceback


def test_compute_rewards_stay_finite_on_hostile_text():
    texts = ["".join(FRAGMENTS), DEEP, "<tool_call>" * 1000, "答案" + "\n" * 1000, "9" * 5000]
    total, parts = rl.compute_rewards(SPECS, [[]] * len(texts), texts, [TOOLS_RECORD] * len(texts))
    assert torch.isfinite(total).all() and all(torch.isfinite(v).all() for v in parts.values())


MB = 1_000_000
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
HUGE = {
    "deep brackets": "<tool_call>" + "[" * MB + "</tool_call>",
    "open tags": "<tool_call>" * (MB // 11),
    "closed calls and spaces": "x" + (CALL + " " * 40) * (MB // len(CALL + " " * 40)),
    "marker and newlines": "答案" + "\n" * MB,
    "unicode digits": "٣⒇²1" * (MB // 4),
    "cjk": "".join(map(chr, range(0x4E00, 0x4E00 + 20000))) * (MB // 20000),
}


@pytest.mark.parametrize("case", HUGE)
def test_a_megabyte_of_model_output_takes_linear_time(case):
    """Every parser on a 1 MB input in under 5 s, loose for a shared CPU (the slowest, the repetition
    reward over a million CJK tokens, took 1.7 s on 2 busy cores); a quadratic parser takes minutes."""
    text = HUGE[case]
    seconds = {name: elapsed(fn, text) for name, fn in parsers([TOOLS_RECORD], each_reward=False).items()}
    over = {k: round(v, 2) for k, v in seconds.items() if v > 5.0}
    assert not over, f"{case}: {over}"


@pytest.mark.parametrize("case", ["cjk", "closed calls and spaces"])
def test_a_megabyte_of_model_output_takes_bounded_memory(case):
    """Python's allocations while parsing 1 MB stay under 200 MB: the most tokens (a million CJK
    characters, each a string in the repetition reward's lists) and the most tool responses."""
    tracemalloc.start()
    try:
        for fn in parsers([TOOLS_RECORD], each_reward=False).values():
            fn(HUGE[case])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * MB, f"{case}: {peak / MB:.0f} MB"


@pytest.mark.parametrize("result", ['"' * 5000, "\x01" * 3000, "工具" * 2000, list(range(3000))])
def test_a_long_tool_result_is_cut_to_valid_json(result):
    """The response is cut inside its value (escapes and all), so the model always reads valid JSON."""
    tool = rl.SandboxTool("echo", "returns a long result", {"type": "object", "properties": {}}, lambda: result)
    text = rl.run_tool_call('{"name": "echo", "arguments": {}}', {"echo": tool})
    assert len(text) <= rl.MAX_TOOL_OUTPUT
    value = json.loads(text)["result"]
    assert value.endswith("…") and len(value) > 100
