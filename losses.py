"""Training objectives, one per --mode, each built from its typed config (train.py fills them from its flags):

    objective = DPO(model, DPOConfig(beta=0.1, length_norm=False))
    batch = objective.prepare(batch)           # RL: the episodes are sampled here
    loss, metrics = objective(model, batch)    # one micro-batch, in training mode
    loss, metrics = objective.evaluate(model, batch)   # a validation batch, in eval mode

The contract the training loop relies on (Objective, with its defaults):
    updates      optimizer steps per training step (PPO: --ppo-epochs x --ppo-minibatches on one rollout);
                 the batch of each carries "update", its index, when there are several
    stop(kl)     True: skip this update and the rest of the step (PPO's KL early stop); kl is the
                 approx_kl of the update's minibatches averaged over every micro-batch and process
    module       an nn.Module it trains besides the model (PPO's value head), at module_lr: optimized,
                 clipped, all-reduced and checkpointed (in optim.pt) with the model, never exported with it
    prepare      what a training batch needs before its first update (RL: the rollout, its rewards and
                 advantages, kept in the batch for every update of the step)
"""
import contextlib
import copy
import math
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F

import lora
import rl
from checkpoint import CheckpointError, atomic_write_bytes, file_hash, load_checkpoint
from runtime import Processes, autocast
from tokenizer import Tokenizer


class Objective:
    """The base of every objective: plain language modeling (pretrain, sft: the mask is in the
    targets, -1 = no loss), one update a step, no early stop, no module of its own."""
    updates = 1
    module: Optional[nn.Module] = None
    module_lr: Optional[float] = None

    def prepare(self, batch: dict) -> dict:
        return batch

    def stop(self, kl: float) -> bool:
        return False

    def __call__(self, model, batch: dict):
        return lm_loss(model, batch)

    def evaluate(self, model, batch: dict):
        return self(model, batch)

    def advice(self, rec: dict) -> Optional[str]:
        """One line for the user when the logged metrics `rec` say the run cannot learn, else None."""
        return None

    def summarize(self, rec: dict, batches: int) -> dict:
        """The evaluation's metrics, each the mean over `batches` validation batches, as logged."""
        return rec


