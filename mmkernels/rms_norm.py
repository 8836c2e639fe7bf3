"""RMSNorm, and RMSNorm fused with the residual add before it.

Per row x of the last dim (size n), fp32 math whatever the storage dtype:
    r  = 1 / sqrt(mean(x**2) + eps)                 (the per-row rstd, saved for backward)
    y  = (x * r) * w
Backward, with x_hat = x * r:
    dx = r * (w*dy - x_hat * mean(x_hat * w*dy))
    dw = sum over rows of dy * x_hat
Fused residual add (pre-norm blocks: h = x + residual feeds both the norm and the next residual):
    h  = x + residual   (rounded to the storage dtype, as the unfused code would)
    y  = rms_norm(h)
    dx = dresidual = dh + rms_norm backward(dy)

Layers: kernels `_rms_norm_fwd_kernel`, `_rms_norm_bwd_kernel` -> launchers (custom ops
minimind::rms_norm_fwd / add_rms_norm_fwd / rms_norm_bwd) -> `RMSNormFunction` -> `rms_norm`,
`add_rms_norm`. PyTorch twins: `rms_norm_torch`, `add_rms_norm_torch`.
"""
from __future__ import annotations

from typing import Optional

import torch

from mmkernels._triton import cdiv, gpu, jit, last_contiguous, launcher, next_pow2, num_workers
from mmkernels.backend import use_triton

tl = None  # triton.language, bound on the first launch (mmkernels/_triton.py)


# -----------------------------------------------------------------------------
# PyTorch twins

def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # fp32 statistics whatever the input dtype
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm_torch(x, residual, weight, eps):
    h = x + residual
    return rms_norm_torch(h, weight, eps), h


# -----------------------------------------------------------------------------
# Triton kernels. Rows are blocks of BLOCK_M rows x BLOCK_N (>= n) columns, last dim contiguous.

