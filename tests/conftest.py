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
# a fixed thread count for every test and the scripts they start (the count that torch would choose):
# runtime.CpuThreads would otherwise change it with the machine's load in the middle of a run, and runs
# that must agree to the last bit (resumed == uninterrupted) would not. tests/test_runtime.py unsets it.
if "OMP_NUM_THREADS" not in os.environ:
    import torch
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())

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
    # 36 added tokens (MiniMind-3's), 256 bytes, 141 merges
    run(["prepare.py", "tokenizer", "--input", corpus, "--vocab-size", "433", "--out", out, "--quiet"])
    return out


def prepare_data(kind, input_path, tokenizer_dir, out):
    """`prepare.py KIND` with a tenth held out for validation; returns the output directory."""
    run(["prepare.py", kind, "--input", input_path, "--tokenizer", tokenizer_dir, "--out", out,
         "--val-fraction", "0.1", "--workers", "2", "--quiet"])
    return out


@pytest.fixture(scope="session")
def pretrain_dir(corpus, tokenizer_dir, tmp_path_factory):
    return prepare_data("pretrain", corpus, tokenizer_dir, tmp_path_factory.mktemp("data") / "pretrain")


@pytest.fixture(scope="session")
def random_ckpt(tokenizer_dir, tmp_path_factory):
    """A tiny random-weight checkpoint (trained seq_len 256) for sampling and serving tests.

    At the usual init a random model with a tied embedding just repeats its last token, so its
    output would not depend on positions or masks. Here the attention and MLP weights are scaled
    up to outweigh the embedding (the output depends on the whole context) and the final norm is
    scaled so that the top logits are far apart (greedy decoding is stable to rounding)."""
    import torch
    from checkpoint import save_checkpoint
    from tokenizer import Tokenizer
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


# -----------------------------------------------------------------------------
# chat data (SFT, DPO) and a small base checkpoint to fine-tune

# tiny models train many times faster with one thread per process on a shared, busy CPU
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
ANSWERS = dict(zip(SUBJECTS[:5], OBJECTS[:5]))  # one right answer per subject: learnable in a few steps
SYSTEM = "你是一个乐于助人的助手。"


def qa(subject, obj=None):
    return [{"role": "user", "content": f"{subject}喜欢什么？"},
            {"role": "assistant", "content": f"{subject}喜欢{obj or ANSWERS[subject]}。"}]


def make_sft(path: Path, n: int = 300, seed: int = 0):
    """{"conversations"}: one or two question/answer turns, sometimes after a system prompt."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
            for _ in range(rng.choice([1, 1, 2])):
                msgs += qa(rng.choice(list(ANSWERS)))
            f.write(json.dumps({"conversations": msgs}, ensure_ascii=False) + "\n")
    return path


def make_dpo(path: Path, n: int = 200, seed: int = 0):
    """{"chosen", "rejected"}: the same question, the right answer against a wrong one."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            s = rng.choice(list(ANSWERS))
            wrong = rng.choice([o for o in OBJECTS if o != ANSWERS[s]])
            f.write(json.dumps({"chosen": qa(s), "rejected": qa(s, wrong)}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def sft_dir(tokenizer_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    return prepare_data("sft", make_sft(tmp / "sft.jsonl"), tokenizer_dir, tmp / "sft")


@pytest.fixture(scope="session")
def dpo_dir(tokenizer_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    return prepare_data("dpo", make_dpo(tmp / "dpo.jsonl"), tokenizer_dir, tmp / "dpo")


@pytest.fixture(scope="session")
def base_ckpt(tokenizer_dir, tmp_path_factory):
    """A small random-weight "pretrain" checkpoint (dim 64, 2 layers) trained, say, at seq_len 128."""
    import torch
    from checkpoint import save_checkpoint
    from tokenizer import Tokenizer
    from minimind import MiniMind, ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=Tokenizer(tokenizer_dir).vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=192)
    out = tmp_path_factory.mktemp("ckpt") / "base"
    save_checkpoint(out, 0, MiniMind(cfg), state={"kind": "pretrain", "args": {"seq_len": 128, "batch_size": 8}},
                    tokenizer_dir=tokenizer_dir)
    return out


SFT_FLAGS = ["--mode", "sft", "--max-iters", "60", "--lr", "3e-3", "--eval-interval", "30", "--eval-iters", "2",
             "--save-interval", "60", "--log-interval", "1"]


@pytest.fixture(scope="session")
def sft_ckpt(sft_dir, base_ckpt, tmp_path_factory):
    """SFT of base_ckpt on the generated conversations (seq_len and batch size inherited)."""
    out = tmp_path_factory.mktemp("runs") / "sft"
    run(["train.py", "--init-from", base_ckpt, "--data", sft_dir, "--out", out, *SFT_FLAGS], env=ONE_THREAD)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models decode fastest on one thread (and a busy machine punishes more)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def loaded(random_ckpt):
    """(model, tokenizer) of the random_ckpt checkpoint, as sample.py loads it."""
    from checkpoint import load_for_inference as load
    model, tok, _, _ = load(random_ckpt, "cpu")
    return model, tok


def read_log(out):
    """OUT/log.jsonl as a list of dicts."""
    return [json.loads(l) for l in (Path(out) / "log.jsonl").read_text().splitlines()]


def loss_curve(out):
    """(step, loss, val_loss) of every line of OUT/log.jsonl: what a resumed run must reproduce."""
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_log(out)]


def run_single_and_ddp(tmp_path, common, keys, rel):
    """train.py in one process and under torchrun with two (the same global batch): every logged
    `keys` value agrees within `rel`. Returns the two run directories."""
    single, multi = tmp_path / "single", tmp_path / "ddp"
    run(["train.py", "--out", single, *common], env=ONE_THREAD)
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--out", multi, *common],
        env=ONE_THREAD, timeout=600)
    a, b = read_log(single), read_log(multi)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-4), (key, ra, rb)
    return single, multi
