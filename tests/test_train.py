"""train.py tests (pretraining): the loss falls, kill -9 + --resume is bit-identical, DDP with two
processes follows the single-process loss curve, log.jsonl and checkpoints are well formed; in
process, the rules that default the flags and the learning-rate schedule.

    python -m pytest tests/test_train.py -q
"""
import json
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import losses
import train
from checkpoint import load_checkpoint, resolve_checkpoint
from guard import Faults, Guard
from minimind import MiniMind, ModelConfig
from runtime import Processes, grad_scaler
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


# -----------------------------------------------------------------------------
# in process: flag defaults and the schedule

def test_mode_defaults_fill_only_the_flags_left_unset():
    args = train.build_parser().parse_args(["--mode", "ppo", "--lr", "0.5", "--beta", "0"])
    values = train.mode_defaults(args, saved={}, given={"lr", "beta"})
    assert "lr" not in values and "beta" not in values  # given: kept
    assert values == {"ppo_epochs": 2, "ppo_minibatches": 2, "reward": "exact", "optimizer": "adamw",
                      "schedule": "cosine", "batch_size": train.RL_PROMPTS, "eval_iters": 20}
    dpo = train.build_parser().parse_args(["--mode", "dpo"])  # dpo: every held-out pair, unless told
    assert train.mode_defaults(dpo, saved={}, given=set())["eval_iters"] >= 10 ** 9
    args = train.build_parser().parse_args(["--mode", "grpo", "--tools", "--max-time", "5", "--batch-size", "3"])
    values = train.mode_defaults(args, saved={}, given={"tools", "max_time", "batch_size"})
    assert values["reward"] == "exact tool:0.5" and values["schedule"] == "wsd" and values["beta"] == 0.04
    assert values["ppo_epochs"] == 1 and "batch_size" not in values


def test_inherited_takes_the_start_checkpoints_shapes_but_not_a_given_flag():
    args = train.build_parser().parse_args(["--mode", "sft", "--seq-len", "64"])
    saved = {"mode": "pretrain", "model": "tiny-moe", "seq_len": 512, "batch_size": 8, "lr": 0.1, "seed": 7}
    assert train.inherited(args, saved, given={"mode", "seq_len"}) == {"model": "tiny-moe", "batch_size": 8, "seed": 7}
    dpo = train.build_parser().parse_args(["--mode", "dpo"])  # DPO rows hold pairs: sized from the data
    assert train.inherited(dpo, saved, given={"mode"}) == {"model": "tiny-moe", "seed": 7}


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_learning_rate_warms_up_then_decays_to_the_floor(schedule):
    args = SimpleNamespace(lr=1e-3, max_time=None, max_iters=100, min_lr_ratio=0.1, schedule=schedule, decay_frac=0.2)
    run_ = SimpleNamespace(args=args, warmup=10, clock=None)
    lrs = [train.learning_rate(run_, step) for step in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup over 10 steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then never up
    assert 1e-4 <= lrs[-1] < 2e-4  # the last step near min_lr_ratio x lr, never below it
    if schedule == "wsd":  # stable until the last 20%
        assert lrs[79] == pytest.approx(1e-3) and lrs[85] < 1e-3


class CountingObjective(losses.Objective):
    """LM loss, two updates a step; records what the loop asks of it."""
    updates = 2

    def __init__(self, stop_after_first: bool = False):
        self.prepared, self.calls, self.stop_after_first = [], [], stop_after_first

    def prepare(self, batch):
        self.prepared.append(batch["index"])
        return {**batch, "prepared": True}

    def stop(self, kl):
        return self.stop_after_first

    def __call__(self, model, batch):
        self.calls.append((batch["index"], batch["update"], batch["prepared"]))
        loss, _ = losses.lm_loss(model, batch)
        return loss, {"approx_kl": torch.tensor(0.0)}


@pytest.mark.parametrize("stop_after_first", [False, True])
def test_train_step_prepares_each_micro_batch_once_for_all_its_updates(stop_after_first):
    torch.manual_seed(0)
    model = MiniMind(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64))
    data = SimpleNamespace(batch=lambda split, step, index, rows, device: {
        "idx": torch.randint(0, 64, (rows, 8), generator=torch.Generator().manual_seed(index)),
        "targets": torch.randint(0, 64, (rows, 8), generator=torch.Generator().manual_seed(100 + index)),
        "index": index})
    objective = CountingObjective(stop_after_first)
    run_ = SimpleNamespace(args=SimpleNamespace(batch_size=2, grad_clip=1.0, skip_steps=""), procs=Processes(),
                           objective=objective, data=data, device="cpu", dtype=torch.float32, accum=2, model=model,
                           train_model=model, scaler=grad_scaler("cpu", torch.float32), clipped=list(model.parameters()),
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1), guard=Guard(), faults=Faults())
    before = model.embed.weight.clone()
    metrics = train.train_step(run_, step=1)
    assert objective.prepared == [0, 1]  # once per micro-batch, not once per update
    done = 1 if stop_after_first else 2
    assert objective.calls == [(i, u, True) for u in range(2) for i in range(2)]  # the second update still runs...
    assert metrics["updates"].item() == done  # ...but with a stop its gradients are dropped, not applied
    assert not torch.equal(model.embed.weight, before) and all(p.grad is None for p in model.parameters())
