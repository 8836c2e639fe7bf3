"""Property tests of the data readers: whatever a JSON Lines or text file holds, reading it and
checking its records ends in a record, a left-out record or one line of DataError (a ValueError),
never another exception; and the time taken grows linearly with the input.

    python -m pytest tests/test_data_fuzz.py -q

Bounded: hypothesis is derandomized (the same examples every run, no example database) with a
fixed number of examples each; the timing checks compare CPU time at sizes n and 8n."""
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prepare
from data import DataError, EmptyTurn, check_conversation, iter_jsonl
from tokenizer import ROLES, Tokenizer, chat_spans

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
KEYS = ["role", "content", "reasoning_content", "tool_calls", "tools", "name", "arguments", "function",
        "conversations", "chosen", "rejected", "text"]

# JSON values weighted toward the shapes the readers look for: messages, tool calls, conversations
text = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(["", " ", "\n", "{", "[]", '{"a": 1}'])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | text, inner, max_size=4), max_leaves=12)
roles = st.sampled_from([*ROLES, "robot", "", None, 3])
tool_call = st.fixed_dictionaries({"name": text | values, "arguments": values | st.just('{"x": 1}')})
message = st.fixed_dictionaries({"role": roles}, optional={
    "content": text | values, "reasoning_content": text | values, "tools": values | st.lists(tool_call, max_size=2),
    "tool_calls": st.lists(tool_call | st.fixed_dictionaries({"function": tool_call}), max_size=2) | values})
conversation = st.lists(message, max_size=5) | values
record = st.fixed_dictionaries({}, optional={"conversations": conversation, "chosen": conversation,
                                             "rejected": conversation, "tools": values, "text": text | values})


def one_line(e: Exception) -> str:
    message = str(e)
    assert message and "\n" not in message, repr(message)
    return message


@FUZZ
@given(conversation, values)
def test_check_conversation_raises_only_value_errors(msgs, tools):
    try:
        checked, _ = check_conversation(msgs, tools)
    except ValueError as e:  # DataError and EmptyTurn are ValueErrors
        one_line(e)
    else:
        assert checked[-1]["role"] == "assistant"


@FUZZ
@given(st.lists(record.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass"))
                | st.binary(max_size=40), min_size=1, max_size=6))
def test_iter_jsonl_yields_objects_or_one_data_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    try:
        for _, line_no, obj in iter_jsonl([path], max_bytes=64):
            assert isinstance(obj, dict) and 1 <= line_no <= len(lines)
    except DataError as e:
        assert one_line(e).startswith(f"{path}:")
    skipped = {}
    assert all(isinstance(obj, dict) for _, _, obj in iter_jsonl([path], True, skipped, max_bytes=64))


@FUZZ
@given(st.binary(max_size=200), st.integers(1, 64))
def test_plain_text_yields_paragraphs_or_one_data_error(tmp_path_factory, raw, limit):
    path = tmp_path_factory.mktemp("fuzz") / "f.txt"
    path.write_bytes(raw)
    try:
        docs = list(prepare.iter_text(path, max_bytes=limit))
    except DataError as e:
        assert one_line(e).startswith(f"{path}:")
    else:
        assert all(d.strip() and len(d.encode("utf-8")) <= limit for _, _, d in docs)
    assert all(d.strip() for _, _, d in prepare.iter_text(path, True, {}, max_bytes=limit))


@pytest.fixture(scope="module")
def worker_tokenizer(tokenizer_dir):
    """The tokenizer of prepare's worker processes, in this process."""
    prepare._worker_tok = Tokenizer(tokenizer_dir)
    yield
    prepare._worker_tok = None


@FUZZ
@given(st.lists(record, min_size=1, max_size=4), st.integers(2, 64))
def test_chat_records_are_encoded_or_left_out_with_a_reason(worker_tokenizer, records, max_len):
    """The SFT and DPO encoders of prepare.py: every record is kept, or left out with one line that
    names its file and line; a kept one fits --max-len."""
    chunk = [("f.jsonl", i + 1, r) for i, r in enumerate(records)]
    for encode, limit in ((prepare._encode_sft_chunk, max_len), (prepare._encode_dpo_chunk, 2 * max_len)):
        for res in encode(chunk, max_len=limit, drop_overlong=False):
            assert res[0] in ("ok", "bad", "empty", "overlong", "identical")
            if res[0] in ("bad", "empty"):
                assert one_line(ValueError(res[1])).startswith("f.jsonl:")
            if res[0] == "ok":
                assert len(res[1]) == len(res[2]) <= limit and res[2].any()


def cpu_seconds(fn, arg) -> float:
    best = float("inf")
    for _ in range(3):  # the best of three: CPU time, so other processes on the machine matter little
        t0 = time.process_time()
        fn(arg)
        best = min(best, time.process_time() - t0)
    return best


def msgs_of(n):
    return [{"role": ("user", "assistant")[i % 2], "content": f"第{i}句 sentence"} for i in range(2 * n)]


def write(tmp_path, name, data: bytes):
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


@pytest.mark.parametrize("case", ["many turns", "long line of escapes", "deep nesting", "many lines",
                                  "long text paragraph"])
def test_reading_takes_linear_time(case, tmp_path):
    """Inputs an attacker would shape: time at 8n is well under the 64x of a quadratic reader."""
    def run(n):
        if case == "many turns":
            return lambda _: chat_spans(check_conversation(msgs_of(n))[0])
        if case == "long line of escapes":  # lone surrogates: each one checked
            path = write(tmp_path, f"{n}.jsonl", b'{"text": "' + b"\\ud800" * (n * 50) + b'"}\n')
            return lambda _: list(iter_jsonl([path], True, {}))
        if case == "deep nesting":
            path = write(tmp_path, f"{n}.jsonl", b'{"a": ' + b"[" * (n * 50) + b"]" * (n * 50) + b"}\n")
            return lambda _: list(iter_jsonl([path], True, {}))
        if case == "many lines":
            path = write(tmp_path, f"{n}.jsonl", json.dumps({"conversations": msgs_of(2)}).encode() * 1 + b"\n" * (n * 50))
            return lambda _: list(iter_jsonl([path]))
        path = write(tmp_path, f"{n}.txt", "一行\n".encode() * (n * 50))
        return lambda _: list(prepare.iter_text(path, True, {}, max_bytes=n * 40))
    n = 400
    small, large = cpu_seconds(run(n), None), cpu_seconds(run(8 * n), None)
    assert large < 24 * small + 0.02, (case, small, large)
