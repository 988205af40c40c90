"""Text helpers of the reward plane: splitting a Qwen3 response, estimating tokens, key terms (pure functions)."""
from __future__ import annotations

import logging
import re
import unicodedata
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


INVISIBLE = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f\u202a-\u202e"
                       "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]")
"""Zero-width and other invisible format characters: they split a word for a regex but not for a reader."""
_SPACED_OUT = re.compile(r"(?<!\w)(?:\w[ \t]){3,}\w(?!\w)")


def strip_invisible(text: str) -> str:
    return INVISIBLE.sub("", text)


@lru_cache(maxsize=1024)  # each rule asks for the same answer's normalised text
def normalise(text: str) -> str:
    """The text every rule reads: NFKC (full-width letters, digits and brackets become ASCII), invisible characters
    removed, and words spelled out letter by letter ("i g n o r e", "请 忽 略") joined again."""
    text = unicodedata.normalize("NFKC", strip_invisible(text))
    return _SPACED_OUT.sub(lambda m: m.group(0).replace(" ", "").replace("\t", ""), text)


class _FirstOfNFKC(dict):
    """code point -> the first character of its NFKC form, filled on first use (a ``str.translate`` table)."""

    def __missing__(self, code: int) -> str:
        c = chr(code)
        folded = self[code] = (unicodedata.normalize("NFKC", c) or c)[0]
        return folded


_FOLD_TABLE = _FirstOfNFKC()


def fold_chars(text: str) -> str:
    """A same-length copy of ``text`` with each character NFKC-folded to its first character ("＜" -> "<"), for
    finding spans in the original text."""
    return text.translate(_FOLD_TABLE)


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


def _is_cjk(char: str) -> bool:
    """``char`` is in ``_CJK`` (what ``has_cjk`` answers for one character, without a regex)."""
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf" or "\uf900" <= char <= "\ufaff"


@lru_cache(maxsize=1)
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


@lru_cache(maxsize=16384)  # the rules read each run of an answer several times (lines, sentences, the whole text)
def _cut(run: str) -> tuple[str, ...]:
    """jieba's words of a run of CJK characters."""
    return tuple(_jieba().lcut(run))


@lru_cache(maxsize=1 << 14)  # hundreds of thousands of words per thousand answers, from a vocabulary of thousands
def _stem(word: str) -> str:
    """Light English stemming so 'infections' matches 'infection' (plural -s and -es only)."""
    if len(word) > 4 and word.endswith("es") and word[-3] in "sxz":
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


_ROOT_SUFFIX = re.compile(r"(?:ing|ed|ly|es|s)$")


@lru_cache(maxsize=1 << 14)
def root(word: str) -> str:
    """A rougher stem than ``_stem`` (stuffing detection, the offline rubric grader): "chewing" and "chewed" meet
    "chew", "immediately" meets "immediate"."""
    return _ROOT_SUFFIX.sub("", word) if len(word) > 5 else word


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
        for word in _cut(m.group()):
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


_LIST_TOKEN = re.compile(rf"[A-Za-z0-9]+(?:[.\-][A-Za-z0-9]+)*|[{_CJK}]+|[.;:!?。；：！？()（）\[\]]|\n[ \t]*(?:[-*•·]|\d+[.)、])")
_ZH_PARTICLES = frozenset("的了是在和与或及等也就都而但并且把被从向对给让使为以于之其这那有会要能可请")


def _content_runs(text: str) -> list[tuple[int, int, int]]:
    """(start, end, items) of each stretch of content items that no function word, sentence punctuation or bullet
    interrupts. Items are separated by spaces, commas, 、, slashes or plain line breaks; text with no separator (a
    Chinese clause, "300mg") is one item."""
    runs: list[tuple[int, int, int]] = []
    start = end = n = 0

    def close() -> None:
        nonlocal n
        if n:
            runs.append((start, end, n))
        n = 0

    def item(s: int, e: int) -> None:
        nonlocal start, end, n
        if n and s == end:  # no separator: the same item goes on
            end = e
            return
        if n == 0:
            start = s
        end, n = e, n + 1

    for m in _LIST_TOKEN.finditer(text):
        tok = m.group()
        if _is_cjk(tok[0]):
            pos = m.start()
            for w in _cut(tok):
                if w in ZH_STOPWORDS or (len(w) == 1 and w in _ZH_PARTICLES):
                    close()
                else:
                    item(pos, pos + len(w))
                pos += len(w)
        elif tok[0].isalnum():
            if tok.lower() in EN_STOPWORDS:
                close()
            else:
                item(m.start(), m.end())
        else:
            close()
    close()
    return runs


