"""minimind: a small Llama3/Qwen3-style language model, dense or Mixture-of-Experts.

    from minimind import MiniMind, PRESETS
    model = MiniMind(PRESETS["tiny"])
    logits, loss = model(idx, targets)          # idx, targets: (B, T) int64

Architecture choices (all presets):
- decoder-only transformer, pre-norm RMSNorm (fp32 statistics), no biases anywhere
- rotary position embedding (rotate-half convention), theta = 1e6, optional YaRN scaling for
  inference beyond the training context
- grouped-query attention through `F.scaled_dot_product_attention` (causal; block-diagonal when
  rows pack several documents); optional RMSNorm of each q/k head (Qwen3)
- SwiGLU feed-forward; or a Mixture-of-Experts of SwiGLU experts: softmax router, top-k,
  renormalised for k > 1 (for k = 1 too with `norm_top1`, MiniMind-3's routing), optional always-on
  shared experts (DeepSeek), load-balance aux loss
- tied input embedding and output head, vocabulary 6400
- a preallocated KV cache for decoding (written in place, never grown by torch.cat)
- a compiled decode step (`decode_step`, gpt-fast's approach): one token per row with shapes that
  do not change from step to step (attention over a window of the whole cache, masked; the slot
  written given as a tensor), under torch.compile: inductor's C++ on CPU, CUDA graphs on GPU; the
  prefill stays eager, and so does decoding unless asked (`compiled=True`, `--compile`)
- one sampler for every row of a batch (SamplingParams, Sampler): temperature, top-k, top-p,
  repetition/frequency/presence penalties, a seeded generator per row; used by generate, sample.py,
  engine.py (serve.py) alike
- no host syncs in forward: the dense model compiles with `fullgraph=True`
- optional activation checkpointing per block (`grad_checkpoint`, torch.utils.checkpoint without
  reentrance): backward recomputes each block's insides from its input
"""
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import mmkernels


# -----------------------------------------------------------------------------
# config and presets

@dataclass
class ModelConfig:
    vocab_size: int = 6400
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: Optional[int] = None  # None: dim // n_heads
    ffn_dim: int = 1408  # SwiGLU hidden size (of each expert, for MoE)
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm on each q and k head before RoPE (Qwen3)
    rope_theta: float = 1e6
    rope_scaling: Optional[dict] = None  # {"type": "yarn", "factor": 16, "original_max_position_embeddings": 2048}
    max_seq_len: int = 32768  # longest context a KV cache may be built for
    n_experts: int = 0  # 0: dense model
    n_shared_experts: int = 0  # MoE: experts every token goes through
    top_k: int = 1  # MoE: routed experts per token
    norm_topk: bool = True  # MoE: renormalise the top-k weights to sum to 1 (only meaningful for k > 1)
    # MoE, top-1: renormalise the single weight too, so it is exactly 1.0 (MiniMind-3-MoE; Qwen3-MoE's
    # norm_topk_prob=true with K=1). Off by default: the router then gets no gradient from the LM loss,
    # only from the aux loss. MiniMind-3 pairs it with aux_loss_coef=5e-4.
    norm_top1: bool = False
    aux_loss_coef: float = 0.01  # MoE: weight of the load-balance loss in the total loss
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        assert self.head_dim % 2 == 0, "RoPE needs an even head_dim"
        assert self.n_experts == 0 or 1 <= self.top_k <= self.n_experts
        assert not self.norm_top1 or (self.n_experts and self.top_k == 1), "norm_top1 is for top-1 MoE routing"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    # fits a 2-core CPU: ~4.5M parameters, trains in minutes
    "tiny": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=704),
    "tiny-moe": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=704, n_experts=4, top_k=1,
                            qk_norm=True),  # Qwen3-MoE-like, so that it exports
    # MiniMind2 family (Llama-like: no q/k norm)
    "minimind2-small": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1408),  # 25.8M
    "minimind2": ModelConfig(dim=768, n_layers=16, n_heads=8, n_kv_heads=2, ffn_dim=2048),  # 104.0M
    "minimind2-moe": ModelConfig(dim=640, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1728,
                                 n_experts=4, n_shared_experts=1, top_k=2),  # 145.0M
    # MiniMind-3 family (Qwen3-like: q/k norm, head_dim 96)
    "minimind-3": ModelConfig(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=96, ffn_dim=2432,
                              qk_norm=True, norm_eps=1e-6),  # 63.9M
    "minimind-3-moe": ModelConfig(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=96, ffn_dim=2432,
                                  qk_norm=True, norm_eps=1e-6, n_experts=4, top_k=1),  # 198.4M, 63.9M active
}


