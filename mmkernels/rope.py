"""Rotary position embedding, rotate-half convention (Llama/Qwen in transformers).

For a head vector x of size D split into halves (x1, x2) and per-position cos/sin of size D
(the D/2 frequencies repeated twice, halves c1|c2 and s1|s2):
    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half(x) = (-x2, x1)
            = (x1*c1 - x2*s1,  x2*c2 + x1*s2)
The backward is the transposed rotation:
    dx = (dy1*c1 + dy2*s2,  dy2*c2 - dy1*s1)
so one kernel serves both: y1 = x1*c1 + x2*a, y2 = x2*c2 + x1*b with (a, b) = (-s1, s2) forward and
(s2, -s1) backward. cos/sin are constants (tables of the model): no gradient flows into them.

q: (B, T, Hq, D) and k: (B, T, Hk, D), any strides with a contiguous last dim (e.g. slices of a
fused qkv projection), rotated in one launch; cos/sin: (T', D) shared by the batch or (B, T', D) per
row (packed documents, left-padded prompts), T' >= offset + T; position t of the input uses table row
offset + t (decoding with a KV cache can pass the whole table and offset = tokens already cached).

Layers: kernel `_rope_kernel` (+ helper `_rope_rotate`) -> launcher (custom op minimind::rope) ->
`RoPEFunction` -> `rope`. PyTorch twin: `rope_torch`.
"""
from __future__ import annotations

import torch

from mmkernels._triton import cdiv, gpu, jit, last_contiguous, launcher, next_pow2, prev_pow2
from mmkernels.backend import use_triton

tl = None  # triton.language, bound on the first launch (mmkernels/_triton.py)


# -----------------------------------------------------------------------------
# PyTorch twin

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_torch(q, k, cos, sin, offset: int = 0):
    # q: (B, T, Hq, D), k: (B, T, Hk, D), cos/sin: (T', D) or (B, T', D), fp32
    T = q.shape[1]
    cos, sin = cos[..., offset:offset + T, :], sin[..., offset:offset + T, :]
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B|1, T, 1, D)
    qf, kf = q.float(), k.float()
    q_out = qf * cos + rotate_half(qf) * sin
    k_out = kf * cos + rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


# -----------------------------------------------------------------------------
# Triton kernel. Program (t-block, b): BLOCK_T positions x all heads x D/2, for q then for k.

@jit
def _rope_rotate(X, Y, b, t, t_ok, c1, c2, a, bb, n_heads, sxb, sxt, sxh, syb, syt, syh,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # one tensor (q or k): (BLOCK_T, BLOCK_H, BLOCK_D) elements of each half
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = t_ok[:, None, None] & (h < n_heads)[None, :, None] & (d < HALF)[None, None, :]
    x_off = b * sxb + t[:, None, None] * sxt + h[None, :, None] * sxh + d[None, None, :]
    y_off = b * syb + t[:, None, None] * syt + h[None, :, None] * syh + d[None, None, :]
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1[:, None, :] + x2 * a[:, None, :]
    y2 = x2 * c2[:, None, :] + x1 * bb[:, None, :]
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, T, n_qh, n_kh, offset,
                 sqb, sqt, sqh, skb, skt, skh, sob, sot, soh, spb, spt, sph, scb, sct,
                 BACKWARD: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    t_ok = t < T
    t = t.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    cmask = t_ok[:, None] & (d < HALF)[None, :]
    c_off = b * scb + (t[:, None] + offset) * sct + d[None, :]  # (BLOCK_T, BLOCK_D); scb = 0: shared table
    c1 = tl.load(COS + c_off, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + c_off + HALF, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + c_off, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + c_off + HALF, mask=cmask, other=0.0).to(tl.float32)
    if BACKWARD:  # transposed rotation
        a = s2
        bb = -s1
    else:
        a = -s1
        bb = s2
    _rope_rotate(Q, QO, b, t, t_ok, c1, c2, a, bb, n_qh, sqb, sqt, sqh, sob, sot, soh, HALF, BLOCK_HQ, BLOCK_D)
    _rope_rotate(K, KO, b, t, t_ok, c1, c2, a, bb, n_kh, skb, skt, skh, spb, spt, sph, HALF, BLOCK_HK, BLOCK_D)


# -----------------------------------------------------------------------------
# launcher (custom op: opaque to torch.compile)

def _rope_fake(q, k, cos, sin, offset, backward):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@launcher("rope", _rope_fake)
def rope_launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int,
                backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k) as new contiguous tensors; backward=True applies the transposed rotation."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    assert k.shape[:2] == (B, T) and k.shape[3] == D and D % 2 == 0, f"rope: q {q.shape} vs k {k.shape}"
    assert cos.shape == sin.shape and cos.shape[-1] == D and cos.shape[-2] >= offset + T, \
        f"rope: cos/sin {tuple(cos.shape)} for T={T} at offset {offset}"
    assert cos.dim() == 2 or cos.shape[0] == B, f"rope: per-row cos/sin {tuple(cos.shape)} for batch {B}"
    q, k, cos, sin = (last_contiguous(t) for t in (q, k, cos, sin))
    if sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() == 0:
        return qo, ko
    half = D // 2
    block_d = next_pow2(half)
    block_hq, block_hk = next_pow2(Hq), next_pow2(Hk)
    per_token = (block_hq + block_hk) * block_d
    budget = 2048 if gpu(q) else 16384  # elements of each half per program (interpreter: bigger blocks)
    block_t = min(next_pow2(T), prev_pow2(budget // per_token))
    scb = cos.stride(0) if cos.dim() == 3 else 0
    (sqb, sqt, sqh), (skb, skt, skh) = q.stride()[:3], k.stride()[:3]  # (batch, position, head) strides
    (sob, sot, soh), (spb, spt, sph) = qo.stride()[:3], ko.stride()[:3]
    _rope_kernel[(cdiv(T, block_t), B)](
        Q=q, K=k, QO=qo, KO=ko, COS=cos, SIN=sin, T=T, n_qh=Hq, n_kh=Hk, offset=offset,
        sqb=sqb, sqt=sqt, sqh=sqh, skb=skb, skt=skt, skh=skh, sob=sob, sot=sot, soh=soh, spb=spb, spt=spt, sph=sph,
        scb=scb, sct=cos.stride(-2),
        BACKWARD=backward, HALF=half, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
        num_warps=4 if block_t * per_token >= 1024 else 1)
    return qo, ko


# -----------------------------------------------------------------------------
# autograd and module function

class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, offset):
        ctx.save_for_backward(cos, sin)
        ctx.offset = offset
        return rope_launch(q, k, cos, sin, offset, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = rope_launch(dq, dk, cos, sin, ctx.offset, True)
        return dq, dk, None, None, None


def rope(q, k, cos, sin, offset: int = 0):
    """Rotate q (B, T, Hq, D) and k (B, T, Hk, D) by cos/sin of shape (T', D) or (B, T', D), using
    table rows offset..offset+T-1. Returns the rotated (q, k); differentiable in q and k."""
    if not use_triton(q):
        return rope_torch(q, k, cos, sin, offset)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: the Triton kernel treats cos/sin as constants; use MINIMIND_KERNELS=torch "
                         "to differentiate through them")
    return RoPEFunction.apply(q, k, cos, sin, offset)
