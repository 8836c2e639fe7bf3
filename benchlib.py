"""Measuring on a shared, noisy machine, for bench.py: a device's sync, memory bandwidth, the time of a
training step, the rows a timed step holds, variants timed interleaved (wall and CPU time), an empty
inductor cache for cold compiles."""
import contextlib
import os
import statistics
import tempfile
import time

import torch


def sync_fn(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def measure_bandwidth(device: str, mbytes: int = 512, seconds: float = 0.5) -> float:
    """Bytes/s read by a reduction over a buffer much larger than any cache."""
    x = torch.ones(mbytes * 2 ** 20 // 4, device=device)
    sync = sync_fn(device)
    x.sum()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x.sum()
        n += 1
    sync()
    return n * x.numel() * 4 / (time.perf_counter() - t0)


def train_step_time(model, step_fn, steps: int, sync) -> float:
    step_fn()  # warm up (and compile)
    step_fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync()
    return (time.perf_counter() - t0) / steps


def bench_batch(device: str, name: str) -> int:
    """Rows of seq_len per timed training step: what fits in memory without waiting minutes on a CPU."""
    if name == "tiny":
        return 16 if device == "cuda" else 4
    return 8 if device == "cuda" else 1


def timed_rates(variants: dict, reps: int, sync, probe=None):
    """Median (tokens/s, tokens per CPU-second) of each variant, name -> fn() -> tokens generated; the
    variants interleaved, rep by rep, so that a busy machine slows them alike. CPU time is this
    process's: on a loaded machine it counts only the time the run was scheduled. probe: a
    measurement taken once a rep too (memory bandwidth), its median returned as well."""
    runs, probes = {k: [] for k in variants}, []
    for _ in range(reps):
        if probe is not None:
            probes.append(probe())
        for k, fn in variants.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            n = fn()
            sync()
            runs[k].append((n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)))
    rates = {k: tuple(statistics.median(r[i] for r in v) for i in (0, 1)) for k, v in runs.items()}
    return (rates, statistics.median(probes)) if probe is not None else rates


@contextlib.contextmanager
def fresh_inductor_cache():
    """Compile into an empty inductor cache (cold: what a first run on a machine pays)."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="minimind-bench-inductor")
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
