"""Train a minimind model: one loop for every stage.

    python train.py --mode=pretrain --model=tiny --data=data/default --out=out/tiny
    torchrun --standalone --nproc_per_node=8 train.py --mode=pretrain --model=minimind-3 --data=... --out=...
    python train.py --mode=pretrain --out=out/tiny --resume          # continue after a crash / kill -9
    python train.py --mode=sft --init-from=out/tiny --data=data/sft --out=out/sft --seq-len=512
    python train.py --mode=dpo --init-from=out/sft --data=data/dpo --out=out/dpo --seq-len=1024
    python train.py --mode=sft --init-from=out/tiny --data=data/sft --out=out/sft-lora --lora-rank=8  # adapters only

SFT and DPO rows pack whole conversations (DPO: prompt + chosen and prompt + rejected of a pair)
with positions restarting and attention confined to each; the loss covers the assistant replies.

Per step it prints loss, lr, tokens/s, MFU and ETA, and appends to OUT/log.jsonl (training steps
with "step" and "loss", evaluations with "step" and "val_loss"); OUT/loss.png plots them.
Checkpoints go to OUT/ckpt_XXXXXX/ atomically (see common.py). On CPU, a resumed run is
bit-identical to an uninterrupted one: every batch is a pure function of (seed, step, index).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import kernels
import lora
from checkpoint import Log, load_checkpoint, plot_log, resolve_checkpoint, save_checkpoint
from data import DPOData, PretrainData, SFTData
from losses import lm_loss, make_dpo_loss
from minimind import PRESETS, MiniMind, ModelConfig
from optim import Optimizers, lr_multiplier, make_optimizer
from runtime import autocast, datasheet_flops, measure_matmul_flops, pick_device, pick_dtype

DEFAULT_LR = {"pretrain": 6e-3, "sft": 1e-3, "dpo": 1e-4}  # fine-tuning starts from trained weights: gentler
DEFAULT_OPTIMIZER = {"pretrain": "muon", "sft": "adamw", "dpo": "adamw"}

# mode -> (data class, loss builder: (model, args) -> loss_fn(model, batch) -> (loss, extra metrics))
MODES = {"pretrain": (PretrainData, lambda model, args: lm_loss),
         "sft": (SFTData, lambda model, args: lm_loss),  # the mask is in the targets (-1 = no loss)
         "dpo": (DPOData, make_dpo_loss)}


# -----------------------------------------------------------------------------
# schedule and optimizer

def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------
# command line

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--mode", choices=list(MODES), default="pretrain", help="training stage")
    g.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl, loss.png")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--init-from", default=None, help="start from this checkpoint's weights and model config")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=list(PRESETS), help="model preset (ignored with --init-from)")
    g.add_argument("--aux-loss-coef", type=float, default=None, help="MoE balance loss weight (default: the preset's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="prepared data directory (from prepare.py)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    g.add_argument("--batch-size", type=int, default=16, help="rows per micro-batch per process")
    g.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per optimizer step over all processes; gradient accumulation makes up the "
                        "difference (default: one micro-batch per process)")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-iters", type=int, default=300, help="optimizer steps")
    g.add_argument("--optimizer", choices=("adamw", "muon"), default=None,
                   help="muon: Muon on attention/FFN matrices, AdamW on the rest (default: " +
                        ", ".join(f"{m} {o}" for m, o in DEFAULT_OPTIMIZER.items()) + ")")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default, tuned on the tiny preset: " +
                        ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    g.add_argument("--warmup-iters", type=int, default=None, help="linear warmup steps (default: 5%% of --max-iters)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on >=2-D weights")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g = p.add_argument_group("dpo")
    g.add_argument("--beta", type=float, default=0.1, help="DPO: strength of the KL tie to the reference model")
    g.add_argument("--dpo-length-norm", action="store_true",
                   help="DPO: average completion log-probabilities over tokens instead of summing them")
    g = p.add_argument_group("lora (sft, dpo)")
    g.add_argument("--lora-rank", type=int, default=0,
                   help="train rank-R LoRA adapters on top of --init-from (frozen) instead of every weight (0: off)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale: updates are multiplied by alpha / rank")
    g.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                   help="layers that get adapters: any of q,k,v,o (attention), gate,up,down (feed-forward)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-interval", type=int, default=100, help="evaluate every N steps (and at the end)")
    g.add_argument("--eval-iters", type=int, default=20, help="validation batches per evaluation")
    g.add_argument("--save-interval", type=int, default=100, help="checkpoint every N steps (and at the end)")
    g.add_argument("--log-interval", type=int, default=10, help="print every N steps")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--kernels", default=None, choices=kernels.BACKENDS,
                   help="kernel implementation (default: $MINIMIND_KERNELS or auto)")
    g.add_argument("--seed", type=int, default=1337, help="seeds weights and data order")
    g.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: known GPU or measured)")
    return p


def given_flags(argv) -> set:
    """Names of the flags set on the command line (whatever their value)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(parser.parse_args(argv)))


