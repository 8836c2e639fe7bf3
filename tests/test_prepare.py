"""prepare.py tests: tokenizer, uint16 bins, errors that name file and line, atomic outputs.

    python -m pytest tests/test_prepare.py -q
"""
import json

import numpy as np
import pytest

import prepare as prepare_script
from tokenizer import CHAT_TEMPLATE, Tokenizer, render_chat
from conftest import ROOT
import subprocess
import sys


def test_tokenizer_special_tokens_and_roundtrip(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 433
    text = "小明喜欢数学。The cat reads the sea. 未见过的字：龘 and émoji 🙂"
    assert tok.decode(tok.encode(text)) == text  # byte-level: nothing is unknown
    ids = tok.encode_chat([{"role": "user", "content": "你好"}])
    assert ids[0] == tok.bos_id and tok.encode("<|im_end|>") == [tok.eos_id]


def test_tokenizer_loads_in_transformers_with_chat_template(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok = Tokenizer(tokenizer_dir)
    msgs = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "小明喜欢什么？"},
            {"role": "assistant", "content": "数学。"}, {"role": "user", "content": "Why?"}]
    rendered = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == render_chat(msgs, add_generation_prompt=True)
    assert hf.encode(rendered, add_special_tokens=False) == tok.encode(rendered)
    assert hf.eos_token_id == 2 and hf.pad_token_id == 0 and hf.bos_token_id == 1
    assert hf.chat_template == CHAT_TEMPLATE