@lru_cache(maxsize=4096)
def longest_content_run(text: str) -> int:
    return max((n for _, _, n in _content_runs(text)), default=0)


@lru_cache(maxsize=64)  # the keyword rule and the rule outcome's covered text ask for the same answer
def without_keyword_lists(answer: str, reference: str, min_run: int) -> tuple[str, int]:
    """The answer with its keyword lists blanked, and how many items they held. A keyword list is a run of at least
    ``min_run`` items, longer than any run in the reference, with no function word or sentence punctuation in it:
    a dump of terms, not a sentence. Its terms do not count as covered."""
    limit = max(min_run, longest_content_run(reference) + 1)
    out, pos, dropped = [], 0, 0
    for start, end, n in _content_runs(answer):
        if n >= limit:
            out += [answer[pos:start], " "]
            pos, dropped = end, dropped + n
    return "".join(out) + answer[pos:], dropped


_SECTION = re.compile(r"^[ \t]*(?:#+[ \t]*|\*\*)?(?:references?|bibliography|sources|citations|further reading|"
                      r"key ?words?|key terms|glossary|tags|index terms|参考文献|参考资料|文献|关键词|关键字|术语表?|标签|"
                      r"检索词)\b[^\n]{0,3}?[:：]?", flags=re.IGNORECASE | re.MULTILINE)
_BULLET = re.compile(r"^[ \t]*(?:[-*•·]|\d+[.)、]|\[\d+\])?[ \t]*")
_JOINERS = frozenset({"and", "or", "with", "plus", "of", "for", "in", "to", "on", "by", "as", "via", "the", "a", "an",
                      "和", "及", "与", "或", "的", "以及", "或者", "并", "加", "、", ",", "，", "/", "&", "+"})
_TOKEN = re.compile(rf"[A-Za-z0-9]+(?:[.\-][A-Za-z0-9]+)*|[{_CJK}]+|[^\sA-Za-z0-9{_CJK}]")
SHORT_LINE_RUN = 4
"""Consecutive short lines (at most two words, no sentence punctuation) that make a one-term-per-line list."""
TEMPLATE_RUN = 3
"""Sentences that are the same once the reference's terms are masked ("Also consider X.") that make stuffing."""
FRAGMENT_RUN = 8
"""Consecutive fragments of at most three words between commas, semicolons, brackets, "or", 即 / 或, at least a third
of them set off as alternatives (or, 即, 或, brackets, slashes), that make a list of synonyms ("aspirin or ASA or
acetylsalicylic acid; ECG or EKG; ..."); a plain enumeration (fever, cough, 乏力、黄疸、...) is not one."""
_ALTERNATIVES = frozenset({"or", "即", "或", "或者", "(", ")", "（", "）", "/", "[", "]"})
_FRAGMENT_SEPS = frozenset({",", ";", "(", ")", "/", "、", "；", "（", "）", "，", "or", "即", "或", "或者", "[", "]"})
_ENDS = frozenset({".", "!", "?", "。", "！", "？", ":", "："})
_LINE_END = re.compile(r"[.!?。！？;；:：]$")
_SENTENCE = re.compile(r"[^.!?。！？;；\n]+[.!?。！？;；]?")


@lru_cache(maxsize=256)  # stuffing detection reads the answer and the reference twice (chains, fragments)
def _tokens(text: str) -> tuple[tuple[int, int, str], ...]:
    out = []
    for m in _TOKEN.finditer(text):
        if _is_cjk(m.group()[0]):
            pos = m.start()
            for w in _cut(m.group()):
                out.append((pos, pos + len(w), w))
                pos += len(w)
        else:
            out.append((m.start(), m.end(), m.group()))
    return tuple(out)


class _TermTest(dict):
    """token -> whether it is one of ``terms`` (key terms and their roots), worked out once per token: a CJK token
    as it is, another one lowercased, stemmed (``_stem``) or rooted (``root``)."""

    def __init__(self, terms: frozenset[str]):
        super().__init__()
        self.terms = terms

    def __missing__(self, tok: str) -> bool:
        if _is_cjk(tok[0]):
            found = tok in self.terms
        else:
            word = tok.lower()
            found = _stem(word) in self.terms or root(word) in self.terms
        self[tok] = found
        return found


