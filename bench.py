"""Benchmarks, measured as ratios within one run (the machines are shared and noisy).

    python bench.py                          # everything, on CUDA if present, else CPU
    python bench.py --device=cuda --out=bench.json
    python bench.py --only train,decode --models tiny,minimind-3
    python bench.py --only kernels           # the Triton kernels alone (a smoke run on CPU)
    python bench.py --only moe --device=cpu  # MoE/dense step, ours vs MiniMind-3's MoE layer (~10 min)

Sections:
  peak    the machine's own matmul FLOP/s (fp32, bf16) and memory bandwidth, measured here: the
          yardsticks for everything below
  train   training tokens/s at seq 512 of each model, fp32 and bf16 autocast, eager and compiled,
          each as MFU = achieved FLOP/s / the matmul peak of that dtype measured above
  optim   optimizer step time, AdamW vs Muon (five Newton-Schulz iterations per matrix), against
          the forward + backward of the training batch it updates
  memory  train.py --grad-checkpoint at minimind-3 (else the last of --models): a step's peak memory
          above weights, gradients and optimizer state, and its time, as ratios to the plain step; then
          --fsdp vs DDP on 2 torchrun processes: a step's peak per process, model state included
  decode  decode tokens/s at batch 1 against the weight-streaming limit (each new token reads every
          weight once: bandwidth / weight bytes), eager and compiled (MiniMind.step under torch.compile:
          compile time cold and warm, tokens until it pays), then KV-cache eager / compiled vs naive
          decoding at batch 1 and 8; the load average before and after (a shared machine)
  server  requests/s and tokens/s of serve.py (a subprocess) under 8 concurrent streaming clients
  kernels Triton kernels vs PyTorch eager / compiled / liger-kernel (GPU; a smoke run on CPU)
  dpo     DPO step / SFT step on the same tokens (first model): reference cached (the default) and live
  contention  (CPU) training and decoding tokens/s of the default thread policy vs 1 thread vs all cores
          (and all with OpenMP's PASSIVE wait), idle and beside a busy process it starts (~6 min)
  moe     MoE/dense training-step time (fp32, AdamW) of tiny-moe/tiny and minimind-3-moe/minimind-3,
          with our MoE layer and with MiniMind-3's (its loop over experts), at 1 and 2 threads
"""
import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

import mmkernels
from benchlib import (bench_batch, contention, contention_lines, ddp_fsdp_peaks, fresh_inductor_cache,
                      measure_bandwidth, sync_fn, timed_rates, train_step_time, unsplit_linear)
from checkpoint import save_checkpoint
from minimind import PRESETS, FeedForward, MiniMind, MoE, left_pad
from mmkernels import moe_experts, moe_route, rms_norm, rope
from mmkernels.rms_norm import rms_norm_torch
from mmkernels.rope import rope_torch
from losses import DPO, DPOConfig, ReferenceCache, lm_loss
from optim import make_optimizer
from runtime import (PeakMalloc, autocast, keep_freed_memory, malloc_in_use, measure_matmul_flops, pick_device,
                     pick_dtype)
from tokenizer import SPECIAL_TOKENS


def bench_peak(device, out):
    out["peak"] = {
        "fp32_tflops": measure_matmul_flops(device, torch.float32, n=2048 if device == "cuda" else 1024) / 1e12,
        "bf16_tflops": measure_matmul_flops(device, torch.bfloat16, n=2048 if device == "cuda" else 1024) / 1e12,
        "bandwidth_gbs": measure_bandwidth(device) / 1e9,
    }
    p = out["peak"]
    print(f"peak: fp32 {p['fp32_tflops']:.3f} TFLOP/s | bf16 {p['bf16_tflops']:.3f} TFLOP/s | "
          f"memory {p['bandwidth_gbs']:.1f} GB/s")


def bench_train(device, out, models, seq_len, compile_too, steps):
    rows = out.setdefault("train", [])
    sync = sync_fn(device)
    for name in models:
        for dtype in (torch.float32, torch.bfloat16):
            for compiled in ((False, True) if compile_too else (False,)):
                torch.manual_seed(0)
                model = MiniMind(PRESETS[name]).to(device).train()
                opt = make_optimizer(model, "adamw", 1e-4, 0.1, device)  # the AdamW training builds
                run_model = torch.compile(model) if compiled else model
                B = bench_batch(device, name)
                x = torch.randint(0, 6400, (B, seq_len + 1), device=device)

                def step():
                    with autocast(device, dtype):
                        _, loss = run_model(x[:, :-1], x[:, 1:])
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                dt = train_step_time(model, step, steps, sync)
                tps = B * seq_len / dt
                peak = out["peak"]["bf16_tflops" if dtype == torch.bfloat16 else "fp32_tflops"] * 1e12
                mfu = tps * model.flops_per_token(seq_len) / peak
                row = {"model": name, "dtype": str(dtype).replace("torch.", ""), "compiled": compiled, "batch": B,
                       "seq_len": seq_len, "tok_s": round(tps, 1), "mfu": round(mfu, 3)}
                rows.append(row)
                print(f"train {name:16s} {row['dtype']:9s} {'compiled' if compiled else 'eager   '} "
                      f"B={B:<2d} {tps:10,.0f} tok/s  MFU {100 * mfu:5.1f}%", flush=True)
                del model, opt, run_model
                torch._dynamo.reset()


