"""Benchmarks of the kernels: forward+backward time and peak memory against the alternatives.

    python -m kernels.bench                 # CUDA if present, else a small CPU smoke run
    from kernels.bench import bench_kernels; out = {}; bench_kernels("cuda", out)   # (bench.py)

On CUDA, at MiniMind shapes in bf16 (16k and 64k tokens):
- rms_norm (dim 512, 768) and rope (minimind2: 8/2 heads of 64; minimind-3: 8/4 heads of 96):
  triton vs PyTorch eager (the twin), torch.compile of the twin, liger-kernel where installed;
- the MoE layer (router + experts; 4 experts top-1, 8 experts top-2; dim 512, ffn 1408):
  triton vs the twin (sort + F.grouped_mm) vs a loop over experts (MiniMind's original), compiled twin;
- a training step (forward+backward, autocast bf16) of minimind2-small, dense vs its 4-expert top-1 MoE;
- bf16 correctness of every Triton op against its twin, on the GPU, in the same run.
Timings are `triton.testing.do_bench` medians in ms; peak memory is the CUDA allocator's peak above
what the inputs already hold, in MiB. On CPU only the PyTorch variants run, on small shapes (the
Triton path there is the interpreter: nothing to time), so that this file can be smoke-tested.

`out["kernel_bench"]` receives
    "rows"   [{"op", "shape", "impl", "ms", "peak_mib"}]   one per measurement ("error" if it failed)
    "check"  {op: max error of Triton vs twin (outputs and input gradients), relative to the
             twin's largest value}
    "ratio"  {"<op> <shape>: <impl>/triton": time ratio (>1: triton faster), and
             "moe/dense step (<backend>)": MoE step time over the dense step's}
"""
import contextlib
import time

import torch
import torch.nn.functional as F

import kernels
from kernels.moe import moe_experts, moe_route
from kernels.rms_norm import rms_norm, rms_norm_torch
from kernels.rope import rope, rope_torch


@contextlib.contextmanager
def backend(name: str):
    old = kernels.get_backend()
    kernels.set_backend(name)
    try:
        yield
    finally:
        kernels.set_backend(old)


def _time(fn, device: str):
    """(ms, peak MiB) of fn()."""
    if device == "cuda":
        import triton.testing
        fn()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), peak
    fn()
    reps = 2
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3, None


def _fwd_bwd(forward, inputs, name: str = "torch"):
    """A closure running forward(*inputs) and backward with fixed output gradients, under `name`'s backend."""
    grads = None

    def step():
        nonlocal grads
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.grad = None
        with backend(name):
            outs = forward(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs = [o for o in outs if o.requires_grad]
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)

    return step


def _max_err(forward, inputs):
    """Largest difference of the outputs and input gradients, Triton vs twin, relative to the twin's
    largest value (so one number per op, whatever the magnitudes)."""
    results = {}
    for name in ("torch", "triton"):
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None
        torch.manual_seed(0)
        with backend(name):
            outs = forward(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs = [o for o in outs if o.requires_grad]
        torch.manual_seed(1)
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
        results[name] = [o.detach().float() for o in outs] + [t.grad.float() for t in inputs
                                                               if isinstance(t, torch.Tensor) and t.grad is not None]
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
               for a, b in zip(results["triton"], results["torch"]))


# -----------------------------------------------------------------------------
# the cases

def moe_loop(x, router_w, w1, w3, w2, top_k):
    """MiniMind's original MoE: a Python loop over experts (the baseline to beat)."""
    weights, experts, probs = moe_route(x @ router_w.t(), top_k, True)
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, k = torch.where(experts == e)
        h = F.silu(x[tok] @ w1[e].t()) * (x[tok] @ w3[e].t())
        y = y.index_add(0, tok, (h @ w2[e].t()) * weights[tok, k, None].to(x.dtype))
    return y, probs


def moe_layer(x, router_w, w1, w3, w2, top_k):
    weights, experts, probs = moe_route(x @ router_w.t(), top_k, True)
    return moe_experts(x, weights, experts, w1, w3, w2), probs


