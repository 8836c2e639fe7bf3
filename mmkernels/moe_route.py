"""Mixture-of-Experts router: softmax over the experts, top-k, optional renormalisation.

Axes: N = tokens, E = experts, K = experts per token.

One fused kernel, fp32 math:
    probs   = softmax(logits)                            (N, E)
    w, idx  = topk(probs, K)                             (N, K), ties to the lowest expert index
    w       = w / sum(w)     if renormalise and K > 1    (with K = 1 renormalising makes every
                                                          weight the constant 1.0 and cuts the router
                                                          off from the LM loss, so it is skipped)
  backward, from dw (N, K) and dprobs (N, E) (the load-balance loss reads probs):
    dp      = dprobs + scatter(idx, dw')   dw'_k = (dw_k - sum_j dw_j w_j) / sum_j p_idx_j  if renormalised
    dlogits = p * (dp - sum(p * dp))

Layers: kernels `_moe_route_fwd_kernel`, `_moe_route_bwd_kernel` (+ helper `_top1`) -> launchers
(custom ops minimind::moe_route_fwd / moe_route_bwd) -> `MoERouteFunction` -> `moe_route`.
PyTorch twin: `moe_route_torch`. The experts that consume the routing: mmkernels/moe_experts.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from mmkernels._triton import cdiv, gpu, jit, last_contiguous, launcher, next_pow2
from mmkernels.backend import use_triton

tl = None  # triton.language, bound on the first launch (mmkernels/_triton.py)


# -----------------------------------------------------------------------------
# PyTorch twin

def moe_route_torch(logits: torch.Tensor, top_k: int, renormalize: bool):
    probs = logits.float().softmax(dim=-1)  # (N, E)
    weights, experts = probs.topk(top_k, dim=-1)  # (N, K), (N, K)
    if renormalize and top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts, probs


# -----------------------------------------------------------------------------
# Triton kernels. Programs take BLOCK_M tokens x all E (<= BLOCK_E) experts.

@jit
def _top1(cand, cols, BLOCK_E: tl.constexpr):
    # largest entry of each row of cand (BLOCK_M, BLOCK_E) and its lowest column index
    best = tl.max(cand, axis=1)
    idx = tl.min(tl.where(cand == best[:, None], cols[None, :], BLOCK_E), axis=1)
    return best, idx


@jit
def _moe_route_fwd_kernel(LOGITS, PROBS, WEIGHTS, EXPERTS, n_rows, n_experts, stride_l,
                          TOP_K: tl.constexpr, RENORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < n_rows
    col_ok = cols < n_experts
    mask = row_ok[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)
    z = tl.load(LOGITS + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.where(col_ok[None, :], z, -float("inf"))
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]  # (BLOCK_M, BLOCK_E)
    tl.store(PROBS + rows[:, None] * n_experts + cols[None, :], p, mask=mask)
    # top-k by repeated arg-max; a first pass sums the top-k probabilities when renormalising
    cand = tl.where(col_ok[None, :], p, -1.0)
    total = tl.full((BLOCK_M,), 1.0, tl.float32)
    if RENORM:
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        c = cand
        for i in tl.static_range(TOP_K):
            best, idx = _top1(c, cols, BLOCK_E)
            total += best
            c = tl.where(cols[None, :] == idx[:, None], -1.0, c)
    for i in tl.static_range(TOP_K):
        best, idx = _top1(cand, cols, BLOCK_E)
        tl.store(WEIGHTS + rows * TOP_K + i, best / total, mask=row_ok)
        tl.store(EXPERTS + rows * TOP_K + i, idx.to(tl.int64), mask=row_ok)
        cand = tl.where(cols[None, :] == idx[:, None], -1.0, cand)


@jit
def _moe_route_bwd_kernel(PROBS, DPROBS, WEIGHTS, DWEIGHTS, EXPERTS, DLOGITS, n_rows, n_experts,
                          HAS_DPROBS: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_experts)[None, :]
    rows = rows.to(tl.int64)
    offs = rows[:, None] * n_experts + cols[None, :]
    p = tl.load(PROBS + offs, mask=mask, other=0.0)
    if HAS_DPROBS:
        dp = tl.load(DPROBS + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        dp = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    # renormalised weights w_k = p_k / s: dp_k = (dw_k - <dw, w>) / s; else dp_k = dw_k (dot 0, s 1)
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s = tl.full((BLOCK_M,), 1.0, tl.float32)
    if RENORM:
        s = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for i in tl.static_range(TOP_K):
            idx = tl.load(EXPERTS + rows * TOP_K + i, mask=row_ok, other=0)
            w = tl.load(WEIGHTS + rows * TOP_K + i, mask=row_ok, other=0.0)
            dw = tl.load(DWEIGHTS + rows * TOP_K + i, mask=row_ok, other=0.0).to(tl.float32)
            dot += dw * w
            s += tl.sum(tl.where(cols[None, :] == idx[:, None], p, 0.0), axis=1)
        s = tl.where(row_ok, s, 1.0)
    for i in tl.static_range(TOP_K):
        idx = tl.load(EXPERTS + rows * TOP_K + i, mask=row_ok, other=0)
        dw = tl.load(DWEIGHTS + rows * TOP_K + i, mask=row_ok, other=0.0).to(tl.float32)
        g = (dw - dot) / s
        dp += tl.where(cols[None, :] == idx[:, None], g[:, None], 0.0)
    dl = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    tl.store(DLOGITS + offs, dl.to(DLOGITS.dtype.element_ty), mask=mask)


# -----------------------------------------------------------------------------
# launchers (custom ops: opaque to torch.compile)

def _blocks(t: torch.Tensor, n_experts: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_E) of both kernels: ~4k probabilities per program."""
    block_e = next_pow2(n_experts)
    return max(1, min(64 if gpu(t) else 256, 4096 // block_e)), block_e


def _route_fwd_fake(logits, top_k, renormalize):
    N = logits.shape[0]
    return (logits.new_empty(N, top_k, dtype=torch.float32), logits.new_empty(N, top_k, dtype=torch.int64),
            logits.new_empty(logits.shape, dtype=torch.float32))


@launcher("moe_route_fwd", _route_fwd_fake)
def moe_route_fwd(logits: torch.Tensor, top_k: int,
                  renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, E = logits.shape
    assert 1 <= top_k <= E, f"moe_route: top_k={top_k} with {E} experts"
    logits = last_contiguous(logits)
    weights, experts, probs = _route_fwd_fake(logits, top_k, renormalize)
    if N == 0:
        return weights, experts, probs
    block_m, block_e = _blocks(logits, E)
    _moe_route_fwd_kernel[(cdiv(N, block_m),)](
        LOGITS=logits, PROBS=probs, WEIGHTS=weights, EXPERTS=experts, n_rows=N, n_experts=E,
        stride_l=logits.stride(0), TOP_K=top_k, RENORM=renormalize and top_k > 1,
        BLOCK_M=block_m, BLOCK_E=block_e, num_warps=4)
    return weights, experts, probs


@launcher("moe_route_bwd", lambda dweights, dprobs, weights, experts, probs, renormalize, dtype:
          probs.new_empty(probs.shape, dtype=dtype))
def moe_route_bwd(dweights: torch.Tensor, dprobs: Optional[torch.Tensor], weights: torch.Tensor,
                  experts: torch.Tensor, probs: torch.Tensor, renormalize: bool, dtype: torch.dtype) -> torch.Tensor:
    N, E = probs.shape
    K = experts.shape[1]
    dlogits = torch.empty(N, E, dtype=dtype, device=probs.device)
    if N == 0:
        return dlogits
    dweights = dweights.contiguous()
    dprobs = dprobs.contiguous() if dprobs is not None else None
    block_m, block_e = _blocks(probs, E)
    _moe_route_bwd_kernel[(cdiv(N, block_m),)](
        PROBS=probs, DPROBS=dprobs if dprobs is not None else probs, WEIGHTS=weights, DWEIGHTS=dweights,
        EXPERTS=experts, DLOGITS=dlogits, n_rows=N, n_experts=E,
        HAS_DPROBS=dprobs is not None, TOP_K=K, RENORM=renormalize and K > 1,
        BLOCK_M=block_m, BLOCK_E=block_e, num_warps=4)
    return dlogits


# -----------------------------------------------------------------------------
# autograd and module function

class MoERouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, top_k, renormalize):
        weights, experts, probs = moe_route_fwd(logits, top_k, renormalize)
        ctx.mark_non_differentiable(experts)
        ctx.save_for_backward(weights, experts, probs)
        ctx.renormalize, ctx.dtype = renormalize, logits.dtype
        return weights, experts, probs

    @staticmethod
    def backward(ctx, dweights, dexperts, dprobs):
        weights, experts, probs = ctx.saved_tensors
        dlogits = moe_route_bwd(dweights, dprobs, weights, experts, probs, renormalize=ctx.renormalize,
                                dtype=ctx.dtype)
        return dlogits, None, None


def moe_route(logits, top_k: int, renormalize: bool):
    """Router: logits (N, E) -> (weights (N, K) fp32, experts (N, K) int64, probs (N, E) fp32).
    Differentiable through weights and probs (the load-balance loss uses probs)."""
    if not use_triton(logits):
        return moe_route_torch(logits, top_k, renormalize)
    return MoERouteFunction.apply(logits, top_k, renormalize)
