"""Train a minimind model: one loop for every stage.

    python train.py --mode=pretrain                  # data/pretrain -> out/pretrain (data built if missing)
    python train.py --mode=sft                       # out/pretrain + data/sft -> out/sft
    python train.py --mode=dpo                       # out/sft + data/dpo -> out/dpo
    python train.py --mode=grpo                      # out/sft + data/grpo (prompts) -> out/grpo
    python train.py --mode=grpo --loss-type=cispo --reward "exact:1 repetition:0.5"
    python train.py --mode=grpo --tools --data=data/agent --out=out/agent   # multi-turn, sandboxed tools
    python train.py --mode=ppo                       # out/sft + data/ppo -> out/ppo (value head, GAE)
    python train.py --mode=distill --teacher=out/big-sft --model=tiny       # data/sft -> out/distill
    torchrun --standalone --nproc_per_node=4 train.py --mode=dpo
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=NODE0:29500 train.py --fsdp  # docs/scale.md
    python train.py --mode=pretrain --resume         # continue out/pretrain after a crash / kill -9
    python train.py --mode=pretrain --model=minimind-3 --data=data/big --out=out/m3 --epochs=1
    python train.py --mode=sft --lora-rank=8 --out=out/sft-lora   # adapters only, base frozen

Stages chain by default: --data is data/<mode> (distill: data/sft), --out is out/<mode>, and sft
starts from out/pretrain, dpo, grpo and ppo from out/sft (--init-from to choose another). A missing
start point is an error naming the command that makes it. Pretraining with no data at the default
path prepares it first from the embedded corpus (prepare.py tokenizer + pretrain); SFT and DPO likewise
from the embedded dialogs, with the tokenizer of the checkpoint they start from; grpo and ppo from the
built-in verifiable task (prepare.py rl-task).

The loop (main) reads top to bottom: setup builds one Run; each step sets the learning rate, trains
(train_step: the objective prepares each micro-batch, then forward, backward, update), logs, evaluates
and saves. Each mode's objective is a losses.Objective built from its typed config (make_objective).

RL (grpo, ppo) samples its episodes from the policy at every step (losses.PolicyGradient.prepare): a step
is one rollout of --batch-size prompts x --num-generations episodes per micro-batch and
--ppo-epochs x --ppo-minibatches optimizer steps on it (1 x 1 for grpo: on-policy). The rollouts are
seeded by (seed, step, micro-batch) like every batch, so resume and process counts behave the same.
Evaluations report the held-out reward (val_reward, val_reward_<name>); val_loss is minus it.
docs/post-training.md has the recipe and measured curves.

SFT and DPO rows pack whole conversations (DPO: prompt + chosen and prompt + rejected of a pair)
with positions restarting and attention confined to each; the loss covers the assistant replies.

Per step it prints loss, lr, tokens/s, MFU and ETA, and appends to OUT/log.jsonl (training steps
with "step" and "loss", evaluations with "step" and "val_loss", and for pretraining "val_bpb", bits per
byte of the held-out text); OUT/loss.png plots them; --log-to sends the same to trackers (tracking.py).
A step with a non-finite loss or gradient norm is skipped on every process; a bad stretch or a loss
spike goes back to the last checkpoint (guard.py). Checkpoints go to OUT/ckpt_XXXXXX/ atomically
(see checkpoint.py). Every batch is a pure function of (seed, step, global micro-batch index), so on CPU a resumed run is bit-identical to an
uninterrupted one, also when it resumes with another number of processes (the tokens per step
are kept; gradient accumulation makes up the difference).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import lora
import mmkernels
from checkpoint import (CheckpointError, Log, gather_model, load_checkpoint, load_optimizer_into, newest_run,
                        plot_log, prepare_run_dir, reload_into, resolve_checkpoint, run_number, save_checkpoint,
                        save_sharded_optimizer, stage_runs)
from data import DPOData, PretrainData, PromptData, SFTData, check_tokenizer
from guard import Faults, Guard, parse_steps
from losses import (DPO, Distill, DistillConfig, DPOConfig, Objective, PolicyGradient, PolicyGradientConfig,
                    validation_metrics)
from minimind import PRESETS, MiniMind, ModelConfig
from optim import SCHEDULES, WithModule, describe_optimizer, lr_multiplier, make_optimizer
from runtime import (Clock, Processes, autocast, datasheet_flops, fmt_time, grad_scaler, gradient_sync,
                     keep_freed_memory, measure_matmul_flops, parallelize, pick_dtype, setup_distributed, share_cpu,
                     tick_threads)
from scoring import bytes_per_token
from tracking import TRACKERS, Trackers, parse_trackers

ROOT = Path(__file__).resolve().parent
DEFAULT_LR = {"pretrain": 6e-3, "sft": 1e-3, "dpo": 1e-4, "grpo": 1e-4, "ppo": 1e-4,  # fine-tuning: gentler
              "distill": 1e-3}
DEFAULT_OPTIMIZER = {"pretrain": "muon", "sft": "adamw", "dpo": "adamw", "grpo": "adamw", "ppo": "adamw",
                     "distill": "adamw"}
DEFAULT_BETA = {"dpo": 0.1, "grpo": 0.04, "ppo": 0.02}  # DPO's beta; RL's weight of the KL to the reference
DPO_MICRO_TOKENS = 4096  # a DPO micro-batch: as many rows (each as long as the longest pair) as fit in this
STARTS_FROM = {"sft": "pretrain", "dpo": "sft", "grpo": "sft", "ppo": "sft"}  # a stage's default start
DEFAULT_DATA = {"distill": "data/sft"}  # else data/<mode>
RL_MODES = ("grpo", "ppo")
LM_MODES = ("pretrain", "sft", "distill")  # losses of next-token prediction: spikes are checked
MAX_RELOADS = 3  # going back to the last good checkpoint more often than this before the next save: give up
RL_PROMPTS = 4  # RL's default --batch-size: prompts (each with --num-generations episodes), not rows

# mode -> its data reader (its objective: make_objective)
MODES = {"pretrain": PretrainData, "sft": SFTData, "dpo": DPOData, "grpo": PromptData, "ppo": PromptData,
         "distill": SFTData}


def positive(kind, zero: bool = False):
    """argparse type: a finite number > 0 (>= 0 with zero=True)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (value >= 0 if zero else value > 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if zero else '>'} 0, got {text}")
        return value
    parse.__name__ = f"{'non-negative' if zero else 'positive'} {kind.__name__}"
    return parse