def bench_dpo(device, out, name, seq_len, steps):
    """A DPO step against an SFT step on the same rows (two documents a row, chosen and rejected)."""
    sync, dtype = sync_fn(device), pick_dtype("auto", device, training=True)
    torch.manual_seed(0)
    model = MiniMind(PRESETS[name]).to(device).train()
    opt = make_optimizer(model, "adamw", 1e-4, 0.1, device)
    B, half = bench_batch(device, name), seq_len // 2
    idx = torch.randint(0, 6400, (B, seq_len), device=device)
    half_ids = torch.arange(seq_len, device=device) // half  # 0 = chosen, 1 = rejected, in every row
    targets = torch.where(torch.arange(seq_len, device=device) % half == half - 1, -1, idx.roll(-1, 1))
    batch = {"idx": idx, "targets": targets, "pos": (torch.arange(seq_len, device=device) % half).expand(B, -1),
             "doc": half_ids.expand(B, -1), "seq": (2 * torch.arange(B, device=device)[:, None] + half_ids),
             "n_seqs": 2 * B, "item": torch.arange(B, device=device).repeat_interleave(2),
             "part": torch.arange(2, device=device).repeat(B), "split": "train"}
    batch["item_host"] = (batch["item"].cpu().numpy(), batch["part"].cpu().numpy())
    live, cached = DPO(model, DPOConfig(beta=0.1)), DPO(model, DPOConfig(beta=0.1))
    cached.cache = ReferenceCache({"train": np.zeros((B, 2), dtype=np.float32)})  # every pair scored already

    def stepper(loss_fn):
        def step():
            with autocast(device, dtype):
                loss = loss_fn(model, batch)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return B * seq_len
        return step

    variants = {"sft": stepper(lm_loss), "dpo_cached": stepper(cached), "dpo_live": stepper(live)}
    rates = timed_rates(variants, steps + 1, sync)  # interleaved: a busy machine slows all three alike
    t = {k: B * seq_len / v[0 if device == "cuda" else 1] for k, v in rates.items()}  # CPU: per CPU-second
    out["dpo"] = {"model": name, "batch": B, "seq_len": seq_len, **{f"{k}_s": round(v, 4) for k, v in t.items()},
                  "cached_over_sft": round(t["dpo_cached"] / t["sft"], 3), "live_over_sft": round(t["dpo_live"] / t["sft"], 3)}
    print(f"dpo {name}: step / SFT step on the same {B}x{seq_len} tokens: reference cached "
          f"{out['dpo']['cached_over_sft']:.2f}x, live {out['dpo']['live_over_sft']:.2f}x")


def bench_optim(device, out, models, seq_len, steps):
    rows = out.setdefault("optim", [])
    sync = sync_fn(device)
    for name in models:
        torch.manual_seed(0)
        model = MiniMind(PRESETS[name]).to(device).train()
        B = bench_batch(device, name)
        x = torch.randint(0, 6400, (B, seq_len + 1), device=device)

        def fwd_bwd():  # in the training dtype of this device (bf16 autocast on CUDA, fp32 on CPU)
            with autocast(device, pick_dtype("auto", device)):
                model(x[:, :-1], x[:, 1:])[1].backward()

        row = {"model": name, "batch_tokens": B * seq_len,
               "fwd_bwd_ms": 1e3 * train_step_time(model, fwd_bwd, steps, sync)}
        for kind in ("adamw", "muon"):
            opt = make_optimizer(model, kind, 1e-4, 0.1, device)
            row[f"{kind}_ms"] = 1e3 * train_step_time(model, opt.step, steps, sync)
        row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
        rows.append(row)
        print(f"optim {name:16s} {row['batch_tokens']:6d} tokens: fwd+bwd {row['fwd_bwd_ms']:8.1f} ms | "
              f"AdamW step {row['adamw_ms']:7.1f} ms | Muon step {row['muon_ms']:7.1f} ms "
              f"({100 * row['muon_ms'] / row['fwd_bwd_ms']:.0f}% of fwd+bwd)", flush=True)
        del model


