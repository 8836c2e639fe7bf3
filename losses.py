"""Training objectives: loss_fn(model, batch) -> (loss, extra metrics) for each --mode.

An objective may carry more for the training loop (train.py looks for these attributes):
    updates   optimizer steps per training step (PPO: --ppo-epochs x --ppo-minibatches on one rollout);
              the batch of each then carries "update", its index
    stop(kl)  True: skip this update and the rest of the step (PPO's KL early stop); kl is the
              approx_kl of the update's minibatches averaged over every micro-batch and process
    module    an nn.Module it trains besides the model (PPO's value head): optimized, clipped,
              all-reduced and checkpointed (in optim.pt) with the model, never exported with it
"""
import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import rl
from checkpoint import load_checkpoint
from tokenizer import Tokenizer


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


def frozen_reference(model, args):
    """The reference of DPO and RL: the starting policy, frozen -> (reference, context to run it in).
    With LoRA the same model with its adapters switched off; otherwise a copy of the weights the run
    started from: on --resume those of args.init_from, not of the checkpoint being resumed."""
    if lora.lora_modules(model):
        return model, lambda: lora.lora_disabled(model)
    if getattr(args, "resume", False) and getattr(args, "init_from", None):
        reference, _, _ = load_checkpoint(args.init_from, next(model.parameters()).device)
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


