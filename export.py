r"""Export a minimind checkpoint as a standard Hugging Face `transformers` model, or import one back.

    python export.py --ckpt out/tiny --out hf/tiny                 # minimind -> transformers directory
    python export.py --ckpt out/tiny --out hf/tiny --dtype bfloat16
    python export.py --ckpt out/tiny --gguf gguf/tiny.gguf --gguf-type q8_0  # llama.cpp / Ollama file
    python export.py --from-hf hf/minimind-3 --out out/minimind-3  # transformers directory -> minimind
    python export.py --merge-lora out/sft-lora --out out/sft-merged  # LoRA adapters folded into their base
    python export.py --from-minimind out/full_sft_768_moe.pth --model minimind-3-moe --tokenizer model \
        --out out/m3-moe                                           # MiniMind's own .pth -> minimind

The exported directory loads with plain `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` (no trust_remote_code), and so in vllm, llama.cpp's
convert_hf_to_gguf.py and ollama. Which architecture a model becomes:

    minimind model                                   transformers architecture
    dense, no q/k-norm                               LlamaForCausalLM
    dense, q/k-norm                                  Qwen3ForCausalLM
    MoE, q/k-norm, no shared experts                 Qwen3MoeForCausalLM   norm_topk_prob = norm_topk (top-k > 1),
                                                                           norm_top1 (top-1: MiniMind-3-MoE)
    MoE, no q/k-norm, renormalised weights           MixtralForCausalLM    (Mixtral always renormalises)
      (top-k > 1 with norm_topk, top-1 with norm_top1)
    shared experts; MoE without q/k-norm whose       refused: no standard architecture computes it
      weights are not renormalised

--gguf writes one GGUF file for llama.cpp, llama-cpp-python and Ollama (f32, f16 or q8_0 tensors, the
tokenizer and chat template inside; gguf_file.py says which llama.cpp architecture each model becomes) and
an Ollama Modelfile beside it (NAME.Modelfile: template, stop tokens, sampling, context length).

Refused models are refused on purpose: an export that loads but computes something else is worse
than none. Every mapping is exact in fp32 (tests/test_export.py checks logits, greedy decoding,
the tokenizer and the chat template against minimind itself).

Weights are written in the on-disk layout the Hugging Face hub uses (per-expert
`mlp.experts.{e}.gate_proj.weight` for Qwen3-MoE, `block_sparse_moe.experts.{e}.w1.weight` for
Mixtral), which transformers 5 fuses into its stacked expert tensors on load. config.json carries
the RoPE settings both as `rope_parameters` (transformers 5) and `rope_theta` / `rope_scaling`
(transformers 4, vllm, llama.cpp).

Import accepts those four architectures (single or sharded safetensors, or pytorch_model.bin) and
writes a standard minimind checkpoint (checkpoint.save_checkpoint) with the tokenizer copied in, ready
for fine-tuning (`train.py --init-from OUT`), sample.py and serve.py. A top-1 Qwen3-MoE with
norm_topk_prob=true (MiniMind-3-MoE converted by its scripts/convert_model.py) imports with norm_top1.

--from-minimind reads the state dicts MiniMind's trainers save with torch.save (`out/pretrain_768.pth`,
`full_sft_768_moe.pth`, ..., fp16; or the "model" of a `checkpoints/*_resume.pth`). They carry no
config, so --model names the preset they were trained as; names map as they do for Qwen3(-MoE):

    MiniMind .pth                                          minimind
    model.embed_tokens.weight (= lm_head.weight)           embed.weight (tied)
    model.norm.weight                                      norm.weight
    model.layers.{i}.input_layernorm.weight                layers.{i}.attn_norm.weight
    model.layers.{i}.post_attention_layernorm.weight       layers.{i}.ffn_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight       layers.{i}.attn.{wq,wk,wv,wo}.weight
    model.layers.{i}.self_attn.{q,k}_norm.weight           layers.{i}.attn.{q,k}_norm.weight (MiniMind-3)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight        layers.{i}.ffn.{w1,w3,w2}.weight
    model.layers.{i}.mlp.gate.weight                       layers.{i}.ffn.router.weight
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj   layers.{i}.ffn.{w1,w3,w2}[e] (stacked experts)
    model.layers.{i}.mlp.shared_experts.{s}.{...}_proj     layers.{i}.ffn.shared.{s}.{w1,w3,w2} (MiniMind2-MoE)

A top-1 MoE (MiniMind-3-MoE) imports with MiniMind's routing: norm_top1 (every weight 1.0) and
balance-loss weight 5e-4, MiniMind-3's router_aux_loss_coef.
A shape or name that does not fit the preset is refused with the file, the tensor and both shapes.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from checkpoint import load_checkpoint, merge_lora_checkpoint, resolve_checkpoint, save_checkpoint
from gguf_file import FILE_TYPES, export_gguf
from minimind import PRESETS, MiniMind, ModelConfig
from runtime import publish_modes
from tokenizer import CHAT_TEMPLATE

LLAMA, QWEN3, QWEN3_MOE, MIXTRAL = "LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"
MINIMIND = "MiniMind .pth"  # MiniMind's native state dicts: Qwen3 names, per-expert MoE, MiniMind2's shared experts
MODEL_TYPES = {LLAMA: "llama", QWEN3: "qwen3", QWEN3_MOE: "qwen3_moe", MIXTRAL: "mixtral"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
YARN_KEYS = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"}


class ExportError(ValueError):
    """A model or directory that cannot be converted exactly; the message says why."""


# -----------------------------------------------------------------------------
# which architecture, and how the names map

def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers architecture that computes exactly what `cfg` computes, or ExportError."""
    if cfg.n_experts == 0:
        return QWEN3 if cfg.qk_norm else LLAMA
    if cfg.n_shared_experts:
        raise ExportError(
            f"this MoE has {cfg.n_shared_experts} shared expert(s) (always on, ungated, DeepSeek-style) and no "
            "standard transformers architecture computes that exactly: Qwen2-MoE gates its shared expert with a "
            "sigmoid, DeepSeek-V2/V3 use MLA attention and other routing. Refusing to export a model that would "
            "load but compute differently; run it with minimind itself (sample.py / serve.py), or train the MoE "
            "without shared experts to export it as Qwen3MoeForCausalLM.")
    if cfg.qk_norm:
        return QWEN3_MOE
    if renormalises(cfg):
        return MIXTRAL
    raise ExportError(
        f"MoE without q/k-norm and with {'top-1' if cfg.top_k == 1 else 'unnormalised top-k'} routing (weight = raw "
        "router probability) has no standard transformers architecture: Qwen3-MoE always applies q/k-norm and "
        "Mixtral always renormalises the top-k weights (a top-1 weight becomes 1.0). Train with qk_norm=True "
        "(exports as Qwen3MoeForCausalLM) or top_k > 1 with norm_topk (exports as MixtralForCausalLM).")


