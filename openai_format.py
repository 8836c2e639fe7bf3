"""OpenAI's wire format, as serve.py speaks it: error bodies, request schemas, stop strings, and the
shapes of answers and streamed chunks. Pure data in, data out: no HTTP here.

    from openai_format import APIError, ChatCompletionRequest, ChatOut, conversation, invalid
    try:
        r = ChatCompletionRequest.model_validate_json(body)  # strict: no "10" for 10, finite numbers
    except ValidationError as e:
        raise invalid(e)  # -> 400 naming the field, OpenAI's {"error": {message, type, param, code}}
    messages, tools = conversation(r)  # what tokenizer.render_chat takes
    out = ChatOut(r.stop, r.thinking())  # decoded text in, OpenAI's deltas out
    deltas = out.feed(text) ... + out.finish()
"""
import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from minimind import SamplingParams
from tokenizer import ReplyParser

MAX_STOP, MAX_STOP_CHARS = 16, 256  # stop strings per request, characters per stop string
MAX_TOOLS, MAX_NAME = 128, 64  # tools (and tool calls) per message, characters of a function name (OpenAI's)
MAX_LOGPROBS = 20  # /v1/completions logprobs: most alternatives per token (OpenAI's legacy limit was 5)


# -----------------------------------------------------------------------------
# errors: OpenAI's body, a 4xx for anything the client sent

class APIError(Exception):
    """An error answered as OpenAI's JSON: `status`, body() and the response's extra `headers`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _param(loc: tuple) -> Optional[str]:
    """("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number", "too_short",
                "too_long", "literal_error", "value_error"}


def invalid(e: ValidationError) -> APIError:
    """A pydantic validation error -> 400 naming the first offending field (never echoing its value)."""
    err = e.errors(include_url=False, include_input=False, include_context=True)[0]
    kind, param = err["type"], _param(err["loc"])
    if kind == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request ({err['msg']}).", None,
                        "invalid_json")
    if param is None:
        return APIError(400, f"The request body must be a JSON object ({err['msg']}).", None, "invalid_json")
    msg = str(err["ctx"]["error"]) if kind == "value_error" else err["msg"]
    code = ("missing_required_parameter" if kind == "missing" else
            "invalid_value" if kind in RANGE_ERRORS else "invalid_type")
    return APIError(400, f"Invalid '{param}': {msg}.", param, code)


# -----------------------------------------------------------------------------
# the request schema (OpenAI's, with vLLM's top_k, repetition_penalty and ignore_eos)

