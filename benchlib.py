"""Measuring on a shared, noisy machine, for bench.py: a device's sync, memory bandwidth, the time of a
training step, the rows a timed step holds, variants timed interleaved (wall and CPU time), an empty
inductor cache for cold compiles, a training step's per-process peak memory under DDP and FSDP2, the
thread policy's speed beside a competing busy process."""
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minimind import PRESETS, Linear, MiniMind
from optim import make_optimizer
from runtime import CpuThreads, PeakMalloc, keep_freed_memory, malloc_in_use, parallelize, setup_distributed


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
def unsplit_linear():
    """minimind.Linear without split_linear (F.linear at every row count: MKL's one-thread sgemv for a
    row), eager decoding as it was before the split, for a ratio measured in the same run."""
    saved, Linear.SPLIT_ROWS = Linear.SPLIT_ROWS, 0
    try:
        yield
    finally:
        Linear.SPLIT_ROWS = saved


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


def _local_bytes(t) -> int:
    """Bytes this process holds of a tensor (an FSDP2 DTensor: its own shard)."""
    return (t.to_local() if hasattr(t, "to_local") else t).nbytes


def rank_step_peak(name: str, seq_len: int, batch: int, fsdp: bool, device_flag: str, out_dir: str) -> None:
    """One process of a torchrun (see ddp_fsdp_peaks): a preset trained as train.py trains it (fp32,
    AdamW, runtime.parallelize: DDP or FSDP2), and the peak of its second step above what the process
    held before the model was built (weights, gradients, optimizer state, activations, and whatever
    DDP's buckets or FSDP's gathered blocks add) written to out_dir/rank{R}.json. CUDA:
    max_memory_allocated; CPU: runtime.PeakMalloc (malloc's bytes in use after any aten op)."""
    procs, device = setup_distributed(device_flag)
    cuda = device.startswith("cuda")
    if not cuda:
        keep_freed_memory()  # as train.py does on a CPU
    base = torch.cuda.memory_allocated() if cuda else malloc_in_use()
    torch.manual_seed(0)
    model = MiniMind(PRESETS[name]).to(device).train()
    train_model = parallelize(model, procs, device, torch.float32, fsdp=fsdp)  # FSDP: shards in place
    opt = make_optimizer(model, "adamw", 1e-4, 0.1, device)
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1),
                      generator=torch.Generator().manual_seed(procs.rank))
    x = x.to(device)  # (B, T+1): each process its own rows

    def step():
        train_model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()  # the optimizer state is allocated here
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with PeakMalloc() as probe:
            step()
        peak = probe.peak - base
    state = sum(_local_bytes(p) + _local_bytes(p.grad) for p in model.parameters())
    state += sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    tmp = Path(out_dir) / f".rank{procs.rank}.json"
    tmp.write_text(json.dumps({"peak": peak, "state": state}))
    os.replace(tmp, Path(out_dir) / f"rank{procs.rank}.json")
    torch.distributed.destroy_process_group()


def ddp_fsdp_peaks(name: str, seq_len: int, batch: int, device: str, nproc: int = 2, timeout: float = 600) -> dict:
    """A training step's peak memory per process, DDP against FSDP2 (`train.py --fsdp`), each a torchrun
    of nproc processes (rank_step_peak; on CUDA with nproc GPUs, else on the CPU over gloo); the larger
    rank's peak and model state (weights + gradients + AdamW state) of each, in MiB, and their ratios.
    RuntimeError with the run's last line where a torchrun fails."""
    device = "cuda" if device.startswith("cuda") and torch.cuda.device_count() >= nproc else "cpu"
    res = {"model": name, "batch": batch, "seq_len": seq_len, "processes": nproc, "device": device}
    for kind in ("ddp", "fsdp"):
        with tempfile.TemporaryDirectory(prefix="minimind-bench-fsdp") as out:
            code = (f"import benchlib; benchlib.rank_step_peak({name!r}, {seq_len}, {batch}, {kind == 'fsdp'}, "
                    f"{device!r}, {out!r})")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "--no-python", sys.executable, "-c", code]
            r = subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            if r.returncode != 0:
                raise RuntimeError(f"{kind} torchrun exited {r.returncode}: {(r.stderr.strip() or '?').splitlines()[-1]}")
            ranks = [json.loads((Path(out) / f"rank{i}.json").read_text()) for i in range(nproc)]
        res[f"{kind}_peak_mib"] = round(max(x["peak"] for x in ranks) / 2**20, 1)
        res[f"{kind}_state_mib"] = round(max(x["state"] for x in ranks) / 2**20, 1)
    res["ratio"] = round(res["fsdp_peak_mib"] / res["ddp_peak_mib"], 3)
    res["state_ratio"] = round(res["fsdp_state_mib"] / res["ddp_state_mib"], 3)
    return res