def resolve_args(args):
    """Fill defaults from the run being resumed or the checkpoint being fine-tuned.
    Flags given on the command line win; flags not given inherit."""
    given = given_flags(sys.argv[1:])
    source = None
    if args.resume:
        source = resolve_checkpoint(args.out)
    elif args.init_from:
        source = resolve_checkpoint(args.init_from)
    if source is not None:
        saved = json.loads((source / "state.json").read_text()).get("args", {})
        inherit = ["model", "seq_len", "batch_size", "dtype", "kernels", "seed", "aux_loss_coef"]
        if args.resume:  # the same run: everything not overridden
            saved.setdefault("optimizer", "adamw")  # runs from before --optimizer existed used AdamW
            if "optimizer" in given and args.optimizer != saved["optimizer"]:
                sys.exit(f"--optimizer {args.optimizer}: {args.out} was trained with {saved['optimizer']}, "
                         "whose state cannot carry over (start a new run with --init-from instead)")
            inherit = [k for k in saved if k not in ("resume", "out", "init_from")]
        for k in inherit:
            if k in saved and k not in given and hasattr(args, k):
                setattr(args, k, saved[k])
    if args.lr is None:
        args.lr = DEFAULT_LR[args.mode]
    if args.optimizer is None:
        args.optimizer = DEFAULT_OPTIMIZER[args.mode]
    if args.data is None:
        sys.exit("--data is required (a directory written by prepare.py)")
    return args, source


# -----------------------------------------------------------------------------
# main