class Schema(BaseModel):
    """Types are strict (no "10" for 10, no 1 for true), numbers finite, unknown fields ignored, and a
    null field is a field not given."""
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(Schema):
    include_usage: bool = False


ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _text_parts(c):
    """A message's content: a string, or OpenAI's list of text parts joined by newlines."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                   and isinstance(p.get("text"), str) for p in c):
        return "\n".join(p["text"] for p in c)
    raise ValueError('must be a string or a list of text parts, {"type": "text", "text": "..."}')


class CalledFunction(Schema):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    arguments: Any = "{}"  # OpenAI sends JSON text; MiniMind's data an object

    @field_validator("arguments")
    @classmethod
    def _text_or_object(cls, a):
        if not isinstance(a, (str, dict)):
            raise ValueError("must be a string (JSON text) or an object")
        return a


class ToolCall(Schema):
    """A call the assistant made, as a client sends it back in the conversation."""
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = Field(None, validate_default=True)  # a string or a list of text parts; assistant: null too
    reasoning_content: Optional[str] = None  # assistant: its thinking, rendered in the think block
    tool_calls: Optional[list[ToolCall]] = Field(None, max_length=MAX_TOOLS)  # assistant only
    tool_call_id: Optional[str] = None  # tool: the call answered (the template does not show it)

    @field_validator("content")
    @classmethod
    def _text(cls, c, info):
        if c is None and info.data.get("role") == "assistant":
            return ""
        return _text_parts(c)

    @field_validator("tool_calls")
    @classmethod
    def _assistant_calls(cls, calls, info):
        if calls and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages have tool calls")
        return calls


class FunctionSpec(Schema):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    description: Optional[str] = None
    parameters: Optional[dict] = None  # a JSON schema, shown to the model as it is
    strict: Optional[bool] = None


class ToolSpec(Schema):
    """A tool the client offers the model (a function, as OpenAI describes it)."""
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(Schema):
    name: str


class NamedToolChoice(Schema):
    type: Literal["function"]
    function: FunctionName


class ChatTemplateKwargs(Schema):
    """vLLM's and SGLang's way to pass template switches; others are ignored."""
    open_thinking: bool = False  # MiniMind-3's name
    enable_thinking: bool = False  # Qwen3's name


class CompletionBase(Schema):
    """What both endpoints accept."""
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # -1 and 0: off; more than the vocabulary: off
    repetition_penalty: float = Field(1.0, ge=0.01, le=10)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    seed: Optional[int] = Field(None, ge=-2 ** 63, le=2 ** 63 - 1)
    stop: Any = Field(None, validate_default=True)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise ValueError("must be a string or a list of strings")
        if stop and (len(stop) > MAX_STOP or max(map(len, stop)) > MAX_STOP_CHARS):
            raise ValueError(f"at most {MAX_STOP} stop strings of at most {MAX_STOP_CHARS} characters each")
        return [s for s in stop or [] if s]

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty, seed=self.seed)


class ChatCompletionRequest(CompletionBase):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    tools: Optional[list[ToolSpec]] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Any = "auto"  # "none", "auto", "required" or a NamedToolChoice
    parallel_tool_calls: bool = True  # accepted; the model may write several calls either way
    open_thinking: bool = False  # MiniMind's own server's switch
    chat_template_kwargs: Optional[ChatTemplateKwargs] = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("not supported by this server for chat (see /v1/completions)")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, c):
        if c in ("none", "auto", "required"):
            return c
        try:
            return NamedToolChoice.model_validate(c)
        except ValidationError:
            raise ValueError('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
                             ) from None

    @field_validator("tools", mode="wrap")
    @classmethod
    def _tools_as_sent(cls, tools, check):
        """Checked against the schema, kept as sent: the template shows each tool's JSON with the
        client's keys in the client's order (and fields this schema does not name)."""
        check(tools)
        return tools

    def thinking(self) -> bool:
        kw = self.chat_template_kwargs
        return self.open_thinking or bool(kw and (kw.open_thinking or kw.enable_thinking))


class CompletionRequest(CompletionBase):
    prompt: Any  # a string or a list of token ids (one prompt, possibly wrapped in a list)
    max_tokens: Optional[int] = Field(None, ge=0)  # 0: with echo, only the prompt (scored with logprobs)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)  # the top-n alternatives per token
    echo: bool = False
    best_of: int = Field(1, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, p):
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str) or (isinstance(p, list) and p and all(type(t) is int for t in p)):
            return p
        raise ValueError("must be a string or a list of token ids (one prompt per request)")


# -----------------------------------------------------------------------------
# stop strings

class StopText:
    """Text in, text out, cut at the first stop string; text that may still become a stop string
    is held back until it cannot."""

    def __init__(self, stops: list):
        self.stops, self.buf, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[:min(hits)], "", True
            return out
        hold = 0  # longest tail of buf that begins some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:n]):
                    hold = n
                    break
        out = self.buf[:len(self.buf) - hold]
        self.buf = self.buf[len(out):]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


class TextOut:
    """/v1/completions: the generated text, cut at the first stop string, as {"text"} deltas."""

    def __init__(self, stops: list):
        self.cut = StopText(stops)

    @property
    def stopped(self) -> bool:
        return self.cut.stopped

    def feed(self, text: str) -> list:
        text = self.cut.feed(text)
        return [{"text": text}] if text else []

    def finish(self) -> list:
        text = self.cut.flush()
        return [{"text": text}] if text else []

    def finish_reason(self, reason: str) -> str:
        return reason


class ChatOut:
    """/v1/chat/completions: the reply as OpenAI's deltas, as vLLM's reasoning and tool parsers
    give them: {"reasoning_content"} (the think block), {"content"} (cut at the first stop string:
    stop strings apply to the content only) and {"tool_calls": [{index, id, type, function}]}, one
    per <tool_call> block, whole. `thinking`: the prompt ended inside a think block."""

    def __init__(self, stops: list, thinking: bool):
        self.parser, self.cut, self.calls = ReplyParser(thinking), StopText(stops), 0

    @property
    def stopped(self) -> bool:
        return self.cut.stopped

    def feed(self, text: str) -> list:
        return self._shape(self.parser.feed(text))

    def finish(self) -> list:
        return self._shape(self.parser.finish() + [("content", "")])

    def finish_reason(self, reason: str) -> str:
        """The engine's reason -> OpenAI's: a reply that called a tool and ended there is "tool_calls"."""
        return "tool_calls" if reason == "stop" and self.calls else reason

    def _shape(self, events: list) -> list:
        """ReplyParser's (kind, value) events -> OpenAI's deltas."""
        out = []
        for kind, value in events:
            if self.cut.stopped:
                break
            if kind == "reasoning":
                out.append({"reasoning_content": value})
                continue
            text = self.cut.feed(value) if kind == "content" and value else self.cut.flush()  # a call ends the text
            if text:
                out.append({"content": text})
            if kind == "tool_call":
                out.append({"tool_calls": [{"index": self.calls, **value}]})
                self.calls += 1
        return out


# -----------------------------------------------------------------------------
# the request as the chat template takes it

def conversation(r: ChatCompletionRequest):
    """(messages, tools) as tokenizer.render_chat takes them; tools None when tool_choice is "none"."""
    names = [t["function"]["name"] for t in r.tools or []]
    if r.tool_choice != "auto" and r.tool_choice != "none" and not names:
        raise APIError(400, "Invalid 'tool_choice': a tool choice other than 'none' or 'auto' needs 'tools'.",
                       "tool_choice", "invalid_value")
    if isinstance(r.tool_choice, NamedToolChoice) and r.tool_choice.function.name not in names:
        raise APIError(400, "Invalid 'tool_choice': the function named is not in 'tools'.", "tool_choice",
                       "invalid_value")
    messages = []
    for i, m in enumerate(r.messages):
        if m.role == "tool" and not (i and (r.messages[i - 1].tool_calls or r.messages[i - 1].role == "tool")):
            raise APIError(400, f"Invalid 'messages[{i}]': a message with role 'tool' must answer a preceding "
                           "assistant message with 'tool_calls'.", f"messages[{i}].role", "invalid_value")
        msg = {"role": ROLE_ALIASES[m.role], "content": m.content}
        if m.role == "assistant" and m.reasoning_content is not None:
            msg["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        messages.append(msg)
    return messages, (r.tools if names and r.tool_choice != "none" else None)


# -----------------------------------------------------------------------------
# answers: whole, and as server-sent events

def sse(obj) -> bytes:
    """One server-sent event: a JSON object, or bytes as they are (b"[DONE]")."""
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()) + b"\n\n"


def usage(prompt_tokens: int, n: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


def chat_message(got: dict) -> dict:
    """The merged deltas of a chat reply (ChatOut's, strings joined, tool calls listed) -> its message."""
    calls = [{k: c[k] for k in ("id", "type", "function")} for c in got.get("tool_calls", [])]
    message = {"role": "assistant", "content": got.get("content") or (None if calls else "")}
    if got.get("reasoning_content"):
        message["reasoning_content"] = got["reasoning_content"]
    if calls:
        message["tool_calls"] = calls
    return message


def chunk(meta: dict, r: CompletionBase, choice: dict) -> bytes:
    """A streamed chunk of one choice: chat.completion.chunk (a delta) or text_completion (text)."""
    chat = isinstance(r, ChatCompletionRequest)
    kind = "chat.completion.chunk" if chat else "text_completion"
    return sse({**meta, "object": kind, "choices": [{"index": 0, "logprobs": None, "finish_reason": None,
                                                     **({} if chat else {"text": ""}), **choice}]})


def usage_chunk(meta: dict, r: CompletionBase, prompt_tokens: int, n: int) -> bytes:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    kind = "chat.completion.chunk" if isinstance(r, ChatCompletionRequest) else "text_completion"
    return sse({**meta, "object": kind, "choices": [], "usage": usage(prompt_tokens, n)})
