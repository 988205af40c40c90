"""Injections aimed at the judge, by family, and the views of a response they are matched on (pure).

``rules.detect_injection`` matches ``rules.INJECTION`` and the ``FAMILIES`` (``find_bait``) on every view of ``matching_views``:
the text NFKC-normalised, invisible characters dropped, Cyrillic / Greek look-alikes folded to Latin, traditional
Chinese converted to simplified (OpenCC ``t2s``) and lowercased; the same with leetspeak digits read as letters
(only in words that mix both); and each base64 run that decodes to text. Families are listed in
docs/reward_rules.md; each has attacks and ordinary medical negatives in tests/judge_injections.py.
"""
from __future__ import annotations

import base64
import binascii
import re
from functools import lru_cache

from medrl.reward.text import has_cjk, normalise

CONFUSABLES = str.maketrans(
    # Cyrillic
    "аеорсухіїјѕԁԛԝһүѵАВЕКМНОРСТХУІЈЅԚԜ"
    # Greek
    "αεικνορτυχγΑΒΕΖΗΙΚΜΝΟΡΤΥΧ"
    # Latin variants NFKC leaves alone
    "ıɑɡ",
    "aeopcyxiijsdqwhyvABEKMHOPCTXYIJSQW"
    "aeikvoptuxyABEZHIKMNOPTYX"
    "iag")
"""Cyrillic and Greek letters that look like Latin ones (Unicode confusables, the letters used to dodge an English
pattern), mapped to the Latin letter they imitate."""

LEET = str.maketrans("0134579@$", "oieastgas")
"""Digits and signs read as letters in leetspeak ("1gn0r3" -> "ignore"); ``1`` is also tried as ``l``."""
_LEET_WORD = re.compile(r"(?<![a-z0-9@$])(?=[a-z]*[0-9@$])(?=[0-9@$]*[a-z])[a-z0-9@$]+")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")

_JUDGE_EN = (r"(?:judge|grader|evaluator|grading model|reward model|evaluation model|judge model|"
             r"ai judge|llm judge|grading system|evaluation system)s?")
"""Names of the judge itself (the clinical "examiner", "assessor", "reviewer" or "scoring model" are left out)."""
_GRADER_EN = rf"(?:{_JUDGE_EN}|examiners?|scorers?|markers?|reviewers?|assessors?|scoring models?)"
_GRADER_ZH = (r"(?:评分员|评分者|评分人|评分老师|评分模型|评分系统|打分模型|奖励模型|评审模型|评测模型|评判模型|评审系统|"
              r"阅卷系统|阅卷老师|阅卷人|阅卷员|评审老师|评审专家|评审员|评审|评委|裁判|考官|打分员)")
_SCORE_EN = r"(?:scor\w*|rat(?:e|ing)\w*|grad\w*|marks?|points|verdict)"
_HIGH_ZH = r"(?:满分|最高分|给个?高分|打高分|评高分|高分通过|好的?分数|分数给高|多给(?:几|一些|点)?分|加分|好评|高抬贵手|手下留情)"


def _any_of(patterns: list[str]) -> str:
    return "|".join(f"(?:{p})" for p in patterns)


