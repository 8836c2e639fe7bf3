"""Reliability of training runs and checkpoints: nothing lost, every failure one clear line.

An existing run is never overwritten by accident; a corrupted checkpoint is named and --resume falls
back to an intact one; a save killed or stopped by a full disk leaves nothing half-written; data of
another tokenizer is refused; DDP ends when --eval-iters < processes; stages chain by default.

    python -m pytest tests/test_reliability.py -q
"""
import errno
import json
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import checkpoint
import runtime
from checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from conftest import ONE_THREAD, ROOT, loss_curve, prepare_data, read_log, run
from minimind import MiniMind, ModelConfig

FAST = ["--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--eval-iters", "1", "--log-interval", "1"]


def train(*args, cwd=ROOT, check=True):
    """train.py as a user runs it; returns the finished process (stdout, stderr, returncode)."""
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, env=ONE_THREAD, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py {args} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def one_line_error(r):
    """A user mistake: non-zero exit, no traceback, the message on the last line of stderr."""
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def small_cfg():
    return ModelConfig(vocab_size=400, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)


def test_a_new_run_never_replaces_an_existing_one(pretrain_dir, tmp_path):
    out = tmp_path / "run"
    train("--data", pretrain_dir, "--out", out, *FAST, "--max-iters", "2")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = one_line_error(train("--data", pretrain_dir, "--out", out, *FAST, "--max-iters", "2", check=False))
    assert "--resume" in line and "--force" in line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    train("--data", pretrain_dir, "--out", out, *FAST, "--max-iters", "3", "--save-interval", "3", "--force")
    assert (out / "notes.txt").read_text() == "mine"  # --force deletes only what train.py wrote
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_000003"]
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3]


def test_evaluation_with_fewer_batches_than_processes_ends(pretrain_dir, tmp_path):
    """Two processes, --eval-iters 1: rank 1 has no validation batch and still all-reduces (no hang)."""
    out = tmp_path / "ddp"
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--data", pretrain_dir,
         "--out", out, *FAST, "--max-iters", "2", "--eval-interval", "2"], env=ONE_THREAD, timeout=300)
    assert resolve_checkpoint(out).name == "ckpt_000002"
    assert [r["val_loss"] for r in read_log(out) if "val_loss" in r]


