"""The tokenizer and the chat format: MiniMind-3's special tokens and chat template (ChatML with think
blocks, tools, tool calls and tool responses), rendered in one place (`chat_spans`, `chat_segments`,
`render_chat`) and kept as the Jinja template for transformers; chat encoding in which message content
never becomes a control token (`Tokenizer.encode_chat`); the parser of what the model writes (reasoning,
text, tool calls; whole or streamed); streaming detokenization that never shows half a character."""
import codecs
import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer as HFTokenizer


BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2 in every tokenizer of this project, old or new
THINK, THINK_END = "<think>", "</think>"
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# MiniMind-3's added tokens, in id order (0..35), with its `special` flag: special tokens are dropped
# by decode(skip_special_tokens=True); the think and tool tags are not, so replies keep them.
ADDED_TOKENS = [(t, True) for t in (
    PAD, BOS, EOS, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
    "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>")] + [(t, False) for t in (
    TOOL_CALL, TOOL_CALL_END, "<tool_response>", "</tool_response>", THINK, THINK_END,
    *(f"<|buffer{i}|>" for i in range(1, 10)))]
ROLES = ("system", "user", "assistant", "tool")

# MiniMind-3's chat template, verbatim (its model/tokenizer_config.json). `chat_segments` below
# renders the same text in Python; tests/test_chat_template.py holds the two to each other.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if true %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if open_thinking is defined and open_thinking is true %}
        {{- '<think>\n' }}
    {%- else %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")
EMPTY_THINK = f"{THINK}\n\n{THINK_END}\n\n"  # what every reply without reasoning starts with


def _text(x) -> str:
    return x if isinstance(x, str) else ""


# A span is (text, literal): literal text is the caller's (message content, reasoning, tool names,
# arguments and specs) and never becomes a control token (`Tokenizer.encode_spans`); the rest is the
# template's own, whose markers (<|im_start|>, <think>, <tool_call>, ...) do.

def _merged(spans) -> list:
    """Spans with the empty ones left out and neighbours of the same kind joined."""
    out = []
    for text, literal in spans:
        if not text:
            continue
        if out and out[-1][1] == literal:
            out[-1] = (out[-1][0] + text, literal)
        else:
            out.append((text, literal))
    return out


def _tool_call_spans(call) -> list:
    """One assistant tool call as the template writes it: a <tool_call> block of {"name", "arguments"}.
    `call` is OpenAI's {"function": {"name", "arguments"}} or just {"name", "arguments"}; string
    arguments (OpenAI sends JSON text) are written as they are, objects as JSON."""
    call = call.get("function") or call
    args = call.get("arguments", {})
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return [(f'{TOOL_CALL}\n{{"name": "', False), (str(call.get("name", "")), True), ('", "arguments": ', False),
            (args, True), (f"}}\n{TOOL_CALL_END}", False)]


def _assistant_spans(m) -> list:
    """What the assistant wrote in message `m`: its think block (empty when it has no reasoning),
    its text, its tool calls. Reasoning comes from `reasoning_content`, else out of the content's
    <think>...</think>."""
    content, reasoning = _text(m.get("content")), m.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = ""
        if THINK_END in content:
            reasoning = content.split(THINK_END)[0].rstrip("\n").split(THINK)[-1].lstrip("\n")
            content = content.split(THINK_END)[-1].lstrip("\n")
    spans = [(f"{THINK}\n", False), (reasoning.strip("\n"), True), (f"\n{THINK_END}\n\n", False),
             (content.lstrip("\n"), True)]
    for i, call in enumerate(m.get("tool_calls") or []):
        spans += [("\n" if i or content else "", False), *_tool_call_spans(call)]
    return spans


def chat_spans(messages, *, tools=None, add_generation_prompt: bool = False, open_thinking: bool = False,
               enable_thinking: bool = False) -> list:
    """The chat-template text of a conversation cut into (spans, trained) pieces, spans [(text,
    literal)] (above): `chat_segments` with the caller's text told apart from the template's, so
    that `Tokenizer.encode_spans` can keep content from forging turns. Arguments as in `chat_segments`."""
    segs, prompt = [], []
    first_system = bool(messages) and messages[0].get("role") == "system"
    if tools:
        prompt += [(f"{BOS}system\n", False)]
        if first_system:
            prompt += [(_text(messages[0].get("content")), True), ("\n\n", False)]
        prompt += [(TOOLS_HEADER, False)]
        for t in tools:
            prompt += [("\n", False), (json.dumps(t, ensure_ascii=False), True)]
        prompt += [(TOOLS_FOOTER + f"{EOS}\n", False)]
    elif first_system:
        prompt += [(f"{BOS}system\n", False), (_text(messages[0].get("content")), True), (f"{EOS}\n", False)]
    for i, m in enumerate(messages):
        role, content = m.get("role"), _text(m.get("content"))
        if role == "user" or (role == "system" and i > 0):
            prompt += [(f"{BOS}{role}\n", False), (content, True), (f"{EOS}\n", False)]
        elif role == "assistant":
            segs += [(prompt + [(f"{BOS}assistant\n", False)], False), (_assistant_spans(m) + [(EOS, False)], True)]
            prompt = [("\n", False)]
        elif role == "tool":  # tool results go back as a user turn, consecutive ones in the same turn
            if i == 0 or messages[i - 1].get("role") != "tool":
                prompt += [(f"{BOS}user", False)]
            prompt += [("\n<tool_response>\n", False), (content, True), ("\n</tool_response>", False)]
            if i == len(messages) - 1 or messages[i + 1].get("role") != "tool":
                prompt += [(f"{EOS}\n", False)]
    if add_generation_prompt:
        prompt += [(f"{BOS}assistant\n" + (f"{THINK}\n" if open_thinking or enable_thinking else EMPTY_THINK), False)]
    if prompt:
        segs.append((prompt, False))
    return [(_merged(spans), trained) for spans, trained in segs]


def chat_segments(messages, *, tools=None, add_generation_prompt: bool = False, open_thinking: bool = False,
                  enable_thinking: bool = False) -> list:
    """The chat-template text of a conversation cut into (text, trained) pieces; their concatenation
    is `render_chat`. trained = what an assistant writes: its think block, its text, its tool calls
    and the <|im_end|> that closes them; never a role header, a tool response, the prompt.

    messages: [{"role": "system" | "user" | "assistant" | "tool", "content", and for the assistant
    "reasoning_content" and "tool_calls"}], OpenAI's shapes; tools: OpenAI function specs, listed
    in the system turn. Thinking (`open_thinking`, MiniMind-3's name, or `enable_thinking`, Qwen3's)
    only changes the generation prompt: open, it ends inside a think block ("<think>\\n"); closed,
    with an empty one. Roles the template does not know are left out, as the template does.

    Cuts fall right after "<|im_start|>assistant\\n" and right after <|im_end|> (a special token),
    so encoding the pieces one by one gives the tokens of the whole text. To encode, use the spans
    (`chat_spans`, `Tokenizer.encode_chat`): this text alone cannot tell content from markers."""
    return [("".join(t for t, _ in spans), trained)
            for spans, trained in chat_spans(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             open_thinking=open_thinking, enable_thinking=enable_thinking)]


def render_chat(messages, *, tools=None, add_generation_prompt: bool = False, open_thinking: bool = False,
                enable_thinking: bool = False) -> str:
    """The chat-template text of a conversation: what transformers' apply_chat_template gives with
    CHAT_TEMPLATE, byte for byte (arguments as in `chat_segments`)."""
    return "".join(t for t, _ in chat_segments(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                               open_thinking=open_thinking, enable_thinking=enable_thinking))


# -----------------------------------------------------------------------------
# what the model writes -> reasoning, text, tool calls (OpenAI's message fields)

def _tool_call(body: str) -> Optional[dict]:
    """The JSON inside <tool_call>...</tool_call> as an OpenAI tool call, or None if it is not
    {"name": str, "arguments": ...}. Arguments become JSON text, as OpenAI sends them."""
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: "[" * 1000 from the model
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    args = call.get("arguments", {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": args if isinstance(args, str) else
                         json.dumps(args, ensure_ascii=False)}}


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReplyParser:
    """Split an assistant reply, streamed in pieces of text, into events as vLLM's reasoning and tool
    parsers do: ("reasoning", text), ("content", text), ("tool_call", OpenAI tool call).

        p = ReplyParser(thinking=True)      # the prompt ended inside a think block (open_thinking)
        for piece in pieces: events = p.feed(piece)
        events = p.finish()

    The reply is reasoning up to </think> when `thinking` or when it opens with <think>; the rest
    is content, in which each <tool_call>{"name", "arguments"}</tool_call> becomes a tool call
    (one whose JSON does not parse stays in the content as written). A tag split across pieces is
    held until it is complete. Whitespace at either end of the reasoning and of the content is left
    out (held back until more text follows), so the events of any split of a reply add up to
    `parse_reply` of the whole.

    Think tags the content should not hold (a weak model writes them after the prompt's empty think
    block) are never shown: a <think> before any content opens the reasoning, as one at the very
    beginning does; any other <think>, and a lone </think>, is dropped. (MiniMind-3's template, reading
    a message back, would make the text before a lone </think> reasoning; a stream cannot, that text
    has gone out as content by then, and a reply must read the same streamed or not.)"""

    def __init__(self, thinking: bool = False):
        self.mode = "reasoning" if thinking else "content"  # or "tool": inside a <tool_call> block
        self.buf = ""  # text not yet handled: the beginning of a tag, an open tool call block
        self.started = False  # past a possible <think> at the very beginning
        self.held = []  # whitespace at the end of what the channel has released so far, in pieces
        self.spoke = False  # whether the channel has released any text (leading whitespace is dropped)
        self.settled = False  # a think block ended or a tool call was read: later think tags are dropped
        self.events = []

    def feed(self, text: str) -> list:
        self.buf += text
        self._advance()
        return self._take()

    def finish(self) -> list:
        """The events of what is left at the end: an unfinished tag or tool call block is text."""
        self._say(self.buf)
        self.buf = ""
        return self._take()

    def _take(self) -> list:
        events, self.events = self.events, []
        return events

    def _say(self, text: str):
        """Release text on the current channel (a broken tool call block is content)."""
        if not self.spoke:
            text = text.lstrip()
        body = text.rstrip()
        if not body:  # whitespace only: held in pieces (joining each time is quadratic in their number)
            self.held.append(text)
            return
        self.events.append(("reasoning" if self.mode == "reasoning" else "content", "".join(self.held) + body))
        self.held, self.spoke = [text[len(body):]], True

    def _advance(self):
        if not self.started:
            head = self.buf.lstrip()
            if not head or (THINK.startswith(head) and head != THINK):
                return  # it may still become <think>
            self.started = True
            if head.startswith(THINK):
                self.mode, self.buf = "reasoning", head[len(THINK):]
        buf, i = self.buf, 0  # buf[i:] is not handled yet (slicing off each block copied the rest: quadratic)
        found = {}  # tag -> where it next occurs at or after i (len(buf) + 1: nowhere), each searched again
        while True:  # only once passed: a tag absent from a long reply is searched for once, not per block
            if self.mode == "tool":
                end = buf.find(TOOL_CALL_END, i)
                if end < 0:
                    break
                stop = end + len(TOOL_CALL_END)
                call = _tool_call(buf[i + len(TOOL_CALL):end])
                if call:
                    self.events.append(("tool_call", call))
                self.mode = "content"
                if not call:
                    self._say(buf[i:stop])
                i = stop
                continue
            tags = (THINK_END,) if self.mode == "reasoning" else (TOOL_CALL, THINK, THINK_END)
            for t in tags:
                if found.get(t, -1) < i:
                    found[t] = buf.find(t, i) % (len(buf) + 1)  # not found (-1) -> len(buf)
            at, tag = min((found[t], t) for t in tags)  # the first
            if at > len(buf) - len(tag):
                keep = max(i, len(buf) - max(_partial_tag(buf, t) for t in tags))
                self._say(buf[i:keep])
                i = keep
                break
            if self.mode == "content" and tag != TOOL_CALL:  # a think tag in the content
                self._stray_think(buf[i:at], tag)
                i = at + len(tag)
                continue
            self._say(buf[i:at])
            if self.mode == "reasoning":  # on to the content, a channel of its own
                self.mode, i, self.held, self.spoke, self.settled = "content", at + len(tag), [], False, True
            else:
                self.mode, i, self.settled = "tool", at, True
        self.buf = buf[i:]

    def _stray_think(self, before: str, tag: str):
        """A <think> or a lone </think> in the content, `before` it the content not yet released: a <think>
        before any content opens the reasoning; otherwise the tag is dropped."""
        self._say(before)
        if tag == THINK and not (self.spoke or self.settled):
            self.mode = "reasoning"


def parse_reply(text: str, thinking: bool = False):
    """A finished assistant reply -> (reasoning_content, content, tool_calls), tool calls in OpenAI's
    shape {"id", "type": "function", "function": {"name", "arguments": JSON text}}; "" and [] when
    there are none. `thinking`: the prompt ended inside a think block. Rules in `ReplyParser`."""
    p = ReplyParser(thinking)
    events = p.feed(text) + p.finish()
    return ("".join(v for k, v in events if k == "reasoning"), "".join(v for k, v in events if k == "content"),
            [v for k, v in events if k == "tool_call"])


class Tokenizer:
    """The byte-level BPE tokenizer written by `prepare.py tokenizer` (a `tokenizers` JSON file).

    `encode` turns the text of an added token (<|im_end|>, <think>, ...) into its control token;
    `encode_chat` and `encode_spans` do so only for the template's own markers: the caller's text
    (message content, reasoning, tool calls, tool specs) becomes the ordinary tokens of its
    characters, whatever it holds, so a message cannot close its turn and open a forged one."""

    def __init__(self, directory):
        self.dir = Path(directory)
        path = self.dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer here (make one with `python prepare.py tokenizer`)")
        self.tok = HFTokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = (self.tok.token_to_id(t) for t in SPECIAL_TOKENS)
        self.control = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}  # text -> id
        longest_first = "|".join(re.escape(t) for t in sorted(self.control, key=len, reverse=True))
        self.markers = re.compile(f"({longest_first or '(?!)'})")  # leftmost-longest, as the tokenizer matches
        # the same tokenizer without its added tokens: literal text only ever meets the bytes and merges
        spec = json.loads(self.tok.to_str())
        spec["added_tokens"] = []
        self.plain = HFTokenizer.from_str(json.dumps(spec))

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _runs(self, spans) -> list:
        """Spans [(text, literal)] -> [str | int]: the control token ids of the markers in the template's
        text and, between them, the text to encode without added tokens (literal text joins the run)."""
        runs, run = [], ""
        for text, literal in spans:
            parts = [text] if literal else self.markers.split(text)  # text, marker, text, ..., marker, text
            for j, part in enumerate(parts):
                if j % 2 == 0:
                    run += part
                    continue
                runs += [run, self.control[part]] if run else [self.control[part]]
                run = ""
        return runs + [run] if run else runs

    def encode_spans_batch(self, batch) -> list:
        """[spans per sequence] -> [token ids per sequence] (one encode_batch call). A sequence without
        literal text encodes as `encode` of its text; the template's markers are cut points of the
        whole-text encoding too, so literal text free of added-token text encodes as there."""
        runs = [self._runs(spans) for spans in batch]
        plain = iter(self.plain.encode_batch([r for rs in runs for r in rs if isinstance(r, str)],
                                             add_special_tokens=False))
        return [[i for r in rs for i in ([r] if isinstance(r, int) else next(plain).ids)] for rs in runs]

    def encode_spans(self, spans) -> list:
        return self.encode_spans_batch([spans])[0]

    def encode_chat(self, messages, add_generation_prompt: bool = True, **template) -> list:
        """Token ids of `render_chat(messages, add_generation_prompt=..., **template)` (tools, thinking),
        content kept to ordinary tokens (`chat_spans`, `encode_spans`)."""
        segs = chat_spans(messages, add_generation_prompt=add_generation_prompt, **template)
        return self.encode_spans([s for spans, _ in segs for s in spans])

    def hash(self) -> str:
        return hashlib.sha256((self.dir / "tokenizer.json").read_bytes()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# streaming detokenization

def _byte_level_alphabet() -> dict:
    """The printable character that byte-level BPE (GPT-2) uses for each byte -> that byte.
    Printable Latin-1 bytes stand for themselves; the other 68 are shifted to 256 + n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


def token_bytes(tok, skip_special_tokens: bool = True) -> list:
    """The UTF-8 bytes of every token id (a token may hold part of a character). Special tokens
    are b"" when skipped. Tokenizers that are not byte-level fall back to decoding each token."""
    hf = tok.tok
    special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    byte_level = json.loads(hf.to_str()).get("decoder", {}).get("type") == "ByteLevel"
    alphabet = _byte_level_alphabet()
    table = []
    for i in range(hf.get_vocab_size()):
        piece = hf.id_to_token(i)
        if piece is None:
            table.append(b"")
        elif piece in special:
            table.append(b"" if skip_special_tokens else piece.encode("utf-8"))
        elif byte_level and all(c in alphabet for c in piece):
            table.append(bytes(alphabet[c] for c in piece))
        else:
            table.append(tok.decode([i]).encode("utf-8"))
    return table


class TokenDecoder:
    """Token ids in, text out, one token at a time; text is released only as whole characters.

        dec = TokenDecoder(tok)
        for t in tokens: print(dec.feed(t), end="")
        print(dec.flush())

    Bytes that do not (yet) form a complete UTF-8 character are held; invalid bytes become U+FFFD."""

    def __init__(self, tok, skip_special_tokens: bool = True, table: Optional[list] = None):
        self.table = table if table is not None else token_bytes(tok, skip_special_tokens)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        b = self.table[token_id] if 0 <= token_id < len(self.table) else b""
        return self.utf8.decode(b)

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)
