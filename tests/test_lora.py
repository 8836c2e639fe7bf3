"""LoRA tests: merged weights give the logits of base + adapters; training touches only the
adapters and saves only them; an adapter checkpoint loads as base + adapters wherever checkpoints
are loaded (checkpoint.load_checkpoint, export.py --merge-lora, export.py); --resume is bit-identical; the DPO
reference of a LoRA run is the base model (adapters off).

    python -m pytest tests/test_lora.py -q
"""
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import lora
from checkpoint import atomic_write_text, load_checkpoint, resolve_checkpoint
from conftest import ONE_THREAD, loss_curve, read_log, run
from minimind import MiniMind, ModelConfig

SMALL = dict(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)


def test_merge_gives_the_logits_of_base_plus_adapters():
    torch.manual_seed(0)
    model = MiniMind(ModelConfig(**SMALL)).eval()
    names = set(model.state_dict())
    idx = torch.randint(0, 100, (2, 12))
    base, _ = model(idx)
    lora.apply_lora(model, rank=4, alpha=8, targets="q,k,v,o,gate,up,down")
    assert len(lora.lora_modules(model)) == 2 * 7
    assert all((".lora_" in n) == p.requires_grad for n, p in model.named_parameters())  # only adapters train
    assert torch.equal(model(idx)[0], base)  # B = 0: training starts exactly at the base model
    with torch.no_grad():
        for m in lora.lora_modules(model):
            m.lora_B.normal_(std=0.05)
    adapted, _ = model(idx)
    assert (adapted - base).abs().max() > 1e-2
    with lora.lora_disabled(model):
        assert torch.equal(model(idx)[0], base)
    lora.merge_lora(model)
    assert not lora.lora_modules(model) and set(model.state_dict()) == names  # plain layers again
    assert torch.allclose(model(idx)[0], adapted, atol=1e-5)


def test_targets_select_layers_and_bad_targets_are_refused():
    model = MiniMind(ModelConfig(**SMALL))
    lora.apply_lora(model, rank=2, alpha=2, targets="q,v")
    block = model.layers[0]
    assert isinstance(block.attn.wq, lora.LoRALinear) and isinstance(block.attn.wv, lora.LoRALinear)
    assert not isinstance(block.attn.wk, lora.LoRALinear) and not isinstance(block.ffn.w1, lora.LoRALinear)
    with pytest.raises(ValueError, match="--lora-targets"):
        lora.apply_lora(MiniMind(ModelConfig(**SMALL)), 2, 2, "q,mlp")
    with pytest.raises(ValueError, match="MoE"):
        lora.apply_lora(MiniMind(ModelConfig(**SMALL, n_experts=2)), 2, 2, "q,gate")


@pytest.fixture(scope="module")
def lora_run(sft_dir, base_ckpt, tmp_path_factory):
    """8 steps of LoRA SFT on base_ckpt, checkpoints at 4 and 8; the base's bytes before."""
    before = (resolve_checkpoint(base_ckpt) / "model.safetensors").read_bytes()
    out = tmp_path_factory.mktemp("lora") / "sft-lora"
    run(["train.py", "--mode", "sft", "--init-from", base_ckpt, "--data", sft_dir, "--out", out,
         "--lora-rank", "4", "--lora-alpha", "8", "--max-iters", "8", "--save-interval", "4", "--eval-interval", "8",
         "--eval-iters", "2", "--log-interval", "1", "--lr", "1e-2"], env=ONE_THREAD)
    return out, before


def test_lora_training_saves_only_adapters_and_leaves_the_base_untouched(lora_run, base_ckpt):
    out, before = lora_run
    base_dir = resolve_checkpoint(base_ckpt)
    ckpt = resolve_checkpoint(out)
    assert not (ckpt / "model.safetensors").exists()
    adapters = load_file(ckpt / "adapter.safetensors")
    assert adapters and all(".lora_" in k for k in adapters)
    assert (ckpt / "adapter.safetensors").stat().st_size < (base_dir / "model.safetensors").stat().st_size / 4
    state = json.loads((ckpt / "state.json").read_text())
    assert state["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["q", "k", "v", "o", "gate", "up", "down"],
                             "base": str(base_dir.resolve()), "base_rel": os.path.relpath(base_dir, out)}
    assert (base_dir / "model.safetensors").read_bytes() == before
    model, _, _ = load_checkpoint(out, merge_lora=False)
    base = load_file(base_dir / "model.safetensors")
    weights = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(weights[k], base[k]) for k in base)  # the base weights did not move
    assert all(adapters[k].abs().max() > 0 for k in adapters)  # A and B both trained
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses


