"""Reinforcement learning pieces for minimind: GRPO / CISPO / PPO losses, rewards, a tool sandbox, a
generator of verifiable tasks, and rollouts on the model's own batched decoder. Pure functions and small
classes; the training loop lives elsewhere (train.py --mode=grpo|ppo, the objective in losses.py).

    import rl
    ro = rl.rollout(model, tok, prompt_ids, 256, generator=g, tools=rl.TOOLS, max_turns=3)  # episodes
    adv = rl.group_advantages(rewards, G)                       # (P*G,)
    logp = rl.completion_logprobs(model, prompt, completion, mask, pad)  # (B, T) fp32
    loss, metrics = rl.grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.1)
    specs = rl.parse_reward_specs("exact:1.0 think:0.2 repetition:1.0")
    rewards, parts = rl.compute_rewards(specs, prompts, completions, records, group_size=G)

Conventions (B = sequences, T = completion positions, P = prompts, G = samples per prompt):
- per-token tensors are (B, T) and aligned: logp[b, t] is log pi(token t of completion b | prefix);
  `mask` (B, T) is 1 on tokens that are trained on (the completion up to and including its eos;
  0 on padding and, in agentic rollouts, on tool responses the model did not write)
- advantages are (B,) (one per sequence: GRPO) or (B, T) (per token: PPO)
- every loss returns (scalar loss, metrics dict of detached 0-dim tensors): no host sync inside
- a reward function is `fn(prompt_messages, completion_text, record) -> float`; `record` is the
  RLAIF record the prompt came from (its "answer" is the reference of verifiable tasks)

RLAIF records (MiniMind's format): {"conversations": [{"role", "content"}, ...]} whose last message is
an assistant turn that MiniMind's RLAIFDataset drops (`conversations[:-1]`) - its rlaif-mini.jsonl puts
a placeholder there. `prompt_messages(record)` returns the prompt either way (a record may also end
in the user turn). The built-in tasks add "answer" (reference, a string), "kind", "lang", and for
tool tasks "tools" (function schemas) and "gt" ([answer], as MiniMind's AgentRLDataset reads it).

Tool calls use the MiniMind-3 / Qwen format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
in the assistant text; results go back as a user turn `<tool_response>\\n...\\n</tool_response>` (what
MiniMind-3's chat template renders a "tool" message as). Tools are pure Python over their arguments:
the calculator walks the `ast` of the expression and never calls eval/exec.
"""
import ast
import functools
import hashlib
import importlib
import json
import math
import operator
import random
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from tokenizer import CHAT_TEMPLATE, render_chat


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


def token_logprobs(logits, targets, mask=None):
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