def checked(parse):
    """argparse type: the text itself once `parse` accepts it (the flags keep the text; the run parses it)."""
    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    check.__name__ = parse.__name__
    return check


def fail(message: str):
    """A user mistake: one line on stderr, exit status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# command line

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(p)
    add_optim_flags(p)
    add_objective_flags(p)
    add_lora_eval_system_flags(p)
    return p


def add_run_flags(p):
    """Which stage, where it writes and starts from; the model; the data and the batch."""
    g = p.add_argument_group("run")
    g.add_argument("--mode", choices=list(MODES), default="pretrain", help="training stage")
    g.add_argument("--out", default=None, help="run directory: checkpoints, log.jsonl, loss.png (default: out/MODE)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--force", action="store_true",
                   help="start over in an --out that holds a run: its checkpoints and log are deleted")
    g.add_argument("--init-from", default=None,
                   help="start from this checkpoint's weights and model config (default: out/pretrain for sft, "
                        "out/sft for dpo; none for pretrain)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=list(PRESETS), help="model preset (ignored with --init-from)")
    g.add_argument("--aux-loss-coef", type=positive(float, zero=True), default=None,
                   help="MoE balance loss weight (default: the preset's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="prepared data directory from prepare.py (default: data/MODE)")
    g.add_argument("--seq-len", type=positive(int), default=None,
                   help="tokens per row (default: pretrain 256, sft the checkpoint's, dpo the longest pair of "
                        "the data up to the model's limit); grpo/ppo: the longest prompt, longer ones keep their end")
    g.add_argument("--batch-size", type=positive(int), default=None,
                   help="rows per micro-batch per process (default: 16, the checkpoint's for sft; dpo: as many "
                        f"rows as hold 4096 tokens; grpo/ppo: prompts, default {RL_PROMPTS})")
    g.add_argument("--batch-tokens", type=positive(int), default=None,
                   help="tokens per optimizer step over all processes; gradient accumulation makes up the "
                        "difference (default: one micro-batch per process)")


def add_optim_flags(p):
    """Length of the run, optimizer, learning-rate schedule."""
    g = p.add_argument_group("optimization")
    g.add_argument("--max-iters", type=positive(int), default=None,
                   help="optimizer steps (default 300, or from --epochs)")
    g.add_argument("--epochs", type=positive(float), default=None,
                   help="passes over the training data instead of --max-iters (fractions allowed)")
    g.add_argument("--max-time", type=positive(float), default=None, metavar="MINUTES",
                   help="train for this long instead of a number of steps: the schedule runs on elapsed time "
                        "(wsd by default), so the run decays, evaluates and saves on time")
    g.add_argument("--optimizer", choices=("adamw", "muon"), default=None,
                   help="muon: Muon on attention/FFN matrices, AdamW on the rest (default: " +
                        ", ".join(f"{m} {o}" for m, o in DEFAULT_OPTIMIZER.items()) + ")")
    g.add_argument("--lr", type=positive(float), default=None,
                   help="peak learning rate (default, tuned on the tiny preset: " +
                        ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    g.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="lr after warmup: cosine decay, or wsd = constant then a linear decay over the last "
                        "--decay-frac (default: cosine; wsd with --max-time)")
    g.add_argument("--decay-frac", type=positive(float), default=0.2, help="wsd: fraction of the run spent decaying")
    g.add_argument("--min-lr-ratio", type=positive(float, zero=True), default=0.1,
                   help="final lr as a fraction of --lr")
    g.add_argument("--warmup-iters", type=positive(int, zero=True), default=None,
                   help="linear warmup steps (default: 5%% of --max-iters)")
    g.add_argument("--weight-decay", type=positive(float, zero=True), default=0.1,
                   help="AdamW weight decay on >=2-D weights")
    g.add_argument("--grad-clip", type=positive(float, zero=True), default=1.0,
                   help="clip the global gradient norm (0: off)")
    g = p.add_argument_group("unattended runs (guard.py)")
    g.add_argument("--max-bad-steps", type=positive(int), default=5,
                   help="a step with a non-finite loss or gradient norm is skipped; this many in a row go back to "
                        f"the last good checkpoint (then the run goes on with new batches; {MAX_RELOADS} such "
                        "reloads before the next save end the run)")
    g.add_argument("--spike-factor", type=positive(float, zero=True), default=3.0,
                   help="pretrain, sft, distill: a loss above this x its running mean also goes back to the last "
                        "good checkpoint (0: off)")
    g.add_argument("--skip-steps", type=checked(parse_steps), default="", metavar="STEPS",
                   help="steps whose batches are not trained on, e.g. 1200-1400,1530 (a bad stretch of data)")


def add_objective_flags(p):
    """The objectives' own flags: DPO, RL (grpo, ppo), distillation."""
    g = p.add_argument_group("dpo")
    g.add_argument("--beta", type=positive(float, zero=True), default=None,
                   help="strength of the KL tie to the frozen reference: DPO's beta; grpo/ppo: weight of the k3 KL "
                        "penalty, 0 = no reference (default: " + ", ".join(f"{m} {b:g}" for m, b in DEFAULT_BETA.items()) + ")")
    g.add_argument("--dpo-live-reference", action="store_true",
                   help="run the frozen reference on every batch (default: each document scored by it once, "
                        "cached in the data directory as reference_logprobs.npz; a batch met again runs the policy alone)")
    g.add_argument("--dpo-length-norm", action="store_true",
                   help="DPO: average completion log-probabilities over tokens instead of summing them")
    g = p.add_argument_group("rl (grpo, ppo)")
    g.add_argument("--num-generations", type=int, default=8, help="episodes sampled per prompt (a GRPO group)")
    g.add_argument("--dynamic-sampling", type=positive(int, zero=True), default=2, metavar="ROUNDS",
                   help="grpo: a group whose episodes all score the same teaches nothing; replace such groups by "
                        "groups that differ, rolling out up to ROUNDS x --batch-size spare prompts (DAPO); 0: off")
    g.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (per turn with --tools)")
    g.add_argument("--rollout-temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    g.add_argument("--eval-temperature", type=float, default=0.0,
                   help="held-out rollouts: 0 = greedy, else sampled with a fixed seed")
    g.add_argument("--reward", default=None,
                   help='reward functions "NAME[k=v,...]:WEIGHT ...": built-ins exact, length, think, repetition, '
                        'tool, or module:function (rl.parse_reward_specs; default "exact", with --tools '
                        '"exact tool:0.5")')
    g.add_argument("--reward-model", default=None,
                   help="a transformers sequence-classification model directory, scored as reward `rm` (weight 1 "
                        "unless --reward names rm)")
    g.add_argument("--loss-type", choices=("grpo", "cispo"), default="grpo",
                   help="grpo: clipped ratio; cispo: clipped, stop-gradient importance weight (MiniMax-M1)")
    g.add_argument("--epsilon", type=float, default=0.2, help="clip range of the ratio: 1 - eps .. 1 + eps-high")
    g.add_argument("--epsilon-high", type=float, default=None,
                   help="upper clip (default: --epsilon; cispo: 4, the weight capped at 5 as MiniMind's 5.0)")
    g.add_argument("--ppo-epochs", type=int, default=None, help="passes over each rollout (default: grpo 1, ppo 2)")
    g.add_argument("--ppo-minibatches", type=int, default=None,
                   help="optimizer steps per pass, each on a share of the episodes (default: grpo 1, ppo 2)")
    g.add_argument("--target-kl", type=float, default=0.1,
                   help="ppo: skip the rest of a rollout's updates once approx KL to it exceeds 1.5x this")
    g.add_argument("--gamma", type=float, default=1.0, help="ppo: GAE discount")
    g.add_argument("--lam", type=float, default=0.95, help="ppo: GAE lambda")
    g.add_argument("--vf-coef", type=float, default=0.5, help="ppo: weight of the value loss")
    g.add_argument("--value-clip", type=float, default=0.2, help="ppo: clip range of the value update")
    g.add_argument("--value-lr", type=float, default=1e-3,
                   help="ppo: peak learning rate of the value head (fresh, so faster than the policy's; same schedule)")
    g.add_argument("--tools", nargs="?", const="all", default=None,
                   help="agentic rollouts with the sandboxed tools of rl/tools.py: all of them, or a comma list "
                        "(calculator,unit_convert,lookup)")
    g.add_argument("--max-turns", type=int, default=3, help="with --tools: assistant turns per episode")
    g = p.add_argument_group("distill")
    g.add_argument("--teacher", default=None, help="the teacher checkpoint (same tokenizer; any size)")
    g.add_argument("--alpha", type=float, default=0.5, help="weight of the cross-entropy; 1 - alpha: of the KL")
    g.add_argument("--temperature", type=float, default=1.5, help="softmax temperature of the KL term")


