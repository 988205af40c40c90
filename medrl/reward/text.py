"""Text helpers of the reward plane: splitting a Qwen3 response, estimating tokens, key terms (pure functions)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RUN = re.compile(f"[{_CJK}]+")
_LATIN_RUN = re.compile(r"[A-Za-z]+")
_ONE_TOKEN = re.compile(r"[^\sA-Za-z]")
_EN_WORD = re.compile(r"[a-z0-9]+(?:[.\-][a-z0-9]+)*")

EN_STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each either few for from further had has have having he her here hers
him his how however i if in into is it its itself just may me might more most must my no nor not now of off often on
once only or other our out over own per same she should so some such than that the their them then there these they
this those through to too under until up upon us usually very was we were what when where which while who whom why
will with within without would you your yours
""".split())
ZH_STOPWORDS = frozenset("""
的 了 是 在 和 与 或 及 等 也 就 都 而 但 如果 因为 所以 可以 一个 一种 这个 那个 这些 那些 我们 你们 他们 她们 它们 通常 一般
可能 需要 进行 以及 或者 并且 而且 然后 其中 没有 不是 什么 怎么 如何 为什么 哪些 非常 比较 主要 包括 由于 对于 关于 目前
""".split())


@dataclass(frozen=True)
class SplitResponse:
    think: str | None
    """Text inside the ``<think>`` block (None when the response has no closed block)."""
    answer: str
    """The final answer: text after the last ``</think>`` (the whole text when there is none), stripped."""


def split_response(text: str) -> SplitResponse:
    """Split a Qwen3 response into its reasoning and final answer; an unclosed ``<think>`` leaves no answer."""
    if THINK_CLOSE in text:
        head, answer = text.rsplit(THINK_CLOSE, 1)
        think = head.split(THINK_OPEN, 1)[1] if THINK_OPEN in head else head
        return SplitResponse(think=think.strip(), answer=answer.strip())
    if THINK_OPEN in text:
        return SplitResponse(think=None, answer="")
    return SplitResponse(think=None, answer=text.strip())


def estimate_tokens(text: str) -> int:
    """Tokenizer-free estimate close to Qwen/DeepSeek BPE counts: each CJK character, digit and punctuation mark
    counts 1, a run of Latin letters counts ceil(letters / 4)."""
    return len(_ONE_TOKEN.findall(text)) + sum((len(w) + 3) // 4 for w in _LATIN_RUN.findall(text))


def has_cjk(text: str) -> bool:
    return _CJK_RUN.search(text) is not None


@lru_cache(maxsize=1)
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def _stem(word: str) -> str:
    """Light English stemming so 'infections' matches 'infection' (plural -s and -es only)."""
    if len(word) > 4 and word.endswith("es") and word[-3] in "sxz":
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def en_words(text: str) -> set[str]:
    """Stemmed lowercase words (and numbers) of a text."""
    return {_stem(w) for w in _EN_WORD.findall(text.lower())}


@lru_cache(maxsize=8192)
def key_terms(text: str, max_terms: int) -> tuple[str, ...]:
    """Key terms of a reference, first occurrences in order: Chinese words of >= 2 characters from jieba and English
    words of >= 3 letters (stemmed) or numbers, stopwords removed."""
    terms: list[str] = []
    seen: set[str] = set()

    def add(term: str) -> None:
        if term not in seen:
            seen.add(term)
            terms.append(term)

    pos = 0
    for m in _CJK_RUN.finditer(text):
        _add_en(text[pos:m.start()], add)
        for word in _jieba().lcut(m.group()):
            if len(word) >= 2 and word not in ZH_STOPWORDS:
                add(word)
        pos = m.end()
    _add_en(text[pos:], add)
    return tuple(terms[:max_terms])


def _add_en(text: str, add) -> None:
    for word in _EN_WORD.findall(text.lower()):
        if word in EN_STOPWORDS:
            continue
        if any(c.isdigit() for c in word) or len(word) >= 3:
            add(_stem(word))


def term_found(term: str, answer: str, answer_words: set[str]) -> bool:
    """Chinese terms match as substrings (segmentation-proof), English terms as stemmed words."""
    return term in answer if has_cjk(term) else term in answer_words