def completion_logprobs(model, prompt, completion, mask=None, pad=None, hidden: bool = False):
    """log pi(completion token | prompt, earlier completion tokens), (B, R) fp32, in one forward pass of a
    MiniMind-like model (`model(idx, pos=, doc=) -> (logits, loss)`).
    hidden=True also returns the final hidden states at the same positions, (B, R, C): the state each
    completion token is predicted from, what a value head reads (`model(..., return_hidden=True)`).

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
    if hidden:
        logits, _, h = model(ids, return_hidden=True, **kw)  # (B, P+R-1, V), (B, P+R-1, C)
        return token_logprobs(logits[:, P - 1:], completion, mask), h[:, P - 1:]
    logits, _ = model(ids, **kw)  # (B, P+R-1, V)
    return token_logprobs(logits[:, P - 1:], completion, mask)  # (B, R)


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


# -----------------------------------------------------------------------------
# text of completions: think blocks, answers, numbers

THINK_END = "</think>"
_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[-+]?\d+(?:\.\d+)?")


def split_think(text: str):
    """(think, answer) of a completion: the text before the first `</think>` (without `<think>`) and the
    text after it; ("", text) without a think block."""
    if THINK_END not in text:
        return "", text
    think, answer = text.split(THINK_END, 1)
    return think.replace("<think>", "").strip(), answer.strip()


def _normalize(text: str) -> str:
    """NFKC (full-width digits and colons to ASCII), unicode minus to '-'."""
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-")


_MARKERS = [
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"(?:最终答案|答案|结果)\s*(?:是|为)?\s*:?\s*([^\n]+)"),
    re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]+)", re.IGNORECASE),
]


def extract_answer(text: str) -> str:
    """The final answer in a completion: the answer part (after `</think>`), then the last
    `\\boxed{X}`, else the last "答案：X" / "答案是X" / "the answer is X" / "Answer: X", else the last
    non-empty line; stripped of surrounding markup and end punctuation."""
    _, answer = split_think(_normalize(text))
    for pattern in _MARKERS:
        found = pattern.findall(answer)
        if found:
            return _strip_answer(found[-1])
    lines = [line for line in answer.splitlines() if line.strip()]
    return _strip_answer(lines[-1]) if lines else ""


def _strip_answer(s: str) -> str:
    return s.strip(" \t*$`。.!！,，;；")


def last_number(text: str) -> Optional[float]:
    """The last number in a text ("1,234" and "-3.5" included), or None."""
    found = _NUMBER.findall(_normalize(text))
    return float(found[-1].replace(",", "")) if found else None


def answers_match(answer: str, reference: str) -> bool:
    """Does an extracted answer match the reference? Numeric references compare the last number of the
    answer (relative tolerance 1e-6); others compare case- and punctuation-insensitively, also accepting
    an answer that ends with the reference ("The capital is Paris", "首都是巴黎")."""
    ref_num = last_number(reference) if _NUMBER.fullmatch(_normalize(reference).strip()) else None
    if ref_num is not None:
        got = last_number(answer)
        return got is not None and abs(got - ref_num) <= 1e-6 * max(1.0, abs(ref_num))
    a, r = _canon(answer), _canon(reference)
    if not r:
        return False
    if a == r:
        return True
    # ends with the reference, at a word boundary for ASCII words
    return a.endswith(r) and not (r[0].isascii() and r[0].isalnum() and a[-len(r) - 1].isascii()
                                  and a[-len(r) - 1].isalnum())


def _canon(s: str) -> str:
    s = _normalize(s).casefold().strip()
    s = re.sub(r"\s+", " ", s)
    return s.strip(" *$`\"'“”‘’。.!！,，;；:")


# -----------------------------------------------------------------------------
# rewards: fn(prompt_messages, completion, record) -> float

def reward_length(prompt, completion: str, record=None, lo: int = 20, hi: int = 800, inside: float = 0.5,
                  outside: float = -0.5) -> float:
    """`inside` when the completion has lo..hi characters (stripped), else `outside` (MiniMind: 20..800, +-0.5)."""
    return inside if lo <= len(completion.strip()) <= hi else outside


def reward_think(prompt, completion: str, record=None, lo: int = 20, hi: int = 300) -> float:
    """Think format, in [-1, 1]: 0 without a `</think>` (thinking is optional); with one, +0.5 for exactly
    one `</think>` (-0.5 for several) and +0.5 when the think text has lo..hi characters (-0.5 otherwise)."""
    n = completion.count(THINK_END)
    if n == 0:
        return 0.0
    think, _ = split_think(completion)
    return (0.5 if n == 1 else -0.5) + (0.5 if lo <= len(think) <= hi else -0.5)


_CJK = "\u3400-\u9fff\uf900-\ufaff"
_TOKENS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")


def repetition_penalty(text: str, n: int = 3, cap: float = 0.5) -> float:
    """Share of repeated n-grams, scaled: min(cap, 2 * cap * repeated / total) in [0, cap] (MiniMind's
    rule). Tokens are words, single CJK characters and punctuation marks, lowercased."""
    toks = _TOKENS.findall(text.lower())
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    if not grams:
        return 0.0
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams))


def reward_repetition(prompt, completion: str, record=None, n: int = 3, cap: float = 0.5) -> float:
    """-repetition_penalty of the answer part (after `</think>`): 0 for no repeated n-grams, down to -cap."""
    return -repetition_penalty(split_think(completion)[1], n, cap)


def reward_exact(prompt, completion: str, record=None) -> float:
    """1.0 when the completion's final answer (`extract_answer`) matches record["answer"]
    (`answers_match`: numbers numerically), else 0.0. Records without an answer give 0.0."""
    reference = (record or {}).get("answer")
    if reference is None or reference == "":
        return 0.0
    return 1.0 if answers_match(extract_answer(completion), str(reference)) else 0.0


def reward_tool_calls(prompt, completion: str, record=None) -> float:
    """Validity of the tool calls of the answer part, in [-1, 1]: -1 when `<tool_call>` / `</tool_call>`
    tags do not pair up, 0 without calls (-1 when the record has "gt", the results MiniMind's agent
    records expect tool calls to produce: a call was due, and saying nothing must not pay more than
    trying), else the mean over calls of +1 (valid) / -1 (invalid).
    Valid: the block is a JSON object {"name": str, "arguments": object} naming a known tool with
    arguments that fit its schema. Known tools: record["tools"] (function schemas) when present,
    else the built-in TOOLS."""
    answer = split_think(completion)[1]
    if answer.count(TOOL_CALL_START) != answer.count(TOOL_CALL_END):
        return -1.0
    blocks = find_tool_calls(answer)
    if not blocks:
        return -1.0 if (record or {}).get("gt") else 0.0
    schemas = _schemas_of(record)
    scores = [1.0 if check_tool_call(b, schemas)[1] is None else -1.0 for b in blocks]
    return sum(scores) / len(scores)


REWARDS = {
    "length": reward_length,
    "think": reward_think,
    "repetition": reward_repetition,
    "exact": reward_exact,
    "tool": reward_tool_calls,
}


def _parse_scalar(s: str):
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(s.lower(), s)


_SPEC = re.compile(r"^(?P<name>[^\[\]]+?)(?:\[(?P<kw>[^\]]*)\])?$")


def parse_reward_specs(spec: str, registry: dict = None) -> list:
    """"exact:1.0 length[lo=5,hi=200]:0.1 mymod:myfn mypkg.mod:fn:0.5" -> [(name, weight, fn), ...].

    Items are separated by whitespace: NAME[k=v,...]:WEIGHT, with the weight (a number after the last
    colon) 1.0 when left out. NAME is a built-in reward (REWARDS, or `registry`) or `module:function`,
    imported here (the module must be importable: on sys.path). [k=v,...] are keyword arguments:
    bound with functools.partial, or passed to the constructor when NAME is a class (e.g. a
    RewardModel: `rm[path=out/rm]:1.0` with registry={"rm": RewardModel}). Raises ValueError."""
    registry = {**REWARDS, **(registry or {})}
    out = []
    for item in spec.split():
        head, _, last = item.rpartition(":")
        try:
            weight, body = float(last), head
        except ValueError:
            weight, body = 1.0, item
        m = _SPEC.match(body)
        if not body or not m:
            raise ValueError(f"reward spec {item!r}: expected NAME[k=v,...]:WEIGHT")
        name, kw = m.group("name"), m.group("kw")
        kwargs = {}
        for pair in filter(None, (kw or "").split(",")):
            k, eq, v = pair.partition("=")
            if not eq or not k.strip():
                raise ValueError(f"reward spec {item!r}: bad keyword argument {pair!r} (expected k=v)")
            kwargs[k.strip()] = _parse_scalar(v.strip())
        out.append((name, weight, _build_reward(name, kwargs, registry, item)))
    return out


def _build_reward(name: str, kwargs: dict, registry: dict, item: str):
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward spec {item!r}: cannot load {name} ({e})") from None
    elif name in registry:
        obj = registry[name]
    else:
        raise ValueError(f"reward spec {item!r}: unknown reward {name!r} (built-in: {', '.join(sorted(registry))}; "
                         f"or module:function)")
    if isinstance(obj, type):
        obj = obj(**kwargs)
    elif kwargs:
        obj = functools.partial(obj, **kwargs)
    if not callable(obj):
        raise ValueError(f"reward spec {item!r}: {name} is not callable")
    return obj


def compute_rewards(specs: list, prompts: list, completions: list, records: list, group_size: int = 1):
    """Weighted sum of the reward functions for each completion. Completion i answers prompts[i // G]
    (prompt messages) and records[i // G], G = group_size. Returns (rewards (N,) fp32 tensor,
    {name: (N,) unweighted values} for logging)."""
    parts = {}
    for name, _, fn in specs:
        parts[name] = torch.tensor([float(fn(prompts[i // group_size], c, records[i // group_size]))
                                    for i, c in enumerate(completions)], dtype=torch.float32)
    total = torch.zeros(len(completions))
    for name, weight, _ in specs:
        total += weight * parts[name]
    return total, parts


class RewardModel:
    """A local transformers sequence-classification model (num_labels=1) as a reward function:
    score = the logit of the conversation prompt + [assistant: completion], rendered with the
    tokenizer's chat template (ChatML when it has none), left-truncated to max_length tokens,
    clipped to [-clip, clip] (MiniMind clips reward-model scores to [-3, 3]; None: no clip).

        rm = RewardModel("path/to/rm")
        rm(prompt_messages, completion, record) -> float"""

    def __init__(self, path, device: str = "cpu", dtype: torch.dtype = torch.float32, max_length: int = 1024,
                 clip: Optional[float] = 3.0):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.tokenizer.truncation_side = "left"  # keep the completion, drop the oldest context
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).to(device=device, dtype=dtype).eval()
        self.device, self.max_length, self.clip = device, max_length, clip

    def render(self, prompt_messages: list, completion: str) -> str:
        messages = list(prompt_messages) + [{"role": "assistant", "content": completion}]
        template = None if getattr(self.tokenizer, "chat_template", None) else CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)

    @torch.no_grad()
    def score(self, prompt_messages: list, completion: str) -> float:
        enc = self.tokenizer(self.render(prompt_messages, completion), add_special_tokens=False, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        logit = float(self.model(input_ids=enc["input_ids"].to(self.device)).logits[0, 0].float())
        return logit if self.clip is None else max(-self.clip, min(self.clip, logit))

    def __call__(self, prompt_messages: list, completion: str, record=None) -> float:
        return self.score(prompt_messages, completion)


# -----------------------------------------------------------------------------
# tool sandbox

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
MAX_TOOL_OUTPUT = 2048  # characters of a tool response given back to the model


class ToolError(Exception):
    """A refused or failed tool call; its message goes back to the model."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object: {"type": "object", "properties", "required"}
    fn: Callable = field(repr=False)

    def schema(self) -> dict:
        """The OpenAI / MiniMind function schema of this tool."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def _params(required: list, **props) -> dict:
    return {"type": "object", "properties": props, "required": required}


# calculator: arithmetic over the ast, never eval

MAX_EXPR_LEN = 200
MAX_EXPONENT = 100
MAX_MAGNITUDE = 10 ** 100  # any intermediate result beyond this is refused (bounds time and memory)
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARYOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def format_number(x) -> str:
    """12 -> "12", 3.0 -> "3", 0.1 + 0.2 -> "0.3" (12 significant digits)."""
    if isinstance(x, int):
        return str(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.12g}"


def _check_magnitude(x):
    if isinstance(x, complex):
        raise ToolError("complex result (fractional power of a negative number)")
    if (isinstance(x, float) and math.isnan(x)) or abs(x) > MAX_MAGNITUDE:
        raise ToolError(f"result out of range (magnitude above 1e{len(str(MAX_MAGNITUDE)) - 1})")
    return x


def _eval_node(node):
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise ToolError(f"only numbers are allowed, not {type(node.value).__name__} constants")
        return _check_magnitude(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
        return _UNARYOPS[type(node.op)](_eval_node(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent too large (at most {MAX_EXPONENT})")
        try:
            return _check_magnitude(_BINOPS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("result out of range") from None
    raise ToolError(f"unsupported expression: {type(node).__name__} (only numbers, + - * / // % ** and parentheses)")


def calculator(expression: str) -> str:
    """Evaluate arithmetic: numbers, + - * / // % ** (or ^), unary +/-, parentheses; × ÷ and full-width
    brackets accepted. Anything else - names, calls, attributes, strings, lambdas - raises ToolError,
    as do expressions over MAX_EXPR_LEN characters, exponents over MAX_EXPONENT and results beyond
    MAX_MAGNITUDE. The expression is parsed with `ast` and walked here; nothing is executed."""
    if not isinstance(expression, str):
        raise ToolError("expression must be a string")
    if len(expression) > MAX_EXPR_LEN:
        raise ToolError(f"expression too long (at most {MAX_EXPR_LEN} characters)")
    expr = (_normalize(expression).replace("×", "*").replace("÷", "/").replace("^", "**"))
    try:
        with warnings.catch_warnings():  # "3d4" from a sampled call: a SyntaxWarning on stderr, then the error
            warnings.simplefilter("ignore")
            tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError("not an arithmetic expression") from None
    try:
        return format_number(_eval_node(tree))
    except RecursionError:
        raise ToolError("expression too deeply nested") from None


# unit conversion: value * scale + offset = base unit (m, g, s, K)

_UNITS = {}


def _unit(dim: str, scale: float, offset: float, *names):
    for n in names:
        _UNITS[n] = (dim, scale, offset)


_unit("length", 1e-3, 0, "mm", "millimeter", "millimeters", "毫米")
_unit("length", 1e-2, 0, "cm", "centimeter", "centimeters", "厘米")
_unit("length", 1e-1, 0, "dm", "decimeter", "decimeters", "分米")
_unit("length", 1.0, 0, "m", "meter", "meters", "metre", "metres", "米")
_unit("length", 1e3, 0, "km", "kilometer", "kilometers", "千米", "公里")
_unit("length", 0.0254, 0, "in", "inch", "inches", "英寸")
_unit("length", 0.3048, 0, "ft", "foot", "feet", "英尺")
_unit("length", 0.9144, 0, "yd", "yard", "yards", "码")
_unit("length", 1609.344, 0, "mi", "mile", "miles", "英里")
_unit("mass", 1e-3, 0, "mg", "milligram", "milligrams", "毫克")
_unit("mass", 1.0, 0, "g", "gram", "grams", "克")
_unit("mass", 1e3, 0, "kg", "kilogram", "kilograms", "千克", "公斤")
_unit("mass", 1e6, 0, "t", "ton", "tons", "tonne", "tonnes", "吨")
_unit("mass", 500.0, 0, "斤")
_unit("mass", 453.59237, 0, "lb", "lbs", "pound", "pounds", "磅")
_unit("mass", 28.349523125, 0, "oz", "ounce", "ounces", "盎司")
_unit("time", 1e-3, 0, "ms", "millisecond", "milliseconds", "毫秒")
_unit("time", 1.0, 0, "s", "sec", "second", "seconds", "秒")
_unit("time", 60.0, 0, "min", "minute", "minutes", "分钟")
_unit("time", 3600.0, 0, "h", "hr", "hour", "hours", "小时")
_unit("time", 86400.0, 0, "d", "day", "days", "天")
_unit("time", 604800.0, 0, "week", "weeks", "周", "星期")
_unit("temperature", 1.0, 273.15, "c", "°c", "celsius", "摄氏度")
_unit("temperature", 5 / 9, 273.15 - 32 * 5 / 9, "f", "°f", "fahrenheit", "华氏度")
_unit("temperature", 1.0, 0.0, "k", "kelvin", "开尔文")


def unit_convert(value, from_unit: str, to_unit: str) -> str:
    """Convert a value between units of length, mass, time or temperature (English names and symbols,
    Chinese names). Raises ToolError for unknown units or mismatched dimensions."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ToolError(f"value must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ToolError("value must be a finite number")
    units = []
    for u in (from_unit, to_unit):
        key = str(u).strip().lower()
        if key not in _UNITS:
            raise ToolError(f"unknown unit {u!r}")
        units.append(_UNITS[key])
    (dim_a, scale_a, off_a), (dim_b, scale_b, off_b) = units
    if dim_a != dim_b:
        raise ToolError(f"cannot convert {dim_a} ({from_unit}) to {dim_b} ({to_unit})")
    base = value * scale_a + off_a
    return format_number(float(f"{(base - off_b) / scale_b:.10g}"))


# lookup: a small fixed table

CAPITALS = [  # (country en, country zh, capital en, capital zh)
    ("China", "中国", "Beijing", "北京"), ("Japan", "日本", "Tokyo", "东京"), ("France", "法国", "Paris", "巴黎"),
    ("Germany", "德国", "Berlin", "柏林"), ("United Kingdom", "英国", "London", "伦敦"),
    ("Italy", "意大利", "Rome", "罗马"), ("Spain", "西班牙", "Madrid", "马德里"),
    ("Russia", "俄罗斯", "Moscow", "莫斯科"), ("Canada", "加拿大", "Ottawa", "渥太华"),
    ("Australia", "澳大利亚", "Canberra", "堪培拉"), ("Egypt", "埃及", "Cairo", "开罗"),
    ("India", "印度", "New Delhi", "新德里"), ("South Korea", "韩国", "Seoul", "首尔"),
    ("Thailand", "泰国", "Bangkok", "曼谷"), ("Greece", "希腊", "Athens", "雅典"),
    ("Brazil", "巴西", "Brasilia", "巴西利亚"),
]
ELEMENTS = [  # (name en, name zh, symbol)
    ("hydrogen", "氢", "H"), ("helium", "氦", "He"), ("carbon", "碳", "C"), ("nitrogen", "氮", "N"),
    ("oxygen", "氧", "O"), ("sodium", "钠", "Na"), ("magnesium", "镁", "Mg"), ("aluminium", "铝", "Al"),
    ("silicon", "硅", "Si"), ("sulfur", "硫", "S"), ("chlorine", "氯", "Cl"), ("potassium", "钾", "K"),
    ("calcium", "钙", "Ca"), ("iron", "铁", "Fe"), ("copper", "铜", "Cu"), ("zinc", "锌", "Zn"),
    ("silver", "银", "Ag"), ("gold", "金", "Au"),
]
_LOOKUP = {**{en.lower(): cap for en, _, cap, _ in CAPITALS}, **{zh: cap_zh for _, zh, _, cap_zh in CAPITALS},
           **{en: sym for en, _, sym in ELEMENTS}, **{zh: sym for _, zh, sym in ELEMENTS}}


def lookup(key: str) -> str:
    """The capital of a country or the symbol of a chemical element, by English or Chinese name."""
    k = str(key).strip()
    k = k if k in _LOOKUP else k.lower()
    if k not in _LOOKUP:
        raise ToolError(f"no entry for {key!r}")
    return _LOOKUP[k]


TOOLS = {t.name: t for t in [
    Tool("calculator", "Evaluate an arithmetic expression (+ - * / // % ** and parentheses)",
         _params(["expression"], expression={"type": "string", "description": "e.g. (3 + 4) * 12"}), calculator),
    Tool("unit_convert", "Convert a value between units of length, mass, time or temperature",
         _params(["value", "from_unit", "to_unit"], value={"type": "number"},
                 from_unit={"type": "string", "description": "e.g. km, kg, hour, celsius"},
                 to_unit={"type": "string"}), unit_convert),
    Tool("lookup", "Look up the capital of a country or the symbol of a chemical element",
         _params(["key"], key={"type": "string", "description": "a country or an element, e.g. France, iron"}),
         lookup),
]}

_JSON_TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,),
               "object": (dict,), "array": (list,)}