def add_lora_eval_system_flags(p):
    """LoRA; evaluation, checkpoint and log intervals; device, precision, kernels, seed."""
    g = p.add_argument_group("lora (sft, dpo, grpo, ppo, distill)")
    g.add_argument("--lora-rank", type=positive(int, zero=True), default=0,
                   help="train rank-R LoRA adapters on top of --init-from (frozen) instead of every weight (0: off)")
    g.add_argument("--lora-alpha", type=positive(float), default=16.0,
                   help="LoRA scale: updates are multiplied by alpha / rank")
    g.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                   help="layers that get adapters: any of q,k,v,o (attention), gate,up,down (feed-forward)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-interval", type=positive(int), default=100, help="evaluate every N steps (and at the end)")
    g.add_argument("--eval-iters", type=positive(int), default=None,
                   help="validation batches per evaluation (default 20; dpo: the whole held-out split, so that "
                        "the reward accuracy has a small standard error)")
    g.add_argument("--save-interval", type=positive(int), default=100, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=positive(int), default=2, metavar="N",
                   help="checkpoints kept in --out, the newest N (more: to start later stages from earlier steps)")
    g.add_argument("--log-interval", type=positive(int), default=10, help="print every N steps")
    g.add_argument("--log-to", type=checked(parse_trackers), default="", metavar="TRACKERS",
                   help="also log to " + ", ".join(TRACKERS) + " (a comma list; their package installed: tracking.py)")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps, ...")
    g.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA cards that have it, fp16 + loss scaling on older ones; on CPU bf16 "
                        "autocast where it has bf16 units (AVX512-BF16, AMX), else fp32; fp32 on MPS), float32, "
                        "bfloat16, float16")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=positive(int, zero=True), default=0,
                   help="CPU threads (0: as many as other processes leave idle, "
                   "re-chosen every second; OMP_NUM_THREADS or torchrun fix it)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: FSDP2 instead of DDP, weights, gradients and AdamW state sharded over the "
                        "processes; sharded checkpoints that resume at any process count (pretrain, sft, dpo, distill)")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing: backward recomputes each block from its input (less memory, "
                        "~1/3 more compute; bench.py --only memory)")
    g.add_argument("--kernels", default=None, choices=mmkernels.BACKENDS,
                   help="kernel implementation (default: $MINIMIND_KERNELS or auto)")
    g.add_argument("--seed", type=int, default=1337, help="seeds weights and data order")
    g.add_argument("--peak-tflops", type=positive(float), default=None,
                   help="peak for MFU (default: known GPU or measured)")


