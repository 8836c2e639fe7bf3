"""Scoring text with a language model: how likely a model finds given tokens.

    from scoring import loglikelihoods, text_nll, token_logprobs, bits_per_byte
    loglikelihoods(model, [(context_ids, continuation_ids), ...], context=2048)   # multiple choice
    nats, n = text_nll(model, [bos] + tok.encode(text), context=2048, stride=1024)
    bits_per_byte(nats, len(text.encode()))
    token_logprobs(model, ids, context=2048, top_n=5)   # /v1/completions logprobs and echo

Pure functions of (model, token ids): `model` is a minimind MiniMind or a transformers causal LM
(anything `forward_logits` can call). Log-probabilities are computed in fp32 whatever the model's
dtype, from one forward pass per batch of right-padded rows (padding after the last real token
never changes a causal model's logits for the tokens before it).

The conventions are lm-evaluation-harness's, so that numbers compare:
- a (context, continuation) pair is encoded whole and split where the context's tokens end,
  trailing whitespace of the context moved into the continuation (`encode_pair`); an input longer
  than the model's context keeps its last `context` tokens;
- a long text is scored in windows of `context` tokens advancing by `stride` (`windows`): each
  token once, conditioned on at least context - stride + 1 and at most `context` tokens before it
  (fewer at the start); stride = context is lm-eval's `loglikelihood_rolling` (disjoint windows);
- bits per byte = total negative log-likelihood in nats / (ln 2 x UTF-8 bytes of the text).
"""
import codecs
import math
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from minimind import MiniMind
from runtime import tick_threads
from tokenizer import Tokenizer, token_bytes


# -----------------------------------------------------------------------------
# the model as a function of token ids

def forward_logits(model, idx):
    """(B, T) token ids -> (B, T, V) logits, of a minimind model or a transformers causal LM."""
    if isinstance(model, MiniMind):
        return model(idx)[0]
    return model(input_ids=idx, use_cache=False).logits


def model_device(model) -> torch.device:
    return next(model.parameters()).device


class Job(NamedTuple):
    """One row to score: the model reads tokens[:-1] and the last `n_scored` of tokens[1:] are scored."""
    tokens: list
    n_scored: int


class Scored(NamedTuple):
    """What a job gives: the log-probability of each scored token (n_scored,), whether each is the
    model's top choice (greedy), and with top_n > 0 the top_n alternatives at each scored position
    (ids, log-probabilities: (n_scored, top_n) each)."""
    logprobs: torch.Tensor
    greedy: torch.Tensor
    top_ids: Optional[torch.Tensor] = None
    top_logprobs: Optional[torch.Tensor] = None