def bench_memory(device, out, name: str, seq_len: int, steps: int):
    """--grad-checkpoint: a training step's (fp32, AdamW) peak memory above weights, gradients (zeroed in
    place) and optimizer state, and its time, without and with. CUDA: max_memory_allocated; CPU: the
    most bytes malloc has handed out (runtime.PeakMalloc) after any aten op: not RSS, which keeps freed heap.
    Then --fsdp against DDP: a step's peak per process, model state included (benchlib.ddp_fsdp_peaks)."""
    sync, B, rows = sync_fn(device), bench_batch(device, name), {}
    x = torch.randint(0, 6400, (B, seq_len + 1), device=device)
    for recompute in (False, True):
        torch.manual_seed(0)
        model = MiniMind(PRESETS[name]).to(device).train()
        model.grad_checkpoint = recompute
        opt = make_optimizer(model, "adamw", 1e-4, 0.1, device)

        def step():
            model(x[:, :-1], x[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        dt = train_step_time(model, step, steps, sync)
        if device == "cuda":
            base, _ = torch.cuda.memory_allocated(), torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated() - base  # (the host allocates at launch: no sync needed)
        else:
            base = malloc_in_use()
            with PeakMalloc() as probe:
                step()
            peak = probe.peak - base if base is not None else float("nan")
        rows[recompute] = {"step_ms": round(1e3 * dt, 1), "peak_mib": round(peak / 2**20, 1)}
        del model, opt
    plain, ckpt = rows[False], rows[True]
    r = out["memory"] = {"model": name, "batch": B, "seq_len": seq_len, "plain": plain, "grad_checkpoint": ckpt,
                         "memory_ratio": round(ckpt["peak_mib"] / plain["peak_mib"], 3),
                         "time_ratio": round(ckpt["step_ms"] / plain["step_ms"], 3)}
    print(f"memory {name} B={B} T={seq_len}: step peak above weights/grads/optimizer {plain['peak_mib']:.0f} MiB, "
          f"--grad-checkpoint {ckpt['peak_mib']:.0f} MiB ({r['memory_ratio']:.2f}x), step time {r['time_ratio']:.2f}x")
    # FSDP2 splits weights, gradients and AdamW state over the processes: 2 torchrun processes each way,
    # a short batch (the model state is what differs; activations are the same per process)
    f = r["fsdp_vs_ddp"] = ddp_fsdp_peaks(name, min(seq_len, 64), 1, device)
    print(f"memory {name} B=1 T={f['seq_len']}, 2 processes ({f['device']}): step peak per process DDP "
          f"{f['ddp_peak_mib']:.0f} MiB, --fsdp {f['fsdp_peak_mib']:.0f} MiB ({f['ratio']:.2f}x); model state "
          f"{f['ddp_state_mib']:.0f} vs {f['fsdp_state_mib']:.0f} MiB ({f['state_ratio']:.2f}x)")


def bench_decode_limit(device, out, models, new_tokens=64, reps=5, compile_too=True):
    """Batch-1 KV-cache decoding against one pass over all weights per token, eager (also with F.linear
    for every matmul: `unsplit_linear`) and compiled (MiniMind.step through torch.compile), with the
    compile time (cold: an empty inductor cache; warm: compiled again from the cache it filled) and
    the tokens after which compiling has paid for itself.
    The limit's bandwidth is measured between the timed runs (a busy machine's bandwidth changes)."""
    rows = out.setdefault("decode_limit", [])
    sync = sync_fn(device)
    for name in models:
        dtype = pick_dtype("auto", device)
        torch.manual_seed(0)
        model = MiniMind(PRESETS[name]).to(device, dtype).eval()
        prompt = torch.randint(3, 6400, (1, 16), device=device)
        variants = {"eager": lambda: sum(1 for _ in model.generate_stream(prompt, new_tokens, temperature=0))}
        variants["eager_unsplit"] = unsplit_linear()(variants["eager"])  # F.linear's one-thread gemv
        list(model.generate_stream(prompt, 4, temperature=0))  # warm up
        row = {"model": name, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}
        if compile_too:
            with fresh_inductor_cache():
                for kind in ("cold", "warm"):  # into the empty cache, then again from what it holds
                    torch._dynamo.reset()
                    sync()
                    t0 = time.perf_counter()
                    list(model.generate_stream(prompt, 4, temperature=0, compiled=True))
                    sync()
                    row[f"compile_{kind}_s"] = round(time.perf_counter() - t0, 1)
            variants["compiled"] = lambda: sum(1 for _ in model.generate_stream(prompt, new_tokens, temperature=0,
                                                                                compiled=True))
        rates, bw = timed_rates(variants, reps, sync, probe=lambda: measure_bandwidth(device, seconds=0.3))
        weight_bytes = model.num_params(active=True) * model.embed.weight.element_size()
        limit = bw / weight_bytes
        row["bandwidth_gbs"], row["limit_tok_s"] = round(bw / 1e9, 2), round(limit, 1)
        for k, (tps, cpu_tps) in rates.items():
            row[f"{k}_tok_s"], row[f"{k}_cpu_tok_s"] = round(tps, 1), round(cpu_tps, 1)
            row[f"{k}_fraction"] = round(tps / limit, 3)
        e = rates["eager"][0]
        u = rates["eager_unsplit"][0]
        line = (f"decode {name:16s} batch 1: eager {e:7.1f} tok/s ({100 * e / limit:.0f}%; F.linear's gemv "
                f"{u:.1f}, {100 * u / limit:.0f}%)")
        if compile_too:
            c = rates["compiled"][0]
            saved = 1 / e - 1 / c  # seconds per token
            row["break_even_tokens_cold"] = round(row["compile_cold_s"] / saved) if saved > 0 else None
            row["break_even_tokens_warm"] = round(row["compile_warm_s"] / saved) if saved > 0 else None
            line += (f" | compiled {c:7.1f} tok/s ({100 * c / limit:.0f}%), {c / e:.2f}x; compile "
                     f"{row['compile_cold_s']} s cold / {row['compile_warm_s']} s warm, pays after "
                     f"{row['break_even_tokens_cold']} / {row['break_even_tokens_warm']} tokens")
        rows.append(row)
        print(line + f" | weight-streaming limit {limit:.1f} tok/s ({bw / 1e9:.1f} GB/s)", flush=True)
        del model


# -----------------------------------------------------------------------------
# kernels: forward+backward time and peak memory of each Triton kernel against the alternatives.
# On CUDA, at MiniMind shapes in bf16 (16k and 64k tokens):
# - rms_norm (dim 512, 768) and rope (minimind2: 8/2 heads of 64; minimind-3: 8/4 heads of 96):
#   triton vs PyTorch eager (the twin), torch.compile of the twin, liger-kernel where installed;
# - the MoE layer (router + experts; 4 experts top-1, 8 experts top-2; dim 512, ffn 1408):
#   triton vs the twin (sort + F.grouped_mm) vs a loop over experts (MiniMind's original), compiled twin;
# - a training step (forward+backward, autocast bf16) of minimind2-small, dense vs its 4-expert top-1 MoE;
# - bf16 correctness of every Triton op against its twin, on the GPU, in the same run.
# Timings are `triton.testing.do_bench` medians in ms; peak memory is the CUDA allocator's peak above
# what the inputs already hold, in MiB. On CPU only the PyTorch variants run, on small shapes (the
# Triton path there is the interpreter: nothing to time), so that the section can be smoke-tested.

@contextlib.contextmanager
def kernel_backend(name: str):
    old = mmkernels.get_backend()
    mmkernels.set_backend(name)
    try:
        yield
    finally:
        mmkernels.set_backend(old)


def time_and_peak(fn, device: str):
    """(ms, peak MiB) of fn()."""
    if device == "cuda":
        import triton.testing
        fn()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), peak
    fn()
    reps = 2
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3, None


def fwd_bwd_step(forward, inputs, name: str = "torch"):
    """A closure running forward(*inputs) and backward with fixed output gradients, under `name`'s backend."""
    grads = None

    def step():
        nonlocal grads
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.grad = None
        with kernel_backend(name):
            outs = forward(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs = [o for o in outs if o.requires_grad]
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)

    return step


def triton_error(forward, inputs):
    """Largest difference of the outputs and input gradients, Triton vs twin, relative to the twin's
    largest value (so one number per op, whatever the magnitudes)."""
    results = {}
    for name in ("torch", "triton"):
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None
        torch.manual_seed(0)
        with kernel_backend(name):
            outs = forward(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs = [o for o in outs if o.requires_grad]
        torch.manual_seed(1)
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
        results[name] = [o.detach().float() for o in outs] + [t.grad.float() for t in inputs
                                                               if isinstance(t, torch.Tensor) and t.grad is not None]
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
               for a, b in zip(results["triton"], results["torch"]))


def moe_loop(x, router_w, w1, w3, w2, top_k):
    """MiniMind's original MoE: a Python loop over experts (the baseline to beat)."""
    weights, experts, probs = moe_route(x @ router_w.t(), top_k, True)
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, k = torch.where(experts == e)
        h = F.silu(x[tok] @ w1[e].t()) * (x[tok] @ w3[e].t())
        y = y.index_add(0, tok, (h @ w2[e].t()) * weights[tok, k, None].to(x.dtype))
    return y, probs


def moe_layer(x, router_w, w1, w3, w2, top_k):
    weights, experts, probs = moe_route(x @ router_w.t(), top_k, True)
    return moe_experts(x, weights, experts, w1, w3, w2), probs


def kernel_cases(device: str):
    """(op, shape label, forward, inputs, impls) for each benchmark."""
    cuda = device == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    token_counts = (16384, 65536) if cuda else (128,)
    dims = (512, 768) if cuda else (32,)

    def p(*shape, dtype=dt, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()

    for n in token_counts:
        for d in dims:
            yield "rms_norm", f"{n}x{d}", lambda x, w: rms_norm(x, w, 1e-5), (p(n, d), p(d, dtype=torch.float32)), \
                dict(liger=liger_rms_norm, compile=lambda x, w: rms_norm_torch(x, w, 1e-5))
    for n in token_counts:
        T = min(n, 4096 if cuda else 64)
        for hq, hk, hd in ((8, 2, 64), (8, 4, 96)):
            cos = torch.randn(T, hd, device=device)
            sin = torch.randn(T, hd, device=device)
            qkv = p(n // T, T, hq + 2 * hk, hd)  # q, k as slices of a fused projection, as in a model

            def fwd(qkv, hq=hq, hk=hk, cos=cos, sin=sin):
                return rope(qkv[:, :, :hq], qkv[:, :, hq:hq + hk], cos, sin)

            yield "rope", f"{n // T}x{T}x{hq}/{hk}x{hd}", fwd, (qkv,), \
                dict(liger=liger_rope(hq, hk, cos, sin), compile=lambda qkv, hq=hq, hk=hk, cos=cos, sin=sin:
                     rope_torch(qkv[:, :, :hq], qkv[:, :, hq:hq + hk], cos, sin))
    d, f = (512, 1408) if cuda else (32, 48)
    for n in token_counts:
        for e, k in ((4, 1), (8, 2)):
            inputs = (p(n, d), p(e, d, scale=d ** -0.5), p(e, f, d, scale=d ** -0.5), p(e, f, d, scale=d ** -0.5),
                      p(e, d, f, scale=f ** -0.5), k)
            yield "moe", f"{n}x{d} E{e} k{k}", moe_layer, inputs, dict(loop=moe_loop, compile=moe_layer)


def liger_rms_norm(x, w):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    return LigerRMSNormFunction.apply(x, w, 1e-5)


def liger_rope(hq, hk, cos, sin):
    def fwd(qkv):
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        q, k = qkv[:, :, :hq].transpose(1, 2), qkv[:, :, hq:hq + hk].transpose(1, 2)  # liger: (B, H, T, D)
        return liger_rotary_pos_emb(q, k, cos[None], sin[None])
    return fwd


def step_cases(device: str):
    """Dense vs MoE training step at equal active parameters."""
    base = PRESETS["minimind2-small"] if device == "cuda" else dataclasses.replace(PRESETS["tiny"], n_layers=1)
    B, T = (16, 1024) if device == "cuda" else (2, 32)
    for label, cfg in (("dense", base), ("moe E4 k1", dataclasses.replace(base, n_experts=4, top_k=1))):
        model = MiniMind(cfg).to(device)
        idx = torch.randint(0, cfg.vocab_size, (B, T), device=device)

        def step(model=model, idx=idx):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                _, loss = model(idx, idx)
            loss.backward()

        yield f"{B}x{T} {label}", step


def bench_kernels(device: str, out: dict, impls=None) -> None:
    """Fill `out["kernel_bench"]` and print a table. device: "cuda" or "cpu". impls: the implementations
    to run, of torch, triton, compile, liger, loop; default all on CUDA, the PyTorch ones (torch, loop)
    on CPU. The Triton check (bf16 on CUDA) runs with triton. `out["kernel_bench"]` receives
        "rows"   [{"op", "shape", "impl", "ms", "peak_mib"}]   one per measurement ("error" if it failed)
        "check"  {op: max error of Triton vs twin (outputs and input gradients), relative to the
                 twin's largest value}
        "ratio"  {"<op> <shape>: <impl>/triton": time ratio (>1: triton faster), and
                 "moe/dense step (<backend>)": MoE step time over the dense step's}"""
    device = "cuda" if device.startswith("cuda") else device
    cuda = device == "cuda"
    impls = set(impls or (("torch", "triton", "compile", "liger", "loop") if cuda else ("torch", "loop")))
    rows, checks, ratios = [], {}, {}
    torch.manual_seed(0)
    for op, shape, forward, inputs, others in kernel_cases(device):
        runs = {"torch": fwd_bwd_step(forward, inputs, "torch"), "triton": fwd_bwd_step(forward, inputs, "triton")}
        runs["compile"] = lambda fn=others["compile"], inputs=inputs: fwd_bwd_step(torch.compile(fn), inputs, "torch")()
        if "liger" in others:
            runs["liger"] = fwd_bwd_step(others["liger"], inputs)
        if "loop" in others:
            runs["loop"] = fwd_bwd_step(others["loop"], inputs, "torch")
        times = {}
        for impl, fn in runs.items():
            if impl not in impls:
                continue
            try:
                ms, peak = time_and_peak(fn, device)
            except Exception as e:  # a missing optional package, an unsupported shape: record, go on
                rows.append(dict(op=op, shape=shape, impl=impl, ms=None, peak_mib=None,
                                 error=f"{type(e).__name__}: {e}"[:200]))
                continue
            times[impl] = ms
            rows.append(dict(op=op, shape=shape, impl=impl, ms=ms, peak_mib=peak))
        for impl in times:
            if "triton" in times and impl != "triton":
                ratios[f"{op} {shape}: {impl}/triton"] = times[impl] / times["triton"]
        if "triton" in impls and op not in checks:
            checks[op] = triton_error(forward, inputs)
    step_times = {}
    for label, step in step_cases(device):
        for impl in ("triton", "torch"):
            if impl in impls:
                with kernel_backend(impl):
                    ms, peak = time_and_peak(step, device)
                step_times[(label, impl)] = ms
                rows.append(dict(op="train_step", shape=label, impl=impl, ms=ms, peak_mib=peak))
    for impl in {i for _, i in step_times}:
        dense = [v for (lab, i), v in step_times.items() if i == impl and "dense" in lab]
        moe = [v for (lab, i), v in step_times.items() if i == impl and "moe" in lab]
        if dense and moe:
            ratios[f"moe/dense step ({impl})"] = moe[0] / dense[0]
    out["kernel_bench"] = {"device": device, "rows": rows, "check": checks, "ratio": ratios}
    print_kernel_bench(rows, checks, ratios, device)


def print_kernel_bench(rows, checks, ratios, device):
    print(f"kernels on {device}: forward+backward")
    print(f"{'op':10s} {'shape':26s} {'impl':8s} {'ms':>9s} {'peak MiB':>9s}")
    for r in rows:
        ms = f"{r['ms']:9.3f}" if r["ms"] is not None else f"{'-':>9s}"
        peak = f"{r['peak_mib']:9.1f}" if r["peak_mib"] is not None else f"{'-':>9s}"
        err = f"  {r['error']}" if "error" in r else ""
        print(f"{r['op']:10s} {r['shape']:26s} {r['impl']:8s} {ms} {peak}{err}")
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}")
    for k, v in checks.items():
        print(f"check {k}: Triton vs twin, max relative error {v:.2e}")


# -----------------------------------------------------------------------------
# moe: a MoE training step against the dense step of the same active size, for our MoE layer and
# for MiniMind-3's own (a loop over experts, re-implemented below), swapped into the same model.

class MiniMindMoE(nn.Module):
    """MiniMind-3's MoE layer as its model/model_minimind.py writes it (`MOEFeedForward`), re-implemented
    for benchmarks and tests: one nn.Linear triple per expert, a Python loop over experts with a host
    sync (`mask.any()`) each, `index_add_` into zeros, an unused expert touched by a zero term, the
    one-hot balance loss. Built from one of our `MoE` layers (same weights, same outputs), so that
    swapping it into our model (`minimind_moe_model`) isolates the cost of the layer.

    N = tokens, D = dim, E = experts, K = experts per token."""

    def __init__(self, moe: MoE):
        super().__init__()
        E, Fh, D = moe.w1.shape
        assert not moe.shared, "MiniMind-3's MoE has no shared experts"
        self.top_k, self.n_experts = moe.top_k, E
        self.norm_topk_prob = moe.norm_top1 if moe.top_k == 1 else moe.norm_topk
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(FeedForward(D, Fh) for _ in range(E))
        with torch.no_grad():
            self.gate.weight.copy_(moe.router.weight)
            for e, expert in enumerate(self.experts):
                expert.w1.weight.copy_(moe.w1[e])  # gate_proj
                expert.w3.weight.copy_(moe.w3[e])  # up_proj
                expert.w2.weight.copy_(moe.w2[e])  # down_proj
        self.aux_loss = None

    def forward(self, x):
        B, T, D = x.shape
        x_flat = x.view(-1, D)  # (N, D)
        scores = F.softmax(self.gate(x_flat), dim=-1)  # (N, E)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # (N, K)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        y = torch.zeros_like(x_flat)
        for i, expert in enumerate(self.experts):
            mask = topk_idx == i  # (N, K)
            if mask.any():
                token_idx = mask.any(dim=-1).nonzero().flatten()
                weight = topk_weight[mask].view(-1, 1)
                y.index_add_(0, token_idx, (expert(x_flat[token_idx]) * weight).to(y.dtype))
            elif self.training:
                y[0, 0] += 0 * sum(p.sum() for p in expert.parameters())
        if self.training:  # unscaled: our model multiplies by aux_loss_coef (MiniMind scales it here)
            load = F.one_hot(topk_idx, self.n_experts).float().mean(0)
            self.aux_loss = (load * scores.mean(0)).sum() * self.n_experts
        return y.view(B, T, D)


def minimind_moe_model(model: MiniMind) -> MiniMind:
    """`model` with every MoE layer replaced, in place, by MiniMind-3's (`MiniMindMoE`, same weights)."""
    for block in model.layers:
        block.ffn = MiniMindMoE(block.ffn).to(block.ffn.w1.device)
    return model


def _moe_phases(step, steps: int, warmup: int, sync, cpu_clock) -> tuple:
    """Time `step(label)` for ours and MiniMind's MoE, each in a phase of its own against the dense
    model: `warmup` rounds, then `steps` rounds in alternating order -> ({label: wall seconds},
    {label: cpu seconds}), the dense lists holding the ours phase's steps first.

    Separate phases: in bf16/fp16 on CPU oneDNN compiles a GEMM kernel for each shape it meets, and
    MiniMind's expert GEMMs bring new shapes every step, whose kernels evict ours from its caches (ours
    1.52x dense interleaved with it, 1.17x in its own phase; the twin pads expert groups to 16 rows so
    that its shapes repeat: CPU_LOWP_GROUP_ROWS). Warm-up: AdamW's state, the allocator, and in
    bf16/fp16 those kernels (~5 steps to meet most shapes)."""
    wall, cpu = {k: [] for k in ("dense", "ours", "minimind")}, {k: [] for k in ("dense", "ours", "minimind")}
    for phase in (("dense", "ours"), ("dense", "minimind")):
        for _ in range(warmup):
            for label in phase:
                step(label)
        for r in range(steps):
            for label in phase[r % 2:] + phase[:r % 2]:
                sync()
                t0, c0 = time.perf_counter(), cpu_clock()
                step(label)
                sync()
                wall[label].append(time.perf_counter() - t0)
                cpu[label].append(cpu_clock() - c0)
    return wall, cpu


def _moe_times(wall: dict, cpu: dict, steps: int) -> dict:
    """_moe_phases' times -> medians ({label}_s, {label}_cpu_s) and the ratios ours/dense,
    minimind/dense (each against the dense steps of its own phase) and ours/minimind, wall and cpu."""
    row = {}
    for label in wall:
        row[f"{label}_s"] = round(statistics.median(wall[label]), 3)
        row[f"{label}_cpu_s"] = round(statistics.median(cpu[label]), 3)
    for kind, times in (("", wall), ("cpu_", cpu)):
        for i, label in enumerate(("ours", "minimind")):  # each against the dense steps of its phase
            dense = statistics.median(times["dense"][i * steps:(i + 1) * steps])
            row[f"{label}/dense {kind}ratio"] = round(statistics.median(times[label]) / dense, 3)
        row[f"ours/minimind {kind}ratio"] = round(row[f"ours/dense {kind}ratio"] /
                                                   row[f"minimind/dense {kind}ratio"], 3)
    return row


def bench_moe(device: str, out: dict, pairs=(("tiny", "tiny-moe"), ("minimind-3", "minimind-3-moe")),
              batch: int = 4, seq_len: int = 256, steps: int = 3, threads=(1, 2)) -> None:
    """MoE/dense training-step time (forward + backward + AdamW step + zero_grad) of each (dense
    preset, MoE preset) pair, for our MoE layer ("ours") and MiniMind-3's ("minimind", same
    weights: `MiniMindMoE`), with AdamW as torch.optim builds it by default (a loop of per-tensor ops
    on CPU: each makes temporaries the size of the tensor) and fused, in fp32; then fused in the
    autocast dtype training picks (`pick_dtype(..., training=True)`) where that is not fp32.

    Ours and MiniMind's each step in turn with the dense model in a phase of their own, `steps`
    rounds (the order alternates), after two warm-up rounds (five in bf16/fp16); medians, each MoE
    step against the dense steps of its phase. Wall time, and the process's CPU time (at 1 thread:
    the thread's own, which other jobs on the machine hardly change). Appends to out["moe"] one dict per (pair, optimizer,
    threads): load (1-minute load average before, after), *_s wall seconds, *_cpu_s, and the ratios
    ours/dense, minimind/dense, ours/minimind (wall and cpu)."""
    rows = out.setdefault("moe", [])
    sync = sync_fn(device)
    saved_threads = torch.get_num_threads()
    for dense_name, moe_name in pairs:
        torch.manual_seed(0)
        x = torch.randint(0, PRESETS[dense_name].vocab_size, (batch, seq_len + 1), device=device)
        models = {}
        for label, name in (("dense", dense_name), ("ours", moe_name), ("minimind", moe_name)):
            torch.manual_seed(0)  # ours and minimind: the same weights
            models[label] = MiniMind(PRESETS[name]).to(device).train()
        minimind_moe_model(models["minimind"])
        # fp32 with both AdamWs; then, where training autocasts (CUDA, CPUs with bf16 units), its dtype
        trained = pick_dtype("auto", device, training=True)
        configs = [(False, torch.float32), (True, torch.float32)] + [(True, trained)] * (trained != torch.float32)
        for fused, dtype in configs:
            opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=fused) for k, m in models.items()}

            def step(label):
                with autocast(device, dtype):
                    _, loss = models[label](x[:, :-1], x[:, 1:])
                loss.backward()
                opts[label].step()
                opts[label].zero_grad(set_to_none=True)

            for n_threads in threads:
                torch.set_num_threads(n_threads)
                cpu_clock = time.thread_time if n_threads == 1 else time.process_time
                load = os.getloadavg()[0]
                wall, cpu = _moe_phases(step, steps, 2 if dtype == torch.float32 else 5, sync, cpu_clock)
                row = {"dense": dense_name, "moe": moe_name, "optimizer": "adamw fused" if fused else "adamw",
                       "dtype": str(dtype).replace("torch.", ""), "threads": n_threads, "batch": batch,
                       "seq_len": seq_len, "steps": steps,
                       "load": [round(load, 2), round(os.getloadavg()[0], 2)], **_moe_times(wall, cpu, steps)}
                rows.append(row)
                print(f"moe {moe_name:15s}/{dense_name:11s} {row['dtype']:8s} {row['optimizer']:11s} {n_threads} thr, "
                      f"load {row['load'][0]:.1f}-{row['load'][1]:.1f}: dense {row['dense_s']:6.2f} s | MoE/dense ours "
                      f"{row['ours/dense ratio']:.2f} (cpu {row['ours/dense cpu_ratio']:.2f}), minimind "
                      f"{row['minimind/dense ratio']:.2f} (cpu {row['minimind/dense cpu_ratio']:.2f})", flush=True)
            del opts
        del models
    torch.set_num_threads(saved_threads)


