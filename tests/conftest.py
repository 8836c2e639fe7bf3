"""Shared fixtures: a small generated corpus, a tokenizer trained on it, prepared pretraining data.

Nothing here reads ../shared or the network: a fresh clone runs the tests as they are."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SUBJECTS = ["小明", "老师", "我们", "这只猫", "科学家", "The cat", "A student", "My friend"]
VERBS = ["喜欢", "看见", "研究", "写了", "likes", "reads", "found"]
OBJECTS = ["一本书", "大海", "数学", "一封信", "春天的花", "the book", "a letter", "the sea"]


def make_corpus(path: Path, n_docs: int = 600, seed: int = 0):
    """JSON Lines of {"text"}: short documents of templated sentences (learnable structure)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            sents = []
            for _ in range(rng.randint(2, 6)):
                s, v, o = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
                sents.append(f"{s}{v}{o}。" if not s[0].isascii() else f"{s} {v} {o}. ")
            f.write(json.dumps({"text": "".join(sents)}, ensure_ascii=False) + "\n")
    return path


def run(args, **kw):
    """Run a project script with this Python; fail with its output when it fails."""
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    run(["prepare.py", "tokenizer", "--input", corpus, "--vocab-size", "400", "--out", out, "--quiet"])
    return out


@pytest.fixture(scope="session")
def pretrain_dir(corpus, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "pretrain"
    run(["prepare.py", "pretrain", "--input", corpus, "--tokenizer", tokenizer_dir, "--out", out,
         "--val-fraction", "0.1", "--workers", "2", "--quiet"])
    return out