def validate_arguments(arguments, parameters: dict) -> Optional[str]:
    """Check a tool call's arguments against its JSON schema (object with properties, required, types).
    Returns an error message, or None when they fit. Unknown argument names are errors."""
    if not isinstance(arguments, dict):
        return "arguments must be a JSON object"
    props = parameters.get("properties", {})
    missing = [k for k in parameters.get("required", []) if k not in arguments]
    if missing:
        return f"missing argument(s): {', '.join(missing)}"
    for k, v in arguments.items():
        if k not in props:
            return f"unknown argument {k!r} (expected: {', '.join(props)})"
        types = _JSON_TYPES.get(props[k].get("type"))
        if types and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            return f"argument {k!r} must be a {props[k]['type']}"
    return None


def find_tool_calls(text: str) -> list:
    """The contents of every <tool_call>...</tool_call> block in a text, in order."""
    return [m.strip() for m in _TOOL_CALL.findall(text)]


def _schemas_of(record) -> dict:
    """name -> parameters schema of the tools a record offers (record["tools"]), else of TOOLS."""
    tools = (record or {}).get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools)
    if not tools:
        return {name: t.parameters for name, t in TOOLS.items()}
    out = {}
    for t in tools:
        f = t.get("function", t)
        out[f["name"]] = f.get("parameters", {})
    return out


