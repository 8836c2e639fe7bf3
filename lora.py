"""LoRA (Hu et al. 2021): low-rank adapters on the linear layers of a minimind model.

    python train.py --mode=sft --init-from out/pretrain --lora-rank 8 --lora-alpha 16 ... --out out/sft-lora
    python export.py --merge-lora out/sft-lora --out out/sft-merged   # fold the adapters into a full checkpoint

A targeted linear layer W (out, in) becomes  y = x W^T + (alpha / r) * x A^T B^T  with A (r, in)
and B (out, r) trainable and W frozen. B starts at zero, so training starts exactly at the base
model. The wrapped layer keeps W under its own name (`layers.0.attn.wq.weight`) and adds
`...wq.lora_A` / `...wq.lora_B`, so the base weights load and save unchanged.

An adapter checkpoint stores only the adapters (adapter.safetensors, a few hundred KB) and, in
state.json, {"lora": {"rank", "alpha", "targets", "base", "base_rel"}} where `base` is the checkpoint
the adapters were trained on (`base_rel`: the same, relative to the run directory, so a copied tree
of runs still loads). checkpoint.load_checkpoint loads such a checkpoint as base + adapters,
merged for inference (sample.py, serve.py, export.py) or unmerged to continue training.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# --lora-targets name -> attribute path inside a Block
TARGETS = {"q": "attn.wq", "k": "attn.wk", "v": "attn.wv", "o": "attn.wo",
           "gate": "ffn.w1", "up": "ffn.w3", "down": "ffn.w2"}


class LoRALinear(nn.Module):
    """A bias-free nn.Linear with a low-rank trainable update; `weight` is the base layer's own
    Parameter (frozen), so state-dict names and storage are shared with the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        assert base.bias is None, "minimind has no biases"
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as the paper's code does
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.enabled = True  # False: behave as the base layer (the DPO reference model)

    def forward(self, x):
        y = F.linear(x, self.weight)  # (..., out)
        if self.enabled:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale  # (..., r) -> (..., out)
        return y

    def merged_weight(self) -> torch.Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def parse_targets(targets) -> list:
    names = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else list(targets)
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"--lora-targets {targets!r}: expected a comma-separated subset of {','.join(TARGETS)}")
    return names


def _parent(block, path):
    *parents, leaf = path.split(".")
    for p in parents:
        block = getattr(block, p)
    return block, leaf


def apply_lora(model, rank: int, alpha: float, targets) -> list:
    """Freeze every parameter of `model`, wrap the targeted linear layers with LoRA adapters
    (the only trainable parameters afterwards). Returns the target names."""
    names = parse_targets(targets)
    if rank < 1:
        raise ValueError(f"--lora-rank {rank}: must be >= 1")
    if model.config.n_experts and any(t in ("gate", "up", "down") for t in names):
        raise ValueError("LoRA on the feed-forward of a MoE model (stacked routed experts) is not supported: "
                         "use attention targets (q,k,v,o)")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.layers:
        for t in names:
            parent, leaf = _parent(block, TARGETS[t])
            layer = getattr(parent, leaf)
            if isinstance(layer, LoRALinear):
                raise ValueError("model already has LoRA adapters: merge them first")
            setattr(parent, leaf, LoRALinear(layer, rank, alpha))
    return names


def describe_lora(model, spec: dict) -> str:
    """One line: the adapters' rank and targets (spec: state.json's "lora"), trainable parameters, base."""
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"LoRA rank {spec['rank']} on {','.join(spec['targets'])}: {n_lora / 1e6:.3f}M "
            f"trainable params; base {spec['base']}")


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model) -> dict:
    """name -> tensor of the adapter weights only."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def load_lora_state_dict(model, weights: dict):
    """Load adapter weights into a model that `apply_lora` prepared; the names must match exactly."""
    expected = set(lora_state_dict(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"adapter weights do not match the LoRA layout: missing {missing[:4]}, unexpected {extra[:4]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)


def merge_lora(model):
    """Fold every adapter into its base weight and restore plain nn.Linear layers (in place)."""
    for block in model.layers:
        for path in TARGETS.values():
            parent, leaf = _parent(block, path)
            layer = getattr(parent, leaf)
            if isinstance(layer, LoRALinear):
                plain = nn.Linear(layer.in_features, layer.out_features, bias=False,
                                  device=layer.weight.device, dtype=layer.weight.dtype)
                with torch.no_grad():
                    plain.weight.copy_(layer.merged_weight())
                setattr(parent, leaf, plain)
    return model


@contextlib.contextmanager
def lora_disabled(model):
    """Run the base model: adapters switched off inside the block (the DPO reference)."""
    mods = lora_modules(model)
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True