def _chains(text: str, is_term: _TermTest) -> list[tuple[int, int, int]]:
    """(start, end, terms) of each run of reference terms joined only by one or two joiners (and, or, of the, 和, 的,
    、, ...)."""
    runs, start, end, n, gap = [], 0, 0, 0, 0
    for s, e, tok in _tokens(text):
        if is_term[tok]:
            if n == 0:
                start = s
            end, n, gap = e, n + 1, 0
        elif tok.lower() in _JOINERS and n and gap < 2:
            gap += 1
        else:
            if n:
                runs.append((start, end, n))
            n, gap = 0, 0
    if n:
        runs.append((start, end, n))
    return runs


def _fragment_runs(text: str) -> list[tuple[int, int, int]]:
    """(start, end, fragments) of each run of at least FRAGMENT_RUN short fragments (at most three words each), a
    third of them or more set off as alternatives."""
    runs: list[tuple[int, int, int]] = []
    frags: list[tuple[int, int]] = []  # the current run of short fragments
    cur: list[tuple[int, int]] = []  # tokens of the fragment being read
    alternatives = 0

    def close_fragment(end_run: bool) -> None:
        nonlocal frags, cur, alternatives
        if cur and len(cur) <= 3:
            frags.append((cur[0][0], cur[-1][1]))
        elif cur:
            end_run = True
        cur = []
        if end_run:
            if len(frags) >= FRAGMENT_RUN and alternatives * 3 >= len(frags):
                runs.append((frags[0][0], frags[-1][1], len(frags)))
            frags, alternatives = [], 0

    last = 0
    for s, e, tok in _tokens(text):
        if "\n" in text[last:s]:
            close_fragment(True)
        last = e
        if tok.lower() in _FRAGMENT_SEPS:
            alternatives += tok.lower() in _ALTERNATIVES and bool(frags or cur)
            close_fragment(False)
        elif tok in _ENDS:
            close_fragment(True)
        else:
            cur.append((s, e))
    close_fragment(True)
    return runs


def _blank(text: str, spans: list[tuple[int, int]]) -> str:
    merged: list[list[int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    out, pos = [], 0
    for s, e in merged:
        out += [text[pos:s], " "]
        pos = e
    return "".join(out) + text[pos:]


@lru_cache(maxsize=64)
def without_stuffing(answer: str, reference: str) -> str:
    """The answer with term stuffing blanked (its terms do not count as covered; ``docs/reward_rules.md``):
    a section of references, keywords or a glossary (References:, Keywords:, 参考文献, 关键词) to the end of the answer;
    a run of at least SHORT_LINE_RUN short lines (one term per line); a chain of reference terms joined only by
    single function words or commas ("aspirin and troponin and ECG with PCI", 阿司匹林和肌钙蛋白及心电图) longer than
    4 and than any such chain in the reference itself; FRAGMENT_RUN or more short fragments in a row between
    commas, semicolons, brackets or "or" (a list of terms or synonyms); TEMPLATE_RUN or more sentences that are the
    same once the reference's terms are masked ("Also consider aspirin. Also consider troponin. ...")."""
    section = _SECTION.search(answer)
    if section and section.start() > 0:
        answer = answer[:section.start()]
    is_term = _TermTest(frozenset(t for term in key_terms(reference, 64) for t in (term, root(term))))
    spans: list[tuple[int, int]] = []
    pos, run = 0, []
    for line in answer.split("\n") + [""]:
        body = line[_BULLET.match(line).end():].strip()
        words = len(_tokens(body))
        if body and words <= 2 and not _LINE_END.search(body):
            run.append((pos, pos + len(line)))
        else:
            if len(run) >= SHORT_LINE_RUN:
                spans += run
            run = []
        pos += len(line) + 1
    limit = max(5, max((n for _, _, n in _chains(reference, is_term)), default=0) + 1)
    spans += [(s, e) for s, e, n in _chains(answer, is_term) if n >= limit]
    fragments = max((n for _, _, n in _fragment_runs(reference)), default=0)
    spans += [(s, e) for s, e, n in _fragment_runs(answer) if n > fragments]
    shapes: dict[str, list[tuple[int, int]]] = {}
    for m in _SENTENCE.finditer(answer):
        toks = _tokens(m.group())
        if any(is_term[t] for _, _, t in toks):
            shape = " ".join("#" if is_term[t] else t.lower() for _, _, t in toks)
            shapes.setdefault(shape, []).append(m.span())
    spans += [span for group in shapes.values() if len(group) >= TEMPLATE_RUN for span in group]
    return _blank(answer, spans) if spans else answer
