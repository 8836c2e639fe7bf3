"""Training at scale and unattended: bad steps skipped and bad stretches undone (guard.py), under DDP
too; activation checkpointing; two torchrun "nodes" on the loopback; experiment trackers.

Faults are injected through MINIMIND_FAULTS (guard.py): the real code path, a loss made NaN or a
gradient made inf on purpose. The reference of each is a clean run told to skip the same batches
(--skip-steps): the two must agree bit for bit.

    python -m pytest tests/test_scale.py -q
"""
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoint import load_checkpoint, resolve_checkpoint
from conftest import ONE_THREAD, ROOT, read_log, run
from guard import Guard, parse_faults, parse_steps
from minimind import MiniMind, ModelConfig

FAST = ["--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--eval-iters", "1", "--log-interval", "1"]


def weights(out):
    return load_file(resolve_checkpoint(out) / "model.safetensors")


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def losses(out):
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


def train(out, *args, faults=None, check=True, torchrun=False):
    env = {**ONE_THREAD, **({"MINIMIND_FAULTS": faults} if faults else {})}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    cmd = [sys.executable, *launch, "train.py", "--out", str(out), *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


# -----------------------------------------------------------------------------
# the guard, in process

def test_step_lists_and_fault_specs_parse():
    assert parse_steps("3, 7-9") == {3, 7, 8, 9}
    for bad in ("0", "9-7", "x", "3-"):
        with pytest.raises(ValueError):
            parse_steps(bad)
    assert parse_faults("loss@3,grad@5:1") == {("loss", 3): None, ("grad", 5): 1}
    with pytest.raises(ValueError, match="KIND@STEP"):
        parse_faults("nan@3")


def test_guard_skips_then_reloads_and_catches_spikes():
    g = Guard(max_bad_steps=3, spike_factor=3.0)
    assert [g.verdict(float("nan"), False) for _ in range(3)] == ["skip", "skip", "reload"]
    g.reloaded()
    assert g.verdict(2.0, True) == "ok" and g.bad_in_row == 0 and g.bad_total == 3
    for _ in range(12):
        assert g.verdict(2.0, True) == "ok"
    assert g.verdict(5.9, True) == "ok"  # under 3 x the running mean
    assert g.verdict(8.0, True) == "reload" and "spike" in g.reason  # the mean is now 2.39
    assert Guard(spike_factor=0.0, good=50, mean=1.0).verdict(100.0, True) == "ok"  # off


# -----------------------------------------------------------------------------
# the guard in train.py

def test_bad_batches_are_skipped_exactly_like_skipped_batches(pretrain_dir, tmp_path):
    """A NaN loss at step 3 and an inf gradient at step 5: the run equals one that skipped both."""
    common = ["--data", pretrain_dir, *FAST, "--max-iters", "7", "--eval-interval", "7", "--save-interval", "7"]
    bad = tmp_path / "bad"
    r = train(bad, *common, faults="loss@3,grad@5")
    clean = tmp_path / "clean"
    train(clean, *common, "--skip-steps", "3,5")
    assert "skipped: non-finite loss or gradient norm (1 bad so far)" in r.stdout
    skipped = [(x["step"], x.get("bad_steps")) for x in read_log(bad) if "skipped" in x]
    assert skipped == [(3, 1), (5, 2)]
    assert sorted(losses(bad)) == [1, 2, 4, 6, 7] and losses(bad) == losses(clean)
    assert same_weights(bad, clean)


def test_ddp_ranks_agree_to_skip_a_step_only_one_saw_go_bad(pretrain_dir, tmp_path):
    """Under torchrun the inf gradient is on rank 1 only, the NaN loss on rank 0 only: both ranks skip
    (else rank 0 would apply step 3, and its saved weights would differ from the reference's)."""
    common = ["--data", pretrain_dir, *FAST, "--max-iters", "5", "--eval-interval", "5", "--save-interval", "5",
              "--batch-tokens", str(2 * 2 * 32)]
    ddp = tmp_path / "ddp"
    train(ddp, *common, faults="grad@3:1,loss@4:0", torchrun=True)
    single = tmp_path / "single"
    train(single, *common, "--skip-steps", "3-4")
    assert [x["step"] for x in read_log(ddp) if "skipped" in x] == [3, 4]
    assert losses(ddp).keys() == losses(single).keys() == {1, 2, 5}
    assert all(losses(ddp)[k] == pytest.approx(v, rel=1e-4) for k, v in losses(single).items())
    wa, wb = weights(ddp), weights(single)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_bad_stretches_and_spikes_go_back_to_the_last_checkpoint(pretrain_dir, tmp_path):
    """Two bad steps in a row (6, 7) go back to ckpt_000004, dropping step 5's update; a loss spike at
    14 goes back to ckpt_000012, dropping 13's: the run equals one that skipped 5-7 and 13-14."""
    common = ["--data", pretrain_dir, *FAST, "--max-iters", "16", "--eval-interval", "16", "--save-interval", "4"]
    bad = tmp_path / "bad"
    r = train(bad, *common, "--max-bad-steps", "2", faults="loss@6,grad@7,spike@14")
    clean = tmp_path / "clean"
    train(clean, *common, "--skip-steps", "5-7,13-14")
    reloads = [(x["step"], x["reloaded"]) for x in read_log(bad) if "reloaded" in x]
    assert reloads == [(7, "ckpt_000004"), (14, "ckpt_000012")]
    assert "reloaded ckpt_000004, going on at step 8 (the batches of steps 5-7 are not used again)" in r.stdout
    assert "loss spike" in r.stdout
    assert same_weights(bad, clean)
    assert all(losses(bad)[s] == losses(clean)[s] for s in losses(clean))  # 5 and 13: trained, then undone


def test_a_run_that_keeps_going_bad_ends_with_one_line(pretrain_dir, tmp_path):
    common = ["--data", pretrain_dir, *FAST, "--max-iters", "12", "--save-interval", "2", "--max-bad-steps", "1"]
    r = train(tmp_path / "a", *common, faults=",".join(f"loss@{s}" for s in range(3, 13)), check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "giving up" in r.stderr.strip().splitlines()[-1]
    assert r.stdout.count("reloaded ckpt_") == 3  # the saves between hold no progress: they do not count
    r = train(tmp_path / "b", *common, faults="loss@1", check=False)
    assert r.returncode != 0 and "no checkpoint to go back to yet" in r.stderr.strip().splitlines()[-1]
    r = train(tmp_path / "c", *common, faults="nan@1", check=False)
    assert r.returncode != 0 and "MINIMIND_FAULTS 'nan@1'" in r.stderr.strip().splitlines()[-1]


# -----------------------------------------------------------------------------
# activation checkpointing

@pytest.mark.parametrize("moe", [False, True])
def test_grad_checkpoint_gives_the_same_gradients(moe):
    """Recomputing each block in backward changes nothing but memory: loss and every gradient (the
    MoE balance loss's included) are the same, and packed rows (a document mask) go through too."""
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, qk_norm=True,
                      **({"n_experts": 4, "top_k": 2, "aux_loss_coef": 0.1} if moe else {}))
    torch.manual_seed(0)
    model = MiniMind(cfg).train()
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    doc = torch.tensor([[0] * 7 + [1] * 9, [0] * 16])
    grads = []
    for recompute in (False, True):
        model.grad_checkpoint = recompute
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, targets, doc=doc)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = grads
    assert torch.equal(la, lb) and ga.keys() == gb.keys()
    assert all(torch.allclose(ga[n], gb[n], rtol=1e-5, atol=1e-7) for n in ga), \
        max((ga[n] - gb[n]).abs().max().item() for n in ga)
    model.eval()  # inference never recomputes (no backward), with or without the flag
    with torch.no_grad():
        assert torch.equal(model(idx)[0], (model.__setattr__("grad_checkpoint", False), model(idx)[0])[1])


