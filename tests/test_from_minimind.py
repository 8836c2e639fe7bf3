"""Coming from MiniMind: its native .pth weights, its top-1 MoE routing, its YaRN switch.

    python -m pytest tests/test_from_minimind.py -q

- `export.py --from-minimind FILE.pth --model PRESET` imports the fp16 state dicts MiniMind's
  trainers save (dense MiniMind2-style, MiniMind-3-MoE-style top-1 with q/k-norm, MiniMind2-MoE-style
  shared experts): same logits as the model the file was written from; a MiniMind-3-MoE file gives
  the same logits as transformers' Qwen3-MoE loading it the way MiniMind's convert_model.py does;
  files that do not fit the preset are refused with a one-line message naming the file.
- `norm_top1`: every top-1 weight is exactly 1.0 and the router learns from the aux loss only.
- `--rope-scaling` (sample.py, serve.py): YaRN frequencies equal to transformers' and to MiniMind's
  formula, and a context window beyond the trained one.
The .pth files are written here from minimind models in MiniMind's naming; nothing is downloaded.
"""
import argparse
import math
from dataclasses import replace

import pytest
import torch

import export
from checkpoint import add_model_args, load_checkpoint, load_for_inference, load_or_exit, parse_rope_scaling
from minimind import PRESETS, MiniMind, ModelConfig


def minimind_state_dict(model: MiniMind) -> dict:
    """The state dict MiniMind's MiniMindForCausalLM would hold for `model`, as its trainers save it
    (fp16; the tied lm_head under both names). Spelled out here, apart from export.weight_names."""
    sd, cfg = {}, model.config
    sd["model.embed_tokens.weight"] = sd["lm_head.weight"] = model.embed.weight
    sd["model.norm.weight"] = model.norm.weight
    for i, block in enumerate(model.layers):
        p, a = f"model.layers.{i}.", block.attn
        sd[p + "input_layernorm.weight"] = block.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        for name, lin in (("q_proj", a.wq), ("k_proj", a.wk), ("v_proj", a.wv), ("o_proj", a.wo)):
            sd[p + f"self_attn.{name}.weight"] = lin.weight
        if cfg.qk_norm:
            sd[p + "self_attn.q_norm.weight"], sd[p + "self_attn.k_norm.weight"] = a.q_norm.weight, a.k_norm.weight
        f = block.ffn
        if not cfg.n_experts:
            sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = f.w1.weight, f.w3.weight
            sd[p + "mlp.down_proj.weight"] = f.w2.weight
            continue
        sd[p + "mlp.gate.weight"] = f.router.weight
        for e in range(cfg.n_experts):
            sd[p + f"mlp.experts.{e}.gate_proj.weight"] = f.w1[e]
            sd[p + f"mlp.experts.{e}.up_proj.weight"] = f.w3[e]
            sd[p + f"mlp.experts.{e}.down_proj.weight"] = f.w2[e]
        for s, shared in enumerate(f.shared):
            sd[p + f"mlp.shared_experts.{s}.gate_proj.weight"] = shared.w1.weight
            sd[p + f"mlp.shared_experts.{s}.up_proj.weight"] = shared.w3.weight
            sd[p + f"mlp.shared_experts.{s}.down_proj.weight"] = shared.w2.weight
    return {k: v.detach().half().clone() for k, v in sd.items()}