@torch.no_grad()
def _naive_decode(model, idx, n: int):
    """Greedy decoding without a cache: the whole sequence goes through the model for every token."""
    for _ in range(n):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def bench_decode(device: str, out: dict, presets=("tiny", "minimind-3"), batch_sizes=(1, 8), prompt_len: int = 32,
                 new_tokens: int = 32, threads: Optional[int] = None, compile_too: bool = True, reps: int = 3) -> None:
    """Greedy decode speed, random weights: KV-cache decoding (generate_stream, left-padded batch),
    eager and compiled, against a naive loop that re-runs the whole sequence for each token.

    Appends to out["decode"] one dict per (preset, batch): model, batch, prompt_len, new_tokens,
    kv_tok_s, compiled_tok_s (compile_too) and naive_tok_s (generated tokens per second, all rows
    counted, prefill included; medians of `reps` interleaved runs, naive once), speedup (kv / naive).
    Prompts of a batch have different lengths (prompt_len down to prompt_len / 2). The naive loop gets
    every row cut to the shortest prompt (no padding), so the speedup is a lower bound. `threads`
    sets torch's CPU threads for the run (small models on a busy CPU: 1 is fastest)."""
    rows = out.setdefault("decode", [])
    sync = sync_fn(device)
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        _bench_decode(device, rows, presets, batch_sizes, prompt_len, new_tokens, sync, compile_too, reps)
    finally:
        torch.set_num_threads(saved)


