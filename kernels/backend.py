"""The one switch that picks each op's implementation: Triton kernel or PyTorch twin.

    --kernels=auto|triton|torch   (scripts)   or   MINIMIND_KERNELS=auto|triton|torch   (environment)

auto = Triton for CUDA tensors, PyTorch otherwise; `triton` on CPU tensors runs the kernels in
Triton's interpreter (TRITON_INTERPRET=1, for tests). The environment variable is read once, when
this module is imported; `set_backend` changes the choice afterwards.
"""
import os

BACKENDS = ("auto", "triton", "torch")
_backend = os.environ.get("MINIMIND_KERNELS", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"MINIMIND_KERNELS={_backend!r}: expected one of {BACKENDS}")


def set_backend(name: str) -> None:
    """Choose the implementation of every kernel: 'auto', 'triton' or 'torch'."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernels backend {name!r}: expected one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def use_triton(x) -> bool:
    """True when the op on tensor `x` should run the Triton kernel."""
    if _backend == "torch":
        return False
    if _backend == "triton":
        return True
    return x.is_cuda