def check_tool_call(block: str, schemas: dict):
    """Parse one tool-call block (its JSON, with or without the tags) against `schemas` (name ->
    parameters). Returns (call dict or None, error message or None)."""
    inner = find_tool_calls(block)
    text = inner[0] if inner else block.strip()
    try:
        call = json.loads(text)
    except ValueError as e:
        return None, f"tool call is not valid JSON ({e.msg})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        return None, 'tool call must be {"name": "...", "arguments": {...}}'
    if set(call) - {"name", "arguments"}:
        return None, f"unexpected key(s) in tool call: {', '.join(sorted(set(call) - {'name', 'arguments'}))}"
    if call["name"] not in schemas:
        return None, f"unknown tool {call['name']!r} (available: {', '.join(schemas)})"
    error = validate_arguments(call["arguments"], schemas[call["name"]])
    return (call, None) if error is None else (None, error)


def run_tool_call(block: str, registry: dict = None) -> str:
    """Execute one tool call (the JSON of a <tool_call> block, tags optional) with a registry of Tools
    (default TOOLS). Returns the response text for the model: {"result": ...} or {"error": ...} as
    JSON; refusals and failures are responses, never exceptions. At most MAX_TOOL_OUTPUT characters."""
    registry = TOOLS if registry is None else registry
    call, error = check_tool_call(block, {name: t.parameters for name, t in registry.items()})
    if error is None:
        try:
            out = {"result": registry[call["name"]].fn(**call["arguments"])}
        except ToolError as e:
            out = {"error": str(e)}
        except Exception as e:  # a tool's own bug: report it to the model, do not kill the rollout
            out = {"error": f"{call['name']} failed: {type(e).__name__}"}
    else:
        out = {"error": error}
    return json.dumps(out, ensure_ascii=False)[:MAX_TOOL_OUTPUT]