@torch.no_grad()
def validation_metrics(objective: Objective, model, data, batches: int, batch_size: int, device: str, dtype,
                       procs: Processes) -> dict:
    """The objective's mean metrics (val_*) over the same `batches` validation batches each time, split
    across the processes. Every process runs as many batches (those past the last with weight 0): the
    same keys all-reduced, and FSDP's forwards, which gather weights from every process, matched."""
    totals, mine = {}, 0
    for i in range(procs.rank, -(-batches // procs.world) * procs.world, procs.world):
        with autocast(device, dtype):
            loss, extra = objective.evaluate(model, data.batch("val", 0, i, batch_size, device))
        for k, v in {"loss": loss, **extra}.items():
            totals[k] = totals.get(k, 0.0) + (float(v) if i < batches else 0.0)
        mine += i < batches
    keys = sorted(totals)
    vals = torch.tensor([totals[k] for k in keys] + [mine], dtype=torch.float64)
    if procs.ddp:
        dist.all_reduce(vals)
    return objective.summarize({f"val_{k}": (vals[j] / vals[-1]).item() for j, k in enumerate(keys)}, int(vals[-1]))


def lm_loss(model, batch: dict):
    """Next-token cross-entropy (plus the MoE balance loss): (loss, extra metrics)."""
    _, loss = model(batch["idx"], batch["targets"], pos=batch.get("pos"), doc=batch.get("doc"))
    return loss, {}


def moe_aux_loss(model):
    """The MoE balance loss of the model's last forward in training mode (0 for a dense model), weighted."""
    cfg = model.config
    if cfg.n_experts and cfg.aux_loss_coef and model.training:
        return cfg.aux_loss_coef * sum(block.ffn.aux_loss for block in model.layers)
    return 0.0


def frozen_reference(model, checkpoint: Optional[str] = None):
    """The reference of DPO and RL: the starting policy, frozen -> (reference, context to run it in).
    With LoRA the same model with its adapters switched off; otherwise the weights of `checkpoint`
    (a resumed run: the checkpoint it started from, not the one being resumed), else a copy of the model's."""
    if lora.lora_modules(model):
        return model, lambda: lora.lora_disabled(model)
    if checkpoint:
        reference, _, _ = load_checkpoint(checkpoint, next(model.parameters()).device)
    else:
        reference = copy.deepcopy(model)
    return reference.eval().requires_grad_(False), contextlib.nullcontext


def sequence_logprobs(model, batch: dict):
    """Summed log-probability of the target tokens of every document of a packed batch, and how
    many targets each has: (S,), (S,) for the S = batch["n_seqs"] documents."""
    logits, _ = model(batch["idx"], pos=batch["pos"], doc=batch["doc"])  # (B, T, V)
    targets = batch["targets"].reshape(-1)  # (B*T,)
    logp = -F.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=-1, reduction="none")  # (B*T,)
    S = batch["n_seqs"]
    slot = batch["seq"].reshape(-1)
    slot = torch.where(slot < 0, S, slot)  # padding -> a spare slot S, dropped below (no host sync)
    sums = torch.zeros(S + 1, device=logp.device).index_add_(0, slot, logp)[:S]
    counts = torch.zeros(S + 1, device=logp.device).index_add_(0, slot, (targets >= 0).float())[:S]
    return sums, counts


@dataclass
class DPOConfig:
    beta: float  # strength of the tie to the reference
    length_norm: bool = False  # average the completion log-probabilities over tokens instead of summing
    reference: Optional[str] = None  # checkpoint of the reference (default: a copy of the starting model)


class DPO(Objective):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * [(log pi(c) - log pi(r)) - (log ref(c) - log ref(r))]),
    log-probabilities summed over the completion tokens (length_norm: averaged), mean over pairs.
    The reference is the starting model, frozen (frozen_reference). Documents of a DPO batch alternate
    chosen, rejected (DPOData). A MoE policy adds its load-balance loss, as in lm_loss."""

    def __init__(self, model, cfg: DPOConfig):
        self.model, self.cfg = model, cfg
        self.reference, self.ref_mode = frozen_reference(model, cfg.reference)
        self.cache: Optional[ReferenceCache] = None  # the reference's scores, each document's computed once

    def use_cache(self, data, dtype, device: str, rank: int = 0, world: int = 1) -> str:
        """Keep the reference's score of every document of `data` once computed (ReferenceCache, read
        from and saved to the data directory): a batch met again runs the policy alone."""
        self.cache = ReferenceCache.open(data, weights_hash(self.reference), dtype, device, rank, world)
        self._free_reference()
        return self.cache.describe()

    def save_cache(self):
        """The scores computed so far, merged over the processes and saved (every process calls it)."""
        if self.cache is not None:
            self.cache.save()

    def _free_reference(self):
        if self.cache.complete() and self.reference is not self.model:  # a copy no batch needs any more
            self.reference = None

    def reference_logprobs(self, batch: dict):
        ref_logp = self.cache.lookup(batch) if self.cache is not None else None
        if ref_logp is None:
            with torch.no_grad(), self.ref_mode():
                ref_logp, _ = sequence_logprobs(self.reference, batch)
            if self.cache is not None:
                self.cache.store(batch, ref_logp)
                self._free_reference()
        return ref_logp

    def __call__(self, policy, batch: dict):
        ref_logp = self.reference_logprobs(batch)
        logp, n = sequence_logprobs(policy, batch)
        if self.cfg.length_norm:
            logp, ref_logp = logp / n.clamp(min=1), ref_logp / n.clamp(min=1)
        reward = self.cfg.beta * (logp - ref_logp)  # (S,) implicit rewards
        margin = reward[0::2] - reward[1::2]  # (S/2,) chosen - rejected, per pair
        loss = -F.logsigmoid(margin).mean() + moe_aux_loss(self.model)  # aux: set by the policy's forward, the last one
        return loss, {"reward_acc": (margin > 0).float().mean(), "reward_margin": margin.detach().mean()}

    def evaluate(self, model, batch: dict):
        loss, metrics = self(model, batch)
        pairs = batch["n_seqs"] // 2
        return loss, {**metrics, "pairs": torch.tensor(float(pairs)), "correct": metrics["reward_acc"] * pairs}

    def summarize(self, rec: dict, batches: int) -> dict:
        """Reward accuracy over every held-out pair (not a mean of batch means), with its standard error
        sqrt(p (1 - p) / n): what a change of val_reward_acc must exceed to mean anything."""
        if "val_pairs" not in rec:
            return rec
        rec = dict(rec)
        n, correct = rec.pop("val_pairs") * batches, rec.pop("val_correct") * batches
        p = correct / max(n, 1)
        rec.update(val_reward_acc=p, val_reward_acc_se=accuracy_se(p, n), val_pairs=round(n))
        return rec


def accuracy_se(p: float, n: float) -> float:
    """Standard error of an accuracy p measured on n items, sqrt(p (1 - p) / n) (0 for no items)."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else 0.0


