"""export.py: minimind <-> transformers, exact in fp32.

    python -m pytest tests/test_export.py -q

For tiny models of every exportable family (Llama-, Qwen3-, Qwen3-MoE- and Mixtral-like), random
and briefly trained: the exported directory loads with plain AutoModelForCausalLM /
AutoTokenizer, logits agree to 1e-4, greedy decoding agrees for 32 tokens, the tokenizer and chat
template agree with minimind's, and importing the export gives back the same weights and config.
Also: refusals (shared experts, top-1 MoE without q/k-norm, LoRA checkpoints) and YaRN parity; and
the other direction from directories transformers itself writes: a dense Qwen3 and a top-1 Qwen3-MoE
with norm_topk_prob=true in MiniMind-3's shapes (scaled down) import with the same logits.
Needs `transformers` (a test dependency); builds its own tokenizer and models, downloads nothing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import export  # noqa: E402
from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from tokenizer import Tokenizer, render_chat  # noqa: E402
from minimind import MiniMind, ModelConfig  # noqa: E402

VOCAB = 512
TINY = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, norm_eps=1e-6, max_seq_len=256)
FAMILIES = {  # name: (config overrides, expected transformers architecture)
    "llama": (dict(), "LlamaForCausalLM"),
    "qwen3": (dict(qk_norm=True, head_dim=32), "Qwen3ForCausalLM"),
    "qwen3-moe": (dict(qk_norm=True, n_experts=4, top_k=1, ffn_dim=48), "Qwen3MoeForCausalLM"),
    "qwen3-moe-top2": (dict(qk_norm=True, n_experts=4, top_k=2, ffn_dim=48), "Qwen3MoeForCausalLM"),
    "mixtral": (dict(n_experts=4, top_k=2, ffn_dim=48), "MixtralForCausalLM"),
    # MiniMind-3-MoE's routing: top-1 weight renormalised to 1.0 (norm_topk_prob=true)
    "qwen3-moe-norm-top1": (dict(qk_norm=True, n_experts=4, top_k=1, norm_top1=True, ffn_dim=48, aux_loss_coef=5e-4),
                            "Qwen3MoeForCausalLM"),
    "mixtral-top1": (dict(n_experts=4, top_k=1, norm_top1=True, ffn_dim=48), "MixtralForCausalLM"),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer trained by prepare.py on generated text."""
    d = tmp_path_factory.mktemp("tok")
    g = torch.Generator().manual_seed(0)
    words = ["minimind", "model", "token", "train", "hello", "world", "模型", "训练", "你好", "数据", "the", "a",
             "export", "qwen", "llama", "expert", "router", "logits", "12", "345", "!", "?", "。", "，"]
    docs = []
    for _ in range(400):
        n = int(torch.randint(5, 30, (1,), generator=g))
        docs.append(" ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g)))
    (d / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")
    subprocess.run([sys.executable, str(ROOT / "prepare.py"), "tokenizer", "--input", str(d / "corpus.txt"),
                    "--out", str(d / "tok"), "--vocab-size", str(VOCAB), "--quiet"], check=True, cwd=ROOT,
                   capture_output=True)
    return d / "tok"


def make_checkpoint(out, tok_dir, trained: bool, seed: int = 0, **overrides) -> MiniMind:
    """A tiny model, optionally after a few AdamW steps on random tokens (so norms, q/k-norms and
    routers are far from their initial values), saved as a standard checkpoint under `out`."""
    torch.manual_seed(seed)
    model = MiniMind(ModelConfig(**{**TINY, **overrides}))
    if trained:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(5):
            idx = torch.randint(0, VOCAB, (4, 33))
            _, loss = model(idx[:, :-1], idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    save_checkpoint(out, 5 if trained else 0, model, {"kind": "pretrain"}, tokenizer_dir=tok_dir)
    return model


def load_hf(hf_dir):
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_parity_and_roundtrip(tmp_path, tok_dir, family, trained):
    overrides, arch = FAMILIES[family]
    model = make_checkpoint(tmp_path / "run", tok_dir, trained, **overrides)
    if trained:  # the point of training: non-trivial norm weights
        assert (model.norm.weight - 1).abs().max() > 1e-2
    assert export.export_hf(tmp_path / "run", tmp_path / "hf") == arch
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == arch

    # logits, fp32
    idx = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{family} {'trained' if trained else 'random'}: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4

    # greedy decoding, 32 tokens (no eos stop on either side)
    prompt = idx[:, :8]
    ours = model.generate(prompt, 32, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)

    # import the export: same weights, bit for bit, and the same config
    ckpt = export.import_hf(tmp_path / "hf", tmp_path / "back")
    back, state, _ = load_checkpoint(ckpt)
    assert state["architecture"] == arch
    assert back.config.to_dict() == model.config.to_dict()
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert Tokenizer(ckpt / "tokenizer").hash() == Tokenizer(tok_dir).hash()


# MiniMind-3's shapes, scaled down: head_dim = dim / heads, 2:1 GQA, q/k-norm, eps 1e-6, theta 1e6, tied
M3 = dict(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          head_dim=24, intermediate_size=160, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=256,
          tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def transformers_dir(hf_cls, cfg, out: Path, tok_dir) -> Path:
    """A model transformers builds and saves itself (save_pretrained), with non-trivial norms and
    decisive routers, plus our tokenizer files."""
    torch.manual_seed(0)
    model = hf_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)  # a router far from uniform
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3", "qwen3-moe-top1-norm"])
def test_import_transformers_written_qwen3(tmp_path, tok_dir, moe):
    if moe:
        cfg = transformers.Qwen3MoeConfig(**M3, num_experts=4, num_experts_per_tok=1, norm_topk_prob=True,
                                          moe_intermediate_size=64, router_aux_loss_coef=5e-4)
        hf = transformers_dir(transformers.Qwen3MoeForCausalLM, cfg, tmp_path / "hf", tok_dir)
    else:
        hf = transformers_dir(transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**M3), tmp_path / "hf", tok_dir)
    export.main(["--from-hf", str(hf), "--out", str(tmp_path / "run")])
    ours, _, _ = load_checkpoint(tmp_path / "run")
    cfg = ours.config
    assert (cfg.dim, cfg.head_dim, cfg.n_kv_heads, cfg.qk_norm, cfg.norm_eps) == (96, 24, 2, True, 1e-6)
    if moe:
        assert (cfg.n_experts, cfg.top_k, cfg.norm_top1, cfg.aux_loss_coef) == (4, 1, True, 5e-4)
    theirs = load_hf(hf)
    idx = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ours(idx)[0] - theirs(idx).logits).abs().max().item()
    print(f"import {'qwen3-moe top-1 norm_topk_prob' if moe else 'qwen3'}: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4
    if moe:  # the routing is decisive and varied, so renormalising (or not) shows in the logits
        experts = ours.layers[0].ffn.router(ours.embed(idx)).argmax(-1)
        assert len(experts.unique()) > 1
        unnormalised = MiniMind(ModelConfig.from_dict({**cfg.to_dict(), "norm_top1": False})).eval()
        unnormalised.load_state_dict(ours.state_dict())
        assert (unnormalised(idx)[0] - theirs(idx).logits).abs().max() > 1e-2

    # and back: exported again, transformers computes the same
    export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf2")])
    assert json.loads((tmp_path / "hf2" / "config.json").read_text()).get("norm_topk_prob", True) is True
    with torch.no_grad():
        assert (load_hf(tmp_path / "hf2")(idx).logits - theirs(idx).logits).abs().max() <= 1e-4


def test_export_files_and_tokenizer(tmp_path, tok_dir):
    make_checkpoint(tmp_path / "run", tok_dir, trained=False, qk_norm=True)
    export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"])
    hf_dir = tmp_path / "hf"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (hf_dir / name).exists(), name
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    from safetensors import safe_open
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
        assert "lm_head.weight" not in f.keys()  # tied: stored once
    assert load_hf(hf_dir).config.tie_word_embeddings
    # weights are published like every other file (safetensors writes 0600, mkdtemp makes 0700)
    mask = os.umask(0)
    os.umask(mask)
    for root in (hf_dir, tmp_path / "run"):
        for p in [root, *root.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~mask
            assert p.stat().st_mode & 0o777 == want, f"{p.relative_to(tmp_path)}: {oct(p.stat().st_mode & 0o777)}"

    # the tokenizer: same ids, same special tokens, same chat rendering
    ours, theirs = Tokenizer(tok_dir), AutoTokenizer.from_pretrained(hf_dir)
    texts = ["hello world, minimind 模型训练 12345!", "  the  router\n\nlogits。", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert theirs(text)["input_ids"] == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    assert (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id) == (ours.pad_id, ours.bos_id, ours.eos_id)
    messages = [{"role": "system", "content": "You are minimind."}, {"role": "user", "content": "你好, hello"},
                {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "export?"}]
    for gen_prompt in (False, True):
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
        assert text == render_chat(messages, add_generation_prompt=gen_prompt)
    ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(ids) == ours.encode_chat(messages)


def test_yarn_parity(tmp_path, tok_dir):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    model = make_checkpoint(tmp_path / "run", tok_dir, trained=True, qk_norm=True, rope_scaling=yarn, max_seq_len=128)
    export.export_hf(tmp_path / "run", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "yarn" and cfg["rope_parameters"]["factor"] == 4.0
    hf = load_hf(tmp_path / "hf")
    idx = torch.randint(0, VOCAB, (1, 120), generator=torch.Generator().manual_seed(2))  # well past 32 positions
    with torch.no_grad():
        diff = (model(idx)[0] - hf(idx).logits).abs().max().item()
    print(f"yarn: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4
    back, _, _ = load_checkpoint(export.import_hf(tmp_path / "hf", tmp_path / "back"))
    assert back.config.rope_scaling == yarn


@pytest.mark.parametrize("overrides, message", [
    (dict(qk_norm=True, n_experts=4, n_shared_experts=1, top_k=2, ffn_dim=48), "shared expert"),
    (dict(n_experts=4, top_k=1, ffn_dim=48), "without q/k-norm"),  # the tiny-moe preset's shape
    (dict(n_experts=4, top_k=2, norm_topk=False, ffn_dim=48), "without q/k-norm"),
])
def test_refuses_what_no_architecture_computes(tmp_path, tok_dir, overrides, message):
    make_checkpoint(tmp_path / "run", tok_dir, trained=False, **overrides)
    with pytest.raises(SystemExit) as e:
        export.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert message in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_refuses_unmerged_lora(tmp_path, tok_dir):
    # adapters whose base is not recorded (saved through save_checkpoint: state.json lists every file)
    save_checkpoint(tmp_path / "run", 0, MiniMind(ModelConfig(**TINY)), {"kind": "sft"}, tokenizer_dir=tok_dir,
                    weights={"layers.0.attn.wq.lora_A": torch.zeros(2, 2)})
    with pytest.raises(export.ExportError, match="LoRA checkpoint"):
        export.export_hf(tmp_path / "run", tmp_path / "hf")


def test_import_checks(tmp_path, tok_dir):
    make_checkpoint(tmp_path / "run", tok_dir, trained=False, qk_norm=True)
    export.export_hf(tmp_path / "run", tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # transformers-4 style config (no rope_parameters) imports the same
    legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    assert export.config_from_hf(legacy)[0] == export.config_from_hf(cfg)[0]
    # what minimind cannot compute is refused, not silently dropped
    for bad, message in [({"attention_bias": True}, "biases"), ({"hidden_act": "gelu"}, "hidden_act"),
                         ({"use_sliding_window": True, "sliding_window": 16}, "sliding"),
                         ({"architectures": ["GPT2LMHeadModel"]}, "architecture")]:
        with pytest.raises(export.ExportError, match=message):
            export.config_from_hf({**cfg, **bad})
    # an untied lm_head cannot be represented
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(SystemExit, match="lm_head"):
        export.main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