def renormalises(cfg: ModelConfig) -> bool:
    """Whether the routed weights are renormalised to sum to 1 (transformers' norm_topk_prob)."""
    return cfg.norm_top1 if cfg.top_k == 1 else cfg.norm_topk


def weight_names(cfg: ModelConfig, arch: str):
    """[(minimind name, transformers name, expert index or None)] for every stored tensor. The tied
    lm_head is stored once, as the embedding (config.json says tie_word_embeddings)."""
    names = [("embed.weight", "model.embed_tokens.weight", None), ("norm.weight", "model.norm.weight", None)]
    for i in range(cfg.n_layers):
        mm, hf = f"layers.{i}.", f"model.layers.{i}."
        names += [(mm + "attn_norm.weight", hf + "input_layernorm.weight", None),
                  (mm + "ffn_norm.weight", hf + "post_attention_layernorm.weight", None)]
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            names.append((f"{mm}attn.{ours}.weight", f"{hf}self_attn.{theirs}.weight", None))
        if cfg.qk_norm:
            names += [(mm + "attn.q_norm.weight", hf + "self_attn.q_norm.weight", None),
                      (mm + "attn.k_norm.weight", hf + "self_attn.k_norm.weight", None)]
        if cfg.n_experts == 0:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                names.append((f"{mm}ffn.{ours}.weight", f"{hf}mlp.{theirs}.weight", None))
            continue
        if arch == MIXTRAL:  # Mixtral kept the w1/w2/w3 names minimind uses
            moe, expert_names = hf + "block_sparse_moe.", {"w1": "w1", "w3": "w3", "w2": "w2"}
        else:
            moe, expert_names = hf + "mlp.", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
        names.append((mm + "ffn.router.weight", moe + "gate.weight", None))
        for e in range(cfg.n_experts):
            for ours, theirs in expert_names.items():
                names.append((f"{mm}ffn.{ours}", f"{moe}experts.{e}.{theirs}.weight", e))
        for s in range(cfg.n_shared_experts):  # MiniMind2-MoE's .pth only: no transformers architecture has them
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                names.append((f"{mm}ffn.shared.{s}.{ours}.weight", f"{moe}shared_experts.{s}.{theirs}.weight", None))
    return names