def weights_hash(model) -> str:
    """SHA-256 of a model's weights, LoRA adapters left out (with them off, the model is its base)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" not in name:
            h.update(name.encode())
            h.update(t.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def reference_logprobs(reference, ref_mode, data, batch_size: int, device: str, dtype, rank: int = 0,
                       world: int = 1) -> dict:
    """The reference's summed log-probability of every document of a packed data set (DPOData): {split:
    (items, 2) float32}, [i, j] = document j of item i (DPO: 0 chosen, 1 rejected). Each process scores
    every world-th batch of rows, the sums all-reduced: every process holds the whole."""
    was_training = reference.training
    reference.eval()
    out = {}
    for split, (_, _, items, rows) in data.splits.items():
        sums = torch.zeros(len(items), 2, dtype=torch.float64, device=device)
        for first in range(rank * batch_size, len(rows), world * batch_size):
            batch = data.rows_batch(split, list(range(first, min(first + batch_size, len(rows)))), device)
            with ref_mode(), autocast(device, dtype):
                logp, _ = sequence_logprobs(reference, batch)
            sums[batch["item"], batch["part"]] = logp.double()
        if world > 1:
            dist.all_reduce(sums)
        out[split] = sums.float().cpu().numpy()
    reference.train(was_training)
    return out


REFERENCE_CACHE = "reference_logprobs.npz"  # in the data directory, beside the token files it scores


class ReferenceCache:
    """DPO's reference log-probability of every document of a packed data set (DPOData), {split: (items,
    2)} ([i, j]: document j of item i; NaN: not scored yet), filled as batches first meet them. Kept in
    the data directory (REFERENCE_CACHE, written atomically) under a key of the reference's weights,
    the data files, the row length and the dtype: a run whose key differs starts empty and replaces it.
    Under DDP each process fills the documents it meets; save() merges them."""

    def __init__(self, scores: dict, path: Optional[Path] = None, key: str = "", device: str = "cpu",
                 rank: int = 0, world: int = 1):
        self.scores, self.path, self.key = scores, path, key
        self.device, self.rank, self.world, self.dirty = device, rank, world, False

    @classmethod
    def open(cls, data, reference_hash: str, dtype, device: str, rank: int = 0, world: int = 1):
        files = sorted(p for p in Path(data.dir).iterdir()
                       if p.suffix in (".bin", ".idx", ".mask") or p.name == "meta.json")
        key = json.dumps({"reference": reference_hash, "seq_len": data.seq_len, "dtype": str(dtype),
                          "data": {p.name: file_hash(p) for p in files}}, sort_keys=True)
        key = hashlib.sha256(key.encode()).hexdigest()
        scores = {s: np.full((len(items), 2), np.nan, dtype=np.float32) for s, (_, _, items, _) in data.splits.items()}
        path = Path(data.dir) / REFERENCE_CACHE
        try:
            with np.load(path) as f:
                if str(f["key"]) == key and all(f[s].shape == a.shape for s, a in scores.items()):
                    scores = {s: f[s].copy() for s in scores}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            pass  # none yet, another reference's, or torn: scored again
        return cls(scores, path, key, device, rank, world)

    def describe(self) -> str:
        done = sum(int((~np.isnan(a)).all(1).sum()) for a in self.scores.values())
        return (f"DPO reference: {done:,} of {sum(len(a) for a in self.scores.values()):,} pairs' scores cached in "
                f"{self.path} (the rest scored the first time a batch meets them)")

    def complete(self) -> bool:
        return not any(np.isnan(a).any() for a in self.scores.values())

    def lookup(self, batch: dict) -> Optional[torch.Tensor]:
        """The batch's documents' scores (S,) on its device; None unless every one is cached."""
        item, part = batch["item_host"]
        got = self.scores[batch["split"]][item, part]
        return None if np.isnan(got).any() else torch.from_numpy(got).to(batch["item"].device)

    def store(self, batch: dict, ref_logp: torch.Tensor):
        item, part = batch["item_host"]
        self.scores[batch["split"]][item, part] = ref_logp.detach().float().cpu().numpy()
        self.dirty = True

    def save(self):
        """Merge the processes' scores (the mean where several scored a document) and write them (rank 0),
        when anything new was scored; a directory that cannot be written keeps them in memory."""
        if self.world > 1:
            dirty = torch.tensor([float(self.dirty)], device=self.device)
            dist.all_reduce(dirty)
            if not dirty.item():
                return
            for s, a in self.scores.items():
                known = torch.from_numpy(~np.isnan(a)).to(self.device, torch.float64)
                total = torch.from_numpy(np.nan_to_num(a)).to(self.device, torch.float64)
                dist.all_reduce(known)
                dist.all_reduce(total)
                self.scores[s] = torch.where(known > 0, total / known.clamp(min=1), torch.nan).float().cpu().numpy()
        elif not self.dirty:
            return
        self.dirty = False
        if self.rank == 0 and self.path is not None:
            buf = io.BytesIO()
            np.savez(buf, key=np.array(self.key), **self.scores)
            try:
                atomic_write_bytes(self.path, buf.getvalue())
            except (OSError, CheckpointError) as e:
                print(f"[DPO reference scores not cached: {e}]")


# -----------------------------------------------------------------------------
# RL on the policy's own samples: grpo (GRPO, CISPO), ppo

@dataclass
class PolicyGradientConfig:
    """The flags of --mode=grpo|ppo that the objective reads (train.py's help says what each does)."""
    ppo: bool  # ppo: value head, GAE, KL early stop; else grpo: group-normalised advantages
    tokenizer_dir: str  # the prompts are text: encoded with this tokenizer
    seq_len: int  # longest prompt in tokens: a longer one keeps its end
    num_generations: int  # episodes per prompt (a GRPO group)
    max_new_tokens: int  # longest reply (per turn with tools)
    rollout_temperature: float
    eval_temperature: float  # held-out rollouts: 0 = greedy
    reward: str  # reward specs, "NAME[k=v,...]:WEIGHT ..." (rl.parse_reward_specs)
    reward_model: Optional[str]  # a sequence-classification model directory, scored as reward `rm`
    tools: Optional[str]  # sandboxed tools for multi-turn episodes: "all" or a comma list; None: off
    max_turns: int  # with tools: assistant turns per episode
    loss_type: str  # grpo | cispo (grpo mode)
    beta: float  # weight of the k3 KL to the frozen reference; 0: no reference
    epsilon: float  # clip range of the ratio: 1 - epsilon .. 1 + epsilon_high
    epsilon_high: Optional[float]  # None: epsilon (cispo: 4)
    ppo_epochs: int  # passes over each rollout
    ppo_minibatches: int  # optimizer steps per pass
    target_kl: float  # ppo: stop a step's updates past 1.5 x this
    gamma: float  # ppo: GAE discount
    lam: float  # ppo: GAE lambda
    vf_coef: float  # ppo: weight of the value loss
    value_clip: float  # ppo: clip range of the value update
    value_lr: float  # ppo: peak learning rate of the value head
    reference: Optional[str] = None  # checkpoint of the reference (default: a copy of the starting model)
    dynamic_sampling: int = 0  # grpo: rounds of spare prompts that may replace groups whose episodes all agree


class PolicyGradient(Objective):
    """--mode=grpo (GRPO / CISPO) and --mode=ppo on episodes sampled from the policy itself.

    A micro-batch is P prompts (data.PromptData). prepare() gives each G = num_generations episodes
    (rl.rollout: the model's batched KV-cache decoder, its samples drawn from the batch's seeded
    generator; with tools multi-turn, tool responses fed back and masked out), scored by the rewards
    (rl.compute_rewards):
      grpo: one advantage per episode, normalised within its group (rl.group_advantages), and the
            clipped surrogate (loss_type grpo: rl.grpo_loss) or CISPO (rl.cispo_loss), each episode's
            token mean then the batch mean, as MiniMind;
      ppo:  the reward on each episode's last token, values from a linear value head on the policy's
            final hidden states (detached: a probe that never pulls on the policy), GAE advantages
            (gamma, lam) whitened over the micro-batch, the clipped surrogate averaged over all
            tokens plus vf_coef x the clipped value loss (value_clip); the head learns at value_lr.
    Both add beta x the k3 KL to the frozen reference (none at beta 0).

    One training step is one rollout and `updates` = ppo_epochs x ppo_minibatches optimizer steps on it
    (grpo's default is 1: on-policy, ratio 1, the plain policy gradient). prepare() keeps the rollout, its
    log-probs before the first update and its advantages in the batch, as batch["episodes"]; an update
    takes one minibatch of the episodes, reshuffled each epoch by a permutation seeded from the batch.
    PPO skips the rest of a step once an update starts further than 1.5 x target_kl from the rollout's
    policy (stop).

    evaluate(): the held-out reward of one episode per prompt, greedy (eval_temperature 0) or sampled
    from the batch's fixed-seed generator; the loss is minus the mean reward, lower is better as for
    every val_loss."""

    def __init__(self, model, cfg: PolicyGradientConfig):
        self.model, self.cfg, self.ppo = model, cfg, cfg.ppo
        self.device = next(model.parameters()).device
        self.tok = Tokenizer(cfg.tokenizer_dir)
        self.tools = rl.select_tools(cfg.tools) if cfg.tools is not None else None
        registry = {"rm": rl.RewardModel(cfg.reward_model, str(self.device))} if cfg.reward_model else {}
        self.rewards = rl.parse_reward_specs(cfg.reward, registry)
        if registry and all(name != "rm" for name, _, _ in self.rewards):
            self.rewards.append(("rm", 1.0, registry["rm"]))
        self.reference, self.ref_mode = frozen_reference(model, cfg.reference) if cfg.beta else (None, None)
        self.updates = cfg.ppo_epochs * cfg.ppo_minibatches
        self.module_lr = cfg.value_lr
        self.signal, self.advised = [], False  # the share of groups with a signal, last 10 logged steps (advice)
        if cfg.ppo:
            self.module = nn.Linear(model.config.dim, 1).to(self.device)
            nn.init.zeros_(self.module.weight)
            nn.init.zeros_(self.module.bias)

    def stop(self, kl: float) -> bool:
        return self.ppo and rl.kl_early_stop(kl, self.cfg.target_kl)

    def advice(self, rec: dict) -> Optional[str]:
        """Once per run: a warning when, over the last 10 logged steps, fewer than 1 group in 10 carried a
        signal (grpo: episodes that differ, after dynamic sampling) - the run is sampling without learning."""
        if "mixed_groups" not in rec or self.advised:
            return None
        self.signal = (self.signal + [rec.get("kept_mixed", rec["mixed_groups"])])[-10:]
        mean = sum(self.signal) / len(self.signal)
        if len(self.signal) < 10 or mean >= 0.1:
            return None
        self.advised = True
        cfg = self.cfg
        return (f"warning: only {mean:.0%} of the groups had episodes that score differently over the last 10 "
                f"logged steps, so almost nothing is learned: raise --num-generations (now {cfg.num_generations}), "
                f"--rollout-temperature (now {cfg.rollout_temperature:g}) or --dynamic-sampling (now "
                f"{cfg.dynamic_sampling}), or start from a checkpoint that gets some prompts right")

    def encode(self, record) -> list:
        """Prompt token ids, the last seq_len of them (a longer prompt loses its start, as in MiniMind)."""
        return self.tok.encode_chat(rl.rollout_messages(record))[-self.cfg.seq_len:]

    def episodes(self, records, group: int, temperature: float, generator):
        """-> (rollout, total rewards (N,), metrics) for `group` episodes of each record."""
        cfg = self.cfg
        prompts = [self.encode(r) for r in records for _ in range(group)]
        ro = rl.rollout(self.model, self.tok, prompts, cfg.max_new_tokens, temperature=temperature,
                        generator=generator, tools=self.tools, max_turns=cfg.max_turns if self.tools else 1)
        messages = [rl.rollout_messages(r) for r in records]
        total, parts = rl.compute_rewards(self.rewards, messages, ro.texts, records, group_size=group)
        metrics = {"reward": total.mean(), "reward_std": total.std(unbiased=False)}
        for name, values in parts.items():
            metrics[f"reward_{name}"] = values.mean()
            metrics[f"reward_{name}_std"] = values.std(unbiased=False)
        metrics = {k: v.to(self.device) for k, v in metrics.items()}  # the rewards are computed on the CPU
        metrics["response_len"] = ro.mask.sum(1).mean()
        if self.tools is not None:
            metrics["tool_calls"] = ro.tool_calls.mean()
        return ro, total.to(self.device), metrics

    def sample_groups(self, batch: dict):
        """-> (rollout, rewards, metrics) of G episodes for each of the batch's P prompts. A group whose
        episodes all score the same has advantage 0: no gradient. With dynamic_sampling (DAPO's dynamic
        sampling) such groups are replaced by groups that differ, from rollouts of the batch's spare
        prompts (P at a time, up to dynamic_sampling rounds, same generator), so that the step learns from
        P groups whenever the spares allow. The reward metrics describe the batch's own prompts (the
        policy as it is); mixed_groups is their share with a signal, kept_mixed the share after refilling."""
        cfg, G, P = self.cfg, self.cfg.num_generations, len(batch["records"])
        ro, rewards, metrics = self.episodes(batch["records"], G, cfg.rollout_temperature, batch["generator"])
        mixed = rl.differing_groups(rewards, G)  # (P,) groups whose episodes differ
        metrics["mixed_groups"] = mixed.float().mean()
        if self.ppo or not cfg.dynamic_sampling:
            return ro, rewards, metrics
        groups = [(ro, rewards, g) if m else None for g, m in enumerate(mixed.tolist())]  # None: uniform
        spares, tried = batch.get("spares", []), 0
        while None in groups and tried < min(len(spares), cfg.dynamic_sampling * P):
            chunk = spares[tried:tried + P]
            tried += len(chunk)
            more_ro, more_rewards, _ = self.episodes(chunk, G, cfg.rollout_temperature, batch["generator"])
            found = rl.differing_groups(more_rewards, G).nonzero().flatten().tolist()
            for i, g in zip([i for i, x in enumerate(groups) if x is None], found):
                groups[i] = (more_ro, more_rewards, g)
        metrics["resampled"] = torch.tensor(tried / P, device=self.device)
        metrics["kept_mixed"] = torch.tensor(sum(x is not None for x in groups) / P, device=self.device)
        if tried:
            groups = [x if x is not None else (ro, rewards, g) for g, x in enumerate(groups)]
            ro = rl.join_rollouts([(r, range(g * G, (g + 1) * G)) for r, _, g in groups], self.tok.pad_id)
            rewards = torch.cat([r[g * G:(g + 1) * G] for _, r, g in groups])
        return ro, rewards, metrics

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        """The batch with its episodes: the rollout, rewards, advantages (ppo: values and returns) and the
        log-probs the updates compare with, under "episodes"."""
        cfg, G = self.cfg, self.cfg.num_generations
        ro, rewards, metrics = self.sample_groups(batch)
        state = {"ro": ro, "metrics": metrics}
        if self.reference is not None:
            with self.ref_mode():
                state["ref_logp"] = rl.completion_logprobs(self.reference, ro.prompt, ro.completion, ro.mask, ro.pad)
        if self.ppo:
            state["old_logp"], h = rl.completion_logprobs(self.model, ro.prompt, ro.completion, ro.mask, ro.pad,
                                                          hidden=True)
            values = self.module(h.float()).squeeze(-1) * ro.mask  # (N, R)
            adv, state["returns"] = rl.gae(rl.last_token_rewards(rewards, ro.mask), values, ro.mask, cfg.gamma, cfg.lam)
            state["adv"], state["old_values"] = rl.whiten(adv, ro.mask), values
        else:
            if self.updates > 1:
                state["old_logp"] = rl.completion_logprobs(self.model, ro.prompt, ro.completion, ro.mask, ro.pad)
            state["adv"] = rl.group_advantages(rewards, G)
        return {**batch, "episodes": state}

    def minibatch(self, batch, n: int):
        """Episode rows of this update: all of them, or minibatch j of epoch e (update = e * minibatches + j)."""
        if self.updates == 1:
            return torch.arange(n, device=self.device)
        epoch, j = divmod(batch["update"], self.cfg.ppo_minibatches)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(batch["seed"] * 31 + epoch))
        size = -(-n // self.cfg.ppo_minibatches)
        return perm[j * size:(j + 1) * size].to(self.device)

    def __call__(self, policy, batch: dict):
        cfg, state = self.cfg, batch["episodes"]
        ro = state["ro"]
        rows = self.minibatch(batch, len(ro.texts))
        prompt, pad, completion, mask = ro.prompt[rows], ro.pad[rows], ro.completion[rows], ro.mask[rows]
        if self.ppo:
            logp, h, entropy = rl.completion_logprobs(policy, prompt, completion, mask, pad, hidden=True, entropy=True)
        else:
            logp, entropy = rl.completion_logprobs(policy, prompt, completion, mask, pad, entropy=True)
        old = state["old_logp"][rows] if "old_logp" in state else logp.detach()
        ref = state["ref_logp"][rows] if "ref_logp" in state else None
        adv = state["adv"][rows]
        if self.ppo:
            loss, metrics = rl.grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=cfg.beta, eps=cfg.epsilon,
                                         eps_high=cfg.epsilon_high, token_mean=True)
            values = self.module(h.detach().float()).squeeze(-1)  # (n, R)
            vloss = rl.value_loss(values, state["old_values"][rows], state["returns"][rows], mask, cfg.value_clip)
            loss = loss + cfg.vf_coef * vloss
            metrics.update(policy_loss=metrics.pop("loss"), value_loss=vloss.detach(),
                           value=rl.masked_mean(values.detach(), mask))
        elif cfg.loss_type == "cispo":
            loss, metrics = rl.cispo_loss(logp, old, adv, mask, ref_logp=ref, beta=cfg.beta,
                                          eps_high=4.0 if cfg.epsilon_high is None else cfg.epsilon_high)
        else:
            loss, metrics = rl.grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=cfg.beta, eps=cfg.epsilon,
                                         eps_high=cfg.epsilon_high)
        metrics.pop("loss", None)  # the loop logs the loss itself
        metrics["approx_kl"] = rl.approx_kl(logp, old, mask)
        metrics["entropy"] = rl.masked_mean(entropy, mask)  # nats per token written: falls as the policy settles
        return loss + moe_aux_loss(self.model), {**metrics, **state["metrics"]}

    @torch.no_grad()
    def evaluate(self, model, batch: dict):
        _, rewards, metrics = self.episodes(batch["records"], 1, self.cfg.eval_temperature, batch["generator"])
        return -rewards.mean(), {k: v for k, v in metrics.items() if not k.endswith("_std")}