def tool_response_message(assistant_text: str, registry: dict = None) -> Optional[dict]:
    """The next turn of an agentic rollout: run every tool call of the assistant turn (answer part) and
    return them as one user message of <tool_response> blocks (how MiniMind-3's chat template renders
    "tool" messages), or None when the turn calls no tool (the episode ends)."""
    blocks = find_tool_calls(split_think(assistant_text)[1])
    if not blocks:
        return None
    body = "\n".join(f"<tool_response>\n{run_tool_call(b, registry)}\n</tool_response>" for b in blocks)
    return {"role": "user", "content": body}


def _tool_line(f: dict) -> str:
    args = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in f.get("parameters", {}).get("properties", {}).items())
    return f"{f['name']}({args}): {f.get('description', '')}"


def tools_system_prompt(schemas: list, lang: str = "en", compact: bool = False) -> str:
    """A system message offering tools (Qwen / MiniMind-3 wording): the schemas as JSON lines in
    <tools></tools>, the <tool_call> format, and how to give the final answer. compact=True lists each
    tool as one line `name(argument: type, ...): description` instead of its JSON schema: half the text,
    for small models whose context (or compute) the full listing crowds."""
    if compact:
        listing = "\n".join(_tool_line(t.get("function", t)) for t in schemas)
    else:
        listing = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    if lang == "zh":
        return ("你可以调用工具来帮助回答。可用工具的函数签名在 <tools></tools> 中：\n<tools>\n" + listing + "\n</tools>\n\n"
                '调用工具时，在 <tool_call></tool_call> 中写一个 JSON 对象：\n<tool_call>\n'
                '{"name": <函数名>, "arguments": <参数对象>}\n</tool_call>\n工具结果会放在 <tool_response> 中返回。'
                "最后用“答案：X”给出答案。")
    return ("You may call tools to help answer. Function signatures are within <tools></tools>:\n<tools>\n" + listing
            + "\n</tools>\n\nTo call a tool, write a JSON object within <tool_call></tool_call> tags:\n<tool_call>\n"
              '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n'
              "Results come back within <tool_response></tool_response>. "
              "Finish with \"The answer is X.\"")


# -----------------------------------------------------------------------------
# verifiable tasks (RLAIF records with a reference answer)