# -----------------------------------------------------------------------------
# contention: the thread policy beside another busy process

def contention_worker(name: str, kind: str, threads: int, warmup: float, seconds: float) -> float:
    """Tokens/s of `kind` ("train": AdamW steps on 4 x 256 tokens; "decode": greedy batch-1 replies of 32
    tokens) with `threads` (0: runtime.CpuThreads adapting), after `warmup` seconds, over `seconds`."""
    torch.manual_seed(0)
    model = MiniMind(PRESETS[name])
    policy = CpuThreads(threads)
    x, prompt = torch.randint(0, model.config.vocab_size, (4, 256)), torch.randint(0, model.config.vocab_size, (1, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def unit() -> int:
        if kind == "train":
            model(x, targets=x)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            policy.tick()
            return x.numel()
        with torch.no_grad():
            for n, _ in enumerate(model.generate_stream(prompt, 32, temperature=0), 1):
                policy.tick()
        return n

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup:
        unit()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        n += unit()
    return n / (time.perf_counter() - t0)


def _contention_run(name: str, kind: str, config: str, warmup: float, seconds: float) -> float:
    """One worker in a fresh process: config "auto", "N" threads, or "N passive" (OMP_WAIT_POLICY=PASSIVE,
    which libgomp reads once, at start)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if config.endswith("passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    threads = 0 if config == "auto" else int(config.split()[0])
    code = f"import benchlib; print(benchlib.contention_worker({name!r}, {kind!r}, {threads}, {warmup}, {seconds}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"contention worker {kind} {config}: {r.stderr[-500:]}")
    return float(r.stdout.split()[-1])


def contention(name: str = "tiny", rounds: int = 2, warmup: float = 2.0, seconds: float = 5.0) -> dict:
    """Training and decoding tokens/s of the default thread policy ("auto"), 1 thread, all cores (torch's
    count) and all cores with OpenMP's PASSIVE wait policy, on an idle machine and beside one busy process
    started here (a Python loop), each in a fresh process, rounds interleaved, the best round kept.
    -> {"idle"|"busy": {"train"|"decode": {config: tok/s, "auto_vs_best": auto / the best fixed count}}}."""
    most = torch.get_num_threads()
    configs = ["auto", "1"] + ([str(most), f"{most} passive"] if most > 1 else [])
    out = {}
    for load in ("idle", "busy"):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
        try:
            rates = {k: {c: 0.0 for c in configs} for k in ("train", "decode")}
            for _ in range(rounds):
                for kind in rates:
                    for c in configs:
                        rates[kind][c] = max(rates[kind][c], _contention_run(name, kind, c, warmup, seconds))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        for kind, r in rates.items():
            r["auto_vs_best"] = r["auto"] / max(v for c, v in r.items() if c.isdigit())  # of the thread counts
        out[load] = rates
    return out


def contention_lines(result: dict) -> list:
    """contention()'s result, a line per load and kind."""
    return [f"contention {load:4s} {kind:6s}: " + ", ".join(f"{c} {v:.0f}" for c, v in r.items() if c != "auto_vs_best")
            + f" tok/s; the default {r['auto_vs_best']:.2f}x the best thread count"
            for load, kinds in result.items() for kind, r in kinds.items()]