# -----------------------------------------------------------------------------
# primitives

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return mmkernels.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear with faster decoding steps on CPU, where a few rows make y = x @ W^T bound by reading W
    (fp32, no autograd; training and CUDA, where cuBLAS streams a gemv well, use F.linear):
    - at most DECODE_ROWS rows traced by torch.compile: a multiply-and-sum over W's rows, which
      inductor turns into one vectorised pass over the weight. At so few rows the extern sgemm copies
      (packs) the weight before reading it, twice the memory traffic: one thread, the
      multiply-and-sum decodes 2-3x faster at batch 1, 1.2-1.8x at 2-4 rows;
    - otherwise up to SPLIT_ROWS rows: `split_linear`, W's rows in slices that the threads share
      (eager: `cpu_gemv`, a slice per thread; compiled: COMPILED_SLICES, since the thread count
      cannot be read inside a graph)."""
    DECODE_ROWS = 4
    SPLIT_ROWS = 16
    COMPILED_SLICES = 8

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if rows > self.SPLIT_ROWS or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        if not torch.compiler.is_compiling():
            return cpu_gemv(x, self.weight, self.bias)
        w = self.weight  # (O, I)
        if rows <= self.DECODE_ROWS:
            y = (x.reshape(rows, 1, -1) * w[None]).sum(-1)  # (N, O)
        elif splits(w, self.COMPILED_SLICES, x.dtype):
            y = split_linear(x.reshape(rows, -1), w, self.COMPILED_SLICES)  # (N, O)
        else:
            return F.linear(x, w, self.bias)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], w.shape[0])


def splits(w, parts: int, dtype) -> bool:
    """Whether x @ w^T goes through split_linear: fp32 (the dtype MKL's sgemm serves), no autograd,
    `parts` > 1 dividing w's rows, and w at least 2**17 elements (a smaller one stays in cache,
    where the bmm's own cost is the larger)."""
    O, I = w.shape
    return (parts > 1 and O % parts == 0 and O * I >= 2 ** 17 and dtype == w.dtype == torch.float32
            and not torch.is_grad_enabled())


def split_linear(x, w, parts: int):
    """x (N, I) @ w^T for w (O, I), as one bmm over `parts` slices of w's rows, whose batch (the
    slices) aten spreads over the threads -> (N, O)."""
    rows, (O, I) = x.shape[0], w.shape
    ws = w.view(parts, O // parts, I).transpose(1, 2)  # (P, I, O/P): slice p holds rows p*O/P.. of w
    y = torch.bmm(x[None].expand(parts, rows, I), ws)  # (P, N, O/P)
    return y.transpose(0, 1).reshape(rows, O)  # (N, O), the slices side by side


def cpu_gemv(x, w, bias=None):
    """F.linear(x, w, bias) for a few rows of x (..., I) on CPU, eager: a slice of w's rows per thread
    (split_linear) where `splits` allows. MKL's sgemv, what F.linear runs for one row, uses one thread
    (2-core EPYC, minimind-3's shapes, cold weights: 13-18 GB/s, split 24-30 GB/s, a plain read
    26-30), and its sgemm at 4-64 rows ran 0.5-0.9x as fast as the split."""
    parts = torch.get_num_threads()
    if not splits(w, parts, x.dtype):
        return F.linear(x, w, bias)
    y = split_linear(x.reshape(-1, w.shape[1]), w, parts).view(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict):
    """YaRN (Peng et al. 2023) frequencies and attention factor, as transformers computes them:
    high frequencies are kept, low ones are interpolated by `factor`, a linear ramp in between."""
    factor = scaling["factor"]
    orig = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
    attn_factor = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(n_rot):  # the dim whose wavelength completes n_rot turns in `orig` positions
        return head_dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, attn_factor


def rope_cache(cfg: ModelConfig, seq_len: int):
    """cos, sin tables of shape (seq_len, head_dim), fp32."""
    d = cfg.head_dim
    if cfg.rope_scaling:
        inv_freq, attn_factor = yarn_inv_freq(d, cfg.rope_theta, cfg.rope_scaling)
    else:
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        attn_factor = 1.0
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D): rotate-half layout
    return emb.cos() * attn_factor, emb.sin() * attn_factor


WINDOW = 128  # the compiled decode step attends to the smallest multiple of WINDOW slots holding every filled one


def cache_slots(max_len: int) -> int:
    """Slots a KV cache allocates for `max_len` positions: rounded up to a multiple of WINDOW, plus
    one, so that no decode window (a multiple of WINDOW) ever has the buffer's length. torch.compile
    gives equal sizes one symbol (duck shaping) and would recompile when they part."""
    return -(-max_len // WINDOW) * WINDOW + 1


class KVCache(nn.Module):
    """Preallocated keys and values of every layer, written in place as decoding advances.

    `pad` (B,) counts left-padding tokens of each row (batched prompts of different lengths):
    those slots are never attended to and positions of a row start after its padding.

    Continuous batching changes the rows between decode steps: `admit` adds a row prefilled alone,
    `keep` drops rows. Both reallocate (only then, never per token) with `room` free positions.

    The buffers hold `cache_slots(max_len)` slots, a few more than max_len positions. The compiled
    decode step (MiniMind.step) writes slot `at`, a device tensor, then `advance`s."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype, pad=None):
        super().__init__()
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, cache_slots(max_len), cfg.head_dim)  # (L, B, Hk, S, D)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.pad = pad.to(device, copy=True) if pad is not None else None  # its own tensor, not a view
        self._no_pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.len = 0  # filled positions, a Python int: decoding is host-driven anyway
        self._at, self._at_len = None, None  # `at`, and the len it holds

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def pads(self):
        """(B,) padding slots of each row (zeros when there is no padding)."""
        return self.pad if self.pad is not None else self._no_pad

    @property
    def at(self):
        """(1,) int64 on the cache's device: the slot the next token goes to (= len), kept there
        across steps so that a step copies nothing from the host."""
        if self._at is None or self._at_len != self.len:
            self._at, self._at_len = torch.tensor([self.len], device=self.k.device), self.len
        return self._at

    def advance(self):
        """One position was written at `at` (by MiniMind.decode_step)."""
        self.at.add_(1)
        self.len += 1
        self._at_len = self.len

    def update(self, layer: int, k, v):
        # k, v: (B, Hk, T, D) for the T new positions; returns all keys/values so far
        T = k.shape[2]
        if self.len + T > self.max_len:
            raise ValueError(f"KV cache full: {self.len} + {T} > {self.max_len} positions")
        self.k[layer, :, :, self.len:self.len + T] = k
        self.v[layer, :, :, self.len:self.len + T] = v
        end = self.len + T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def _replace(self, batch_size: int, length: int, room: int, pad, fill):
        """Swap in new buffers of length + room positions that `fill(new, name)` copies into ("k",
        then "v"); nothing changes when an allocation or a copy fails."""
        L, _, Hk, _, D = self.k.shape
        new = {}
        for name in ("k", "v"):
            new[name] = torch.zeros(L, batch_size, Hk, cache_slots(length + room), D, device=self.k.device,
                                    dtype=self.k.dtype)
            fill(new[name], name)
        self.k, self.v, self.pad, self.len, self.max_len = new["k"], new["v"], pad, length, length + room

    def admit(self, row: "KVCache", room: int):
        """Append `row`, a one-row cache prefilled alone (no padding), as the last row. The shared
        length becomes max(len, row.len): a shorter prompt is left-padded, a longer one shifts the
        batch right. Positions are pad-relative, so every row's keys keep their positions."""
        B, L, P = self.batch_size, self.len, row.len
        n = max(L, P)
        pad = torch.cat([self.pads + (n - L), torch.tensor([n - P], device=self.k.device)])

        def fill(new, name):  # new: (L, B + 1, Hk, n + room, D)
            new[:, :B, :, n - L:n] = getattr(self, name)[:, :, :, :L]
            new[:, B, :, n - P:n] = getattr(row, name)[:, 0, :, :P]
        self._replace(B + 1, n, room, pad, fill)

    def keep(self, rows: list, room: int):
        """Keep only `rows` (indices, in their order), dropping the leading columns that are padding
        for every row kept, so the shared length stays the longest kept row's own length."""
        ix = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        pad = self.pads[ix]
        trim = int(pad.min()) if rows else self.len
        n = self.len - trim

        def fill(new, name):  # new: (L, len(rows), Hk, n + room, D)
            new[:, :, :, :n] = getattr(self, name)[:, ix, :, trim:self.len]
        self._replace(len(rows), n, room, pad - trim, fill)


# -----------------------------------------------------------------------------
# attention, feed-forward, mixture of experts

class StaticKV:
    """The KV cache as `MiniMind.decode_step` sees it: the whole (L, B, Hk, S, D) key and value
    buffers, the slot `at` ((1,) int64 tensor) this step writes and the window of slots attention
    reads. `update` writes in place and returns the window, filled or not (the step's mask hides the
    rest), so that no shape depends on how full the cache is. It writes with index_put_ into the
    buffer itself: torch.compile keeps that in place, where a write into a view of the buffer (one
    layer) is functionalised into a copy of the whole layer, every step."""

    def __init__(self, k, v, at, window: int):
        self.k, self.v, self.at, self.window = k, v, at, window

    def update(self, layer: int, k, v):
        # k, v: (B, Hk, 1, D) -> the layer's keys/values in the window's slots, (B, Hk, W, D)
        layer_ix = torch.tensor([layer], device=self.at.device)
        self.k[layer_ix, :, :, self.at] = k[:, :, 0][None]  # index_put_ into the buffer
        self.v[layer_ix, :, :, self.at] = v[:, :, 0][None]
        return self.k[layer, :, :, :self.window], self.v[layer, :, :, :self.window]


_COMPILED = {}


def compiled_decode_step(device_type: str):
    """MiniMind.decode_step under torch.compile, one per device type for every model (dynamo
    recompiles only for a new configuration or shape): inductor's C++/OpenMP code on CPU; on CUDA
    with CUDA graphs (mode="reduce-overhead", as gpt-fast does), so a step is one graph launch."""
    if device_type not in _COMPILED:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[device_type] = torch.compile(MiniMind.decode_step, mode=mode, fullgraph=True)
    return _COMPILED[device_type]


def padded_attention(key_pos, query_pos, pad):
    """Attention mask (B, 1, Tq, Tk) and rope positions (B, Tq) of left-padded rows: row b's first
    pad[b] slots are padding. key_pos (Tk,), query_pos (Tq,): slots on the cache's time axis.

    Causal; padding keys are never attended to; a padding query attends to itself only, so that its
    (unused) output stays finite instead of a softmax over nothing. Positions start after the padding."""
    keys, queries, pad = key_pos[None, None, :], query_pos[None, :, None], pad[:, None, None]
    mask = ((keys <= queries) & (keys >= pad)) | (keys == queries)  # (B, Tq, Tk)
    return mask[:, None], (query_pos[None, :] - pad[:, :, 0]).clamp(min=0)


def decode_attention(q, k, v, mask):
    """SDPA for one query per row, spelt out: q (B, Hq, 1, D), k, v (B, Hk, W, D), mask (B, 1, 1, W)."""
    B, Hq, _, D = q.shape
    Hk, W = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hk, Hq // Hk, 1, D)  # (B, Hk, G, 1, D): the query heads sharing each kv head
    s = (qg * k[:, :, None]).sum(-1) * D ** -0.5  # (B, Hk, G, W)
    s = s.masked_fill(~mask.reshape(B, 1, 1, W), float("-inf"))
    p = s.softmax(-1)
    y = (p[..., None] * v[:, :, None]).sum(-2)  # (B, Hk, G, D)
    return y.reshape(B, Hq, 1, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask=None, cache: Optional[KVCache] = None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, Hq, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hk, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hk, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = mmkernels.rope(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hk, T_past + T, D)
        # causal without a mask: SDPA aligns the causal triangle to the top-left, so with a cache
        # (T_past > 0) the caller passes an explicit mask unless T == 1 (attend to everything)
        is_causal = mask is None and T > 1
        if isinstance(cache, StaticKV) and x.device.type == "cpu" and torch.compiler.is_compiling():
            y = decode_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, Hq*D)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)  # gate
        self.w3 = Linear(dim, hidden, bias=False)  # up
        self.w2 = Linear(hidden, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Routed SwiGLU experts (weights stacked per expert for grouped GEMMs) + optional shared experts.

    N = tokens, D = dim, F = expert hidden, E = routed experts, K = experts per token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, Fh = cfg.n_experts, cfg.dim, cfg.ffn_dim
        self.top_k, self.norm_topk, self.norm_top1, self.n_experts = cfg.top_k, cfg.norm_topk, cfg.norm_top1, E
        self.router = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, Fh, D))  # gate, nn.Linear layout (out, in) per expert
        self.w3 = nn.Parameter(torch.empty(E, Fh, D))  # up
        self.w2 = nn.Parameter(torch.empty(E, D, Fh))  # down
        self.shared = nn.ModuleList(FeedForward(D, Fh) for _ in range(cfg.n_shared_experts))
        self.aux_loss = None  # load-balance loss of the last forward

    def forward(self, x):
        B, T, D = x.shape
        xf = x.reshape(B * T, D)  # (N, D)
        weights, experts, probs = mmkernels.moe_route(self.router(xf), self.top_k, self.norm_topk)  # (N, K), (N, K), (N, E)
        if self.norm_top1:  # MiniMind-3: p / p, exactly 1.0 (the kernels renormalise only for K > 1)
            weights = weights / weights.sum(dim=-1, keepdim=True)  # (N, 1)
        y = mmkernels.moe_experts(xf, weights, experts, self.w1, self.w3, self.w2)  # (N, D)
        for shared in self.shared:
            y = y + shared(xf)
        if self.training:
            # Switch-Transformer balance loss: E * sum_e (fraction of slots sent to e) * (mean prob of e);
            # equals 1 when routing is uniform. Counts carry no gradient; the probs do.
            frac = torch.zeros_like(probs[0]).scatter_add_(0, experts.reshape(-1),
                                                           torch.ones_like(experts.reshape(-1), dtype=probs.dtype))
            frac = frac / experts.numel()
            self.aux_loss = self.n_experts * (frac * probs.mean(0)).sum()
        return y.view(B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.n_experts else FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, mask=None, cache=None):
        a = self.attn(self.attn_norm(x), cos, sin, mask, cache)
        h, x = mmkernels.add_rms_norm(x, a, self.ffn_norm.weight, self.ffn_norm.eps)  # x += a; h = norm(x), one pass
        return x + self.ffn(h)


