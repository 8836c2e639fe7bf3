"""Where and how tensors run: device and dtype choice, mixed precision, and the matmul peak
that MFU is measured against."""
import contextlib
import time
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    """'auto' = bf16 on CUDA, fp32 elsewhere (a CPU gets bf16 only when asked)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision context: autocast to `dtype` unless it is fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# peak dense bf16 matmul FLOP/s of common cards (no sparsity), for MFU
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12, "A10": 125e12}


def measure_matmul_flops(device: str, dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul on this machine: the practical peak that MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b  # warm up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        if iters % 4 == 0:
            sync()
    sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def datasheet_flops(device: str, dtype: torch.dtype) -> Optional[float]:
    """Peak FLOP/s for MFU from the datasheet of a known GPU; None elsewhere (measure it)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops if dtype != torch.float32 else flops / 2  # tf32 on fp32
    return None