# -----------------------------------------------------------------------------
# minimind -> transformers

def rope_config(cfg: ModelConfig) -> dict:
    """RoPE settings in both spellings: transformers 5 `rope_parameters`, and `rope_theta` +
    `rope_scaling` for transformers 4 / vllm / llama.cpp."""
    if not cfg.rope_scaling:
        return {"rope_theta": cfg.rope_theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    scaling = dict(cfg.rope_scaling)
    kind = scaling.pop("type", None) or scaling.pop("rope_type", None)
    if kind != "yarn" or set(scaling) - YARN_KEYS:
        raise ExportError(f"rope_scaling {cfg.rope_scaling}: only YaRN with keys {sorted(YARN_KEYS)} is supported")
    yarn = {"rope_type": "yarn", **scaling}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": yarn,
            "rope_parameters": {**yarn, "rope_theta": cfg.rope_theta}}


def hf_config(cfg: ModelConfig, arch: str, dtype: torch.dtype) -> dict:
    """config.json of the exported model."""
    dtype_name = str(dtype).removeprefix("torch.")
    c = {
        "architectures": [arch], "model_type": MODEL_TYPES[arch],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        **rope_config(cfg),
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
        "initializer_range": 0.02, "use_cache": True,
        "dtype": dtype_name, "torch_dtype": dtype_name,  # transformers 5 / 4 spelling
    }
    if arch == LLAMA:
        c.update(mlp_bias=False, pretraining_tp=1)
    if arch in (QWEN3, QWEN3_MOE):
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if arch == QWEN3_MOE:
        c.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, moe_intermediate_size=cfg.ffn_dim,
                 norm_topk_prob=renormalises(cfg),
                 decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=cfg.aux_loss_coef,
                 output_router_logits=False)
    if arch == MIXTRAL:
        c.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, sliding_window=None,
                 router_aux_loss_coef=cfg.aux_loss_coef, router_jitter_noise=0.0, output_router_logits=False)
    return c


def to_hf_weights(model: MiniMind, arch: str, dtype: torch.dtype) -> dict:
    """transformers name -> tensor (contiguous, `dtype`, CPU)."""
    sd = model.state_dict()
    out = {}
    for ours, theirs, e in weight_names(model.config, arch):
        t = sd[ours] if e is None else sd[ours][e]  # stacked experts: (E, F, D) -> (F, D) per expert
        out[theirs] = t.detach().to("cpu", dtype).contiguous().clone()
    return out


def load_merged(path, device: str = "cpu"):
    """Load a checkpoint for export with any LoRA adapters merged into the base weights
    (checkpoint.load_checkpoint merges a LoRA checkpoint: base from state.json lora.base + adapters);
    a LoRA checkpoint that cannot be merged (base missing, adapters not matching) is refused."""
    ckpt = resolve_checkpoint(path)
    try:
        return load_checkpoint(ckpt, device)
    except (FileNotFoundError, ValueError) as e:
        if (ckpt / "adapter.safetensors").exists():
            raise ExportError(f"{ckpt} is a LoRA checkpoint whose adapters cannot be merged: {e}") from None
        raise


def copy_tokenizer(src: Path, dst: Path, vocab_size: int):
    """Copy the tokenizer files, making sure tokenizer_config.json carries the chat template."""
    if not (src / "tokenizer.json").exists():
        raise ExportError(f"{src}: no tokenizer.json (pass --tokenizer DIR)")
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    cfg_path = dst / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {"tokenizer_class": "PreTrainedTokenizerFast"}
    if "chat_template" not in tok_cfg and not (dst / "chat_template.jinja").exists():
        tok_cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    n = len(json.loads((src / "tokenizer.json").read_text())["model"]["vocab"])
    if n > vocab_size:
        raise ExportError(f"{src}: tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")


