"""Sample from a minimind checkpoint: continue a prompt or chat in the terminal.

    python sample.py --prompt "人工智能是"              # the newest run under out/
    python sample.py --ckpt out/pretrain --prompt "人工智能是" --max-new-tokens 100
    python sample.py --ckpt out/pretrain --prompt "春天" --prompt "The weather today" --temperature 0
    python sample.py --ckpt out/sft --chat --system "你是一个乐于助人的助手。"
    python sample.py --ckpt out/sft --chat --think on

One --prompt streams its continuation (a pretrained model sees bos + prompt tokens); on a chat
checkpoint (trained by sft, dpo or a later stage, as its state.json says) the prompt is a user
message in the chat template and the reply is printed, as MiniMind's eval script does (--raw:
plain continuation anyway). Several
--prompt flags are decoded together as one left-padded batch: with --temperature 0 every result
is the same as that prompt decoded alone. --chat is a multi-turn conversation in the tokenizer's
chat template: the history is kept across turns and its oldest turns are dropped when it no longer
fits the context window; /reset clears it, /exit (or Ctrl-D) quits, Ctrl-C stops a reply.
With --think on the reply starts inside a think block: its reasoning is shown dim, after "[think]",
apart from the answer; tool calls are shown as "[tool call] name(arguments)".

Sampling is minimind's one sampler (SamplingParams: temperature, top-k, top-p, repetition,
frequency and presence penalties, seed), the same as serve.py's: a --seed and settings give the
same tokens as a server request with that seed and those settings.

Streamed text never shows half a character: the byte-level tokenizer can split one UTF-8
character over several tokens, so bytes are held back until they form complete characters.

The context window is --context, else the training sequence length stored in the checkpoint
(state.json args.seq_len), else 2048.
"""
import argparse
import sys
import time
from typing import Optional

import torch

from checkpoint import CHAT_KINDS, add_model_args, load_or_exit, run_or_newest, trained_kind
from minimind import SamplingParams, left_pad
from runtime import ticking
from tokenizer import ReplyParser, TokenDecoder


# -----------------------------------------------------------------------------
# generation: thin wrappers over MiniMind.generate_stream (sampling settings as in SamplingParams)

@torch.no_grad()
def stream_tokens(model, ids: list, max_new_tokens: int, eos_id: Optional[int] = None, params=None,
                  compiled: bool = False, **sampling):
    """Yield the generated token ids of one prompt, stopping after `eos_id` (which is yielded).
    params: a SamplingParams, or None for SamplingParams(**sampling), e.g. temperature=0.
    compiled: decode steps through torch.compile (MiniMind.step), the same tokens."""
    if max_new_tokens <= 0:
        return
    idx, pad = left_pad([ids], device=model.embed.weight.device)  # the batch path: the same alone or batched
    for nxt in ticking(model.generate_stream(idx, max_new_tokens, params, eos_id=eos_id, pad=pad,
                                             compiled=compiled, **sampling)):
        t = int(nxt[0])
        yield t
        if t == eos_id:
            return


@torch.no_grad()
def generate_batch(model, prompts: list, max_new_tokens: int, eos_id: Optional[int] = None, pad_id: int = 0,
                   params=None, compiled: bool = False, **sampling) -> list:
    """Decode several prompts (lists of ids, any lengths) as one left-padded batch.
    Returns the generated ids of each prompt, cut before its first `eos_id`. With a seed, prompt i
    draws from seed + i (as it would alone with that seed)."""
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    idx, pad = left_pad(prompts, pad_id, device=model.embed.weight.device)  # (B, T), (B,)
    steps = [nxt.tolist() for nxt in ticking(model.generate_stream(idx, max_new_tokens, params, eos_id=eos_id,
                                                                   pad=pad, compiled=compiled, **sampling))]
    out = []
    for b in range(len(prompts)):
        row = [s[b] for s in steps]
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        out.append(row)
    return out


