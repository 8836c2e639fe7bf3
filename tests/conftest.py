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


@pytest.fixture(scope="session")
def random_ckpt(tokenizer_dir, tmp_path_factory):
    """A tiny random-weight checkpoint (trained seq_len 256) for sampling and serving tests.

    At the usual init a random model with a tied embedding just repeats its last token, so its
    output would not depend on positions or masks. Here the attention and MLP weights are scaled
    up to outweigh the embedding (the output depends on the whole context) and the final norm is
    scaled so that the top logits are far apart (greedy decoding is stable to rounding)."""
    import torch
    from common import Tokenizer, save_checkpoint
    from minimind import MiniMind, ModelConfig
    tok = Tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    model = MiniMind(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "norm.weight":
                p.mul_(100)
            elif not name.endswith("norm.weight") and name != "embed.weight":
                p.mul_(8)
    out = tmp_path_factory.mktemp("ckpt") / "random"
    save_checkpoint(out, 0, model, state={"kind": "pretrain", "args": {"seq_len": 256}}, tokenizer_dir=tokenizer_dir)
    return out
