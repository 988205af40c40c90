"""Rubric gaming detectors and the offline criterion grader (pure; ``docs/reward.md``, "Rubric reward").

``rubric_gaming`` finds what a policy could write to please a rubric grader instead of answering: a claim that the
criteria are met, or a sentence that echoes a criterion (a near-verbatim copy, or the criterion's terms under
rubric meta-language: "the response mentions ...", "该回答提到 ..."), a checklist of criteria. Such a response is
treated as a prompt injection: R = 0 and it is never sent to the grader (flag ``rubric_gaming``).

``offline_criteria`` is the grader of ``judge.provider: reference`` (deterministic, no API): a criterion is met when
one sentence of the graded answer (keyword lists and stuffing blanked: ``rubric_reward.graded_answer``) holds at
least ``OFFLINE_SHARE`` of the criterion's content terms (its key terms less rubric verbs such as "mentions",
"advises", 提到, 建议); one sentence counts for at most ``SENTENCE_CREDIT`` criteria, so a sentence stuffed with
every criterion's terms meets at most two. Negative criteria use the same test ("met" = the bad behaviour's terms are
said), which cannot tell "take antibiotics" from "antibiotics will not help": the offline grader is for make run and
CI, not for training a real model.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

from medrl.reward.text import en_words, has_cjk, key_terms, normalise, root

OFFLINE_SHARE = 0.6
SENTENCE_CREDIT = 2
ECHO_SHARE = 0.9
"""A sentence that contains an unbroken copy of this share of a criterion's words (Chinese: characters), at least
ECHO_MIN_UNITS of them, echoes it."""
ECHO_MIN_UNITS = 4
_UNIT = re.compile(r"[a-z0-9]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

CLAIM = re.compile("|".join(f"(?:{p})" for p in (
    r"\b(?:criteri(?:on|a)|rubric|checklist|requirements?)\b[^.\n]{0,40}?\b(?:(?:is|are|was|were|all|been|fully|now)"
    r"\s+)?(?:met|satisfied|fulfill?ed|achieved|passed|covered|addressed|ticked|checked)\b",
    r"\b(?:meets?|satisf(?:y|ies)|fulfill?s?|addresses|covers|passes|ticks) (?:all|every|each|the)\s+(?:of the )?"
    r"(?:rubric |grading |scoring |listed |above )?(?:criteri(?:on|a)|rubric items?|requirements|points)",
    r"criteria_met|\bmet\s*[:=]\s*(?:true|yes)\b|\[x\]\s*(?:criteri|rubric)",
    r"(?:满足|符合|达到|达成|覆盖|完成)了?(?:全部|所有|每一?[项条个])?的?(?:评分)?(?:标准|要求|要点|条目|细则|评分项)",
    r"(?:评分|评价|所有|全部|各项)(?:标准|要点|条目|细则|评分项)[^。\n]{0,10}?(?:均|都|全部)?已?(?:满足|符合|达到|达成)",
)))
"""Claims that criteria are met ("All rubric criteria are met", "criteria_met: true", 已满足所有评分标准)."""

META = re.compile("|".join(f"(?:{p})" for p in (
    r"\b(?:the|this|my) (?:response|answer|reply|assistant)\b", r"\bthe user\b", r"\bcriteri(?:on|a)\b", r"\brubric\b",
    r"\b(?:mentions|advises|recommends|states|explains|includes|asks|tells) (?:the user|that the|the patient to)\b",
    r"^(?:[-*•·\d.)\[\]x✓✔☑ ]*)(?:mentions|advises|recommends|states|explains|suggests|asks|tells|includes|provides|"
    r"notes|describes|warns|encourages|emphasi[sz]es|identifies|avoids|fails)\b",
    r"(?:该|本|此)(?:回答|回复|答案)", r"回答中", r"用户", r"评分", r"标准[:：]",
)))
"""Rubric meta-language: text about "the response" and "the user" rather than to the user."""

RUBRIC_VERBS = frozenset("""
response respons answer reply assistant user mention advise recommend state explain include ask tell provide suggest
describe discus note clearly correctly appropriately appropriate accurately accurate whether approach criterion
criteria rubric point possible
回答 回复 提到 提及 建议 说明 指出 用户 提供 询问 是否 包括 包含 明确 正确 准确 恰当 适当 告知 告诉 解释 给出 描述
""".split())
"""Words of a criterion that describe the grading, not the content (left out of the offline grader's terms)."""

_SENTENCE = re.compile(r"[^.!?。！？;；\n]+[.!?。！？;；]?")


@lru_cache(maxsize=4096)
def _fold(text: str) -> str:
    return re.sub(r"\s+", " ", normalise(text).lower()).strip()


@lru_cache(maxsize=4096)
def _windows(criterion: str) -> tuple[str, ...]:
    """Every run of ECHO_SHARE of the criterion's words / characters, as space-joined text."""
    units = _UNIT.findall(_fold(criterion))
    k = -(-len(units) * ECHO_SHARE // 1)
    if len(units) < ECHO_MIN_UNITS:
        return ()
    return tuple(f" {' '.join(units[i:i + int(k)])} " for i in range(len(units) - int(k) + 1))


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


@lru_cache(maxsize=4096)
def content_terms(criterion: str) -> tuple[str, ...]:
    """The criterion's key terms that name content (rubric verbs and meta words left out), English ones rooted."""
    terms = [t if has_cjk(t) else root(t) for t in key_terms(criterion, 32)]
    return tuple(dict.fromkeys(t for t in terms if t not in RUBRIC_VERBS and root(t) not in RUBRIC_VERBS))


def term_in(term: str, sentence: str, roots: set[str]) -> bool:
    """English terms by root; Chinese terms as substrings, a 3+ character one also without its first or last
    character (jieba cuts criteria and answers differently: 时嚼服 / 嚼服, 过敏者 / 过敏)."""
    if not has_cjk(term):
        return term in roots
    return term in sentence or (len(term) >= 3 and (term[1:] in sentence or term[:-1] in sentence))


def _echoes(sentence: str, criterion: str) -> bool:
    s = _fold(sentence)
    units = f" {' '.join(_UNIT.findall(s))} "
    if any(w in units for w in _windows(criterion)):
        return True
    terms = content_terms(criterion)
    if not terms or not META.search(s):
        return False
    roots = {root(w) for w in en_words(s)}
    return sum(term_in(t, s, roots) for t in terms) * 2 >= len(terms)


def rubric_gaming(answer: str, criteria: Sequence[str]) -> str | None:
    """Why ``answer`` games the rubric (a claim that criteria are met, or an echo of a criterion), or None."""
    folded = _fold(answer)
    claim = CLAIM.search(folded)
    if claim:
        return f"claims criteria are met: {claim.group(0)!r}"
    for sentence in sentences(answer):
        for criterion in criteria:
            if _echoes(sentence, criterion):
                return f"echoes the criterion {criterion[:60]!r}"
    return None


def offline_criteria(answer: str, criteria: Sequence[str]) -> list[tuple[bool, str]]:
    """(met, explanation) per criterion, deterministic (see the module doc)."""
    parts = [(s, {root(w) for w in en_words(s)}) for s in sentences(answer)]
    credit = [0] * len(parts)
    out = []
    for criterion in criteria:
        terms = content_terms(criterion)
        need = max(1, -(-len(terms) * OFFLINE_SHARE // 1)) if terms else 1
        best = None
        for i, (s, words) in enumerate(parts):
            found = sum(term_in(t, s, words) for t in terms)
            if found >= need and credit[i] < SENTENCE_CREDIT and (best is None or found > best[1]):
                best = (i, found)
        if best is None:
            out.append((False, f"offline: no sentence holds {int(need)} of the terms {', '.join(terms[:6])}"))
        else:
            credit[best[0]] += 1
            out.append((True, f"offline: {best[1]}/{len(terms)} terms in sentence {best[0] + 1}"))
    return out
