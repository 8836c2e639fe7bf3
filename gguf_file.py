"""GGUF, the one-file format llama.cpp, llama-cpp-python and Ollama run: a minimind model written as one,
its tokenizer and chat template inside, and read back (metadata and tensors) for checks.

Written with this module's own writer rather than the `gguf` package from PyPI: the format is a header,
typed key/value metadata, tensor descriptors and aligned tensor data (GGUF v3, as llama.cpp's
gguf-py/gguf/constants.py and ggml/include/gguf.h lay it out), about a hundred lines, so exporting needs
no dependency beyond numpy; llama.cpp itself is the check (tests/test_gguf.py loads the file with
llama-cpp-python and compares tokens, logits, greedy decoding and the chat template with minimind's).

Which llama.cpp architecture a model becomes (each computes exactly what minimind computes):

    minimind model                               GGUF general.architecture
    dense, no q/k-norm                           llama     (q and k rows permuted: llama.cpp's llama
                                                           rotates interleaved pairs, minimind rotates halves)
    dense, q/k-norm                              qwen3
    MoE, q/k-norm, renormalised routed weights   qwen3moe  (MiniMind-3-MoE: top-1, norm_top1)
    MoE, no q/k-norm, renormalised weights       llama     with experts (Mixtral's layout)
    anything else                                refused: llama.cpp always renormalises the routed
                                                 weights of both, and has no ungated shared experts;
                                                 YaRN is refused too (llama.cpp's YaRN is not verified here)

Tensor types (`file_type`): f32; f16; q8_0 (blocks of 32 weights: one fp16 scale max|w|/127 and 32 int8,
8.5 bits a weight). As llama.cpp's converter does, norms and MoE routers stay f32, and a q8_0 tensor whose
rows are not a multiple of 32 falls back to f16.

The tokenizer: byte-level BPE (`gpt2` in llama.cpp) with the `gpt-2` pre-tokenizer, whose regex is the
one `tokenizers`' ByteLevel pre-tokenizer applies (prepare.py trains with ByteLevel(add_prefix_space=False),
as MiniMind does); special added tokens are control tokens, the others (<think>, <tool_call>, ...) user
defined, so both are matched in text as minimind matches them; ids past the tokenizer's (a model vocab
rounded up) are unused `[PAD{id}]` tokens. No BOS is added: minimind's prompts start with their own text.
"""
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from minimind import MiniMind, ModelConfig
from tokenizer import CHAT_TEMPLATE, EOS, PAD

GGUF_MAGIC, GGUF_VERSION, ALIGNMENT = b"GGUF", 3, 32
# metadata value types (gguf_type)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALARS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
           BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
# tensor types (ggml_type), and the label of the whole file (llama_ftype) for each choice
F32, F16, Q8_0 = 0, 1, 8
FILE_TYPES = {"f32": (F32, 0), "f16": (F16, 1), "q8_0": (Q8_0, 7)}
QK8_0 = 32  # weights per q8_0 block
Q8_0_BLOCK_BYTES = 2 + QK8_0  # fp16 scale + 32 int8
# token types (llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


class GGUFError(ValueError):
    """A model that llama.cpp cannot compute exactly, or a file that is not GGUF; the message says why."""


# -----------------------------------------------------------------------------
# which architecture, and the tensors

def gguf_architecture(cfg: ModelConfig) -> str:
    """The llama.cpp architecture that computes exactly what `cfg` computes, or GGUFError."""
    if cfg.rope_scaling:
        raise GGUFError("YaRN RoPE scaling: llama.cpp's YaRN is not verified to compute minimind's; export "
                        "without it (RoPE scaling is an inference setting: sample.py --rope-scaling) or to "
                        "transformers")
    if cfg.n_experts == 0:
        return "qwen3" if cfg.qk_norm else "llama"
    if cfg.n_shared_experts:
        raise GGUFError(f"this MoE has {cfg.n_shared_experts} shared expert(s) (always on, ungated): llama.cpp has "
                        "no architecture that computes that; run it with minimind (sample.py / serve.py)")
    if not (cfg.norm_top1 if cfg.top_k == 1 else cfg.norm_topk):
        raise GGUFError(f"MoE with {'top-1' if cfg.top_k == 1 else 'top-k'} routing whose weights are not renormalised "
                        "(weight = raw router probability): llama.cpp's qwen3moe and llama MoE always renormalise "
                        "them; train with norm_top1 (top-1, MiniMind-3-MoE) or norm_topk to export to GGUF")
    return "qwen3moe" if cfg.qk_norm else "llama"


