"""The final answer of a completion: think blocks split off, the answer extracted, numbers read, two
answers compared. Pure functions over text; no project imports.

    from rl.answers import extract_answer, answers_match
    answers_match(extract_answer("<think>...</think>The answer is 42."), "42")   # True
"""
import re
import unicodedata
from typing import Optional


# -----------------------------------------------------------------------------
# text of completions: think blocks, answers, numbers

THINK_END = "</think>"
_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[-+]?\d+(?:\.\d+)?")


def split_think(text: str):
    """(think, answer) of a completion: the text before the first `</think>` (without `<think>`) and the
    text after it; ("", text) without a think block."""
    if THINK_END not in text:
        return "", text
    think, answer = text.split(THINK_END, 1)
    return think.replace("<think>", "").strip(), answer.strip()


def normalize(text: str) -> str:
    """NFKC (full-width digits and colons to ASCII), unicode minus to '-'."""
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-")


# Linear on model output: no two `\s*` are separated by optional items only (`\s*(?:是)?\s*:?\s*` took
# cubic time on a marker followed by newlines), so a failed match at a marker backtracks over one
# whitespace run once.
_MARKERS = [
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"(?:最终答案|答案|结果)\s*(?:[是为]\s*)?(?::\s*)?([^\n]+)"),
    re.compile(r"answer\s*(?:is|:)\s*(?::\s*)?([^\n]+)", re.IGNORECASE),
]


def extract_answer(text: str) -> str:
    """The final answer in a completion: the answer part (after `</think>`), then the last
    `\\boxed{X}`, else the last "答案：X" / "答案是X" / "the answer is X" / "Answer: X", else the last
    non-empty line; stripped of surrounding markup and end punctuation."""
    _, answer = split_think(normalize(text))
    for pattern in _MARKERS:
        found = pattern.findall(answer)
        if found:
            return _strip_answer(found[-1])
    lines = [line for line in answer.splitlines() if line.strip()]
    return _strip_answer(lines[-1]) if lines else ""


def _strip_answer(s: str) -> str:
    return s.strip(" \t*$`。.!！,，;；")


def last_number(text: str) -> Optional[float]:
    """The last number in a text ("1,234" and "-3.5" included), or None."""
    found = _NUMBER.findall(normalize(text))
    return float(found[-1].replace(",", "")) if found else None


def answers_match(answer: str, reference: str) -> bool:
    """Does an extracted answer match the reference? Numeric references compare the last number of the
    answer (relative tolerance 1e-6); others compare case- and punctuation-insensitively, also accepting
    an answer that ends with the reference ("The capital is Paris", "首都是巴黎")."""
    ref_num = last_number(reference) if _NUMBER.fullmatch(normalize(reference).strip()) else None
    if ref_num is not None:
        got = last_number(answer)
        return got is not None and abs(got - ref_num) <= 1e-6 * max(1.0, abs(ref_num))
    a, r = _canon(answer), _canon(reference)
    if not r:
        return False
    if a == r:
        return True
    # ends with the reference, at a word boundary for ASCII words
    return a.endswith(r) and not (r[0].isascii() and r[0].isalnum() and a[-len(r) - 1].isascii()
                                  and a[-len(r) - 1].isalnum())


def _canon(s: str) -> str:
    s = normalize(s).casefold().strip()
    s = re.sub(r"\s+", " ", s)
    return s.strip(" *$`\"'“”‘’。.!！,，;；:")
