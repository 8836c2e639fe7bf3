"""The report card of a run of every stage (speedrun.sh): what the machine was, what each stage cost
and reached, how the models do on held-out data, what they answer. eval.py --card writes it:

    python eval.py --card out/report.md --ckpt out/pretrain --ckpt out/sft --ckpt out/dpo --ckpt out/grpo

Per stage, from the run's own log.jsonl and state.json: wall time, tokens, tokens/s, final train and
val loss (SFT's val loss is its held-out reply loss). Measured here: bits per byte of every model on
text held out from the embedded corpora (held_out_texts: the documents prepare.py puts in val, Chinese
and English), DPO's held-out reward accuracy with its standard error (dpo_reward_accuracy), GRPO's
held-out metrics before and after (its log's step 0 and last evaluation), replies to eval.py's
prompts and how many are template-clean (template_clean), and how many greedy replies to TOOL_PROMPTS
make a valid tool call (tool_call_verdict). Loss curves: a png beside the markdown.

With a time budget (eval.py --card --max-time, CardBudget) the card measures its parts as it goes and
scores fewer held-out documents and answers fewer prompts and tool prompts (the same ones for every model, in a fixed
order), and says so.
"""
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import corpus
from checkpoint import atomic_write_text, load_checkpoint, resolve_checkpoint
from data import DPOData
from losses import accuracy_se, reference_logprobs
from rl.tools import TOOLS, check_tool_call, find_tool_calls
from tokenizer import TOOL_CALL, parse_reply

# what a reply shown to a user never holds: the chat template's markers and tags
TEMPLATE_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>",
                    "</tool_call>", "<tool_response>", "</tool_response>")


def template_clean(text: str) -> bool:
    """No template marker and no role header ("assistant\\n" opening a turn) in `text`."""
    return not any(m in text for m in TEMPLATE_MARKERS) and not any(
        line.strip() in ("assistant", "user", "system") for line in text.splitlines()[:1])


def reply_parts(raw: str, thinking: bool = False) -> tuple:
    """(reasoning, content, tool calls) of a raw reply, as every front end shows it (tokenizer.parse_reply)."""
    return parse_reply(raw, thinking)


# the tool prompts of the card: (language, the tool offered, prompt), one for each tool of the sandbox
# (rl/tools.py), Chinese and English; one tool each, so the prompt fits a speedrun model's context (every
# tool's schema together is ~400 tokens of a 6400-token vocabulary); a cut keeps the first ones
TOOL_PROMPTS = [("en", "calculator", "What is (17 + 25) * 3? Use the calculator."),
                ("zh", "unit_convert", "把 5 公里换算成英里。"),
                ("en", "lookup", "What is the capital of France? Look it up."),
                ("zh", "calculator", "用计算器算一下 123 乘以 45 等于多少。")]


def tool_schemas(names: list) -> list:
    """The sandbox tools named, as OpenAI function specs (what render_chat takes as `tools`)."""
    return [TOOLS[name].schema() for name in names]


def tool_call_verdict(reply: str, offered: list) -> tuple:
    """Whether a reply makes a valid tool call: parse_reply finds at least one call, and every call in it
    (blocks whose JSON did not parse included: parse_reply leaves them in the content) passes
    rl.tools.check_tool_call against the offered tools (`offered`: their names) -> (the calls as
    `name(arguments)` text, None) or (None, what was wrong). Arguments are read as a client of serve.py
    reads them: the JSON text of the parsed call."""
    schemas = {name: TOOLS[name].parameters for name in offered}
    _, content, calls = parse_reply(reply)
    blocks = []
    for c in calls:
        try:
            args = json.loads(c["function"]["arguments"])
        except ValueError:
            args = c["function"]["arguments"]  # not JSON: check_tool_call says the arguments are no object
        blocks.append(json.dumps({"name": c["function"]["name"], "arguments": args}, ensure_ascii=False))
    blocks += find_tool_calls(content)
    if not blocks:
        return None, "no tool call" + (" (an unclosed <tool_call>)" if TOOL_CALL in content else "")
    shown = []
    for block in blocks:
        call, error = check_tool_call(block, schemas)
        if error:
            return None, error
        shown.append(f"{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})")
    return "; ".join(shown), None


def machine() -> dict:
    """CPU model, its bf16 units (avx512_bf16, amx_bf16 in /proc/cpuinfo), threads, GPU; versions; commit."""
    info = {"cpu": platform.processor() or platform.machine(), "bf16_units": [], "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu"] = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), info["cpu"])
        flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
        info["bf16_units"] = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = None
    return info


