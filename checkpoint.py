"""Run directories and checkpoints: the only code that knows their layout (LoRA adapters included).

Checkpoint layout (written by train.py, read by sample.py, serve.py, export.py):

    OUT/
      latest                 name of the newest complete checkpoint directory
      log.jsonl              one JSON object per training step / evaluation
      ckpt_000300/
        model.safetensors    weights (the tied embedding stored once)
        config.json          ModelConfig
        state.json           step, args, data state, kind (pretrain|sft|dpo)
        optim.pt             optimizer state (for --resume)
        optim/               or: the optimizer state sharded by torch.distributed.checkpoint
                             (an FSDP run's: each process wrote its shard; loads at any world size)
        tokenizer/           the tokenizer the model was trained with

A checkpoint directory is written under a temporary name (.ckpt_*), fsynced, and renamed when
complete; `latest` is replaced atomically afterwards, so a killed run never leaves a half-written
checkpoint in use. state.json records the SHA-256 of the weights, config, optimizer state and tokenizer
files, required and checked on every load with the rest of state.json (check_state): a corrupted,
edited or unlisted file is named, and `--resume` falls back to the newest intact checkpoint.
"""
import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
import sys
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule

import lora
import mmkernels
from minimind import MiniMind, ModelConfig
from runtime import pick_device, pick_dtype, publish_modes, share_cpu
from tokenizer import Tokenizer

DEFAULT_CONTEXT = 2048

# checkpoints

