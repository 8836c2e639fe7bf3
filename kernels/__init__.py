"""Hot-path ops of minimind, each with a Triton kernel and a pure-PyTorch twin.

    from kernels import rms_norm, add_rms_norm, rope, moe_route, moe_experts

One switch picks the implementation for every op:
    --kernels=auto|triton|torch   (scripts)   or   MINIMIND_KERNELS=auto|triton|torch   (environment)
auto = Triton for CUDA tensors, PyTorch otherwise. triton is imported on the first Triton launch
only (kernels/_triton.py), so CPU runs never need it. `triton` on CPU tensors runs the kernels in
Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported (by that first launch, or by
torch.compile, which imports it too); meant for tests.

Files: rms_norm.py, rope.py, moe.py (kernel -> launcher/custom op -> autograd.Function -> function,
twin alongside); aot_check.py (compile every kernel for sm_90 on CPU). The benchmarks live in the
top-level bench.py (`python bench.py --only kernels`).
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


from kernels.rms_norm import rms_norm, add_rms_norm  # noqa: E402
from kernels.rope import rope  # noqa: E402
from kernels.moe import moe_route, moe_experts  # noqa: E402

__all__ = ["rms_norm", "add_rms_norm", "rope", "moe_route", "moe_experts", "set_backend", "get_backend",
           "use_triton"]
