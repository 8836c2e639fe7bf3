"""The tokenizer and the chat format: special tokens, ChatML rendered in one place (`render_chat`,
and the same thing as a Jinja template for transformers), and streaming detokenization that never
shows half a UTF-8 character."""
import codecs
import hashlib
import json
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer as HFTokenizer


BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2
# ChatML, as MiniMind-3 and Qwen use it; `render_chat` below is the same thing in Python
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


def chat_segments(msgs):
    """The ChatML text of a conversation cut into (text, trained) pieces:
    trained = an assistant reply and the <|im_end|> that closes it. Cuts fall only right after a
    role header's newline or after <|im_end|> (a special token), so encoding the pieces one by one
    gives the tokens of the whole text, the tokens the model sees in `sample.py --chat`. The
    newline after the final <|im_end|> is left out: no loss would ever be computed from it."""
    segs, prompt = [], ""
    for m in msgs:
        head = f"{BOS}{m['role']}\n"
        if m["role"] == "assistant":
            segs += [(prompt + head, False), (m["content"] + EOS, True)]
            prompt = "\n"
        else:
            prompt += head + m["content"] + EOS + "\n"
    if msgs[-1]["role"] != "assistant":
        segs.append((prompt, False))
    return segs


def render_chat(messages, add_generation_prompt: bool = False) -> str:
    """ChatML text of a conversation [{"role", "content"}, ...] (same as CHAT_TEMPLATE)."""
    text = "".join(f"{BOS}{m['role']}\n{m['content']}{EOS}\n" for m in messages)
    return text + (f"{BOS}assistant\n" if add_generation_prompt else "")


class Tokenizer:
    """The byte-level BPE tokenizer written by `prepare.py tokenizer` (a `tokenizers` JSON file)."""

    def __init__(self, directory):
        self.dir = Path(directory)
        path = self.dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer here (make one with `python prepare.py tokenizer`)")
        self.tok = HFTokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = (self.tok.token_to_id(t) for t in SPECIAL_TOKENS)

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list:
        return self.encode(render_chat(messages, add_generation_prompt))

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
    special = {t.content for t in hf.get_added_tokens_decoder().values()}
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
