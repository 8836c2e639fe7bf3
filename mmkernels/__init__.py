"""Hot-path ops of minimind, each with a Triton kernel and a pure-PyTorch twin.

    from mmkernels import rms_norm, add_rms_norm, rope, moe_route, moe_experts

One switch picks the implementation for every op (mmkernels/backend.py):
    --kernels=auto|triton|torch   (scripts)   or   MINIMIND_KERNELS=auto|triton|torch   (environment)
auto = Triton for CUDA tensors, PyTorch otherwise. triton is imported on the first Triton launch
only (mmkernels/_triton.py), so CPU runs never need it. `triton` on CPU tensors runs the kernels in
Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported (by that first launch, or by
torch.compile, which imports it too); meant for tests.

Files: one per op family, each reading kernel -> launcher/custom op -> autograd.Function -> function,
twin alongside: rms_norm.py, rope.py, moe_route.py (router), moe_experts.py (grouped expert FFN);
backend.py (the switch); _triton.py (deferred triton, custom ops, launch helpers); aot_check.py
(compile every kernel for sm_90 on CPU). The benchmarks live in the top-level bench.py
(`python bench.py --only kernels`). This file only re-exports.
"""
from mmkernels.backend import BACKENDS, get_backend, set_backend, use_triton
from mmkernels.moe_experts import moe_experts
from mmkernels.moe_route import moe_route
from mmkernels.rms_norm import add_rms_norm, rms_norm
from mmkernels.rope import rope

__all__ = ["rms_norm", "add_rms_norm", "rope", "moe_route", "moe_experts", "set_backend", "get_backend",
           "use_triton", "BACKENDS"]