def _bench_decode(device, rows, presets, batch_sizes, prompt_len, new_tokens, sync, compile_too, reps):
    for name in presets:
        torch.manual_seed(0)
        model = MiniMind(PRESETS[name]).to(device).eval()
        for B in batch_sizes:
            lens = [prompt_len - (prompt_len // 2) * b // max(B - 1, 1) for b in range(B)]
            prompts = [torch.randint(3, model.config.vocab_size, (n,)).tolist() for n in lens]
            idx, pad = left_pad(prompts, device=device)
            variants = {"kv": False, "compiled": True} if compile_too else {"kv": False}
            for compiled in variants.values():  # warm-up (and compile)
                model.generate(idx, 2, temperature=0, pad=pad, compiled=compiled)
            rates = timed_rates({k: lambda c=c: B * (model.generate(idx, new_tokens, temperature=0, pad=pad,
                                                                     compiled=c).shape[1] - idx.shape[1])
                                 for k, c in variants.items()}, reps, sync)
            idx = torch.tensor([p[:min(lens)] for p in prompts], device=device)  # naive: equal lengths, no pads
            _naive_decode(model, idx, 1)
            sync()
            t0 = time.perf_counter()
            _naive_decode(model, idx, new_tokens)
            sync()
            naive = B * new_tokens / (time.perf_counter() - t0)
            row = {"model": name, "batch": B, "prompt_len": prompt_len, "new_tokens": new_tokens,
                   "kv_tok_s": round(rates["kv"][0], 1), "naive_tok_s": round(naive, 1),
                   "speedup": round(rates["kv"][0] / naive, 2), "threads": torch.get_num_threads()}
            if compile_too:
                row["compiled_tok_s"] = round(rates["compiled"][0], 1)
                row["compiled_cpu_tok_s"] = round(rates["compiled"][1], 1)
            row["kv_cpu_tok_s"] = round(rates["kv"][1], 1)
            rows.append(row)
        del model


def bench_server(device: str, out: dict, clients: int = 8, requests_per_client: int = 3, max_tokens: int = 48,
                 tokenizer_dir: str = "data/tok", threads: Optional[int] = None) -> None:
    """Requests/s and generated tokens/s of serve.py under `clients` concurrent streaming clients, a
    random-weight `tiny` model, with batching (--max-batch clients) and without (--max-batch 1).
    The server runs as it does in use, in its own process (clients here do not share its GIL).
    Sets out["server"] = {"clients", "max_tokens", "threads", "batched": {...}, "sequential": {...}},
    each with requests, seconds, req_s, tok_s, ttft_ms (mean time to the first generated text).
    `threads` sets the server's CPU threads."""
    tok_dir = tokenizer_dir if Path(tokenizer_dir, "tokenizer.json").exists() else _bench_tokenizer()
    torch.manual_seed(0)
    ckpt = Path(tempfile.mkdtemp(prefix="minimind-bench-server"))
    save_checkpoint(ckpt, 0, MiniMind(PRESETS["tiny"]), state={"kind": "bench"}, tokenizer_dir=tok_dir)
    result = {"clients": clients, "max_tokens": max_tokens, "threads": threads or torch.get_num_threads()}

    def client(port, i, times, counts):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for j in range(requests_per_client):
            body = {"messages": [{"role": "user", "content": f"你好，第{i}个客户端的第{j}个问题" + "。" * (i % 4)}],
                    "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0.8, "seed": i,
                    "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp, first = conn.getresponse(), None
            for line in resp:
                if not line.startswith(b"data: {"):
                    continue
                obj = json.loads(line[6:])
                if first is None and obj["choices"] and obj["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - t0
                if obj.get("usage"):
                    counts.append(obj["usage"]["completion_tokens"])
            times.append(first or 0.0)
        conn.close()

    for label, batch in (("batched", clients), ("sequential", 1)):
        proc, port = _start_server(["--ckpt", ckpt, "--device", device, "--context", max_tokens + 64,
                                    "--max-batch", batch, "--threads", threads or 0])
        try:
            times, counts = [], []
            client(port, 0, [], [])  # warm-up
            t0 = time.perf_counter()
            ths = [threading.Thread(target=client, args=(port, i, times, counts)) for i in range(clients)]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            dt = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        n = clients * requests_per_client
        result[label] = {"requests": n, "seconds": round(dt, 2), "req_s": round(n / dt, 2),
                         "tok_s": round(sum(counts) / dt, 1), "ttft_ms": round(1000 * sum(times) / len(times), 1)}
    out["server"] = result


def _start_server(args: list):
    """serve.py ARGS on a free loopback port -> (process, port), once it says it is serving."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("serve.py")), "--port", "0", "--quiet",
                             "--no-ui", *map(str, args)], stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"serve.py did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1].split("/")[0])


def _bench_tokenizer() -> str:
    """A directory with a byte-level BPE tokenizer trained in a moment on a small built-in text (no data/tok)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["你好，世界。今天天气很好。", "Hello world, a small benchmark text."] * 50, trainer=trainer)
    d = tempfile.mkdtemp(prefix="minimind-bench-tok")
    hf.save(f"{d}/tokenizer.json")
    return d


SECTIONS = ("peak", "train", "optim", "dpo", "memory", "decode", "server", "kernels", "contention", "moe")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--models", default="tiny,minimind2-small,minimind-3", help="models for train/decode")
    p.add_argument("--seq-len", type=int, default=512, help="training sequence length")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per configuration (>= 1)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    p.add_argument("--kernels", default=None, choices=mmkernels.BACKENDS, help="kernel implementation for the model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; moe: 1 and 2)")
    p.add_argument("--moe-pairs", default="tiny:tiny-moe,minimind-3:minimind-3-moe",
                   help="moe section: comma-separated dense:moe preset pairs")
    p.add_argument("--out", default="bench.json", help="results file (JSON)")
    args = p.parse_args(argv)
    sections = set(args.only.split(","))
    models = args.models.split(",")
    problems = [f"--only: unknown section(s) {', '.join(sorted(sections - set(SECTIONS)))} (choose from "
                f"{','.join(SECTIONS)})" if sections - set(SECTIONS) else "",
                f"--models: unknown preset(s) {', '.join(m for m in models if m not in PRESETS)} (choose from "
                f"{','.join(PRESETS)})" if any(m not in PRESETS for m in models) else "",
                "--steps must be >= 1" if args.steps < 1 else "", "--seq-len must be >= 2" if args.seq_len < 2 else "",
                "--threads must be >= 1" if args.threads is not None and args.threads < 1 else ""]
    try:
        device = pick_device(args.device)
    except ValueError as e:
        problems.append(str(e))
    if any(problems):
        p.error("; ".join(x for x in problems if x))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cpu":
        keep_freed_memory()  # as train.py does on a CPU
    if args.kernels:
        mmkernels.set_backend(args.kernels)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "kernels": mmkernels.get_backend()}
    print(f"bench on {out['device']} ({device}, {out['threads']} threads), torch {torch.__version__}")
    bench_peak(device, out)  # every ratio below is against these
    if "train" in sections:
        bench_train(device, out, models, args.seq_len, not args.no_compile, args.steps)
    if "optim" in sections:
        bench_optim(device, out, models, args.seq_len, args.steps)
    if "dpo" in sections:
        bench_dpo(device, out, models[0], args.seq_len, args.steps)
    if "memory" in sections:
        bench_memory(device, out, "minimind-3" if "minimind-3" in models else models[-1], args.seq_len, args.steps)
    if "decode" in sections:
        out["decode_load"] = [os.getloadavg()[0]]
        bench_decode_limit(device, out, models, compile_too=not args.no_compile)
        bench_decode(device, out, presets=[m for m in ("tiny", "minimind-3") if m in models] or models[:1],
                     compile_too=not args.no_compile)
        out["decode_load"].append(os.getloadavg()[0])
        for r in out["decode"]:
            one = next((s for s in out["decode"] if s["model"] == r["model"] and s["batch"] == 1), r)
            compiled = "" if "compiled_tok_s" not in r else (
                f" | compiled {r['compiled_tok_s']:8.1f} tok/s, {r['compiled_tok_s'] / r['kv_tok_s']:.2f}x eager, "
                f"{r['compiled_tok_s'] / one['compiled_tok_s']:.1f}x batch 1")
            print(f"decode {r['model']:16s} batch {r['batch']}: KV cache {r['kv_tok_s']:8.1f} tok/s "
                  f"({r['kv_tok_s'] / one['kv_tok_s']:.1f}x batch 1) vs naive {r['naive_tok_s']:8.1f} tok/s "
                  f"({r['speedup']:.1f}x){compiled}")
        print(f"decode: load average {out['decode_load'][0]:.1f} before, {out['decode_load'][1]:.1f} after")
    if "server" in sections:
        bench_server(device, out)
        s = out["server"]
        for k in ("batched", "sequential"):
            print(f"server {k:10s}: {s[k]['req_s']:.2f} req/s, {s[k]['tok_s']:.1f} tok/s, "
                  f"TTFT {s[k]['ttft_ms']:.0f} ms ({s['clients']} clients)")
    if "kernels" in sections:
        bench_kernels(device, out)
    if "contention" in sections and device == "cpu":
        out["contention"] = contention(models[0])
        print("\n".join(contention_lines(out["contention"])))
    if "moe" in sections:
        pairs = [tuple(p.split(":")) for p in args.moe_pairs.split(",")]
        bench_moe(device, out, pairs, steps=args.steps, threads=(args.threads,) if args.threads else (1, 2))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