def rope_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k projection rows (n_heads * head_dim, D) from rotate-half order (minimind, transformers)
    to the interleaved pairs llama.cpp's `llama` architecture rotates."""
    rows = w.shape[0]
    # (H, 2, hd/2, D) -> (H, hd/2, 2, D): row j of the first half and row j of the second become a pair
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: MiniMind, arch: str) -> list:
    """[(GGUF name, fp32 tensor)] in llama.cpp's names; the tied output is the embedding, stored once."""
    cfg, sd = model.config, {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["embed.weight"]), ("output_norm.weight", sd["norm.weight"])]
    for i in range(cfg.n_layers):
        mm, blk = f"layers.{i}.", f"blk.{i}."
        wq, wk = sd[mm + "attn.wq.weight"], sd[mm + "attn.wk.weight"]
        if arch == "llama":
            wq, wk = rope_interleaved(wq, cfg.n_heads), rope_interleaved(wk, cfg.n_kv_heads)
        out += [(blk + "attn_norm.weight", sd[mm + "attn_norm.weight"]), (blk + "attn_q.weight", wq),
                (blk + "attn_k.weight", wk), (blk + "attn_v.weight", sd[mm + "attn.wv.weight"]),
                (blk + "attn_output.weight", sd[mm + "attn.wo.weight"]),
                (blk + "ffn_norm.weight", sd[mm + "ffn_norm.weight"])]
        if cfg.qk_norm:
            out += [(blk + "attn_q_norm.weight", sd[mm + "attn.q_norm.weight"]),
                    (blk + "attn_k_norm.weight", sd[mm + "attn.k_norm.weight"])]
        if cfg.n_experts:  # stacked experts as llama.cpp stores them: gate/up (E, F, D), down (E, D, F)
            out += [(blk + "ffn_gate_inp.weight", sd[mm + "ffn.router.weight"]),  # (E, D)
                    (blk + "ffn_gate_exps.weight", sd[mm + "ffn.w1"]), (blk + "ffn_up_exps.weight", sd[mm + "ffn.w3"]),
                    (blk + "ffn_down_exps.weight", sd[mm + "ffn.w2"])]
        else:
            out += [(blk + "ffn_gate.weight", sd[mm + "ffn.w1.weight"]),
                    (blk + "ffn_up.weight", sd[mm + "ffn.w3.weight"]),
                    (blk + "ffn_down.weight", sd[mm + "ffn.w2.weight"])]
    return out


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """fp32 (..., K), K a multiple of 32 -> q8_0 bytes (..., K / 32 * 34): per block of 32, the fp16 scale
    d = max|x| / 127, then round(x / d) as int8 (halves away from zero, as ggml rounds)."""
    blocks = x.reshape(-1, QK8_0).astype(np.float32)  # (N, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = blocks * inv
    q = np.sign(q) * np.floor(np.abs(q) + 0.5)
    packed = np.concatenate([d.astype(np.float16).view(np.uint8), q.astype(np.int8).view(np.uint8)], axis=1)
    return packed.reshape(*x.shape[:-1], -1)


