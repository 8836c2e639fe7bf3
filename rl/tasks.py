"""Verifiable tasks: a generator of problems with reference answers, written as RLAIF records, and the
demonstrations that solve them (for SFT before RL).

    from rl.tasks import make_task, write_task
    record = make_task(random.Random(0), kinds=["max"])
    write_task("data/rl/train.jsonl", "data/rl/val.jsonl", 2000, 200)      # `python prepare.py rl-task`

RLAIF records (MiniMind's format): {"conversations": [{"role", "content"}, ...]} whose last message is
an assistant turn that MiniMind's RLAIFDataset drops (`conversations[:-1]`) - its rlaif-mini.jsonl puts
a placeholder there. `prompt_messages(record)` returns the prompt either way (a record may also end
in the user turn). The built-in tasks add "answer" (reference, a string), "kind", "lang", and for
tool tasks "tools" (function schemas) and "gt" ([answer], as MiniMind's AgentRLDataset reads it).
"""
import hashlib
import json
import random
from pathlib import Path
from typing import Optional

from rl.tools import (CAPITALS, ELEMENTS, TOOL_CALL_END, TOOL_CALL_START, TOOLS, tool_response_message,
                      tools_system_prompt)


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