def _cases(device: str):
    """(op, shape label, forward, inputs, impls) for each benchmark."""
    cuda = device == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    token_counts = (16384, 65536) if cuda else (128,)
    dims = (512, 768) if cuda else (32,)

    def p(*shape, dtype=dt, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()

    for n in token_counts:
        for d in dims:
            yield "rms_norm", f"{n}x{d}", lambda x, w: rms_norm(x, w, 1e-5), (p(n, d), p(d, dtype=torch.float32)), \
                dict(liger=_liger_rms_norm, compile=lambda x, w: rms_norm_torch(x, w, 1e-5))
    for n in token_counts:
        T = min(n, 4096 if cuda else 64)
        for hq, hk, hd in ((8, 2, 64), (8, 4, 96)):
            cos = torch.randn(T, hd, device=device)
            sin = torch.randn(T, hd, device=device)
            qkv = p(n // T, T, hq + 2 * hk, hd)  # q, k as slices of a fused projection, as in a model

            def fwd(qkv, hq=hq, hk=hk, cos=cos, sin=sin):
                return rope(qkv[:, :, :hq], qkv[:, :, hq:hq + hk], cos, sin)

            yield "rope", f"{n // T}x{T}x{hq}/{hk}x{hd}", fwd, (qkv,), \
                dict(liger=_liger_rope(hq, hk, cos, sin), compile=lambda qkv, hq=hq, hk=hk, cos=cos, sin=sin:
                     rope_torch(qkv[:, :, :hq], qkv[:, :, hq:hq + hk], cos, sin))
    d, f = (512, 1408) if cuda else (32, 48)
    for n in token_counts:
        for e, k in ((4, 1), (8, 2)):
            inputs = (p(n, d), p(e, d, scale=d ** -0.5), p(e, f, d, scale=d ** -0.5), p(e, f, d, scale=d ** -0.5),
                      p(e, d, f, scale=f ** -0.5), k)
            yield "moe", f"{n}x{d} E{e} k{k}", moe_layer, inputs, dict(loop=moe_loop, compile=moe_layer)


def _liger_rms_norm(x, w):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    return LigerRMSNormFunction.apply(x, w, 1e-5)


def _liger_rope(hq, hk, cos, sin):
    def fwd(qkv):
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        q, k = qkv[:, :, :hq].transpose(1, 2), qkv[:, :, hq:hq + hk].transpose(1, 2)  # liger: (B, H, T, D)
        return liger_rotary_pos_emb(q, k, cos[None], sin[None])
    return fwd


def _step_cases(device: str):
    """Dense vs MoE training step at equal active parameters."""
    import dataclasses

    from minimind import MiniMind, PRESETS
    base = PRESETS["minimind2-small"] if device == "cuda" else dataclasses.replace(PRESETS["tiny"], n_layers=1)
    B, T = (16, 1024) if device == "cuda" else (2, 32)
    for label, cfg in (("dense", base), ("moe E4 k1", dataclasses.replace(base, n_experts=4, top_k=1))):
        model = MiniMind(cfg).to(device)
        idx = torch.randint(0, cfg.vocab_size, (B, T), device=device)

        def step(model=model, idx=idx):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                _, loss = model(idx, idx)
            loss.backward()

        yield f"{B}x{T} {label}", step


def bench_kernels(device: str, out: dict, impls=None) -> None:
    """Fill `out["kernel_bench"]` (see the module docstring) and print a table. device: "cuda" or "cpu".
    impls: the implementations to run, of torch, triton, compile, liger, loop; default all on CUDA,
    the PyTorch ones (torch, loop) on CPU. The Triton check (bf16 on CUDA) runs with triton."""
    device = "cuda" if device.startswith("cuda") else device
    cuda = device == "cuda"
    impls = set(impls or (("torch", "triton", "compile", "liger", "loop") if cuda else ("torch", "loop")))
    rows, checks, ratios = [], {}, {}
    torch.manual_seed(0)
    for op, shape, forward, inputs, others in _cases(device):
        runs = {"torch": _fwd_bwd(forward, inputs, "torch"), "triton": _fwd_bwd(forward, inputs, "triton")}
        runs["compile"] = lambda fn=others["compile"], inputs=inputs: _fwd_bwd(torch.compile(fn), inputs, "torch")()
        if "liger" in others:
            runs["liger"] = _fwd_bwd(others["liger"], inputs)
        if "loop" in others:
            runs["loop"] = _fwd_bwd(others["loop"], inputs, "torch")
        times = {}
        for impl, fn in runs.items():
            if impl not in impls:
                continue
            try:
                ms, peak = _time(fn, device)
            except Exception as e:  # a missing optional package, an unsupported shape: record, go on
                rows.append(dict(op=op, shape=shape, impl=impl, ms=None, peak_mib=None,
                                 error=f"{type(e).__name__}: {e}"[:200]))
                continue
            times[impl] = ms
            rows.append(dict(op=op, shape=shape, impl=impl, ms=ms, peak_mib=peak))
        for impl in times:
            if "triton" in times and impl != "triton":
                ratios[f"{op} {shape}: {impl}/triton"] = times[impl] / times["triton"]
        if "triton" in impls and op not in checks:
            checks[op] = _max_err(forward, inputs)
    step_times = {}
    for label, step in _step_cases(device):
        for impl in ("triton", "torch"):
            if impl in impls:
                with backend(impl):
                    ms, peak = _time(step, device)
                step_times[(label, impl)] = ms
                rows.append(dict(op="train_step", shape=label, impl=impl, ms=ms, peak_mib=peak))
    for impl in {i for _, i in step_times}:
        dense = [v for (lab, i), v in step_times.items() if i == impl and "dense" in lab]
        moe = [v for (lab, i), v in step_times.items() if i == impl and "moe" in lab]
        if dense and moe:
            ratios[f"moe/dense step ({impl})"] = moe[0] / dense[0]
    out["kernel_bench"] = {"device": device, "rows": rows, "check": checks, "ratio": ratios}
    _print(rows, checks, ratios, device)


def _print(rows, checks, ratios, device):
    print(f"kernels on {device}: forward+backward")
    print(f"{'op':10s} {'shape':26s} {'impl':8s} {'ms':>9s} {'peak MiB':>9s}")
    for r in rows:
        ms = f"{r['ms']:9.3f}" if r["ms"] is not None else f"{'-':>9s}"
        peak = f"{r['peak_mib']:9.1f}" if r["peak_mib"] is not None else f"{'-':>9s}"
        err = f"  {r['error']}" if "error" in r else ""
        print(f"{r['op']:10s} {r['shape']:26s} {r['impl']:8s} {ms} {peak}{err}")
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}")
    for k, v in checks.items():
        print(f"check {k}: Triton vs twin, max relative error {v:.2e}")


if __name__ == "__main__":
    bench_kernels("cuda" if torch.cuda.is_available() else "cpu", {})