def dequantize_q8_0(raw: np.ndarray, shape: tuple) -> np.ndarray:
    """q8_0 bytes -> fp32 of `shape` (the inverse of quantize_q8_0, up to its rounding)."""
    blocks = raw.reshape(-1, Q8_0_BLOCK_BYTES)  # (N, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (N, 1)
    return (d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(shape)


def encode_tensor(name: str, t: torch.Tensor, want: int):
    """(ggml type, bytes) of tensor `t` stored as type `want` where llama.cpp's converter would."""
    x = t.numpy()
    kind = F32 if x.ndim == 1 or name.endswith("ffn_gate_inp.weight") else want
    if kind == Q8_0 and x.shape[-1] % QK8_0:
        kind = F16  # rows that do not split into blocks: what llama.cpp's converter falls back to
    if kind == Q8_0:
        return Q8_0, quantize_q8_0(x).tobytes()
    return kind, x.astype(np.float16 if kind == F16 else np.float32).tobytes()


# -----------------------------------------------------------------------------
# metadata: the model's hyperparameters, the tokenizer, the chat template

def model_metadata(cfg: ModelConfig, arch: str, name: str, file_type: int) -> list:
    """[(key, type, value)] of the general.* and {arch}.* keys llama.cpp reads."""
    a = arch
    kv = [("general.architecture", STRING, arch), ("general.name", STRING, name),
          ("general.file_type", UINT32, file_type), ("general.quantization_version", UINT32, 2),
          (f"{a}.vocab_size", UINT32, cfg.vocab_size), (f"{a}.context_length", UINT32, cfg.max_seq_len),
          (f"{a}.embedding_length", UINT32, cfg.dim), (f"{a}.block_count", UINT32, cfg.n_layers),
          (f"{a}.feed_forward_length", UINT32, cfg.ffn_dim),
          (f"{a}.attention.head_count", UINT32, cfg.n_heads), (f"{a}.attention.head_count_kv", UINT32, cfg.n_kv_heads),
          (f"{a}.attention.key_length", UINT32, cfg.head_dim), (f"{a}.attention.value_length", UINT32, cfg.head_dim),
          (f"{a}.attention.layer_norm_rms_epsilon", FLOAT32, cfg.norm_eps),
          (f"{a}.rope.freq_base", FLOAT32, cfg.rope_theta), (f"{a}.rope.dimension_count", UINT32, cfg.head_dim)]
    if cfg.n_experts:
        kv += [(f"{a}.expert_count", UINT32, cfg.n_experts), (f"{a}.expert_used_count", UINT32, cfg.top_k)]
    if arch == "qwen3moe":
        kv.append((f"{a}.expert_feed_forward_length", UINT32, cfg.ffn_dim))
    return kv


def chat_template_of(tok_dir: Path) -> str:
    """The tokenizer directory's chat template (tokenizer_config.json or chat_template.jinja), else MiniMind-3's."""
    cfg_path, jinja = tok_dir / "tokenizer_config.json", tok_dir / "chat_template.jinja"
    if cfg_path.exists():
        template = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return jinja.read_text(encoding="utf-8") if jinja.exists() else CHAT_TEMPLATE


def tokenizer_metadata(tok_dir: Path, cfg: ModelConfig) -> list:
    """[(key, type, value)]: the vocabulary (padded to the model's), token types, merges, special ids, template."""
    spec = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError(f"{tok_dir}: not a byte-level BPE tokenizer (llama.cpp's gpt2 vocabulary needs one)")
    vocab = {i: t for t, i in model["vocab"].items()}
    types = {}
    for added in spec.get("added_tokens", []):
        vocab[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if max(vocab) >= cfg.vocab_size:
        raise GGUFError(f"{tok_dir}: token id {max(vocab)} is past the model's vocab_size {cfg.vocab_size}")
    tokens = [vocab.get(i, f"[PAD{i}]") for i in range(cfg.vocab_size)]
    token_types = [types.get(i, NORMAL if i in vocab else UNUSED) for i in range(cfg.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return [("tokenizer.ggml.model", STRING, "gpt2"), ("tokenizer.ggml.pre", STRING, "gpt-2"),
            ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
            ("tokenizer.ggml.token_type", ARRAY, (INT32, token_types)),
            ("tokenizer.ggml.merges", ARRAY, (STRING, merges)),
            ("tokenizer.ggml.bos_token_id", UINT32, cfg.bos_id), ("tokenizer.ggml.eos_token_id", UINT32, cfg.eos_id),
            ("tokenizer.ggml.padding_token_id", UINT32, cfg.pad_id),
            ("tokenizer.ggml.add_bos_token", BOOL, False), ("tokenizer.ggml.add_eos_token", BOOL, False),
            ("tokenizer.chat_template", STRING, chat_template_of(tok_dir))]


# -----------------------------------------------------------------------------
# the file: writer and reader

def _pack(vtype: int, value) -> bytes:
    if vtype == STRING:
        b = value.encode("utf-8")
        return struct.pack("<Q", len(b)) + b
    if vtype == ARRAY:
        etype, items = value
        if etype in SCALARS:  # numbers pack in one call
            return struct.pack("<IQ", etype, len(items)) + struct.pack(f"<{len(items)}{SCALARS[etype][1]}", *items)
        return struct.pack("<IQ", etype, len(items)) + b"".join(_pack(etype, v) for v in items)
    return struct.pack(SCALARS[vtype], value)


def write_gguf(path: Path, metadata: list, tensors: list):
    """Write GGUF v3 to `path` atomically. metadata: [(key, type, value)]; tensors: [(name, shape as
    torch/numpy order, ggml type, bytes)]; every tensor's data starts at a multiple of ALIGNMENT."""
    header = [struct.pack("<4sIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(metadata))]
    header += [_pack(STRING, key) + struct.pack("<I", vtype) + _pack(vtype, value) for key, vtype, value in metadata]
    offset, pads = 0, []
    for name, shape, kind, data in tensors:
        dims = tuple(reversed(shape))  # ggml's ne[0] is the innermost (contiguous) dimension
        header.append(_pack(STRING, name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset))
        pads.append(-len(data) % ALIGNMENT)
        offset += len(data) + pads[-1]
    head = b"".join(header)
    chunks = [head, b"\0" * (-len(head) % ALIGNMENT)]
    for (_, _, _, data), pad in zip(tensors, pads):  # no concatenation: the data is not copied again
        chunks += [data, b"\0" * pad]
    _write_atomic(path, chunks)


def _write_atomic(path: Path, chunks):
    """Write the bytes of `chunks` to `path` under a temporary name, then rename (mode as umask allows)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return vals if len(vals) > 1 else vals[0]

    def value(self, vtype: int):
        if vtype == STRING:
            n = self.take("<Q")
            self.pos += n
            return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8")
        if vtype == ARRAY:
            etype, n = self.take("<IQ")
            return [self.value(etype) for _ in range(n)]
        return self.take(SCALARS[vtype])


def read_gguf(path) -> tuple:
    """(metadata {key: value}, tensors {name: fp32 numpy array}) of a GGUF file of f32, f16 and q8_0 tensors."""
    buf = memoryview(Path(path).read_bytes())
    c = _Cursor(buf)
    magic, version, n_tensors, n_kv = c.take("<4sIQQ")
    if magic != GGUF_MAGIC or version != GGUF_VERSION:
        raise GGUFError(f"{path}: not a GGUF v{GGUF_VERSION} file")
    meta = {}
    for _ in range(n_kv):
        key = c.value(STRING)
        meta[key] = c.value(c.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = c.value(STRING), c.take("<I")
        dims = c.take(f"<{n_dims}Q") if n_dims > 1 else (c.take("<Q"),)
        infos.append((name, tuple(reversed(dims)), *c.take("<IQ")))
    start = c.pos + (-c.pos % meta.get("general.alignment", ALIGNMENT))
    tensors = {}
    for name, shape, kind, offset in infos:
        n = int(np.prod(shape))
        if kind == Q8_0:
            raw = np.frombuffer(buf, np.uint8, n // QK8_0 * Q8_0_BLOCK_BYTES, start + offset)
            tensors[name] = dequantize_q8_0(raw, shape)
        elif kind in (F32, F16):
            tensors[name] = np.frombuffer(buf, np.float32 if kind == F32 else np.float16, n, start + offset)\
                .astype(np.float32).reshape(shape)
        else:
            raise GGUFError(f"{path}: tensor {name} has ggml type {kind}; this reader knows f32, f16 and q8_0")
    return meta, tensors


# -----------------------------------------------------------------------------
# the whole export, and Ollama's Modelfile

# Ollama's Go template of the chat format, for what the Modelfile covers: system, user and assistant
# turns, each reply after an empty think block (tokenizer.chat_segments; tools are not in it)
OLLAMA_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n"
                   "{{ if eq .Role \"assistant\" }}<think>\n\n</think>\n\n{{ end }}{{ .Content }}<|im_end|>\n"
                   "{{ end }}<|im_start|>assistant\n<think>\n\n</think>\n\n")


def modelfile(gguf_name: str, context: int, temperature: float = 0.8, top_p: float = 0.9) -> str:
    """Ollama's Modelfile for the GGUF file `gguf_name` beside it: template, stop tokens, sampling
    (sample.py's defaults) and context length."""
    return (f"# Ollama Modelfile written by minimind's export.py: ollama create NAME -f THIS_FILE\n"
            f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
            f'PARAMETER stop "{EOS}"\nPARAMETER stop "{PAD}"\n'
            f"PARAMETER temperature {temperature}\nPARAMETER top_p {top_p}\nPARAMETER num_ctx {context}\n")


def export_gguf(model: MiniMind, tok_dir: Path, path: Path, file_type: str = "f32", name: str = "minimind",
                context: int = 0) -> str:
    """Write `model` with the tokenizer of `tok_dir` as GGUF file `path` (tensors of `file_type`: f32,
    f16, q8_0) and Ollama's Modelfile beside it (`path` with suffix .Modelfile, context length
    `context` or the model's max_seq_len); returns the llama.cpp architecture."""
    if file_type not in FILE_TYPES:
        raise GGUFError(f"GGUF type {file_type!r}: choose one of {', '.join(FILE_TYPES)}")
    if not (tok_dir / "tokenizer.json").exists():
        raise GGUFError(f"{tok_dir}: no tokenizer.json (pass --tokenizer DIR)")
    cfg = model.config
    arch = gguf_architecture(cfg)
    want, label = FILE_TYPES[file_type]
    tensors = []
    for tname, t in gguf_tensors(model, arch):
        kind, data = encode_tensor(tname, t, want)
        tensors.append((tname, tuple(t.shape), kind, data))
    meta = model_metadata(cfg, arch, name, label) + tokenizer_metadata(tok_dir, cfg)
    write_gguf(path, meta, tensors)
    _write_atomic(path.with_suffix(".Modelfile"), [modelfile(path.name, context or cfg.max_seq_len).encode()])
    return arch