def prompt_messages(record: dict) -> list:
    """The prompt of an RLAIF record: its conversation without a trailing assistant turn (MiniMind's
    records end with one, a placeholder or the reference, that RLAIFDataset drops)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in record["conversations"]]
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError("an RLAIF record's conversation must end with a user turn (before an optional assistant turn)")
    return msgs


def _answer_text(answer: str, lang: str) -> str:
    return f"答案：{answer}" if lang == "zh" else f"The answer is {answer}."


_NAMES_ZH = ["小明", "小红", "小刚", "小丽", "老王"]
_NAMES_EN = ["Tom", "Amy", "Ben", "Lily", "Sam"]
_ITEMS = [("苹果", "apples"), ("本书", "books"), ("支铅笔", "pencils"), ("颗糖", "candies")]


def _task_arith(rng, lang):
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        if op == "-" and b > a:
            a, b = b, a
    ans = {"+": a + b, "-": a - b, "*": a * b}[op]
    sym = {"+": "+", "-": "-", "*": "×"}[op]
    q = rng.choice([f"计算：{a} {sym} {b} = ?", f"{a} {sym} {b} 等于多少？", f"请算出 {a} {sym} {b} 的结果。"] if lang == "zh" else
                   [f"What is {a} {sym} {b}?", f"Compute {a} {sym} {b}.", f"Calculate: {a} {sym} {b} = ?"])
    return ("arith", op, a, b), q, str(ans)


def _task_add(rng, lang):
    """Single-digit addition: 100 problems, answers of one or two digits - easy enough for a model of a
    few million parameters to get partly right after a short SFT, so that RL has a signal to start from."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    q = rng.choice([f"{a} + {b} = ?", f"{a} 加 {b} 等于多少？"] if lang == "zh" else [f"What is {a} + {b}?", f"{a} + {b} = ?"])
    return ("add", a, b), q, str(a + b)


def _task_max(rng, lang):
    """The largest of three digits: 1000 problems whose rule (attend to the largest digit, copy it) a tiny
    transformer learns in general - unlike addition facts, which it memorizes - so that what RL improves
    on the training prompts carries over to held-out ones."""
    d = [rng.randint(0, 9) for _ in range(3)]
    q = rng.choice([f"{d[0]}、{d[1]}、{d[2]} 中最大的数是几？", f"在 {d[0]}、{d[1]}、{d[2]} 中，哪个数最大？"] if lang == "zh" else
                   [f"Which is the largest: {d[0]}, {d[1]}, {d[2]}?", f"What is the largest of {d[0]}, {d[1]} and {d[2]}?"])
    return ("max", *d), q, str(max(d))


def _task_story(rng, lang):
    i, n = rng.randrange(len(_NAMES_EN)), rng.randrange(len(_ITEMS))
    a, b = rng.randint(2, 20), rng.randint(1, 10)
    gain = rng.random() < 0.5 or b > a
    ans = a + b if gain else a - b
    item_zh, item_en = _ITEMS[n]
    who_zh, who_en = _NAMES_ZH[i], _NAMES_EN[i]
    if lang == "zh":
        unit = item_zh if item_zh[0] in "本支颗" else "个" + item_zh
        q = (f"{who_zh}有 {a} {unit}，又得到了 {b} {unit[0]}。现在一共有几{unit[0]}？" if gain else
             f"{who_zh}有 {a} {unit}，给了别人 {b} {unit[0]}。还剩几{unit[0]}？")
    else:
        q = (f"{who_en} has {a} {item_en} and gets {b} more. How many {item_en} does {who_en} have now?" if gain else
             f"{who_en} has {a} {item_en} and gives away {b}. How many {item_en} are left?")
    return ("story", gain, a, b), q, str(ans)


def _task_count(rng, lang):
    letters = rng.sample("abcdefgh", 3)
    s = "".join(rng.choice(letters) for _ in range(rng.randint(4, 9)))
    c = rng.choice(letters)
    q = (f"字符串“{s}”中有几个字母 {c}？" if lang == "zh" else f'How many times does the letter "{c}" appear in "{s}"?')
    return ("count", s, c), q, str(s.count(c))


_SIMPLE_UNITS = [  # (from zh, from en, to zh, to en, factor)
    ("千米", "kilometers", "米", "meters", 1000), ("米", "meters", "厘米", "centimeters", 100),
    ("千克", "kilograms", "克", "grams", 1000), ("小时", "hours", "分钟", "minutes", 60),
    ("分钟", "minutes", "秒", "seconds", 60), ("天", "days", "小时", "hours", 24), ("周", "weeks", "天", "days", 7),
]


def _task_unit(rng, lang):
    k = rng.randrange(len(_SIMPLE_UNITS))
    fz, fe, tz, te, factor = _SIMPLE_UNITS[k]
    v = rng.randint(1, 9)
    q = f"{v} {fz}等于多少{tz}？" if lang == "zh" else f"How many {te} are in {v} {fe}?"
    return ("unit", k, v), q, str(v * factor)


def _task_calc_tool(rng, lang):
    if rng.random() < 0.5:
        a, b = rng.randint(100, 999), rng.randint(11, 99)
        expr, ans = f"{a} × {b}", a * b
    else:
        a, b, c = rng.randint(100, 999), rng.randint(100, 999), rng.randint(3, 19)
        expr, ans = f"({a} + {b}) × {c}", (a + b) * c
    q = f"请用计算器算出 {expr} 的值。" if lang == "zh" else f"Use the calculator to compute {expr}."
    return ("calc_tool", expr), q, str(ans)


# integer conversions too large to do in one's head:
# (from zh, from en, to zh, to en, unit_convert from_unit, to_unit, factor)
_TOOL_UNITS = [
    ("天", "days", "秒", "seconds", "day", "s", 86400), ("周", "weeks", "分钟", "minutes", "week", "min", 10080),
    ("吨", "tons", "克", "grams", "t", "g", 1000000), ("千米", "kilometers", "毫米", "millimeters", "km", "mm", 1000000),
]


