"""sample.py: streamed continuation, terminal chat over stdin, batched decoding, UTF-8-safe streaming.

    python -m pytest tests/test_sample.py -q
"""
import os
import subprocess
import sys
import time

import pytest

from bench import bench_decode, bench_decode_limit
from conftest import ROOT
from minimind import Linear
from tokenizer import Tokenizer, TokenDecoder, _byte_level_alphabet
from sample import fit_history, generate_batch, stream_tokens
from tokenizer import token_bytes


# tiny models decode fastest on one thread, and a busy machine makes more threads much slower
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def greedy_text(model, tok, ids, n):
    """What sample.py prints for a greedy continuation of `ids` (stopping before eos)."""
    dec, out = TokenDecoder(tok), []
    for t in stream_tokens(model, ids, n, eos_id=tok.eos_id, temperature=0):
        if t == tok.eos_id:
            break
        out.append(dec.feed(t))
    return "".join(out) + dec.flush()


def sample_py(*args, stdin=None):
    return subprocess.run([sys.executable, "sample.py", *map(str, args)], cwd=ROOT, input=stdin, env=ENV,
                          capture_output=True, text=True, timeout=120)


# -----------------------------------------------------------------------------
# streaming detokenization

def test_token_bytes_match_the_tokenizer(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    table = token_bytes(tok, skip_special_tokens=False)
    assert len(table) == tok.vocab_size
    text = "小明喜欢一本书。 The cat reads the book. 你好，世界😀 <|im_end|> ok"
    ids = tok.encode(text)
    assert b"".join(table[i] for i in ids).decode("utf-8") == tok.decode(ids) == text
    skipped = token_bytes(tok)  # default: special tokens print nothing
    assert skipped[tok.eos_id] == skipped[tok.bos_id] == b""


def test_stream_never_splits_a_character(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    text = "你好，世界😀 ok é"
    # one token per byte: every multi-byte character arrives in 2-4 pieces
    alphabet = {b: c for c, b in _byte_level_alphabet().items()}  # byte -> its one-byte token
    byte_ids = [tok.tok.token_to_id(alphabet[b]) for b in text.encode("utf-8")]
    assert None not in byte_ids and len(byte_ids) > len(text)
    dec = TokenDecoder(tok)
    pieces = [dec.feed(t) for t in byte_ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # the first byte of 你 (3 bytes) prints nothing until the third arrives
    assert pieces[:3] == ["", "", "你"]
    # invalid bytes become U+FFFD instead of stalling or raising
    dec = TokenDecoder(tok)
    bad = [tok.tok.token_to_id(alphabet[b]) for b in b"\xe4\xbd" + b"A"]
    assert "".join(dec.feed(t) for t in bad) + dec.flush() == "\ufffdA"


def test_streamed_pieces_of_real_text_are_whole_characters(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    text = "科学家研究数学。我们看见大海。A student found the sea. 春天的花😀😀"
    ids = tok.encode(text)
    dec = TokenDecoder(tok)
    pieces = [dec.feed(t) for t in ids]
    assert "".join(pieces) + dec.flush() == text
    for p in pieces:  # each piece is whole characters: it survives an encode/decode round trip
        assert p.encode("utf-8").decode("utf-8") == p and "\ufffd" not in p


# -----------------------------------------------------------------------------
# generation

def test_batched_greedy_equals_single(loaded):
    model, tok = loaded
    texts = ["小明", "The cat reads the book.", "我们看见大海。科学家研究数学。老师写了一封信。", "xyz",
             "这只猫喜欢春天的花。"]
    prompts = [[tok.bos_id] + tok.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ
    batch = generate_batch(model, prompts, 24, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0)
    alone = [generate_batch(model, [p], 24, eos_id=tok.eos_id, temperature=0)[0] for p in prompts]
    streamed = [[t for t in stream_tokens(model, p, 24, eos_id=tok.eos_id, temperature=0) if t != tok.eos_id]
                for p in prompts]
    assert batch == alone == streamed
    assert all(len(o) > 0 for o in batch)
    # the test means something: continuations differ between prompts and depend on more than the
    # last token (two prompts ending in the same token continue differently)
    assert len({tuple(o) for o in batch}) == len(batch)
    a, b = [[tok.bos_id] + tok.encode(t) for t in ("小明喜欢大海。", "老师看见一本书。")]
    assert a[-1] == b[-1]
    assert generate_batch(model, [a, b], 8, temperature=0)[0] != generate_batch(model, [a, b], 8, temperature=0)[1]


def test_sampling_is_seeded_and_batched_rows_stop_at_eos(loaded):
    model, tok = loaded
    p = [tok.bos_id] + tok.encode("小明")
    kw = dict(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.5)
    a = generate_batch(model, [p], 16, seed=3, **kw)
    b = generate_batch(model, [p], 16, seed=3, **kw)
    assert a == b and len(a[0]) == 16
    # in a batch, prompt i draws from seed + i: the same tokens as alone with that seed
    q = [tok.bos_id] + tok.encode("The cat reads")
    batch = generate_batch(model, [q, p], 16, seed=2, **kw)
    assert batch[1] == a[0] and batch[0] == generate_batch(model, [q], 16, seed=2, **kw)[0]
    # a row whose greedy continuation hits eos is cut there; the other row runs on
    first = generate_batch(model, [p], 5, temperature=0)[0]
    out = generate_batch(model, [p, p + [7]], 5, eos_id=first[2], temperature=0)
    assert out[0] == first[:2]


def test_fit_history_drops_oldest_turns(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    system = {"role": "system", "content": "你是助手"}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"第{i}个问题：小明喜欢什么？"},
                  {"role": "assistant", "content": f"第{i}个回答：小明喜欢一本书。"}]
    msgs = [system] + turns + [{"role": "user", "content": "最后的问题"}]
    full = len(tok.encode_chat(msgs))
    kept, ids = fit_history(tok, msgs, context=full - 40 + 10, reserve=10)
    assert len(ids) + 10 <= full - 40 + 10 and ids == tok.encode_chat(kept)
    assert kept[0] == system and kept[-1] == msgs[-1] and kept[1]["role"] == "user"
    assert kept[1:] == msgs[len(msgs) - len(kept) + 1:]  # a suffix of the conversation: oldest dropped first
    assert len(kept) < len(msgs)
    kept, _ = fit_history(tok, msgs, context=5, reserve=10)  # nothing fits: system + newest message stay
    assert kept == [system, msgs[-1]]
    kept, ids = fit_history(tok, msgs, context=10_000, reserve=10)
    assert kept == msgs


# -----------------------------------------------------------------------------
# the command line

def test_prompt_continuation_streams(random_ckpt, loaded):
    model, tok = loaded
    prompt = "科学家研究"
    expect = prompt + greedy_text(model, tok, [tok.bos_id] + tok.encode(prompt), 40)
    proc = subprocess.Popen([sys.executable, "sample.py", "--ckpt", random_ckpt, "--prompt", prompt,
                             "--max-new-tokens", "40", "--temperature", "0"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks, deadline = [], time.time() + 120
    while time.time() < deadline:
        data = os.read(proc.stdout.fileno(), 65536)
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=30)
    err = proc.stderr.read().decode()
    assert proc.returncode == 0, err
    out = b"".join(chunks).decode("utf-8")
    assert out == expect + "\n"
    assert len(chunks) >= 2  # written piece by piece, not once at the end
    assert "tok/s" in err


def test_batch_of_prompts_on_the_command_line(random_ckpt, loaded):
    model, tok = loaded
    prompts = ["小明", "The cat reads the book."]
    r = sample_py("--ckpt", random_ckpt, "--prompt", prompts[0], "--prompt", prompts[1],
                  "--max-new-tokens", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    outs = generate_batch(model, ids, 12, eos_id=tok.eos_id, temperature=0)
    expect = "".join(f"--- [{i}] {p}{tok.decode(o, skip_special_tokens=True)}\n"
                     for i, (p, o) in enumerate(zip(prompts, outs)))
    assert r.stdout == expect


def test_chat_two_turns_over_stdin(random_ckpt, loaded):
    model, tok = loaded
    system, q1, q2 = "你是一个乐于助人的助手。", "小明喜欢什么？", "The cat reads what?"
    r = sample_py("--ckpt", random_ckpt, "--chat", "--system", system, "--max-new-tokens", "10",
                  "--temperature", "0", stdin=f"{q1}\n\n{q2}\n")
    assert r.returncode == 0, r.stderr
    # the same conversation in-process: the second reply sees the first turn (history is kept)
    history = [{"role": "system", "content": system}, {"role": "user", "content": q1}]
    a1 = greedy_text(model, tok, tok.encode_chat(history), 10)
    history += [{"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    a2 = greedy_text(model, tok, tok.encode_chat(history), 10)
    shown = a2.replace("</think>", "")  # this random model writes a stray </think>: after text, dropped (ReplyParser)
    assert "</think>" in a2 and r.stdout == f"{a1}\n{shown}\n"
    assert a2 != greedy_text(model, tok, tok.encode_chat([history[0], history[-1]]), 10)
    assert r.stderr.count("tok/s") == 2


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x"], "not a minimind checkpoint"),
    ([], "--prompt"),
    (["--prompt", "小明" * 300], "context window of 256"),  # longer than the checkpoint's seq_len
    (["--chat", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_bad_command_lines(random_ckpt, tmp_path, capsys, argv, message):
    import sample
    ckpt = tmp_path if "not a" in message else random_ckpt
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(ckpt), *argv])
    assert e.value.code != 0 and message in str(e.value.code) + capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--top-p", "0"), ("--frequency-penalty", "5"),
                                         ("--seed", str(2 ** 64))])
def test_bad_sampling_flag_is_one_line(random_ckpt, flag, value):
    r = sample_py("--ckpt", random_ckpt, "--prompt", "x", flag, value)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.startswith("error: " + flag[2:].replace("-", "_")) and r.stderr.count("\n") == 1, r.stderr


def test_bench_decode_reports_rates():
    out = {}
    bench_decode("cpu", out, presets=("tiny",), batch_sizes=(1, 3), prompt_len=8, new_tokens=4, threads=1,
                 compile_too=False, reps=1)
    rows = out["decode"]
    assert [(r["model"], r["batch"]) for r in rows] == [("tiny", 1), ("tiny", 3)]
    assert all(r["kv_tok_s"] > 0 and r["naive_tok_s"] > 0 and r["speedup"] > 0 for r in rows)


def test_bench_decode_limit_compares_the_split_with_f_linear_in_one_run():
    out, split_rows = {}, Linear.SPLIT_ROWS
    bench_decode_limit("cpu", out, ["tiny"], new_tokens=4, reps=1, compile_too=False)
    (row,) = out["decode_limit"]
    assert row["limit_tok_s"] > 0 and row["eager_tok_s"] > 0 and row["eager_unsplit_tok_s"] > 0
    # both rates against the same limit (the row holds them rounded)
    for k in ("eager", "eager_unsplit"):
        assert row[f"{k}_fraction"] == pytest.approx(row[f"{k}_tok_s"] / row["limit_tok_s"], rel=0.02, abs=2e-3)
    assert Linear.SPLIT_ROWS == split_rows  # unsplit_linear put it back
