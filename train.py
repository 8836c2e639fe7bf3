"""Train a minimind model: one loop for every stage.

    python train.py --mode=pretrain --model=tiny --data=data/default --out=out/tiny
    torchrun --standalone --nproc_per_node=8 train.py --mode=pretrain --model=minimind-3 --data=... --out=...
    python train.py --mode=pretrain --out=out/tiny --resume          # continue after a crash / kill -9
    python train.py --mode=sft --init-from=out/tiny --data=data/sft --out=out/sft --seq-len=512
    python train.py --mode=dpo --init-from=out/sft --data=data/dpo --out=out/dpo --seq-len=1024
    python train.py --mode=sft --init-from=out/tiny --data=data/sft --out=out/sft-lora --lora-rank=8  # adapters only

SFT and DPO rows pack whole conversations (DPO: prompt + chosen and prompt + rejected of a pair)
with positions restarting and attention confined to each; the loss covers the assistant replies.

Per step it prints loss, lr, tokens/s, MFU and ETA, and appends to OUT/log.jsonl (training steps
with "step" and "loss", evaluations with "step" and "val_loss"); OUT/loss.png plots them.
Checkpoints go to OUT/ckpt_XXXXXX/ atomically (see common.py). On CPU, a resumed run is
bit-identical to an uninterrupted one: every batch is a pure function of (seed, step, index).
"""
import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels
import lora
from common import (autocast, atomic_write_text, datasheet_flops, load_checkpoint, measure_matmul_flops, pick_device,
                    pick_dtype, resolve_checkpoint, save_checkpoint)
from minimind import PRESETS, MiniMind, ModelConfig


# -----------------------------------------------------------------------------
# data: every batch is a pure function of (seed, step, global micro-batch index)

def batch_generator(seed: int, step: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + index)


def read_meta(data_dir: Path, kind: str) -> dict:
    """meta.json of a directory written by `prepare.py KIND`, or a clear error."""
    meta_path = data_dir / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: not a prepared data directory (run `python prepare.py {kind}`)")
    return json.loads(meta_path.read_text())