def fit_history(tok, messages: list, context: int, reserve: int, thinking: bool = False):
    """Drop the oldest turns (never the system message nor the newest message) until the chat
    prompt leaves `reserve` tokens of the context for the reply. Returns (messages, prompt ids)."""
    messages = list(messages)
    while True:
        ids = tok.encode_chat(messages, add_generation_prompt=True, open_thinking=thinking)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) + reserve <= context or len(messages) - first <= 1:
            return messages, ids
        del messages[first]
        # a conversation restarts with the user: drop an orphaned assistant reply too
        while len(messages) - first > 1 and messages[first]["role"] != "user":
            del messages[first]


# -----------------------------------------------------------------------------
# command line modes

def sampling_params(args) -> SamplingParams:
    """The sampling flags; ValueError naming the first one out of range."""
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                          presence_penalty=args.presence_penalty, seed=args.seed)


def run_prompts(model, tok, args, context: int):
    params = sampling_params(args)
    if args.chat_model and not args.raw:  # a user message each, answered in the chat template
        prompts = [tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True,
                                   open_thinking=args.think == "on") for p in args.prompt]
        print("[chat checkpoint: each --prompt is a user message in the chat template; --raw continues it as text]",
              file=sys.stderr)
    else:
        prompts = [[tok.bos_id] + tok.encode(p) for p in args.prompt]
    longest = max(len(p) for p in prompts)
    if longest >= context:
        sys.exit(f"error: a prompt of {longest} tokens does not fit the context window of {context} (--context)")
    max_new = min(args.max_new_tokens, context - longest)
    if max_new < args.max_new_tokens:
        print(f"[--max-new-tokens {args.max_new_tokens} capped to {max_new} by the context window of {context}]",
              file=sys.stderr)
    chat = args.chat_model and not args.raw  # a reply: its reasoning, answer and tool calls apart (ReplyParser)
    if len(prompts) > 1:  # a batch: results printed when all are done
        t0 = time.time()
        outs = generate_batch(model, prompts, max_new, eos_id=tok.eos_id, pad_id=tok.pad_id, params=params,
                              compiled=args.compile)
        dt = time.time() - t0
        for i, (p, o) in enumerate(zip(args.prompt, outs)):
            text = tok.decode(o, skip_special_tokens=True)
            print(f"--- [{i}] " + (p + " -> " if chat else p), end="" if chat else text + "\n")
            if chat:
                parser, show = ReplyParser(args.think == "on"), ReplyDisplay()
                show(parser.feed(text) + parser.finish())
                print(show.reset if show.end else "")
        n = sum(len(o) for o in outs)
        print(f"[{len(outs)} prompts, {n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
        return
    dec, parser, show = TokenDecoder(tok), ReplyParser(args.think == "on"), ReplyDisplay()
    if not chat:
        print(args.prompt[0], end="", flush=True)
    n, t0 = 0, time.time()
    for t in stream_tokens(model, prompts[0], max_new, eos_id=tok.eos_id, params=params, compiled=args.compile):
        n += 1
        if chat:
            show(parser.feed(dec.feed(t)))
        else:
            print(dec.feed(t), end="", flush=True)
    if chat:
        show(parser.feed(dec.flush()) + parser.finish())
        print(show.reset if show.end else "", flush=True)
    else:
        print(dec.flush())
    dt = time.time() - t0
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)