def test_corrupted_checkpoint_is_named_and_resume_falls_back(pretrain_dir, tmp_path):
    out = tmp_path / "run"
    train("--data", pretrain_dir, "--out", out, *FAST, "--max-iters", "4", "--save-interval", "2")
    weights = out / "ckpt_000004" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4096:] = bytes(b ^ 0xFF for b in raw[-4096:])  # 4 KB of flipped weight bytes
    weights.write_bytes(raw)
    with pytest.raises(CheckpointError, match="ckpt_000004/model.safetensors"):
        load_checkpoint(out)
    r = train("--data", pretrain_dir, "--out", out, "--resume", "--max-iters", "6")
    assert "ckpt_000002" in r.stderr and "newest intact" in r.stderr
    steps = [r["step"] for r in read_log(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6][:2] + [3, 4, 5, 6]  # the log was cut back to step 2 and continued
    assert resolve_checkpoint(out).name == "ckpt_000006"


def test_latest_pointing_nowhere_and_killed_first_save(pretrain_dir, tmp_path):
    out = tmp_path / "run"
    train("--data", pretrain_dir, "--out", out, *FAST, "--max-iters", "2", "--save-interval", "1")
    (out / "latest").write_text("ckpt_000009\n")  # e.g. the directory was deleted by hand
    assert resolve_checkpoint(out, fallback=True).name == "ckpt_000002"
    train("--data", pretrain_dir, "--out", out, "--resume", "--max-iters", "3")
    # a run killed during its first save: only a temporary directory and a log
    fresh = tmp_path / "fresh"
    (fresh / ".ckpt_000002.abc").mkdir(parents=True)
    (fresh / "log.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    line = one_line_error(train("--data", pretrain_dir, "--out", fresh, "--resume", check=False))
    assert "without --resume" in line
    train("--data", pretrain_dir, "--out", fresh, *FAST, "--max-iters", "1", "--force")
    assert not list(fresh.glob(".ckpt_*"))  # stale temporaries cleaned at start


def test_disk_full_during_a_save_is_one_line_and_leaves_nothing(tmp_path, small_cfg, monkeypatch):
    model = MiniMind(small_cfg)
    save_checkpoint(tmp_path, 1, model, {"kind": "pretrain"})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_model", full)
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, {"kind": "pretrain"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000001", "latest"]
    assert resolve_checkpoint(tmp_path).name == "ckpt_000001"


def rehash(ckpt, **fields):
    """Rewrite state.json with `fields` and hashes that vouch for the files as they are now (what
    someone who edits a checkpoint on purpose would do)."""
    state = json.loads((ckpt / "state.json").read_text())
    state["files"] = {f: checkpoint.file_hash(ckpt / f) for f in checkpoint.hashed_files(ckpt)}
    (ckpt / "state.json").write_text(json.dumps({**state, **fields}))


def test_broken_checkpoints_are_one_line(tmp_path, small_cfg):
    model = MiniMind(small_cfg)
    ckpt = save_checkpoint(tmp_path / "a", 1, model, {"kind": "pretrain"})
    # a truncated file that state.json vouches for
    raw = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    rehash(ckpt)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt)
    # config.json with wrong types; weights of another model
    ckpt = save_checkpoint(tmp_path / "b", 1, model, {"kind": "pretrain"})
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "n_heads": "two"}))
    rehash(ckpt)
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "dim": 64, "ffn_dim": 128}))
    rehash(ckpt)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot be loaded"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("edit, message", [
    ({"step": -100}, '"step" must be a whole number >= 0, not -100'),
    ({"step": "x"}, '"step" must be a whole number >= 0'),
    ({"step": 7}, '"step" 7 is not the step of its directory ckpt_000002'),
    ({"files": None}, 'no "files"'),
    ({"args": []}, '"args" must be a JSON object'),
    ({"lora": {"rank": 0}}, '"lora" needs rank'),
    ({"files": {"/proc/kcore": "0" * 64}}, "'/proc/kcore' is not a file of a checkpoint"),  # never read
])
def test_an_edited_state_json_is_refused_and_resume_falls_back(tmp_path, small_cfg, edit, message):
    """state.json is checked before anything uses it: hashes required, step a whole number of its
    directory; --resume (fallback) takes the newest intact checkpoint instead."""
    model = MiniMind(small_cfg)
    save_checkpoint(tmp_path, 1, model, {"kind": "pretrain"})
    ckpt = save_checkpoint(tmp_path, 2, model, {"kind": "pretrain"})
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, **edit}))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        resolve_checkpoint(tmp_path)  # what --init-from and train.py's own reading of state.json go through
    assert resolve_checkpoint(tmp_path, fallback=True).name == "ckpt_000001"


def test_unlisted_or_edited_tokenizer_files_are_refused(tmp_path, small_cfg, tokenizer_dir):
    model = MiniMind(small_cfg)
    ckpt = save_checkpoint(tmp_path / "a", 1, model, {"kind": "sft"}, tokenizer_dir=tokenizer_dir)
    listed = json.loads((ckpt / "state.json").read_text())["files"]
    assert {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"} <= listed.keys()
    config = ckpt / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("<|im_end|>", "<|im_stop|>"))  # sample.py would stop elsewhere
    with pytest.raises(CheckpointError, match="tokenizer/tokenizer_config.json: content does not match"):
        load_checkpoint(ckpt)
    ckpt = save_checkpoint(tmp_path / "b", 1, model, {"kind": "sft"}, tokenizer_dir=tokenizer_dir)
    (ckpt / "tokenizer" / "added_tokens.json").write_text("{}")
    with pytest.raises(CheckpointError, match="added_tokens.json: not listed"):
        load_checkpoint(ckpt)


def test_a_checkpoint_saved_before_tokenizer_hashes_loads_and_says_so(tmp_path, small_cfg, tokenizer_dir, capsys):
    """Earlier minimind hashed the weights, config and optimizer only: such a checkpoint still loads (its
    weights verified), saying once that its tokenizer is not; a flipped weight byte is still refused."""
    model = MiniMind(small_cfg)
    ckpt = save_checkpoint(tmp_path / "old", 1, model, {"kind": "sft"}, tokenizer_dir=tokenizer_dir)
    state = json.loads((ckpt / "state.json").read_text())
    state["files"] = {k: v for k, v in state["files"].items() if not k.startswith("tokenizer/")}
    (ckpt / "state.json").write_text(json.dumps(state))
    load_checkpoint(ckpt)
    load_checkpoint(ckpt)
    assert capsys.readouterr().err.count("its tokenizer/ has no hashes and is not verified") == 1
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: content does not match"):
        load_checkpoint(ckpt)