@jit
def _rms_norm_fwd_kernel(X, R, W, Y, H, RSTD, n_rows, n_cols, stride_x, stride_r, stride_y, stride_h, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)  # row * stride can pass 2**31 elements
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = x.to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)  # normalise the rounded sum, as the unfused code does
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (BLOCK_M,)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = (x * rstd[:, None]) * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DH, DX, DW_PART, n_rows, n_cols, rows_per_program,
                         stride_dy, stride_x, stride_dh, stride_dx,
                         HAS_DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Each program walks `rows_per_program` rows (a multiple of BLOCK_M) and writes its partial dw;
    # the launcher sums the partials: no atomics, deterministic.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, rows_per_program, BLOCK_M):
        rows = pid * rows_per_program + start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        wdy = dy * w[None, :]
        c = tl.sum(x_hat * wdy, axis=1) / n_cols  # (BLOCK_M,)
        dx = (wdy - x_hat * c[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PART + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


# -----------------------------------------------------------------------------
# launchers (custom ops: opaque to torch.compile)

def _flatten_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n) with a contiguous last dim; a view whenever strides allow."""
    return last_contiguous(t.reshape(-1, t.shape[-1]))


def _fwd_config(x: torch.Tensor, n_cols: int):
    block_n = next_pow2(n_cols)
    assert block_n <= 65536, f"rms_norm: rows of {n_cols} elements are too long for one block"
    if gpu(x):  # ~4k elements per program; one warp per 512 of them
        block_m = max(1, min(16, 4096 // block_n))
        return block_m, block_n, max(1, min(16, block_m * block_n // 512))
    return max(1, min(64, 16384 // block_n)), block_n, 1  # interpreter: big numpy blocks


def _rms_norm_fwd_fake(x, residual, weight, eps):
    rows = x.numel() // x.shape[-1]
    dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    h = x.new_empty(x.shape if residual is not None else (0,), dtype=dtype)
    return x.new_empty(x.shape, dtype=dtype), h, x.new_empty(rows, dtype=torch.float32)


@launcher("rms_norm_fwd", _rms_norm_fwd_fake)
def rms_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (..., n); weight: (n,). Returns y (x's shape; dtype of x, or of x + residual),
    h = x + residual (or an empty tensor) and rstd (rows,) fp32."""
    n = x.shape[-1]
    x2 = _flatten_rows(x)  # (rows, n)
    r2 = _flatten_rows(residual) if residual is not None else x2  # (rows, n)
    y, h, rstd = _rms_norm_fwd_fake(x, residual, weight, eps)
    if x2.shape[0] == 0:
        return y, h, rstd
    block_m, block_n, warps = _fwd_config(x, n)
    _rms_norm_fwd_kernel[(cdiv(x2.shape[0], block_m),)](
        X=x2, R=r2, W=weight, Y=y, H=h if residual is not None else y, RSTD=rstd, n_rows=x2.shape[0], n_cols=n,
        stride_x=x2.stride(0), stride_r=r2.stride(0), stride_y=n, stride_h=n, eps=eps,
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y, h, rstd


@launcher("rms_norm_bwd", lambda dy, x, weight, rstd, dh: (x.new_empty(x.shape), weight.new_empty(weight.shape)))
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 dh: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx, dw) of y = rms_norm(x); `dh`, when given, is added to dx (fused residual)."""
    n = x.shape[-1]
    dy2, x2 = _flatten_rows(dy), _flatten_rows(x)  # (rows, n)
    dh2 = _flatten_rows(dh) if dh is not None else dy2
    rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    block_m, block_n, warps = _fwd_config(x, n)
    if gpu(x):
        block_m = max(1, min(block_m, 2048 // block_n))  # the dw accumulator lives in registers too
    # persistent-style: a few programs per SM, each over a contiguous run of rows
    n_prog = min(cdiv(rows, block_m), 4 * num_workers(x.device))
    rows_per_program = cdiv(cdiv(rows, n_prog), block_m) * block_m
    n_prog = cdiv(rows, rows_per_program)
    dw_part = torch.empty(n_prog, n, dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(n_prog,)](
        DY=dy2, X=x2, W=weight, RSTD=rstd, DH=dh2, DX=dx, DW_PART=dw_part, n_rows=rows, n_cols=n,
        rows_per_program=rows_per_program, stride_dy=dy2.stride(0), stride_x=x2.stride(0), stride_dh=dh2.stride(0),
        stride_dx=n, HAS_DH=dh is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return dx, dw_part.sum(0).to(weight.dtype)


# -----------------------------------------------------------------------------
# autograd

class RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x) when residual is None, else (y, h) = add_rms_norm(x, residual)."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        y, h, rstd = rms_norm_fwd(x, residual, weight, eps)
        ctx.fused = residual is not None
        ctx.save_for_backward(h if ctx.fused else x, weight, rstd)
        if ctx.fused:
            ctx.dtypes = x.dtype, residual.dtype
            return y, h
        return y

    @staticmethod
    def backward(ctx, dy, dh=None):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x, weight, rstd, dh)
        if ctx.fused:  # dx is the gradient of h = x + residual, for both
            return dx.to(ctx.dtypes[0]), dw, None, dx.to(ctx.dtypes[1])
        return dx, dw, None, None


# -----------------------------------------------------------------------------
# module functions

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of `x` (any leading shape, any strides); output in x's dtype;
    differentiable in x and weight."""
    if not use_triton(x):
        return rms_norm_torch(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps, None)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """h = x + residual and y = rms_norm(h) in one pass; returns (y, h), both in the promoted dtype
    of x and residual (as `x + residual`). For pre-norm blocks, under autocast too (an fp32 residual
    stream plus a bf16 attention output):
        y, h = add_rms_norm(h, attn_out, ffn_norm.weight, eps)   # h: the new residual stream"""
    if not use_triton(x):
        return add_rms_norm_torch(x, residual, weight, eps)
    assert x.shape == residual.shape, f"add_rms_norm: x {tuple(x.shape)} vs residual {tuple(residual.shape)}"
    return RMSNormFunction.apply(x, weight, eps, residual)