def test_pretrain_bins_hold_every_document_once(corpus, tokenizer_dir, pretrain_dir):
    tok = Tokenizer(tokenizer_dir)
    meta = json.loads((pretrain_dir / "meta.json").read_text())
    docs = [json.loads(l)["text"] for l in corpus.read_text(encoding="utf-8").splitlines()]
    got = []
    for split in ("train", "val"):
        data = np.fromfile(pretrain_dir / f"{split}.bin", dtype=np.uint16)
        assert len(data) == meta[f"{split}_tokens"]
        # documents are bos + tokens + eos, back to back
        ends = np.flatnonzero(data == tok.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        assert (data[starts] == tok.bos_id).all() and ends[-1] == len(data) - 1
        got += [tok.decode(data[s + 1:e].tolist()) for s, e in zip(starts, ends)]
        assert len(ends) == meta[f"{split}_docs"]
    assert sorted(got) == sorted(docs)
    assert 0.05 < meta["val_docs"] / len(docs) < 0.15
    assert meta["vocab_size"] == 433 and meta["tokenizer_hash"] == tok.hash()
    assert (pretrain_dir / "tokenizer" / "tokenizer.json").exists()


def prepare(args):
    return subprocess.run([sys.executable, "prepare.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def test_malformed_line_names_file_and_line_and_leaves_no_output(tmp_path, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好"}\n{"text": "ok"}\n{"text": oops}\n{"text": "fine"}\n', encoding="utf-8")
    out = tmp_path / "out"
    r = prepare(["pretrain", "--input", bad, "--tokenizer", tokenizer_dir, "--out", out, "--quiet"])
    assert r.returncode != 0 and f"{bad}:3" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*")), "no partial output may remain"
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "好"}\n{"content": "no text field"}\n', encoding="utf-8")
    r = prepare(["pretrain", "--input", wrong, "--tokenizer", tokenizer_dir, "--out", out, "--quiet"])
    assert r.returncode != 0 and f"{wrong}:2" in r.stderr and '"text"' in r.stderr
    r = prepare(["pretrain", "--input", bad, wrong, "--tokenizer", tokenizer_dir, "--out", out, "--quiet",
                 "--skip-bad", "--val-fraction", "0"])
    assert r.returncode == 0 and "skipped 2 malformed" in r.stdout
    assert json.loads((out / "meta.json").read_text())["train_docs"] == 4


def test_plain_text_documents_are_blank_line_separated(tmp_path, tokenizer_dir):
    txt = tmp_path / "book.txt"
    txt.write_text("第一段第一行\n第一段第二行\n\n\n第二段\n\n第三段\n", encoding="utf-8")
    out = tmp_path / "out"
    r = prepare(["pretrain", "--input", txt, "--tokenizer", tokenizer_dir, "--out", out, "--quiet", "--val-fraction", "0"])
    assert r.returncode == 0, r.stderr
    tok = Tokenizer(tokenizer_dir)
    data = np.fromfile(out / "train.bin", dtype=np.uint16).tolist()
    assert data.count(tok.bos_id) == 3
    assert tok.decode(data, skip_special_tokens=False).startswith("<|im_start|>第一段第一行\n第一段第二行<|im_end|>")


def test_rerun_replaces_output_atomically(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "out"
    assert prepare(["pretrain", "--input", corpus, "--tokenizer", tokenizer_dir, "--out", out, "--quiet"]).returncode == 0
    before = (out / "train.bin").read_bytes()
    # a failing re-run leaves the previous complete output untouched
    r = prepare(["pretrain", "--input", tmp_path / "missing.jsonl", "--tokenizer", tokenizer_dir, "--out", out, "--quiet"])
    assert r.returncode != 0 and "missing.jsonl" in r.stderr
    assert (out / "train.bin").read_bytes() == before


def test_vocab_over_uint16_is_refused(tmp_path, corpus):
    r = prepare(["tokenizer", "--input", corpus, "--vocab-size", "70000", "--out", tmp_path / "t", "--quiet"])
    assert r.returncode != 0 and "65535" in r.stderr


# -----------------------------------------------------------------------------
# --out: only prepare's own outputs are replaced


def test_out_holding_other_files_is_refused_and_kept(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    mine = out / "corpus.jsonl"
    mine.write_bytes(corpus.read_bytes())
    for cmd in (["pretrain", "--tokenizer", tokenizer_dir], ["tokenizer", "--vocab-size", "400"]):
        r = prepare([*cmd, "--input", mine, "--out", out, "--quiet"])
        assert r.returncode != 0 and "--force" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        # the input inside --out is never deleted, not even with --force
        r = prepare([*cmd, "--input", mine, "--out", out, "--quiet", "--force"])
        assert r.returncode != 0 and "inside" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert sorted(p.name for p in out.iterdir()) == ["corpus.jsonl", "notes.txt"]
        assert mine.read_bytes() == corpus.read_bytes()
    # --force replaces a directory that holds no input
    r = prepare(["pretrain", "--input", corpus, "--tokenizer", tokenizer_dir, "--out", out, "--quiet", "--force"])
    assert r.returncode == 0, r.stderr
    assert (out / "meta.json").exists() and not (out / "notes.txt").exists()


def test_rerun_replaces_prepares_own_outputs_without_force(tmp_path, corpus, tokenizer_dir):
    tok = tmp_path / "tok"
    for _ in range(2):
        r = prepare(["tokenizer", "--input", corpus, "--vocab-size", "400", "--out", tok, "--quiet"])
        assert r.returncode == 0, r.stderr
    out = tmp_path / "data"
    for _ in range(2):
        r = prepare(["pretrain", "--input", corpus, "--tokenizer", tok, "--out", out, "--quiet"])
        assert r.returncode == 0, r.stderr
    assert json.loads((out / "meta.json").read_text())["written_by"] == "minimind prepare.py"
    # a directory of the same look that prepare did not write (a downloaded tokenizer) is not replaced
    hf = tmp_path / "downloaded"
    hf.mkdir()
    (hf / "tokenizer.json").write_bytes((tok / "tokenizer.json").read_bytes())
    (hf / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    r = prepare(["tokenizer", "--input", corpus, "--vocab-size", "400", "--out", hf, "--quiet"])
    assert r.returncode != 0 and "--force" in r.stderr
    assert json.loads((hf / "tokenizer_config.json").read_text()) == {"tokenizer_class": "PreTrainedTokenizerFast"}
    # the tokenizer being read is never the output, even with --force
    r = prepare(["pretrain", "--input", corpus, "--tokenizer", tok, "--out", tok, "--quiet", "--force"])
    assert r.returncode != 0 and "inside" in r.stderr and (tok / "tokenizer.json").exists()


# -----------------------------------------------------------------------------
# bad inputs: one line, no traceback


def one_line_error(r, *needles):
    assert r.returncode != 0 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert str(n) in r.stderr, r.stderr


def test_plain_text_not_utf8_names_file_and_line(tmp_path, tokenizer_dir):
    txt = tmp_path / "book.txt"
    txt.write_bytes("第一段\n\n第二段\n".encode("utf-8") + b"caf\xe9\n")
    r = prepare(["pretrain", "--input", txt, "--tokenizer", tokenizer_dir, "--out", tmp_path / "o", "--quiet"])
    one_line_error(r, f"{txt}:4: not UTF-8")
    r = prepare(["tokenizer", "--input", txt, "--vocab-size", "400", "--out", tmp_path / "t", "--quiet"])
    one_line_error(r, f"{txt}:4: not UTF-8")


def test_plain_text_bom_is_accepted(tmp_path, tokenizer_dir):
    txt = tmp_path / "bom.txt"
    txt.write_bytes(b"\xef\xbb\xbf" + "第一段\n\n第二段\n".encode("utf-8"))
    out = tmp_path / "o"
    r = prepare(["pretrain", "--input", txt, "--tokenizer", tokenizer_dir, "--out", out, "--quiet",
                 "--val-fraction", "0"])
    assert r.returncode == 0, r.stderr
    tok = Tokenizer(tokenizer_dir)
    text = tok.decode(np.fromfile(out / "train.bin", dtype=np.uint16).tolist(), skip_special_tokens=False)
    assert text == "<|im_start|>第一段<|im_end|><|im_start|>第二段<|im_end|>"


def test_directory_input_missing_tokenizer_and_unwritable_out(tmp_path, corpus, tokenizer_dir):
    """As command lines; test_prepare_errors.py runs these and many more cases in-process."""
    r = prepare(["pretrain", "--input", tmp_path, "--tokenizer", tokenizer_dir, "--out", tmp_path / "o", "--quiet"])
    one_line_error(r, tmp_path, "directory")
    one_line_error(prepare(["pretrain", "--input", corpus, "--tokenizer", tmp_path / "nowhere", "--out", tmp_path / "o",
                            "--quiet"]), "nowhere")
    # /sys refuses new entries, to root too
    one_line_error(prepare(["pretrain", "--input", corpus, "--tokenizer", tokenizer_dir, "--out", "/sys/minimind-out",
                            "--quiet"]), "/sys/minimind-out", "cannot write")


def test_tokenizer_refuses_tiny_vocab_and_empty_input(tmp_path, corpus):
    r = prepare(["tokenizer", "--input", corpus, "--vocab-size", "10", "--out", tmp_path / "t", "--quiet"])
    one_line_error(r, "--vocab-size 10", "at least")
    assert not (tmp_path / "t").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    r = prepare(["tokenizer", "--input", empty, "--out", tmp_path / "t", "--quiet"])
    one_line_error(r, "empty")
    assert not (tmp_path / "t").exists()


def jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


QA = [{"role": "user", "content": "小明喜欢什么？"}, {"role": "assistant", "content": "数学。"}]
EMPTY_REPLY = [{"role": "user", "content": "写一个简单的数学方程来计算 200 的 10%。"}, {"role": "assistant", "content": ""}]
REASONING_ONLY = [{"role": "user", "content": "想一想"}, {"role": "assistant", "content": "", "reasoning_content": "嗯。"}]


def test_empty_turns_are_left_out_and_counted_not_fatal(tmp_path, tokenizer_dir):
    """An empty reply (public Alpaca-style data has them) is legal: the record is left out, counted, and
    the first one named; a reply with reasoning only (MiniMind-3's reasoning data) is trained."""
    src = jsonl(tmp_path / "sft.jsonl", [{"conversations": QA}, {"conversations": EMPTY_REPLY},
                                         {"conversations": REASONING_ONLY}, {"conversations": [QA[0], *EMPTY_REPLY]}])
    r = prepare(["sft", "--input", src, "--tokenizer", tokenizer_dir, "--out", tmp_path / "s", "--quiet",
                 "--val-fraction", "0"])
    assert r.returncode == 0, r.stderr
    assert f"2 left out for an empty turn (first: {src}:2: message 1: empty content)" in r.stdout
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert (meta["train_records"], meta["dropped_empty"], meta["skipped_bad"]) == (2, 2, 0)
    tok = Tokenizer(tokenizer_dir)
    text = tok.decode(np.fromfile(tmp_path / "s" / "train.bin", dtype=np.uint16).tolist(), skip_special_tokens=False)
    assert "嗯。" in text and "200" not in text
    # DPO: a pair with an empty reply is left out the same way
    pairs = [{"chosen": QA, "rejected": [QA[0], {"role": "assistant", "content": "不知道。"}]},
             {"chosen": QA, "rejected": [QA[0], {"role": "assistant", "content": " "}]}]
    r = prepare(["dpo", "--input", jsonl(tmp_path / "dpo.jsonl", pairs), "--tokenizer", tokenizer_dir,
                 "--out", tmp_path / "d", "--quiet", "--val-fraction", "0"])
    assert r.returncode == 0 and '1 left out for an empty turn' in r.stdout and '"rejected": message 1' in r.stdout
    # malformed data stays an error, also when the record has an empty turn too
    broken = [QA[0], {"role": "assistant", "content": ""}, {"role": "robot", "content": "x"}, QA[1]]
    src = jsonl(tmp_path / "bad.jsonl", [{"conversations": QA}, {"conversations": broken}])
    r = prepare(["sft", "--input", src, "--tokenizer", tokenizer_dir, "--out", tmp_path / "b", "--quiet"])
    assert r.returncode != 0 and f"{src}:2: message 2: unknown role 'robot'" in r.stderr


def in_process(argv) -> str:
    """prepare.main in this process (no interpreter start-up): "" on success, else its one-line error."""
    try:
        prepare_script.main([str(a) for a in argv])
    except SystemExit as e:
        return str(e.code)
    return ""


def test_out_as_a_symbolic_link(tmp_path, tokenizer_dir):
    """A link to a directory prepare.py wrote is written through (the link kept); a link that names
    nothing or loops is one line; nothing is deleted that prepare did not write, no temporary left."""
    small = jsonl(tmp_path / "small.jsonl", [{"text": "小明喜欢数学。"}] * 3)
    common = ["pretrain", "--input", small, "--tokenizer", tokenizer_dir, "--quiet", "--workers", "1"]
    real = tmp_path / "disk" / "pretrain"
    assert in_process([*common, "--out", real]) == ""
    (tmp_path / "data").mkdir()
    link = tmp_path / "data" / "pretrain"
    link.symlink_to(real)
    (real / "train.bin").write_bytes(b"")  # so the rewrite shows
    assert in_process([*common, "--out", link]) == ""
    assert link.is_symlink() and (link / "train.bin").stat().st_size > 0 and (real / "meta.json").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "data" / "foreign").symlink_to(foreign)
    assert "--force" in in_process([*common, "--out", tmp_path / "data" / "foreign"])
    assert (foreign / "notes.txt").read_text() == "mine"
    (tmp_path / "data" / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "data" / "loop").symlink_to(tmp_path / "data" / "loop")
    for name, needle in (("dangling", "which does not exist"), ("loop", "symbolic links")):
        message = in_process([*common, "--out", tmp_path / "data" / name])  # a traceback would escape
        assert needle in message and "\n" not in message, message
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dangling", "foreign", "loop", "pretrain"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["pretrain"] and not (tmp_path / "nowhere").exists()


def test_an_overlong_record_is_named_and_never_read_whole(tmp_path, tokenizer_dir):
    """A 3 MB line under a 1 MB limit: FILE:LINE and the flag, or skipped and counted with --skip-bad;
    the reader holds at most the limit of it (the 50 MB line of the issue took 6-9 GB)."""
    import tracemalloc
    from data import iter_jsonl
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "好"}) + "\n" + json.dumps({"text": "长" * 1_000_000}, ensure_ascii=False) + "\n"
                   + json.dumps({"text": "ok"}) + "\n", encoding="utf-8")
    common = ["pretrain", "--tokenizer", tokenizer_dir, "--quiet", "--workers", "1", "--val-fraction", "0"]
    message = in_process([*common, "--input", big, "--out", tmp_path / "a", "--max-record-bytes", 1_000_000])
    assert f"{big}:2: a record over 1,000,000 bytes" in message and "--max-record-bytes" in message
    assert in_process([*common, "--input", big, "--out", tmp_path / "b", "--max-record-bytes", 1_000_000,
                       "--skip-bad"]) == ""
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["skipped_bad"] == 1
    # a plain-text paragraph is one record: its many short lines add up
    book = tmp_path / "book.txt"
    book.write_text("短段落\n\n" + "长的一行\n" * 200_000 + "\n最后一段\n", encoding="utf-8")
    message = in_process([*common, "--input", book, "--out", tmp_path / "d", "--max-record-bytes", 1_000_000])
    assert f"{book}:3: a record over 1,000,000 bytes" in message
    assert in_process([*common, "--input", book, "--out", tmp_path / "e", "--max-record-bytes", 1_000_000,
                       "--skip-bad"]) == ""
    assert json.loads((tmp_path / "e" / "meta.json").read_text())["skipped_bad"] == 1
    tok = Tokenizer(tokenizer_dir)
    text = tok.decode(np.fromfile(tmp_path / "e" / "train.bin", dtype=np.uint16).tolist())
    assert "短段落" in text and "最后一段" in text and "长的一行" not in text
    tracemalloc.start()
    assert [obj["text"] for _, _, obj in iter_jsonl([big], skip_bad=True, max_bytes=64 << 10)] == ["好", "ok"]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, peak  # 3 MB on disk, under 1 MB in memory