def _task_unit_tool(rng, lang):
    k = rng.randrange(len(_TOOL_UNITS))
    fz, fe, tz, te, _, _, factor = _TOOL_UNITS[k]
    v = rng.randint(2, 99)
    q = (f"用单位换算工具算一下：{v} {fz}是多少{tz}？" if lang == "zh" else
         f"Use the unit converter: how many {te} are in {v} {fe}?")
    return ("unit_tool", k, v), q, str(v * factor)


def _task_lookup_tool(rng, lang):
    if rng.random() < 0.5:
        en, zh, cap_en, cap_zh = rng.choice(CAPITALS)
        q = f"查一下{zh}的首都是哪座城市？" if lang == "zh" else f"Look up the capital of {en}."
        return ("capital", en), q, cap_zh if lang == "zh" else cap_en
    en, zh, sym = rng.choice(ELEMENTS)
    q = f"查一下元素{zh}的化学符号。" if lang == "zh" else f"Look up the chemical symbol of {en}."
    return ("element", en), q, sym


TASKS = {"add": _task_add, "max": _task_max, "arith": _task_arith, "story": _task_story, "count": _task_count, "unit": _task_unit,
         "calc_tool": _task_calc_tool, "unit_tool": _task_unit_tool, "lookup_tool": _task_lookup_tool}
TOOL_TASKS = {"calc_tool", "unit_tool", "lookup_tool"}


def make_task(rng: random.Random, lang: Optional[str] = None, kinds=None, compact_tools: bool = False) -> dict:
    """One verifiable problem as an RLAIF record:

        {"conversations": [({"role": "system", ...},) {"role": "user", ...}, {"role": "assistant", ...}],
         "answer": "42", "kind": "arith", "lang": "en", "key": "...",
         ("tools": [schemas], "gt": ["42"])}                      # tool tasks

    The trailing assistant turn is the reference answer in the format `extract_answer` reads
    ("答案：42" / "The answer is 42."): MiniMind's RLAIFDataset drops it, prompt_messages() too,
    and an SFT run could learn from it. Tool tasks start with a system message offering the tools
    (tools_system_prompt) and need them: products of 3-digit numbers, large unit conversions,
    table lookups (compact_tools: with the one-line-per-tool listing of tools_system_prompt).
    lang: "zh", "en" or None (either); kinds: names in TASKS (default all).
    `key` identifies the problem whatever its wording or language (train/val splits use it)."""
    unknown = set(kinds or ()) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task kind(s) {sorted(unknown)} (known: {', '.join(TASKS)})")
    kind = rng.choice(sorted(kinds or TASKS))
    lang = lang or rng.choice(["zh", "en"])
    key, question, answer = TASKS[kind](rng, lang)
    conv = [{"role": "user", "content": question}, {"role": "assistant", "content": _answer_text(answer, lang)}]
    record = {"conversations": conv, "answer": answer, "kind": kind, "lang": lang, "key": json.dumps(key)}
    if kind in TOOL_TASKS:
        schemas = [t.schema() for t in TOOLS.values()]
        conv.insert(0, {"role": "system", "content": tools_system_prompt(schemas, lang, compact_tools)})
        record.update(tools=schemas, gt=[answer])
    return record


def tool_solution(record: dict) -> Optional[dict]:
    """The tool call that solves a built-in tool task, {"name", "arguments"}; None for other records."""
    key = json.loads(record.get("key") or "[null]")
    if key[0] == "calc_tool":
        return {"name": "calculator", "arguments": {"expression": key[1]}}
    if key[0] == "unit_tool":
        _, _, _, _, a, b, _ = _TOOL_UNITS[key[1]]
        return {"name": "unit_convert", "arguments": {"value": key[2], "from_unit": a, "to_unit": b}}
    if key[0] == "capital" and record.get("lang") == "zh":  # the table answers a Chinese name in Chinese
        return {"name": "lookup", "arguments": {"key": next(c[1] for c in CAPITALS if c[0] == key[1])}}
    if key[0] in ("capital", "element"):
        return {"name": "lookup", "arguments": {"key": key[1]}}
    return None


def demonstration(record: dict) -> list:
    """A conversation that solves a task record, to fine-tune on before RL: the record's own (its last turn
    is the reference answer), and for a tool task the tool call, the sandbox's response (the turn
    rollout() feeds back) and then the answer."""
    call = tool_solution(record)
    if call is None:
        return record["conversations"]
    block = f"{TOOL_CALL_START}\n{json.dumps(call, ensure_ascii=False)}\n{TOOL_CALL_END}"
    *prompt, answer = record["conversations"]
    return [*prompt, {"role": "assistant", "content": block}, tool_response_message(block), answer]


