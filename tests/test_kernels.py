"""Kernel tests: each Triton kernel against its PyTorch twin (or a loop reference), forward and every
gradient, over odd shapes and per-dtype tolerances; the MoE permutation; torch.compile; the backend switch.

    pytest tests/test_kernels.py -q          # CPU: Triton kernels run in the interpreter (~1-2 min)

On CPU, TRITON_INTERPRET=1 is set below before anything imports triton (the kernel files import it on
their first launch, so importing `mmkernels` or `minimind` earlier is fine). The interpreter's bf16
arithmetic is broken and its fp32 -> bf16 stores truncate instead of rounding: bf16 is tested as
storage only (kernels do fp32 math), with bf16 tolerances, and not at all in the MoE GEMMs (tl.dot).
On a CUDA machine the same tests run the compiled kernels on the GPU (the bf16 limits then still hold).
"""
import os
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# triton reads TRITON_INTERPRET when it is imported: too late if something imported it before us
_TRITON_TOO_EARLY = DEVICE == "cpu" and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
_SET_INTERPRET = DEVICE == "cpu" and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # unset again after this module's tests (see `scope`)

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mmkernels  # noqa: E402
from mmkernels.moe_experts import GEMM_CONFIG, moe_align, moe_experts, moe_experts_torch  # noqa: E402
from mmkernels.moe_route import moe_route, moe_route_torch  # noqa: E402
from mmkernels.rms_norm import add_rms_norm, add_rms_norm_torch, rms_norm, rms_norm_torch  # noqa: E402
from mmkernels.rope import rope, rope_torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or _TRITON_TOO_EARLY,
    reason="triton missing, or imported before TRITON_INTERPRET=1 could be set: run this file on its own")

# relative tolerance per dtype, applied as rtol and as atol scaled by the reference's largest value
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(actual, expected, dtype, scale=1.0, what=""):
    tol = TOL[dtype] * scale
    atol = tol * max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=tol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True, scope="module")
def scope(one_thread):  # tiny tensors: one thread avoids OpenMP oversubscription on a busy 2-core CI machine
    backend = mmkernels.get_backend()
    yield
    mmkernels.set_backend(backend)  # later test files run the backend they expect, not interpreted Triton
    if _SET_INTERPRET:  # later tests' subprocesses should not inherit the interpreter
        os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture
def triton_backend():
    old = mmkernels.get_backend()
    mmkernels.set_backend("triton")
    yield
    mmkernels.set_backend(old)