FAMILIES: dict[str, list[str]] = {
    "persona": [
        r"\b(?:you are now|from now on,? you(?:'re| are)|pretend (?:that )?you(?:'re| are)|act as|acting as|"
        r"role-?play as|imagine you(?:'re| are)|you will (?:now )?act as|play the role of|let's play a game)\b"
        rf"[^.\n]{{0,60}}?(?:{_GRADER_EN}|\bbot\b|\bgpt\b|\bdan\b|full marks|never rates?)",
        r"\b(?:developer|god|jailbreak|dan) mode\b",
        r"(?:扮演|假装|假设你是|假如你是|现在你是|你现在是|从现在(?:起|开始)[,，]?你|你的身份是|充当|化身)[^。\n]{0,20}?"
        r"(?:评分|评委|裁判|考官|阅卷|评审|打分|判分)",
    ],
    "html_comment": [
        r"<!--(?:(?!-->)[\s\S]){0,300}?(?:evaluat|scor|rating|\brate\b|grad|judge|review|marks|rubric|axis|axes|"
        r"评分|打分|评审|评价|阅卷|评委|满分|分数|审核|标准)",
    ],
    "base64_request": [
        r"\bdecode\b[^.\n]{0,60}?\b(?:follow|obey|execute|apply|comply|carry (?:it |them )?out|do what)\b(?![\s-]*up)",
        r"解码[^。\n]{0,20}?(?:照做|执行|遵循|遵照|按照|服从)",
    ],
    "json_verdict": [
        r"[\"'](?:score|overall|overall_score|final_score|total_score|rating|grade|verdict|points|marks|pass|passed)"
        r"[\"']\s*:\s*(?:[\"'\w])",
        r"[\"'](?:评分|得分|分数|总分|评语|评价结论|结论|准确性|安全性|完整性|清晰度)[\"']\s*:",
    ],
    "judge_should": [
        rf"\b{_JUDGE_EN}\b[^.\n]{{0,50}}?\b(?:should|must|will|shall|needs? to|has to|is to|ought to)\b[^.\n]{{0,40}}?"
        r"\b(?:score|rate|grade|mark|award|give|conclude|output|return|assign|skip|ignore|treat|consider)",
        rf"\b(?:instructions?|note|message|reminder|hey|hi|dear)\b[^.\n]{{0,12}}?\b(?:to|for)?\s*(?:the |any |all )?"
        rf"{_JUDGE_EN}\b",
        rf"{_GRADER_ZH}[^。\n]{{0,12}}?(?:应当|应该|必须|务必|需要|只需|就要)[^。\n]{{0,16}}?(?:判|评|打|给|跳过|忽略|无视|"
        r"视为|认定)",
        rf"(?:致|给|亲爱的|尊敬的)\s*{_GRADER_EN}",
    ],
    "fake_turn": [
        r"(?:^|\n)\s*(?:user|human|用户|人类)\s*:",
        r"<\|(?:im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id)\|>|\[/?inst\]|<</?sys>>",
        r"(?:^|\n)\s*#{2,}\s*(?:instruction|system|user|human)\s*(?::|\n|$)",
    ],
    "ps_evaluator": [
        rf"\b(?:whoever|anyone|someone|the (?:person|people|one|model|ai|llm)|you)\s+(?:who(?:'s| is| are)?\s+|"
        rf"(?:is|are)\s+)?(?:evaluat|grad|judg|scor|assess|mark|rat)\w*\s+(?:this|these|my)\b",
        r"\b(?:whoever|anyone|the (?:person|one|model)) (?:who )?(?:is |are )?(?:evaluat|grad|judg|scor|assess|mark|"
        r"rat)\w* (?:the|this) (?:answer|response|reply|output)",
        r"(?:附言|附注|ps|p\.s\.)[^。\n]{0,20}?(?:评分|评审|评委|阅卷|打分|判分|批改)",
        r"(?:评估|评价|审阅|批改|评判|打分|评分)(?:这个|这篇|此|本)(?:回答|答案|回复)的(?:人|模型|老师|ai|系统)",
    ],
    "config_block": [
        r"(?:^|\n)\s*\[\s*(?:grader|grading|judge|judging|evaluation|evaluator|scoring|rubric|评分|评审|打分|阅卷)"
        r"[\w.\-]*\s*\]",
        r"\b(?:grader|grading|judge|evaluator|evaluation|eval|scoring|rubric|reviewer)[_.\-]?(?:mode|override|policy|"
        r"config|settings?|enabled|strict(?:ness)?|threshold|score|min_score|set_score|result|bypass|skip)\b\s*[:=(]",
        r"\b(?:min|minimum|force|forced|override|fixed|default|set)_(?:score|rating|grade|marks?)\b\s*[:=(]",
        r"\b(?:pass_all|auto_?pass|always_?pass|skip_(?:grading|evaluation|checks?))\b",
        r"(?:评分|打分|评审|阅卷)(?:模式|规则|策略|配置|等级)\s*[:=]|(?:最低分|强制满分|默认分数?|固定分数?)\s*[:=]",
    ],
    "polite": [
        rf"\b(?:rate|score|grade|mark|evaluate|assess|judge)\s+(?:this|my|the|our)\s+(?:answer|response|reply|output|"
        rf"submission)\s+(?:highly|generously|favou?rably|leniently|kindly|well)",
        rf"\b(?:generous|lenient|kind)\w*\s+(?:with\s+)?(?:the\s+|your\s+)?(?:scoring|grading|marking|rating|"
        rf"evaluation|score|marks)",
        rf"\b(?:high|good|top|favou?rable|generous)\s+{_SCORE_EN}\s+(?:for|to)\s+(?:this|my)\s+(?:answer|response|reply)",
        rf"(?:恳请|烦请|麻烦|拜托|希望|请求|求求|劳驾|还请|请|望)[^。\n]{{0,20}}?{_HIGH_ZH}",
        r"请(?:给|把)(?:这个|本|此|该)(?:回答|答案|回复)[^。\n]{0,10}?(?:分|评价|评为)",
    ],
    "fake_system": [
        r"[【\[<(]\s*(?:系统|system|管理员|admin|developer|开发者)\s*(?:提示|消息|通知|指令|设置|公告|prompt|message|"
        r"notice|note|override)?\s*[】\]>)]",
        r"(?:系统|管理员|开发者)(?:提示|消息|指令|通知|公告|命令)词?\s*:",
        r"(?:^|\n)\s*#+\s*system\b|#{2,}\s*system\s+(?:override|prompt|message|note|notice|instructions?)",
        r"(?:评分|打分|评审|评价)(?:规则|标准|策略)(?:已经?)?(?:更新|变更|修改|调整|取消)",
        r"(?:停止|跳过|免于)(?:评估|评分|打分|评审)|无需(?:评分|打分|评审)",
        r"\b(?:evaluation|grading|scoring) (?:is )?(?:disabled|suspended|skipped|overridden)\b",
    ],
}
"""Patterns of each family, matched on the views of ``matching_views`` (lowercase, simplified Chinese)."""

