"""Reward functions, reward specs and a reward model. A reward function is
`fn(prompt_messages, completion_text, record) -> float`; `record` is the RLAIF record the prompt came
from (its "answer" is the reference of verifiable tasks).

    from rl.rewards import parse_reward_specs, compute_rewards
    specs = parse_reward_specs("exact:1.0 think:0.2 repetition:1.0")
    rewards, parts = compute_rewards(specs, prompts, completions, records, group_size=G)
"""
import functools
import importlib
import re
from typing import Optional

import torch

from rl.answers import THINK_END, answers_match, extract_answer, split_think
from rl.tools import TOOL_CALL_END, TOOL_CALL_START, check_tool_call, find_tool_calls, schemas_of
from tokenizer import CHAT_TEMPLATE


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
    total = len(toks) - n + 1
    if total <= 0:
        return 0.0
    distinct = len(set(zip(*(toks[i:] for i in range(n)))))  # n-grams (toks[j], ..., toks[j+n-1]), built in C
    return min(cap, (total - distinct) * cap * 2 / total)


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
    schemas = schemas_of(record)
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
