"""RMSNorm.

    y = x / sqrt(mean(x**2) + eps) * w          (per row of the last dim, fp32 math)

PyTorch twin: `rms_norm_torch`. The Triton kernel lands here too (see issue 3).
"""
import torch

import kernels


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # fp32 statistics whatever the input dtype
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of `x` (any leading shape); differentiable."""
    return rms_norm_torch(x, weight, eps)