def run_dir(path) -> Path:
    """The run directory of a --ckpt path (a run directory, or a checkpoint directory inside one)."""
    path = Path(path)
    return path if (path / "log.jsonl").exists() or not (path / "config.json").exists() else path.parent


def read_log(run: Path) -> list:
    path = run / "log.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def stage_summary(run: Path) -> dict:
    """One run's training from its log and newest state: wall time, tokens, tokens/s, final losses."""
    state = json.loads((resolve_checkpoint(run) / "state.json").read_text())
    args, log = state.get("args", {}), read_log(run)
    last = lambda key: next((r[key] for r in reversed(log) if key in r), None)  # noqa: E731
    seconds, steps = state.get("train_seconds"), state.get("step", 0)
    tokens = steps * (args.get("batch_tokens_per_step") or 0)
    return {"stage": state.get("kind", args.get("mode")), "run": str(run), "steps": steps, "seconds": seconds,
            "tokens": tokens, "tok_s": tokens / seconds if seconds else None, "loss": last("loss"),
            "val_loss": last("val_loss"), "val_bpb": last("val_bpb"), "model": args.get("model")}


def held_out_texts(out_dir: Path, limit: int = 100) -> dict:
    """The embedded corpora's held-out documents, as prepare.py splits them (every 100th text document:
    pretrain's val; every 100th dialog: SFT's val), by language -> {name: jsonl path} written in out_dir."""
    docs = {"zh-text": [t for i, (_, _, t) in enumerate(corpus.text_documents()) if i % 100 == 99],
            "zh-chat": [], "en-chat": []}
    for i, (path, _, lines) in enumerate(corpus.dialogs()):
        if i % 100 == 99:
            docs["en-chat" if "/english/" in path.replace(os.sep, "/") else "zh-chat"].append("\n".join(lines))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, texts in docs.items():
        if texts:
            files[name] = out_dir / f"{name}.jsonl"
            atomic_write_text(files[name], "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                   for t in texts[:limit]))
    return files


def dpo_reward_accuracy(run: Path, device: str, dtype) -> Optional[dict]:
    """Held-out pairs whose implicit reward (policy - reference log-probability) ranks chosen over
    rejected: the fraction and its standard error, over the DPO run's val split. The run's own last
    evaluation when it scored every held-out pair at the checkpoint's step (DPO's default), else
    computed here from the checkpoint and its reference."""
    ckpt = resolve_checkpoint(run)
    state = json.loads((ckpt / "state.json").read_text())
    args = state.get("args", {})
    if state.get("kind") != "dpo" or state.get("lora"):
        return None
    data = DPOData(state["data"]["dir"], args["seq_len"], args.get("seed", 0))
    data.splits = {"val": data.splits["val"]}
    n = len(data.splits["val"][2])
    logged = [r for r in read_log(run) if "val_pairs" in r]
    if logged and logged[-1]["val_pairs"] == n and logged[-1]["step"] == state.get("step"):
        return {"acc": logged[-1]["val_reward_acc"], "stderr": logged[-1]["val_reward_acc_se"], "n": n}
    scores = []
    for path in (ckpt, args["init_from"]):
        model, _, _ = load_checkpoint(path, device)
        scores.append(reference_logprobs(model, contextlib.nullcontext, data, 8, device, dtype)["val"])
        del model
    reward = scores[0] - scores[1]  # (items, 2): chosen, rejected
    acc = float((reward[:, 0] > reward[:, 1]).mean())
    return {"acc": acc, "stderr": accuracy_se(acc, n), "n": n}


def rl_before_after(run: Path) -> dict:
    """The held-out metrics of an RL run's first evaluation (step 0, the start) and its last."""
    evals = [r for r in read_log(run) if any(k.startswith("val_") for k in r)]
    if not evals:
        return {}
    first, last = evals[0], evals[-1]
    return {k[4:]: (first.get(k), last[k], first["step"], last["step"]) for k in sorted(last)
            if k.startswith("val_") and k != "val_loss" and isinstance(last[k], (int, float))}  # loss: -reward


def plot_curves(runs: list, path: Path) -> Optional[Path]:
    """Train and val loss of every run against its steps, a panel each (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        log = read_log(Path(run["run"]))
        for key in ("loss", "val_loss"):
            pts = [(r["step"], r[key]) for r in log if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if key == "val_loss" else None, markersize=3)
        ax.set_title(f"{run['stage']} ({Path(run['run']).name})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


class CardBudget:
    """The report card's time budget: its work is a list of parts in order (each model's "load", "text",
    "replies", "tools"). A kind of part measured once is taken to cost as much again; what is left after the
    known parts still to come is shared evenly by the next part and the later parts of kinds not yet
    measured. seconds=None: no budget (every part may take what it takes); start: when it began (clock's
    time; default now)."""

    def __init__(self, seconds: Optional[float], parts: list, start: Optional[float] = None, clock=time.monotonic):
        self.seconds, self.clock, self.start = seconds, clock, clock() if start is None else start
        self.parts, self.cost = list(parts), {}

    def spent(self) -> float:
        return self.clock() - self.start

    def until(self) -> Optional[float]:
        """The clock time by which the next part should end (None without a budget)."""
        if self.seconds is None:
            return None
        later = self.parts[1:]
        known = sum(self.cost[k] for k in later if k in self.cost)
        shared_by = 1 + sum(k not in self.cost for k in later)
        return self.clock() + max(0.0, (self.seconds - self.spent() - known) / shared_by)

    def done(self, kind: str, seconds: float):
        """The next part, of `kind`, took `seconds`: its kind's cost from now on, if it is the first."""
        assert self.parts and self.parts[0] == kind, (kind, self.parts[:1])
        self.parts.pop(0)
        self.cost.setdefault(kind, seconds)