def given_flags(argv) -> set:
    """Names of the flags set on the command line (whatever their value)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(parser.parse_args(argv)))


def updated(args, values: dict):
    """A copy of the namespace with these values (the flags keep their order: it is saved as is)."""
    return argparse.Namespace(**{**vars(args), **values})


def resolve_args(args, argv):
    """The one place the flags get their defaults, -> (args, the checkpoint the run starts from or None).
    Each rule returns the values it sets; flags given on the command line win over every rule. (What
    the data decides, rows and row length left unset and the steps of --epochs: plan_batches.)"""
    given = given_flags(argv)
    if args.resume and args.force:
        fail("--resume continues the run in --out, --force starts it over: choose one")
    if sum(x is not None for x in (args.epochs, args.max_iters, args.max_time)) > 1:
        fail("give one of --epochs, --max-iters, --max-time")
    args = updated(args, run_paths(args))
    if args.mode == "distill" and not args.teacher and not args.resume:
        fail("--mode=distill needs --teacher CKPT, the model to learn from")
    source, saved = start_checkpoint(args)
    if source is not None:
        args = updated(args, inherited(args, saved, given))
    args = updated(args, mode_defaults(args, saved, given))
    if args.fsdp and (args.mode in RL_MODES or args.lora_rank or args.optimizer == "muon"):
        fail("--fsdp trains every weight with AdamW (not Muon, not LoRA adapters) in pretrain, sft, dpo or distill")
    if args.mode == "grpo" and args.num_generations < 2:
        fail("--num-generations must be at least 2 for grpo: advantages are relative to the prompt's group")
    if args.mode in RL_MODES and args.ppo_minibatches > args.batch_size * args.num_generations:
        fail(f"--ppo-minibatches {args.ppo_minibatches}: more than the {args.batch_size * args.num_generations} "
             "episodes of a micro-batch (--batch-size x --num-generations)")
    return args, source


def run_paths(args) -> dict:
    """Rule 1, the stage's paths: --data is data/MODE; --out is out/MODE, or out/MODE-N beside a run
    already there (nothing replaced); --init-from is the newest run of the stage this one starts from."""
    paths = {"data": args.data or DEFAULT_DATA.get(args.mode, f"data/{args.mode}")}
    if args.out is None:
        runs = stage_runs(args.mode)
        if args.resume or args.force or not runs:
            paths["out"] = str(newest_run(runs) or runs[0] if runs else f"out/{args.mode}")
        else:
            paths["out"] = f"out/{args.mode}-{1 + max(run_number(p, args.mode) for p in runs)}"
            if os.environ.get("RANK", "0") == "0":
                print(f"{newest_run(runs) or runs[-1]} holds a run: this one goes to {paths['out']} (--resume "
                      "continues that one, --out chooses the directory)")
    if args.init_from is None and args.mode in STARTS_FROM and not args.resume:
        start = newest_run(stage_runs(STARTS_FROM[args.mode]))
        if start is None:
            fail(f"--mode={args.mode} starts from a trained checkpoint, and out/{STARTS_FROM[args.mode]} holds none: "
                 f"make it with `python train.py --mode={STARTS_FROM[args.mode]}`, or pass --init-from DIR")
        paths["init_from"] = str(start)
    return paths


def start_checkpoint(args):
    """-> (the checkpoint the weights come from: the run's latest on --resume, else --init-from's, or
    None; the flags saved in it, {} if none)."""
    try:
        if args.resume:
            source = resolve_checkpoint(args.out, fallback=True)
        elif args.init_from:
            source = resolve_checkpoint(args.init_from)
        else:
            return None, {}
    except (FileNotFoundError, CheckpointError) as e:
        fail(f"{e}" + ("; nothing to resume: start the run again without --resume (with --force if --out holds "
                       "its log)" if args.resume else ""))
    return source, json.loads((source / "state.json").read_text()).get("args", {})


def inherited(args, saved: dict, given: set) -> dict:
    """Rule 2, inheritance from the start checkpoint: a resumed run takes every flag it saved, a new
    one its model, shapes, precision and seed (DPO and RL size their rows from the data and prompts)."""
    inherit = ["model", "seq_len", "batch_size", "dtype", "kernels", "seed", "aux_loss_coef"]
    if args.mode == "dpo" and saved.get("mode") != "dpo":  # DPO rows hold pairs: sized from the data
        inherit.remove("seq_len")
        inherit.remove("batch_size")
    if args.mode in RL_MODES and saved.get("mode") not in RL_MODES and "batch_size" in inherit:
        inherit.remove("batch_size")  # RL batches are prompts, not rows
    if args.resume:  # the same run: everything not overridden
        saved = {"optimizer": "adamw", **saved}  # runs from before --optimizer existed used AdamW
        if "optimizer" in given and args.optimizer != saved["optimizer"]:
            fail(f"--optimizer {args.optimizer}: {args.out} was trained with {saved['optimizer']}, whose state "
                 "cannot carry over (start a new run with --init-from instead)")
        if "batch_tokens_per_step" in saved and "batch_tokens" not in given:  # keep the step across world sizes
            saved["batch_tokens"] = saved["batch_tokens_per_step"]
        inherit = [k for k in saved if k not in ("resume", "out", "force")]  # init_from: the reference's
    values = {k: saved[k] for k in inherit if k in saved and k not in given and hasattr(args, k)}
    if given & {"max_iters", "epochs", "max_time"}:  # a length given now replaces the run's own
        values.update({k: None for k in {"max_iters", "epochs", "max_time"} - given})
    return values


def mode_defaults(args, saved: dict, given: set) -> dict:
    """Rule 3, what a flag still unset means in this mode (after inheritance)."""
    ppo = args.mode == "ppo"
    defaults = {"beta": DEFAULT_BETA.get(args.mode, 0.0), "ppo_epochs": 2 if ppo else 1,
                "ppo_minibatches": 2 if ppo else 1, "reward": "exact" + (" tool:0.5" if args.tools is not None else ""),
                "lr": DEFAULT_LR[args.mode], "optimizer": "adamw" if args.fsdp else DEFAULT_OPTIMIZER[args.mode],
                "schedule": "wsd" if args.max_time else "cosine",
                "eval_iters": 10 ** 9 if args.mode == "dpo" else 20}
    values = {k: v for k, v in defaults.items() if getattr(args, k) is None}
    if args.mode in RL_MODES and "batch_size" not in given and saved.get("mode") not in RL_MODES:
        values["batch_size"] = RL_PROMPTS  # RL batches are prompts
    return values


# -----------------------------------------------------------------------------
# setup

def build_default_data(args, source):
    """Prepare the default data of a mode from the embedded corpora, or the built-in task, when it is
    missing (rank 0 only)."""
    if Path(args.data).exists() or args.data != DEFAULT_DATA.get(args.mode, f"data/{args.mode}"):
        return
    if args.mode in RL_MODES:  # text prompts: no tokenizer needed
        print(f"{args.data} is missing: writing the built-in verifiable task there")
        steps = [["rl-task", "--out", args.data]]
    else:
        tok = source / "tokenizer" if source is not None and (source / "tokenizer").exists() else ROOT / "data/tokenizer"
        print(f"{args.data} is missing: preparing it from the embedded "
              f"{'corpus' if args.mode == 'pretrain' else 'dialogs'} with the tokenizer {tok}")
        steps = [] if tok.exists() else [["tokenizer", "--out", str(tok)]]
        steps.append(["sft" if args.mode == "distill" else args.mode, "--tokenizer", str(tok), "--out", args.data])
    for step in steps:
        if subprocess.run([sys.executable, str(ROOT / "prepare.py"), *step]).returncode != 0:
            fail(f"`python prepare.py {' '.join(step)}` failed (see above)")


def build_model(args, source, device, out: Path):
    """-> (model, its checkpoint's state ({} when fresh), start_step, lora_spec): fresh from a preset, or from
    a checkpoint, LoRA applied."""
    start_step, state = 0, {}
    if source is not None:
        # resuming a LoRA run: base + adapters kept apart; otherwise adapters (if any) merged in
        try:
            model, state, _ = load_checkpoint(source, device, merge_lora=not args.resume)
        except (FileNotFoundError, CheckpointError) as e:
            fail(str(e))
        model.train()
        start_step = state["step"] if args.resume else 0
    else:
        model = MiniMind(ModelConfig(**PRESETS[args.model].to_dict())).to(device)
    if args.aux_loss_coef is not None:
        model.config.aux_loss_coef = args.aux_loss_coef
    lora_spec = None  # LoRA: only adapters train and are saved; the base checkpoint stays where it is
    if args.resume and "lora" in state:
        lora_spec = state["lora"]
    elif args.lora_rank:
        if source is None or args.mode == "pretrain":
            fail("--lora-rank adapts a trained checkpoint: use it with --mode=sft|dpo|grpo|ppo|distill (and --init-from)")
        try:
            targets = lora.apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)
        except ValueError as e:
            fail(str(e))
        lora_spec = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": targets,
                     "base": str(source.resolve()),  # and relative to OUT, for a copied or moved tree of runs:
                     "base_rel": os.path.relpath(source.resolve(), out.resolve())}
    else:
        model.requires_grad_(True)
    return model, state, start_step, lora_spec


def plan_batches(args, model, world: int):
    """-> (data, sizes, accum, batch_tokens): the data reader; the flags its data decides (rows, row
    length, steps for --epochs); micro-steps per optimizer step and tokens per step."""
    seq_len, batch_size, max_iters = args.seq_len, args.batch_size, args.max_iters
    if seq_len is None:
        seq_len = 256
        if args.mode == "dpo":  # long enough for the data's pairs, within what the model can attend to
            try:
                longest = DPOData.longest(args.data)
            except FileNotFoundError:
                fail(f"{args.data}: no DPO data here (make it with `python prepare.py dpo`)")
            seq_len = min(max(64, -(-longest // 64) * 64), model.config.max_seq_len)
    if batch_size is None:
        batch_size = max(1, DPO_MICRO_TOKENS // seq_len) if args.mode == "dpo" else 16
    tokens_per_micro = batch_size * seq_len
    batch_tokens = args.batch_tokens or tokens_per_micro * world
    if batch_tokens % (tokens_per_micro * world):
        fail(f"--batch-tokens {batch_tokens} must be a multiple of batch-size x seq-len x processes = "
             f"{tokens_per_micro * world}")
    accum = batch_tokens // (tokens_per_micro * world)
    try:
        spares = {"spares": args.dynamic_sampling * batch_size} if args.mode == "grpo" else {}
        data = MODES[args.mode](args.data, seq_len, args.seed, micro_batches=accum * world, **spares)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if data.meta.get("vocab_size", 0) > model.config.vocab_size:
        fail(f"{args.data}: vocabulary {data.meta['vocab_size']} > model's {model.config.vocab_size}")
    if args.epochs is not None:
        max_iters = max(1, math.ceil(args.epochs * data.epoch_tokens() / batch_tokens))
    elif args.max_time is not None:
        max_iters = None  # as many as fit
    elif max_iters is None:
        max_iters = 300
    return data, {"seq_len": seq_len, "batch_size": batch_size, "max_iters": max_iters}, accum, batch_tokens


# -----------------------------------------------------------------------------
# objectives: each mode's, built from its flags

def make_objective(args, model) -> Objective:
    """The objective of --mode (losses.py), its typed config filled from the flags."""
    reference = args.init_from if args.resume else None  # a resumed run's reference is its start, not itself
    if args.mode == "dpo":
        return DPO(model, DPOConfig(beta=args.beta, length_norm=args.dpo_length_norm, reference=reference))
    if args.mode in RL_MODES:
        return PolicyGradient(model, policy_gradient_config(args))
    if args.mode == "distill":
        return Distill(model, DistillConfig(teacher=args.teacher, tokenizer_dir=args.tokenizer_dir, alpha=args.alpha,
                                            temperature=args.temperature))
    return Objective()  # pretrain, sft: the LM loss (sft's mask is in the targets)


def policy_gradient_config(args) -> PolicyGradientConfig:
    return PolicyGradientConfig(
        ppo=args.mode == "ppo", tokenizer_dir=args.tokenizer_dir, seq_len=args.seq_len,
        num_generations=args.num_generations, max_new_tokens=args.max_new_tokens,
        rollout_temperature=args.rollout_temperature, eval_temperature=args.eval_temperature, reward=args.reward,
        reward_model=args.reward_model, tools=args.tools, max_turns=args.max_turns, loss_type=args.loss_type,
        beta=args.beta, epsilon=args.epsilon, epsilon_high=args.epsilon_high, ppo_epochs=args.ppo_epochs,
        ppo_minibatches=args.ppo_minibatches, target_kl=args.target_kl, gamma=args.gamma, lam=args.lam,
        vf_coef=args.vf_coef, value_clip=args.value_clip, value_lr=args.value_lr,
        reference=args.init_from if args.resume else None, dynamic_sampling=args.dynamic_sampling)


def describe_run(run):
    a, model, procs = run.args, run.model, run.procs
    n, n_act = model.num_params(), model.num_params(active=True)
    print(f"{a.mode} | {n / 1e6:.2f}M params ({n_act / 1e6:.2f}M active) | {procs.world} process(es) on {run.device} "
          f"{str(run.dtype).replace('torch.', '')} | {run.batch_tokens:,} tokens/step = {procs.world} x {run.accum} x "
          f"{a.batch_size} x {a.seq_len} | " + (f"{a.max_time:g} minutes" if a.max_time else
          f"{a.max_iters} steps") + f" ({a.schedule}) | kernels {mmkernels.get_backend()}")
    print(describe_optimizer(run.optimizer, a.optimizer))
    if run.lora_spec:
        print(lora.describe_lora(model, run.lora_spec))
    print(run.data.describe())


# -----------------------------------------------------------------------------
# the run: set up once, then read by the loop's phases

@dataclass
class Run:
    """A training run once set up: what the loop and its phases read (and the few things they update)."""
    args: argparse.Namespace  # the resolved flags, saved into every checkpoint
    procs: Processes
    device: str
    dtype: torch.dtype
    out: Path  # the run directory
    model: MiniMind  # the raw model: evaluated and saved
    train_model: torch.nn.Module  # what the steps run: the model compiled and/or DDP-wrapped, or itself
    objective: Objective
    optimizer: object  # Optimizers or AdamW; WithModule around it when the objective has a module
    scaler: object  # runtime.grad_scaler: loss scaling for fp16, a no-op otherwise
    clipped: list  # the parameters whose gradient norm is clipped: the model's and the objective module's
    data: object  # PretrainData, SFTData, DPOData or PromptData
    accum: int  # micro-batches per process per optimizer step
    batch_tokens: int  # tokens per optimizer step over all processes
    start_step: int  # the checkpoint's step on --resume, else 0
    warmup: int  # steps of linear lr warmup
    clock: Clock
    log: Log
    lora_spec: Optional[dict]  # LoRA: rank, alpha, targets and base of the adapters; None: every weight trains
    tok_dir: Path  # the tokenizer saved with each checkpoint
    eval_batches: int  # validation batches per evaluation
    val_bytes_per_token: Optional[float]  # pretrain: UTF-8 bytes per token of the val split, for val_bpb
    flops_per_step: float
    peak: float  # FLOP/s over all processes that MFU is measured against
    datasheet: bool  # the peak is a datasheet's or --peak-tflops (else measured, and raised to the best seen)
    guard: Guard  # counts bad steps, decides skip / reload
    faults: Faults  # MINIMIND_FAULTS: faults injected on purpose (tests)
    track: Trackers  # --log-to: wandb, swanlab, TensorBoard beside log.jsonl (rank 0; none elsewhere)
    t_start: float = 0.0  # when the loop started
    t_last: float = 0.0  # when the last progress line was printed
    tokens_since: int = 0  # tokens trained since then


def setup(argv) -> Run:
    """Everything before the first step: flags resolved, processes joined, run directory (and default
    data) made; model, data, objective and optimizer built."""
    t_main = time.time()  # --max-time counts from here: start-up is part of the budget
    args, source = resolve_args(build_parser().parse_args(argv), argv)
    procs, device, dtype = setup_process(args)
    out = Path(args.out)
    if procs.master:
        try:
            for p in prepare_run_dir(out, args.resume, args.force):
                print(f"removed {p.name}, left by a save that was interrupted")
        except CheckpointError as e:
            fail(str(e))
        build_default_data(args, source)
    procs.barrier()

    model, source_state, start_step, lora_spec = build_model(args, source, device, out)
    model.grad_checkpoint = args.grad_checkpoint
    data, sizes, accum, batch_tokens = plan_batches(args, model, procs.world)
    tok_dir = data.dir / "tokenizer"  # the data's tokenizer; RL prompts are text: the checkpoint's
    if not tok_dir.exists() and source is not None:
        tok_dir = source / "tokenizer"
    # batch_tokens_per_step: recorded, so a resume with another world size keeps it
    args = updated(args, {**sizes, "batch_tokens_per_step": batch_tokens, "tokenizer_dir": str(tok_dir)})
    try:
        check_tokenizer(data.meta, data.dir, source / "tokenizer" if source is not None else None)
        objective, faults = make_objective(args, model), Faults.from_env()
        track = Trackers(parse_trackers(args.log_to) if procs.master else [], out, vars(args),
                         start_step if args.resume else None)  # (TrackerError: a ValueError)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        fail(str(e))
    if isinstance(objective, DPO) and not args.dpo_live_reference:
        line = objective.use_cache(data, dtype, device, procs.rank, procs.world)
        if procs.master:
            print(line)
    train_model = parallelize(model, procs, device, dtype, args.fsdp and procs.ddp, args.compile)  # FSDP: first
    optimizer = make_optimizer(model, args.optimizer, args.lr, args.weight_decay, device)
    clipped = list(model.parameters())
    if objective.module is not None:
        optimizer = WithModule(optimizer, objective.module, objective.module_lr / args.lr)
        clipped += list(objective.module.parameters())
    if args.resume:
        try:
            load_optimizer_into(model, optimizer, source, device)
        except CheckpointError as e:
            fail(str(e))

    datasheet = args.peak_tflops * 1e12 if args.peak_tflops else datasheet_flops(device, dtype)
    run = Run(args=args, procs=procs, device=device, dtype=dtype, out=out, model=model, train_model=train_model,
              objective=objective, optimizer=optimizer, scaler=grad_scaler(device, dtype), clipped=clipped, data=data,
              accum=accum, batch_tokens=batch_tokens, start_step=start_step,
              warmup=args.warmup_iters if args.warmup_iters is not None else max(1, (args.max_iters or 300) // 20),
              clock=Clock(args.max_time, t_main, source_state.get("train_seconds", 0.0) if args.resume else 0.0,
                          procs.ddp),
              log=Log(out, start_step if args.resume else None, enabled=procs.master), lora_spec=lora_spec,
              tok_dir=tok_dir, eval_batches=data.val_batches(args.batch_size, args.eval_iters),
              val_bytes_per_token=bytes_per_token(data.splits["val"], tok_dir) if args.mode == "pretrain" else None,
              flops_per_step=model.flops_per_token(args.seq_len) * batch_tokens,
              peak=(datasheet or measure_matmul_flops(device, dtype)) * procs.world, datasheet=bool(datasheet),
              guard=Guard(args.max_bad_steps, args.spike_factor if args.mode in LM_MODES else 0.0),
              faults=faults, track=track)
    if procs.master:
        describe_run(run)
    return run


def setup_process(args):
    """-> (Processes, device, dtype): kernels chosen, process group joined, tf32 and the seed set."""
    if args.kernels:
        mmkernels.set_backend(args.kernels)
    try:
        procs, device = setup_distributed(args.device)
        dtype = pick_dtype(args.dtype, device, training=True)
    except ValueError as e:
        fail(str(e))
    share_cpu(args.threads)
    if device == "cpu":
        keep_freed_memory()  # each step's large tensors come back from the heap, not page faults
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    return procs, device, dtype


# -----------------------------------------------------------------------------
# the loop's phases

def learning_rate(run: Run, step: int) -> float:
    """--lr x the schedule at this step: linear warmup, then cosine or wsd over --max-iters steps, or
    with --max-time over the fraction of the time budget spent."""
    a = run.args
    if a.max_time:
        multiplier = step / run.warmup if step <= run.warmup else lr_multiplier(
            int(run.clock.fraction() * 1e6), 0, 10 ** 6, a.min_lr_ratio, a.schedule, a.decay_frac)
    else:
        multiplier = lr_multiplier(step - 1, run.warmup, a.max_iters, a.min_lr_ratio, a.schedule, a.decay_frac)
    return a.lr * multiplier


def train_step(run: Run, step: int) -> dict:
    """One optimizer step: accum micro-batches per process, gradients all-reduced on the last.
    An objective with several updates a step (PPO's epochs x minibatches of one rollout) repeats
    that per update, on the micro-batches it prepared once (the batch telling which update); it may
    stop early, deciding on the approx_kl of the coming update averaged over every micro-batch and
    process (so every process stops together). -> the step's metrics, averaged over the updates done
    ({} when none was: --skip-steps, or guard.py's verdict on every update)."""
    a, procs, objective = run.args, run.procs, run.objective
    if step in parse_steps(a.skip_steps):  # a bad stretch of data: its batches are not even read
        run.log.write(step=step, skipped="--skip-steps")
        return {}
    batches = [objective.prepare(run.data.batch("train", step, micro * procs.world + procs.rank, a.batch_size,
                                                run.device)) for micro in range(run.accum)]
    metrics, done = {}, 0
    for update in range(objective.updates):
        sums = {}
        for micro, batch in enumerate(batches):
            if objective.updates > 1:
                batch = {**batch, "update": update}
            gradient_sync(run.model, run.train_model, micro == run.accum - 1)
            with autocast(run.device, run.dtype):
                loss, extra = objective(run.train_model, batch)
            loss = run.faults.loss(loss, step, procs.rank) if micro == 0 else loss
            run.scaler.scale(loss / run.accum).backward()
            for k, v in {"loss": loss, **extra}.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / run.accum
        if update > 0 and objective.stop(procs.mean(sums["approx_kl"])):
            run.optimizer.zero_grad(set_to_none=True)
            break
        verdict = optimizer_step(run, step, sums["loss"])
        if verdict == "reload":
            break
        if verdict == "ok":
            done += 1
            for k, v in sums.items():
                metrics[k] = metrics.get(k, 0.0) + v
    if not done:
        return {}
    metrics = {k: v / done for k, v in metrics.items()}
    if objective.updates > 1:
        metrics["updates"] = torch.tensor(float(done), device=run.device)
    return metrics


def optimizer_step(run: Run, step: int, loss: torch.Tensor) -> str:
    """Gradients averaged (the objective's module: here, it is not inside DDP), unscaled, clipped, and
    applied when the guard's verdict (the same on every process) is "ok"; else dropped. -> the verdict."""
    if run.objective.module is not None:
        run.procs.average_grads(run.objective.module)
    verdict = run.guard.update(run.optimizer, run.scaler, run.clipped, run.args.grad_clip, loss, run.faults, step,
                               run.procs)  # (guard.py)
    if verdict != "ok":
        run.log.write(step=step, skipped=run.guard.reason, bad_steps=run.guard.bad_total)
        if run.procs.master:
            print(f"step {step:5d} | skipped: {run.guard.reason} ({run.guard.bad_total} bad so far)", flush=True)
    return verdict


def go_back(run: Run, step: int):
    """The guard's "reload": the last good checkpoint's weights and optimizer state, then on with the
    next step and its batches (the bad stretch's are not used again); the run ends, one line, when
    that keeps happening."""
    guard = run.guard
    try:
        ckpt = resolve_checkpoint(run.out, fallback=True)
    except (FileNotFoundError, CheckpointError):
        fail(f"step {step}: {guard.reason}, and no checkpoint to go back to yet (lower --lr, or check the data)")
    if guard.reloads >= MAX_RELOADS:
        fail(f"step {step}: {guard.reason}, again after {guard.reloads} reloads of {ckpt.name}: giving up (lower "
             "--lr, --skip-steps the bad data, or --resume from an earlier checkpoint)")
    try:
        reload_into(run.model, run.optimizer, ckpt, run.device)
    except CheckpointError as e:
        fail(str(e))
    guard.reloaded()
    run.log.write(step=step, reloaded=ckpt.name, reason=guard.reason)
    if run.procs.master:
        undone = f"steps {int(ckpt.name[5:]) + 1}-{step}" if int(ckpt.name[5:]) + 1 < step else f"step {step}"
        print(f"step {step:5d} | {guard.reason}: reloaded {ckpt.name}, going on at step {step + 1} (the batches "
              f"of {undone} are not used again)", flush=True)


def evaluate(run: Run) -> dict:
    """Mean metrics over the same --eval-iters validation batches each time, split across ranks
    (losses.validation_metrics), in eval mode; pretraining's with bits per byte."""
    run.model.eval()
    rec = validation_metrics(run.objective, run.model, run.data, run.eval_batches, run.args.batch_size, run.device,
                             run.dtype, run.procs)
    run.model.train()
    if run.val_bytes_per_token:  # bits per byte: nats per token / ln 2 / bytes per token
        rec["val_bpb"] = rec["val_loss"] / (math.log(2) * run.val_bytes_per_token)
    return rec


def log_eval(run: Run, step: int, rec: dict):
    run.log.write(step=step, **rec)
    run.track.log(step, rec)
    if run.procs.master:
        print(f"step {step:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in rec.items()), flush=True)


def log_progress(run: Run, step: int, lr: float, metrics: dict):
    """The step's metrics averaged over the processes, with lr, tokens/s, MFU and ETA: logged and printed."""
    a, procs = run.args, run.procs
    rec = procs.means(metrics)  # one host sync per logged step
    now = time.time()
    tps = run.tokens_since / (now - run.t_last)
    mfu = tps * run.flops_per_step / run.batch_tokens / run.peak
    eta = run.clock.left() if a.max_time else (a.max_iters - step) * run.batch_tokens / tps
    run.t_last, run.tokens_since = now, 0
    record = {**rec, "lr": lr, "tok_per_s": round(tps, 1), "mfu": round(mfu, 4)}
    run.log.write(step=step, **record, time=round(now - run.t_start, 2))
    run.track.log(step, record)
    if procs.master:
        shown = " | ".join(f"{k} {v:.4f}" for k, v in rec.items())
        print(f"step {step:5d}/{a.max_iters or '~'} | {shown} | lr {lr:.2e} | {tps:,.0f} tok/s | "
              f"MFU {100 * mfu:.1f}% | ETA {fmt_time(eta)}", flush=True)
    advice = run.objective.advice(rec)
    if advice and procs.master:
        print(advice, flush=True)


def save(run: Run, step: int):
    """A checkpoint of the raw model (LoRA: its adapters), the optimizer and the flags, by rank 0 (FSDP:
    the weights gathered to it, the optimizer state written in shards by every rank)."""
    a, fsdp = run.args, run.args.fsdp and run.procs.ddp
    staging = run.out / f".ckpt_{step:06d}.optim" if fsdp else None  # (a .ckpt_* left by a kill: removed at start)
    weights = gather_model(run.model, run.procs.master) if fsdp else run.model
    if fsdp:
        save_sharded_optimizer(run.model, run.optimizer, staging)
        run.procs.barrier()
    if isinstance(run.objective, DPO):
        run.objective.save_cache()  # the reference's scores so far, every process's
    if run.procs.master:
        state = {"kind": a.mode, "args": vars(a), "data": {"dir": str(run.data.dir), "meta": run.data.meta},
                 "train_seconds": round(run.clock.spent(), 3)}
        if run.lora_spec:
            state["lora"] = run.lora_spec
        try:
            save_checkpoint(run.out, step, weights, state, None if fsdp else run.optimizer,
                            run.tok_dir if run.tok_dir.exists() else None, optimizer_dir=staging, keep=a.keep_checkpoints,
                            weights=lora.lora_state_dict(run.model) if run.lora_spec else None)
        except CheckpointError as e:
            fail(str(e))
    run.guard.saved()
    run.procs.barrier()


# -----------------------------------------------------------------------------
# main

def main(argv=None):
    run = setup(sys.argv[1:] if argv is None else argv)
    a = run.args
    run.t_start = run.t_last = time.time()
    run.model.train()
    if a.mode in RL_MODES and not a.resume:  # RL curves start from the held-out reward of the start point
        with run.clock.measure("eval"):  # --max-time: the final evaluation is set aside, as long as this one
            rec = evaluate(run)
        log_eval(run, 0, rec)
    step = run.start_step
    while True:
        step += 1
        # the learning rate of this step
        lr = learning_rate(run, step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # forward, backward, update (RL: the rollout first, then its updates)
        metrics = train_step(run, step)
        tick_threads()  # a busy machine: fewer threads (runtime.CpuThreads)
        if run.guard.last == "reload":  # too many bad steps in a row, or a loss spike
            go_back(run, step)
        run.tokens_since += run.batch_tokens
        if step == run.start_step + 1 and a.max_time:
            run.clock.guess_eval(run.eval_batches, (time.time() - run.t_start) / run.accum)
        last = run.clock.fraction() >= 1 if a.max_time else step >= a.max_iters
        # log: the step's metrics, speed, ETA (a skipped step has none)
        if metrics and (step % a.log_interval == 0 or last or step == run.start_step + 1):
            log_progress(run, step, lr, metrics)
        # evaluate on the held-out batches; a measured peak is measured again (a busy machine reads low)
        if step % a.eval_interval == 0 or last:
            with run.clock.measure("eval"):
                rec = evaluate(run)
            if run.procs.master and not run.datasheet:
                run.peak = max(run.peak, measure_matmul_flops(run.device, run.dtype, seconds=0.2) * run.procs.world)
            log_eval(run, step, rec)
            if run.procs.master:
                run.track.image(step, plot_log(run.out))
        # checkpoint
        if step % a.save_interval == 0 or last:
            with run.clock.measure("save"):
                save(run, step)
        if last:
            break
    run.track.close()
    if run.procs.master:
        print(f"done in {fmt_time(time.time() - run.t_start)}; checkpoint in {run.out}")
    if run.procs.ddp:
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # everything is written: skip the interpreter's shutdown, which can hang gloo (pytorch#190489)


if __name__ == "__main__":
    main()