class Boom:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_an_optimizer_state_that_runs_code_is_one_line(tmp_path, small_cfg):
    model = MiniMind(small_cfg)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 1, model, {"kind": "pretrain"}, opt)
    ckpt = save_checkpoint(tmp_path, 2, model, {"kind": "pretrain"}, opt)
    torch.save({"state": Boom()}, ckpt / "optim.pt")
    rehash(ckpt)
    with pytest.raises(CheckpointError, match="optim.pt: not an optimizer state that loads safely"):
        checkpoint.load_optimizer_state(ckpt, "cpu")
    assert resolve_checkpoint(tmp_path, fallback=True).name == "ckpt_000001"  # --resume takes the intact one
    shutil.rmtree(tmp_path / "ckpt_000001")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*optim.pt: not an optimizer state"):
        resolve_checkpoint(tmp_path, fallback=True)


def test_data_of_another_tokenizer_is_refused(pretrain_dir, corpus, tmp_path):
    out = tmp_path / "run"
    train("--data", pretrain_dir, "--out", out, *FAST, "--max-iters", "1")
    other_tok = tmp_path / "tok2"
    run(["prepare.py", "tokenizer", "--input", corpus, "--vocab-size", "380", "--out", other_tok, "--quiet"])
    other = prepare_data("pretrain", corpus, other_tok, tmp_path / "other")
    line = one_line_error(train("--data", other, "--out", out, "--resume", "--max-iters", "2", check=False))
    assert "another tokenizer" in line and json.loads((other / "meta.json").read_text())["tokenizer_hash"] in line
    line = one_line_error(train("--init-from", out, "--data", other, "--out", tmp_path / "x",
                                check=False))
    assert "another tokenizer" in line


def test_stages_chain_by_default_and_a_missing_start_is_named(tmp_path):
    line = one_line_error(train("--mode", "sft", cwd=tmp_path, check=False))
    assert "out/pretrain" in line and "python train.py --mode=pretrain" in line
    line = one_line_error(train("--mode", "dpo", cwd=tmp_path, check=False))
    assert "out/sft" in line and "python train.py --mode=sft" in line
    assert not (tmp_path / "out").exists()


def test_epochs_and_resume_with_fewer_processes(pretrain_dir, tmp_path):
    """--epochs sets the length from the data; a 2-process run resumed by 1 process follows the
    uninterrupted 1-process run (same tokens per step, same batches)."""
    meta = json.loads((pretrain_dir / "meta.json").read_text())
    r = train("--data", pretrain_dir, "--out", tmp_path / "ep", *FAST, "--epochs", "0.01", "--eval-interval", "1000")
    steps = -(-int(0.01 * meta["train_tokens"]) // (2 * 32))
    assert f"| {steps} steps (cosine) |" in r.stdout
    common = ["--data", pretrain_dir, *FAST, "--batch-tokens", "128", "--eval-interval", "1000", "--save-interval", "3"]
    train("--out", tmp_path / "one", *common, "--max-iters", "6")
    two = tmp_path / "two"
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--out", two,
         *common, "--max-iters", "6"], env=ONE_THREAD, timeout=300)
    shutil.rmtree(two / "ckpt_000006")  # as if the 2-process run had stopped after step 3
    (two / "latest").write_text("ckpt_000003\n")
    train("--out", two, "--resume")
    a, b = ([(s, l) for s, l, _ in loss_curve(tmp_path / d) if l is not None] for d in ("one", "two"))
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    assert [l for _, l in b] == pytest.approx([l for _, l in a], rel=1e-4)


def test_dtype_choices(monkeypatch):
    assert runtime.pick_dtype("auto", "mps") == torch.float32
    assert runtime.pick_dtype("auto", "mps", training=True) == torch.float32
    # a CPU: bf16 autocast for training only where it has bf16 units; inference stays fp32
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.pick_dtype("auto", "cpu", training=True) == torch.bfloat16
    assert runtime.pick_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.pick_dtype("auto", "cpu", training=True) == torch.float32
    with pytest.warns(UserWarning, match="emulated"):
        assert runtime.pick_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.pick_dtype("bfloat16", "cpu")
    assert runtime.grad_scaler("cpu", torch.float16).is_enabled()
    assert not runtime.grad_scaler("cpu", torch.bfloat16).is_enabled()


FAULTS_OF_MOE_STEPS = """
import resource, sys, torch, runtime
from minimind import MoE, ModelConfig
applied = runtime.keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
layer = MoE(ModelConfig(dim=768, ffn_dim=2432, n_experts=4, top_k=1))  # minimind-3-moe's: 30 MB stacks
for w in (layer.w1, layer.w3, layer.w2, layer.router.weight):
    torch.nn.init.normal_(w, std=0.02)
def step():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    layer(torch.randn(1, 128, 768)).square().mean().backward()
    layer.zero_grad(set_to_none=True)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(applied, *[step() for _ in range(12)])
"""


