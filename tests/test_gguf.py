"""export.py --gguf / gguf_file.py: a GGUF file llama.cpp runs as minimind does.

    python -m pytest tests/test_gguf.py -q     # the llama.cpp half needs: pip install "llama-cpp-python>=0.3"

Without llama.cpp: the file reads back (our reader) with the model's tensors (f32 exactly, q8_0 within
its rounding), the tokenizer and the chat template; models llama.cpp cannot compute are refused.
With llama-cpp-python, for tiny random models of every family (llama, qwen3, qwen3moe as MiniMind-3-MoE
routes, Mixtral-like llama MoE): llama.cpp's token ids of a mixed Chinese / English / emoji text with
control tokens equal minimind's; its logits over a prompt agree (f32: within F32_TOL; q8_0: within
Q8_TOL, measured); its greedy continuation of the f32 file equals minimind's; the chat template in the file renders
(llama-cpp-python's Jinja formatter) the prompt minimind renders.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import export  # noqa: E402
import gguf_file  # noqa: E402
from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from minimind import MiniMind, ModelConfig  # noqa: E402
from tokenizer import CHAT_TEMPLATE, Tokenizer, render_chat  # noqa: E402

try:
    import llama_cpp
except ImportError:  # an optional extra: the tests below that need it say so
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed "
                                                           "(pip install \"llama-cpp-python>=0.3\", the llama extra)")

TINY = dict(vocab_size=448, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, norm_eps=1e-6, max_seq_len=256)
FAMILIES = {  # name: (config overrides, llama.cpp architecture)
    "llama": (dict(), "llama"),
    "qwen3": (dict(qk_norm=True, head_dim=32), "qwen3"),
    "qwen3moe": (dict(qk_norm=True, n_experts=4, top_k=1, norm_top1=True, ffn_dim=64), "qwen3moe"),  # MiniMind-3-MoE
    "mixtral": (dict(n_experts=4, top_k=2, ffn_dim=64), "llama"),
}
TEXT = "hello world, minimind 模型训练 12345!  naïve café 🎉🚀\n\n<think>\n思考</think><|im_end|>\t end"
MESSAGES = [{"role": "system", "content": "You are minimind."}, {"role": "user", "content": "你好, hello 🎉"},
            {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "export?"}]
# max abs logit difference per position, logits up to ~20 (llama.cpp with an f32 KV cache; its default
# f16 cache alone makes it ~1e-2). f32: measured 1.0e-5 - 1.4e-5 (float32 sums in another order).
# q8_0: measured 0.2 - 0.71 over three seeds (8-bit weights, and llama.cpp's 8-bit activations in q8_0
# matmuls); a top-1 MoE whose router is at a near tie (margin 0.005) picks the other expert at one
# position, whose logits then differ by ~15: for MoE at least 80% of the positions are held to it.
F32_TOL = 1e-4
Q8_TOL = 1.0


def make_model(tmp_path, tok_dir, seed: int = 0, **overrides):
    """A random model whose output depends on the whole context and whose top logits are far apart (as
    conftest.random_ckpt: attention and MLP weights scaled up, final norm scaled), saved as a checkpoint."""
    torch.manual_seed(seed)
    model = MiniMind(ModelConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "norm.weight":
                p.mul_(30)
            elif not name.endswith("norm.weight") and name != "embed.weight":
                p.mul_(4)
            elif name.endswith("norm.weight"):  # norms away from 1, so that a misplaced one shows
                p.add_(torch.rand_like(p) * 0.5)
    model.eval()
    save_checkpoint(tmp_path / "run", 0, model, {"kind": "pretrain"}, tokenizer_dir=tok_dir)
    return model


def export_file(tmp_path, kind="f32"):
    path = tmp_path / f"model-{kind}.gguf"
    export.main(["--ckpt", str(tmp_path / "run"), "--gguf", str(path), "--gguf-type", kind, "--force"])
    return path


def test_file_reads_back(tmp_path, tokenizer_dir):
    """Our reader on our writer: tensors (llama's q/k rows permuted), metadata, tokenizer, template, Modelfile."""
    model = make_model(tmp_path, tokenizer_dir)  # llama: the permuted layout
    meta, tensors = gguf_file.read_gguf(export_file(tmp_path))
    sd = model.state_dict()
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 0
    assert meta["llama.block_count"] == 2 and meta["llama.attention.head_count_kv"] == 2
    assert np.array_equal(tensors["token_embd.weight"], sd["embed.weight"].numpy())
    assert np.array_equal(tensors["blk.1.ffn_down.weight"], sd["layers.1.ffn.w2.weight"].numpy())
    wq = torch.from_numpy(tensors["blk.0.attn_q.weight"]).reshape(4, 8, 2, 64).transpose(1, 2).reshape(64, 64)
    assert torch.equal(wq, sd["layers.0.attn.wq.weight"])  # interleaved pairs back to halves
    tok = Tokenizer(tokenizer_dir)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 448 and tokens[tok.eos_id] == "<|im_end|>" and tokens[447] == "[PAD447]"
    assert meta["tokenizer.ggml.token_type"][tok.eos_id] == gguf_file.CONTROL
    assert meta["tokenizer.ggml.token_type"][tok.control["<think>"]] == gguf_file.USER_DEFINED
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.add_bos_token"]) == (tok.eos_id, False)
    modelfile = (tmp_path / "model-f32.Modelfile").read_text()
    assert "FROM ./model-f32.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    with pytest.raises(SystemExit, match="exists"):  # an existing file is replaced only with --force
        export.main(["--ckpt", str(tmp_path / "run"), "--gguf", str(tmp_path / "model-f32.gguf")])

    # q8_0: every 2-D weight within rounding of its block's step (max|w| / 127); norms and routers exact
    make_model(tmp_path / "moe", tokenizer_dir, **FAMILIES["qwen3moe"][0])
    meta, tensors = gguf_file.read_gguf(export_file(tmp_path / "moe", "q8_0"))
    model = load_checkpoint(tmp_path / "moe" / "run")[0]
    for name, t in gguf_file.gguf_tensors(model, "qwen3moe"):
        x, got = t.numpy(), tensors[name]
        if x.ndim == 1 or "gate_inp" in name:
            assert np.array_equal(got, x), name
        else:
            step = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127  # (blocks, 1)
            # half a step of rounding, plus the fp16 scale's own rounding: up to 127 steps * 2^-11
            assert (np.abs(got.reshape(-1, 32) - x.reshape(-1, 32)) <= step * (0.5 + 127 / 2048) + 1e-8).all(), name
    assert meta["general.file_type"] == 7 and meta["qwen3moe.expert_used_count"] == 1


@pytest.mark.parametrize("overrides,message", [
    (dict(n_experts=4, top_k=1, qk_norm=True), "not renormalised"),
    (dict(n_experts=4, top_k=2, norm_topk=False), "not renormalised"),
    (dict(n_experts=4, top_k=2, n_shared_experts=1), "shared expert"),
    (dict(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64}), "YaRN"),
])
def test_refuses_what_llama_cpp_does_not_compute(tmp_path, tokenizer_dir, overrides, message):
    make_model(tmp_path, tokenizer_dir, **overrides)
    with pytest.raises(SystemExit, match=message):
        export_file(tmp_path)
    assert not list(tmp_path.glob("*.gguf"))


