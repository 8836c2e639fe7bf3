"""Shared plumbing of the minimind scripts: devices and dtypes, the tokenizer and chat format,
checkpoints, and reading JSON Lines with errors that name the file and line.

Checkpoint layout (written by train.py, read by sample.py, serve.py, export.py):

    OUT/
      latest                 name of the newest complete checkpoint directory
      log.jsonl              one JSON object per training step / evaluation
      ckpt_000300/
        model.safetensors    weights (the tied embedding stored once)
        config.json          ModelConfig
        state.json           step, args, data state, kind (pretrain|sft|dpo)
        optim.pt             optimizer state (for --resume)
        tokenizer/           the tokenizer the model was trained with

A checkpoint directory is written under a temporary name and renamed when complete; `latest` is
replaced atomically afterwards, so a killed run never leaves a half-written checkpoint in use.
"""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from minimind import MiniMind, ModelConfig

# -----------------------------------------------------------------------------
# devices and dtypes

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    """'auto' = bf16 on CUDA, fp32 elsewhere (a CPU gets bf16 only when asked)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision context: autocast to `dtype` unless it is fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# peak dense bf16 matmul FLOP/s of common cards (no sparsity), for MFU
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12, "A10": 125e12}


def measure_matmul_flops(device: str, dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul on this machine: the practical peak that MFU is measured against."""
    import time
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b  # warm up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        if iters % 4 == 0:
            sync()
    sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def datasheet_flops(device: str, dtype: torch.dtype) -> Optional[float]:
    """Peak FLOP/s for MFU from the datasheet of a known GPU; None elsewhere (measure it)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops if dtype != torch.float32 else flops / 2  # tf32 on fp32
    return None


# -----------------------------------------------------------------------------
# tokenizer and chat format

BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2
# ChatML, as MiniMind-3 and Qwen use it; `render_chat` below is the same thing in Python
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


def render_chat(messages, add_generation_prompt: bool = False) -> str:
    """ChatML text of a conversation [{"role", "content"}, ...] (same as CHAT_TEMPLATE)."""
    text = "".join(f"{BOS}{m['role']}\n{m['content']}{EOS}\n" for m in messages)
    return text + (f"{BOS}assistant\n" if add_generation_prompt else "")


class Tokenizer:
    """The byte-level BPE tokenizer written by `prepare.py tokenizer` (a `tokenizers` JSON file)."""

    def __init__(self, directory):
        from tokenizers import Tokenizer as HFTokenizer
        self.dir = Path(directory)
        path = self.dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer here (make one with `python prepare.py tokenizer`)")
        self.tok = HFTokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = (self.tok.token_to_id(t) for t in SPECIAL_TOKENS)

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list:
        return self.encode(render_chat(messages, add_generation_prompt))

    def hash(self) -> str:
        import hashlib
        return hashlib.sha256((self.dir / "tokenizer.json").read_bytes()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# checkpoints

def atomic_write_text(path, text: str):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out_dir, step: int, model: MiniMind, state: dict, optimizer=None, tokenizer_dir=None,
                    keep: int = 2, weights: dict = None) -> Path:
    """Write OUT/ckpt_{step}/ atomically, point OUT/latest at it, keep the newest `keep`.
    `weights` (name -> tensor) replaces the full model weights (e.g. LoRA adapters only)."""
    from safetensors.torch import save_file, save_model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    if weights is None:
        save_model(model, str(tmp / "model.safetensors"))
    else:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "adapter.safetensors"))
    (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optim.pt")
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    final = out_dir / name
    if final.exists():  # a re-run of the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(out_dir / "latest", name + "\n")
    old = sorted(p for p in out_dir.glob("ckpt_*") if p.is_dir() and p.name != name)
    for p in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def resolve_checkpoint(path) -> Path:
    """A run directory (follows `latest`) or a checkpoint directory -> the checkpoint directory."""
    path = Path(path)
    if (path / "latest").exists():
        path = path / (path / "latest").read_text().strip()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a minimind checkpoint (no config.json, no `latest`)")
    return path


def load_checkpoint(path, device: str = "cpu", merge_lora: bool = True):
    """Load a checkpoint -> (model, state dict, checkpoint dir). The model is in eval mode.

    A LoRA checkpoint (adapter.safetensors, state["lora"]["base"] naming the base checkpoint) loads
    as base + adapters: merged into plain weights (inference, export), or with merge_lora=False
    as LoRA layers whose adapters are the only trainable parameters (resuming training)."""
    from safetensors.torch import load_file, load_model
    ckpt = resolve_checkpoint(path)
    cfg = ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").exists() else {}
    if (ckpt / "adapter.safetensors").exists():  # LoRA: base + adapters
        import lora
        spec = state.get("lora") or {}
        if not spec.get("base"):
            raise FileNotFoundError(f"{ckpt}: adapter.safetensors without state.json lora.base (the base checkpoint)")
        where = [Path(spec["base"])] + ([ckpt.parent / spec["base_rel"]] if spec.get("base_rel") else [])
        try:  # where it was when trained, else the same place relative to this run (the tree was moved)
            model, _, base = load_checkpoint(next((p for p in where if p.exists()), where[0]), "cpu", merge_lora=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{ckpt}: base checkpoint of the LoRA adapters is missing ({e})") from None
        arch = lambda c: {k: v for k, v in c.to_dict().items() if k != "aux_loss_coef"}  # a training knob
        if arch(model.config) != arch(cfg):
            raise ValueError(f"{ckpt}: config.json differs from its base checkpoint {base}")
        model.config = cfg
        lora.apply_lora(model, spec["rank"], spec["alpha"], spec["targets"])
        lora.load_lora_state_dict(model, load_file(str(ckpt / "adapter.safetensors")))
        if merge_lora:
            lora.merge_lora(model)
    elif (ckpt / "model.safetensors").exists():
        model = MiniMind(cfg)
        load_model(model, str(ckpt / "model.safetensors"), strict=True, device="cpu")
    else:
        raise FileNotFoundError(f"{ckpt}: no model.safetensors")
    return model.to(device).eval(), state, ckpt


# -----------------------------------------------------------------------------
# JSON Lines input

class DataError(ValueError):
    """A malformed input record; the message names the file and line."""


def iter_jsonl(paths, skip_bad: bool = False, bad_counter: dict = None):
    """Yield (path, line_no, obj) for every non-empty line of every file. A line that is not a JSON
    object raises DataError naming file:line, or is counted in bad_counter["bad"] with skip_bad."""
    for path in paths:
        with open(path, "r", encoding="utf-8", errors="strict") as f:
            line_no = 0
            while True:
                try:
                    line = f.readline()
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{line_no + 1}: not UTF-8 ({e})") from None
                if not line:
                    break
                line_no += 1
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                except ValueError as e:
                    if skip_bad:
                        if bad_counter is not None:
                            bad_counter["bad"] = bad_counter.get("bad", 0) + 1
                        continue
                    raise DataError(f"{path}:{line_no}: malformed JSON line ({e})") from None
                yield path, line_no, obj
