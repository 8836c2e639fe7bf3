"""The policy-gradient side of RL: advantages, per-token log-probs, the GRPO / CISPO losses and PPO's
GAE, value loss and KL early stop. Pure tensor functions, no host sync (kl_early_stop excepted).

    from rl.policy import completion_logprobs, group_advantages, grpo_loss
    adv = group_advantages(rewards, G)                                  # (P*G,)
    logp = completion_logprobs(model, prompt, completion, mask, pad)    # (B, T) fp32
    loss, metrics = grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.1)

Conventions (B = sequences, T = completion positions, P = prompts, G = samples per prompt):
- per-token tensors are (B, T) and aligned: logp[b, t] is log pi(token t of completion b | prefix);
  `mask` (B, T) is 1 on tokens that are trained on (the completion up to and including its eos;
  0 on padding and, in agentic rollouts, on tool responses the model did not write)
- advantages are (B,) (one per sequence: GRPO) or (B, T) (per token: PPO)
- every loss returns (scalar loss, metrics dict of detached 0-dim tensors): no host sync inside
"""
from typing import Optional

import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# advantages and log-probs

def group_advantages(rewards, group_size: int, eps: float = 1e-4):
    """GRPO advantages: rewards (P*G,) of G samples per prompt, consecutive, ->
    A_i = (r_i - mean_group) / (std_group + eps), std the population std (unbiased=False, as MiniMind).
    A group whose rewards are all equal gets advantage 0 (no signal)."""
    r = rewards.float().view(-1, group_size)  # (P, G)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    return ((r - mean) / (std + eps)).view(-1)  # (P*G,)


def differing_groups(rewards, group_size: int):
    """(P*G,) rewards of G samples per prompt -> (P,) bool: the groups whose rewards are not all equal, the
    only ones group_advantages gives a signal."""
    return rewards.float().view(-1, group_size).std(dim=1, unbiased=False) > 0


def gather_logprobs(logits, targets, mask=None):
    """log pi(targets | ...) per token: logits (B, T, V) (any dtype), targets (B, T) -> (B, T) fp32.
    Computed in fp32 (log-softmax of bf16 logits loses the small ratios PPO clips on). Positions with
    mask 0 (or target -1) are 0."""
    B, T, V = logits.shape
    safe = targets.clamp(min=0)
    # cross_entropy fuses log-softmax and gather without keeping a (B, T, V) fp32 log-softmax around
    logp = -F.cross_entropy(logits.float().reshape(B * T, V), safe.reshape(B * T), reduction="none").view(B, T)
    keep = targets >= 0
    if mask is not None:
        keep = keep & mask.bool()
    return torch.where(keep, logp, 0.0)


def completion_logprobs(model, prompt, completion, mask=None, pad=None, hidden: bool = False,
                        entropy: bool = False):
    """log pi(completion token | prompt, earlier completion tokens), (B, R) fp32, in one forward pass of a
    MiniMind-like model (`model(idx, pos=, doc=) -> (logits, loss)`).
    hidden=True also returns the final hidden states at the same positions, (B, R, C): the state each
    completion token is predicted from, what a value head reads (`model(..., return_hidden=True)`).
    entropy=True also returns the policy's entropy at each completion position, (B, R) fp32, detached
    (0 where mask is 0): a policy that stops exploring shows it here first.
    Returns logp, or the tuple (logp[, hidden][, entropy]).

    prompt: (B, P) ids, left-padded by `pad` (B,) tokens per row (as generate_stream takes them);
    completion: (B, R) ids; mask: (B, R) completion tokens to score (0 elsewhere in the result).
    With padding, positions restart after each row's padding and the padding is a document of its
    own (never attended to), so a padded row scores exactly as it would alone. The logits at
    position P-1+t predict completion token t."""
    B, P = prompt.shape
    ids = torch.cat([prompt, completion], dim=1)[:, :-1]  # (B, P+R-1): the last token predicts nothing
    kw = {}
    if pad is not None:
        t = torch.arange(ids.size(1), device=ids.device)[None, :]  # (1, P+R-1)
        pad = pad.to(ids.device)[:, None]  # (B, 1)
        kw = {"pos": (t - pad).clamp(min=0), "doc": (t >= pad).long()}
    out = model(ids, return_hidden=True, **kw) if hidden else model(ids, **kw)  # (B, P+R-1, V)[, (B, P+R-1, C)]
    logits = out[0][:, P - 1:]  # (B, R, V)
    result = [gather_logprobs(logits, completion, mask)]
    if hidden:
        result.append(out[2][:, P - 1:])
    if entropy:
        result.append(token_entropy(logits, mask))
    return result[0] if len(result) == 1 else tuple(result)


