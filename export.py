"""Export a minimind checkpoint as a standard Hugging Face `transformers` model, or import one back.

    python export.py --ckpt out/tiny --out hf/tiny                 # minimind -> transformers directory
    python export.py --ckpt out/tiny --out hf/tiny --dtype bfloat16
    python export.py --from-hf hf/minimind-3 --out out/minimind-3  # transformers directory -> minimind
    python export.py --merge-lora out/sft-lora --out out/sft-merged  # LoRA adapters folded into their base

The exported directory loads with plain `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` (no trust_remote_code), and so in vllm, llama.cpp's
convert_hf_to_gguf.py and ollama. Which architecture a model becomes:

    minimind model                                   transformers architecture
    dense, no q/k-norm                               LlamaForCausalLM
    dense, q/k-norm                                  Qwen3ForCausalLM
    MoE, q/k-norm, no shared experts                 Qwen3MoeForCausalLM   norm_topk_prob = norm_topk and top_k > 1
    MoE, no q/k-norm, top_k > 1 renormalised         MixtralForCausalLM    (Mixtral always renormalises)
    shared experts; top-1 / unnormalised MoE         refused: no standard architecture computes it
      without q/k-norm

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
for fine-tuning (`train.py --init-from OUT`), sample.py and serve.py.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from checkpoint import load_checkpoint, merge_lora_checkpoint, resolve_checkpoint, save_checkpoint
from minimind import MiniMind, ModelConfig
from tokenizer import CHAT_TEMPLATE

LLAMA, QWEN3, QWEN3_MOE, MIXTRAL = "LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"
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
    if cfg.top_k > 1 and cfg.norm_topk:
        return MIXTRAL
    raise ExportError(
        f"MoE without q/k-norm and with {'top-1' if cfg.top_k == 1 else 'unnormalised top-k'} routing (weight = raw "
        "router probability) has no standard transformers architecture: Qwen3-MoE always applies q/k-norm and "
        "Mixtral always renormalises the top-k weights (a top-1 weight becomes 1.0). Train with qk_norm=True "
        "(exports as Qwen3MoeForCausalLM) or top_k > 1 with norm_topk (exports as MixtralForCausalLM).")


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
                 # minimind renormalises only for k > 1 (a renormalised top-1 weight is the constant 1)
                 norm_topk_prob=bool(cfg.norm_topk and cfg.top_k > 1),
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
    (common.load_checkpoint merges a LoRA checkpoint: base from state.json lora.base + adapters);
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


def new_output_dir(out: Path, force: bool) -> Path:
    """A temporary directory next to `out`, to be moved into place by `finish_output_dir`."""
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))


def finish_output_dir(tmp: Path, out: Path):
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
        if c.get("num_experts_per_tok", 1) == 1 and c.get("norm_topk_prob"):
            problems.append("top-1 routing with norm_topk_prob=true (every weight 1.0; minimind keeps the probability)")
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
    if arch == QWEN3_MOE:
        d.update(n_experts=c.get("num_experts") or c["num_local_experts"], top_k=c["num_experts_per_tok"],
                 ffn_dim=c["moe_intermediate_size"],
                 # k = 1 never renormalises in minimind; keep its default flag so configs round-trip
                 norm_topk=bool(c.get("norm_topk_prob", False)) or c["num_experts_per_tok"] == 1)
    if arch == MIXTRAL:
        d.update(n_experts=c.get("num_local_experts") or c["num_experts"], top_k=c["num_experts_per_tok"],
                 norm_topk=True)
        if d["top_k"] == 1:
            raise ExportError("Mixtral with top-1 routing (weight 1.0) is not representable in minimind")
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


def from_hf_weights(sd: dict, cfg: ModelConfig, arch: str) -> dict:
    """minimind state dict (without the tied lm_head) from transformers weights; every tensor must
    be used exactly once."""
    sd = dict(sd)
    if arch == QWEN3_MOE:
        unfuse_experts(sd, cfg)
    head = sd.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, sd["model.embed_tokens.weight"]):
        raise ExportError("lm_head differs from the input embedding (tie_word_embeddings=false): minimind ties them")
    out, experts = {}, {}
    for ours, theirs, e in weight_names(cfg, arch):
        if theirs not in sd:
            raise ExportError(f"missing weight {theirs}")
        t = sd.pop(theirs)
        if e is None:
            out[ours] = t
        else:
            experts.setdefault(ours, [None] * cfg.n_experts)[e] = t
    if sd:
        raise ExportError(f"unexpected weights (not part of a minimind model): {sorted(sd)[:8]}")
    for ours, ts in experts.items():
        out[ours] = torch.stack(ts)  # (E, F, D) or (E, D, F)
    return out


def import_hf(hf_dir, out, force: bool = False) -> Path:
    """Convert a transformers directory into a minimind checkpoint under run dir `out`; returns its path."""
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty (pass --force to write a checkpoint into it)")
    c = json.loads((hf_dir / "config.json").read_text())
    cfg, arch = config_from_hf(c)
    if not (hf_dir / "tokenizer.json").exists():
        raise ExportError(f"{hf_dir}: no tokenizer.json (minimind needs the fast tokenizer file)")
    model = MiniMind(cfg)
    weights = from_hf_weights(read_hf_weights(hf_dir), cfg, arch)
    weights["lm_head.weight"] = weights["embed.weight"]
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    with tempfile.TemporaryDirectory() as tok:  # only the tokenizer files travel into the checkpoint
        for name in TOKENIZER_FILES:
            if (hf_dir / name).exists():
                shutil.copy2(hf_dir / name, Path(tok) / name)
        state = {"kind": "import", "source": str(hf_dir), "architecture": arch}
        return save_checkpoint(out, 0, model, state, tokenizer_dir=tok)


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="minimind run or checkpoint directory to export")
    src.add_argument("--from-hf", help="transformers model directory to import as a minimind checkpoint")
    src.add_argument("--merge-lora", metavar="CKPT",
                     help="LoRA adapter checkpoint to fold into its base, written as a full minimind checkpoint")
    parser.add_argument("--out", required=True, help="output directory (transformers dir, or minimind run dir)")
    # export only
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPE_NAMES), help="dtype of the exported weights")
    parser.add_argument("--tokenizer", help="tokenizer directory, if the checkpoint carries none")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        if args.ckpt:
            arch = export_hf(args.ckpt, args.out, args.dtype, args.tokenizer, args.force)
            print(f"exported {args.ckpt} as {arch} -> {args.out}")
        elif args.merge_lora:
            print(f"merged {args.merge_lora} -> {merge_lora_checkpoint(args.merge_lora, args.out)}")
        else:
            path = import_hf(args.from_hf, args.out, args.force)
            print(f"imported {args.from_hf} -> {path}")
    except (ExportError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