def fits(started: float, done: int, until: Optional[float], clock=time.monotonic) -> bool:
    """Whether another item, as long as the mean of the `done` ones since `started`, ends by `until`."""
    now = clock()
    return until is None or now + (now - started) / max(done, 1) <= until


def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def card(machine_info: dict, stages: list, results: list, dpo: Optional[dict], rl: dict, png: Optional[str],
         wall: Optional[float] = None, budget: Optional[dict] = None) -> str:
    """The report card as markdown. results: eval.py's, one per model ("text" per held-out file,
    "prompts" with the raw replies, "tools" with the raw replies to TOOL_PROMPTS). budget (a time budget's):
    {"seconds", "spent", "text": {file: (scored, of)}, "replies": (answered, of), "tools": (answered, of)},
    said in the header and beside what it cut."""
    m = machine_info
    lines = ["# minimind report card", "",
             f"- machine: {m['cpu']}" + (f", bf16 units: {', '.join(m['bf16_units'])}" if m["bf16_units"] else
                                        ", no bf16 units") + f", {m['threads']} threads" +
             (f"; GPU {m['gpu']}" if m["gpu"] else "; no GPU"),
             f"- versions: torch {m['torch']}, python {m['python']}, commit {m['commit'] or '-'}"]
    if wall is not None:
        lines.append(f"- the run up to this report: {wall / 60:.1f} min wall-clock (tokenizer and data included)")
    if budget:
        lines.append(budget_line(budget))
    lines += ["", "## Training", "", "| stage | run | steps | wall (s) | tokens | tokens/s | train loss | val loss |",
              "|---|---|---|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s['stage']} | `{s['run']}` | {s['steps']} | {fmt(s['seconds'], '.0f')} | {s['tokens']:,} | "
                     f"{fmt(s['tok_s'], ',.0f')} | {fmt(s['loss'])} | {fmt(s['val_loss'])} |")
    sft = next((s for s in stages if s["stage"] == "sft"), None)
    lines += ["", "## Held out", ""]
    if sft:
        lines.append(f"- SFT held-out reply loss: {fmt(sft['val_loss'])} nats/token")
    if dpo:
        lines.append(f"- DPO held-out reward accuracy: {dpo['acc']:.3f} ± {dpo['stderr']:.3f} ({dpo['n']} pairs; "
                     "0.5 = chance)")
    for k, (before, after, s0, s1) in rl.items():
        lines.append(f"- GRPO held-out {k}: {fmt(before)} at step {s0} -> {fmt(after)} at step {s1}")
    files = sorted({f for r in results for f in r.get("text", {}).get("files", {})})
    if files:
        lines += ["", "Bits per byte on held-out text (lower is better" + text_cut(budget) + "):", "",
                  "| model | " + " | ".join(Path(f).stem for f in files) + " |", "|---" * (len(files) + 1) + "|"]
        for r in results:
            got = r.get("text", {}).get("files", {})
            lines.append(f"| {r['model']['name']} | " + " | ".join(fmt(got.get(f, {}).get("bpb")) for f in files) + " |")
    lines += replies_section(results, budget)
    lines += tool_calls_section(results, budget)
    if png:
        lines += ["", "## Loss curves", "", f"![loss curves]({png})"]
    return "\n".join(lines) + "\n"