@torch.no_grad()
def token_entropy(logits, mask=None, chunk: int = 2 ** 24):
    """Entropy of softmax(logits) per position, -sum p log p, in fp32: (B, T, V) -> (B, T), 0 where mask is 0.
    Rows a few at a time, so that the fp32 log-softmax held at once stays under `chunk` elements (a
    rollout's whole (B, T, V) in fp32 is what gather_logprobs avoids too)."""
    B, T, V = logits.shape
    step = max(1, chunk // max(1, T * V))
    parts = []
    for b in range(0, B, step):
        logp = F.log_softmax(logits[b:b + step].float(), dim=-1)  # (step, T, V)
        parts.append(-(logp.exp() * logp).sum(-1))
    ent = torch.cat(parts)  # (B, T)
    return ent if mask is None else ent * mask


def completion_mask(completion_ids, eos_id: int):
    """(B, T) generated ids -> (B, T) float mask of the tokens a completion consists of: everything up
    to and including its first `eos_id` (generate_stream repeats eos after a row is done)."""
    is_eos = (completion_ids == eos_id).int()
    before = is_eos.cumsum(dim=1) - is_eos  # number of eos strictly before each position
    return (before == 0).float()


def masked_mean(x, mask, dim=None):
    """Mean of x over the positions where mask is 1 (all of them for dim=None); empty rows give 0.
    Positions outside the mask are selected away, not multiplied by 0 (inf * 0 would be nan)."""
    keep = mask.bool()
    x = torch.where(keep, x, 0.0)
    n = keep.sum(dim) if dim is not None else keep.sum()
    return (x.sum(dim) if dim is not None else x.sum()) / n.clamp(min=1)


def whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the masked positions (PPO's advantage normalisation); 0 outside the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# -----------------------------------------------------------------------------
# policy losses

def kl_k3(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || pi_ref) with samples from pi (Schulman 2020):
    k3 = exp(ref - logp) - (ref - logp) - 1  >= 0, = 0 where the two agree, unbiased in expectation.
    Its gradient wrt logp is 1 - exp(ref - logp)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def reduce_tokens(per_token, mask, token_mean: bool = False):
    """Per-token loss (B, T) -> scalar.

    token_mean=False (GRPO, DeepSeekMath; MiniMind): mean over each sequence's tokens, then over sequences
        L = 1/B sum_b 1/|o_b| sum_t l_bt      (every sequence weighs the same, long or short)
    token_mean=True (DAPO, CISPO in MiniMax-M1; PPO here): mean over all tokens of the batch
        L = sum_bt l_bt / sum_b |o_b|         (every token weighs the same)
    A sequence without tokens contributes 0 (and still counts in B)."""
    if token_mean:
        return masked_mean(per_token, mask)
    return masked_mean(per_token, mask, dim=1).mean()


def _advantages_per_token(advantages):
    return advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) broadcasts over T


def _log_ratio(logp, other, mask):
    """other - logp on the masked tokens, 0 elsewhere: whatever padding holds (say -1e4), exp() of it
    stays finite and so do the gradients (exp overflowing to inf would turn 0 * inf into nan)."""
    return torch.where(mask.bool(), other - logp, 0.0)


def _finish(per_token, logp, ratio, clipped, mask, ref_logp, beta, token_mean):
    """Add beta * k3 KL to the per-token loss, reduce, and collect the metrics."""
    m = mask.float()
    metrics = {"ratio": masked_mean(ratio.detach(), m), "clip_frac": masked_mean(clipped.float(), m)}
    if ref_logp is not None:
        d = _log_ratio(logp, ref_logp, mask)
        kl = torch.exp(d) - d - 1  # (B, T) k3, 0 outside the mask
        metrics["kl"] = masked_mean(kl.detach(), m)
        if beta:
            per_token = per_token + beta * kl
    elif beta:
        raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs)")
    loss = reduce_tokens(per_token, m, token_mean)
    metrics["loss"] = loss.detach()
    return loss, metrics


def grpo_loss(logp, old_logp, advantages, mask, *, ref_logp=None, beta: float = 0.0, eps: float = 0.2,
              eps_high: Optional[float] = None, token_mean: bool = False):
    """Clipped surrogate of PPO/GRPO, per token, plus beta * k3 KL to the reference:

        r = exp(logp - old_logp)
        l = -min(r * A, clip(r, 1 - eps, 1 + eps_high) * A) + beta * k3(logp, ref_logp)

    eps_high defaults to eps (symmetric); a larger one is DAPO's clip-higher. Reduced by
    `reduce_tokens` (sequence mean then batch mean; token_mean=True for DAPO / PPO).
    advantages: (B,) per sequence or (B, T) per token (PPO with GAE).
    Returns (loss, {"loss", "kl" (when ref_logp is given), "clip_frac", "ratio"}); clip_frac is
    the fraction of tokens whose ratio lies outside the clip range."""
    eps_high = eps if eps_high is None else eps_high
    A = _advantages_per_token(advantages)
    ratio = torch.exp(-_log_ratio(logp, old_logp, mask))  # exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1 - eps, 1 + eps_high)
    per_token = -torch.min(ratio * A, clipped_ratio * A)
    clipped = (ratio < 1 - eps) | (ratio > 1 + eps_high)
    return _finish(per_token, logp, ratio, clipped, mask, ref_logp, beta, token_mean)


