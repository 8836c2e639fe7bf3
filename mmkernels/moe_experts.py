"""Mixture-of-Experts expert FFN: each token's K routed experts (SwiGLU), weighted and summed.

Axes: N = tokens, D = model dim, F = expert hidden dim, E = experts, K = experts per token,
S = N*K token slots (slot s = n*K + k), R = rows of the padded sorted layout.

    y_n     = sum_k w_nk * FFN_{idx_nk}(x_n),   FFN_e(x) = (silu(x W1_e^T) * (x W3_e^T)) W2_e^T
(w, idx from the router, mmkernels/moe_route.py) computed as
    1. `moe_align`: sort the S slots by expert into contiguous groups, each padded to a multiple of
       BLOCK_M rows, so that every block of BLOCK_M rows belongs to one expert. Buffers are sized
       for the worst case, R = (cdiv(S, BLOCK_M) + E - 1) * BLOCK_M: no host sync, no token dropped.
    2. up:   h1, h3 = x[token(r)] @ W1_e^T, x[token(r)] @ W3_e^T ;  h = silu(h1) * h3   (R, F)
             (gathers the token rows itself: the (S, D) permuted copy of x is never built)
    3. down: ys = h @ W2_e^T                                                            (R, D)
    4. combine: y_n = sum_k w_nk * ys[row(n, k)]          (a gather per token: no atomics)
  backward, from dy (N, D):
    dw_nk        = <dy_n, ys[row(n, k)]>
    dh           = (w * dy[token(r)]) @ W2_e ;  dh1 = dh * h3 * silu'(h1),  dh3 = dh * silu(h1)
    dx_n         = sum_k (dh1 @ W1_e + dh3 @ W3_e)[row(n, k)]
    dW2_e        = sum_{r in e} (w * dy[token(r)])^T h[r]
    dW1_e, dW3_e = sum_{r in e} dh1[r]^T x[token(r)],  dh3[r]^T x[token(r)]
Every weight-gradient tile belongs to one program that walks its expert's rows: deterministic.

Layers: `moe_align` (torch ops) -> kernels `_moe_*_kernel` -> launchers (custom ops minimind::moe_up,
moe_gemm, moe_down_bwd, moe_wgrad, moe_combine, moe_combine_bwd) -> `MoEExpertsFunction` ->
`moe_experts`. PyTorch twin: `moe_experts_torch` (sort by expert + `F.grouped_mm`, itself a custom op
`grouped_mm`, in `MoEExpertsTorchFunction`: no host sync, no capacity drop).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mmkernels._triton import cdiv, dot_precision, gpu, jit, last_contiguous, launcher, next_pow2
from mmkernels.backend import use_triton

tl = None  # triton.language, bound on the first launch (mmkernels/_triton.py)


# -----------------------------------------------------------------------------
# PyTorch twin: the S slots sorted by expert (token order kept within an expert; groups padded on
# CPU in bf16/fp16, see CPU_LOWP_GROUP_ROWS), one GEMM per expert group through F.grouped_mm (on CPU
# aten runs it as a loop of mm's into slices of one output: measured as fast as a hand-written loop
# over contiguous slices, without a host sync on CUDA), forward and backward written out
# (`MoEExpertsTorchFunction`).

def _grouped_mm_fake(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[-1])


@launcher("grouped_mm", _grouped_mm_fake)
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of group g (offs[g-1]:offs[g]) of a (M, P) times b[g] (G, P, Q) -> (M, Q). A custom op under
    torch.compile because the meta function of aten._grouped_mm rejects fp32 on CPU."""
    return F.grouped_mm(a, b, offs=offs)


