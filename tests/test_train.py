"""train.py tests (pretraining): the loss falls, kill -9 + --resume is bit-identical, DDP with two
processes follows the single-process loss curve, log.jsonl and checkpoints are well formed.

    python -m pytest tests/test_train.py -q
"""
import json
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from checkpoint import load_checkpoint, resolve_checkpoint
from conftest import ONE_THREAD, ROOT, loss_curve, read_log, run, run_single_and_ddp

FAST = ["--model", "tiny", "--batch-size", "4", "--seq-len", "64", "--eval-iters", "2", "--log-interval", "1"]


def weights(out):
    return load_file(resolve_checkpoint(out) / "model.safetensors")


def test_pretraining_lowers_the_validation_loss(pretrain_dir, tmp_path):
    out = tmp_path / "run"
    run(["train.py", "--data", pretrain_dir, "--out", out, *FAST, "--max-iters", "60", "--eval-interval", "30",
         "--save-interval", "60"], env=ONE_THREAD)
    log = read_log(out)
    train = [r for r in log if "loss" in r]
    val = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 61))
    assert [r["step"] for r in val] == [30, 60]
    assert all({"lr", "tok_per_s", "mfu"} <= set(r) for r in train)
    assert train[0]["loss"] > 5.5  # ~ln(6400) at init
    assert val[-1]["val_loss"] < 3.0, val  # the generated corpus is very learnable
    assert (out / "loss.png").stat().st_size > 1000
    ckpt = resolve_checkpoint(out)
    state = json.loads((ckpt / "state.json").read_text())
    assert ckpt.name == "ckpt_000060" and state["step"] == 60 and state["kind"] == "pretrain"
    assert state["args"]["seq_len"] == 64 and (ckpt / "tokenizer" / "tokenizer.json").exists()
    model, _, _ = load_checkpoint(out)
    assert model.lm_head.weight is model.embed.weight


def test_kill9_then_resume_is_bit_identical(pretrain_dir, tmp_path):
    common = ["--data", pretrain_dir, *FAST, "--max-iters", "24", "--eval-interval", "12", "--save-interval", "4"]
    ref = tmp_path / "ref"
    run(["train.py", "--out", ref, *common], env=ONE_THREAD)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", "--out", str(out), *map(str, common)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill as soon as the first checkpoint is in place
        if (out / "latest").exists() and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads((resolve_checkpoint(out) / "state.json").read_text())["step"]
    assert killed_at < 24
    run(["train.py", "--out", out, "--resume"], env=ONE_THREAD)  # every other flag is inherited from the checkpoint

    assert loss_curve(out) == loss_curve(ref), "losses differ after resume"
    a, b = weights(out), weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"
    assert json.loads((resolve_checkpoint(out) / "state.json").read_text())["args"]["optimizer"] == "muon"
    r = subprocess.run([sys.executable, "train.py", "--out", str(out), "--resume", "--optimizer", "adamw"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "trained with muon" in r.stderr  # Muon's state cannot seed AdamW


def test_ddp_two_processes_match_one_process(pretrain_dir, tmp_path):
    # the same global batch (2 x 4 rows): one process accumulates 2 micro-batches, two processes 1 each
    common = ["--data", pretrain_dir, *FAST, "--max-iters", "8", "--eval-interval", "8", "--save-interval", "8",
              "--batch-tokens", str(2 * 4 * 64)]
    single, multi = run_single_and_ddp(tmp_path, common, ("loss", "val_loss"), rel=1e-4)
    wa, wb = weights(single), weights(multi)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_bad_token_budget_is_a_clear_error(pretrain_dir, tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--data", str(pretrain_dir), "--out", str(tmp_path / "x"), *FAST,
                        "--batch-tokens", "1000"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "--batch-tokens 1000" in r.stderr


def test_missing_data_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "nope" in r.stderr and "prepare.py" in r.stderr