TRIGGERS: dict[str, tuple[str, ...]] = {
    "persona": ("you are now", "from now on", "pretend", "act as", "acting as", "role", "imagine you", "play a game",
                "mode", "扮演", "假装", "假设你是", "假如你是", "现在你是", "你现在是", "从现在", "身份", "充当", "化身"),
    "html_comment": ("<!--",),
    "base64_request": ("decode", "解码"),
    "json_verdict": ("score", "overall", "rating", "grade", "verdict", "points", "marks", "pass", "评分", "得分", "分数",
                     "总分", "评语", "结论", "准确性", "安全性", "完整性", "清晰度"),
    "judge_should": ("judge", "grader", "evaluator", "grading", "reward model", "evaluation model", "evaluation system",
                     "examiner", "scorer", "marker", "reviewer", "assessor", "scoring model", "评分", "打分", "奖励模型",
                     "评审", "评测模型", "评判模型", "阅卷", "评委", "裁判", "考官"),
    "fake_turn": ("user", "human", "用户", "人类", "<|", "[inst", "[/inst", "<<sys", "<</sys", "instruction", "system"),
    "ps_evaluator": ("whoever", "anyone", "someone", "the person", "the people", "the one", "the model", "the ai",
                     "the llm", "附言", "附注", "ps", "p.s.", "回答的", "答案的", "回复的"),
    "config_block": ("grader", "grading", "judg", "eval", "scoring", "rubric", "reviewer", "_score", "_rating",
                     "_grade", "_mark", "pass", "skip_", "评分", "打分", "评审", "阅卷", "最低分", "强制满分", "默认分",
                     "固定分"),
    "polite": ("rat", "scor", "grad", "mark", "evaluat", "assess", "judg", "generous", "lenient", "kind", "points",
               "verdict", "满分", "最高分", "高分", "好分数", "好的分数", "分数给高", "多给", "加分", "好评", "高抬贵手",
               "手下留情", "请给", "请把"),
    "fake_system": ("系统", "system", "管理员", "admin", "developer", "开发者", "评分", "打分", "评审", "评价", "停止", "跳过",
                    "免于", "无需", "evaluation", "grading", "scoring"),
}
"""Substrings a view must contain for a family's patterns to match at all (each pattern needs one of them): a
family's regex runs only on views that contain one, which keeps ordinary text cheap (tested against every pattern
of ``FAMILIES`` on the attack set)."""

GATED_FAMILIES: tuple[tuple[tuple[str, ...], re.Pattern], ...] = tuple(
    (TRIGGERS[family], re.compile(_any_of(patterns))) for family, patterns in FAMILIES.items())
"""(triggers, compiled patterns) of each family of ``FAMILIES``, in order (``first_gated_match``)."""


def first_gated_match(families: tuple[tuple[tuple[str, ...], re.Pattern], ...], view: str) -> str | None:
    """The first match of the first family whose regex matches ``view``; a family's regex runs only when ``view``
    holds one of its trigger substrings (each of its matches holds one: tests/test_reward_attacks_on_cpu.py)."""
    for triggers, rx in families:
        if any(t in view for t in triggers):
            m = rx.search(view)
            if m:
                return m.group(0)
    return None


def find_bait(view: str) -> str | None:
    """The first bait for the judge in a ``matching_views`` view (None: none)."""
    return first_gated_match(GATED_FAMILIES, view)


@lru_cache(maxsize=1)
def _t2s():
    import opencc

    return opencc.OpenCC("t2s")


def fold(text: str) -> str:
    """The text injection patterns read: ``normalise`` (NFKC, invisible characters, spaced-out words), look-alike
    letters folded to Latin, traditional Chinese as simplified, lowercase, curly apostrophes straight."""
    text = normalise(text).translate(CONFUSABLES)
    if has_cjk(text):
        text = _t2s().convert(text)
    return text.lower().replace("\u2019", "'").replace("\u2018", "'")


def _leet_views(folded: str) -> list[str]:
    """``folded`` with leetspeak words read as letters, when at least two words read as plain words ("th3 4nswer";
    not "cyp2d6", "covid-19" or a lone "hba1c")."""
    if sum(w.translate(LEET).isalpha() for w in _LEET_WORD.findall(folded)) < 2:
        return []
    views = []
    for one in ("i", "l"):
        table = {**LEET, ord("1"): one}
        views.append(_LEET_WORD.sub(lambda m: m.group(0).translate(table), folded))
    return views


def _decoded_base64(text: str) -> list[str]:
    """Text hidden in base64 runs of ``text`` (runs that do not decode to UTF-8 text are skipped)."""
    out = []
    for run in _BASE64_RUN.findall(normalise(text)):
        try:
            decoded = base64.b64decode(run + "=" * (-len(run) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if decoded.isprintable() or all(c.isprintable() or c.isspace() for c in decoded):
            out.append(decoded)
    return out


def matching_views(text: str) -> list[str]:
    """``fold(text)``, its leetspeak readings, and the folded text of each base64 payload in it."""
    folded = fold(text)
    views = [folded, *_leet_views(folded)]
    for decoded in _decoded_base64(text):
        views.append(fold(decoded))
    return views
