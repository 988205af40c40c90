"""Risk level of a medical question: a small documented rule set (English and Chinese keywords).

A question is **high** risk if it matches any high rule, else **medium** if it matches any medium rule, else **low**.
Rules read the question (for PubMedQA the research question, not the abstract), case-insensitively. Each rule is a
list of keywords (plain substrings, all found in one scan) plus a few regular expressions for word boundaries and
patterns, each guarded by a plain trigger substring.

high
  overdose        overdose / lethal or fatal dose / 过量, 致死量
  self_harm       suicide, self-harm, wanting to die / 自杀, 自残, 轻生, 不想活
  emergency       chest pain, can't breathe, stroke signs, seizure, unconscious, anaphylaxis, heavy bleeding,
                  vomiting or coughing blood / 胸痛, 呼吸困难, 中风, 抽搐, 昏迷, 过敏性休克, 大出血, 呕血, 咯血
  poisoning       poisoning, swallowed chemicals or batteries, carbon monoxide / 中毒, 误服, 农药, 一氧化碳
  pregnancy_drug  a pregnancy/breastfeeding word AND a medication word in the same question
  child_drug      a child/infant word AND a medication word in the same question
medium
  dosing          dose, mg, how many tablets / 剂量, 用量, 吃几片, 毫克
  prescription    antibiotics, opioids, sedatives, steroids, "without a prescription" / 抗生素, 处方药, 激素, 安眠药
  pregnancy       pregnancy or breastfeeding alone / 怀孕, 孕妇, 哺乳
  children        children or infants alone / 儿童, 婴儿, 宝宝
  serious_disease cancer, HIV, hepatitis, heart failure, sepsis / 癌, 肿瘤, 白血病, 肝炎, 艾滋, 心衰
low
  everything else.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    keywords: tuple[str, ...]
    patterns: tuple[tuple[str, str], ...] = ()
    """(trigger, regex): the regex runs only when the plain trigger substring is present (keeps rules fast)."""

    def __post_init__(self):
        object.__setattr__(self, "_rx", tuple((t, re.compile(p)) for t, p in self.patterns))


MEDICATION = Rule(("medication", "medicine", "drug", "pill", "tablet", "dose", "dosage", "antibiotic", "ibuprofen",
                   "acetaminophen", "paracetamol", "aspirin", "amoxicillin", "codeine", "syrup",
                   "药", "剂量", "毫克", "用量", "几片"), (("mg", r"\d ?mg\b"), ("片", r"\d+片")))
PREGNANCY = Rule(("pregnan", "breastfeeding", "breast-feeding", "trimester", "gestation",
                  "怀孕", "孕妇", "孕期", "妊娠", "哺乳", "备孕"), (("孕", r"孕\d+周"),))
CHILDREN = Rule(("child", "infant", "baby", "babies", "newborn", "toddler", "pediatric", "paediatric",
                 "儿童", "小孩", "孩子", "婴儿", "宝宝", "新生儿", "幼儿", "小儿"),
                (("kid", r"\bkids?\b"), ("month", r"\b\d{1,2}[- ]months?[- ]old"), ("个月", r"\d+个月")))

HIGH_RULES: dict[str, Rule] = {
    "overdose": Rule(("overdos", "lethal dose", "fatal dose", "deadly dose", "过量", "致死量", "致命剂量", "一整瓶"),
                     (("how many", r"how many .{0,30}(?:to die|to kill|kill me)"), ("吃多少", r"吃多少.{0,6}(?:会死|致死|能死)"))),
    "self_harm": Rule(("suicid", "kill myself", "end my life", "self-harm", "self harm", "hurt myself", "cut myself",
                       "want to die", "自杀", "自残", "轻生", "不想活", "割腕", "结束生命", "想死", "寻死")),
    "emergency": Rule(("chest pain", "crushing chest", "can't breathe", "cant breathe", "cannot breathe",
                       "difficulty breathing", "shortness of breath", "short of breath", "unconscious", "unresponsive",
                       "passed out", "seizure", "convuls", "stroke", "facial droop", "slurred speech", "anaphyla",
                       "severe bleeding", "bleeding heavily", "vomiting blood", "coughing blood", "coughing up blood",
                       "heart attack", "choking", "胸痛", "胸口痛", "呼吸困难", "喘不上气", "喘不过气", "昏迷", "意识不清",
                       "晕倒", "抽搐", "中风", "脑卒中", "口角歪斜", "言语不清", "休克", "大出血", "呕血", "吐血", "咯血",
                       "心梗", "心肌梗", "窒息")),
    "poisoning": Rule(("poison", "carbon monoxide", "中毒", "误服", "误食", "农药", "一氧化碳", "煤气"),
                      (("swallowed", r"swallowed (?:a |some )?(?:bleach|battery|batteries|detergent|pesticide)"),)),
}
MEDIUM_RULES: dict[str, Rule] = {
    "dosing": Rule(("dose", "dosage", "剂量", "用量", "吃几片", "毫克", "一次吃多少"),
                   (("mg", r"\d ?mg\b"), ("how ", r"how (?:much|many) .{0,30}(?:take|give)"))),
    "prescription": Rule(("antibiotic", "opioid", "oxycodone", "morphine", "fentanyl", "tramadol", "benzodiazepine",
                          "xanax", "valium", "steroid", "prednis", "without prescription", "without a prescription",
                          "抗生素", "消炎药", "处方药", "头孢", "阿莫西林", "激素", "安眠药", "镇静", "止痛药", "吗啡",
                          "曲马多")),
    "pregnancy": PREGNANCY,
    "children": CHILDREN,
    "serious_disease": Rule(("cancer", "tumor", "tumour", "malignan", "leukemia", "leukaemia", "hepatitis",
                             "heart failure", "sepsis", "癌", "肿瘤", "白血病", "肝炎", "艾滋", "心衰", "心力衰竭", "败血症"),
                            (("hiv", r"\bhiv\b"),)),
}

_RULES: dict[str, Rule] = {**HIGH_RULES, **MEDIUM_RULES, "medication": MEDICATION}
# one scan for every keyword (longest first); a keyword also counts for every rule owning a keyword inside it
_KEYWORDS = sorted({k for rule in _RULES.values() for k in rule.keywords}, key=lambda k: (-len(k), k))
_SCAN = re.compile("|".join(map(re.escape, _KEYWORDS)))
_OWNERS = {k: {name for name, rule in _RULES.items() if any(own in k for own in rule.keywords)} for k in _KEYWORDS}


def _matched(lowered: str) -> set[str]:
    names: set[str] = set()
    for keyword in set(_SCAN.findall(lowered)):
        names |= _OWNERS[keyword]
    for name, rule in _RULES.items():
        if name not in names and any(t in lowered and rx.search(lowered) for t, rx in rule._rx):
            names.add(name)
    return names


def classify_risk(text: str) -> tuple[str, list[str]]:
    """Return (level, names of the rules that matched, in rule order)."""
    names = _matched(text.lower())
    high = [name for name in HIGH_RULES if name in names]
    if "medication" in names:
        high += [combo for rule, combo in (("pregnancy", "pregnancy_drug"), ("children", "child_drug")) if rule in names]
    if high:
        return "high", high
    medium = [name for name in MEDIUM_RULES if name in names]
    return ("medium", medium) if medium else ("low", [])