def test_adapter_checkpoints_load_merged_everywhere(lora_run, base_ckpt, tmp_path):
    out, _ = lora_run
    idx = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    unmerged, _, _ = load_checkpoint(out, merge_lora=False)
    merged, _, _ = load_checkpoint(out)  # what sample.py / serve.py get
    base, _, _ = load_checkpoint(base_ckpt)
    assert lora.lora_modules(unmerged) and not lora.lora_modules(merged)
    with torch.no_grad():
        want = unmerged(idx)[0]
        assert torch.allclose(merged(idx)[0], want, atol=1e-4)
        assert (base(idx)[0] - want).abs().max() > 1e-2
    # export.py --merge-lora: a full checkpoint
    run(["export.py", "--merge-lora", out, "--out", tmp_path / "merged"])
    full = resolve_checkpoint(tmp_path / "merged")
    assert (full / "model.safetensors").exists() and (full / "tokenizer" / "tokenizer.json").exists()
    model, state, _ = load_checkpoint(full)
    assert state["merged_from"]["base"] == str(resolve_checkpoint(base_ckpt).resolve())
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], want, atol=1e-4)
    # export.py exports the adapter checkpoint as the merged one
    export = pytest.importorskip("export")
    export.export_hf(out, tmp_path / "hf_adapter")
    export.export_hf(full, tmp_path / "hf_merged")
    a, b = load_file(tmp_path / "hf_adapter" / "model.safetensors"), load_file(tmp_path / "hf_merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_moved_tree_of_runs_still_finds_the_base(lora_run, tmp_path):
    """Runs copied elsewhere (another machine, another disk): the recorded absolute base path is
    gone, the base sits at the same place relative to the adapter run."""
    out, _ = lora_run
    ckpt = resolve_checkpoint(out)
    state = json.loads((ckpt / "state.json").read_text())
    rel = state["lora"]["base_rel"]
    moved = tmp_path.joinpath(*["d"] * rel.count("..")) / "run"  # deep enough that rel stays inside tmp_path
    shutil.copytree(out, moved)
    shutil.copytree(state["lora"]["base"], os.path.normpath(moved / rel))
    state["lora"]["base"] = str(tmp_path / "gone" / "ckpt_000000")
    (moved / ckpt.name / "state.json").write_text(json.dumps(state))
    idx = torch.arange(3, 23).view(1, 20)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(moved)[0](idx)[0], load_checkpoint(out)[0](idx)[0])
    shutil.rmtree(os.path.normpath(moved / rel))  # neither place: the error names the run and the base
    with pytest.raises(FileNotFoundError, match="base checkpoint of the LoRA adapters is missing"):
        load_checkpoint(moved)


def test_lora_resume_is_bit_identical(lora_run, tmp_path):
    out, _ = lora_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "ckpt_000008")
    atomic_write_text(resumed / "latest", "ckpt_000004\n")
    run(["train.py", "--out", resumed, "--resume"], env=ONE_THREAD)  # LoRA flags and base inherited from the checkpoint
    a = load_file(resolve_checkpoint(out) / "adapter.safetensors")
    b = load_file(resolve_checkpoint(resumed) / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loss_curve(resumed) == loss_curve(out)


def test_lora_dpo_reference_is_the_base(sft_ckpt, dpo_dir, tmp_path):
    out = tmp_path / "dpo-lora"
    run(["train.py", "--mode", "dpo", "--init-from", sft_ckpt, "--data", dpo_dir, "--out", out,
         "--lora-rank", "8", "--lora-targets", "q,v,o", "--seq-len", "128", "--batch-size", "4", "--max-iters", "10",
         "--eval-interval", "10", "--save-interval", "10", "--eval-iters", "2", "--log-interval", "1", "--lr", "1e-2"],
        env=ONE_THREAD)
    log = read_log(out)
    train = [r for r in log if "loss" in r]
    val = [r for r in log if "val_loss" in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and train[0]["reward_margin"] == 0
    assert val[-1]["val_reward_acc"] >= 0.8 and val[-1]["val_loss"] < math.log(2) - 0.1, val
    ckpt = resolve_checkpoint(out)
    assert (ckpt / "adapter.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    state = json.loads((ckpt / "state.json").read_text())
    assert state["lora"]["base"] == str(resolve_checkpoint(sft_ckpt).resolve()) and state["kind"] == "dpo"
