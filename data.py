"""Input records and token files: JSON Lines read with errors that name the file and line, and the
token files of `prepare.py` read back as training batches (pretraining windows, packed SFT/DPO rows),
and the prompts of RL (`prepare.py rl-task`, or any RLAIF JSON Lines file) read back as prompt batches.

Every batch is a pure function of (seed, step, global micro-batch index), so a resumed run sees
exactly the batches an uninterrupted one would."""
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from rl.tasks import is_val_key, prompt_messages
from tokenizer import ROLES, Tokenizer

_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")

# JSON Lines input

class DataError(ValueError):
    """A malformed input record; the message names the file and line."""


class EmptyTurn(ValueError):
    """A well-formed conversation with a turn that says nothing: an empty user message, or an empty
    assistant reply with neither reasoning nor tool calls (public Alpaca-style sets have them).
    Not an error in the data: `prepare.py` leaves such a record out and counts it."""


def _json_list(value, what: str) -> list:
    """A list given as it is or, as MiniMind stores `tools` and `tool_calls`, as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{what} is not valid JSON") from None
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise ValueError(f"{what}: expected a list of objects")
    return value


def _check_tool_call(call: dict, what: str):
    fn = call.get("function") or call  # OpenAI's {"function": {...}} or MiniMind's flat {"name", "arguments"}
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{what}: expected a \"name\"")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            raise ValueError(f"{what}: arguments are not valid JSON") from None
    if not isinstance(args, dict):
        raise ValueError(f"{what}: expected \"arguments\", an object or its JSON text")


def check_conversation(msgs, tools=None):
    """Check a conversation and return it as `tokenizer.render_chat` takes it: (messages, tools).

    Messages are OpenAI's or MiniMind's: {"role": system | user | assistant | tool, "content"}, an
    assistant's with "reasoning_content" and "tool_calls" ([{"function": {"name", "arguments"}}] or
    [{"name", "arguments"}]). The function specs come as `tools` (the record's field) or, where
    MiniMind keeps them, as "tools" on the system message; MiniMind's JSON-text `tools` and
    `tool_calls` are parsed. Content may be empty or null in a system message, a tool result and an
    assistant turn that reasons or calls tools. Raises ValueError naming the first problem; EmptyTurn
    (a ValueError) when the only problem is an empty user message or assistant reply."""
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("expected a non-empty list of messages")
    out, empty = [], None
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"message {i}: expected an object with \"role\" and \"content\"")
        role, content, m = m.get("role"), m.get("content"), dict(m)
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        for key in ("content", "reasoning_content"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise ValueError(f"message {i}: {key} must be a string")
        if m.get("tools"):
            if role != "system" or tools:
                raise ValueError(f"message {i}: tools belong on the record or on its one system message")
            tools = m["tools"]
        m.pop("tools", None)
        if m.get("tool_calls"):
            if role != "assistant":
                raise ValueError(f"message {i}: only the assistant makes tool calls")
            m["tool_calls"] = _json_list(m["tool_calls"], f"message {i}: tool_calls")
            for j, call in enumerate(m["tool_calls"]):
                _check_tool_call(call, f"message {i}: tool call {j}")
        said = (content or "").strip() or (role == "assistant" and (m.get("tool_calls") or
                                                                    (m.get("reasoning_content") or "").strip()))
        if not said and role in ("user", "assistant") and empty is None:
            empty = i
        out.append(m)
    if out[-1]["role"] != "assistant":
        raise ValueError("the conversation does not end with an assistant turn")
    tools = _json_list(tools, "tools") if tools else None
    if empty is not None:  # raised last: a malformed record is reported as malformed, not as empty
        raise EmptyTurn(f"message {empty}: empty content")
    return out, tools


MAX_RECORD_BYTES = 4 << 20  # the longest input line (or text paragraph); MiniMind's records are kilobytes


def read_lines(f, limit: int):
    """Yield each line of binary file `f` (its newline included), or None for a line over `limit`
    bytes: that one is read past in 64 KiB pieces, never held whole (memory stays bounded)."""
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield raw


def overlong(path, line_no: int, limit: int) -> DataError:
    return DataError(f"{path}:{line_no}: a record over {limit:,} bytes (the limit: prepare.py --max-record-bytes)")


def iter_jsonl(paths, skip_bad: bool = False, bad_counter: dict = None, max_bytes: int = MAX_RECORD_BYTES):
    """Yield (path, line_no, obj) for every non-empty line of every file. A line that is not UTF-8,
    not a JSON object or over `max_bytes` raises DataError naming file:line, or is counted in
    bad_counter["bad"] with skip_bad. Lines are decoded one by one (binary read), so the line named
    is the line at fault; a UTF-8 byte order mark is accepted."""
    for path in paths:
        if os.path.isdir(path):
            raise DataError(f"{path}: a directory, expected a JSON Lines file")
        try:
            f = open(path, "rb")
        except OSError as e:
            raise DataError(f"{path}: {e.strerror}") from None
        with f:
            for line_no, raw in enumerate(read_lines(f, max_bytes), 1):
                if raw is None:
                    if not skip_bad:
                        raise overlong(path, line_no, max_bytes)
                    if bad_counter is not None:
                        bad_counter["bad"] = bad_counter.get("bad", 0) + 1
                    continue
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                    if _SURROGATE.search(line):  # json accepts "\ud800" alone: a str no file or tokenizer takes
                        json.dumps(obj, ensure_ascii=False).encode("utf-8")
                except (ValueError, RecursionError) as e:  # UnicodeError is a ValueError
                    if skip_bad:
                        if bad_counter is not None:
                            bad_counter["bad"] = bad_counter.get("bad", 0) + 1
                        continue
                    what = ("not UTF-8" if isinstance(e, UnicodeDecodeError) else
                            "lone surrogate escape" if isinstance(e, UnicodeEncodeError) else
                            "nested too deep" if isinstance(e, RecursionError) else "malformed JSON line")
                    raise DataError(f"{path}:{line_no}: {what} ({e})") from None
                yield path, line_no, obj


# -----------------------------------------------------------------------------
# token files: written by `prepare.py`, read back below
#
# A prepared directory holds meta.json (kind, vocabulary, tokenizer hash, counts), tokenizer/, and
# per split (train, val):
#   pretrain: {split}.bin   uint16 tokens, documents back to back (each bos ... eos)
#   sft:      {split}.bin   uint16 tokens of every conversation back to back
#             {split}.mask  uint8, one per token: 1 = the model learns to produce this token
#             {split}.idx   int64 offsets (N + 1,): conversation i = [idx[i], idx[i+1])
#   dpo:      {split}.bin / .mask the same, each pair stored as prompt ++ chosen ++ rejected (the
#             shared prompt once); {split}.idx int64 (N, 4): start, prompt, chosen, rejected lengths

SPLITS = ("train", "val")


class TokenFileWriter:
    """Writes the token files of one prepared directory (`kind` pretrain|sft|dpo) into `directory`,
    counting records, tokens and trained tokens per split; `finish(meta)` writes meta.json."""

    def __init__(self, directory: Path, kind: str):
        self.dir, self.kind = Path(directory), kind
        exts = ("bin",) if kind == "pretrain" else ("bin", "mask", "idx")
        self.files = {s: {e: open(self.dir / f"{s}.{e}", "wb") for e in exts} for s in SPLITS}
        self.counts = {s: {"records": 0, "tokens": 0, "trained_tokens": 0} for s in SPLITS}
        if kind == "sft":
            for f in self.files.values():
                f["idx"].write(np.zeros(1, dtype=np.int64).tobytes())  # offsets start at 0

    def add(self, split: str, ids: np.ndarray, mask: np.ndarray = None, lengths: tuple = None):
        """One record: a document (pretrain), a conversation (sft), or a pair (dpo, with `lengths`
        = (prompt, chosen, rejected))."""
        f, c = self.files[split], self.counts[split]
        f["bin"].write(ids.astype(np.uint16, copy=False).tobytes())
        start = c["tokens"]
        c["records"] += 1
        c["tokens"] += len(ids)
        if mask is not None:
            f["mask"].write(mask.astype(np.uint8, copy=False).tobytes())
            c["trained_tokens"] += int(mask.sum())
        if self.kind == "sft":
            f["idx"].write(np.array([c["tokens"]], dtype=np.int64).tobytes())
        elif self.kind == "dpo":
            f["idx"].write(np.array([start, *lengths], dtype=np.int64).tobytes())

    def close(self):
        for f in self.files.values():
            for fh in f.values():
                fh.close()

    def finish(self, meta: dict) -> dict:
        """Close the files and write meta.json: `meta` plus kind, dtypes and the per-split counts."""
        self.close()
        keys = ("tokens",) if self.kind == "pretrain" else ("records", "tokens", "trained_tokens")
        meta = {"kind": self.kind, "dtype": "uint16", **({} if self.kind == "pretrain" else {"mask_dtype": "uint8"}),
                **{f"{s}_{k}": self.counts[s][k] for s in SPLITS for k in keys}, **meta}
        (self.dir / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        return meta


def fit_pair(p: int, c: int, r: int, limit: int):
    """The one truncation rule for a DPO pair (prepare.py --max-len and train.py --seq-len): a pair
    lives in one row as prompt + chosen and prompt + rejected, 2p + c + r tokens. When that is over
    `limit`, the completions are cut, the longer first, so each keeps as much as it can, and the prompt
    stays whole (as MiniMind keeps it) unless that would leave a completion fewer than min(its length,
    limit // 8) tokens: then the prompt loses its start, just enough, keeping the turn being answered.
    -> (p', c', r'); a value < 1 means nothing of that completion fits."""
    if 2 * p + c + r <= limit:
        return p, c, r
    reserve = min(c, limit // 8) + min(r, limit // 8)
    p = max(0, min(p, (limit - reserve) // 2))
    room = limit - 2 * p
    c2 = min(c, max(room // 2, room - r))
    return p, c2, min(r, room - c2)


# -----------------------------------------------------------------------------
# token files -> batches

def batch_generator(seed: int, step: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + index)


def read_meta(data_dir: Path, kind: str) -> dict:
    """meta.json of a directory written by `prepare.py KIND`, or a clear error."""
    meta_path = data_dir / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: not a prepared data directory (run `python prepare.py {kind}`)")
    return json.loads(meta_path.read_text())


class PretrainData:
    """Random windows of seq_len + 1 tokens from memmapped uint16 files (documents back to back)."""

    def __init__(self, data_dir, seq_len: int, seed: int, micro_batches: int = 1):
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir, "pretrain")
        self.seq_len, self.seed = seq_len, seed
        self.splits = {}
        for split in ("train", "val"):
            path = self.dir / f"{split}.bin"
            n = os.path.getsize(path) // 2
            if n <= seq_len + 1:
                raise ValueError(f"{path}: {n} tokens, fewer than one window of {seq_len + 1}")
            self.splits[split] = np.memmap(path, dtype=np.uint16, mode="r", shape=(n,))

    def describe(self) -> str:
        return (f"pretrain data: {len(self.splits['train']):,} train / {len(self.splits['val']):,} val tokens, "
                f"random windows of {self.seq_len}")

    def epoch_tokens(self) -> int:
        """Tokens in one pass over the training split."""
        return len(self.splits["train"])

    def val_batches(self, batch_size: int, wanted: int) -> int:
        """Validation batches per evaluation: random windows, as many as asked."""
        return wanted

    def batch(self, split: str, step: int, index: int, batch_size: int, device: str) -> dict:
        data = self.splits[split]
        g = batch_generator(self.seed + (split == "val"), step, index)
        starts = torch.randint(0, len(data) - self.seq_len - 1, (batch_size,), generator=g).tolist()
        rows = np.stack([data[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(rows)
        if device.startswith("cuda"):
            t = t.pin_memory().to(device, non_blocking=True)
        return {"idx": t[:, :-1], "targets": t[:, 1:]}


# packed chat data (sft, dpo): whole conversations / preference pairs in rows of seq_len tokens

def pack_rows(lengths, capacity: int) -> list:
    """Best-fit decreasing bin packing: lists of item indices whose lengths sum to <= capacity.
    A function of the lengths only (ties broken by index), so every process builds the same plan."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    rows = []
    open_rows = [[] for _ in range(capacity + 1)]  # room left -> rows with exactly that much room
    has_room = np.zeros(capacity + 1, dtype=bool)
    for i in order:
        n = int(lengths[i])
        j = n + int(has_room[n:].argmax())  # the tightest row the item fits in, if any
        if has_room[j]:
            row = open_rows[j].pop()
            has_room[j] = bool(open_rows[j])
            rows[row].append(int(i))
            room = j - n
        else:
            row, room = len(rows), capacity - n
            rows.append([int(i)])
        if room > 0:
            open_rows[room].append(row)
            has_room[room] = True
    return rows


class PackedData:
    """Items (conversations, or preference pairs) packed whole into rows of seq_len tokens, from the
    files of `prepare.py sft|dpo`. Every item is one or more documents: positions restart at 0 and
    attention stays inside a document (`doc` ids), so the items of a row never see each other and
    padding is only the unfilled tail of a row. Targets are the next token where its mask is 1.

    The row plan (pack_rows) is fixed; each epoch visits the train rows in a seeded order and
    micro-batch `index` of `step` takes the next batch_size rows of that stream: every batch is a
    pure function of (seed, step, index). Validation rows are read in plan order."""

    kind = None

    def __init__(self, data_dir, seq_len: int, seed: int, micro_batches: int = 1):
        self.dir = Path(data_dir)
        self.micro_batches = micro_batches  # per optimizer step, over all processes: where each step starts
        self.meta = read_meta(self.dir, self.kind)
        if self.meta.get("kind") != self.kind:
            raise ValueError(f"{self.dir} holds {self.meta.get('kind')} data; --mode={self.kind} needs the output "
                             f"of `prepare.py {self.kind}`")
        self.seq_len, self.seed = seq_len, seed
        self.splits, self.stats, self._perms = {}, {}, {}
        for split in ("train", "val"):
            index = np.fromfile(self.dir / f"{split}.idx", dtype=np.int64)
            if self.n_records(index) == 0:
                raise ValueError(f"{self.dir}: no {split} records (prepare with --val-fraction > 0 for a val split)")
            tokens = np.memmap(self.dir / f"{split}.bin", dtype=np.uint16, mode="r")
            mask = np.memmap(self.dir / f"{split}.mask", dtype=np.uint8, mode="r")
            items, lengths, truncated = self.fit_items(index, mask)
            if not items:
                raise ValueError(f"{self.dir}: no {split} records fit rows of --seq-len {seq_len}")
            rows = pack_rows(lengths, seq_len)
            self.splits[split] = (tokens, mask, items, rows)
            self.stats[split] = {"items": len(items), "rows": len(rows), "truncated": truncated,
                                 "dropped": self.n_records(index) - len(items),
                                 "padding": 1 - sum(lengths) / (len(rows) * seq_len)}

    def describe(self) -> str:
        s = self.stats["train"]
        dropped = sum(self.stats[split]["dropped"] for split in ("train", "val"))
        return (f"{self.kind} data: {s['items']:,} train items packed into {s['rows']:,} rows of {self.seq_len} "
                f"({100 * s['padding']:.1f}% padding), {s['truncated']:,} of them cut to fit; "
                f"{self.stats['val']['items']:,} val items" +
                (f"\nwarning: {dropped:,} records dropped, too long for --seq-len {self.seq_len} to keep a token of "
                 "every reply: raise --seq-len" if dropped else ""))

    def epoch_tokens(self) -> int:
        """Row slots in one pass over the training rows (padding included: a row is a row)."""
        return len(self.splits["train"][3]) * self.seq_len

    def val_batches(self, batch_size: int, wanted: int) -> int:
        """Validation batches per evaluation: at most one pass over the validation rows (more would
        score the same rows again)."""
        return min(wanted, -(-len(self.splits["val"][3]) // batch_size))

    def n_records(self, index) -> int:
        raise NotImplementedError

    def fit_items(self, index, mask):
        """-> (items, their lengths in a row, number cut to fit); items are what `documents` reads."""
        raise NotImplementedError

    def documents(self, tokens, mask, item):
        """-> [(token ids, mask)] of one item, each a document of its own."""
        raise NotImplementedError

    def row_ids(self, split: str, step: int, index: int, batch_size: int) -> list:
        n_rows = len(self.splits[split][3])
        if split != "train":  # one pass: the last batch's spare rows stay padding, so no row counts twice
            return [r if r < n_rows else -1 for r in range(index * batch_size, (index + 1) * batch_size)]
        first = ((step - 1) * self.micro_batches + index) * batch_size  # position in the stream of rows
        out = []
        for g in range(first, first + batch_size):
            epoch, r = divmod(g, n_rows)
            if epoch not in self._perms:
                self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n_rows),
                               **{e: p for e, p in self._perms.items() if e == epoch - 1}}
            out.append(int(self._perms[epoch][r]))
        return out

    def batch(self, split: str, step: int, index: int, batch_size: int, device: str) -> dict:
        return self.rows_batch(split, self.row_ids(split, step, index, batch_size), device)

    def rows_batch(self, split: str, row_ids: list, device: str) -> dict:
        """The rows `row_ids` of `split` as a batch; "item" and "part" name each document (S,): the item
        it comes from and which of the item's documents it is (DPO: 0 chosen, 1 rejected)."""
        tokens, mask, items, rows = self.splits[split]
        B, T = len(row_ids), self.seq_len
        idx = np.full((B, T), self.meta["pad_id"], dtype=np.int64)
        targets = np.full((B, T), -1, dtype=np.int64)
        pos = np.zeros((B, T), dtype=np.int64)
        doc = np.zeros((B, T), dtype=np.int64)
        seq = np.full((B, T), -1, dtype=np.int64)  # which document of the micro-batch a target belongs to
        pos[:] = np.arange(T)  # a row left empty (the end of the validation pass) is padding
        n_seqs, item, part = 0, [], []
        for b, row in enumerate(row_ids):
            if row < 0:  # -1: no row left in this pass
                continue
            t, d = 0, 0
            for i in rows[row]:
                for j, (ids, m) in enumerate(self.documents(tokens, mask, items[i])):
                    item.append(i)
                    part.append(j)
                    n = len(ids)
                    idx[b, t:t + n] = ids
                    targets[b, t:t + n - 1] = np.where(m[1:] == 1, ids[1:], -1)  # last token: nothing to predict
                    pos[b, t:t + n] = np.arange(n)
                    doc[b, t:t + n] = d
                    seq[b, t:t + n - 1] = n_seqs
                    t, d, n_seqs = t + n, d + 1, n_seqs + 1
            pos[b, t:] = np.arange(T - t)  # padding tail: a document of its own, no targets
            doc[b, t:] = d
        out = {"idx": idx, "targets": targets, "pos": pos, "doc": doc, "seq": seq,
               "item": np.array(item, dtype=np.int64), "part": np.array(part, dtype=np.int64)}
        out = {k: torch.from_numpy(v) for k, v in out.items()}
        if device.startswith("cuda"):
            out = {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
        out["n_seqs"], out["split"] = n_seqs, split
        out["item_host"] = (np.array(item, dtype=np.int64), np.array(part, dtype=np.int64))  # host-side lookups
        return out


class SFTData(PackedData):
    """Conversations; one longer than seq_len keeps its first seq_len tokens (dropped if that
    leaves nothing to train on)."""

    kind = "sft"

    def n_records(self, offsets) -> int:
        return len(offsets) - 1

    def fit_items(self, offsets, mask):
        starts, lengths = offsets[:-1], np.diff(offsets)
        fitted = np.minimum(lengths, self.seq_len)
        over = np.flatnonzero(lengths > self.seq_len)
        # a cut conversation must keep a target: a mask-1 token after its first
        empty = {int(k) for k in over if not mask[starts[k] + 1:starts[k] + fitted[k]].any()}
        keep = [k for k in range(len(starts)) if k not in empty]
        return [(int(starts[k]), int(fitted[k])) for k in keep], [int(fitted[k]) for k in keep], len(over)

    def documents(self, tokens, mask, item):
        s, n = item
        return [(tokens[s:s + n].astype(np.int64), mask[s:s + n])]


class DPOData(PackedData):
    """Preference pairs: prompt + chosen and prompt + rejected, two documents in the same row. A
    pair longer than seq_len is cut by fit_pair (dropped only if a completion loses all its targets)."""

    kind = "dpo"

    @staticmethod
    def longest(data_dir) -> int:
        """Tokens of the longest pair of the training split as one row (2 prompt + chosen + rejected)."""
        index = np.fromfile(Path(data_dir) / "train.idx", dtype=np.int64).reshape(-1, 4)
        return int((2 * index[:, 1] + index[:, 2] + index[:, 3]).max()) if len(index) else 0

    def n_records(self, index) -> int:
        return len(index) // 4

    def fit_items(self, index, mask):
        items, lengths, truncated = [], [], 0
        for s, p, c, r in index.reshape(-1, 4).tolist():
            p2, c2, r2 = fit_pair(p, c, r, self.seq_len)
            if (p2, c2, r2) != (p, c, r):
                truncated += 1
                if c2 < 1 or r2 < 1 or not mask[s + p:s + p + c2].any() or not mask[s + p + c:s + p + c + r2].any():
                    continue
            items.append((s + p - p2, p2, c2, r2, c))  # a cut prompt keeps its end: it starts p - p2 later
            lengths.append(2 * p2 + c2 + r2)
        return items, lengths, truncated

    def documents(self, tokens, mask, item):
        s, p, c, r, full_c = item
        chosen = np.arange(s, s + p + c)
        rejected = np.concatenate([np.arange(s, s + p), np.arange(s + p + full_c, s + p + full_c + r)])
        return [(tokens[chosen].astype(np.int64), mask[chosen]), (tokens[rejected].astype(np.int64), mask[rejected])]


# -----------------------------------------------------------------------------
# prompts (grpo, ppo): records read whole, completions sampled at training time

class PromptData:
    """RLAIF records ({"conversations": [...]} ending with the user turn, or with an assistant turn that
    is dropped; optional "answer", "tools", ...: see rl/tasks.py) as prompt batches for --mode=grpo|ppo.

    `data_dir` is a directory written by `prepare.py rl-task` (train.jsonl, val.jsonl, meta.json) or one
    JSON Lines file, such as MiniMind's rlaif.jsonl, split by a rule: a record is held out for validation
    when is_val_key says so of its "key" (the problem, whatever its wording), else of its prompt text
    (about 1 in 10). The records are not tokenized here; the objective renders them with the policy's
    tokenizer.

    Micro-batch `index` of `step` takes the next batch_size prompts of a stream that visits the train
    prompts in a seeded order each epoch, `spares` other train prompts drawn at random (for dynamic
    sampling to fall back on), and a torch.Generator seeded from (seed, step, index) for its rollouts:
    like every batch, a pure function of (seed, step, index). Validation prompts are read in
    file order (wrapping around), their generator seeded the same at every evaluation."""

    kind = "prompts"

    def __init__(self, data_dir, seq_len: int, seed: int, micro_batches: int = 1, spares: int = 0):
        self.dir = Path(data_dir)
        self.seq_len, self.seed, self.micro_batches, self.spares = seq_len, seed, micro_batches, spares
        if self.dir.is_dir():
            self.meta = read_meta(self.dir, "rl-task")
            if self.meta.get("kind") != self.kind:
                raise ValueError(f"{self.dir} holds {self.meta.get('kind')} data; RL modes need prompts "
                                 "(`prepare.py rl-task`, or an RLAIF .jsonl file)")
            self.splits = {s: self.read([self.dir / f"{s}.jsonl"]) for s in SPLITS}
        elif self.dir.exists():
            self.meta = {"kind": self.kind, "source": str(self.dir)}
            records = self.read([self.dir])
            held_out = [is_val_key(r.get("key") or json.dumps(prompt_messages(r), ensure_ascii=False))
                        for r in records]
            self.splits = {"train": [r for r, v in zip(records, held_out) if not v],
                           "val": [r for r, v in zip(records, held_out) if v]}
        else:
            raise FileNotFoundError(f"{self.dir}: no prompts here (make them with `python prepare.py rl-task "
                                    f"--out {self.dir}`, or pass an RLAIF .jsonl file)")
        for split, records in self.splits.items():
            if not records:
                raise ValueError(f"{self.dir}: no {split} prompts")
        self._perm = (None, None)  # (epoch, order of the train prompts in it)

    @staticmethod
    def read(paths) -> list:
        records = []
        for path, line_no, obj in iter_jsonl(paths):
            try:
                prompt_messages(obj)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}:{line_no}: not an RLAIF record ({e or 'no conversations'})") from None
            records.append(obj)
        return records

    def describe(self) -> str:
        return (f"prompts: {len(self.splits['train']):,} train / {len(self.splits['val']):,} val from {self.dir}, "
                f"longest kept prompt {self.seq_len} tokens")

    def epoch_tokens(self) -> int:
        """One pass over the train prompts, counted as seq_len tokens a prompt (the step's unit)."""
        return len(self.splits["train"]) * self.seq_len

    def val_batches(self, batch_size: int, wanted: int) -> int:
        """Held-out batches per evaluation: at most one pass over the validation prompts."""
        return min(wanted, -(-len(self.splits["val"]) // batch_size))

    def batch(self, split: str, step: int, index: int, batch_size: int, device: str) -> dict:
        records = self.splits[split]
        n = len(records)
        if split == "train":
            first = ((step - 1) * self.micro_batches + index) * batch_size  # position in the stream of prompts
            ids = []
            for g in range(first, first + batch_size):
                epoch, i = divmod(g, n)
                if self._perm[0] != epoch:
                    self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
                ids.append(int(self._perm[1][i]))
        else:
            ids = [(index * batch_size + j) % n for j in range(batch_size)]
        seed = (self.seed + (split == "val")) * 1_000_003 + step
        seed = seed * 65_537 + index
        generator = torch.Generator(device=device).manual_seed(seed)  # on the device the rollout samples on
        spares = []
        if split == "train" and self.spares:
            order, taken = np.random.default_rng([self.seed, step, index, 1]).permutation(n), set(ids)
            spares = [records[i] for i in order if i not in taken][:self.spares]
        return {"records": [records[i] for i in ids], "spares": spares, "generator": generator, "seed": seed,
                "step": step, "index": index}


def check_tokenizer(meta: dict, data_dir, tok_dir) -> None:
    """Data must be tokenized by the tokenizer the checkpoint in tok_dir's parent was trained with (tok_dir
    None or without tokenizer.json, or data without a recorded hash: nothing to check); a ValueError
    naming both otherwise."""
    if tok_dir is None or not (Path(tok_dir) / "tokenizer.json").exists() or "tokenizer_hash" not in meta:
        return
    theirs = Tokenizer(tok_dir).hash()
    if theirs != meta["tokenizer_hash"]:
        raise ValueError(f"{data_dir} was tokenized by another tokenizer (hash {meta['tokenizer_hash']}) than the "
                         f"checkpoint {Path(tok_dir).parent} was trained with ({theirs}): prepare the data with "
                         f"--tokenizer {tok_dir}")