def test_bench_memory_measures_less_with_grad_checkpoint_and_with_fsdp():
    """bench.py's memory section on tiny: the recomputing step holds less at its peak (malloc's bytes),
    and so does each of 2 torchrun processes under FSDP2 against DDP: half the model state, exactly."""
    import bench
    out = {}
    bench.bench_memory("cpu", out, "tiny", seq_len=128, steps=1)
    r, f = out["memory"], out["memory"]["fsdp_vs_ddp"]
    assert r["plain"]["peak_mib"] > 0 and r["memory_ratio"] < 0.8 and r["time_ratio"] > 0, r
    assert f["processes"] == 2 and f["device"] == "cpu" and f["state_ratio"] == 0.5, f
    # each peak holds the model state, and FSDP's is the smaller
    assert f["ddp_peak_mib"] > f["ddp_state_mib"] and f["fsdp_peak_mib"] > f["fsdp_state_mib"] and f["ratio"] < 0.9, f


def test_train_with_grad_checkpoint_follows_the_same_curve(pretrain_dir, tmp_path):
    common = ["--data", pretrain_dir, *FAST, "--max-iters", "4", "--eval-interval", "4", "--save-interval", "4"]
    train(tmp_path / "plain", *common)
    train(tmp_path / "recompute", *common, "--grad-checkpoint")
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "recompute")
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(v, rel=1e-5) for k, v in a.items())


