"""The tool sandbox of agentic rollouts: three pure-Python tools (calculator, unit_convert, lookup),
tool-call blocks found, checked against their schemas and run, and the system prompt offering them.

    from rl.tools import TOOLS, run_tool_call, tool_response_message
    run_tool_call('{"name": "calculator", "arguments": {"expression": "(3 + 4) * 12"}}')  # '{"result": "84"}'

Tool calls use the MiniMind-3 / Qwen format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
in the assistant text; results go back as a user turn `<tool_response>\\n...\\n</tool_response>` (what
MiniMind-3's chat template renders a "tool" message as). Tools are pure Python over their arguments:
the calculator walks the `ast` of the expression and never calls eval/exec. Refusals and failures are
responses for the model, never exceptions.
"""
import ast
import itertools
import json
import math
import operator
import re
import sys
import unicodedata
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

from rl.answers import normalize, split_think


# -----------------------------------------------------------------------------
# tool sandbox

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
MAX_TOOL_OUTPUT = 2048  # characters of a tool response given back to the model


class ToolError(Exception):
    """A refused or failed tool call; its message goes back to the model."""


@dataclass
class SandboxTool:
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
# superscript digits, signs and brackets: a run of them is a power (NFKC alone would read 2² as 22)
_SUPERSCRIPTS = "\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079\u207a\u207b\u207d\u207e"
_FROM_SUPERSCRIPT = str.maketrans(_SUPERSCRIPTS, "0123456789+-()")


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


def _powers(expression: str) -> str:
    """2² -> 2**(2), 10⁻³ -> 10**(-3): each run of superscripts is the exponent it shows. Any other
    superscript or subscript character (ⁿ, ₂) raises ToolError: NFKC would make it a plain digit or
    letter, and 2₂ silently 22."""
    out, run = [], []
    for c in expression + " ":  # a sentinel ends the last run
        if c in _SUPERSCRIPTS:
            run.append(c)
            continue
        if run:
            out.append("**(" + "".join(run).translate(_FROM_SUPERSCRIPT) + ")")
            run = []
        if unicodedata.decomposition(c).startswith(("<super>", "<sub>")):
            raise ToolError(f"{c!r} is not arithmetic (write powers as 2**3)")
        out.append(c)
    return "".join(out)[:-1]


def calculator(expression: str) -> str:
    """Evaluate arithmetic: numbers, + - * / // % ** (or ^, or superscripts: 2³ is 2**3), unary +/-,
    parentheses; × ÷ and full-width brackets accepted. Anything else - names, calls, attributes, strings,
    lambdas, subscripts - raises ToolError, as do expressions over MAX_EXPR_LEN characters (after NFKC),
    exponents over MAX_EXPONENT and results beyond MAX_MAGNITUDE. The expression is parsed with `ast` and
    walked here; nothing is executed."""
    if not isinstance(expression, str):
        raise ToolError("expression must be a string")
    # the limit holds after normalisation too: NFKC writes the one character ⒇ as (20)
    if len(expression) > MAX_EXPR_LEN or len(normalize(expression)) > MAX_EXPR_LEN:
        raise ToolError(f"expression too long (at most {MAX_EXPR_LEN} characters after Unicode normalisation)")
    expr = normalize(_powers(expression)).replace("×", "*").replace("÷", "/").replace("^", "**")
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
    # `not abs <= max`: nan, infinities and ints beyond float's range (math.isfinite would overflow on them)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= sys.float_info.max:
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
    SandboxTool("calculator", "Evaluate an arithmetic expression (+ - * / // % ** and parentheses)",
         _params(["expression"], expression={"type": "string", "description": "e.g. (3 + 4) * 12"}), calculator),
    SandboxTool("unit_convert", "Convert a value between units of length, mass, time or temperature",
         _params(["value", "from_unit", "to_unit"], value={"type": "number"},
                 from_unit={"type": "string", "description": "e.g. km, kg, hour, celsius"},
                 to_unit={"type": "string"}), unit_convert),
    SandboxTool("lookup", "Look up the capital of a country or the symbol of a chemical element",
         _params(["key"], key={"type": "string", "description": "a country or an element, e.g. France, iron"}),
         lookup),
]}

_JSON_TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,),
               "object": (dict,), "array": (list,)}


def _properties(parameters) -> dict:
    """name -> schema (a dict) of the arguments a parameters schema declares; whatever a record's schema
    holds instead of a dict reads as {} (no constraint)."""
    props = parameters.get("properties") if isinstance(parameters, dict) else None
    return {k: v if isinstance(v, dict) else {} for k, v in props.items()} if isinstance(props, dict) else {}