# -----------------------------------------------------------------------------
# the model

class MiniMind(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.rope_len = 0
        self.grad_checkpoint = False  # training: keep each block's input only, recompute its insides in backward
        self._grow_rope(4096)
        self.init_weights()

    def init_weights(self):
        """All initialisation in one place: N(0, 0.02) for embeddings and projections, residual
        output projections scaled by 1/sqrt(2 * n_layers) (GPT-2), norms at 1."""
        std = 0.02
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight", ".w2")):
                nn.init.normal_(p, std=resid_std)
            else:
                nn.init.normal_(p, std=std)

    def _grow_rope(self, seq_len: int):
        cos, sin = rope_cache(self.config, seq_len)
        dev = self.embed.weight.device
        self.register_buffer("rope_cos", cos.to(dev), persistent=False)
        self.register_buffer("rope_sin", sin.to(dev), persistent=False)
        self.rope_len = seq_len

    def num_params(self, active: bool = False) -> int:
        """Parameters (the tied embedding counted once). active=True counts only the experts a
        token goes through."""
        n = sum(p.numel() for p in self.parameters())
        cfg = self.config
        if active and cfg.n_experts:
            per_expert = 3 * cfg.dim * cfg.ffn_dim
            n -= cfg.n_layers * (cfg.n_experts - cfg.top_k) * per_expert
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 * active matmul params + attention
        (PaLM appendix B). The embedding lookup is free; the tied head is a matmul and counts."""
        cfg = self.config
        n = self.num_params(active=True)
        attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len / 2  # causal: half the scores
        return 6 * n + attn

    def forward(self, idx, targets=None, *, pos=None, doc=None, cache: Optional[KVCache] = None,
                return_hidden: bool = False):
        """idx: (B, T) token ids. targets: (B, T), -1 = ignored. Returns (logits, loss).

        pos: (B, T) positions, default 0..T-1 (packed rows restart them per document).
        doc: (B, T) document ids of packed rows: attention stays inside a document.
        cache: a KVCache to decode with; logits are then computed for the last position only.
        return_hidden: return (logits, loss, hidden) with the final-normed hidden states (B, T, C)
        the logits are computed from (a value head reads them: train.py --mode=ppo)."""
        B, T = idx.shape
        x = self.embed(idx)  # (B, T, C)
        start = cache.len if cache is not None else 0  # positions already in the cache
        mask = None  # None: plain causal attention (or, for one new token, attend to all)
        if cache is not None and cache.pad is not None:
            key_pos = torch.arange(start + T, device=idx.device)  # (Tk,)
            mask, pos = padded_attention(key_pos, key_pos[start:], cache.pad)  # (B, 1, T, Tk), (B, T)
        elif cache is not None and start > 0 and T > 1:
            key_pos = torch.arange(start + T, device=idx.device)
            mask = key_pos[None, :] <= key_pos[start:, None]  # (T, Tk) causal, offset by the past
        elif doc is not None:
            same_doc = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (same_doc & causal)[:, None]  # (B, 1, T, T)
        if start + T > self.rope_len:
            self._grow_rope(max(start + T, 2 * self.rope_len))
        if pos is not None:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (B, T, D)
        else:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, D)
        recompute = self.grad_checkpoint and self.training and cache is None and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:  # activation checkpointing: ~1 block's activations at a time, ~1/3 more compute
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.len += T
            x = x[:, -1:]
        x = self.norm(x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            if self.config.n_experts and self.training and self.config.aux_loss_coef:
                aux = sum(block.ffn.aux_loss for block in self.layers)
                loss = loss + self.config.aux_loss_coef * aux
        if return_hidden:
            return logits, loss, x
        return logits, loss

    # -------------------------------------------------------------------------
    # generation

    def new_cache(self, batch_size: int, max_len: int, pad=None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype, pad)

    def decode_step(self, tokens, k, v, pad, at, key_pos):
        """Logits (B, V) of the next token of every row after `tokens` (B,): the graph that
        torch.compile captures. k, v: a KVCache's (L, B, Hk, S, D) buffers, this step's keys and
        values written at slot `at` ((1,) int64); pad (B,): each row's padding slots; key_pos (W,) =
        0..W-1: the slots attention reads, W > at, the unfilled ones masked."""
        mask, pos = padded_attention(key_pos, at, pad)  # (B, 1, 1, W), (B, 1)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (B, 1, D)
        x = self.embed(tokens[:, None])  # (B, 1, C)
        kv = StaticKV(k, v, at, key_pos.shape[0])
        for block in self.layers:
            x = block(x, cos, sin, mask, kv)
        return self.lm_head(self.norm(x))[:, 0]  # (B, V)

    @torch.no_grad()
    def step(self, tokens, cache: KVCache, compiled: bool = False):
        """Feed one token per row (B,) into `cache` (prefilled by forward) -> next-token logits (B, V).
        compiled: through `compiled_decode_step` (torch.compile), else eager; the same tokens either way."""
        if cache.len >= cache.max_len:
            raise ValueError(f"KV cache full: {cache.len} + 1 > {cache.max_len} positions")
        if cache.max_len > self.rope_len:
            self._grow_rope(max(cache.max_len, 2 * self.rope_len))
        if not compiled:  # eager: forward, which slices the cache to its filled length
            logits, _ = self(tokens[:, None], cache=cache)
            return logits[:, -1]
        key_pos = torch.arange((cache.len // WINDOW + 1) * WINDOW, device=tokens.device)  # the window, > len
        # what changes between steps or requests is dynamic, so that it compiles once: batch, window,
        # cache length (batch 1 gets a graph of its own: torch.compile specialises sizes 0 and 1)
        for t in (tokens, cache.pads, key_pos):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        for t in (cache.k, cache.v):
            torch._dynamo.maybe_mark_dynamic(t, [1, 3])
            if t.is_cuda:  # a CUDA graph writes it in place, at its address: re-recorded, not recompiled,
                torch._dynamo.mark_static_address(t)  # when the engine reallocates the cache
        logits = compiled_decode_step(tokens.device.type)(self, tokens, cache.k, cache.v, cache.pads, cache.at,
                                                          key_pos)
        cache.advance()
        return logits

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens: int, params=None, eos_id: Optional[int] = None, pad=None,
                        compiled: bool = False, **sampling):
        """Yield the next token of every row, (B,) int64, for up to `max_new_tokens` steps.

        idx: (B, T) prompts, left-padded when their lengths differ (`left_pad`), `pad` (B,) giving
        each row's number of padding tokens. params: a SamplingParams per row, or one for every row
        (then row i of a seeded batch draws from seed + i), or None: SamplingParams(**sampling),
        e.g. temperature=0 for greedy. Rows that produced `eos_id` keep yielding `eos_id`; the
        stream ends when every row has (or after max_new_tokens). compiled: every step after the
        prefill through torch.compile (`step`): the same tokens, each faster, after a one-off compile."""
        B, T = idx.shape
        if params is None:
            params = SamplingParams(**sampling)
        if isinstance(params, SamplingParams):
            params = params.for_rows(B)
        sampler = Sampler(self.config.vocab_size, idx.device)
        sampler.add(params, idx, pad)
        cache = self.new_cache(B, T + max_new_tokens, pad)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        logits = self(idx, cache=cache)[0][:, -1]  # (B, V): the prefill, eager
        for _ in range(max_new_tokens):
            nxt = sampler.sample(logits)  # (B,), -1 where a row's logits are not finite
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            failed, finished = torch.stack([(nxt < 0).any(), done.all()]).tolist()  # one sync a step
            if failed:
                raise RuntimeError(f"rows {(nxt < 0).nonzero().flatten().tolist()}: logits are not finite")
            sampler.update(nxt)
            yield nxt
            if finished:
                return
            logits = self.step(nxt, cache, compiled)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, **kw):
        """Return idx with up to `max_new_tokens` generated tokens appended, (B, T + n)."""
        out = [idx]
        for tok in self.generate_stream(idx, max_new_tokens, **kw):
            out.append(tok[:, None])
        return torch.cat(out, dim=1)


def left_pad(prompts: list, pad_id: int = 0, device=None):
    """Prompts (lists of ids, any lengths) -> (idx (B, T) left-padded with pad_id, pad (B,))."""
    T = max(len(p) for p in prompts)
    pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long, device=device)
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    return idx, pad


# -----------------------------------------------------------------------------
# sampling: one sampler for generate, sample.py, the serving engine and RL rollouts

@dataclass
class SamplingParams:
    """How one row picks its tokens. Each setting has one "off" value."""
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # sample among the k most likely tokens; 0: off
    top_p: float = 1.0  # nucleus: the smallest set of most likely tokens holding this much mass; 1: off
    repetition_penalty: float = 1.0  # CTRL: logits of tokens in prompt or output / p if > 0, * p if < 0; 1: off
    frequency_penalty: float = 0.0  # OpenAI: logit -= p * (times the token was generated); 0: off
    presence_penalty: float = 0.0  # OpenAI: logit -= p if the token was generated at all; 0: off
    seed: Optional[int] = None  # the row's own torch.Generator; None: torch's global one

    # (name, low, high, low excluded, integer): NaN fails every comparison, so it is out of every range
    LIMITS = (("temperature", 0, 1e4, False, False), ("top_k", 0, math.inf, False, True),
              ("top_p", 0, 1, True, False), ("repetition_penalty", 1e-2, 1e4, False, False),
              ("frequency_penalty", -2, 2, False, False), ("presence_penalty", -2, 2, False, False))

    def __post_init__(self):
        for name, lo, hi, open_lo, integer in self.LIMITS:
            v = getattr(self, name)
            kind = int if integer else (int, float)
            if not (isinstance(v, kind) and not isinstance(v, bool) and (lo < v if open_lo else lo <= v) and v <= hi):
                raise ValueError(f"{name} must be {'an integer' if integer else 'a finite number'} in "
                                 f"{'(' if open_lo else '['}{lo:g}, {hi:g}], got {v!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and -2 ** 63 <= self.seed < 2 ** 63):
            raise ValueError(f"seed must be a 64-bit integer, in [-2**63, 2**63), got {self.seed!r}")

    def for_rows(self, n: int) -> list:
        """These settings for n rows; seeded rows get seed, seed + 1, ... (independent samples)."""
        if self.seed is None:
            return [self] * n
        return [replace(self, seed=(self.seed + i + 2 ** 63) % 2 ** 64 - 2 ** 63) for i in range(n)]


class Sampler:
    """The sampling state of a batch, one row per sequence: per-row settings as (B,) tensors, the
    tokens each row has seen (prompt and output, for the repetition penalty) and generated (counts,
    for the frequency and presence penalties), one torch.Generator per seeded row.

    A row draws from its own generator once per step, so its tokens do not depend on the other rows:
    greedy decoding is the same alone or batched, and a seed reproduces a sample anywhere. What every
    row does is known on the host (all greedy, no penalty, no filter), so no step syncs to find out.
    B = rows, V = vocabulary."""

    def __init__(self, vocab_size: int, device):
        self.vocab_size, self.device = vocab_size, device
        self.params, self.generators = [], []
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # (B, V) in prompt or output
        self.counts = torch.zeros(0, vocab_size, device=device)  # (B, V) times generated
        self.settings = torch.zeros(0, 6, device=device)  # (B, 6) the numbers of each row's SamplingParams
        self._flags()

    def _flags(self):
        ps = self.params
        self.all_greedy = all(p.temperature == 0 for p in ps)
        self.any_filter = any(p.top_k or p.top_p < 1 for p in ps)
        self.any_repetition = any(p.repetition_penalty != 1 for p in ps)
        self.any_frequency = any(p.frequency_penalty or p.presence_penalty for p in ps)
        self.any_generator = any(g is not None for g in self.generators)

    def add(self, params: list, prompts, pad=None):
        """Append rows: params, one SamplingParams per row; prompts (n, T) ids, left-padded by pad (n,)."""
        n, T = prompts.shape
        generators = []
        for p in params:
            g = None
            if p.seed is not None:
                g = torch.Generator(device=self.device)
                g.manual_seed(p.seed)
            generators.append(g)
        valid = torch.ones(n, T, device=self.device)
        if pad is not None:  # padding is not part of the prompt
            valid = (torch.arange(T, device=self.device)[None, :] >= pad.to(self.device)[:, None]).float()
        seen = torch.zeros(n, self.vocab_size, device=self.device).scatter_add_(1, prompts.to(self.device), valid) > 0
        settings = torch.tensor([[p.temperature, min(p.top_k, self.vocab_size) or self.vocab_size, p.top_p,
                                  p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
                                dtype=torch.float32, device=self.device)  # (n, 6)
        self.seen = torch.cat([self.seen, seen])  # nothing changed until every piece is built
        self.counts = torch.cat([self.counts, torch.zeros(n, self.vocab_size, device=self.device)])
        self.settings = torch.cat([self.settings, settings])
        self.params, self.generators = self.params + list(params), self.generators + generators
        self._flags()

    def keep(self, rows: list):
        """Keep only `rows` (indices, in their order)."""
        ix = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.seen, self.counts, self.settings = self.seen[ix], self.counts[ix], self.settings[ix]
        self.params = [self.params[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        self._flags()

    def update(self, tokens):
        """Record the tokens (B,) just sampled."""
        if not (self.any_repetition or self.any_frequency):  # no row reads seen or counts
            return
        t = tokens.clamp(min=0)[:, None]  # (B, 1); -1 marks a failed row, about to leave
        self.seen.scatter_(1, t, True)
        self.counts.scatter_add_(1, t, torch.ones_like(self.counts[:, :1]))

    def sample(self, logits):
        """One token per row from logits (B, V): (B,) int64, -1 where a row's logits are not finite
        (nothing can be sampled from NaN; the caller decides what that row's failure means)."""
        x = logits.float()
        temperature, top_k, top_p, rep, freq, pres = self.settings.unbind(1)  # (B,) each
        if self.any_repetition:
            rep = rep[:, None]
            x = torch.where(self.seen, torch.where(x > 0, x / rep, x * rep), x)
        if self.any_frequency:
            x = x - freq[:, None] * self.counts - pres[:, None] * (self.counts > 0)
        ok = torch.isfinite(x).all(dim=-1)  # (B,)
        tokens = x.argmax(dim=-1)  # (B,) greedy
        if not self.all_greedy:
            x = x / temperature.clamp(min=1e-5)[:, None]
            order = None
            if self.any_filter:
                x, order = x.sort(dim=-1, descending=True)  # (B, V), most likely first
                V = x.shape[-1]
                x = x.masked_fill(torch.arange(V, device=x.device)[None, :] >= top_k[:, None], float("-inf"))
            p = x.softmax(dim=-1)
            if self.any_filter:  # the smallest head of the sorted tokens reaching top_p
                p = p.masked_fill(p.cumsum(dim=-1) - p > top_p[:, None], 0.0)
            # inverse transform sampling, one uniform draw per row from the row's own generator
            cdf = p.cumsum(dim=-1)  # (B, V)
            if self.any_generator:
                u = torch.stack([torch.rand((), generator=g, device=x.device) for g in self.generators])
            else:
                u = torch.rand(len(self.generators), device=x.device)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
            if order is not None:
                pick = order.gather(1, pick)
            tokens = torch.where(temperature > 0, pick.squeeze(1), tokens)
            ok = ok & (torch.isfinite(cdf[:, -1]) | (temperature == 0))
        return torch.where(ok, tokens, torch.full_like(tokens, -1))
