"""Optimizers and the learning-rate schedule: AdamW, Muon for hidden matrices; warmup, then cosine
or warmup-stable-decay; WithModule, an optimizer that also trains an objective's own module."""
import math

import torch

from runtime import cpu_has_bf16


SCHEDULES = ("cosine", "wsd")


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float, schedule: str = "cosine",
                  decay_frac: float = 0.2) -> float:
    """Linear warmup to 1 over `warmup` steps, then to min_ratio at `total`:
    cosine  decays all the way;
    wsd     (warmup-stable-decay) stays at 1 and decays linearly over the last decay_frac of the run,
            so a run can be planned by time and still end decayed (train.py --max-time)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "wsd":
        return 1.0 - (1 - min_ratio) * max(0.0, progress - (1 - decay_frac)) / decay_frac
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = None) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to each matrix of g (..., m, n): for g = U S V^T, about U V^T.

    Newton-Schulz: with X = g / ||g||_F (so every singular value is <= 1), repeat
        X <- a X + b (X X^T) X + c (X X^T)^2 X,   (a, b, c) = (3.4445, -4.7750, 2.0315),
    which maps each singular value s to a s + b s^3 + c s^5. The coefficients (Jordan et al. 2024)
    trade exactness for speed: five steps bring every s into about [0.7, 1.2], which is all Muon needs.
    Matmuls only, so bf16 is enough (dtype; default: bf16 on GPUs, fp32 elsewhere); batched over
    leading dims (MoE expert stacks)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype or (torch.bfloat16 if g.is_cuda else torch.float32))
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
    al. 2025, "Muon is scalable"), so the AdamW learning rate and schedule carry over unchanged.
    ns_dtype: the precision of Newton-Schulz (None: orthogonalize's default)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: torch.dtype = None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype  # not a group option: state_dict stays plain numbers

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
                u = orthogonalize(p.grad.lerp(m, mu), group["ns_steps"], self.ns_dtype)
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
    # fused: one kernel over all tensors, no per-tensor temporaries (on CPU these are what page-faults
    # a 30 MB expert stack every step: BENCHMARKS.md, the MoE section)
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95), eps=1e-8,
                              fused=device.split(":")[0] in ("cuda", "cpu"))
    if not hidden:
        return adamw
    # Newton-Schulz in bf16 where the CPU has bf16 units too: 4.4x faster for tiny's matrices (15% of
    # its step's FLOPs), 3.8x for minimind-3's, polar factors within 0.013 of fp32's
    ns_dtype = torch.bfloat16 if device == "cpu" and cpu_has_bf16() else None
    return Optimizers(adamw=adamw, muon=Muon([{"params": hidden, "weight_decay": weight_decay}], lr=lr,
                                             ns_dtype=ns_dtype))


class WithModule:
    """An optimizer that also trains an objective's own module (PPO's value head), at lr_scale x the
    model's learning rate, and keeps its weights in optim.pt beside the optimizer state: training state
    for --resume, not part of the model."""

    def __init__(self, optimizer, module: torch.nn.Module, lr_scale: float = 1.0):
        self.optimizer, self.module = optimizer, module
        adamw = optimizer.optimizers["adamw"] if isinstance(optimizer, Optimizers) else optimizer
        adamw.add_param_group({"params": list(module.parameters()), "weight_decay": 0.0, "lr_scale": lr_scale})

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self):
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "module": self.module.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.module.load_state_dict(state["module"])


def describe_optimizer(optimizer, asked: str) -> str:
    """One line: what each optimizer trains (asked: the --optimizer the run was given)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # WithModule: the model's
    if isinstance(optimizer, Optimizers):
        n_muon = sum(p.numel() for g in optimizer.optimizers["muon"].param_groups for p in g["params"])
        return f"optimizer: Muon on {n_muon / 1e6:.2f}M params (attention/FFN matrices), AdamW on the rest"
    return "optimizer: AdamW" + (" (LoRA adapters stay on AdamW)" if asked == "muon" else "")