@torch.no_grad()
def score_jobs(model, jobs: Sequence[Job], batch_tokens: int = 8192, top_n: int = 0,
               progress: Optional[Callable[[int], None]] = None) -> List[Scored]:
    """Score every job, longest first in batches of about `batch_tokens` padded tokens (a job longer
    than that goes alone); results in the order of `jobs`, on the CPU. `progress(n)` is called with
    the number of jobs done after each batch."""
    device = model_device(model)
    order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j].tokens))
    out = [None] * len(jobs)
    i = 0
    while i < len(order):
        width = len(jobs[order[i]].tokens) - 1  # the longest row of this batch (inputs: tokens[:-1])
        rows = order[i:i + max(1, batch_tokens // max(width, 1))]
        idx = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T), right-padded with token 0
        for b, j in enumerate(rows):
            idx[b, :len(jobs[j].tokens) - 1] = torch.tensor(jobs[j].tokens[:-1])
        logits = forward_logits(model, idx.to(device))  # (B, T, V)
        for b, j in enumerate(rows):
            tokens, k = jobs[j]
            m = len(tokens) - 1  # real inputs of this row; logits at m-k .. m-1 predict the scored tokens
            lp = F.log_softmax(logits[b, m - k:m].float(), dim=-1)  # (k, V)
            target = torch.tensor(tokens[-k:], device=lp.device)  # (k,)
            top = lp.topk(top_n, dim=-1) if top_n else None
            out[j] = Scored(lp.gather(1, target[:, None])[:, 0].cpu(), (lp.argmax(-1) == target).cpu(),
                            top.indices.cpu() if top else None, top.values.cpu() if top else None)
        i += len(rows)
        tick_threads()
        if progress:
            progress(len(rows))
    return out


# -----------------------------------------------------------------------------
# continuations: multiple choice

def encode_pair(encode: Callable[[str], list], context: str, continuation: str, prefix: Sequence[int] = ()):
    """(context ids, continuation ids) as lm-eval's causal models make them: whitespace that ends
    the context moves to the start of the continuation, the two are encoded together and split
    where the context's own tokens end (so a token spanning the boundary belongs to the
    continuation). `prefix` (e.g. [bos]) goes before the context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = list(prefix) + encode(context + continuation)
    n_context = len(prefix) + len(encode(context))
    return whole[:n_context], whole[n_context:]


def continuation_job(context_ids: Sequence[int], continuation_ids: Sequence[int], context: int) -> Job:
    """The row that scores a continuation after a context, cut to the model's `context` inputs
    from the left (lm-eval's truncation: (context + continuation)[-(context + 1):])."""
    if not continuation_ids or not context_ids:
        raise ValueError("a continuation to score needs a non-empty context (e.g. bos) and continuation")
    tokens = (list(context_ids) + list(continuation_ids))[-(context + 1):]
    return Job(tokens, min(len(continuation_ids), len(tokens) - 1))


def loglikelihoods(model, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], context: int,
                   batch_tokens: int = 8192, progress=None) -> List[Tuple[float, bool]]:
    """log P(continuation | context) summed over the continuation's tokens, and whether greedy
    decoding would produce the continuation, for each (context ids, continuation ids) pair."""
    scored = score_jobs(model, [continuation_job(c, x, context) for c, x in pairs], batch_tokens, progress=progress)
    return [(float(s.logprobs.double().sum()), bool(s.greedy.all())) for s in scored]


# -----------------------------------------------------------------------------
# long texts: windowed loss and bits per byte

def windows(n: int, context: int, stride: int) -> List[Tuple[int, int, int]]:
    """Cover the tokens 1..n-1 of a sequence of n tokens (token 0 is only read, e.g. bos) with
    windows (start, end, n_scored): the model reads ids[start:end-1] (at most `context` tokens) and
    scores the last n_scored of ids[start+1:end]. The first window scores up to `context` tokens,
    each later one the next `stride`, so every token is scored once."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride {stride} must be between 1 and the context {context}")
    out, done = [], 1  # tokens before `done` are scored
    while done < n:
        end = min(n, done + (context if done == 1 else stride))
        out.append((max(0, end - 1 - context), end, end - done))
        done = end
    return out


def window_jobs(ids: Sequence[int], context: int, stride: int) -> List[Job]:
    return [Job(list(ids[s:e]), k) for s, e, k in windows(len(ids), context, stride)]


def text_nll(model, ids: Sequence[int], context: int, stride: Optional[int] = None, batch_tokens: int = 8192,
             progress=None) -> Tuple[float, int]:
    """Negative log-likelihood in nats of tokens ids[1:] (ids[0], e.g. bos, is only read) and the
    number of tokens scored; windows of `context` tokens advancing by `stride` (default: context)."""
    scored = score_jobs(model, window_jobs(ids, context, stride or context), batch_tokens, progress=progress)
    return -sum(float(s.logprobs.double().sum()) for s in scored), max(0, len(ids) - 1)


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Nats over a text -> bits per UTF-8 byte of it: comparable across tokenizers, unlike loss per token."""
    return nats / (math.log(2) * n_bytes)


def token_byte_lengths(tok) -> np.ndarray:
    """UTF-8 bytes of each token id (special tokens: 0) as an int64 array (vocab,)."""
    return np.array([len(b) for b in token_bytes(tok, skip_special_tokens=True)], dtype=np.int64)


def count_bytes(tokens: np.ndarray, lengths: np.ndarray, chunk: int = 1 << 24) -> int:
    """UTF-8 bytes that a (possibly memory-mapped) array of token ids decodes to, special tokens
    counting 0; read in chunks, so a split of billions of tokens needs little memory."""
    return int(sum(lengths[np.asarray(tokens[i:i + chunk], dtype=np.int64)].sum()
                   for i in range(0, len(tokens), chunk)))


def bytes_per_token(tokens: np.ndarray, tok_dir) -> Optional[float]:
    """UTF-8 bytes per token of a split (for bits per byte, a tokenizer-independent loss); None without
    the tokenizer (tok_dir/tokenizer.json)."""
    if not (Path(tok_dir) / "tokenizer.json").exists():
        return None
    return count_bytes(tokens, token_byte_lengths(Tokenizer(tok_dir))) / len(tokens)


# -----------------------------------------------------------------------------
# every token's log-probability: /v1/completions `logprobs` and `echo`

def token_logprobs(model, ids: Sequence[int], context: int, top_n: int = 0, stride: Optional[int] = None,
                   batch_tokens: int = 8192) -> Tuple[list, list]:
    """(logprobs, top) aligned with ids: logprobs[i] = log P(ids[i] | ids[:i]) (None for i = 0,
    nothing predicts the first token); top[i] = [(id, logprob), ...], the top_n most likely tokens
    at position i, most likely first (None for i = 0, [] when top_n = 0). Raw model
    probabilities: no temperature, top-k or top-p. Sequences longer than `context` are scored in
    windows (`windows`; stride defaults to context // 2)."""
    logprobs, top = [None], [None]
    for s in score_jobs(model, window_jobs(ids, context, stride or max(1, context // 2)), batch_tokens, top_n=top_n):
        logprobs += s.logprobs.tolist()
        top += ([list(zip(i, v)) for i, v in zip(s.top_ids.tolist(), s.top_logprobs.tolist())] if top_n
                else [[] for _ in range(len(s.logprobs))])
    return logprobs[:len(ids)], top[:len(ids)]


def token_text(piece: bytes) -> str:
    """A token as OpenAI's legacy logprobs show it: its text, or "bytes:\\xe4\\xbd" when it holds
    part of a UTF-8 character."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


def openai_logprobs(table: Sequence[bytes], ids: Sequence[int], logprobs: Sequence[Optional[float]],
                    top: Sequence[Optional[list]], text_offset: int = 0, names: Optional[dict] = None) -> dict:
    """The `logprobs` object of a /v1/completions choice for tokens `ids` (the reported ones: the
    prompt's with echo, then the completion's) and their `token_logprobs` output, aligned:
    {"tokens", "token_logprobs", "top_logprobs", "text_offset"}. `table` is token id -> bytes
    (tokenizer.token_bytes); text offsets count characters of the decoded text from `text_offset`
    (OpenAI: the prompt's length when the prompt is not echoed), a token inside a character
    sharing its offset with the next. `names` (id -> str) shows tokens that stand for no text,
    special tokens such as eos, by name (OpenAI's "<|endoftext|>"); they add nothing to the offsets."""
    names = names or {}

    def shown(i):
        return names[i] if i in names else token_text(table[i])

    tokens, offsets, tops, n_chars = [], [], [], text_offset
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t, alts in zip(ids, top):
        tokens.append(shown(t))
        offsets.append(n_chars)
        n_chars += len(utf8.decode(table[t]))
        tops.append(None if alts is None else {shown(i): lp for i, lp in alts})
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": tops, "text_offset": offsets}