class PretrainData:
    """Random windows of seq_len + 1 tokens from memmapped uint16 files (documents back to back)."""

    def __init__(self, data_dir, seq_len: int, seed: int):
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir, "pretrain")
        self.seq_len, self.seed = seq_len, seed
        self.splits = {}
        for split in ("train", "val"):
            path = self.dir / f"{split}.bin"
            n = os.path.getsize(path) // 2
            if n <= seq_len + 1:
                raise ValueError(f"{path}: {n} tokens, fewer than one window of {seq_len + 1}")
            self.splits[split] = np.memmap(path, dtype=np.uint16, mode="r", shape=(n,))

    def batch(self, split: str, step: int, index: int, batch_size: int, device: str) -> dict:
        data = self.splits[split]
        g = batch_generator(self.seed + (split == "val"), step, index)
        starts = torch.randint(0, len(data) - self.seq_len - 1, (batch_size,), generator=g).tolist()
        rows = np.stack([data[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(rows)
        if device.startswith("cuda"):
            t = t.pin_memory().to(device, non_blocking=True)
        return {"idx": t[:, :-1], "targets": t[:, 1:]}


# packed chat data (sft, dpo): whole conversations / preference pairs in rows of seq_len tokens

def pack_rows(lengths, capacity: int) -> list:
    """Best-fit decreasing bin packing: lists of item indices whose lengths sum to <= capacity.
    A function of the lengths only (ties broken by index), so every process builds the same plan."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    rows = []
    open_rows = [[] for _ in range(capacity + 1)]  # room left -> rows with exactly that much room
    has_room = np.zeros(capacity + 1, dtype=bool)
    for i in order:
        n = int(lengths[i])
        j = n + int(has_room[n:].argmax())  # the tightest row the item fits in, if any
        if has_room[j]:
            row = open_rows[j].pop()
            has_room[j] = bool(open_rows[j])
            rows[row].append(int(i))
            room = j - n
        else:
            row, room = len(rows), capacity - n
            rows.append([int(i)])
        if room > 0:
            open_rows[room].append(row)
            has_room[room] = True
    return rows


class PackedData:
    """Items (conversations, or preference pairs) packed whole into rows of seq_len tokens, from the
    files of `prepare.py sft|dpo`. Every item is one or more documents: positions restart at 0 and
    attention stays inside a document (`doc` ids), so the items of a row never see each other and
    padding is only the unfilled tail of a row. Targets are the next token where its mask is 1.

    The row plan (pack_rows) is fixed; each epoch visits the train rows in a seeded order and
    micro-batch `index` of `step` takes the next batch_size rows of that stream: every batch is a
    pure function of (seed, step, index). Validation rows are read in plan order."""

    kind = None
    micro_batches = 1  # micro-batches per optimizer step, over all processes (main sets it)

    def __init__(self, data_dir, seq_len: int, seed: int):
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir, self.kind)
        if self.meta.get("kind") != self.kind:
            raise ValueError(f"{self.dir} holds {self.meta.get('kind')} data; --mode={self.kind} needs the output "
                             f"of `prepare.py {self.kind}`")
        self.seq_len, self.seed = seq_len, seed
        self.splits, self.stats, self._perms = {}, {}, {}
        for split in ("train", "val"):
            index = np.fromfile(self.dir / f"{split}.idx", dtype=np.int64)
            if self.n_records(index) == 0:
                raise ValueError(f"{self.dir}: no {split} records (prepare with --val-fraction > 0 for a val split)")
            tokens = np.memmap(self.dir / f"{split}.bin", dtype=np.uint16, mode="r")
            mask = np.memmap(self.dir / f"{split}.mask", dtype=np.uint8, mode="r")
            items, lengths, truncated = self.fit_items(index, mask)
            if not items:
                raise ValueError(f"{self.dir}: no {split} records fit rows of --seq-len {seq_len}")
            rows = pack_rows(lengths, seq_len)
            self.splits[split] = (tokens, mask, items, rows)
            self.stats[split] = {"items": len(items), "rows": len(rows), "truncated": truncated,
                                 "dropped": self.n_records(index) - len(items),
                                 "padding": 1 - sum(lengths) / (len(rows) * seq_len)}

    def describe(self) -> str:
        s = self.stats["train"]
        return (f"{self.kind} data: {s['items']:,} train items packed into {s['rows']:,} rows of {self.seq_len} "
                f"({100 * s['padding']:.1f}% padding); {s['truncated']:,} cut to fit, {s['dropped']:,} of them "
                f"dropped (nothing left to train on); {self.stats['val']['items']:,} val items")

    def n_records(self, index) -> int:
        raise NotImplementedError

    def fit_items(self, index, mask):
        """-> (items, their lengths in a row, number cut to fit); items are what `documents` reads."""
        raise NotImplementedError

    def documents(self, tokens, mask, item):
        """-> [(token ids, mask)] of one item, each a document of its own."""
        raise NotImplementedError

    def row_ids(self, split: str, step: int, index: int, batch_size: int) -> list:
        n_rows = len(self.splits[split][3])
        if split != "train":
            return [(index * batch_size + j) % n_rows for j in range(batch_size)]
        first = ((step - 1) * self.micro_batches + index) * batch_size  # position in the stream of rows
        out = []
        for g in range(first, first + batch_size):
            epoch, r = divmod(g, n_rows)
            if epoch not in self._perms:
                self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n_rows),
                               **{e: p for e, p in self._perms.items() if e == epoch - 1}}
            out.append(int(self._perms[epoch][r]))
        return out

    def batch(self, split: str, step: int, index: int, batch_size: int, device: str) -> dict:
        tokens, mask, items, rows = self.splits[split]
        B, T = batch_size, self.seq_len
        idx = np.full((B, T), self.meta["pad_id"], dtype=np.int64)
        targets = np.full((B, T), -1, dtype=np.int64)
        pos = np.zeros((B, T), dtype=np.int64)
        doc = np.zeros((B, T), dtype=np.int64)
        seq = np.full((B, T), -1, dtype=np.int64)  # which document of the micro-batch a target belongs to
        n_seqs = 0
        for b, row in enumerate(self.row_ids(split, step, index, batch_size)):
            t, d = 0, 0
            for i in rows[row]:
                for ids, m in self.documents(tokens, mask, items[i]):
                    n = len(ids)
                    idx[b, t:t + n] = ids
                    targets[b, t:t + n - 1] = np.where(m[1:] == 1, ids[1:], -1)  # last token: nothing to predict
                    pos[b, t:t + n] = np.arange(n)
                    doc[b, t:t + n] = d
                    seq[b, t:t + n - 1] = n_seqs
                    t, d, n_seqs = t + n, d + 1, n_seqs + 1
            pos[b, t:] = np.arange(T - t)  # padding tail: a document of its own, no targets
            doc[b, t:] = d
        out = {"idx": idx, "targets": targets, "pos": pos, "doc": doc, "seq": seq}
        out = {k: torch.from_numpy(v) for k, v in out.items()}
        if device.startswith("cuda"):
            out = {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
        out["n_seqs"] = n_seqs
        return out


class SFTData(PackedData):
    """Conversations; one longer than seq_len keeps its first seq_len tokens (dropped if that
    leaves nothing to train on)."""

    kind = "sft"

    def n_records(self, offsets) -> int:
        return len(offsets) - 1

    def fit_items(self, offsets, mask):
        starts, lengths = offsets[:-1], np.diff(offsets)
        fitted = np.minimum(lengths, self.seq_len)
        over = np.flatnonzero(lengths > self.seq_len)
        # a cut conversation must keep a target: a mask-1 token after its first
        empty = {int(k) for k in over if not mask[starts[k] + 1:starts[k] + fitted[k]].any()}
        keep = [k for k in range(len(starts)) if k not in empty]
        return [(int(starts[k]), int(fitted[k])) for k in keep], [int(fitted[k]) for k in keep], len(over)

    def documents(self, tokens, mask, item):
        s, n = item
        return [(tokens[s:s + n].astype(np.int64), mask[s:s + n])]


class DPOData(PackedData):
    """Preference pairs: prompt + chosen and prompt + rejected, two documents in the same row. A
    pair longer than seq_len has its completions cut (dropped if one loses all its targets)."""

    kind = "dpo"

    def n_records(self, index) -> int:
        return len(index) // 4

    def fit_items(self, index, mask):
        items, lengths, truncated = [], [], 0
        for s, p, c, r in index.reshape(-1, 4).tolist():
            room = self.seq_len - 2 * p  # for the two completions
            if c + r > room:
                truncated += 1
                c2 = min(c, max(room // 2, room - r))
                r2 = min(r, room - c2)
                if c2 < 1 or r2 < 1 or not mask[s + p:s + p + c2].any() or not mask[s + p + c:s + p + c + r2].any():
                    continue
                c, r, full_c = c2, r2, c
            else:
                full_c = c
            items.append((s, p, c, r, full_c))
            lengths.append(2 * p + c + r)
        return items, lengths, truncated

    def documents(self, tokens, mask, item):
        s, p, c, r, full_c = item
        chosen = np.arange(s, s + p + c)
        rejected = np.concatenate([np.arange(s, s + p), np.arange(s + p + full_c, s + p + full_c + r)])
        return [(tokens[chosen].astype(np.int64), mask[chosen]), (tokens[rejected].astype(np.int64), mask[rejected])]


def lm_loss(model, batch: dict):
    """Next-token cross-entropy (plus the MoE balance loss): (loss, extra metrics)."""
    _, loss = model(batch["idx"], batch["targets"], pos=batch.get("pos"), doc=batch.get("doc"))
    return loss, {}


def sequence_logprobs(model, batch: dict):
    """Summed log-probability of the target tokens of every document of a packed batch, and how
    many targets each has: (S,), (S,) for the S = batch["n_seqs"] documents."""
    logits, _ = model(batch["idx"], pos=batch["pos"], doc=batch["doc"])  # (B, T, V)
    targets = batch["targets"].reshape(-1)  # (B*T,)
    logp = -F.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=-1, reduction="none")  # (B*T,)
    S = batch["n_seqs"]
    slot = batch["seq"].reshape(-1)
    slot = torch.where(slot < 0, S, slot)  # padding -> a spare slot S, dropped below (no host sync)
    sums = torch.zeros(S + 1, device=logp.device).index_add_(0, slot, logp)[:S]
    counts = torch.zeros(S + 1, device=logp.device).index_add_(0, slot, (targets >= 0).float())[:S]
    return sums, counts


def make_dpo_loss(model, args):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * [(log pi(c) - log pi(r)) - (log ref(c) - log ref(r))]),
    log-probabilities summed over the completion tokens (--dpo-length-norm: averaged), mean over pairs.
    The reference is the starting model, frozen: with LoRA the same model with its adapters switched
    off, otherwise a copy. Documents of a DPO batch alternate chosen, rejected (DPOData). A MoE
    policy adds its load-balance loss, as in lm_loss."""
    if lora.lora_modules(model):
        reference, ref_mode = model, lambda: lora.lora_disabled(model)
    else:
        reference, ref_mode = copy.deepcopy(model).eval().requires_grad_(False), contextlib.nullcontext

    def dpo_loss(policy, batch: dict):
        with torch.no_grad(), ref_mode():
            ref_logp, _ = sequence_logprobs(reference, batch)
        logp, n = sequence_logprobs(policy, batch)
        if args.dpo_length_norm:
            logp, ref_logp = logp / n.clamp(min=1), ref_logp / n.clamp(min=1)
        reward = args.beta * (logp - ref_logp)  # (S,) implicit rewards
        margin = reward[0::2] - reward[1::2]  # (S/2,) chosen - rejected, per pair
        loss = -F.logsigmoid(margin).mean()
        cfg = model.config
        if cfg.n_experts and cfg.aux_loss_coef and model.training:  # set by the policy's forward, the last one
            loss = loss + cfg.aux_loss_coef * sum(block.ffn.aux_loss for block in model.layers)
        return loss, {"reward_acc": (margin > 0).float().mean(), "reward_margin": margin.detach().mean()}
    return dpo_loss


DEFAULT_LR = {"pretrain": 6e-3, "sft": 1e-3, "dpo": 1e-4}  # fine-tuning starts from trained weights: gentler
DEFAULT_OPTIMIZER = {"pretrain": "muon", "sft": "adamw", "dpo": "adamw"}

# mode -> (data class, loss builder: (model, args) -> loss_fn(model, batch) -> (loss, extra metrics))
MODES = {"pretrain": (PretrainData, lambda model, args: lm_loss),
         "sft": (SFTData, lambda model, args: lm_loss),  # the mask is in the targets (-1 = no loss)
         "dpo": (DPOData, make_dpo_loss)}


# -----------------------------------------------------------------------------
# schedule and optimizer

def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to each matrix of g (..., m, n): for g = U S V^T, about U V^T.

    Newton-Schulz: with X = g / ||g||_F (so every singular value is <= 1), repeat
        X <- a X + b (X X^T) X + c (X X^T)^2 X,   (a, b, c) = (3.4445, -4.7750, 2.0315),
    which maps each singular value s to a s + b s^3 + c s^5. The coefficients (Jordan et al. 2024)
    trade exactness for speed: five steps bring every s into about [0.7, 1.2], which is all Muon needs.
    Matmuls only, so it runs in bf16 on GPUs; batched over leading dims (MoE expert stacks)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix X X^T
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton-schulz) for hidden weight matrices.

    m <- mu m + (1 - mu) g;  u = orthogonalize(g + mu (m - g))  (Nesterov);
    W <- W (1 - lr wd) - lr * 0.2 sqrt(max(rows, cols)) * u.
    An orthogonal update changes every direction of W by the same amount, where Adam's is dominated
    by a few; the factor 0.2 sqrt(max(rows, cols)) gives it the RMS of a typical AdamW update (Liu et
    al. 2025, "Muon is scalable"), so the AdamW learning rate and schedule carry over unchanged."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p)
                m = state["momentum"]
                m.lerp_(p.grad, 1 - mu)
                u = orthogonalize(p.grad.lerp(m, mu), group["ns_steps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(u, alpha=-group["lr"] * 0.2 * max(p.shape[-2:]) ** 0.5)


class Optimizers:
    """Several optimizers stepped as one: the training loop sees one param_groups list and one state dict."""

    def __init__(self, **optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # looked up each time: load_state_dict replaces an optimizer's groups
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state):
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def make_optimizer(model, kind: str, lr: float, weight_decay: float, device: str):
    """AdamW, or Muon for the hidden matrices + AdamW for the rest. Weight decay on matrices and
    embeddings (>= 2-D), never on norms. Muon takes the attention and FFN weights (expert stacks
    too); the embedding (tied to the output head), the MoE router and LoRA's low-rank factors stay
    with AdamW: they are lookups, a tiny classifier and rank-r pieces, not full linear maps."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if kind == "muon" and p.dim() >= 2 and n.startswith("layers.")
              and "router" not in n and "lora_" not in n]
    in_muon = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in in_muon]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95), eps=1e-8,
                              fused=device.startswith("cuda"))
    if not hidden:
        return adamw
    return Optimizers(adamw=adamw, muon=Muon([{"params": hidden, "weight_decay": weight_decay}], lr=lr))


# -----------------------------------------------------------------------------
# logging

class Log:
    """OUT/log.jsonl, one JSON object a line; on resume, lines past the checkpoint are dropped."""

    def __init__(self, out_dir: Path, resume_step: int = None, enabled: bool = True):
        self.path = out_dir / "log.jsonl"
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
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


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------
# command line

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--mode", choices=list(MODES), default="pretrain", help="training stage")
    g.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl, loss.png")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--init-from", default=None, help="start from this checkpoint's weights and model config")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=list(PRESETS), help="model preset (ignored with --init-from)")
    g.add_argument("--aux-loss-coef", type=float, default=None, help="MoE balance loss weight (default: the preset's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="prepared data directory (from prepare.py)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    g.add_argument("--batch-size", type=int, default=16, help="rows per micro-batch per process")
    g.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per optimizer step over all processes; gradient accumulation makes up the "
                        "difference (default: one micro-batch per process)")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-iters", type=int, default=300, help="optimizer steps")
    g.add_argument("--optimizer", choices=("adamw", "muon"), default=None,
                   help="muon: Muon on attention/FFN matrices, AdamW on the rest (default: " +
                        ", ".join(f"{m} {o}" for m, o in DEFAULT_OPTIMIZER.items()) + ")")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default, tuned on the tiny preset: " +
                        ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    g.add_argument("--warmup-iters", type=int, default=None, help="linear warmup steps (default: 5%% of --max-iters)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on >=2-D weights")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g = p.add_argument_group("dpo")
    g.add_argument("--beta", type=float, default=0.1, help="DPO: strength of the KL tie to the reference model")
    g.add_argument("--dpo-length-norm", action="store_true",
                   help="DPO: average completion log-probabilities over tokens instead of summing them")
    g = p.add_argument_group("lora (sft, dpo)")
    g.add_argument("--lora-rank", type=int, default=0,
                   help="train rank-R LoRA adapters on top of --init-from (frozen) instead of every weight (0: off)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale: updates are multiplied by alpha / rank")
    g.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                   help="layers that get adapters: any of q,k,v,o (attention), gate,up,down (feed-forward)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-interval", type=int, default=100, help="evaluate every N steps (and at the end)")
    g.add_argument("--eval-iters", type=int, default=20, help="validation batches per evaluation")
    g.add_argument("--save-interval", type=int, default=100, help="checkpoint every N steps (and at the end)")
    g.add_argument("--log-interval", type=int, default=10, help="print every N steps")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--kernels", default=None, choices=kernels.BACKENDS,
                   help="kernel implementation (default: $MINIMIND_KERNELS or auto)")
    g.add_argument("--seed", type=int, default=1337, help="seeds weights and data order")
    g.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: known GPU or measured)")
    return p


def given_flags(argv) -> set:
    """Names of the flags set on the command line (whatever their value)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(parser.parse_args(argv)))


def resolve_args(args):
    """Fill defaults from the run being resumed or the checkpoint being fine-tuned.
    Flags given on the command line win; flags not given inherit."""
    given = given_flags(sys.argv[1:])
    source = None
    if args.resume:
        source = resolve_checkpoint(args.out)
    elif args.init_from:
        source = resolve_checkpoint(args.init_from)
    if source is not None:
        saved = json.loads((source / "state.json").read_text()).get("args", {})
        inherit = ["model", "seq_len", "batch_size", "dtype", "kernels", "seed", "aux_loss_coef"]
        if args.resume:  # the same run: everything not overridden
            saved.setdefault("optimizer", "adamw")  # runs from before --optimizer existed used AdamW
            if "optimizer" in given and args.optimizer != saved["optimizer"]:
                sys.exit(f"--optimizer {args.optimizer}: {args.out} was trained with {saved['optimizer']}, "
                         "whose state cannot carry over (start a new run with --init-from instead)")
            inherit = [k for k in saved if k not in ("resume", "out", "init_from")]
        for k in inherit:
            if k in saved and k not in given and hasattr(args, k):
                setattr(args, k, saved[k])
    if args.lr is None:
        args.lr = DEFAULT_LR[args.mode]
    if args.optimizer is None:
        args.optimizer = DEFAULT_OPTIMIZER[args.mode]
    if args.data is None:
        sys.exit("--data is required (a directory written by prepare.py)")
    return args, source


# -----------------------------------------------------------------------------
# main

def main():
    args, source = resolve_args(build_parser().parse_args())
    if args.kernels:
        kernels.set_backend(args.kernels)

    # distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    ddp = "RANK" in os.environ
    if ddp:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        device = pick_device(args.device)
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    else:
        rank, world, device = 0, 1, pick_device(args.device)
    master = rank == 0
    dtype = pick_dtype(args.dtype, device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if master:
        out.mkdir(parents=True, exist_ok=True)

    # model: fresh from a preset, or from a checkpoint
    start_step = 0
    if source is not None:
        # resuming a LoRA run: base + adapters kept apart; otherwise adapters (if any) merged in
        model, state, _ = load_checkpoint(source, device, merge_lora=not args.resume)
        model.train()
        if args.resume:
            start_step = state["step"]
    else:
        cfg = ModelConfig(**PRESETS[args.model].to_dict())
        model = MiniMind(cfg).to(device)
    if args.aux_loss_coef is not None:
        model.config.aux_loss_coef = args.aux_loss_coef
    lora_spec = None  # LoRA: only adapters train and are saved; the base checkpoint stays where it is
    if args.resume and "lora" in state:
        lora_spec = state["lora"]
    elif args.lora_rank:
        if source is None or args.mode == "pretrain":
            sys.exit("--lora-rank adapts a trained checkpoint: use it with --mode=sft|dpo and --init-from")
        targets = lora.apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)
        lora_spec = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": targets,
                     "base": str(source.resolve()),  # and relative to OUT, for a copied or moved tree of runs:
                     "base_rel": os.path.relpath(source.resolve(), out.resolve())}
    else:
        model.requires_grad_(True)

    DataClass, make_loss = MODES[args.mode]
    data = DataClass(args.data, args.seq_len, args.seed)
    if data.meta.get("vocab_size", 0) > model.config.vocab_size:
        sys.exit(f"{args.data}: vocabulary {data.meta['vocab_size']} > model's {model.config.vocab_size}")

    # token budget -> gradient accumulation
    tokens_per_micro = args.batch_size * args.seq_len
    batch_tokens = args.batch_tokens or tokens_per_micro * world
    assert batch_tokens % (tokens_per_micro * world) == 0, \
        f"--batch-tokens {batch_tokens} must be a multiple of batch-size*seq-len*world = {tokens_per_micro * world}"
    accum = batch_tokens // (tokens_per_micro * world)
    data.micro_batches = accum * world  # packed data walks its rows in order: where each step starts
    loss_fn = make_loss(model, args)
    warmup = args.warmup_iters if args.warmup_iters is not None else max(1, args.max_iters // 20)

    optimizer = make_optimizer(model, args.optimizer, args.lr, args.weight_decay, device)
    if args.resume:
        optimizer.load_state_dict(torch.load(source / "optim.pt", map_location=device, weights_only=True))
    train_model = torch.compile(model) if args.compile else model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(train_model, device_ids=[local_rank] if device.startswith("cuda") else None)

    flops_per_step = model.flops_per_token(args.seq_len) * batch_tokens
    datasheet = args.peak_tflops * 1e12 if args.peak_tflops else datasheet_flops(device, dtype)
    peak = (datasheet or measure_matmul_flops(device, dtype)) * world
    log = Log(out, start_step if args.resume else None, enabled=master)
    tok_dir = data.dir / "tokenizer"
    if master:
        n, n_act = model.num_params(), model.num_params(active=True)
        print(f"{args.mode} | {n / 1e6:.2f}M params ({n_act / 1e6:.2f}M active) | {world} process(es) on {device} "
              f"{str(dtype).replace('torch.', '')} | {batch_tokens:,} tokens/step = {world} x {accum} x "
              f"{args.batch_size} x {args.seq_len} | kernels {kernels.get_backend()}")
        if isinstance(optimizer, Optimizers):
            n_muon = sum(p.numel() for g in optimizer.optimizers["muon"].param_groups for p in g["params"])
            print(f"optimizer: Muon on {n_muon / 1e6:.2f}M params (attention/FFN matrices), AdamW on the rest")
        else:
            print("optimizer: AdamW" + (" (LoRA adapters stay on AdamW)" if args.optimizer == "muon" else ""))
        if lora_spec:
            n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"LoRA rank {lora_spec['rank']} on {','.join(lora_spec['targets'])}: {n_lora / 1e6:.3f}M trainable "
                  f"params; base {lora_spec['base']}")
        if hasattr(data, "describe"):
            print(data.describe())

    @torch.no_grad()
    def evaluate(step):
        model.eval()
        totals = {}
        for i in range(args.eval_iters):  # the same validation batches every time; split across ranks
            if i % world != rank:
                continue
            with autocast(device, dtype):
                loss, extra = loss_fn(model, data.batch("val", 0, i, args.batch_size, device))
            for k, v in {"loss": loss, **extra}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        keys = sorted(totals)
        vals = torch.tensor([totals[k] for k in keys] + [sum(1 for i in range(args.eval_iters) if i % world == rank)],
                            dtype=torch.float64)
        if ddp:
            dist.all_reduce(vals)
        model.train()
        return {f"val_{k}": (vals[j] / vals[-1]).item() for j, k in enumerate(keys)}

    def checkpoint(step):
        if master:
            state = {"kind": args.mode, "args": vars(args), "data": {"dir": str(data.dir), "meta": data.meta}}
            if lora_spec:
                state["lora"] = lora_spec
            save_checkpoint(out, step, model, state, optimizer, tok_dir if tok_dir.exists() else None,
                            weights=lora.lora_state_dict(model) if lora_spec else None)
        if ddp:
            dist.barrier()

    t_start = time.time()
    t_last, tokens_since = time.time(), 0
    model.train()
    for step in range(start_step + 1, args.max_iters + 1):
        lr = args.lr * lr_multiplier(step - 1, warmup, args.max_iters, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics = {}
        for micro in range(accum):
            batch = data.batch("train", step, micro * world + rank, args.batch_size, device)
            sync = micro == accum - 1  # all-reduce gradients on the last micro-step only
            if ddp:
                train_model.require_backward_grad_sync = sync
            with autocast(device, dtype):
                loss, extra = loss_fn(train_model, batch)
            (loss / accum).backward()
            for k, v in {"loss": loss, **extra}.items():
                metrics[k] = metrics.get(k, 0.0) + v.detach() / accum
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_since += batch_tokens
        if step % args.log_interval == 0 or step == args.max_iters or step == start_step + 1:
            keys = sorted(metrics)
            vals = torch.stack([metrics[k].float() for k in keys])  # one host sync per logged step
            if ddp:
                dist.all_reduce(vals)
                vals /= world
            vals = vals.tolist()
            now = time.time()
            tps = tokens_since / (now - t_last)
            mfu = tps * flops_per_step / batch_tokens / peak
            eta = (args.max_iters - step) * batch_tokens / tps
            t_last, tokens_since = now, 0
            rec = dict(zip(keys, vals))
            log.write(step=step, **rec, lr=lr, tok_per_s=round(tps, 1), mfu=round(mfu, 4),
                      time=round(now - t_start, 2))
            if master:
                shown = " | ".join(f"{k} {v:.4f}" for k, v in rec.items())
                print(f"step {step:5d}/{args.max_iters} | {shown} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                      f"MFU {100 * mfu:.1f}% | ETA {fmt_time(eta)}", flush=True)
        if step % args.eval_interval == 0 or step == args.max_iters:
            rec = evaluate(step)
            if not datasheet:  # a peak measured while the machine was busy reads low: keep the best seen
                peak = max(peak, measure_matmul_flops(device, dtype, seconds=0.2) * world)
            log.write(step=step, **rec)
            if master:
                print(f"step {step:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in rec.items()), flush=True)
                plot_log(out)
        if step % args.save_interval == 0 or step == args.max_iters:
            checkpoint(step)
    if master:
        print(f"done in {fmt_time(time.time() - t_start)}; checkpoint in {out}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