def fp16_model(cfg: ModelConfig, seed: int = 0) -> MiniMind:
    """A model with non-trivial norms and decisive routers, its weights rounded to fp16 (as MiniMind
    saves them), so that the import has to reproduce it exactly."""
    torch.manual_seed(seed)
    model = MiniMind(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif "router" in name:
                p.normal_(0.0, 0.5)
            p.copy_(p.half().float())
    return model


@pytest.fixture
def small_presets(monkeypatch):
    """Small stand-ins for MiniMind2-MoE (shared expert, top-2) and a wider `tiny`, as presets."""
    monkeypatch.setitem(PRESETS, "tiny2-moe", replace(PRESETS["tiny"], n_experts=4, n_shared_experts=1, top_k=2))
    monkeypatch.setitem(PRESETS, "tiny-wide", replace(PRESETS["tiny"], dim=320))


def import_pth(tmp_path, tokenizer_dir, sd, preset, name="full_sft_256.pth"):
    torch.save(sd, tmp_path / name)
    export.main(["--from-minimind", str(tmp_path / name), "--model", preset, "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "run")])
    return load_checkpoint(tmp_path / "run")


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny2-moe"])
def test_native_pth_imports_exactly(tmp_path, tokenizer_dir, small_presets, preset):
    # tiny: dense, no q/k-norm (MiniMind2); tiny-moe: top-1 + q/k-norm (MiniMind-3-MoE); tiny2-moe: shared experts
    cfg = export.minimind_config(preset)
    if preset == "tiny-moe":
        assert (cfg.norm_top1, cfg.aux_loss_coef) == (True, 5e-4)  # MiniMind-3's routing, not the preset's
        assert not PRESETS[preset].norm_top1
    model = fp16_model(cfg)
    back, state, ckpt = import_pth(tmp_path, tokenizer_dir, minimind_state_dict(model), preset)
    assert back.config == cfg and state["preset"] == preset
    want, got = model.state_dict(), back.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    idx = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(idx)[0] - back(idx)[0]).abs().max().item()
    print(f"--from-minimind {preset}: max abs logit diff {diff:.2e}")
    assert diff == 0
    load_for_inference(ckpt, "cpu")  # ready for sample.py / serve.py: the tokenizer came along


def test_native_moe_matches_transformers_qwen3_moe(tmp_path, tokenizer_dir):
    """A MiniMind-3-MoE .pth, loaded into transformers' Qwen3-MoE (norm_topk_prob=true) as MiniMind's
    scripts/convert_model.py does it, computes what its --from-minimind import computes."""
    transformers = pytest.importorskip("transformers")
    cfg = export.minimind_config("tiny-moe")
    sd = minimind_state_dict(fp16_model(cfg, seed=1))
    ours, _, _ = import_pth(tmp_path, tokenizer_dir, sd, "tiny-moe", "full_sft_256_moe.pth")
    qwen = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=True, num_experts=cfg.n_experts, num_experts_per_tok=1, norm_topk_prob=True,
        moe_intermediate_size=cfg.ffn_dim)).eval()
    fused = {k: v for k, v in sd.items() if ".mlp.experts." not in k}  # transformers 5 stacks the experts
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}.mlp.experts."
        stack = lambda name: torch.stack([sd[f"{p}{e}.{name}.weight"] for e in range(cfg.n_experts)])
        fused[p + "gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)  # (E, 2F, D)
        fused[p + "down_proj"] = stack("down_proj")  # (E, D, F)
    qwen.load_state_dict({k: v.float() for k, v in fused.items()}, strict=True)
    idx = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(idx)[0] - qwen(idx).logits).abs().max().item()
    print(f"MiniMind-3-MoE .pth: minimind vs transformers Qwen3-MoE max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_native_pth_refusals(tmp_path, tokenizer_dir, small_presets):
    sd = minimind_state_dict(fp16_model(PRESETS["tiny"]))
    torch.save(sd, tmp_path / "pretrain_256.pth")

    def refused(path, preset):
        with pytest.raises(SystemExit) as e:
            export.main(["--from-minimind", str(path), "--model", preset, "--tokenizer", str(tokenizer_dir),
                         "--out", str(tmp_path / "run")])
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg, msg
        assert not (tmp_path / "run").exists()
        return msg

    msg = refused(tmp_path / "pretrain_256.pth", "tiny-moe")  # a dense file as the MoE preset
    assert "4 layers, hidden 256, dense" in msg and "does not fit --model tiny-moe" in msg
    msg = refused(tmp_path / "pretrain_256.pth", "tiny-wide")
    assert "model.embed_tokens.weight has shape (6400, 256), the model expects (6400, 320)" in msg
    torch.save({**sd, "model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 256)}, tmp_path / "lora.pth")
    assert "LoRA" in refused(tmp_path / "lora.pth", "tiny")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert "not a PyTorch state dict" in refused(tmp_path / "junk.pth", "tiny")
    assert "no such file" in refused(tmp_path / "missing.pth", "tiny")
    with pytest.raises(SystemExit):  # argparse: --model and --tokenizer are required with --from-minimind
        export.main(["--from-minimind", str(tmp_path / "pretrain_256.pth"), "--out", str(tmp_path / "run")])

    # a resume file (weights + optimizer state) imports its weights
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 0, "step": 7},
               tmp_path / "pretrain_256_resume.pth")
    export.main(["--from-minimind", str(tmp_path / "pretrain_256_resume.pth"), "--model", "tiny", "--tokenizer",
                 str(tokenizer_dir), "--out", str(tmp_path / "run")])
    back, _, _ = load_checkpoint(tmp_path / "run")
    assert torch.equal(back.embed.weight, sd["model.embed_tokens.weight"].float())


# -----------------------------------------------------------------------------
# MiniMind-3's top-1 routing

SMALL = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, qk_norm=True,
             n_experts=4, top_k=1)


def test_norm_top1_weight_is_one_and_router_learns_from_aux_loss_only():
    model = fp16_model(ModelConfig(**SMALL, norm_top1=True, aux_loss_coef=0.0)).train()
    moe = model.layers[0].ffn
    x = torch.randn(2, 16, 64)
    expert = moe.router(x).argmax(-1)  # (B, T)
    w1, w3, w2 = moe.w1[expert], moe.w3[expert], moe.w2[expert]  # the chosen expert's weights, per token
    h = torch.nn.functional.silu(torch.einsum("btd,btfd->btf", x, w1)) * torch.einsum("btd,btfd->btf", x, w3)
    torch.testing.assert_close(moe(x), torch.einsum("btf,btdf->btd", h, w2))  # weight exactly 1.0, no prob

    idx = torch.randint(0, 300, (2, 16))
    model(idx, idx)[1].backward()
    for block in model.layers:  # p / p: no gradient from the LM loss reaches the router
        assert block.ffn.router.weight.grad.abs().max() < 1e-6
    model.zero_grad()
    model.config.aux_loss_coef = 5e-4
    model(idx, idx)[1].backward()
    for block in model.layers:  # ... only the balance loss moves it
        assert block.ffn.router.weight.grad.abs().max() > 1e-6
    with pytest.raises(AssertionError, match="top-1"):
        ModelConfig(**{**SMALL, "top_k": 2}, norm_top1=True)


