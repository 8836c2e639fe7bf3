"""The documentation against the code: what README.md and docs/*.md state that the code can check.

    python -m pytest tests/test_docs.py -q

- the README is the front door: at most 15,000 characters, the project card's three commands and the
  fresh-clone quick start on its first screen
- the preset tables (README.md, docs/models.md) list every preset of minimind.PRESETS with the
  parameter counts the model has
- every relative link of README.md and docs/*.md points to a file that exists (and, for a link into a
  markdown file with a #fragment, to one of its headings)
- every --flag of a command written in a code block (python prepare.py|train.py|... ) is a flag of
  that script's --help
- every list of modes written `--mode=a|b|...` names train.py's modes, all of them, in its order
- the import graph drawn in docs/architecture.md is the one in the code
"""
import ast
import contextlib
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [README, ROOT / "BENCHMARKS.md", *PAGES]
CARD = ['python train.py --mode=pretrain', 'torchrun --nproc_per_node=4 train.py --mode=dpo',
        'python sample.py --prompt "人工智能是"']
QUICK_START = ["pip install torch==2.13.0 && pip install -r requirements.txt && bash speedrun.sh", "BUDGET=10 bash speedrun.sh",
               "python -m pytest -q"]
FIRST_SCREEN = 40  # lines
SCRIPTS = ("prepare", "train", "sample", "serve", "export", "eval", "bench")
PACKAGES = ("mmkernels", "rl")  # one node each in the import graph


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# -----------------------------------------------------------------------------
# the front door

def test_readme_is_at_most_15000_characters():
    n = len(read(README))
    assert n <= 15_000, f"README.md has {n} characters: move depth into docs/"


def test_readme_and_speedrun_say_what_the_code_does():
    """The DPO step size the README gives is train.py's; the speedrun's budget and shares are the ones
    its comments and the README state, each stage's share is of what is left for it and the stages
    after it, and it sets no step count."""
    import train
    readme, speedrun = read(README), read(ROOT / "speedrun.sh")
    assert f"as many rows as fit in {train.DPO_MICRO_TOKENS:,} tokens" in re.sub(r"\s+", " ", readme)
    assert "25,600" not in readme and "STEPS" not in readme + speedrun and "--max-iters" not in speedrun
    default = re.search(r"BUDGET=\$\{BUDGET:-(\d+)\}", speedrun)[1]
    assert f"`BUDGET={default}` minutes" in re.sub(r"\s+", " ", readme) and f"{default} minutes wall-clock" in speedrun
    calls = re.findall(r"T=\$\(share (\d+) (\d+)\); stage \"(\w+)", speedrun)  # weight, of all left, stage
    weights = [int(w) for w, _, _ in calls]
    assert len(calls) == 5 and [int(a) for _, a, _ in calls] == [sum(weights[i:]) for i in range(5)], calls
    stated = re.findall(r"(\w+) (\d+)", re.sub(r"\s*#\s*", " ", re.search(r"in proportion (.*?) among", speedrun,
                                                                         re.S)[1]))
    assert [(n.lower(), int(w)) for n, w in stated] == [(n, w) for (*_, n), w in zip(calls, weights)][:4] + \
        [("card", weights[4])], (stated, calls)


@pytest.mark.parametrize("command", CARD + QUICK_START)
def test_readme_first_screen_shows_the_card_and_the_quick_start(command):
    first = "\n".join(read(README).splitlines()[:FIRST_SCREEN])
    assert command in first, f"{command!r} is not in the first {FIRST_SCREEN} lines of README.md"


# -----------------------------------------------------------------------------
# presets