@launcher("grouped_mm_wgrad", lambda a, dy, offs: a.new_empty(offs.shape[0], a.shape[1], dy.shape[1]))
def grouped_mm_wgrad(a: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per group g: a_g^T dy_g, (G, P, Q) (zeros for an empty group): a weight gradient."""
    return F.grouped_mm(a.t(), dy, offs=offs)


# Rows per expert group in the twin's layout on CPU in bf16/fp16: oneDNN JIT-compiles a GEMM kernel
# for every new shape it meets, and routing gives every expert a new row count each step: a
# minimind-3 weight-gradient GEMM of a new shape took 4.1 ms and ~800 page faults, a seen one 2.2 ms.
# Padding each group to a multiple of 16 rows (zeros) leaves 1/16 of the shapes, all cached after a
# few steps, for ~3% more rows. fp32 runs MKL's sgemm, which compiles nothing: no padding there.
CPU_LOWP_GROUP_ROWS = 16


class MoEExpertsTorchFunction(torch.autograd.Function):
    """Autograd through the ops would keep four (R, F) activations (h1, silu(h1), h3, h) and build
    each weight gradient for the transposed view the GEMM reads, then copy it into the weight's
    layout: three extra (E, F, D) buffers a step. Here the forward keeps h1 and h3 only (the backward
    recomputes silu(h1) and h, two elementwise passes), and the weight gradients are written in
    nn.Linear layout directly; the gradient of an input that does not need one is not computed.
    Rows are the slots sorted by expert (`moe_align`), groups padded with zero rows on CPU in
    bf16/fp16 (CPU_LOWP_GROUP_ROWS), R = the rows in use."""

    @staticmethod
    def forward(ctx, x, weights, experts, w1, w3, w2):
        N, K = experts.shape
        E, S = w1.shape[0], experts.numel()
        pad = 1
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not torch.compiler.is_compiling():
            pad = CPU_LOWP_GROUP_ROWS
        _, row, _, start, size = moe_align(experts, E, pad)  # row: (S,) row of each slot
        row = row.long()
        offs = (start + (size + pad - 1) // pad * pad).to(torch.int32)  # (E,) end of each expert's group
        R = S if pad == 1 else int(offs[-1])  # a CPU tensor: no device sync
        tok = torch.arange(S, device=x.device) // K  # (S,) token of each slot
        xs = x.new_zeros(R, x.shape[1]).index_copy_(0, row, x.index_select(0, tok))  # (R, D) padding rows 0
        h1 = grouped_mm(xs, w1.transpose(1, 2), offs)  # (R, F)
        h3 = grouped_mm(xs, w3.transpose(1, 2), offs)  # (R, F)
        ys = grouped_mm(F.silu(h1).mul_(h3), w2.transpose(1, 2), offs).index_select(0, row)  # (S, D) unweighted
        ws = weights.reshape(-1)  # (S,) routing weight of each slot
        y = torch.zeros_like(x).index_add_(0, tok, ys * ws[:, None].to(ys.dtype))  # combine the K slots per token
        ctx.save_for_backward(xs, w1, w3, w2, h1, h3, ys, ws, row, tok, offs)
        ctx.top_k = K
        return y

    @staticmethod
    def backward(ctx, dy):
        xs, w1, w3, w2, h1, h3, ys, ws, row, tok, offs = ctx.saved_tensors
        need_x, need_w, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad
        dx = dweights = dw1 = dw3 = dw2 = None
        dys = dy.index_select(0, tok)  # (S, D) output gradient of each slot's token
        if need_w:  # dw[slot] = <dy[token], ys[slot]>, in fp32 as the weights
            dweights = (dys.float() * ys.float()).sum(1).view(-1, ctx.top_k).to(ws.dtype)
        g = torch.zeros_like(xs).index_copy_(0, row, dys.mul_(ws[:, None].to(dys.dtype)))  # (R, D) grad of ys
        s = F.silu(h1)  # (R, F)
        if need_w2:
            dw2 = grouped_mm_wgrad(g, s * h3, offs)  # (E, D, F): g_e^T h_e
        if need_x or need_w1 or need_w3:
            dh = grouped_mm(g, w2, offs)  # (R, F)
            dh3 = dh * s
            dh1 = torch.ops.aten.silu_backward(dh.mul_(h3), h1)  # dh * h3 * silu'(h1)
            if need_w1:
                dw1 = grouped_mm_wgrad(dh1, xs, offs)  # (E, F, D)
            if need_w3:
                dw3 = grouped_mm_wgrad(dh3, xs, offs)  # (E, F, D)
            if need_x:
                dxs = grouped_mm(dh1, w1, offs).add_(grouped_mm(dh3, w3, offs))  # (R, D)
                dx = torch.zeros_like(dy).index_add_(0, tok, dxs.index_select(0, row))
        return dx, dweights, None, dw1, dw3, dw2


def moe_experts_torch(x, weights, experts, w1, w3, w2):
    # x: (N, D); weights, experts: (N, K); w1, w3: (E, F, D); w2: (E, D, F)
    return MoEExpertsTorchFunction.apply(x, weights, experts, w1, w3, w2)


# -----------------------------------------------------------------------------
# the sorted layout (moe_align), shared by every kernel below

def moe_align(experts: torch.Tensor, n_experts: int, block_m: int):
    """Sort the S = N*K token slots (slot n*K + k routed to experts[n, k]) into per-expert groups,
    each padded to a multiple of `block_m` rows. Device-side torch ops only: no host sync.

    Returns (R = (cdiv(S, block_m) + E - 1) * block_m rows, capped at S blocks: the worst case)
        slot_of_row  (R,)   int32  slot held by each row; S for padding rows
        row_of_slot  (S,)   int32  row of each slot: the inverse permutation
        block_expert (R/block_m,) int32  expert of each block of rows; E for blocks past the last group
        group_start  (E,)   int32  first row of each expert's group
        group_size   (E,)   int32  slots routed to each expert
    Within a group, slots keep their order (stable sort): rows follow the tokens."""
    S, E = experts.numel(), n_experts
    dev = experts.device
    n_blocks = min(cdiv(S, block_m) + E - 1, S)
    flat = experts.reshape(-1)
    sorted_e, order = torch.sort(flat, stable=True)  # (S,), (S,)
    size = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (size + block_m - 1) // block_m * block_m
    end = padded.cumsum(0)
    start = end - padded  # (E,) padded group starts
    first = size.cumsum(0) - size  # (E,) unpadded group starts
    row = start[sorted_e] + torch.arange(S, device=dev) - first[sorted_e]  # (S,) row of each sorted slot
    row_of_slot = torch.empty(S, dtype=torch.int32, device=dev).scatter_(0, order, row.to(torch.int32))
    slot_of_row = torch.full((n_blocks * block_m,), S, dtype=torch.int32, device=dev)
    slot_of_row = slot_of_row.scatter(0, row, order.to(torch.int32))
    block_start = torch.arange(n_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(end, block_start, right=True).to(torch.int32)  # skips empty groups
    return slot_of_row, row_of_slot, block_expert, start.to(torch.int32), size.to(torch.int32)


# -----------------------------------------------------------------------------
# Triton kernels. GEMM programs are (block of BLOCK_M sorted rows, tile of BLOCK_N columns);
# BLOCK_EXPERT[block] is the block's expert, n_experts for blocks past the last group (they return).

@jit
def _moe_up_kernel(X, W1, W3, H, H1, H3, SLOT_OF_ROW, BLOCK_EXPERT, n_slots, n_experts, top_k, dim, hidden,
                   stride_x, stride_we, stride_wf, stride_wd,
                   SAVE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # h[r] = silu(x[tok] @ W1_e^T) * (x[tok] @ W3_e^T) for the rows r of one block; H1, H3 keep the
    # pre-activations for backward (SAVE)
    pid_m = tl.program_id(0)
    e = tl.load(BLOCK_EXPERT + pid_m)
    if e < n_experts:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(SLOT_OF_ROW + rows)
        row_ok = slot < n_slots  # padding rows hold slot n_slots
        tok = (slot // top_k).to(tl.int64)
        f = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        f_ok = f < hidden
        kk = tl.arange(0, BLOCK_K)
        x_off = tok[:, None] * stride_x + kk[None, :]  # (BLOCK_M, BLOCK_K)
        w_off = e.to(tl.int64) * stride_we + f[None, :] * stride_wf + kk[:, None] * stride_wd  # (BLOCK_K, BLOCK_N)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            k_ok = kk < dim - k0
            a = tl.load(X + x_off, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b1 = tl.load(W1 + w_off, mask=k_ok[:, None] & f_ok[None, :], other=0.0)
            b3 = tl.load(W3 + w_off, mask=k_ok[:, None] & f_ok[None, :], other=0.0)
            acc1 = tl.dot(a, b1, acc1, input_precision=PRECISION)
            acc3 = tl.dot(a, b3, acc3, input_precision=PRECISION)
            x_off += BLOCK_K
            w_off += BLOCK_K * stride_wd
        h = acc1 * tl.sigmoid(acc1) * acc3
        out = rows.to(tl.int64)[:, None] * hidden + f[None, :]
        tl.store(H + out, h.to(H.dtype.element_ty), mask=f_ok[None, :])
        if SAVE:
            tl.store(H1 + out, acc1.to(H1.dtype.element_ty), mask=f_ok[None, :])
            tl.store(H3 + out, acc3.to(H3.dtype.element_ty), mask=f_ok[None, :])


@jit
def _moe_gemm_kernel(A, B, A2, B2, C, SLOT_OF_ROW, BLOCK_EXPERT, n_slots, n_experts, n_k, n_n,
                     stride_a, stride_be, stride_bk, stride_bn,
                     DUAL: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # C[r] = A[r] @ B_e (+ A2[r] @ B2_e when DUAL), A in the sorted layout, B_e read as (k, n) through
    # strides (so W or W^T); A2, B2 share the strides of A, B. C is (R, n_n), contiguous.
    pid_m = tl.program_id(0)
    e = tl.load(BLOCK_EXPERT + pid_m)
    if e < n_experts:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = tl.load(SLOT_OF_ROW + rows) < n_slots
        rows = rows.to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < n_n
        kk = tl.arange(0, BLOCK_K)
        a_off = rows[:, None] * stride_a + kk[None, :]
        b_off = e.to(tl.int64) * stride_be + kk[:, None] * stride_bk + n[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, n_k, BLOCK_K):
            k_ok = kk < n_k - k0
            a_mask = row_ok[:, None] & k_ok[None, :]
            b_mask = k_ok[:, None] & n_ok[None, :]
            acc = tl.dot(tl.load(A + a_off, mask=a_mask, other=0.0), tl.load(B + b_off, mask=b_mask, other=0.0),
                         acc, input_precision=PRECISION)
            if DUAL:
                acc = tl.dot(tl.load(A2 + a_off, mask=a_mask, other=0.0),
                             tl.load(B2 + b_off, mask=b_mask, other=0.0), acc, input_precision=PRECISION)
            a_off += BLOCK_K
            b_off += BLOCK_K * stride_bk
        tl.store(C + rows[:, None] * n_n + n[None, :], acc.to(C.dtype.element_ty), mask=n_ok[None, :])


@jit
def _moe_down_bwd_kernel(DY, ROUTE_W, W2, H1, H3, DH1, DH3, SLOT_OF_ROW, BLOCK_EXPERT, n_slots, n_experts, top_k,
                         dim, hidden, stride_dy, stride_we, stride_wd, stride_wf, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # dh[r] = (w[slot] * dy[tok]) @ W2_e, then the SwiGLU backward:
    #   dh1 = dh * h3 * sig(h1) * (1 + h1 * (1 - sig(h1))),   dh3 = dh * h1 * sig(h1)
    pid_m = tl.program_id(0)
    e = tl.load(BLOCK_EXPERT + pid_m)
    if e < n_experts:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(SLOT_OF_ROW + rows)
        row_ok = slot < n_slots
        tok = (slot // top_k).to(tl.int64)
        scale = tl.load(ROUTE_W + slot, mask=row_ok, other=0.0).to(tl.float32)  # (BLOCK_M,)
        f = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        f_ok = f < hidden
        kk = tl.arange(0, BLOCK_K)
        a_off = tok[:, None] * stride_dy + kk[None, :]
        b_off = e.to(tl.int64) * stride_we + kk[:, None] * stride_wd + f[None, :] * stride_wf
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            k_ok = kk < dim - k0
            a = tl.load(DY + a_off, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            a = (a * scale[:, None]).to(W2.dtype.element_ty)
            b = tl.load(W2 + b_off, mask=k_ok[:, None] & f_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_off += BLOCK_K
            b_off += BLOCK_K * stride_wd
        out = rows.to(tl.int64)[:, None] * hidden + f[None, :]
        h1 = tl.load(H1 + out, mask=f_ok[None, :], other=0.0).to(tl.float32)
        h3 = tl.load(H3 + out, mask=f_ok[None, :], other=0.0).to(tl.float32)
        sig = tl.sigmoid(h1)
        dh1 = acc * h3 * sig * (1.0 + h1 * (1.0 - sig))
        dh3 = acc * h1 * sig
        tl.store(DH1 + out, dh1.to(DH1.dtype.element_ty), mask=f_ok[None, :])
        tl.store(DH3 + out, dh3.to(DH3.dtype.element_ty), mask=f_ok[None, :])


@jit
def _moe_wgrad_kernel(G, G2, X, ROUTE_W, DW, DW2, SLOT_OF_ROW, GROUP_START, GROUP_SIZE, n_slots, top_k, n_n, n_k,
                      stride_g, stride_x,
                      G_TOKENS: tl.constexpr, X_TOKENS: tl.constexpr, DUAL: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # DW_e[n, k] = sum over the rows r of expert e of G[r, n] * X[r, k] (DW2 likewise from G2).
    # G_TOKENS: row r of G is w[slot] * G[tok] (dy); X_TOKENS: row r of X is X[tok] (x); else sorted rows.
    # Program (tile, e): one (BLOCK_N, BLOCK_K) tile of one expert, whole; DW is (E, n_n, n_k) contiguous.
    e = tl.program_id(1)
    tiles_k = tl.cdiv(n_k, BLOCK_K)
    n = (tl.program_id(0) // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = (tl.program_id(0) % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = n < n_n
    k_ok = k < n_k
    start = tl.load(GROUP_START + e)
    size = tl.load(GROUP_SIZE + e)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, size, BLOCK_M):
        i = r0 + tl.arange(0, BLOCK_M)
        row_ok = i < size
        rows = (start + i).to(tl.int64)
        slot = tl.load(SLOT_OF_ROW + rows, mask=row_ok, other=0)
        tok = (slot // top_k).to(tl.int64)
        if G_TOKENS:
            g_rows = tok
        else:
            g_rows = rows
        if X_TOKENS:
            x_rows = tok
        else:
            x_rows = rows
        g_off = g_rows[:, None] * stride_g + n[None, :]
        g_mask = row_ok[:, None] & n_ok[None, :]
        g = tl.load(G + g_off, mask=g_mask, other=0.0)  # (BLOCK_M, BLOCK_N)
        if G_TOKENS:
            scale = tl.load(ROUTE_W + slot, mask=row_ok, other=0.0).to(tl.float32)
            g = (g.to(tl.float32) * scale[:, None]).to(X.dtype.element_ty)
        xv = tl.load(X + x_rows[:, None] * stride_x + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), xv, acc, input_precision=PRECISION)
        if DUAL:
            g2 = tl.load(G2 + g_off, mask=g_mask, other=0.0)
            acc2 = tl.dot(tl.trans(g2), xv, acc2, input_precision=PRECISION)
    out = e.to(tl.int64) * n_n * n_k + n[:, None] * n_k + k[None, :]
    tl.store(DW + out, acc.to(DW.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
    if DUAL:
        tl.store(DW2 + out, acc2.to(DW2.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


@jit
def _moe_combine_kernel(YS, ROUTE_W, ROW_OF_SLOT, Y, n_tokens, dim, stride_ys,
                        HAS_WEIGHTS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # y[t] = sum_k w[t, k] * YS[row(t, k)]   (w = 1 without HAS_WEIGHTS); Y is (N, dim) contiguous
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < n_tokens
    mask = t_ok[:, None] & (d < dim)[None, :]
    t = t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        row = tl.load(ROW_OF_SLOT + t * TOP_K + i, mask=t_ok, other=0).to(tl.int64)
        v = tl.load(YS + row[:, None] * stride_ys + d[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            v = v * tl.load(ROUTE_W + t * TOP_K + i, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(Y + t[:, None] * dim + d[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@jit
def _moe_combine_bwd_kernel(DY, YS, ROW_OF_SLOT, DW, n_slots, dim, top_k, stride_dy, stride_ys,
                            BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # dw[slot] = <dy[tok], YS[row(slot)]>
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < n_slots
    tok = (s // top_k).to(tl.int64)
    row = tl.load(ROW_OF_SLOT + s, mask=s_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = s_ok[:, None] & (d < dim)[None, :]
        dy = tl.load(DY + tok[:, None] * stride_dy + d[None, :], mask=mask, other=0.0).to(tl.float32)
        ys = tl.load(YS + row[:, None] * stride_ys + d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += dy * ys
    tl.store(DW + s, tl.sum(acc, axis=1), mask=s_ok)


# -----------------------------------------------------------------------------
# launch configuration. BLOCK_M also fixes the padding of the sorted layout (moe_align), so it is
# one number per device kind; the rest may differ per kernel. Tuned for nothing yet on GPU (first
# guesses for H100-class parts); tests shrink the CPU blocks to exercise more of the tiling.

GEMM_CONFIG = {  # up, gemm (also down_bwd), wgrad: (BLOCK_N, BLOCK_K, num_warps, num_stages)
    "cuda": dict(block_m=64, up=(64, 64, 4, 3), gemm=(128, 64, 8, 3), wgrad=(64, 64, 4, 3)),
    "cpu": dict(block_m=16, up=(32, 32, 1, 1), gemm=(32, 32, 1, 1), wgrad=(32, 32, 1, 1)),
}


def _config(t: torch.Tensor) -> dict:
    return GEMM_CONFIG["cuda" if gpu(t) else "cpu"]


# -----------------------------------------------------------------------------
# launchers (custom ops: opaque to torch.compile)

@launcher("moe_up", lambda x, w1, w3, slot_of_row, block_expert, top_k, save: (
    x.new_empty(slot_of_row.shape[0], w1.shape[1]),
    *(x.new_empty(slot_of_row.shape[0] if save else 0, w1.shape[1]) for _ in range(2))))
def moe_up(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, slot_of_row: torch.Tensor, block_expert: torch.Tensor,
           top_k: int, save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = silu(x W1_e^T) * (x W3_e^T) in the sorted layout (R, F); (h1, h3) pre-activations if save."""
    (N, D), (E, Fh, _) = x.shape, w1.shape
    R = slot_of_row.shape[0]
    x = last_contiguous(x)
    w1, w3 = w1.contiguous(), w3.contiguous()
    h = x.new_empty(R, Fh)
    h1, h3 = (x.new_empty(R if save else 0, Fh) for _ in range(2))
    if R == 0:
        return h, h1, h3
    cfg = _config(x)
    block_n, block_k, warps, stages = cfg["up"]
    stride_we, stride_wf, stride_wd = w1.stride()  # (E, F, D): w3 shares them
    _moe_up_kernel[(R // cfg["block_m"], cdiv(Fh, block_n))](
        X=x, W1=w1, W3=w3, H=h, H1=h1 if save else h, H3=h3 if save else h, SLOT_OF_ROW=slot_of_row,
        BLOCK_EXPERT=block_expert, n_slots=N * top_k, n_experts=E, top_k=top_k, dim=D, hidden=Fh,
        stride_x=x.stride(0), stride_we=stride_we, stride_wf=stride_wf, stride_wd=stride_wd,
        SAVE=save, PRECISION=dot_precision(x.dtype), BLOCK_M=cfg["block_m"], BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    return h, h1, h3


@launcher("moe_gemm", lambda a, b, a2, b2, slot_of_row, block_expert, n_slots, trans_b:
          a.new_empty(a.shape[0], b.shape[1] if trans_b else b.shape[2]))
def moe_gemm(a: torch.Tensor, b: torch.Tensor, a2: Optional[torch.Tensor], b2: Optional[torch.Tensor],
             slot_of_row: torch.Tensor, block_expert: torch.Tensor, n_slots: int, trans_b: bool) -> torch.Tensor:
    """Sorted-layout grouped GEMM: c[r] = a[r] @ b_e (+ a2[r] @ b2_e), b (E, P, Q) used as (P, Q), or as
    its transpose (Q, P) if trans_b (nn.Linear weights)."""
    R, n_k = a.shape
    E = b.shape[0]
    n_n = b.shape[1] if trans_b else b.shape[2]
    a = last_contiguous(a)
    b = b.contiguous()
    if a2 is not None:
        a2, b2 = last_contiguous(a2), b2.contiguous()
        assert a2.stride() == a.stride() and b2.shape == b.shape
    c = a.new_empty(R, n_n)
    if R == 0:
        return c
    sbe, sbp, sbq = b.stride()
    stride_bk, stride_bn = (sbq, sbp) if trans_b else (sbp, sbq)
    cfg = _config(a)
    block_n, block_k, warps, stages = cfg["gemm"]
    _moe_gemm_kernel[(R // cfg["block_m"], cdiv(n_n, block_n))](
        A=a, B=b, A2=a2 if a2 is not None else a, B2=b2 if b2 is not None else b, C=c, SLOT_OF_ROW=slot_of_row,
        BLOCK_EXPERT=block_expert, n_slots=n_slots, n_experts=E, n_k=n_k, n_n=n_n,
        stride_a=a.stride(0), stride_be=sbe, stride_bk=stride_bk, stride_bn=stride_bn,
        DUAL=a2 is not None, PRECISION=dot_precision(a.dtype), BLOCK_M=cfg["block_m"], BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return c


@launcher("moe_down_bwd", lambda dy, weights, w2, h1, h3, slot_of_row, block_expert, top_k: (
    h1.new_empty(h1.shape), h1.new_empty(h1.shape)))
def moe_down_bwd(dy: torch.Tensor, weights: torch.Tensor, w2: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor,
                 slot_of_row: torch.Tensor, block_expert: torch.Tensor,
                 top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh1, dh3) (R, F): the down projection and the SwiGLU, backward."""
    (N, D), (E, _, Fh) = dy.shape, w2.shape
    R = slot_of_row.shape[0]
    dy, w2, weights = last_contiguous(dy), w2.contiguous(), weights.contiguous()
    dh1, dh3 = h1.new_empty(h1.shape), h1.new_empty(h1.shape)
    if R == 0:
        return dh1, dh3
    cfg = _config(dy)
    block_n, block_k, warps, stages = cfg["gemm"]
    stride_we, stride_wd, stride_wf = w2.stride()  # (E, D, F)
    _moe_down_bwd_kernel[(R // cfg["block_m"], cdiv(Fh, block_n))](
        DY=dy, ROUTE_W=weights, W2=w2, H1=h1, H3=h3, DH1=dh1, DH3=dh3, SLOT_OF_ROW=slot_of_row,
        BLOCK_EXPERT=block_expert, n_slots=N * top_k, n_experts=E, top_k=top_k, dim=D, hidden=Fh,
        stride_dy=dy.stride(0), stride_we=stride_we, stride_wd=stride_wd, stride_wf=stride_wf,
        PRECISION=dot_precision(w2.dtype), BLOCK_M=cfg["block_m"], BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    return dh1, dh3


def _wgrad_outputs(g, g2, x, n_experts: int):
    """(dw, dw2), (E, n_n, n_k) each; dw2 empty without g2."""
    shape = (n_experts, g.shape[1], x.shape[1])
    return x.new_empty(shape), x.new_empty(shape if g2 is not None else (0,))


def _wgrad_fake(g, g2, x, weights, slot_of_row, group_start, group_size, top_k, n_slots, g_tokens, x_tokens):
    return _wgrad_outputs(g, g2, x, group_start.shape[0])


@launcher("moe_wgrad", _wgrad_fake)
def moe_wgrad(g: torch.Tensor, g2: Optional[torch.Tensor], x: torch.Tensor, weights: Optional[torch.Tensor],
              slot_of_row: torch.Tensor, group_start: torch.Tensor, group_size: torch.Tensor, top_k: int,
              n_slots: int, g_tokens: bool, x_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """dW_e = sum over expert e's rows of g[r]^T x[r] (E, n_n, n_k), and dW2_e from g2 when given.
    g_tokens: g is token-major (N, n_n), row r reading weights[slot] * g[token]; x_tokens: x is token-major."""
    E, n_n, n_k = group_start.shape[0], g.shape[1], x.shape[1]
    g, x = last_contiguous(g), last_contiguous(x)
    if g2 is not None:
        g2 = last_contiguous(g2)
        assert g2.stride() == g.stride()
    dw, dw2 = _wgrad_outputs(g, g2, x, E)
    cfg = _config(x)
    block_n, block_k, warps, stages = cfg["wgrad"]
    _moe_wgrad_kernel[(cdiv(n_n, block_n) * cdiv(n_k, block_k), E)](
        G=g, G2=g2 if g2 is not None else g, X=x, ROUTE_W=weights.contiguous() if weights is not None else x,
        DW=dw, DW2=dw2 if g2 is not None else dw, SLOT_OF_ROW=slot_of_row, GROUP_START=group_start,
        GROUP_SIZE=group_size, n_slots=n_slots, top_k=top_k, n_n=n_n, n_k=n_k,
        stride_g=g.stride(0), stride_x=x.stride(0),
        G_TOKENS=g_tokens, X_TOKENS=x_tokens, DUAL=g2 is not None, PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg["block_m"], BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return dw, dw2


@launcher("moe_combine", lambda ys, weights, row_of_slot, top_k:
          ys.new_empty(row_of_slot.shape[0] // top_k, ys.shape[1]))
def moe_combine(ys: torch.Tensor, weights: Optional[torch.Tensor], row_of_slot: torch.Tensor,
                top_k: int) -> torch.Tensor:
    """y[n] = sum_k weights[n, k] * ys[row(n, k)] (N, D); plain sum when weights is None."""
    N, D = row_of_slot.shape[0] // top_k, ys.shape[1]
    ys = last_contiguous(ys)
    y = ys.new_empty(N, D)
    if N == 0:
        return y
    block_d = min(next_pow2(D), 256 if gpu(ys) else 1024)
    block_t = max(1, (4096 if gpu(ys) else 16384) // block_d)
    _moe_combine_kernel[(cdiv(N, block_t), cdiv(D, block_d))](
        YS=ys, ROUTE_W=weights.contiguous() if weights is not None else ys, ROW_OF_SLOT=row_of_slot, Y=y,
        n_tokens=N, dim=D, stride_ys=ys.stride(0),
        HAS_WEIGHTS=weights is not None, TOP_K=top_k, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return y


@launcher("moe_combine_bwd", lambda dy, ys, row_of_slot, top_k:
          dy.new_empty(row_of_slot.shape[0] // top_k, top_k, dtype=torch.float32))
def moe_combine_bwd(dy: torch.Tensor, ys: torch.Tensor, row_of_slot: torch.Tensor, top_k: int) -> torch.Tensor:
    """dweights[n, k] = <dy[n], ys[row(n, k)]>, (N, K) fp32."""
    S, D = row_of_slot.shape[0], ys.shape[1]
    dy, ys = last_contiguous(dy), last_contiguous(ys)
    dw = torch.empty(S // top_k, top_k, dtype=torch.float32, device=dy.device)
    if S == 0:
        return dw
    block_d = min(next_pow2(D), 128 if gpu(dy) else 1024)
    block_s = max(1, (4096 if gpu(dy) else 16384) // block_d)
    _moe_combine_bwd_kernel[(cdiv(S, block_s),)](
        DY=dy, YS=ys, ROW_OF_SLOT=row_of_slot, DW=dw, n_slots=S, dim=D, top_k=top_k, stride_dy=dy.stride(0),
        stride_ys=ys.stride(0), BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)
    return dw


# -----------------------------------------------------------------------------
# autograd and module function

class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, experts, w1, w3, w2):
        N, K = experts.shape
        plan = moe_align(experts, w1.shape[0], _config(x)["block_m"])
        slot_of_row, row_of_slot, block_expert, group_start, group_size = plan
        save = any(ctx.needs_input_grad)
        h, h1, h3 = moe_up(x, w1, w3, slot_of_row, block_expert, top_k=K, save=save)  # (R, F) each
        ys = moe_gemm(h, w2, None, None, slot_of_row, block_expert, n_slots=N * K, trans_b=True)  # (R, D) unweighted
        y = moe_combine(ys, weights, row_of_slot, top_k=K)  # (N, D)
        if save:
            ctx.save_for_backward(x, weights, w1, w3, w2, h, h1, h3, ys, *plan)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weights, w1, w3, w2, h, h1, h3, ys, slot_of_row, row_of_slot, block_expert, group_start, group_size = \
            ctx.saved_tensors
        N, K = weights.shape
        need_x, need_w, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad
        dx = dweights = dw1 = dw3 = dw2 = None
        if need_w:
            dweights = moe_combine_bwd(dy, ys, row_of_slot, top_k=K).to(weights.dtype)  # (N, K)
        if need_x or need_w1 or need_w3:
            dh1, dh3 = moe_down_bwd(dy, weights, w2, h1, h3, slot_of_row, block_expert, top_k=K)  # (R, F) each
            if need_x:
                dxs = moe_gemm(dh1, w1, dh3, w3, slot_of_row, block_expert, n_slots=N * K, trans_b=False)  # (R, D)
                dx = moe_combine(dxs, None, row_of_slot, top_k=K)  # (N, D)
            if need_w1 or need_w3:  # dh1, dh3 in sorted rows; x read per token
                dw1, dw3 = moe_wgrad(dh1, dh3, x, None, slot_of_row, group_start, group_size, top_k=K, n_slots=N * K,
                                     g_tokens=False, x_tokens=True)  # (E, F, D) each
        if need_w2:  # dy read per token and scaled by the routing weight; h in sorted rows
            dw2, _ = moe_wgrad(dy, None, h, weights, slot_of_row, group_start, group_size, top_k=K, n_slots=N * K,
                               g_tokens=True, x_tokens=False)  # (E, D, F)
        return dx, dweights, None, dw1, dw3, dw2


def moe_experts(x, weights, experts, w1, w3, w2):
    """Expert SwiGLU FFN of each token's K experts, weighted and summed: (N, D) -> (N, D).

    x: (N, D); weights: (N, K) (fp32 from `moe_route`); experts: (N, K) int64; w1, w3: (E, F, D) and
    w2: (E, D, F), nn.Linear layout per expert. Under autocast, x and the expert weights are cast to
    the autocast dtype (as nn.Linear would be). Differentiable in x, weights, w1, w3, w2."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w3, w2 = (t.to(dtype) for t in (x, w1, w3, w2))
    if not use_triton(x):
        return moe_experts_torch(x, weights, experts, w1, w3, w2)
    assert x.dtype == w1.dtype == w3.dtype == w2.dtype, "moe_experts: x and the expert weights must share a dtype"
    return MoEExpertsFunction.apply(x, weights, experts, w1, w3, w2)
