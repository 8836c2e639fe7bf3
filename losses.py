"""Training objectives: loss_fn(model, batch) -> (loss, extra metrics) for each --mode."""
import contextlib
import copy

import torch
import torch.nn.functional as F

import lora


def lm_loss(model, batch: dict):
    """Next-token cross-entropy (plus the MoE balance loss): (loss, extra metrics)."""
    _, loss = model(batch["idx"], batch["targets"], pos=batch.get("pos"), doc=batch.get("doc"))
    return loss, {}


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


def make_dpo_loss(model, args):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * [(log pi(c) - log pi(r)) - (log ref(c) - log ref(r))]),
    log-probabilities summed over the completion tokens (--dpo-length-norm: averaged), mean over pairs.
    The reference is the starting model, frozen: with LoRA the same model with its adapters switched
    off, otherwise a copy. Documents of a DPO batch alternate chosen, rejected (DPOData). A MoE
    policy adds its load-balance loss, as in lm_loss."""
    if lora.lora_modules(model):
        reference, ref_mode = model, lambda: lora.lora_disabled(model)
    else:
        reference, ref_mode = copy.deepcopy(model).eval().requires_grad_(False), contextlib.nullcontext

    def dpo_loss(policy, batch: dict):
        with torch.no_grad(), ref_mode():
            ref_logp, _ = sequence_logprobs(reference, batch)
        logp, n = sequence_logprobs(policy, batch)
        if args.dpo_length_norm:
            logp, ref_logp = logp / n.clamp(min=1), ref_logp / n.clamp(min=1)
        reward = args.beta * (logp - ref_logp)  # (S,) implicit rewards
        margin = reward[0::2] - reward[1::2]  # (S/2,) chosen - rejected, per pair
        loss = -F.logsigmoid(margin).mean()
        cfg = model.config
        if cfg.n_experts and cfg.aux_loss_coef and model.training:  # set by the policy's forward, the last one
            loss = loss + cfg.aux_loss_coef * sum(block.ffn.aux_loss for block in model.layers)
        return loss, {"reward_acc": (margin > 0).float().mean(), "reward_margin": margin.detach().mean()}
    return dpo_loss