def params_text(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def preset_rows(text: str) -> dict:
    """{preset: [cells]} of the markdown table rows whose first cell is a `preset` name."""
    from minimind import PRESETS
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        if line.startswith("|") and cells[0].startswith("`") and name in PRESETS:
            assert name not in rows, f"preset {name} listed twice"
            rows[name] = cells
    return rows


@pytest.fixture(scope="module")
def counts():
    from minimind import PRESETS, MiniMind
    out = {}
    for name, cfg in PRESETS.items():
        model = MiniMind(cfg)
        out[name] = (model.num_params(), model.num_params(active=True))
    return out


def test_readme_preset_table_matches_the_presets(counts):
    rows = preset_rows(read(README))
    assert list(rows) == list(counts), "README.md's preset table should list minimind.PRESETS, in order"
    for name, (n, active) in counts.items():
        want = params_text(n) + (f" ({params_text(active)} active)" if active != n else "")
        assert rows[name][-1] == want, f"README.md: {name} has {want} parameters, the table says {rows[name][-1]}"


def test_models_page_preset_table_matches_the_presets(counts):
    rows = preset_rows(read(ROOT / "docs" / "models.md"))
    assert list(rows) == list(counts), "docs/models.md's preset table should list minimind.PRESETS, in order"
    for name, (n, active) in counts.items():
        assert rows[name][-2:] == [params_text(n), params_text(active) if active != n else ""], \
            f"docs/models.md: {name} has {params_text(n)} parameters, {params_text(active)} active"


# -----------------------------------------------------------------------------
# links

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def anchors(path: Path) -> set:
    text = re.sub(r"```.*?```", "", read(path), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc):
    text = re.sub(r"```.*?```", "", read(doc), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        assert dest.exists(), f"{doc.relative_to(ROOT)}: link to {target}, which does not exist"
        if fragment and dest.suffix == ".md":
            assert fragment in anchors(dest), f"{doc.relative_to(ROOT)}: link to {target}: no such heading"


# -----------------------------------------------------------------------------
# flags of the commands shown

def commands(text: str):
    """Command lines of the fenced code blocks and of inline code spans that start with `python`."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        yield from block.replace("\\\n", " ").splitlines()
    for span in re.findall(r"`(python [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        yield span


def script_flags(line: str):
    """(script, subcommand or None, [--flags]) of each `python X.py ...` / `torchrun ... X.py ...` in a line."""
    for part in re.split(r"&&|\|\||;|\|", line.split(" #")[0]):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        for i, w in enumerate(words):
            name = w[:-3] if w.endswith(".py") else None
            if name in SCRIPTS and i > 0 and (words[0] in ("python", "python3", "torchrun") or "=" in words[0]):
                rest = words[i + 1:]
                sub = rest[0] if name == "prepare" and rest and not rest[0].startswith("-") else None
                yield name, sub, [a.split("=")[0] for a in rest if a.startswith("--")]
                break


def help_text(script: str, sub=None) -> str:
    """`python SCRIPT.py [SUB] --help`, run in this process (every script parses its flags first)."""
    module = importlib.import_module(script)
    out, argv = io.StringIO(), sys.argv
    sys.argv = [f"{script}.py", *([sub] if sub else []), "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            module.main()
    finally:
        sys.argv = argv
    return out.getvalue()


@pytest.fixture(scope="module")
def help_flags():
    """{(script, subcommand): set of flags} from each script's --help."""
    keys = [(s, None) for s in SCRIPTS] + [("prepare", c) for c in ("tokenizer", "pretrain", "sft", "dpo", "rl-task",
                                                                                   "download")]
    return {k: set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text(*k))) for k in keys}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_flags_in_commands_exist(doc, help_flags):
    for line in commands(read(doc)):
        for script, sub, flags in script_flags(line):
            known = help_flags[(script, sub)] | {"--help"}
            unknown = [f for f in flags if f not in known]
            assert not unknown, f"{doc.relative_to(ROOT)}: `{line.strip()}`: {script}.py " \
                                f"{sub or ''} has no {', '.join(unknown)}"


@pytest.mark.parametrize("script", ["speedrun.sh", "docs/post-training-runs.sh"])
def test_shell_scripts_use_flags_that_exist(script, help_flags):
    """Every --flag a shell script of the repository passes (commands and flag arrays alike, comments
    aside) is a flag of some script: a renamed flag cannot leave them behind."""
    text = "\n".join(line.split(" #")[0] for line in read(ROOT / script).splitlines() if not line.lstrip().startswith("#"))
    known = set().union(*help_flags.values()) | {"--help"}
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    assert used and not used - known, f"{script}: no script has {', '.join(sorted(used - known))}"


# -----------------------------------------------------------------------------
# the modes of train.py

MODE_LIST = re.compile(r"--mode=((?:[a-z]+\\?\|)+[a-z]+)")  # --mode=a|b|c, or a\|b\|c inside a table


def mode_lists(text: str) -> list:
    return [m.replace("\\", "").split("|") for m in MODE_LIST.findall(text)]


def test_mode_list_pattern_reads_plain_and_table_lists():
    assert mode_lists("`--mode=pretrain|sft` and | `--mode=a\\|b\\|c` |") == [["pretrain", "sft"], ["a", "b", "c"]]


def test_mode_lists_name_every_mode_of_train():
    train = importlib.import_module("train")
    modes = list(train.build_parser()._option_string_actions["--mode"].choices)
    lists = {doc.relative_to(ROOT).as_posix(): mode_lists(read(doc)) for doc in DOCS}
    assert lists["README.md"] and lists["docs/architecture.md"], "the script tables list train.py's modes"
    for doc, found in lists.items():
        for listed in found:
            assert listed == modes, f"{doc}: --mode={'|'.join(listed)}, but train.py's modes are {'|'.join(modes)}"


# -----------------------------------------------------------------------------
# the import graph

def import_graph() -> dict:
    """{module: set of project modules it imports} for the top-level modules and the packages (mmkernels/,
    rl/), each package one node."""
    files = sorted(ROOT.glob("*.py")) + [f for p in PACKAGES for f in sorted((ROOT / p).glob("*.py"))]
    project = {f.stem for f in ROOT.glob("*.py")} | set(PACKAGES)
    graph = {}
    for f in files:
        me = f.parent.name if f.parent.name in PACKAGES else f.stem
        graph.setdefault(me, set())
        for node in ast.walk(ast.parse(read(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [me] if node.level else [node.module or ""]
            else:
                continue
            graph[me] |= {n.split(".")[0] for n in names if n.split(".")[0] in project} - {me}
    return graph


def test_architecture_page_draws_the_import_graph():
    drawn = {}
    for m in re.finditer(r"^(\w+)\s+→[ \t]*(.*)$", read(ROOT / "docs" / "architecture.md"), flags=re.M):
        drawn[m.group(1)] = set(m.group(2).split())
    actual = import_graph()
    listing = "\n".join(f"{k:<11} → {' '.join(sorted(v))}".rstrip() for k, v in sorted(actual.items()))
    assert drawn == actual, f"docs/architecture.md's import graph is out of date; the code's is:\n{listing}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_the_docstring_examples_as_written(script):
    """A `\\` ending an example line in a plain docstring joins the lines in --help: raw docstrings keep it."""
    src = read(ROOT / f"{script}.py")
    doc = ast.get_docstring(ast.parse(src), clean=False)
    written = src[src.index('"""') + 3:].split('"""')[0]
    assert doc == written, f"{script}.py: its docstring's escapes change the text (make it r\"\"\"...\"\"\")"
