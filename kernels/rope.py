"""Rotary position embedding, rotate-half convention (Llama/Qwen in transformers).

For a head vector x of size D split into halves (x1, x2) and per-position cos/sin of size D
(the D/2 frequencies repeated twice):
    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half(x) = (-x2, x1)

PyTorch twin: `rope_torch`. The Triton kernel lands here too (see issue 3).
"""
import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_torch(q, k, cos, sin):
    # q: (B, T, Hq, D), k: (B, T, Hk, D), cos/sin: (T, D) or (B, T, D), fp32
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B|1, T, 1, D)
    qf, kf = q.float(), k.float()
    q_out = qf * cos + rotate_half(qf) * sin
    k_out = kf * cos + rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def rope(q, k, cos, sin):
    """Rotate q (B, T, Hq, D) and k (B, T, Hk, D) by cos/sin of shape (T, D) or (B, T, D).
    Returns the rotated (q, k); differentiable."""
    return rope_torch(q, k, cos, sin)