def run_chat(model, tok, args, context: int):
    """Read a line, stream the reply, repeat. Commands: /reset, /exit."""
    params = sampling_params(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    reserve = min(args.max_new_tokens, context // 2)  # room kept for the reply when trimming history
    interactive = sys.stdin.isatty()
    thinking = args.think == "on"
    if interactive:
        print(f"[chat: context {context} tokens; /reset clears the history, /exit quits]", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(system)
            print("[history cleared]", file=sys.stderr)
            continue
        history, ids = fit_history(tok, history + [{"role": "user", "content": line}], context, reserve, thinking)
        max_new = min(args.max_new_tokens, context - len(ids))
        if max_new <= 0:
            print(f"[message too long: {len(ids)} tokens, the context window is {context}]", file=sys.stderr)
            history.pop()
            continue
        dec, parser, show, n, t0 = TokenDecoder(tok), ReplyParser(thinking), ReplyDisplay(), 0, time.time()
        try:
            for t in stream_tokens(model, ids, max_new, eos_id=tok.eos_id, params=params, compiled=args.compile):
                n += 1
                if t == tok.eos_id:
                    break
                show(parser.feed(dec.feed(t)))
        except KeyboardInterrupt:  # stop this reply, keep chatting
            print(" [interrupted]", end="")
        show(parser.feed(dec.flush()) + parser.finish())
        print(show.reset if show.end else "", flush=True)  # closes the reasoning if it is still open
        dt = time.time() - t0
        print(f"[{n} tokens, {n / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr, flush=True)
        history.append(show.message)


class ReplyDisplay:
    """Print a ReplyParser's events as they come: the reasoning dim after "[think] ", the answer on a
    line of its own, each tool call as "[tool call] name(arguments)". `message` collects the reply
    as the assistant message of the history; `end` closes what is being shown."""

    def __init__(self):
        self.dim, self.reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
        self.message = {"role": "assistant", "content": "", "reasoning_content": ""}
        self.end = ""

    def __call__(self, events):
        for kind, value in events:
            if kind == "reasoning":
                text = ("" if self.message["reasoning_content"] else self.dim + "[think] ") + value
                self.message["reasoning_content"] += value
                self.end = self.reset + "\n"
                print(text, end="", flush=True)
                continue
            print(self.end, end="")
            self.end = ""
            if kind == "content":
                self.message["content"] += value
                print(value, end="", flush=True)
            else:
                calls = self.message.setdefault("tool_calls", [])
                f = value["function"]
                print(("\n" if self.message["content"] or calls else "") + f"[tool call] {f['name']}({f['arguments']})",
                      end="", flush=True)
                calls.append(value)


# -----------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    # what to run
    p.add_argument("--prompt", action="append", default=[],
                   help="text to continue; repeat the flag to decode several prompts as one batch")
    p.add_argument("--chat", action="store_true", help="multi-turn chat in the terminal (chat template)")
    p.add_argument("--raw", action="store_true",
                   help="--prompt on a chat checkpoint: continue the text as it is, without the chat template")
    p.add_argument("--system", default="", help="--chat: system message")
    p.add_argument("--think", choices=("on", "off"), default="off",
                   help="--chat: let the model reason in a think block before it answers (the template's switch)")
    # sampling
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (per reply)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide positive logits of tokens already present by this (1 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times a token's count in the output from its logit, -2..2 (OpenAI; 0 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from the logit of every token already in the output, -2..2 (OpenAI; 0 = off)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed: the same seed gives the same sample here and from serve.py "
                        "(prompt i of a batch uses seed + i); default: a fresh one each run")
    # speed
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile: the same tokens, each step faster (CPU: 1.5-3x at batch 1), "
                        "after a compile of ~10-60 s that pays for itself only after thousands of tokens "
                        "(BENCHMARKS.md, decode)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.chat == bool(args.prompt):
        sys.exit("error: give either --prompt TEXT (repeatable) or --chat")
    if args.max_new_tokens <= 0:
        sys.exit("error: --max-new-tokens must be positive")
    try:
        sampling_params(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    args.ckpt = run_or_newest(args.ckpt)  # trained_kind reads it below
    model, tok, _, context = load_or_exit(args.ckpt, args.device, args.dtype, args.kernels, args.context,
                                          args.rope_scaling, args.threads)
    args.chat_model = trained_kind(args.ckpt) in CHAT_KINDS
    if args.chat:
        run_chat(model, tok, args, context)
    else:
        run_prompts(model, tok, args, context)


if __name__ == "__main__":
    main()