def refuse_nonempty(out: Path, force: bool, what: str = "replace it"):
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a directory: --out names the directory to write")
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty (pass --force to {what})")


def new_output_dir(out: Path, force: bool) -> Path:
    """A temporary directory next to `out`, to be moved into place by `finish_output_dir`."""
    refuse_nonempty(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))


def finish_output_dir(tmp: Path, out: Path):
    publish_modes(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def export_hf(ckpt, out, dtype: str = "float32", tokenizer=None, force: bool = False) -> str:
    """Write checkpoint `ckpt` (run or checkpoint dir) as a transformers directory `out`; returns the architecture."""
    from safetensors.torch import save_file
    model, state, ckpt_dir = load_merged(ckpt)
    cfg = model.config
    arch = hf_architecture(cfg)
    torch_dtype = DTYPE_NAMES[dtype]
    out = Path(out)
    tmp = new_output_dir(out, force)
    try:
        save_file(to_hf_weights(model, arch, torch_dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, arch, torch_dtype), indent=2) + "\n")
        gen = {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        copy_tokenizer(Path(tokenizer) if tokenizer else ckpt_dir / "tokenizer", tmp, cfg.vocab_size)
        finish_output_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return arch


def export_gguf_file(ckpt, path, file_type: str = "f32", tokenizer=None, force: bool = False) -> str:
    """Write checkpoint `ckpt` as GGUF file `path` and its Ollama Modelfile; returns the llama.cpp architecture."""
    path = Path(path)
    if path.suffix != ".gguf":
        raise ExportError(f"{path}: --gguf names the file to write, ending in .gguf")
    for p in (path, path.with_suffix(".Modelfile")):
        if p.exists() and not force:
            raise ExportError(f"{p} exists (pass --force to replace it)")
    model, state, ckpt_dir = load_merged(ckpt)
    context = (state.get("args") or {}).get("seq_len") or model.config.max_seq_len  # what it was trained on
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_gguf(model, Path(tokenizer) if tokenizer else ckpt_dir / "tokenizer", path, file_type,
                       name=ckpt_dir.parent.name or "minimind", context=context)


# -----------------------------------------------------------------------------
# transformers -> minimind

def rope_from_hf(c: dict):
    """(rope_theta, minimind rope_scaling or None) from either spelling of the RoPE config."""
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or c.get("rope_theta") or 10000.0
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        raise ExportError(f"rope type {kind!r}: minimind supports default RoPE and YaRN only")
    if params.pop("truncate", True) is not True:
        raise ExportError("YaRN with truncate=False: minimind always truncates the correction range")
    orig = params.pop("original_max_position_embeddings", None) or c["max_position_embeddings"]
    factor = params.pop("factor", None) or c["max_position_embeddings"] / orig
    mscale, mscale_all = params.pop("mscale", None), params.pop("mscale_all_dim", None)
    scaling = {"type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
    if params.get("attention_factor") is None and mscale and mscale_all:  # DeepSeek's spelling of the factor
        def get_mscale(m):
            return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
        params["attention_factor"] = get_mscale(mscale) / get_mscale(mscale_all)
    unknown = set(params) - YARN_KEYS
    if unknown:
        raise ExportError(f"YaRN parameters {sorted(unknown)} are not supported by minimind")
    scaling.update({k: v for k, v in params.items() if v is not None})
    return float(theta), scaling


def first_id(v, default: int) -> int:
    if isinstance(v, list):
        v = v[0] if v else None
    return default if v is None else int(v)


def config_from_hf(c: dict):
    """(ModelConfig, architecture) of a transformers config.json, or ExportError for what minimind
    cannot compute exactly."""
    arch = (c.get("architectures") or [None])[0]
    if arch not in MODEL_TYPES:
        raise ExportError(f"architecture {arch!r}: import supports {sorted(MODEL_TYPES)}")
    problems = []
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c['hidden_act']!r} (minimind uses SiLU)")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            problems.append(f"{key}=true (minimind has no biases)")
    if c.get("use_sliding_window") or (arch == MIXTRAL and c.get("sliding_window")):
        problems.append("sliding-window attention")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append("partial rotary embedding")
    if arch == QWEN3_MOE:
        if c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1:
            problems.append("dense layers inside the MoE (mlp_only_layers / decoder_sparse_step)")
    if problems:
        raise ExportError(f"{arch}: not representable in minimind: " + "; ".join(problems))
    theta, scaling = rope_from_hf(c)
    heads = c["num_attention_heads"]
    d = {
        "vocab_size": c["vocab_size"], "dim": c["hidden_size"], "n_layers": c["num_hidden_layers"],
        "n_heads": heads, "n_kv_heads": c.get("num_key_value_heads") or heads,
        "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
        "ffn_dim": c["intermediate_size"], "norm_eps": c.get("rms_norm_eps", 1e-6),
        "qk_norm": arch in (QWEN3, QWEN3_MOE), "rope_theta": theta, "rope_scaling": scaling,
        "max_seq_len": c.get("max_position_embeddings", 32768),
        "bos_id": first_id(c.get("bos_token_id"), 1), "eos_id": first_id(c.get("eos_token_id"), 2),
        "pad_id": first_id(c.get("pad_token_id"), 0),
    }
    if arch in (QWEN3_MOE, MIXTRAL):
        top_k = c["num_experts_per_tok"]
        # Mixtral always renormalises; top-1 renormalised (weight 1.0) is minimind's norm_top1, and
        # norm_topk keeps its default for top-1 so that configs round-trip
        norm = arch == MIXTRAL or bool(c.get("norm_topk_prob", False))
        d.update(n_experts=c.get("num_experts") or c["num_local_experts"], top_k=top_k,
                 norm_topk=norm or top_k == 1, norm_top1=norm and top_k == 1)
    if arch == QWEN3_MOE:
        d["ffn_dim"] = c["moe_intermediate_size"]
    if "router_aux_loss_coef" in c and d.get("n_experts"):
        d["aux_loss_coef"] = c["router_aux_loss_coef"]
    return ModelConfig.from_dict(d), arch


def read_hf_weights(hf_dir: Path) -> dict:
    """name -> tensor from model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    from safetensors.torch import load_file
    if (hf_dir / "model.safetensors").exists():
        return load_file(str(hf_dir / "model.safetensors"))
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(str(hf_dir / shard)))
        return sd
    if (hf_dir / "pytorch_model.bin").exists():
        return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ExportError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def unfuse_experts(sd: dict, cfg: ModelConfig):
    """Split transformers-5 fused expert tensors (`mlp.experts.gate_up_proj` (E, 2F, D),
    `mlp.experts.down_proj` (E, D, F)) into the per-expert hub layout, in place."""
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}.mlp.experts."
        if p + "gate_up_proj" in sd:
            gate, up = sd.pop(p + "gate_up_proj").chunk(2, dim=1)  # (E, F, D) each
            down = sd.pop(p + "down_proj")
            for e in range(cfg.n_experts):
                sd[f"{p}{e}.gate_proj.weight"], sd[f"{p}{e}.up_proj.weight"] = gate[e], up[e]
                sd[f"{p}{e}.down_proj.weight"] = down[e]


def load_hf_weights(model: MiniMind, sd: dict, arch: str):
    """Load transformers-named weights `sd` into `model` (fp32): every tensor used exactly once, every
    shape checked against the model's, the tied lm_head equal to the embedding. ExportError otherwise."""
    cfg, sd = model.config, dict(sd)
    if arch == QWEN3_MOE:
        unfuse_experts(sd, cfg)
    head, embed = sd.pop("lm_head.weight", None), sd.get("model.embed_tokens.weight")
    if head is not None and embed is not None and not torch.equal(head, embed):
        raise ExportError("lm_head differs from the input embedding (tie_word_embeddings=false): minimind ties them")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out, experts = {}, {}
    for ours, theirs, e in weight_names(cfg, arch):
        if theirs not in sd:
            raise ExportError(f"missing weight {theirs}")
        t = sd.pop(theirs)
        want = shapes[ours] if e is None else shapes[ours][1:]  # stacked experts: (E, F, D) -> (F, D) each
        if tuple(t.shape) != want:
            raise ExportError(f"{theirs} has shape {tuple(t.shape)}, the model expects {want}")
        if e is None:
            out[ours] = t
        else:
            experts.setdefault(ours, [None] * cfg.n_experts)[e] = t
    if sd:
        raise ExportError(f"unexpected weights (not part of this minimind model): {sorted(sd)[:8]}")
    for ours, ts in experts.items():
        out[ours] = torch.stack(ts)  # (E, F, D) or (E, D, F)
    out["lm_head.weight"] = out["embed.weight"]
    model.load_state_dict({k: v.float() for k, v in out.items()}, strict=True)


def import_hf(hf_dir, out, force: bool = False) -> Path:
    """Convert a transformers directory into a minimind checkpoint under run dir `out`; returns its path."""
    hf_dir, out = Path(hf_dir), Path(out)
    refuse_nonempty(out, force, "write a checkpoint into it")
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{hf_dir}: not a transformers model directory (no config.json)")
    try:
        c = json.loads((hf_dir / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{hf_dir / 'config.json'}: not JSON ({err})") from None
    cfg, arch = config_from_hf(c)
    if not (hf_dir / "tokenizer.json").exists():
        raise ExportError(f"{hf_dir}: no tokenizer.json (minimind needs the fast tokenizer file)")
    model = MiniMind(cfg)
    load_hf_weights(model, read_hf_weights(hf_dir), arch)
    return save_import(model, out, hf_dir, {"kind": "import", "source": str(hf_dir), "architecture": arch})


def save_import(model: MiniMind, out: Path, tok_dir: Path, state: dict) -> Path:
    """Save an imported model as checkpoint 0 of run dir `out`, with the tokenizer files of `tok_dir`."""
    with tempfile.TemporaryDirectory() as tok:  # only the tokenizer files travel into the checkpoint
        for name in TOKENIZER_FILES:
            if (tok_dir / name).exists():
                shutil.copy2(tok_dir / name, Path(tok) / name)
        return save_checkpoint(out, 0, model, state, tokenizer_dir=tok)


# -----------------------------------------------------------------------------
# MiniMind's own .pth weights -> minimind

MINIMIND_AUX_LOSS_COEF = 5e-4  # MiniMind-3's router_aux_loss_coef (the same Switch balance loss as minimind's)


def minimind_config(preset: str) -> ModelConfig:
    """Preset `preset` with MiniMind's MoE routing: MiniMind renormalises the routed weights
    (norm_topk_prob=True) for top-1 too, where every weight becomes 1.0 (MiniMind-3-MoE)."""
    if preset not in PRESETS:
        raise ExportError(f"unknown --model {preset!r}; presets: {', '.join(PRESETS)}")
    cfg = replace(PRESETS[preset])
    if cfg.n_experts and cfg.top_k == 1:
        cfg = replace(cfg, norm_top1=True, aux_loss_coef=MINIMIND_AUX_LOSS_COEF)
    elif cfg.n_experts:
        cfg = replace(cfg, norm_topk=True)
    return cfg


def read_minimind_pth(path: Path) -> dict:
    """name -> tensor of a state dict saved by MiniMind's trainers (`out/full_sft_768.pth`, fp16), or
    the weights inside one of its resume files (`checkpoints/*_resume.pth`)."""
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors alike; their messages run to many lines
        raise ExportError(f"{path}: not a PyTorch state dict ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict) and "optimizer" in sd:
        sd = sd["model"]  # a resume file: {"model", "optimizer", "epoch", "step", ...}
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ExportError(f"{path}: not a state dict (name -> tensor)")
    if any("lora" in k for k in sd):
        raise ExportError(f"{path}: LoRA adapter weights, not a model: merge them into their base with MiniMind's "
                          "scripts/convert_model.py (convert_merge_base_lora) and import the merged .pth")
    # RoPE tables, should a model have registered them persistently: minimind computes its own
    return {k: v for k, v in sd.items() if not k.endswith(("freqs_cos", "freqs_sin"))}


def describe_minimind_pth(sd: dict) -> str:
    """'8 layers, hidden 768, 4 experts': enough to tell which preset a file is."""
    layers = {k.split(".")[2] for k in sd if k.startswith("model.layers.")}
    experts = {k.split(".")[5] for k in sd if ".mlp.experts." in k}
    emb = sd.get("model.embed_tokens.weight")
    hidden = emb.shape[1] if emb is not None else "?"
    return f"{len(layers)} layers, hidden {hidden}" + (f", {len(experts)} experts" if experts else ", dense")


def import_minimind(pth, preset: str, tokenizer, out, force: bool = False) -> Path:
    """Convert a MiniMind `.pth` state dict, trained as preset `preset`, into a minimind checkpoint
    under run dir `out`, with the tokenizer of directory `tokenizer` (MiniMind's `model/`)."""
    pth, out, tok = Path(pth), Path(out), Path(tokenizer)
    refuse_nonempty(out, force, "write a checkpoint into it")
    if not (tok / "tokenizer.json").exists():
        raise ExportError(f"{tok}: no tokenizer.json (MiniMind's tokenizer is its model/ directory)")
    sd = read_minimind_pth(pth)
    model = MiniMind(minimind_config(preset))
    try:
        load_hf_weights(model, sd, MINIMIND)  # MiniMind-3 names its weights as Qwen3(-MoE) does
    except ExportError as e:
        raise ExportError(f"{pth} ({describe_minimind_pth(sd)}) does not fit --model {preset}: {e}") from None
    state = {"kind": "import", "source": str(pth), "architecture": MINIMIND, "preset": preset}
    return save_import(model, out, tok, state)


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="minimind run or checkpoint directory to export")
    src.add_argument("--from-hf", help="transformers model directory to import as a minimind checkpoint")
    src.add_argument("--merge-lora", metavar="CKPT",
                     help="LoRA adapter checkpoint to fold into its base, written as a full minimind checkpoint")
    src.add_argument("--from-minimind", metavar="PTH",
                     help="MiniMind .pth state dict (e.g. out/full_sft_768_moe.pth) to import; needs --model, --tokenizer")
    parser.add_argument("--out", help="output directory (transformers dir, or minimind run dir)")
    parser.add_argument("--gguf", metavar="PATH",
                        help="--ckpt: write a GGUF file for llama.cpp / Ollama (and PATH's .Modelfile) "
                             "instead of --out")
    parser.add_argument("--gguf-type", default="f32", choices=list(FILE_TYPES),
                        help="--gguf: tensor type (q8_0: 8.5 bits a weight; norms and routers stay f32)")
    parser.add_argument("--model", choices=list(PRESETS),
                        help="--from-minimind: the preset the .pth was trained as (minimind-3, minimind-3-moe, ...)")
    parser.add_argument("--tokenizer", help="tokenizer directory: for --ckpt if the checkpoint carries none; "
                                            "for --from-minimind, MiniMind's model/ directory (required)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPE_NAMES),
                        help="--ckpt: dtype of the exported weights")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    if args.from_minimind and not (args.model and args.tokenizer):
        parser.error("--from-minimind needs --model PRESET and --tokenizer DIR")
    if args.gguf and not args.ckpt:
        parser.error("--gguf exports a checkpoint: pass --ckpt")
    if bool(args.gguf) == bool(args.out):
        parser.error("pass --out DIR, or --gguf PATH with --ckpt")
    try:
        if args.gguf:
            arch = export_gguf_file(args.ckpt, args.gguf, args.gguf_type, args.tokenizer, args.force)
            print(f"exported {args.ckpt} as GGUF ({arch}, {args.gguf_type}) -> {args.gguf} "
                  f"(Ollama: {Path(args.gguf).with_suffix('.Modelfile')})")
        elif args.ckpt:
            arch = export_hf(args.ckpt, args.out, args.dtype, args.tokenizer, args.force)
            print(f"exported {args.ckpt} as {arch} -> {args.out}")
        elif args.merge_lora:
            print(f"merged {args.merge_lora} -> {merge_lora_checkpoint(args.merge_lora, args.out)}")
        elif args.from_minimind:
            path = import_minimind(args.from_minimind, args.model, args.tokenizer, args.out, args.force)
            print(f"imported {args.from_minimind} as {args.model} -> {path}")
        else:
            path = import_hf(args.from_hf, args.out, args.force)
            print(f"imported {args.from_hf} -> {path}")
    except (ExportError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