class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be used; the message names the file."""


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path):
    """Flush every file under root and the directories themselves to disk."""
    for d, _, files in os.walk(root):
        for name in files:
            with open(Path(d) / name, "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(d))


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _disk_full_is_one_line(where: Path):
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"{where}: disk full while writing (free some space, then --resume)") from None
        raise


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path, data: bytes):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with _disk_full_is_one_line(path):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)


HASHED = ("model.safetensors", "adapter.safetensors", "config.json", "optim.pt")  # what state.json vouches for,
TOKENIZER = "tokenizer"  # with every file of the tokenizer directory
OPTIM_DIR = "optim"  # with every file of the sharded optimizer state (FSDP runs)
MAX_STATE_BYTES = 16 << 20  # state.json holds flags, data meta and hashes: kilobytes


def hashed_files(ckpt: Path) -> list:
    """The files of a checkpoint directory that state.json must list: the HASHED ones present and
    every file of tokenizer/ (as "tokenizer/NAME"; a tokenizer directory is flat)."""
    listed = [f for f in HASHED if (ckpt / f).is_file()]
    for folder in (TOKENIZER, OPTIM_DIR):  # both flat
        d = ckpt / folder
        listed += sorted(f"{folder}/{p.name}" for p in (d.iterdir() if d.is_dir() else ()) if not p.is_dir())
    return listed


def clean_stale(out_dir) -> list:
    """Remove the temporary checkpoint directories (.ckpt_*) that a killed save left behind."""
    stale = [p for p in Path(out_dir).glob(".ckpt_*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


RUN_FILES = ("latest", "log.jsonl", "loss.png")  # what a run directory holds besides ckpt_* (train.py wrote them)
RUN_DIRS = ("tensorboard", "wandb", "swanlog")  # what tracking.py's trackers write there


def prepare_run_dir(out: Path, resume: bool, force: bool) -> list:
    """A fresh run refuses an --out that holds a run (unless --force, which deletes only what
    train.py wrote there); every run removes the temporaries a killed save left (-> those removed)."""
    if not resume and (checkpoint_dirs(out) or any((out / f).exists() for f in RUN_FILES)):
        if not force:
            raise CheckpointError(f"{out} holds a run already: --resume to continue it, --force to start over "
                                  "(deletes its checkpoints and log), or another --out")
        for p in checkpoint_dirs(out) + [out / d for d in RUN_DIRS if (out / d).is_dir()]:
            shutil.rmtree(p)
        for f in RUN_FILES:
            (out / f).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{out}: cannot create the run directory ({e.strerror})") from None
    return clean_stale(out)


def checkpoint_dirs(out_dir) -> list:
    """The complete checkpoint directories of a run, oldest step first."""
    return sorted((p for p in Path(out_dir).glob("ckpt_*") if p.is_dir() and p.name[5:].isdigit()),
                  key=lambda p: int(p.name[5:]))


def save_checkpoint(out_dir, step: int, model: MiniMind, state: dict, optimizer=None, tokenizer_dir=None,
                    keep: int = 2, weights: dict = None, optimizer_dir: Optional[Path] = None) -> Path:
    """Write OUT/ckpt_{step}/ atomically, point OUT/latest at it, keep the newest `keep`.
    `weights` (name -> tensor) replaces the full model weights (e.g. LoRA adapters only);
    `optimizer_dir` (save_sharded_optimizer's) is moved in as optim/ instead of optim.pt.
    Every file is fsynced before the rename; state.json records each file's SHA-256."""
    out_dir = Path(out_dir)
    name = f"ckpt_{step:06d}"
    with _disk_full_is_one_line(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
        try:
            if weights is None:
                save_model(model, str(tmp / "model.safetensors"))
            else:
                save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()},
                          str(tmp / "adapter.safetensors"))
            (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
            if optimizer_dir is not None:
                os.replace(optimizer_dir, tmp / OPTIM_DIR)
            elif optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optim.pt")
            if tokenizer_dir is not None:
                shutil.copytree(tokenizer_dir, tmp / TOKENIZER)
            hashes = {f: file_hash(tmp / f) for f in hashed_files(tmp)}
            state = {k: v for k, v in state.items() if k not in ("step", "files")}  # (a loaded state's, replaced)
            (tmp / "state.json").write_text(json.dumps({"step": step, **state, "files": hashes}, indent=2))
            publish_modes(tmp)
            _fsync_tree(tmp)
            final = out_dir / name
            if final.exists():  # a re-run of the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(out_dir)
    atomic_write_text(out_dir / "latest", name + "\n")
    older = [p for p in checkpoint_dirs(out_dir) if int(p.name[5:]) < step]
    for p in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_UNVERIFIED_TOKENIZERS = set()  # checkpoints already reported as saved before tokenizer hashes


def check_state(state, ckpt: Path) -> dict:
    """state.json's fields, checked before anything uses them: a whole step >= 0 (the step of the
    directory's name), the SHA-256 of every file hashed_files lists and of nothing else, and the
    types of args, data, kind and lora. CheckpointError naming state.json and the field."""
    where = ckpt / "state.json"
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    step = state.get("step")
    if type(step) is not int or step < 0:
        raise CheckpointError(f"{where}: \"step\" must be a whole number >= 0, not {_short(step)}")
    if ckpt.name.startswith("ckpt_") and ckpt.name[5:].isdigit() and int(ckpt.name[5:]) != step:
        raise CheckpointError(f"{where}: \"step\" {step} is not the step of its directory {ckpt.name}")
    for key, kind in (("args", dict), ("data", dict), ("kind", str), ("lora", dict)):
        if key in state and not isinstance(state[key], kind):
            raise CheckpointError(f"{where}: \"{key}\" must be a JSON {'object' if kind is dict else 'string'}")
    lora_spec = state.get("lora")
    if lora_spec is not None and not (type(lora_spec.get("rank")) is int and lora_spec["rank"] > 0
                                      and isinstance(lora_spec.get("alpha"), (int, float))
                                      and isinstance(lora_spec.get("base"), str)
                                      and isinstance(lora_spec.get("targets"), list)):
        raise CheckpointError(f"{where}: \"lora\" needs rank (> 0), alpha, targets and base")
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{where}: no \"files\" (the SHA-256 of the checkpoint's files): it cannot be "
                              "verified (edited, or saved before hashes were recorded)")
    for name, digest in files.items():
        parts = name.split("/")
        if name not in HASHED and not (len(parts) == 2 and parts[0] in (TOKENIZER, OPTIM_DIR)
                                       and parts[1] not in ("", ".", "..")):
            raise CheckpointError(f"{where}: \"files\": {_short(name)} is not a file of a checkpoint")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise CheckpointError(f"{where}: \"files\": {_short(name)} has no SHA-256")
    unlisted = [f for f in hashed_files(ckpt) if f not in files]
    legacy = not any(f.startswith(TOKENIZER + "/") for f in files)  # saved before tokenizer files were hashed
    if unlisted and legacy and all(f.startswith(TOKENIZER + "/") for f in unlisted):
        if ckpt not in _UNVERIFIED_TOKENIZERS:  # the weights are still verified; say once what is not
            _UNVERIFIED_TOKENIZERS.add(ckpt)
            print(f"[{ckpt}: saved by an earlier minimind, its tokenizer/ has no hashes and is not verified]",
                  file=sys.stderr)
    elif unlisted:
        raise CheckpointError(f"{ckpt / unlisted[0]}: not listed in state.json \"files\" (added or edited)")
    weights = [f for f in ("model.safetensors", "adapter.safetensors") if f in files]
    if "config.json" not in files or not weights:
        raise CheckpointError(f"{where}: \"files\" must list config.json and the weights")
    return state