def validate_arguments(arguments, parameters: dict) -> Optional[str]:
    """Check a tool call's arguments against its JSON schema (object with properties, required, types).
    Returns an error message, or None when they fit. Unknown argument names are errors."""
    if not isinstance(arguments, dict):
        return "arguments must be a JSON object"
    props = _properties(parameters)
    required = parameters.get("required") if isinstance(parameters, dict) else None
    missing = [k for k in required if isinstance(k, str) and k not in arguments] if isinstance(required, list) else []
    if missing:
        return f"missing argument(s): {', '.join(missing)}"
    for k, v in arguments.items():
        if k not in props:
            return f"unknown argument {k!r} (expected: {', '.join(props)})"
        kind = props[k].get("type")
        types = _JSON_TYPES.get(kind) if isinstance(kind, str) else None
        if types and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            return f"argument {k!r} must be a {kind}"
    return None


def find_tool_calls(text: str) -> list:
    """The contents of every <tool_call>...</tool_call> block in a text, in order: each opening tag with
    the first closing tag after it. One pass of str.find: a lazy regex rescans the rest of the text from
    every unclosed opening tag (quadratic)."""
    blocks, at = [], 0
    while (start := text.find(TOOL_CALL_START, at)) >= 0:
        end = text.find(TOOL_CALL_END, start + len(TOOL_CALL_START))
        if end < 0:  # no opening tag after this one is closed either
            break
        blocks.append(text[start + len(TOOL_CALL_START):end].strip())
        at = end + len(TOOL_CALL_END)
    return blocks


def record_tools(record) -> Optional[list]:
    """The tool schemas a record offers: record["tools"], a list or its JSON text, keeping the well-formed
    entries ({"type": "function", "function": {...}} or the function itself, a dict with a string
    "name"). None when it offers none (no "tools", or an empty list); [] when "tools" does not parse
    (a record is data: a broken one makes every call invalid, it does not stop the run)."""
    tools = (record or {}).get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):  # RecursionError: "[" * 5000
            return []
    if not tools:
        return None
    if not isinstance(tools, list):
        return []
    return [t for t in tools if isinstance(t, dict) and isinstance(t.get("function", t), dict)
            and isinstance(t.get("function", t).get("name"), str)]


def schemas_of(record) -> dict:
    """name -> parameters schema of the tools a record offers (record_tools), else of TOOLS."""
    tools = record_tools(record)
    if tools is None:
        return {name: t.parameters for name, t in TOOLS.items()}
    return {t.get("function", t)["name"]: t.get("function", t).get("parameters", {}) for t in tools}


MAX_JSON_DEPTH = 64  # a tool call nests a few levels; deeper is refused before parsing
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """The deepest nesting of [ and { in `text`, brackets inside JSON strings not counted. Checked
    before json.loads, so that a deep call is refused the same way whatever Python's recursion limit
    (1,000 by default; inductor raises it to 2,000 once it compiles, and json's parser recurses)."""
    bare = _JSON_STRING.sub("", text)
    return max(itertools.accumulate(_NESTING.get(c, 0) for c in bare), default=0)


def check_tool_call(block: str, schemas: dict):
    """Parse one tool-call block (its JSON, with or without the tags) against `schemas` (name ->
    parameters). Returns (call dict or None, error message or None)."""
    inner = find_tool_calls(block)
    text = inner[0] if inner else block.strip()
    if json_depth(text) > MAX_JSON_DEPTH:  # so json's parser, which recurses, never meets it
        return None, "tool call is not valid JSON (nested too deeply)"
    try:
        call = json.loads(text)
    except ValueError as e:  # a JSONDecodeError, or int()'s refusal of a number of over 4300 digits
        return None, f"tool call is not valid JSON ({getattr(e, 'msg', str(e).split(':')[0])})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        return None, 'tool call must be {"name": "...", "arguments": {...}}'
    if set(call) - {"name", "arguments"}:
        return None, f"unexpected key(s) in tool call: {', '.join(sorted(set(call) - {'name', 'arguments'}))}"
    if call["name"] not in schemas:
        return None, f"unknown tool {call['name']!r} (available: {', '.join(schemas)})"
    error = validate_arguments(call["arguments"], schemas[call["name"]])
    return (call, None) if error is None else (None, error)


def run_tool_call(block: str, registry: dict = None) -> str:
    """Execute one tool call (the JSON of a <tool_call> block, tags optional) with a registry of SandboxTools
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
    text = json.dumps(out, ensure_ascii=False)
    if len(text) > MAX_TOOL_OUTPUT:  # cut the value, not the JSON: the model always reads valid JSON
        (key, value), = out.items()
        value = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        room = MAX_TOOL_OUTPUT - len(json.dumps({key: "…"}, ensure_ascii=False))
        n = 0
        for c in value:  # escapes take more room than their character: count what each one takes
            room -= len(json.dumps(c, ensure_ascii=False)) - 2
            if room < 0:
                break
            n += 1
        text = json.dumps({key: value[:n] + "…"}, ensure_ascii=False)
    return text


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
    args = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in _properties(f.get("parameters")).items())
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