# -----------------------------------------------------------------------------
# two torchrun "nodes" on the loopback, as users launch them on two machines

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(out, args, logs):
    """Two torchrun launches of 2 processes each, meeting at a c10d rendezvous: 4 processes, 2 "nodes"."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=scale-test", "train.py", "--out", str(out),
           *map(str, args)]
    return [subprocess.Popen(cmd, cwd=ROOT, env=ONE_THREAD, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                             start_new_session=True) for log in logs]


def kill_node(pid: int):
    """SIGKILL a torchrun launch and every process under it: torch starts each worker in a session of
    its own, so killing the launcher's process group leaves the workers training."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))  # ppid -> pids
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def wait_nodes(nodes, logs):
    for node, log in zip(nodes, logs):
        assert node.wait(timeout=600) == 0, open(log).read()[-3000:]


def test_two_nodes_match_one_process_and_a_killed_node_resumes_exactly(pretrain_dir, tmp_path):
    """2 nodes x 2 processes x 1 micro-batch = 1 process x 4 micro-batches; then a node is killed
    (SIGKILL to its torchrun and workers) after the first checkpoint, and both nodes --resume: the
    curve and weights are those of the uninterrupted two-node run."""
    # 16 steps, a checkpoint every 2: the kill lands long before the end even when the test is slow to
    # see the first checkpoint (a busy machine; 6 steps were sometimes all done by then)
    common = ["--data", pretrain_dir, *FAST, "--max-iters", "16", "--eval-interval", "16", "--save-interval", "2",
              "--batch-tokens", str(4 * 2 * 32)]
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    train(single, *common)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    wait_nodes(launch_nodes(nodes, common, logs), logs)
    a, b = losses(single), losses(nodes)
    assert a.keys() == b.keys() == set(range(1, 17))
    assert all(b[k] == pytest.approx(v, rel=1e-4) for k, v in a.items())

    killed = tmp_path / "killed"
    running = launch_nodes(killed, common, logs)
    deadline = time.time() + 300
    while not (killed / "latest").exists() and time.time() < deadline and running[1].poll() is None:
        time.sleep(0.05)
    kill_node(running[1].pid)  # node b: its launcher and both workers
    try:
        running[0].wait(timeout=120)  # node a's workers lose their peers and end
    except subprocess.TimeoutExpired:
        kill_node(running[0].pid)
        running[0].wait()
    assert running[0].returncode != 0, "the run finished before a node could be killed"
    step = json.loads((resolve_checkpoint(killed) / "state.json").read_text())["step"]
    assert step < 16
    wait_nodes(launch_nodes(killed, ["--resume"], logs), logs)
    # the same up to float summation order: DDP regroups its gradient buckets after the first step of each
    # launch (in the order gradients become ready), and gloo's ring sums each element in an order that
    # depends on where it lies in its bucket; ~1 ulp of the weights (one process: bit for bit)
    assert losses(killed).keys() == b.keys() and all(losses(killed)[k] == pytest.approx(v, rel=1e-6) for k, v in b.items())
    wa, wb = weights(killed), weights(nodes)
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)


