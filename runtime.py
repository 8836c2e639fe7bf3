"""Where and how tensors run: device and dtype choice, the processes of a torchrun run, mixed precision,
and the matmul peak that MFU is measured against; the modes of the files a run publishes; the clock of a
--max-time run."""
import contextlib
import ctypes
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.utils._python_dispatch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def publish_modes(root) -> None:
    """Give a staged output directory, before it is renamed into place, the modes the user's umask gives
    any file they write (0755 directories, 0644 files under the usual 022): mkdtemp makes its directory
    0700 and safetensors writes 0600, so checkpoints and exports were private while the logs beside them
    were not."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def pick_device(name: str = "auto") -> str:
    """'auto' = CUDA, else Apple's MPS, else the CPU. A device this machine lacks is a ValueError."""
    if name != "auto":
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
            raise ValueError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible)")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {name}: Apple's MPS is not available here")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class Processes:
    """This process among the run's: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (one process without)."""
    ddp: bool = False
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self) -> bool:
        return self.rank == 0

    def mean(self, x: torch.Tensor) -> float:
        """The mean of a scalar tensor over the processes."""
        x = x.detach().float().clone()
        if self.ddp:
            dist.all_reduce(x)
            x /= self.world
        return float(x)

    def means(self, metrics: dict) -> dict:
        """Each scalar tensor of `metrics` averaged over the processes, as floats: one all-reduce, one
        host sync."""
        keys = sorted(metrics)
        vals = torch.stack([metrics[k].float() for k in keys])
        if self.ddp:
            dist.all_reduce(vals)
            vals /= self.world
        return dict(zip(keys, vals.tolist()))

    def average_grads(self, module: torch.nn.Module):
        """The gradients of a module outside DDP/FSDP averaged over the processes, in place."""
        if self.ddp:
            for p in module.parameters():
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def barrier(self):
        if self.ddp:
            dist.barrier()