def is_val_key(key: str, val_share: int = 10) -> bool:
    """Held-out problems: about 1 in `val_share` problem keys, by a hash (the same whatever the seed)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % val_share == 0


def write_task(path_train, path_val, n_train: int, n_val: int, seed: int = 0, lang: Optional[str] = None,
               kinds=None, compact_tools: bool = False) -> tuple:
    """Write n_train and n_val records (JSON Lines) of make_task problems. The splits hold different
    problems: a problem's key (not its wording or language) decides its split (is_val_key), so no
    validation problem is ever in any training file. Within a split a problem appears at most once per
    language (raises ValueError when the problem space of `kinds` is too small). Returns the two paths."""
    rng = random.Random(seed)
    splits = {True: [], False: []}
    seen = set()
    want = {True: n_val, False: n_train}
    attempts = 0
    while len(splits[True]) < n_val or len(splits[False]) < n_train:
        attempts += 1
        if attempts > 100 * (n_train + n_val) + 1000:
            raise ValueError(f"could not draw {n_train} + {n_val} distinct problems of kinds {kinds or sorted(TASKS)}")
        rec = make_task(rng, lang, kinds, compact_tools)
        val = is_val_key(rec["key"])
        ident = (rec["key"], rec["lang"])
        if ident in seen or len(splits[val]) >= want[val]:
            continue
        seen.add(ident)
        splits[val].append(rec)
    for path, recs in ((path_train, splits[False]), (path_val, splits[True])):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    return Path(path_train), Path(path_val)


# -----------------------------------------------------------------------------
# rollouts: completions sampled with the model's own batched KV-cache decoder (generate_stream)

def select_tools(spec: str) -> dict:
    """The tool registry of an agentic rollout: "all" -> every built-in tool (TOOLS), else a comma list of
    their names. Raises ValueError naming an unknown tool."""
    if spec in ("all", ""):
        return dict(TOOLS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tool(s) {', '.join(unknown)} (built-in: {', '.join(TOOLS)})")
    return {n: TOOLS[n] for n in names}


def rollout_messages(record: dict) -> list:
    """The messages a rollout starts from: prompt_messages(record), with a system message offering
    record["tools"] (tools_system_prompt) when the record has tools but no system message (MiniMind's
    agent records keep the schemas apart; its chat template renders them into the system turn)."""
    msgs = prompt_messages(record)
    tools = record.get("tools")
    if tools and msgs[0]["role"] != "system":
        tools = json.loads(tools) if isinstance(tools, str) else tools
        msgs.insert(0, {"role": "system", "content": tools_system_prompt(tools, record.get("lang", "en"))})
    return msgs


def left_pad(rows: list, pad_id: int, device=None):
    """Token lists of different lengths -> (ids (B, T) left-padded with pad_id, pad (B,) padding per row),
    the layout generate_stream and completion_logprobs take."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + list(r) for r in rows], dtype=torch.long, device=device)
    pad = torch.tensor([T - len(r) for r in rows], dtype=torch.long, device=device)
    return ids, pad


@dataclass
class Rollout:
    """N sampled episodes. completion holds everything after the prompt: the model's turns and, in
    agentic rollouts, the tool responses fed back between them, then padding."""
    prompt: torch.Tensor  # (N, P) prompt ids, left-padded
    pad: torch.Tensor  # (N,) padding tokens at the start of each prompt row
    completion: torch.Tensor  # (N, R) ids
    mask: torch.Tensor  # (N, R) float: 1 on the tokens the model wrote (each turn's eos included), else 0
    texts: list  # (N,) the model's turns as text (joined by newlines): what reward functions read
    tool_calls: torch.Tensor  # (N,) tool-call blocks the model wrote


@torch.no_grad()
def rollout(model, tok, prompts: list, max_new_tokens: int, *, temperature: float = 1.0, top_k: Optional[int] = None,
            top_p: Optional[float] = None, generator: Optional[torch.Generator] = None, tools: Optional[dict] = None,
            max_turns: int = 1) -> Rollout:
    """Sample one episode per prompt (token lists; repeat a prompt for a group) with
    `model.generate_stream` on the left-padded batch, in eval mode, `generator` drawing every sample:
    the same generator state and weights give the same rollout.

    With a tool registry (`tools`, name -> Tool) an episode runs up to `max_turns` assistant turns: a
    turn that ends with eos and writes <tool_call> blocks gets their results back as a user turn of
    <tool_response> blocks (tool_response_message: the sandbox, never eval), rendered as the chat
    template renders a turn, and the model answers again with everything so far as its prompt. Tool
    responses have mask 0: the model did not write them and is not trained on them. A turn cut at
    max_new_tokens ends its episode. Each turn decodes the still-running episodes as one batch."""
    eos, pad_id = tok.eos_id, tok.pad_id
    device = next(model.parameters()).device
    N = len(prompts)
    contexts = [list(p) for p in prompts]
    out_ids, out_mask = [[] for _ in range(N)], [[] for _ in range(N)]
    turns, calls = [[] for _ in range(N)], [0] * N
    active = list(range(N))
    was_training = model.training
    model.eval()
    try:
        for turn in range(max_turns):
            if not active or max_new_tokens < 1:
                break
            idx, pad = left_pad([contexts[i] for i in active], pad_id, device)
            # the one sampler seeds row i from seed + i; the seed itself comes from `generator`
            seed = None if generator is None else int(torch.randint(0, 2 ** 62, (1,), generator=generator))
            steps = list(model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k or 0,
                                               top_p=1.0 if top_p is None else top_p, eos_id=eos, pad=pad, seed=seed))
            generated = torch.stack(steps, dim=1).tolist()  # (len(active), steps)
            running = []
            for i, row in zip(active, generated):
                ended = eos in row
                new = row[:row.index(eos) + 1] if ended else row
                text = tok.decode([t for t in new if t != eos])
                turns[i].append(text)
                out_ids[i] += new
                out_mask[i] += [1] * len(new)
                contexts[i] += new
                calls[i] += len(find_tool_calls(split_think(text)[1]))
                if tools is None or not ended or turn == max_turns - 1:
                    continue
                response = tool_response_message(text, tools)
                if response is None:  # no tool call: the final answer
                    continue
                seen = tok.encode("\n" + render_chat([response], add_generation_prompt=True))
                out_ids[i] += seen
                out_mask[i] += [0] * len(seen)
                contexts[i] += seen
                running.append(i)
            active = running
    finally:
        model.train(was_training)
    prompt, pad = left_pad(prompts, pad_id, device)
    R = max(1, max(len(o) for o in out_ids))
    completion = torch.tensor([o + [pad_id] * (R - len(o)) for o in out_ids], dtype=torch.long, device=device)
    mask = torch.tensor([m + [0] * (R - len(m)) for m in out_mask], dtype=torch.float32, device=device)
    return Rollout(prompt, pad, completion, mask, ["\n".join(t) for t in turns],
                   torch.tensor(calls, dtype=torch.float32, device=device))
