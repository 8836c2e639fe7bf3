"""Rollouts: episodes sampled with the model's own batched KV-cache decoder (generate_stream), with
tools fed back between turns in agentic rollouts.

    from rl.rollout import rollout
    ro = rollout(model, tok, prompt_ids, 256, generator=g, tools=select_tools("all"), max_turns=3)
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from minimind import left_pad
from runtime import ticking
from rl.answers import split_think
from rl.tasks import prompt_messages
from rl.tools import TOOLS, find_tool_calls, record_tools, tool_response_message, tools_system_prompt


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


def tool_turn_ids(tok, response: dict) -> list:
    """Ids of the tool-result turn that follows an assistant's tool call, then the assistant's opening: the
    result is data, so text in it such as an echoed `<|im_start|>system` stays ordinary tokens."""
    return tok.encode("\n") + tok.encode_chat([response], add_generation_prompt=True)


def rollout_messages(record: dict) -> list:
    """The messages a rollout starts from: prompt_messages(record), with a system message offering
    record["tools"] (tools_system_prompt) when the record has tools but no system message (MiniMind's
    agent records keep the schemas apart; its chat template renders them into the system turn)."""
    msgs = prompt_messages(record)
    tools = record_tools(record)
    if tools and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": tools_system_prompt(tools, record.get("lang", "en"))})
    return msgs


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


def join_rollouts(parts: list, pad_id: int) -> Rollout:
    """One Rollout of the chosen rows of several: parts = [(rollout, row indices), ...], rows in the order
    given. Prompts are left-padded and completions right-padded to the longest (pad_id, mask 0), so
    every row scores as it did in its own rollout (completion_logprobs restarts positions after padding)."""
    P = max(ro.prompt.size(1) for ro, _ in parts)
    R = max(ro.completion.size(1) for ro, _ in parts)
    prompt, pad, completion, mask, texts, calls = [], [], [], [], [], []
    for ro, rows in parts:
        rows = torch.as_tensor(rows, dtype=torch.long, device=ro.prompt.device)
        extra_p, extra_r = P - ro.prompt.size(1), R - ro.completion.size(1)
        prompt.append(F.pad(ro.prompt[rows], (extra_p, 0), value=pad_id))  # (n, P)
        pad.append(ro.pad[rows] + extra_p)
        completion.append(F.pad(ro.completion[rows], (0, extra_r), value=pad_id))  # (n, R)
        mask.append(F.pad(ro.mask[rows], (0, extra_r)))
        texts += [ro.texts[i] for i in rows.tolist()]
        calls.append(ro.tool_calls[rows])
    return Rollout(torch.cat(prompt), torch.cat(pad), torch.cat(completion), torch.cat(mask), texts, torch.cat(calls))


@torch.no_grad()
def rollout(model, tok, prompts: list, max_new_tokens: int, *, temperature: float = 1.0, top_k: Optional[int] = None,
            top_p: Optional[float] = None, generator: Optional[torch.Generator] = None, tools: Optional[dict] = None,
            max_turns: int = 1) -> Rollout:
    """Sample one episode per prompt (token lists; repeat a prompt for a group) with
    `model.generate_stream` on the left-padded batch, in eval mode, `generator` drawing every sample:
    the same generator state and weights give the same rollout.

    With a tool registry (`tools`, name -> SandboxTool) an episode runs up to `max_turns` assistant turns: a
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
            steps = list(ticking(model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k or 0,
                                                       top_p=1.0 if top_p is None else top_p, eos_id=eos, pad=pad,
                                                       seed=seed)))
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
                seen = tool_turn_ids(tok, response)
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