# -----------------------------------------------------------------------------
# YaRN at inference: --rope-scaling

def test_parse_rope_scaling():
    minimind = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048, "beta_fast": 32.0,
                "beta_slow": 1.0, "attention_factor": 1.0}  # MiniMind-3's inference_rope_scaling=True
    assert parse_rope_scaling("yarn") == minimind
    assert parse_rope_scaling("yarn", trained_len=512) == {**minimind, "original_max_position_embeddings": 512}
    assert parse_rope_scaling("yarn:4") == {**minimind, "factor": 4.0}
    assert parse_rope_scaling("factor=4,original=1024,beta_fast=16") == {
        **minimind, "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 16.0}
    assert parse_rope_scaling("yarn:factor=2") == {**minimind, "factor": 2.0}
    assert parse_rope_scaling("none") is None
    for bad in ("yarn:x", "factor=4,colour=2", "factor=0.5", "linear"):
        with pytest.raises(ValueError, match="--rope-scaling"):
            parse_rope_scaling(bad)


def minimind_yarn_inv_freq(head_dim, theta, factor, orig, beta_fast=32, beta_slow=1):
    """MiniMind's precompute_freqs_cis, its own way: f'(i) = f(i) ((1 - ramp) + ramp / factor)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    corr = lambda b: head_dim * math.log(orig / (b * 2 * math.pi)) / (2 * math.log(theta))
    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), head_dim // 2 - 1)
    ramp = ((torch.arange(head_dim // 2).float() - low) / max(high - low, 0.001)).clamp(0, 1)
    return freqs * (1 - ramp + ramp / factor)


def load_from_flags(args):
    """As sample.py and serve.py load from their model flags."""
    return load_or_exit(args.ckpt, args.device, args.dtype, args.kernels, args.context, args.rope_scaling, args.threads)


def test_rope_scaling_flag_gives_yarn_frequencies_and_a_longer_context(random_ckpt):
    p = argparse.ArgumentParser()
    add_model_args(p)  # sample.py's and serve.py's model flags
    args = p.parse_args(["--ckpt", str(random_ckpt), "--device", "cpu", "--rope-scaling", "yarn:4"])
    model, _, _, context = load_from_flags(args)
    cfg = model.config  # trained at seq_len 256 (state.json), head_dim 16
    assert cfg.rope_scaling["factor"] == 4.0 and cfg.rope_scaling["original_max_position_embeddings"] == 256
    assert context == 1024 > 256

    d, n = cfg.head_dim, 1500
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    qwen = transformers.Qwen3Config(hidden_size=cfg.dim, num_attention_heads=cfg.n_heads, head_dim=d,
                                    max_position_embeddings=1024, rope_parameters={
                                        "rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": 4.0,
                                        "original_max_position_embeddings": 256, "attention_factor": 1.0})
    theirs, attn_factor = ROPE_INIT_FUNCTIONS["yarn"](qwen, "cpu")
    assert attn_factor == 1.0
    for inv_freq in (theirs, minimind_yarn_inv_freq(d, cfg.rope_theta, 4.0, 256)):
        angles = torch.arange(n).float()[:, None] * inv_freq.float()[None, :]  # (T, D/2)
        model(torch.zeros(1, n, dtype=torch.long))  # grows the RoPE tables to n positions
        torch.testing.assert_close(model.rope_cos[:n, :d // 2], angles.cos(), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.rope_sin[:n, d // 2:], angles.sin(), atol=1e-5, rtol=0)

    # beyond the trained context: a 1000-token prompt decodes, and scaling changed the result
    plain, _, _, plain_context = load_for_inference(random_ckpt, "cpu")
    assert plain_context == 256
    idx = torch.randint(3, 400, (1, 1000), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(idx)[0]
        assert torch.isfinite(logits).all()
        assert (logits[0, 500:] - plain(idx)[0][0, 500:]).abs().max() > 1e-3
        out = model.generate(idx, 8, temperature=0)
    assert out.shape == (1, 1008)

    args = p.parse_args(["--ckpt", str(random_ckpt), "--device", "cpu", "--rope-scaling", "yarn"])
    assert load_from_flags(args)[3] == 16 * 256  # MiniMind's factor 16
    args = p.parse_args(["--ckpt", str(random_ckpt), "--device", "cpu", "--rope-scaling", "factor=x"])
    with pytest.raises(SystemExit, match="--rope-scaling 'factor=x'"):
        load_from_flags(args)
