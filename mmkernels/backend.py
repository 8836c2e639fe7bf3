"""The one switch that picks each op's implementation: Triton kernel or PyTorch twin.

    --kernels=auto|triton|torch   (scripts)   or   MINIMIND_KERNELS=auto|triton|torch   (environment)

auto = Triton for CUDA tensors when Triton is installed and can compile for the card (compute
capability 8.0+: Ampere and newer), PyTorch otherwise, saying once why; `triton` on CPU tensors runs the kernels in
Triton's interpreter (TRITON_INTERPRET=1, for tests). The environment variable is read once, when
this module is imported; `set_backend` changes the choice afterwards.
"""
import functools
import importlib.util
import os
import sys

import torch

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
    return x.is_cuda and _triton_usable(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _triton_usable(device_index: int) -> bool:
    """Triton importable (it is not on Windows and macOS) and the card new enough for its kernels."""
    if importlib.util.find_spec("triton") is None:
        print("kernels: triton is not installed; using the PyTorch twins", file=sys.stderr)
        return False
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 8:
        print(f"kernels: compute capability {major}.{minor} < 8.0, below what the Triton kernels target; "
              "using the PyTorch twins", file=sys.stderr)
        return False
    return True
