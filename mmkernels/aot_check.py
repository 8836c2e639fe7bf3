"""Compile every Triton kernel for a GPU, without a GPU:

    python -m mmkernels.aot_check [--arch 90]      # sm_90 = H100/H200; 80 = A100

The interpreter that runs the tests on CPU accepts code the GPU compiler rejects (and never uses the
GPU launch configurations), so this drives each op forward and backward on CPU tensors with the
Triton backend and GPU configurations, records the kernel launches instead of running them, and
compiles each distinct launch (argument dtypes, constexprs, num_warps/num_stages) through Triton's
full pipeline down to a cubin. Needs triton's CUDA backend (bundled ptxas), not a GPU or a driver;
must run in a process where TRITON_INTERPRET is unset.
"""
import argparse
import os
import sys
import time

import torch

from mmkernels import _triton, backend
from mmkernels.moe_experts import moe_experts
from mmkernels.moe_route import moe_route
from mmkernels.rms_norm import add_rms_norm, rms_norm
from mmkernels.rope import rope

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
              torch.int32: "i32", torch.int64: "i64"}


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def record_launches(dtypes=tuple(DTYPES.values())) -> list:
    """Run every op, forward and backward, in each dtype with the variants the model uses; return the
    recorded launches (kernel, grid, args, kwargs)."""
    _triton.ASSUME_GPU, _triton.CAPTURE = True, []
    old_backend = backend.get_backend()
    backend.set_backend("triton")
    try:
        for dtype in dtypes:
            x = torch.randn(64, 512, dtype=dtype, requires_grad=True)
            w = torch.ones(512, requires_grad=True)  # fp32 weight with a low-precision input (autocast)
            rms_norm(x, w, 1e-5).sum().backward()
            for stream in (x.detach(), x.detach().float()):  # same dtype; fp32 residual stream (autocast)
                y, h = add_rms_norm(stream.requires_grad_(), x, w, 1e-5)
                (y.sum() + h.sum()).backward()
            qkv = torch.randn(2, 16, 12, 64, dtype=dtype, requires_grad=True)
            cos = torch.randn(16, 64)
            q, k = rope(qkv[:, :, :8], qkv[:, :, 8:10], cos, cos)
            (q.sum() + k.sum()).backward()
            logits = torch.randn(64, 8, dtype=dtype, requires_grad=True)
            for top_k, renorm in ((1, False), (2, True)):
                weights, _, probs = moe_route(logits, top_k, renorm)
                (weights.sum() + probs.sum()).backward()
                experts = torch.randint(0, 8, (64, top_k))  # the recorded router wrote nothing
                weights = weights.detach().requires_grad_()
                w1 = torch.randn(8, 96, 512, dtype=dtype, requires_grad=True)
                w3 = torch.randn(8, 96, 512, dtype=dtype, requires_grad=True)
                w2 = torch.randn(8, 512, 96, dtype=dtype, requires_grad=True)
                moe_experts(x, weights, experts, w1, w3, w2).sum().backward()
        return _triton.CAPTURE
    finally:
        _triton.ASSUME_GPU, _triton.CAPTURE = False, None
        backend.set_backend(old_backend)


def _arg_type(v):
    if isinstance(v, torch.Tensor):
        return "*" + _TL_DTYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(v)}")


def compile_launches(launches, arch: int) -> list:
    """Compile each distinct launch for sm_`arch`; returns [(kernel name, seconds)]."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    done, report = set(), []
    for lazy, grid, args, kwargs in launches:
        if lazy.kernel is None:
            _triton.bind(lazy.fn.__module__)
        fn = lazy.kernel
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(fn.arg_names, args), **{k: v for k, v in kwargs.items() if k not in options})
        constexprs = {p.name: bound[p.name] for p in fn.params if p.is_constexpr}
        signature = {p.name: "constexpr" if p.is_constexpr else _arg_type(bound[p.name]) for p in fn.params}
        # torch allocations are 16-byte aligned: let the compiler vectorise as a real launch would
        attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
                 if not p.is_constexpr and isinstance(bound[p.name], torch.Tensor)}
        key = (fn.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))),
               tuple(sorted(options.items())))
        if key in done:
            continue
        done.add(key)
        t0 = time.perf_counter()
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target, options=options)
        assert compiled.asm.get("cubin"), f"{fn.fn.__name__}: no cubin"
        report.append((fn.fn.__name__, time.perf_counter() - t0))
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    ap.add_argument("--dtype", default="bf16,fp16,fp32", help="comma-separated storage dtypes to compile for")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("mmkernels.aot_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
    launches = record_launches(tuple(DTYPES[d] for d in args.dtype.split(",")))
    report = compile_launches(launches, args.arch)
    for name, secs in report:
        print(f"{name:28s} {secs:6.2f}s")
    print(f"compiled {len(report)} distinct launches of {len({n for n, _ in report})} kernels for sm_{args.arch}")


if __name__ == "__main__":
    main()