def test_freed_memory_is_kept_for_the_next_step():
    """runtime.keep_freed_memory (train.py on a CPU): a MoE layer's training steps at minimind-3-moe's
    size make fresh 30 MB expert-stack gradients each step; they come from the heap again instead of
    faulting ~22k pages in (with glibc's defaults: ~15k faults a step here)."""
    if not runtime.keep_freed_memory():
        pytest.skip("not Linux with glibc: no mallopt")

    def faults(mode):  # the page faults of steps 6-12 (the first ones grow the heap)
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_MOE_STEPS, mode], cwd=ROOT, capture_output=True,
                             text=True, check=True, env=ONE_THREAD).stdout.split()
        return out[0], sum(map(int, out[6:]))
    (applied, kept), (_, default) = faults("keep"), faults("default")
    # less than one step's 22k gradient pages in seven steps (the heap may still grow once)
    assert applied == "True" and kept < 10000, (kept, default)
    if default > 30000:  # glibc's defaults fault here (they do with glibc 2.36); then the gain is large
        assert kept * 5 < default, (kept, default)


def test_float16_training_uses_a_loss_scaler(pretrain_dir, tmp_path):
    out = tmp_path / "fp16"
    train("--data", pretrain_dir, "--out", out, *FAST, "--max-iters", "3", "--dtype", "float16",
          "--optimizer", "adamw")
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 3 and all(l == l and l < 10 for l in losses)  # finite


def test_sft_output_dir_as_file_and_unwritable(pretrain_dir, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    line = one_line_error(train("--data", pretrain_dir, "--out", target, *FAST, "--max-iters", "1", check=False))
    assert str(target) in line
    shutil.rmtree(tmp_path / "none", ignore_errors=True)


def test_max_time_plans_the_schedule_and_ends_on_time(pretrain_dir, tmp_path):
    """--max-time: the lr follows warmup-stable-decay on elapsed time and reaches its floor as the
    run ends; the last step evaluates and saves. Generous bound: the machine is shared."""
    out = tmp_path / "timed"
    r = train("--data", pretrain_dir, "--out", out, *FAST, "--max-time", "0.3", "--eval-interval", "1000",
              "--warmup-iters", "2")
    rows = [r for r in read_log(out) if "lr" in r]
    lrs = [r["lr"] for r in rows]
    assert len(rows) > 5 and "(wsd)" in r.stdout
    assert max(lrs) == pytest.approx(6e-3) and lrs[-1] < 0.25 * 6e-3  # decayed (to 0.1 x at the very end)
    assert rows[-1]["time"] < 0.3 * 60 + 15
    state = json.loads((resolve_checkpoint(out) / "state.json").read_text())
    assert state["step"] == rows[-1]["step"] and 0 < state["train_seconds"] <= 0.3 * 60 + 15
    assert [r for r in read_log(out) if "val_loss" in r][-1]["step"] == state["step"]


def test_default_out_keeps_every_run(pretrain_dir, tmp_path):
    """With no --out, a second run of a stage goes to out/MODE-2 (said at start); --resume without
    --out continues the stage's newest run."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pretrain").symlink_to(pretrain_dir)
    train("--mode=pretrain", *FAST, "--max-iters", "1", cwd=tmp_path)
    r = train("--mode=pretrain", *FAST, "--max-iters", "1", cwd=tmp_path)
    assert "out/pretrain holds a run: this one goes to out/pretrain-2" in r.stdout
    assert resolve_checkpoint(tmp_path / "out" / "pretrain").name == "ckpt_000001"
    assert resolve_checkpoint(tmp_path / "out" / "pretrain-2").name == "ckpt_000001"
    train("--mode=pretrain", "--resume", "--max-iters", "2", cwd=tmp_path)
    assert resolve_checkpoint(tmp_path / "out" / "pretrain-2").name == "ckpt_000002"


def test_a_torn_log_line_does_not_stop_a_resume(tmp_path, capsys):
    """A run killed while appending to log.jsonl leaves a torn last line: --resume keeps the records up
    to its checkpoint and drops that line, saying so, instead of a JSON traceback."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo\n[1]\n{"step": 4}\n')
    checkpoint.Log(tmp_path, resume_step=2)
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == [1, 2]
    assert "2 unreadable line(s) dropped" in capsys.readouterr().err