def cut(pair) -> bool:
    return pair[0] < pair[1]


def budget_line(budget: dict) -> str:
    """The header's line on the time budget: what the card took of it and what it cut to fit."""
    cuts = ([f"held-out text, {sum(n for n, _ in budget['text'].values())} of "
             f"{sum(m for _, m in budget['text'].values())} documents"] if any(map(cut, budget["text"].values()))
            else []) + ([f"replies, {budget['replies'][0]} of {budget['replies'][1]} prompts"]
                        if budget["replies"] and cut(budget["replies"]) else []) + \
           ([f"tool calls, {budget['tools'][0]} of {budget['tools'][1]} tool prompts"]
            if budget.get("tools") and cut(budget["tools"]) else [])
    return (f"- this card: {budget['spent']:.0f} s of its {budget['seconds']:.0f} s time budget (--max-time); " +
            ("cut to fit it: " + "; ".join(cuts) if cuts else "nothing cut"))


def text_cut(budget: Optional[dict]) -> str:
    """Beside the bits per byte: how many documents of each file were scored, when the budget cut any."""
    if not budget or not any(map(cut, budget["text"].values())):
        return ""
    return ("; time budget: " + ", ".join(f"{Path(f).stem} {n} of {m}" for f, (n, m) in sorted(budget["text"].items()))
            + " documents, the same ones for every model, in a fixed seeded order")


def replies_section(results: list, budget: Optional[dict] = None) -> list:
    """Each chat model's replies as every front end shows them (reasoning apart), and how many are clean."""
    lines = ["", "## Replies", ""]
    if budget and budget["replies"] and cut(budget["replies"]):
        lines += [f"Replies to {budget['replies'][0]} of {budget['replies'][1]} prompts (time budget: one of each "
                  "category in turn, the same prompts for every model).", ""]
    for r in results:
        if not r.get("prompts") or r["prompts"][0]["format"] != "chat":
            continue
        turns = [t for p in r["prompts"] for t in p["turns"]]
        shown = [reply_parts(t["reply"]) for t in turns]
        clean = sum(template_clean(c) and template_clean(rs) for rs, c, _ in shown)
        raw = sum(template_clean(t["reply"]) for t in turns)
        lines += [f"### {r['model']['name']}: {clean}/{len(turns)} replies template-clean as shown "
                  f"({raw}/{len(turns)} raw replies without any template tag)", ""]
        for t, (reasoning, content, calls) in zip(turns, shown):
            extra = (f" [reasoning: {reasoning[:80]!r}]" if reasoning else "") + \
                    "".join(f" [tool call {c['function']['name']}]" for c in calls)
            lines.append(f"- **{t['user']}** -> {content[:200]!r}{extra}")
        lines.append("")
    return lines


def tool_calls_section(results: list, budget: Optional[dict] = None) -> list:
    """Each chat model's greedy replies to the tool prompts: how many make a valid call (tool_call_verdict),
    and per prompt the call or what was wrong."""
    answered = [r for r in results if r.get("tools")]
    if not answered:
        return []
    lines = ["", "## Tool calls", "", "Greedy replies to prompts offered a tool each; valid: the reply parses into "
             "a call of the offered tool whose arguments fit its schema.", ""]
    if budget and budget.get("tools") and cut(budget["tools"]):
        lines += [f"Tool prompts: {budget['tools'][0]} of {budget['tools'][1]} (time budget: the first ones, the "
                  "same for every model).", ""]
    for r in answered:
        verdicts = [(None, f"the prompt ({t['prompt_tokens']} tokens) does not fit the context ({t['context']})")
                    if t["prompt_tokens"] >= t["context"] else tool_call_verdict(t["reply"], t["tools"])
                    for t in r["tools"]]
        lines += [f"### {r['model']['name']}: tool calls: {sum(e is None for _, e in verdicts)} of "
                  f"{len(verdicts)} valid", ""]
        for t, (call, error) in zip(r["tools"], verdicts):
            fit = t["prompt_tokens"] < t["context"]
            reply = f": {t['reply'][:60]!r}" if t["reply"] else " (an empty reply)" if fit else ""
            lines.append(f"- **{t['user']}** -> " +
                         (f"valid: `{call[:120]}`" if error is None else error[:100] + reply))
        lines.append("")
    return lines