def setup_distributed(device_flag: str):
    """-> (Processes, device): the process group joined under torchrun, each process on its own GPU."""
    device = pick_device(device_flag)
    if "RANK" not in os.environ:
        return Processes(), device
    procs = Processes(True, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device.startswith("cuda"):
        device = f"cuda:{procs.local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return procs, device


def parallelize(model, procs: Processes, device: str, dtype: torch.dtype, fsdp: bool = False,
                compile: bool = False):
    """-> what the training steps run: the model compiled if asked, under DDP (each process holds every
    weight), or with fsdp sharded in place by FSDP2 (fully_shard: each block, then the rest; weights,
    gradients and optimizer state split over the processes, each block's weights gathered for its
    forward and backward; fp32 gradient reduction whatever the compute dtype). Evaluate and save the
    model itself (FSDP: still the model, sharded)."""
    if fsdp:
        policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    train_model = torch.compile(model) if compile else model
    if procs.ddp and not fsdp:
        train_model = DDP(train_model, device_ids=[procs.local_rank] if device.startswith("cuda") else None)
    return train_model


def gradient_sync(model, train_model, on: bool):
    """Gradient accumulation: reduce the gradients over the processes on this backward (the last
    micro-batch), or keep them local."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(on)
    elif isinstance(train_model, DDP):
        train_model.require_backward_grad_sync = on


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and a bf16 matmul can be 100x slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: Apple silicon and others
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: str, training: bool = False) -> torch.dtype:
    """'auto' = bf16 on CUDA cards that have it (Ampere and newer), fp16 on older cards (training then
    uses a gradient scaler), fp32 on MPS. On a CPU: bf16 autocast for training where the CPU has bf16
    units (fp32 weights and optimizer, bf16 matmuls: 1.65x tiny's step on an AVX512-BF16 Zen 5,
    BENCHMARKS.md), else fp32; inference stays fp32 on every CPU (weights cast per call would slow
    decoding, which streams them)."""
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        if device == "cpu" and training and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected auto or one of {sorted(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device == "cpu" and not cpu_has_bf16():
        warnings.warn("--dtype bfloat16 on a CPU without bf16 units (no AVX512-BF16/AMX): bf16 is emulated "
                      "here and can be 100x slower than float32", stacklevel=2)
    return dtype


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for the next allocation instead of handing it back to the OS.
    By default a freed block of more than ~128 KB (the threshold grows up to 32 MB) or a free top of
    the heap past twice that is returned, and the next step's tensor of that size faults every page
    in again: a minimind-3 MoE step on CPU re-faulted ~100k pages (0.2 s, 15% of the step) for its
    30 MB expert-stack gradients (BENCHMARKS.md, MoE section). Tensors up to 32 MB (glibc's maximum)
    now come from the heap, and up to 1 GiB of freed heap is kept. For training on a CPU, where a step
    allocates the same tensors every time; True where applied (Linux with glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except AttributeError:  # a libc without mallopt (musl's returns 0: not applied)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _find_mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):  # not glibc, or older than 2.33
        return None
    fn.restype = _MallInfo2
    return fn


_mallinfo2 = _find_mallinfo2()


def malloc_in_use() -> Optional[int]:
    """Bytes the C allocator has handed out and not had back (glibc mallinfo2, every arena: heap in use +
    mmapped blocks), whatever freed memory it keeps (keep_freed_memory): CPU tensors' memory, where RSS
    would count the kept heap too. None off glibc (2.33+)."""
    if _mallinfo2 is None:
        return None
    info = _mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMalloc(torch.utils._python_dispatch.TorchDispatchMode):
    """Within `with PeakMalloc() as p:`, p.peak is the most malloc_in_use() read after any aten op
    (forward, backward and recomputation alike; an op's own temporaries, freed before it returns, are
    not seen)."""

    def __init__(self):
        super().__init__()
        self.peak = malloc_in_use() or 0

    def __torch_dispatch__(self, func, types, inputs=(), kwargs=None):
        out = func(*inputs, **(kwargs or {}))
        self.peak = max(self.peak, malloc_in_use() or 0)
        return out


def grad_scaler(device: str, dtype: torch.dtype):
    """fp16 training needs its loss scaled against underflow; bf16 and fp32 do not (disabled scaler)."""
    return torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)


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


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Clock:
    """Training time against a --max-time budget. fraction() is the share of the budget used once
    the final evaluation and save (timed as the last ones took) are set aside; under DDP rank 0's
    value is broadcast, so every rank follows the same schedule and stops at the same step."""

    def __init__(self, minutes, start: float, spent_before: float, ddp: bool):
        self.budget = minutes * 60 if minutes else None
        self.start, self.before, self.ddp = start, spent_before, ddp
        self.last = {"eval": 0.0, "save": 0.0}

    def spent(self) -> float:
        return self.before + time.time() - self.start

    def left(self) -> float:
        return max(0.0, self.budget - self.spent()) if self.budget else 0.0

    def fraction(self) -> float:
        f = torch.tensor([self.spent() / max(1e-9, self.budget - sum(self.last.values()))], dtype=torch.float64)
        if self.ddp:
            dist.broadcast(f, 0)
        return f.item()

    def guess_eval(self, batches: int, micro_step_seconds: float):
        """Before any evaluation has run, set aside the final one's time: `batches` forward passes, each
        about a third of a training micro-step (forward + backward)."""
        if not self.last["eval"]:
            self.last["eval"] = batches * micro_step_seconds / 3

    @contextlib.contextmanager
    def measure(self, what: str):
        t0 = time.time()
        yield
        self.last[what] = time.time() - t0


# -----------------------------------------------------------------------------
# CPU threads on a machine shared with other work

def _cpu_ticks(cpus: set) -> tuple:
    """(busy, all) clock ticks of the listed CPUs since boot, from /proc/stat: busy at any priority (steal,
    time the hypervisor gave another machine, included)."""
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
                continue
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in vals[:8])
            busy += user + nice + system + irq + softirq + steal
            total += user + nice + system + idle + iowait + irq + softirq + steal
    return busy, total


def _own_ticks() -> int:
    """Clock ticks this process (every thread) has run, user + system, from /proc/self/stat."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": the command may hold spaces
    return int(fields[11]) + int(fields[12])  # utime, stime


class CpuThreads:
    """How many threads torch computes with on a CPU that other work shares, chosen again as it changes.

        threads = CpuThreads()        # 0: adapt; N > 0: N threads, always
        for step in ...:
            threads.tick()            # in the thread that computes: cheap; re-chooses once a `interval`

    torch's threads meet after every parallel op (OpenMP), so one of them taken off its core by another
    process stalls all of them: beside one busy process on 2 cores, 2 threads trained tiny 1.6-1.8x and
    decoded 2.5-2.8x slower than 1 thread (BENCHMARKS.md, contention; more with more jobs). Every
    `interval` seconds tick() reads how much of this process's CPUs (its affinity) the other processes
    used since the last reading (/proc/stat less this process's own time) and uses the cores they left:
    round(CPUs - others' busy cores), at least 1, at most torch's own default (its physical cores).
    Niced processes count: with the kernel's autogroups (on by default in most distributions) a process
    of another session gets its share whatever its nice value. OpenMP's wait policy is left as libgomp
    sets it (spin a while, then sleep): PASSIVE, sleeping at once, cost idle decoding 12-13%.

    The count stays fixed (torch's, or `threads`) where the user chose it (OMP_NUM_THREADS), under
    torchrun (processes that share the cores by design) and off Linux (no /proc)."""

    def __init__(self, threads: int = 0, interval: float = 1.0):
        if threads > 0:
            torch.set_num_threads(threads)
        self.most = torch.get_num_threads()
        self.interval = interval
        self.adapt = (threads == 0 and "OMP_NUM_THREADS" not in os.environ and "RANK" not in os.environ
                      and os.path.exists("/proc/stat") and hasattr(os, "sched_getaffinity"))
        if self.adapt:
            self.cpus = os.sched_getaffinity(0)
            self.last = (time.monotonic(), _cpu_ticks(self.cpus), _own_ticks())
            time.sleep(0.05)  # a first reading, so that the first steps already run with a fitting count
            self._choose()

    def others(self) -> float:
        """The cores the other processes kept busy since the last reading (then a new reading starts)."""
        (busy0, total0), own0 = self.last[1:]
        (busy, total), own = _cpu_ticks(self.cpus), _own_ticks()
        self.last = (time.monotonic(), (busy, total), own)
        if total <= total0:
            return 0.0
        return max(0, busy - busy0 - (own - own0)) / (total - total0) * len(self.cpus)

    def _choose(self):
        n = max(1, min(self.most, int(len(self.cpus) - self.others() + 0.5)))
        if n != torch.get_num_threads():
            torch.set_num_threads(n)

    def tick(self):
        if self.adapt and time.monotonic() - self.last[0] >= self.interval:
            self._choose()


_threads: Optional[CpuThreads] = None  # the process's policy, once a script has set one


def share_cpu(threads: int = 0) -> CpuThreads:
    """Set the process's thread policy (a script's --threads: 0 adapts, N > 0 fixes N); the loops that
    compute call tick_threads()."""
    global _threads
    _threads = CpuThreads(threads)
    return _threads


def tick_threads():
    """Let the process's thread policy re-choose, if one is set and its interval has passed: call it
    once per unit of work (a step, a decoded token) from the thread that computes."""
    if _threads is not None:
        _threads.tick()


def ticking(items):
    """The items of an iterable, tick_threads() after each: `for nxt in ticking(model.generate_stream(...))`."""
    for item in items:
        yield item
        tick_threads()
