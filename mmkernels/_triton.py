"""Plumbing shared by the kernel files: deferred Triton, custom ops, launch helpers.

Deferred Triton. Kernels are declared with `@jit` from here, not `@triton.jit`: triton is imported,
and every kernel of the file handed to `triton.jit`, on the first launch. So
- runs on the PyTorch twins (CPU, `--kernels=torch`) never import triton;
- tests may set TRITON_INTERPRET=1 at the top of their module, even after `kernels` was imported:
  triton reads that variable when it is imported and when a kernel is decorated, both of which now
  happen at the first launch (unless something else imported triton before: torch.compile does).
A kernel file starts with `from __future__ import annotations` (so that `BLOCK: tl.constexpr` stays
a string until then) and declares `tl = None`, the module global that `bind` sets to triton.language.

Custom ops. Each launcher is registered as a `torch.library.custom_op` ("minimind::<name>") with a
fake implementation, so a `torch.compile`d model keeps the kernel as one opaque node (interpreted
kernels on CPU could not be traced anyway). Dispatching through a custom op costs ~30 us of host
time, as much as a small kernel takes on the GPU, so eager code calls the launcher directly.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

import torch


ASSUME_GPU = False  # set by mmkernels.aot_check: GPU launch configurations for CPU tensors
CAPTURE = None  # a list while mmkernels.aot_check records launches instead of running them


class LazyKernel:
    """A kernel function waiting for triton: `kernel[grid](...)` binds its file's kernels, then launches."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.kernel = None  # the triton.jit'ed function, once bound
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        if CAPTURE is not None:
            return lambda *args, **kwargs: CAPTURE.append((self, grid, args, kwargs))
        if self.kernel is None:
            bind(self.fn.__module__)
        return self.kernel[grid]


def jit(fn: Callable) -> LazyKernel:
    """`@triton.jit`, deferred to the first launch of any kernel of the same file."""
    return LazyKernel(fn)


def bind(module_name: str) -> None:
    """Import triton, set the module's `tl`, and `triton.jit` each of its kernels (helpers included,
    so that kernels can call them) in place of the LazyKernel."""
    import triton
    import triton.language as tl

    g = sys.modules[module_name].__dict__
    g["tl"] = tl
    for name, obj in list(g.items()):
        if isinstance(obj, LazyKernel) and obj.kernel is None:
            # resolve the string annotations (`tl.constexpr`) now that `tl` exists
            obj.fn.__annotations__ = {k: eval(v, g) if isinstance(v, str) else v
                                      for k, v in obj.fn.__annotations__.items()}
            obj.kernel = triton.jit(obj.fn)
    for name, obj in list(g.items()):
        if isinstance(obj, LazyKernel):
            g[name] = obj.kernel  # helpers are looked up by name when a kernel compiles


def launcher(name: str, fake: Callable):
    """Register `fn` as the custom op minimind::`name` with the fake (shape-only) implementation
    `fake`; return a function that runs `fn` directly in eager mode and the op under torch.compile."""

    def wrap(fn):
        torch.library.custom_op(f"minimind::{name}", fn, mutates_args=()).register_fake(fake)
        op = getattr(torch.ops.minimind, name)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            return fn(*args, **kwargs)

        call.op = op
        return call

    return wrap


def last_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` itself if its last dim is contiguous (kernels take the other strides), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def gpu(t: torch.Tensor) -> bool:
    """Pick the launch configuration of a GPU (else big blocks for the interpreter)."""
    return t.is_cuda or ASSUME_GPU


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def prev_pow2(n: int) -> int:
    """Largest power of two <= n (1 for n < 2): block sizes must be powers of two."""
    return 1 << max(n.bit_length() - 1, 0)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_workers(device: torch.device) -> int:
    """Programs that keep the device busy for a persistent-style grid: SMs on CUDA, a few elsewhere
    (interpreted programs run one after another)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132 if ASSUME_GPU else 4


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: fp32 operands use TF32 only where PyTorch's matmuls would."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