# -----------------------------------------------------------------------------
# distillation

def distill_kl(student_logits, teacher_logits, mask, temperature: float):
    """Mean over the positions where mask is 1 of KL(softmax(teacher / T) || softmax(student / T)),
    in fp32: (B, T, V), (B, T, V), (B, T) -> scalar. No host sync (masked, not selected)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (B, T): sum_v p_t (log p_t - log p_s)
    return rl.masked_mean(kl, mask)


@dataclass
class DistillConfig:
    teacher: str  # the teacher checkpoint
    tokenizer_dir: str  # the student's tokenizer: the teacher's must be the same
    alpha: float  # weight of the cross-entropy; 1 - alpha: of the KL
    temperature: float  # softmax temperature of the KL term


class Distill(Objective):
    """Knowledge distillation (Hinton et al. 2015) on SFT rows, as MiniMind's train_distillation.py:

        loss = alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

    both over the target tokens (the assistant replies), p_T = softmax(logits / T); T^2 keeps the soft
    term's gradient the size of the hard one's. The teacher (a checkpoint) runs frozen in eval mode and
    must use the student's tokenizer (same hash) and vocabulary; its size is free. A MoE student adds
    its balance loss. Metrics: ce and kl, so the student's val_ce compares with the val_loss of an SFT run."""

    def __init__(self, model, cfg: DistillConfig):
        self.model, self.cfg = model, cfg
        teacher, _, ckpt = load_checkpoint(cfg.teacher, next(model.parameters()).device)
        self.teacher = teacher.requires_grad_(False)
        if not (ckpt / "tokenizer" / "tokenizer.json").exists():
            raise ValueError(f"--teacher {ckpt}: no tokenizer/ in the checkpoint, cannot check it is the student's")
        theirs, ours = Tokenizer(ckpt / "tokenizer").hash(), Tokenizer(cfg.tokenizer_dir).hash()
        if theirs != ours:
            raise ValueError(f"--teacher {ckpt} uses another tokenizer (hash {theirs}) than the student ({ours}, "
                             f"{cfg.tokenizer_dir}): distillation compares distributions over the same tokens")
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"--teacher {ckpt}: vocabulary {teacher.config.vocab_size} != the student's "
                             f"{model.config.vocab_size}")

    def __call__(self, student, batch: dict):
        alpha, T = self.cfg.alpha, self.cfg.temperature
        idx, targets, pos, doc = batch["idx"], batch["targets"], batch.get("pos"), batch.get("doc")
        logits, _ = student(idx, pos=pos, doc=doc)  # (B, T, V)
        with torch.no_grad():
            teacher_logits, _ = self.teacher(idx, pos=pos, doc=doc)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        kl = distill_kl(logits, teacher_logits, targets >= 0, T)
        loss = alpha * ce + (1 - alpha) * T * T * kl + moe_aux_loss(self.model)
        return loss, {"ce": ce.detach(), "kl": kl.detach()}