def grads_of(fn, inputs, out_grads=None, seed=0):
    """Outputs of fn(*inputs) and the gradients of every input that requires grad, for fixed random
    output gradients (the same for both implementations)."""
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff = [o for o in outs if o.requires_grad]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dys = [torch.randn(o.shape, generator=g, device=DEVICE).to(o.dtype) for o in diff]
    torch.autograd.backward(diff, dys)
    return outs, [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def compare(triton_fn, torch_fn, inputs, dtype, scale=1.0):
    old = mmkernels.get_backend()
    mmkernels.set_backend("triton")
    outs, grads = grads_of(triton_fn, inputs)
    mmkernels.set_backend("torch")
    ref_outs, ref_grads = grads_of(torch_fn, inputs)
    mmkernels.set_backend(old)
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"output {i}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        check(a, b, dtype, scale, f"output {i}")
    assert len(grads) == len(ref_grads)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a is not None and a.dtype == b.dtype, f"grad {i}"
        check(a, b, dtype, scale, f"grad {i}")


# -----------------------------------------------------------------------------
# backend switch

def test_backend_switch(monkeypatch):
    """set_backend validates its argument; MINIMIND_KERNELS is read when mmkernels/backend.py is imported."""
    import importlib
    old = mmkernels.get_backend()
    try:
        with pytest.raises(ValueError):
            mmkernels.set_backend("cuda")
        mmkernels.set_backend("torch")
        assert not mmkernels.use_triton(torch.zeros(1, device=DEVICE))
        mmkernels.set_backend("auto")
        assert mmkernels.use_triton(torch.zeros(1, device=DEVICE)) == (DEVICE == "cuda")
        monkeypatch.setenv("MINIMIND_KERNELS", "triton")
        importlib.reload(mmkernels.backend)
        assert mmkernels.get_backend() == "triton"
        monkeypatch.setenv("MINIMIND_KERNELS", "fast")
        with pytest.raises(ValueError, match="MINIMIND_KERNELS"):
            importlib.reload(mmkernels.backend)
    finally:
        monkeypatch.delenv("MINIMIND_KERNELS")
        importlib.reload(mmkernels.backend)
        mmkernels.set_backend(old)


def test_cpu_auto_never_imports_triton():
    """Plain CPU use (auto) runs the twins: a MoE model trains a step without importing triton."""
    code = ("import sys, torch, mmkernels; from minimind import MiniMind, PRESETS, ModelConfig\n"
            "cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48,\n"
            "                  n_experts=3, top_k=2)\n"
            "idx = torch.randint(0, 64, (1, 8)); MiniMind(cfg)(idx, idx)[1].backward()\n"
            "assert 'triton' not in sys.modules, 'triton was imported'\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MINIMIND_KERNELS", "TRITON_INTERPRET")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# -----------------------------------------------------------------------------
# RMSNorm

RMS_SHAPES = [(1, 1, 16), (2, 37, 200), (5, 123, 96)]  # a single token, non-power-of-two dims, odd rows


@needs_triton
@pytest.mark.parametrize("shape", RMS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(triton_backend, shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).requires_grad_()  # fp32 weight, as under autocast
    compare(lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: rms_norm_torch(x, w, 1e-5), (x, w), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_strided_input(triton_backend, dtype):
    """A view with row strides (q heads sliced out of a fused projection) and a transposed one."""
    torch.manual_seed(0)
    base = torch.randn(3, 11, 6, 40, device=DEVICE).to(dtype).requires_grad_()
    w = torch.randn(40, device=DEVICE, dtype=dtype, requires_grad=True)
    compare(lambda b, w: rms_norm(b[:, :, 1:5], w, 1e-6), lambda b, w: rms_norm_torch(b[:, :, 1:5], w, 1e-6),
            (base, w), dtype)
    w2 = torch.randn(11, device=DEVICE, dtype=dtype, requires_grad=True)
    compare(lambda b, w: rms_norm(b.transpose(1, 3), w, 1e-6), lambda b, w: rms_norm_torch(b.transpose(1, 3), w, 1e-6),
            (base, w2), dtype)


@needs_triton
@pytest.mark.parametrize("shape", RMS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(triton_backend, shape, dtype):
    """Fused residual add: both outputs (y and the new residual h) carry gradients."""
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    r = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).requires_grad_()
    # bf16: the interpreter truncates h where PyTorch rounds; the normalised rows then differ by an ulp
    compare(lambda x, r, w: add_rms_norm(x, r, w, 1e-5), lambda x, r, w: add_rms_norm_torch(x, r, w, 1e-5),
            (x, r, w), dtype, scale=2.0 if dtype == torch.bfloat16 else 1.0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_rms_norm_mixed_dtypes(triton_backend, dtype):
    """Under autocast: an fp32 residual stream plus a low-precision block output; y and h are fp32
    and each input gets its gradient in its own dtype."""
    torch.manual_seed(0)
    x = torch.randn(2, 37, 200, device=DEVICE, requires_grad=True)
    r = torch.randn(2, 37, 200, device=DEVICE).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(200, device=DEVICE)).requires_grad_()
    compare(lambda x, r, w: add_rms_norm(x, r, w, 1e-5), lambda x, r, w: add_rms_norm_torch(x, r, w, 1e-5),
            (x, r, w), dtype)  # the residual's gradient is stored in `dtype`


# -----------------------------------------------------------------------------
# RoPE

ROPE_SHAPES = [(1, 1, 4, 2, 8), (2, 37, 6, 2, 24), (3, 17, 8, 8, 96)]  # (B, T, Hq, Hk, D)


def _rope_inputs(B, T, Hq, Hk, D, dtype, per_row, offset):
    # q and k sliced out of a fused qkv projection: strided views, as a model would pass them
    qkv = torch.randn(B, T, Hq + 2 * Hk, D, device=DEVICE).to(dtype).requires_grad_()
    angles = torch.rand((B, T + offset, D // 2) if per_row else (T + offset, D // 2), device=DEVICE) * 6.3
    emb = torch.cat((angles, angles), dim=-1)
    return qkv, emb.cos(), emb.sin()


@needs_triton
@pytest.mark.parametrize("shape", ROPE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row,offset", [(False, 0), (True, 0), (False, 5), (True, 3)])
def test_rope(triton_backend, shape, dtype, per_row, offset):
    torch.manual_seed(0)
    B, T, Hq, Hk, D = shape
    qkv, cos, sin = _rope_inputs(B, T, Hq, Hk, D, dtype, per_row, offset)

    def run(fn):
        return lambda qkv: fn(qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hk], cos, sin, offset)

    compare(run(rope), run(rope_torch), (qkv,), dtype)


@needs_triton
def test_rope_general_tables(triton_backend):
    """Tables whose halves differ (not the model's repeated frequencies) still match the twin."""
    torch.manual_seed(0)
    q = torch.randn(2, 9, 3, 10, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 9, 1, 10, device=DEVICE, requires_grad=True)
    cos, sin = torch.randn(9, 10, device=DEVICE), torch.randn(9, 10, device=DEVICE)
    compare(lambda q, k: rope(q, k, cos, sin), lambda q, k: rope_torch(q, k, cos, sin), (q, k), torch.float32)
    with pytest.raises(ValueError, match="constants"):
        rope(q, k, cos.requires_grad_(), sin)


# -----------------------------------------------------------------------------
# MoE routing

def _distinct_logits(N, E, dtype):
    # distinct values in each row, exactly representable in fp16/bf16: top-k has no ties to break
    ranks = torch.stack([torch.randperm(E) for _ in range(N)]).float()
    return (ranks * 0.375 + torch.randn(N, 1).round()).to(DEVICE).to(dtype).requires_grad_()


@needs_triton
@pytest.mark.parametrize("N", [1, 37])
@pytest.mark.parametrize("E,K", [(2, 1), (7, 1), (7, 2), (7, 7)])  # prime E; K = E
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_route(triton_backend, N, E, K, renormalize, dtype):
    torch.manual_seed(0)
    logits = _distinct_logits(N, E, dtype)
    weights, experts, probs = moe_route(logits, K, renormalize)
    ref_w, ref_e, ref_p = moe_route_torch(logits, K, renormalize)
    assert experts.dtype == torch.int64 and weights.dtype == probs.dtype == torch.float32
    assert torch.equal(experts, ref_e)
    # gradients through both differentiable outputs (weights: LM loss, probs: balance loss)
    compare(lambda l: moe_route(l, K, renormalize)[::2], lambda l: moe_route_torch(l, K, renormalize)[::2],
            (logits,), dtype if dtype != torch.float32 else torch.float32)


# -----------------------------------------------------------------------------
# MoE permutation

@pytest.mark.parametrize("N,E,K,block_m", [(1, 5, 1, 16), (37, 5, 2, 16), (37, 7, 7, 4), (200, 3, 2, 64),
                                            (50, 13, 1, 8)])
def test_moe_align_round_trip(N, E, K, block_m):
    torch.manual_seed(0)
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(N)]).to(DEVICE)
    if E > 3:
        experts = torch.where(experts == 1, 0, experts)  # expert 1 receives no token
    slot_of_row, row_of_slot, block_expert, group_start, group_size = moe_align(experts, E, block_m)
    S = N * K
    R = slot_of_row.numel()
    assert R % block_m == 0 and R >= S
    real = slot_of_row[slot_of_row < S]
    assert torch.equal(real.sort().values, torch.arange(S, device=DEVICE, dtype=torch.int32)), "each slot exactly once"
    assert (slot_of_row == S).sum() == R - S, "the rest is padding"
    assert torch.equal(slot_of_row[row_of_slot.long()], torch.arange(S, device=DEVICE, dtype=torch.int32)), "inverse"
    flat = experts.reshape(-1)
    assert torch.equal(group_size.long(), torch.bincount(flat, minlength=E))
    for e in range(E):  # contiguous groups in expert order, block-aligned, tokens in order within a group
        start, size = group_start[e].item(), group_size[e].item()
        assert start % block_m == 0
        slots = slot_of_row[start:start + size].long()
        assert (flat[slots] == e).all() and (slots.diff() > 0).all()
        first, last = start // block_m, (start + size - 1) // block_m
        assert size == 0 or (block_expert[first:last + 1] == e).all()
    used = sum((s + block_m - 1) // block_m for s in group_size.tolist())
    assert (block_expert[used:] == E).all() and (block_expert[:used] < E).all()
    if E > 3:
        assert group_size[1] == 0


# -----------------------------------------------------------------------------
# MoE experts

def moe_loop_reference(x, weights, experts, w1, w3, w2):
    """A loop over experts in fp32: the independent reference for both implementations."""
    xf, wf = x.float(), weights.float()
    y = torch.zeros_like(xf)
    for e in range(w1.shape[0]):
        tok, k = torch.where(experts == e)
        h = F.silu(xf[tok] @ w1[e].float().t()) * (xf[tok] @ w3[e].float().t())
        y = y.index_add(0, tok, (h @ w2[e].float().t()) * wf[tok, k, None])
    return y.to(x.dtype)


def _moe_inputs(N, E, K, D, Fh, dtype, skip_experts=()):
    torch.manual_seed(0)
    choices = [e for e in range(E) if e not in skip_experts]
    experts = torch.stack([torch.tensor(choices)[torch.randperm(len(choices))[:K]] for _ in range(N)]).to(DEVICE)
    weights = torch.rand(N, K, device=DEVICE).requires_grad_()

    def p(*shape, scale):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_()

    return p(N, D, scale=1.0), weights, experts, p(E, Fh, D, scale=D ** -0.5), p(E, Fh, D, scale=D ** -0.5), \
        p(E, D, Fh, scale=Fh ** -0.5)


@needs_triton
@pytest.mark.parametrize("N,E,K,skip", [(1, 5, 1, ()), (37, 5, 1, (1, 3)), (37, 5, 2, (2,)), (23, 5, 5, ()),
                                        (37, 2, 2, ())])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_experts(triton_backend, N, E, K, skip, dtype, monkeypatch):
    """Against the loop reference: prime E, K = E, experts with no token, non-power-of-two D and F
    (partial tiles), single token. Small CPU blocks so that groups span several blocks."""
    monkeypatch.setitem(GEMM_CONFIG, "cpu",
                        dict(block_m=8, up=(32, 16, 1, 1), gemm=(32, 32, 1, 1), wgrad=(32, 32, 1, 1)))
    inputs = _moe_inputs(N, E, K, 40, 56, dtype, skip)
    compare(moe_experts, moe_loop_reference, inputs, dtype, scale=10.0 if dtype == torch.float32 else 2.0)
    if skip:
        assert all((w.grad[list(skip)] == 0).all() for w in inputs[3:]), "experts without tokens get zero gradients"


@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("dtype,group_rows", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 1),
                                              (torch.bfloat16, 5)])
def test_moe_experts_twin(K, dtype, group_rows, monkeypatch):
    """The PyTorch twin (sort + grouped_mm, backward written out) against the loop reference; bf16 is
    real bf16 arithmetic here (PyTorch's), unlike the interpreted Triton kernels. On CPU in bf16 the
    expert groups are padded with zero rows (to 16 by default; also 1 = none, and 5)."""
    moe_experts_module = sys.modules[moe_experts_torch.__module__]
    if group_rows is not None:
        monkeypatch.setattr(moe_experts_module, "CPU_LOWP_GROUP_ROWS", group_rows)
    inputs = _moe_inputs(19, 6, K, 24, 40, dtype, (4,) if K < 5 else ())
    compare(moe_experts_torch, moe_loop_reference, inputs, dtype, scale=10.0 if dtype == torch.float32 else 2.0)
    if K < 5:
        assert all((w.grad[4] == 0).all() for w in inputs[3:]), "an expert without tokens gets zero gradients"


def test_moe_experts_twin_partial_grads():
    """Inputs that need no gradient get none, and the others are unchanged (frozen experts, a frozen
    router, a detached input): the twin's backward skips what nobody asked for."""
    full = _moe_inputs(23, 4, 2, 16, 24, torch.float32)
    _, ref = grads_of(moe_experts_torch, full)
    for frozen in ((0,), (1,), (3, 4), (5,), (0, 3, 4)):
        inputs = [t.detach().requires_grad_(i not in frozen and i != 2) for i, t in enumerate(full)]
        _, grads = grads_of(moe_experts_torch, inputs)
        kept = [g for i, g in enumerate(ref) if [0, 1, 3, 4, 5][i] not in frozen]
        assert len(grads) == len(kept) and all(torch.equal(a, b) for a, b in zip(grads, kept)), frozen


# -----------------------------------------------------------------------------
# the model: Triton vs PyTorch backends, eager and compiled

def _small_moe_config(**kw):
    from minimind import ModelConfig
    return ModelConfig(**dict(dict(vocab_size=96, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40,
                                   n_experts=3, n_shared_experts=1, top_k=2, qk_norm=True), **kw))


def _loss_and_grads(model, idx, run=None, **kw):
    """(logits, loss, parameter grads) of a model, run eagerly or through `run` (its compiled form);
    for a layer (idx a float input): (output, input grad, parameter grads) with a fixed output gradient."""
    model.zero_grad(set_to_none=True)
    run = run if run is not None else model
    if idx.is_floating_point():
        idx.grad = None
        y = run(idx)
        y.backward(torch.randn(y.shape, generator=torch.Generator(device=DEVICE).manual_seed(0), device=DEVICE))
        out = (y, idx.grad.clone())
    else:
        logits, loss = run(idx, idx, **kw)
        loss.backward()
        out = (logits, loss)
    return *out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_triton
def test_model_triton_matches_torch(triton_backend):
    """A MoE model (shared expert, top-2, q/k norm) on packed rows (per-row RoPE positions)."""
    from minimind import MiniMind
    torch.manual_seed(0)
    model = MiniMind(_small_moe_config()).to(DEVICE)
    idx = torch.randint(0, 96, (2, 13), device=DEVICE)
    doc = torch.tensor([[0] * 6 + [1] * 7, [0] * 13], device=DEVICE)
    pos = torch.cat([torch.arange(6), torch.arange(7)]).to(DEVICE)[None].expand(2, -1).clone()
    pos[1] = torch.arange(13)
    out = _loss_and_grads(model, idx, doc=doc, pos=pos)
    mmkernels.set_backend("torch")
    ref = _loss_and_grads(model, idx, doc=doc, pos=pos)
    check(out[0], ref[0], torch.float32, 10, "logits")
    check(out[1], ref[1], torch.float32, 10, "loss")
    assert out[2].keys() == ref[2].keys()
    for name in ref[2]:
        check(out[2][name], ref[2][name], torch.float32, 100, name)


def test_compile_moe_layer_torch():
    """The twins under torch.compile (inductor): a MoE layer's forward and backward match eager
    (F.grouped_mm's meta function rejects fp32 on CPU: the twin wraps it in a custom op there)."""
    from minimind import MoE
    old = mmkernels.get_backend()
    mmkernels.set_backend("torch")
    try:
        torch.manual_seed(0)
        layer = MoE(_small_moe_config()).to(DEVICE)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.1)
        x = torch.randn(2, 16, 48, device=DEVICE, requires_grad=True)
        ref = _loss_and_grads(layer, x)
        out = _loss_and_grads(layer, x, torch.compile(layer))
    finally:
        mmkernels.set_backend(old)
    for a, b, name in zip(out, ref, ("output", "x grad", "grads")):
        if isinstance(b, dict):
            assert a.keys() == b.keys()
            for k in b:
                check(a[k], b[k], torch.float32, 10, k)
        else:
            check(a, b, torch.float32, 10, name)


@needs_triton
def test_compile_triton_kernels(triton_backend):
    """The Triton kernels stay in a compiled model as custom ops (fake implementations trace, the real
    ones run); aot_eager: the graph capture is what is tested, not inductor's code generation."""
    from minimind import MiniMind
    torch.manual_seed(0)
    model = MiniMind(_small_moe_config(n_layers=1)).to(DEVICE)
    idx = torch.randint(0, 96, (2, 16), device=DEVICE)
    ref = _loss_and_grads(model, idx)
    compiled = torch.compile(model, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    out = _loss_and_grads(model, idx, compiled)
    check(out[0], ref[0], torch.float32, 10, "logits")
    for name in ref[2]:
        check(out[2][name], ref[2][name], torch.float32, 100, name)


# -----------------------------------------------------------------------------
# GPU compilation without a GPU, and the benchmark's smoke run

@pytest.mark.skipif(not HAS_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="needs triton's CUDA backend")
def test_kernels_compile_for_sm90():
    """Every launch the ops make (bf16, GPU configurations) compiles to a cubin for sm_90: catches
    what the interpreter lets through (e.g. a block size that is not a power of two)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "mmkernels.aot_check", "--dtype", "bf16"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "compiled" in r.stdout


def test_bench_cpu_smoke():
    """bench.py's kernels section, CPU run (PyTorch only)."""
    import bench
    out = {"kernels": "auto"}  # bench.py's own entries stay
    bench.bench_kernels("cpu", out)
    res = out["kernel_bench"]
    assert out["kernels"] == "auto"
    assert {r["op"] for r in res["rows"]} == {"rms_norm", "rope", "moe", "train_step"}
    assert {r["impl"] for r in res["rows"]} == {"torch", "loop"}
    assert all(r["ms"] > 0 for r in res["rows"]) and "moe/dense step (torch)" in res["ratio"]


@pytest.mark.parametrize("top_k,norm_top1", [(1, False), (1, True), (2, False)])
def test_bench_minimind_moe_matches_ours(top_k, norm_top1):
    """bench.py's re-implementation of MiniMind-3's MoE layer computes what ours does (forward, input
    and weight gradients), an expert without tokens included, so that the benchmark compares the
    cost of one computation. Its balance loss sums over the K choices: K times ours."""
    import bench
    from minimind import MoE
    torch.manual_seed(0)
    ours = MoE(_small_moe_config(n_shared_experts=0, n_experts=4, top_k=top_k, norm_top1=norm_top1)).to(DEVICE)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():  # positive inputs, a negative router row: expert 3 never wins
        ours.router.weight.abs_()
        ours.router.weight[3].neg_()
    ref = bench.MiniMindMoE(ours).to(DEVICE)
    x = torch.rand(2, 9, 48, device=DEVICE, requires_grad=True)
    y, dx, grads = _loss_and_grads(ours, x)
    (y_ref, dx_ref, grads_ref), aux_ref = _loss_and_grads(ref, x), ref.aux_loss
    check(y, y_ref, torch.float32, 10, "output")
    check(dx, dx_ref, torch.float32, 10, "x grad")
    check(grads["router.weight"], grads_ref["gate.weight"], torch.float32, 10, "router")
    for name in ("w1", "w3", "w2"):
        expected = torch.stack([grads_ref.get(f"experts.{e}.{name}.weight", torch.zeros_like(ours.w1[0].t()
                                if name == "w2" else ours.w1[0])) for e in range(4)])
        check(grads[name], expected, torch.float32, 10, name)
    assert (grads["w1"][3] == 0).all()
    check(ours.aux_loss * top_k, aux_ref, torch.float32, 10, "aux loss")


def test_bench_moe_cpu_smoke():
    """bench.py's moe section on a short batch: one row per optimizer in fp32, one in bf16 where the
    CPU has bf16 units; every time and ratio filled in."""
    import bench
    from runtime import cpu_has_bf16
    out = {}
    bench.bench_moe("cpu", out, pairs=(("tiny", "tiny-moe"),), batch=1, seq_len=8, steps=1, threads=(1,))
    rows = out["moe"]
    assert [(r["optimizer"], r["dtype"]) for r in rows] == [("adamw", "float32"), ("adamw fused", "float32")] + \
        [("adamw fused", "bfloat16")] * cpu_has_bf16()
    assert all(r[k] > 0 for r in rows for k in r if k.endswith(("_s", "ratio")))


@needs_triton
@pytest.mark.skipif(DEVICE == "cuda", reason="interprets Triton on CPU tensors")
def test_bench_triton_paths_on_cpu(monkeypatch):
    """The GPU-only paths of the benchmark (Triton rows, ratios, the Triton-vs-twin check; liger
    recorded as an error when it is not installed), interpreted on CPU's tiny shapes: each
    measurement runs once, and the training steps (a 256-dim model: slow to interpret) are left out."""
    import bench
    monkeypatch.setattr(bench, "time_and_peak", lambda fn, device: (fn(), 1.0, None)[1:])
    monkeypatch.setattr(bench, "step_cases", lambda device: iter(()))
    out = {}
    bench.bench_kernels("cpu", out, impls=("torch", "triton", "liger"))
    res = out["kernel_bench"]
    assert {r["impl"] for r in res["rows"] if "error" not in r} == {"torch", "triton"}
    assert {r["impl"] for r in res["rows"] if "error" in r} <= {"liger"}
    assert set(res["check"]) == {"rms_norm", "rope", "moe"}
    assert all(v < 1e-4 for v in res["check"].values()), res["check"]
    assert any(k.endswith("torch/triton") for k in res["ratio"])