def cispo_loss(logp, old_logp, advantages, mask, *, ref_logp=None, beta: float = 0.0,
               eps_low: Optional[float] = None, eps_high: float = 4.0, token_mean: bool = False):
    """CISPO (MiniMax-M1): clip the importance-sampling weight, not the update, so that every token
    keeps a gradient:

        w = sg(clip(r, 1 - eps_low, 1 + eps_high))      (sg = stop-gradient)
        l = -w * A * logp + beta * k3(logp, ref_logp)     =>  dl/dlogp = -w * A  (+ KL term)

    eps_low=None: no lower bound (as in the paper); eps_high=4.0 caps w at 5, MiniMind's default.
    The paper averages over all tokens (token_mean=True); the default here matches GRPO's
    sequence mean, as MiniMind does. Returns (loss, metrics) as grpo_loss."""
    A = _advantages_per_token(advantages)
    ratio = torch.exp(-_log_ratio(logp, old_logp, mask))  # exp(logp - old_logp)
    lo = None if eps_low is None else 1 - eps_low
    w = ratio.clamp(min=lo, max=1 + eps_high).detach()
    per_token = -w * A * logp
    clipped = ratio > 1 + eps_high
    if lo is not None:
        clipped = clipped | (ratio < lo)
    return _finish(per_token, logp, ratio, clipped, mask, ref_logp, beta, token_mean)


POLICY_LOSSES = {"grpo": grpo_loss, "cispo": cispo_loss}


# -----------------------------------------------------------------------------
# PPO: token rewards, GAE, value loss, early stop

def last_token_rewards(rewards, mask):
    """Sequence rewards (B,) -> (B, T) token rewards: each reward on the last masked token of its row
    (the eos), 0 elsewhere, as PPO for LLMs places the outcome reward. Empty rows get none."""
    m = mask.long()
    last = (m.cumsum(dim=1) == m.sum(dim=1, keepdim=True)) & m.bool()  # (B, T) True once per row
    return last.float() * rewards.float()[:, None]


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman 2015) over the masked steps of each row:

        delta_t = r_t + gamma * V_next - V_t,     A_t = delta_t + gamma * lam * A_next,   R_t = A_t + V_t

    where "next" is the next step with mask 1 (steps with mask 0 - padding, tool responses - are
    skipped, not counted as time steps) and V after the last step is 0. rewards, values, mask: (B, T).
    Returns (advantages, returns), both (B, T) and 0 outside the mask. A reverse loop over T on (B,)
    tensors: T small steps, no host sync."""
    rewards, values = rewards.float(), values.float()
    m = mask.bool()
    B, T = rewards.shape
    next_value = torch.zeros(B, device=rewards.device)
    next_adv = torch.zeros(B, device=rewards.device)
    adv = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        keep = m[:, t]
        adv[:, t] = torch.where(keep, a, torch.zeros_like(a))
        next_adv = torch.where(keep, a, next_adv)
        next_value = torch.where(keep, values[:, t], next_value)
    returns = (adv + values) * m
    return adv, returns


def value_loss(values, old_values, returns, mask, clip: Optional[float] = 0.2):
    """PPO's clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), the mean
    over masked tokens (c = clip; None: the plain squared error)."""
    loss = (values - returns) ** 2
    if clip is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.max(loss, (v_clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


def approx_kl(logp, old_logp, mask):
    """k3 estimate of KL(pi_old || pi) over masked tokens (samples come from pi_old):
    mean of exp(logp - old) - (logp - old) - 1. Detached: it is a diagnostic / early-stop signal."""
    d = _log_ratio(old_logp.detach(), logp.detach(), mask)
    return masked_mean(torch.exp(d) - d - 1, mask)


def kl_early_stop(kl, target_kl: Optional[float], factor: float = 1.5) -> bool:
    """Stop the PPO epochs of this rollout once approx KL > factor * target_kl (target None: never).
    Under DDP all-reduce `kl` first so that every rank stops together. (One host sync.)"""
    if target_kl is None:
        return False
    return float(kl) > factor * target_kl