def read_state(ckpt: Path) -> dict:
    """state.json of a checkpoint directory, its fields checked (check_state); the hashes not compared."""
    path = ckpt / "state.json"
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise CheckpointError(f"{path}: over {MAX_STATE_BYTES >> 20} MiB, not a state.json")
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError, RecursionError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable ({_short(str(e))})") from None
    return check_state(state, ckpt)


def verify_checkpoint(ckpt: Path, optimizer: bool = False) -> dict:
    """state.json of a checkpoint directory whose fields are valid (check_state) and whose files match
    the hashes it records; CheckpointError naming the file. With `optimizer` (resuming), optim.pt must
    also unpickle as plain tensors and containers (read memory-mapped: cheap)."""
    state = read_state(ckpt)
    for name, digest in state["files"].items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (state.json lists it)")
        if file_hash(path) != digest:
            raise CheckpointError(f"{path}: content does not match the hash in state.json (corrupted or modified)")
    if optimizer and "optim.pt" in state["files"]:
        load_optimizer_state(ckpt, "cpu", mmap=True)
    return state


def load_optimizer_state(ckpt: Path, device, mmap: bool = False) -> dict:
    """optim.pt of a checkpoint, unpickled with weights_only (tensors and plain containers, nothing that
    runs code); anything else is a CheckpointError naming the file."""
    path = Path(ckpt) / "optim.pt"
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # pickle's UnpicklingError, torch's zip errors, a RuntimeError: many lines each
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: not an optimizer state that loads safely "
                              f"({_short(first[0]) if first else type(e).__name__})") from None


def resolve_checkpoint(path, fallback: bool = False) -> Path:
    """A run directory (follows `latest`) or a checkpoint directory -> the checkpoint directory.
    With `fallback`, a run whose `latest` is missing or fails verification gives its newest intact
    checkpoint instead, saying so on stderr."""
    path = Path(path)
    if (path / "config.json").exists():
        read_state(path)
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    latest = path / "latest"
    named = path / latest.read_text().strip() if latest.exists() else None
    candidates = checkpoint_dirs(path)
    if named is None and not candidates:
        raise FileNotFoundError(f"{path}: not a minimind checkpoint (no config.json, no `latest`)")
    if not fallback and named is not None and (named / "config.json").exists():
        read_state(named)
        return named
    problems = []
    for ckpt in ([named] if named is not None else []) + candidates[::-1]:
        try:
            if not (ckpt / "config.json").exists():
                raise CheckpointError(f"{ckpt}: missing or incomplete")
            verify_checkpoint(ckpt, optimizer=True)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            print(f"warning: {problems[0]}; using {ckpt.name}, the newest intact checkpoint", file=sys.stderr)
        return ckpt
    raise CheckpointError(f"{path}: no intact checkpoint" + (f" ({problems[0]})" if problems else ""))