# -----------------------------------------------------------------------------
# experiment trackers (their packages are in the test extra only)

def test_tensorboard_and_wandb_offline_get_what_log_jsonl_gets(pretrain_dir, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = subprocess.run([sys.executable, "train.py", "--out", str(out), "--data", str(pretrain_dir), *FAST,
                        "--max-iters", "4", "--eval-interval", "2", "--log-to", "tensorboard,wandb"],
                       cwd=ROOT, capture_output=True, text=True, env={**ONE_THREAD, **env}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    log = read_log(out)
    for key in ("loss", "lr", "tok_per_s", "val_loss", "val_bpb"):
        assert [(e.step, pytest.approx(e.value, rel=1e-5)) for e in events.Scalars(key)] == \
            [(x["step"], x[key]) for x in log if key in x], key
    assert [e.step for e in events.Images("loss_plot")] == [2, 4]
    assert '"seq_len": 32' in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (out / "wandb" / "run-id").read_text().strip() in runs[0].name
    history, config = wandb_records(next(runs[0].glob("run-*.wandb")))
    for key in ("loss", "lr", "tok_per_s", "val_loss"):
        assert [(step, pytest.approx(h[key], rel=1e-6)) for step, h in history if key in h] == \
            [(x["step"], x[key]) for x in log if key in x], key
    assert [step for step, h in history if h.get("loss_plot/_type") == "image-file"] == [2, 4]
    assert {"seq_len", "lr", "mode"} <= config


def wandb_records(path):
    """(history [(step, {key: value})], config keys) of a wandb offline run file: LevelDB-style log
    blocks of 32 KiB, each chunk a 7-byte header (checksum, length, type: 1 whole, 2-4 first/middle/last),
    after the file's own 7-byte header; each record a protobuf Record."""
    from wandb.proto import wandb_internal_pb2
    raw, pos, buf, history, config = path.read_bytes(), 7, b"", [], set()
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # the rest of a block: padding
            pos += left
            continue
        buf, pos = buf + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                history.append((record.history.step.num, items))
            elif record.WhichOneof("record_type") == "run":
                config |= {i.key for i in record.run.config.update}
    return history, config


def test_swanlab_offline_gets_the_config_and_metrics(pretrain_dir, tmp_path):
    """swanlab has no reader of its offline run file: its config.yaml is read, the metric names are
    looked for in the run file (protobuf records)."""
    pytest.importorskip("swanlab")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--out", str(out), "--data", str(pretrain_dir), *FAST,
                        "--max-iters", "2", "--eval-interval", "2", "--log-to", "swanlab"],
                       cwd=ROOT, capture_output=True, text=True, env={**ONE_THREAD, "SWANLAB_MODE": "offline"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((out / "swanlog").glob("run-*"))
    assert len(runs) == 1 and "seq_len" in (runs[0] / "files" / "config.yaml").read_text()
    raw = next(runs[0].glob("run-*.swanlab")).read_bytes()
    assert all(key in raw for key in (b"loss", b"val_loss", b"tok_per_s", b"loss_plot"))


def test_a_tracker_not_installed_or_unknown_is_one_line(pretrain_dir, tmp_path):
    hide = tmp_path / "hide"  # a wandb that cannot be imported, ahead of the real one
    (hide / "wandb").mkdir(parents=True)
    (hide / "wandb" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    common = ["train.py", "--out", str(tmp_path / "run"), "--data", str(pretrain_dir), *FAST, "--max-iters", "1"]
    r = subprocess.run([sys.executable, *common, "--log-to", "wandb"], cwd=ROOT, capture_output=True, text=True,
                       env={**ONE_THREAD, "PYTHONPATH": str(hide)})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "the wandb package is not installed (pip install wandb" in r.stderr.strip().splitlines()[-1]
    r = subprocess.run([sys.executable, *common, "--log-to", "mlflow"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "unknown tracker(s) mlflow" in r.stderr


# -----------------------------------------------------------------------------
# FSDP2 (fully_shard) on CPU with gloo

def test_fsdp_follows_one_process_and_its_sharded_checkpoints_resume_at_4_2_1(pretrain_dir, tmp_path):
    """The same global batch (4 micro-batches of 2 x 32) and a constant lr: FSDP over 4 processes for
    2 steps, resumed by 2 for 2 more, then by one plain process (no torchrun) for the last 2, follows
    the single-process run; the checkpoints hold the full weights (sample, export read them) and the
    optimizer state in one shard per process, resharded by each resume."""
    common = ["--data", pretrain_dir, *FAST, "--optimizer", "adamw", "--warmup-iters", "0", "--min-lr-ratio", "1",
              "--batch-tokens", str(4 * 2 * 32), "--eval-interval", "2", "--save-interval", "2"]
    single, out = tmp_path / "single", tmp_path / "fsdp"
    train(single, *common, "--max-iters", "6")
    torchrun = ["-m", "torch.distributed.run", "--standalone"]
    run([*torchrun, "--nproc_per_node=4", "train.py", "--out", out, *common, "--max-iters", "2", "--fsdp"],
        env=ONE_THREAD, timeout=600)
    shards = sorted(p.name for p in (out / "ckpt_000002" / "optim").iterdir())
    assert shards == [".metadata"] + [f"__{r}_0.distcp" for r in range(4)]
    run([*torchrun, "--nproc_per_node=2", "train.py", "--out", out, "--resume", "--max-iters", "4"],
        env=ONE_THREAD, timeout=600)
    assert len(list((out / "ckpt_000004" / "optim").glob("*.distcp"))) == 2
    train(out, "--resume", "--max-iters", "6")
    a, b = losses(single), losses(out)
    assert a.keys() == b.keys() == set(range(1, 7))
    assert all(b[k] == pytest.approx(v, rel=1e-4) for k, v in a.items()), (a, b)
    # AdamW turns the float noise of near-zero gradients into updates of up to ~1e-4 here; an optimizer
    # state lost or put on the wrong shard moves weights by ~lr (6e-3) every step
    wa, wb = weights(single), weights(out)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 5e-4
    model, state, _ = load_checkpoint(out / "ckpt_000004")  # an FSDP checkpoint loads as any other
    assert state["args"]["fsdp"] and torch.equal(model.embed.weight, load_file(out / "ckpt_000004" / "model.safetensors")["embed.weight"])


def test_fsdp_skips_bad_steps_and_goes_back_like_ddp(pretrain_dir, tmp_path):
    """Under FSDP a NaN loss at step 4 is skipped and an inf gradient in rank 1's shard at step 5 makes
    two in a row: back to ckpt_000004 (sharded weights and optimizer state reloaded in place), as if
    steps 4-5 were skipped."""
    common = ["--data", pretrain_dir, *FAST, "--optimizer", "adamw", "--batch-tokens", str(2 * 2 * 32),
              "--max-iters", "6", "--eval-interval", "6", "--save-interval", "2"]
    out, clean = tmp_path / "fsdp", tmp_path / "clean"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", "--out", str(out), *map(str, common), "--fsdp", "--max-bad-steps", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**ONE_THREAD, "MINIMIND_FAULTS": "loss@4,grad@5:1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reloaded ckpt_000004, going on at step 6 (the batches of step 5 are not used again)" in r.stdout
    train(clean, *common, "--skip-steps", "4-5")
    a, b = losses(clean), losses(out)
    assert a.keys() == b.keys() == {1, 2, 3, 6} and all(b[k] == pytest.approx(v, rel=1e-4) for k, v in a.items())
    wa, wb = weights(clean), weights(out)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 5e-4


def test_fsdp_refuses_what_it_does_not_shard(pretrain_dir, tmp_path):
    r = train(tmp_path / "x", "--data", pretrain_dir, *FAST, "--fsdp", "--optimizer", "muon", check=False)
    assert r.returncode != 0 and "--fsdp trains every weight with AdamW" in r.stderr.strip().splitlines()[-1]