def main():
    args, source = resolve_args(build_parser().parse_args())
    if args.kernels:
        kernels.set_backend(args.kernels)

    # distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    ddp = "RANK" in os.environ
    if ddp:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        device = pick_device(args.device)
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    else:
        rank, world, device = 0, 1, pick_device(args.device)
    master = rank == 0
    dtype = pick_dtype(args.dtype, device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if master:
        out.mkdir(parents=True, exist_ok=True)

    # model: fresh from a preset, or from a checkpoint
    start_step = 0
    if source is not None:
        # resuming a LoRA run: base + adapters kept apart; otherwise adapters (if any) merged in
        model, state, _ = load_checkpoint(source, device, merge_lora=not args.resume)
        model.train()
        if args.resume:
            start_step = state["step"]
    else:
        cfg = ModelConfig(**PRESETS[args.model].to_dict())
        model = MiniMind(cfg).to(device)
    if args.aux_loss_coef is not None:
        model.config.aux_loss_coef = args.aux_loss_coef
    lora_spec = None  # LoRA: only adapters train and are saved; the base checkpoint stays where it is
    if args.resume and "lora" in state:
        lora_spec = state["lora"]
    elif args.lora_rank:
        if source is None or args.mode == "pretrain":
            sys.exit("--lora-rank adapts a trained checkpoint: use it with --mode=sft|dpo and --init-from")
        targets = lora.apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)
        lora_spec = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": targets,
                     "base": str(source.resolve()),  # and relative to OUT, for a copied or moved tree of runs:
                     "base_rel": os.path.relpath(source.resolve(), out.resolve())}
    else:
        model.requires_grad_(True)

    DataClass, make_loss = MODES[args.mode]
    data = DataClass(args.data, args.seq_len, args.seed)
    if data.meta.get("vocab_size", 0) > model.config.vocab_size:
        sys.exit(f"{args.data}: vocabulary {data.meta['vocab_size']} > model's {model.config.vocab_size}")

    # token budget -> gradient accumulation
    tokens_per_micro = args.batch_size * args.seq_len
    batch_tokens = args.batch_tokens or tokens_per_micro * world
    assert batch_tokens % (tokens_per_micro * world) == 0, \
        f"--batch-tokens {batch_tokens} must be a multiple of batch-size*seq-len*world = {tokens_per_micro * world}"
    accum = batch_tokens // (tokens_per_micro * world)
    data.micro_batches = accum * world  # packed data walks its rows in order: where each step starts
    loss_fn = make_loss(model, args)
    warmup = args.warmup_iters if args.warmup_iters is not None else max(1, args.max_iters // 20)

    optimizer = make_optimizer(model, args.optimizer, args.lr, args.weight_decay, device)
    if args.resume:
        optimizer.load_state_dict(torch.load(source / "optim.pt", map_location=device, weights_only=True))
    train_model = torch.compile(model) if args.compile else model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(train_model, device_ids=[local_rank] if device.startswith("cuda") else None)

    flops_per_step = model.flops_per_token(args.seq_len) * batch_tokens
    datasheet = args.peak_tflops * 1e12 if args.peak_tflops else datasheet_flops(device, dtype)
    peak = (datasheet or measure_matmul_flops(device, dtype)) * world
    log = Log(out, start_step if args.resume else None, enabled=master)
    tok_dir = data.dir / "tokenizer"
    if master:
        n, n_act = model.num_params(), model.num_params(active=True)
        print(f"{args.mode} | {n / 1e6:.2f}M params ({n_act / 1e6:.2f}M active) | {world} process(es) on {device} "
              f"{str(dtype).replace('torch.', '')} | {batch_tokens:,} tokens/step = {world} x {accum} x "
              f"{args.batch_size} x {args.seq_len} | kernels {kernels.get_backend()}")
        if isinstance(optimizer, Optimizers):
            n_muon = sum(p.numel() for g in optimizer.optimizers["muon"].param_groups for p in g["params"])
            print(f"optimizer: Muon on {n_muon / 1e6:.2f}M params (attention/FFN matrices), AdamW on the rest")
        else:
            print("optimizer: AdamW" + (" (LoRA adapters stay on AdamW)" if args.optimizer == "muon" else ""))
        if lora_spec:
            n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"LoRA rank {lora_spec['rank']} on {','.join(lora_spec['targets'])}: {n_lora / 1e6:.3f}M trainable "
                  f"params; base {lora_spec['base']}")
        if hasattr(data, "describe"):
            print(data.describe())

    @torch.no_grad()
    def evaluate(step):
        model.eval()
        totals = {}
        for i in range(args.eval_iters):  # the same validation batches every time; split across ranks
            if i % world != rank:
                continue
            with autocast(device, dtype):
                loss, extra = loss_fn(model, data.batch("val", 0, i, args.batch_size, device))
            for k, v in {"loss": loss, **extra}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        keys = sorted(totals)
        vals = torch.tensor([totals[k] for k in keys] + [sum(1 for i in range(args.eval_iters) if i % world == rank)],
                            dtype=torch.float64)
        if ddp:
            dist.all_reduce(vals)
        model.train()
        return {f"val_{k}": (vals[j] / vals[-1]).item() for j, k in enumerate(keys)}

    def checkpoint(step):
        if master:
            state = {"kind": args.mode, "args": vars(args), "data": {"dir": str(data.dir), "meta": data.meta}}
            if lora_spec:
                state["lora"] = lora_spec
            save_checkpoint(out, step, model, state, optimizer, tok_dir if tok_dir.exists() else None,
                            weights=lora.lora_state_dict(model) if lora_spec else None)
        if ddp:
            dist.barrier()

    t_start = time.time()
    t_last, tokens_since = time.time(), 0
    model.train()
    for step in range(start_step + 1, args.max_iters + 1):
        lr = args.lr * lr_multiplier(step - 1, warmup, args.max_iters, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics = {}
        for micro in range(accum):
            batch = data.batch("train", step, micro * world + rank, args.batch_size, device)
            sync = micro == accum - 1  # all-reduce gradients on the last micro-step only
            if ddp:
                train_model.require_backward_grad_sync = sync
            with autocast(device, dtype):
                loss, extra = loss_fn(train_model, batch)
            (loss / accum).backward()
            for k, v in {"loss": loss, **extra}.items():
                metrics[k] = metrics.get(k, 0.0) + v.detach() / accum
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_since += batch_tokens
        if step % args.log_interval == 0 or step == args.max_iters or step == start_step + 1:
            keys = sorted(metrics)
            vals = torch.stack([metrics[k].float() for k in keys])  # one host sync per logged step
            if ddp:
                dist.all_reduce(vals)
                vals /= world
            vals = vals.tolist()
            now = time.time()
            tps = tokens_since / (now - t_last)
            mfu = tps * flops_per_step / batch_tokens / peak
            eta = (args.max_iters - step) * batch_tokens / tps
            t_last, tokens_since = now, 0
            rec = dict(zip(keys, vals))
            log.write(step=step, **rec, lr=lr, tok_per_s=round(tps, 1), mfu=round(mfu, 4),
                      time=round(now - t_start, 2))
            if master:
                shown = " | ".join(f"{k} {v:.4f}" for k, v in rec.items())
                print(f"step {step:5d}/{args.max_iters} | {shown} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                      f"MFU {100 * mfu:.1f}% | ETA {fmt_time(eta)}", flush=True)
        if step % args.eval_interval == 0 or step == args.max_iters:
            rec = evaluate(step)
            if not datasheet:  # a peak measured while the machine was busy reads low: keep the best seen
                peak = max(peak, measure_matmul_flops(device, dtype, seconds=0.2) * world)
            log.write(step=step, **rec)
            if master:
                print(f"step {step:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in rec.items()), flush=True)
                plot_log(out)
        if step % args.save_interval == 0 or step == args.max_iters:
            checkpoint(step)
    if master:
        print(f"done in {fmt_time(time.time() - t_start)}; checkpoint in {out}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
