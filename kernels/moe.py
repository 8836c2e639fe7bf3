"""Mixture-of-Experts routing and grouped expert SwiGLU FFN.

Axes: N = tokens, D = model dim, F = expert hidden dim, E = experts, K = experts per token.

    probs   = softmax(x @ Wr^T)                          (N, E), fp32
    w, idx  = topk(probs, K)                             (N, K)
    w       = w / sum(w)     if renormalise and K > 1    (with K = 1 renormalising makes every
                                                          weight the constant 1.0 and cuts the router
                                                          off from the LM loss, so it is skipped)
    y_n     = sum_k w_nk * FFN_{idx_nk}(x_n),   FFN_e(x) = (silu(x W1_e^T) * (x W3_e^T)) W2_e^T

PyTorch twins: `moe_route_torch`, `moe_experts_torch` (sort by expert + `F.grouped_mm`: no
host sync, no capacity drop). The Triton kernels land here too (see issue 3).
"""
import torch
import torch.nn.functional as F


def moe_route_torch(logits: torch.Tensor, top_k: int, renormalize: bool):
    probs = logits.float().softmax(dim=-1)  # (N, E)
    weights, experts = probs.topk(top_k, dim=-1)  # (N, K), (N, K)
    if renormalize and top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts, probs


def moe_experts_torch(x, weights, experts, w1, w3, w2):
    # x: (N, D); weights, experts: (N, K); w1, w3: (E, F, D); w2: (E, D, F)
    N, K = experts.shape
    E = w1.shape[0]
    flat = experts.reshape(-1)  # (N*K,) expert of each token slot
    order = flat.argsort(stable=True)  # slots grouped by expert
    token_of_slot = order // K  # (N*K,) source token of each sorted slot
    xs = x[token_of_slot]  # (N*K, D) tokens in expert order
    counts = torch.bincount(flat, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's group
    h = F.silu(F.grouped_mm(xs, w1.transpose(1, 2), offs=offs)) * F.grouped_mm(xs, w3.transpose(1, 2), offs=offs)
    ys = F.grouped_mm(h, w2.transpose(1, 2), offs=offs)  # (N*K, D)
    ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_slot, ys)  # combine the K slots per token


def moe_route(logits, top_k: int, renormalize: bool):
    """Router: logits (N, E) -> (weights (N, K) fp32, experts (N, K) int64, probs (N, E) fp32)."""
    return moe_route_torch(logits, top_k, renormalize)


def moe_experts(x, weights, experts, w1, w3, w2):
    """Expert SwiGLU FFN of each token's K experts, weighted and summed: (N, D) -> (N, D)."""
    return moe_experts_torch(x, weights, experts, w1, w3, w2)
