"""A run that looks after itself: steps with a non-finite loss or gradient norm are skipped, and a
run that keeps producing them, or whose loss spikes, goes back to its last good checkpoint.

Per optimizer step train.py calls `Guard.update`, which hands `agree` the step's loss and gradient
norm; every process gets the same verdict (one all-reduce of [loss, bad]), so all skip or all step
together. `Guard.verdict` then says what to do:

    "ok"      apply the update
    "skip"    drop the gradients (weights, optimizer state and loss scale untouched); the step's
              batches are gone, the schedule moves on
    "reload"  --max-bad-steps skipped in a row, or a loss above --spike-factor x its running mean:
              the last good checkpoint's weights and optimizer state are loaded and training goes
              on from the next step, with its batches (the data moved on past the bad stretch)

MINIMIND_FAULTS injects faults through the same code path, to test all of this: a comma list of
KIND@STEP[:RANK], KIND one of `loss` (the step's loss made NaN, so are its gradients), `grad` (one
gradient made inf after the backward pass), `spike` (the loss x 100, finite); without :RANK on every
process. Example: MINIMIND_FAULTS="loss@3,grad@5:1".
"""
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from runtime import Processes

FAULT_KINDS = ("loss", "grad", "spike")
SPIKE_WARMUP = 10  # good steps before the running mean is trusted for spikes
SPIKE_DECAY = 0.9  # the running mean: an exponential moving average over ~10 steps


def parse_steps(spec: str) -> set:
    """'3,7-9' -> {3, 7, 8, 9}; a ValueError names what is wrong."""
    steps = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or int(hi or lo) < int(lo) or int(lo) < 1:
            raise ValueError(f"{part!r}: expected a step (>= 1) or a range of steps A-B")
        steps.update(range(int(lo), int(hi or lo) + 1))
    return steps


def parse_faults(spec: Optional[str]) -> dict:
    """MINIMIND_FAULTS -> {(kind, step): rank or None (every rank)}."""
    faults = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        kind, _, where = part.partition("@")
        step, _, rank = where.partition(":")
        if kind not in FAULT_KINDS or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"MINIMIND_FAULTS {part!r}: expected KIND@STEP[:RANK], KIND one of {', '.join(FAULT_KINDS)}")
        faults[kind, int(step)] = int(rank) if rank else None
    return faults


@dataclass
class Faults:
    """Injected faults (MINIMIND_FAULTS): what a test breaks on purpose, through the real code path."""
    faults: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> "Faults":
        return cls(parse_faults(os.environ.get("MINIMIND_FAULTS")))

    def hit(self, kind: str, step: int, rank: int) -> bool:
        return (kind, step) in self.faults and self.faults[kind, step] in (None, rank)

    def loss(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        if self.hit("loss", step, rank):
            return loss * float("nan")
        return loss * 100.0 if self.hit("spike", step, rank) else loss

    def grads(self, params, step: int, rank: int):
        if self.hit("grad", step, rank):  # (FSDP: into this process's shard; a DTensor view would be collective)
            grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
            next(g for g in grads if g.numel()).view(-1)[0] = float("inf")


def agree(loss: torch.Tensor, grad_norm: Optional[torch.Tensor], ddp: bool, world: int) -> tuple:
    """-> (the loss averaged over the processes, whether every process's loss and gradient norm are
    finite): one all-reduce, so every process decides the same. grad_norm None: not checked (fp16,
    whose loss scaler skips inf gradients itself)."""
    bad = ~torch.isfinite(loss.detach().float())
    if grad_norm is not None:
        bad |= ~torch.isfinite(grad_norm.detach().float())
    both = torch.stack([torch.nan_to_num(loss.detach().float(), nan=0.0, posinf=0.0, neginf=0.0),
                        bad.float()])  # (2,): a NaN loss must not poison the others' mean
    if ddp:
        dist.all_reduce(both)
    mean, n_bad = both.tolist()
    return mean / world, n_bad == 0


@dataclass
class Guard:
    """Counts bad steps and keeps the running mean of the loss; verdict() decides each step."""
    max_bad_steps: int = 5
    spike_factor: float = 0.0  # 0: no spike detection
    bad_in_row: int = 0
    bad_total: int = 0
    reloads: int = 0  # since the last checkpoint saved after a good step
    good_since_reload: bool = False
    mean: Optional[float] = None
    good: int = 0
    reason: str = ""  # why the last verdict was not "ok"
    last: str = "ok"  # the last verdict

    def verdict(self, loss: float, finite: bool) -> str:
        self.last = self._verdict(loss, finite)
        return self.last

    def _verdict(self, loss: float, finite: bool) -> str:
        if not finite:
            self.bad_in_row += 1
            self.bad_total += 1
            self.reason = "non-finite loss or gradient norm"
            if self.bad_in_row >= self.max_bad_steps:
                self.reason = f"{self.bad_in_row} steps in a row with a {self.reason}"
                return "reload"
            return "skip"
        if self.spike_factor and self.good >= SPIKE_WARMUP and loss > self.spike_factor * self.mean > 0:
            self.bad_total += 1
            self.reason = f"loss spike: {loss:.4g} > {self.spike_factor:g} x the running mean {self.mean:.4g}"
            return "reload"
        self.bad_in_row = 0
        self.mean = loss if self.mean is None else SPIKE_DECAY * self.mean + (1 - SPIKE_DECAY) * loss
        self.good += 1
        self.good_since_reload = True
        return "ok"

    def update(self, optimizer, scaler, params: list, clip: float, loss: torch.Tensor, faults: Faults, step: int,
               procs: Processes) -> str:
        """One optimizer step under the guard: gradients unscaled, clipped, and applied when the verdict
        (the same on every process) is "ok", else dropped; then the loss scale updated and the gradients
        zeroed. -> the verdict."""
        scaler.unscale_(optimizer)
        faults.grads(params, step, procs.rank)
        norm = grad_norm(params, clip)
        mean, finite = agree(loss, None if scaler.is_enabled() else norm, procs.ddp, procs.world)
        verdict = self.verdict(mean, finite)
        if verdict == "ok":
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return verdict

    def reloaded(self):
        """After a reload: the bad stretch is over, the running mean stays (the checkpoint's level)."""
        self.bad_in_row, self.last, self.good_since_reload = 0, "ok", False
        self.reloads += 1

    def saved(self):
        """A checkpoint was saved: reloads count again from 0 if it holds progress since the last one."""
        if self.good_since_reload:
            self.reloads = 0


def grad_norm(params, clip: float) -> torch.Tensor:
    """The global gradient norm of `params`, clipped to `clip` (0: measured only)."""
    params = [p for p in params if p.grad is not None]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor, made whole