def make_dpo_loss(model, args):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * [(log pi(c) - log pi(r)) - (log ref(c) - log ref(r))]),
    log-probabilities summed over the completion tokens (--dpo-length-norm: averaged), mean over pairs.
    The reference is the starting model, frozen (frozen_reference). Documents of a DPO batch alternate
    chosen, rejected (DPOData). A MoE policy adds its load-balance loss, as in lm_loss."""
    reference, ref_mode = frozen_reference(model, args)

    def dpo_loss(policy, batch: dict):
        with torch.no_grad(), ref_mode():
            ref_logp, _ = sequence_logprobs(reference, batch)
        logp, n = sequence_logprobs(policy, batch)
        if args.dpo_length_norm:
            logp, ref_logp = logp / n.clamp(min=1), ref_logp / n.clamp(min=1)
        reward = args.beta * (logp - ref_logp)  # (S,) implicit rewards
        margin = reward[0::2] - reward[1::2]  # (S/2,) chosen - rejected, per pair
        loss = -F.logsigmoid(margin).mean() + moe_aux_loss(model)  # aux: set by the policy's forward, the last one
        return loss, {"reward_acc": (margin > 0).float().mean(), "reward_margin": margin.detach().mean()}
    return dpo_loss


# -----------------------------------------------------------------------------
# RL on the policy's own samples: grpo (GRPO, CISPO), ppo

class PolicyGradient:
    """--mode=grpo (GRPO / CISPO) and --mode=ppo on episodes sampled from the policy itself.

    A micro-batch is P prompts (data.PromptData). Each gets G = --num-generations episodes (rl.rollout:
    the model's batched KV-cache decoder, its samples drawn from the batch's seeded generator; with
    --tools multi-turn, tool responses fed back and masked out), scored by --reward (rl.compute_rewards):
      grpo: one advantage per episode, normalised within its group (rl.group_advantages), and the
            clipped surrogate (--loss-type grpo: rl.grpo_loss) or CISPO (rl.cispo_loss), each episode's
            token mean then the batch mean, as MiniMind;
      ppo:  the reward on each episode's last token, values from a linear value head on the policy's
            final hidden states (detached: a probe that never pulls on the policy), GAE advantages
            (--gamma, --lam) whitened over the micro-batch, the clipped surrogate averaged over all
            tokens plus --vf-coef x the clipped value loss (--value-clip); the head learns at --value-lr.
    Both add --beta x the k3 KL to the frozen reference (none at beta 0).

    One training step is one rollout and `updates` = --ppo-epochs x --ppo-minibatches optimizer steps on
    it (grpo's default is 1: on-policy, ratio 1, the plain policy gradient). The rollout, its log-probs
    before the first update and its advantages are kept for the step; an update takes one minibatch of
    the episodes, reshuffled each epoch by a permutation seeded from the batch. PPO skips the rest of a
    step once an update starts further than 1.5 x --target-kl from the rollout's policy (stop).

    In eval mode: the held-out reward of one episode per prompt, greedy (--eval-temperature 0) or sampled
    from the batch's fixed-seed generator; the loss is minus the mean reward, lower is better as for
    every val_loss."""

    def __init__(self, model, args, ppo: bool):
        self.model, self.args, self.ppo = model, args, ppo
        self.device = next(model.parameters()).device
        self.tok = Tokenizer(args.tokenizer_dir)
        self.tools = rl.select_tools(args.tools) if args.tools is not None else None
        registry = {"rm": rl.RewardModel(args.reward_model, str(self.device))} if args.reward_model else {}
        self.rewards = rl.parse_reward_specs(args.reward, registry)
        if registry and all(name != "rm" for name, _, _ in self.rewards):
            self.rewards.append(("rm", 1.0, registry["rm"]))
        self.reference, self.ref_mode = frozen_reference(model, args) if args.beta else (None, None)
        self.updates = args.ppo_epochs * args.ppo_minibatches
        self.module, self.module_lr = None, args.value_lr
        if ppo:
            self.module = nn.Linear(model.config.dim, 1).to(self.device)
            nn.init.zeros_(self.module.weight)
            nn.init.zeros_(self.module.bias)
        self.cache = {}  # (step, index) -> the rollout of that micro-batch, kept for the step's updates

    def stop(self, kl: float) -> bool:
        return self.ppo and rl.kl_early_stop(kl, self.args.target_kl)

    def encode(self, record) -> list:
        """Prompt token ids, the last --seq-len of them (a longer prompt loses its start, as in MiniMind)."""
        return self.tok.encode_chat(rl.rollout_messages(record))[-self.args.seq_len:]

    def episodes(self, records, group: int, temperature: float, generator):
        """-> (rollout, total rewards (N,), metrics) for `group` episodes of each record."""
        args = self.args
        prompts = [self.encode(r) for r in records for _ in range(group)]
        ro = rl.rollout(self.model, self.tok, prompts, args.max_new_tokens, temperature=temperature,
                        generator=generator, tools=self.tools, max_turns=args.max_turns if self.tools else 1)
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

    @torch.no_grad()
    def rollout_for(self, batch) -> dict:
        key = (batch["step"], batch["index"])
        if key in self.cache:
            return self.cache[key]
        self.cache = {k: v for k, v in self.cache.items() if k[0] == key[0]}  # a new step drops the last one's
        args, G = self.args, self.args.num_generations
        ro, rewards, metrics = self.episodes(batch["records"], G, args.rollout_temperature, batch["generator"])
        state = {"ro": ro, "metrics": metrics}
        if self.reference is not None:
            with self.ref_mode():
                state["ref_logp"] = rl.completion_logprobs(self.reference, ro.prompt, ro.completion, ro.mask, ro.pad)
        if self.ppo:
            state["old_logp"], h = rl.completion_logprobs(self.model, ro.prompt, ro.completion, ro.mask, ro.pad,
                                                          hidden=True)
            values = self.module(h.float()).squeeze(-1) * ro.mask  # (N, R)
            adv, state["returns"] = rl.gae(rl.last_token_rewards(rewards, ro.mask), values, ro.mask, args.gamma, args.lam)
            state["adv"], state["old_values"] = rl.whiten(adv, ro.mask), values
        else:
            if self.updates > 1:
                state["old_logp"] = rl.completion_logprobs(self.model, ro.prompt, ro.completion, ro.mask, ro.pad)
            state["adv"] = rl.group_advantages(rewards, G)
            mixed = rewards.view(-1, G).std(dim=1) > 0  # groups whose episodes differ: the only ones with a signal
            metrics["mixed_groups"] = mixed.float().mean()
        self.cache[key] = state
        return state

    def minibatch(self, batch, n: int):
        """Episode rows of this update: all of them, or minibatch j of epoch e (update = e * minibatches + j)."""
        if self.updates == 1:
            return torch.arange(n, device=self.device)
        epoch, j = divmod(batch["update"], self.args.ppo_minibatches)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(batch["seed"] * 31 + epoch))
        size = -(-n // self.args.ppo_minibatches)
        return perm[j * size:(j + 1) * size].to(self.device)

    def __call__(self, policy, batch: dict):
        if not self.model.training:
            return self.evaluate(batch)
        args = self.args
        state = self.rollout_for(batch)
        ro = state["ro"]
        rows = self.minibatch(batch, len(ro.texts))
        prompt, pad, completion, mask = ro.prompt[rows], ro.pad[rows], ro.completion[rows], ro.mask[rows]
        if self.ppo:
            logp, h = rl.completion_logprobs(policy, prompt, completion, mask, pad, hidden=True)
        else:
            logp = rl.completion_logprobs(policy, prompt, completion, mask, pad)
        old = state["old_logp"][rows] if "old_logp" in state else logp.detach()
        ref = state["ref_logp"][rows] if "ref_logp" in state else None
        adv = state["adv"][rows]
        if self.ppo:
            loss, metrics = rl.grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=args.beta, eps=args.epsilon,
                                         eps_high=args.epsilon_high, token_mean=True)
            values = self.module(h.detach().float()).squeeze(-1)  # (n, R)
            vloss = rl.value_loss(values, state["old_values"][rows], state["returns"][rows], mask, args.value_clip)
            loss = loss + args.vf_coef * vloss
            metrics.update(policy_loss=metrics.pop("loss"), value_loss=vloss.detach(),
                           value=rl.masked_mean(values.detach(), mask))
        elif args.loss_type == "cispo":
            loss, metrics = rl.cispo_loss(logp, old, adv, mask, ref_logp=ref, beta=args.beta,
                                          eps_high=4.0 if args.epsilon_high is None else args.epsilon_high)
        else:
            loss, metrics = rl.grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=args.beta, eps=args.epsilon,
                                         eps_high=args.epsilon_high)
        metrics.pop("loss", None)  # the loop logs the loss itself
        metrics["approx_kl"] = rl.approx_kl(logp, old, mask)
        return loss + moe_aux_loss(self.model), {**metrics, **state["metrics"]}

    @torch.no_grad()
    def evaluate(self, batch: dict):
        _, rewards, metrics = self.episodes(batch["records"], 1, self.args.eval_temperature, batch["generator"])
        return -rewards.mean(), {k: v for k, v in metrics.items() if not k.endswith("_std")}


def make_grpo_loss(model, args):
    return PolicyGradient(model, args, ppo=False)


def make_ppo_loss(model, args):
    return PolicyGradient(model, args, ppo=True)


# -----------------------------------------------------------------------------
# distillation

def distill_kl(student_logits, teacher_logits, mask, temperature: float):
    """Mean over the positions where mask is 1 of KL(softmax(teacher / T) || softmax(student / T)),
    in fp32: (B, T, V), (B, T, V), (B, T) -> scalar. No host sync (masked, not selected)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (B, T): sum_v p_t (log p_t - log p_s)
    return rl.masked_mean(kl, mask)


def make_distill_loss(model, args):
    """Knowledge distillation (Hinton et al. 2015) on SFT rows, as MiniMind's train_distillation.py:

        loss = alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

    both over the target tokens (the assistant replies), p_T = softmax(logits / T); T^2 keeps the soft
    term's gradient the size of the hard one's. The teacher (--teacher, a checkpoint) runs frozen in
    eval mode and must use the student's tokenizer (same hash) and vocabulary; its size is free. A MoE
    student adds its balance loss. Metrics: ce and kl, so the student's val_ce compares with the
    val_loss of an SFT run."""
    device = next(model.parameters()).device
    teacher, _, ckpt = load_checkpoint(args.teacher, device)
    teacher.requires_grad_(False)
    if not (ckpt / "tokenizer" / "tokenizer.json").exists():
        raise ValueError(f"--teacher {ckpt}: no tokenizer/ in the checkpoint, cannot check it is the student's")
    theirs, ours = Tokenizer(ckpt / "tokenizer").hash(), Tokenizer(args.tokenizer_dir).hash()
    if theirs != ours:
        raise ValueError(f"--teacher {ckpt} uses another tokenizer (hash {theirs}) than the student ({ours}, "
                         f"{args.tokenizer_dir}): distillation compares distributions over the same tokens")
    if teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"--teacher {ckpt}: vocabulary {teacher.config.vocab_size} != the student's "
                         f"{model.config.vocab_size}")
    alpha, T = args.alpha, args.temperature

    def distill_loss(student, batch: dict):
        idx, targets, pos, doc = batch["idx"], batch["targets"], batch.get("pos"), batch.get("doc")
        logits, _ = student(idx, pos=pos, doc=doc)  # (B, T, V)
        with torch.no_grad():
            teacher_logits, _ = teacher(idx, pos=pos, doc=doc)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        kl = distill_kl(logits, teacher_logits, targets >= 0, T)
        loss = alpha * ce + (1 - alpha) * T * T * kl + moe_aux_loss(model)
        return loss, {"ce": ce.detach(), "kl": kl.detach()}
    return distill_loss