def _read_config(ckpt: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    except (ValueError, TypeError, AssertionError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: not a valid model config ({e})") from None


def _load_weights(model, path: Path, load):
    """safetensors' loader with its failures (truncated file, another model's shapes) as one line."""
    try:
        load(model, path)
    except Exception as e:  # safetensors raises its own SafetensorError, torch a RuntimeError
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: cannot be loaded into the model of config.json "
                              f"({first[0][:300] if first else type(e).__name__})") from None


def load_checkpoint(path, device: str = "cpu", merge_lora: bool = True):
    """Load a checkpoint -> (model, state dict, checkpoint dir). The model is in eval mode.

    A LoRA checkpoint (adapter.safetensors, state["lora"]["base"] naming the base checkpoint) loads
    as base + adapters: merged into plain weights (inference, export), or with merge_lora=False
    as LoRA layers whose adapters are the only trainable parameters (resuming training)."""
    ckpt = resolve_checkpoint(path)
    state = verify_checkpoint(ckpt)
    cfg = _read_config(ckpt)
    if (ckpt / "adapter.safetensors").exists():  # LoRA: base + adapters
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
        _load_weights(model, ckpt / "adapter.safetensors", lambda m, p: lora.load_lora_state_dict(m, load_file(str(p))))
        if merge_lora:
            lora.merge_lora(model)
    elif (ckpt / "model.safetensors").exists():
        model = MiniMind(cfg)
        _load_weights(model, ckpt / "model.safetensors", lambda m, p: load_model(m, str(p), strict=True, device="cpu"))
    else:
        raise FileNotFoundError(f"{ckpt}: no model.safetensors")
    return model.to(device).eval(), state, ckpt


def reload_into(model, optimizer, ckpt: Path, device) -> None:
    """Load a checkpoint of this run (resolve_checkpoint with fallback: verified) back into the live
    model (its adapters only when it holds adapter.safetensors; FSDP: sharded as it is) and optimizer,
    in place: a run going back to its last good state."""
    if (ckpt / "adapter.safetensors").exists():
        _load_weights(model, ckpt / "adapter.safetensors", lambda m, p: lora.load_lora_state_dict(m, load_file(str(p))))
    elif isinstance(model, FSDPModule):  # the full weights into a plain copy, then sharded into the live model
        plain = MiniMind(model.config)
        _load_weights(plain, ckpt / "model.safetensors", lambda m, p: load_model(m, str(p), strict=True))
        set_model_state_dict(model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
    else:
        _load_weights(model, ckpt / "model.safetensors", lambda m, p: load_model(m, str(p), strict=True, device=device))
    load_optimizer_into(model, optimizer, ckpt, device)


# -----------------------------------------------------------------------------
# FSDP: full weights gathered for the checkpoint, the optimizer state sharded (DCP)

def gather_model(model, master: bool) -> Optional[MiniMind]:
    """Every process calls it: an FSDP model's full weights, as a plain CPU MiniMind on the master
    (None elsewhere), what save_checkpoint writes as model.safetensors (sample, serve, export read it)."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not master:
        return None
    plain = MiniMind(model.config)
    plain.load_state_dict(weights)  # (the tied head: the embedding's tensor, given twice)
    return plain


def save_sharded_optimizer(model, optimizer, staging: Path):
    """Every process calls it: each writes its shard of the optimizer state into `staging`
    (torch.distributed.checkpoint), which save_checkpoint(optimizer_dir=) then moves into place."""
    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=str(staging))


def load_optimizer_into(model, optimizer, ckpt: Path, device) -> None:
    """A checkpoint's optimizer state into this run's optimizer: optim.pt, or optim/ (sharded,
    resharded to this run's processes whatever their number, one process without torchrun too)."""
    if not (ckpt / OPTIM_DIR).is_dir():
        optimizer.load_state_dict(load_optimizer_state(ckpt, device))
        return
    state = get_optimizer_state_dict(model, optimizer)  # the layout to fill (this initializes the state)
    try:
        dcp.load(state, checkpoint_id=str(ckpt / OPTIM_DIR))
    except Exception as e:  # DCP's CheckpointException lists every rank's traceback
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{ckpt / OPTIM_DIR}: the sharded optimizer state does not load "
                              f"({_short(first[0]) if first else type(e).__name__})") from None
    set_optimizer_state_dict(model, optimizer, state)


def merge_lora_checkpoint(ckpt, out) -> Path:
    """Write an adapter checkpoint's base + adapters as a full checkpoint (model.safetensors) in run
    directory `out`; state.json records where the adapters came from."""
    model, state, ckpt = load_checkpoint(ckpt, merge_lora=True)
    if "lora" not in state:
        raise ValueError(f"{ckpt}: not a LoRA checkpoint (no adapter.safetensors)")
    merged_from = {"adapter": str(ckpt.resolve()), **state["lora"]}
    rest = {k: v for k, v in state.items() if k not in ("step", "lora")}
    tok = ckpt / "tokenizer"
    return save_checkpoint(out, state.get("step", 0), model, {**rest, "merged_from": merged_from},
                           tokenizer_dir=tok if tok.exists() else None)


# MiniMind's inference_rope_scaling: YaRN with these settings (its attention factor is 1.0, not YaRN's
# 0.1 ln(factor) + 1); --rope-scaling's keys override them, `original` is short for the long name
YARN_DEFAULTS = {"factor": 16.0, "original_max_position_embeddings": 2048, "beta_fast": 32.0, "beta_slow": 1.0,
                 "attention_factor": 1.0}
ROPE_SCALING_HELP = ("YaRN RoPE scaling at inference, for contexts beyond the trained one: 'yarn' (factor 16, as "
                     "MiniMind's inference_rope_scaling), 'yarn:4' (factor 4), or KEY=VALUE,... over those defaults "
                     "(factor, original, beta_fast, beta_slow, attention_factor), e.g. 'factor=4,original=2048'; "
                     "original defaults to the checkpoint's training seq_len (2048 when unknown); 'none' removes "
                     "the checkpoint's own scaling. --context then defaults to factor x original")


def parse_rope_scaling(spec: str, trained_len: Optional[int] = None) -> Optional[dict]:
    """ModelConfig.rope_scaling from a --rope-scaling value (see ROPE_SCALING_HELP); None for 'none'."""
    text = spec.strip()
    if text == "none":
        return None
    scaling = {"type": "yarn", **YARN_DEFAULTS}
    if trained_len:
        scaling["original_max_position_embeddings"] = int(trained_len)
    body = text[len("yarn"):].removeprefix(":") if text.startswith("yarn") else text
    try:
        if body and "=" not in body:
            scaling["factor"] = float(body)
        for item in filter(None, body.split(",") if "=" in body else []):
            key, value = (part.strip() for part in item.split("=", 1))
            key = "original_max_position_embeddings" if key == "original" else key
            if key not in YARN_DEFAULTS:
                raise ValueError(f"unknown key {key!r}")
            scaling[key] = int(value) if key == "original_max_position_embeddings" else float(value)
    except ValueError as e:
        raise ValueError(f"--rope-scaling {spec!r}: {e} (expected yarn, yarn:FACTOR or KEY=VALUE,... with keys "
                         f"factor, original, beta_fast, beta_slow, attention_factor; or none)") from None
    if scaling["factor"] < 1 or scaling["original_max_position_embeddings"] < 1:
        raise ValueError(f"--rope-scaling {spec!r}: factor and original must be >= 1")
    return scaling


def load_for_inference(ckpt, device: str = "auto", dtype: str = "auto", kernel_backend: Optional[str] = None,
         context: int = 0, rope_scaling: Optional[str] = None):
    """(model, tokenizer, device, context) ready for inference. `kernel_backend` goes to
    mmkernels.set_backend; `rope_scaling` (a --rope-scaling value) replaces the RoPE scaling of the
    config. The context window is `context`, else factor x original positions with RoPE scaling, else
    the sequence length the checkpoint was trained at (state.json args.seq_len), else
    DEFAULT_CONTEXT; never beyond config.max_seq_len."""
    if kernel_backend:
        mmkernels.set_backend(kernel_backend)
    device = pick_device(device)
    model, state, path = load_checkpoint(ckpt, device)
    trained_len = (state.get("args") or {}).get("seq_len")
    cfg = model.config
    if rope_scaling is not None:
        cfg.rope_scaling = parse_rope_scaling(rope_scaling, trained_len)
        model._grow_rope(model.rope_len)  # the RoPE tables follow the config
    tok = Tokenizer(path / "tokenizer")
    model.to(pick_dtype(dtype, device))
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{ckpt}: tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    scaled_len = cfg.rope_scaling and int(cfg.rope_scaling["factor"] * cfg.rope_scaling["original_max_position_embeddings"])
    context = context or scaled_len or trained_len or DEFAULT_CONTEXT
    return model, tok, device, min(int(context), cfg.max_seq_len)


def whole_number(text: str) -> int:
    """argparse type: an int >= 0 (argparse says "invalid whole_number value: '-1'" otherwise)."""
    if not text.strip().isdigit():
        raise ValueError(text)
    return int(text)


def add_device_args(p):
    """--device, --dtype, --threads: where inference runs (sample.py, serve.py, eval.py)."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--threads", type=whole_number, default=0,
                   help="CPU threads for torch (0: as many as the other processes leave idle, re-chosen every "
                        "second; OMP_NUM_THREADS fixes it too)")


def add_model_args(p):
    """The flags that choose and place the model for inference, on an argparse parser of sample.py or
    serve.py (the scripts own their parsers; this only adds the shared flags)."""
    p.add_argument("--ckpt", default=None,
                   help="run directory (follows `latest`) or checkpoint directory (default: the newest run under out/)")
    p.add_argument("--context", type=int, default=0,
                   help="context window in tokens (0: factor x original with --rope-scaling, else the training "
                        "seq_len of the checkpoint, else 2048)")
    add_device_args(p)
    p.add_argument("--kernels", default=None, choices=mmkernels.BACKENDS,
                   help="kernel implementation (mmkernels.set_backend); default: MINIMIND_KERNELS or auto")
    p.add_argument("--rope-scaling", default=None, metavar="SPEC", help=ROPE_SCALING_HELP)


CHAT_KINDS = ("sft", "dpo", "grpo", "ppo", "distill")  # training stages whose models answer in the chat template


def trained_kind(path) -> str:
    """What trained a checkpoint (state.json kind: pretrain, sft, dpo, import, ...); "" if unknown."""
    try:
        ckpt = resolve_checkpoint(path)
        return json.loads((ckpt / "state.json").read_text()).get("kind", "")
    except (OSError, ValueError):
        return ""


def stage_runs(mode: str) -> list:
    """The run directories a stage wrote with its default --out: out/MODE, out/MODE-2, out/MODE-3, ..."""
    runs = [p for p in Path("out").glob(f"{mode}*") if p.name == mode or
            (p.name[len(mode):len(mode) + 1] == "-" and p.name[len(mode) + 1:].isdigit())]
    return sorted((p for p in runs if (p / "latest").exists() or checkpoint_dirs(p) or (p / "log.jsonl").exists()),
                  key=lambda p: run_number(p, mode))


def run_number(run: Path, mode: str) -> int:
    """out/MODE is run 1, out/MODE-N is run N."""
    return int(run.name[len(mode) + 1:]) if run.name != mode else 1


def newest_run(runs=None) -> Optional[Path]:
    """Of these run directories (default: every run under out/), the one whose latest checkpoint was
    written last; None if none has a checkpoint."""
    if runs is None:
        runs = [p.parent for p in Path("out").glob("*/latest")] if Path("out").is_dir() else []
    runs = [Path(p) for p in runs if (Path(p) / "latest").exists()]
    return max(runs, key=lambda p: (p / "latest").stat().st_mtime, default=None)


def run_or_newest(ckpt) -> Path:
    """--ckpt, or without it the newest run under out/ (and said so); none: exit with the command that makes one."""
    if ckpt is not None:
        return ckpt
    ckpt = newest_run()
    if ckpt is None:
        sys.exit("error: no --ckpt given and no run under out/ (train one: `python train.py --mode=pretrain`)")
    print(f"[using {ckpt}, the newest run under out/; --ckpt to choose another]", file=sys.stderr)
    return ckpt


def load_or_exit(ckpt, device: str = "auto", dtype: str = "auto", kernel_backend: Optional[str] = None,
                 context: int = 0, rope_scaling: Optional[str] = None, threads: int = 0):
    """load_for_inference() for a script, from add_model_args' flags: `threads` sets the process's CPU
    thread policy (runtime.share_cpu); no `ckpt`: the newest run (run_or_newest); a missing or broken
    checkpoint exits with its message."""
    share_cpu(threads)
    ckpt = run_or_newest(ckpt)
    try:
        return load_for_inference(ckpt, device, dtype, kernel_backend, context, rope_scaling)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


# -----------------------------------------------------------------------------
# training log

def _log_step(line: str):
    """The step of a log.jsonl line, or None for a line that is not a record with a whole step."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if type(step) is int else None


class Log:
    """OUT/log.jsonl, one JSON object a line; on resume, lines past the checkpoint are dropped."""

    def __init__(self, out_dir: Path, resume_step: int = None, enabled: bool = True):
        self.path = out_dir / "log.jsonl"
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            lines = [(l, _log_step(l)) for l in self.path.read_text(errors="replace").splitlines() if l.strip()]
            kept = [l for l, step in lines if step is not None and step <= resume_step]
            torn = sum(step is None for _, step in lines)
            if torn:  # a run killed mid-write leaves its last line torn
                print(f"[{self.path}: {torn} unreadable line(s) dropped]", file=sys.stderr)
            atomic_write_text(self.path, "".join(l + "\n" for l in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def plot_log(out_dir):
    """OUT/loss.png: loss and val_loss against step (needs matplotlib; skipped without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out_dir = Path(out_dir)
    rows = [json.loads(l) for l in (out_dir / "log.jsonl").read_text().splitlines() if l.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "val_loss"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key, marker="o" if key == "val_loss" else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(out_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