@needs_llama
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_runs_it_as_minimind(tmp_path, tokenizer_dir, family):
    overrides, arch = FAMILIES[family]
    model = make_model(tmp_path, tokenizer_dir, **overrides)
    tok = Tokenizer(tokenizer_dir)
    prompt = tok.encode("小明喜欢一本书。The cat reads the book.")
    with torch.no_grad():
        ours_logits = model(torch.tensor([prompt]))[0][0].numpy()  # (T, V)
    ours_greedy = model.generate(torch.tensor([prompt]), 24, temperature=0)[0, len(prompt):].tolist()
    results = {}
    for kind in ("f32", "q8_0"):
        llm = llama_cpp.Llama(str(export_file(tmp_path, kind)), n_ctx=128, logits_all=True, verbose=False,
                              n_threads=2, n_batch=128, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        assert llm.metadata["general.architecture"] == arch
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == tok.encode(TEXT)
        assert llm.detokenize(tok.encode(TEXT), special=True).decode() == TEXT
        llm.eval(prompt)
        diff = np.abs(np.asarray(llm.scores[:len(prompt)]) - ours_logits).max(axis=-1)  # (T,)
        llm.reset()
        greedy = []
        for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            greedy.append(t)
            if len(greedy) == len(ours_greedy):
                break
        results[kind] = (diff, greedy, llm.metadata)
        llm.close()
        print(f"{family} {kind}: max abs logit diff {diff.max():.2e} (logits up to {np.abs(ours_logits).max():.1f}); "
              f"greedy {'equal' if greedy == ours_greedy else greedy} (minimind: {ours_greedy})")
    assert results["f32"][0].max() <= F32_TOL
    assert results["f32"][1] == ours_greedy
    q8 = results["q8_0"][0]
    assert (q8 <= Q8_TOL).mean() >= 0.8 if "n_experts" in overrides else q8.max() <= Q8_TOL, q8

    # the template inside the file, rendered by llama-cpp-python as its chat completions do
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    template = results["f32"][2]["tokenizer.chat_template"]
    assert template == CHAT_TEMPLATE
    formatter = Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                    add_generation_prompt=True)
    assert formatter(messages=MESSAGES).prompt == render_chat(MESSAGES, add_generation_prompt=True)


def test_q8_0_blocks_match_gguf_py():
    """Our q8_0 bytes are those of llama.cpp's own Python package (gguf-py), an all-zero block included."""
    gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's gguf-py) is not installed")
    x = (np.random.default_rng(0).standard_normal((6, 96)) * 3).astype(np.float32)
    x[0, :32] = 0  # an all-zero block: scale 0
    x[1, :32] = np.arange(32) - 15.5  # evenly spaced, negative and positive
    assert np.array_equal(gguf_file.quantize_q8_0(x), gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0))
